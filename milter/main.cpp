// paas-milter command line: run the daemon, check a configuration, or ask what a
// transaction would do (like `postmap -q`) without a running MTA.
#include <cstdio>
#include <cstring>
#include <string>
#include <string_view>
#include <vector>

#include <fmt/format.h>

#include "daemon.hpp"
#include "health.hpp"
#include "paasmilter/classifier.hpp"
#include "paasmilter/config.hpp"
#include "paasmilter/log.hpp"
#include "paasmilter/postfix_config.hpp"
#include "paasmilter/quota/route_quota.hpp"
#include "paasmilter/sendmail_config.hpp"
#include "paasmilter/verdict.hpp"
#include "postfix_facts.hpp"

namespace {

using namespace paasmilter;

constexpr const char* kDefaultConfig = "/etc/paas-milter/paas-milter.toml";
constexpr const char* kVersion = PAAS_MILTER_VERSION;  // meson's project version

constexpr const char* kUsage = R"(usage:
  paas-milter run    [-c FILE] [--foreground] [--debug] [--verbose] [--log-format text|json]
  paas-milter check  [-c FILE] [--postconf PATH] [--postfix-config DIR]
  paas-milter query  [-c FILE] [--client-addr IP] [--client-name NAME]
                     [--cert-subject S] [--cert-issuer S] [--cert-fingerprint FP]
                     [--auth USER] [--from ADDR] [--rcpt ADDR]... [--header 'Name: value']...
  paas-milter header-checks [-c FILE]
  paas-milter postfix-config [-c FILE] [--table-dir DIR]
  paas-milter sendmail-config [-c FILE] [--table-dir DIR]
  paas-milter health [-c FILE] [--socket SPEC] [--timeout SECONDS]
  paas-milter version | --version | -V
  paas-milter help | --help | -h

  run            serve libmilter on milter.socket; logs to syslog (mail), or to stderr
                 with --foreground. SIGHUP reloads the configuration, SIGTERM stops.
                 --verbose logs every milter stage of each transaction; --log-format
                 json writes one JSON object per line (for container log collectors).
  check          validate the configuration and every table it names (exit 0 or 1);
                 risky settings (a socket other hosts can reach, secret files others
                 can read) are printed as warnings and still exit 0, as is Postfix
                 miswiring found through postconf (--postfix-config DIR: its -c DIR)
  query          print the decision for one transaction (matched rule, route, action)
  header-checks  print the milter_header_checks lines for the relay routes
  postfix-config print what Postfix needs for the routes: main.cf and master.cf lines,
                 milter_header_checks, transport and generic maps (tables in DIR)
  sendmail-config print what Sendmail needs for the routes (milter.mta = "sendmail"):
                 sendmail.mc lines (INPUT_MAIL_FILTER, a mailer per relay route) and
                 the mailertable (in DIR, default /etc/mail)
-c FILE, --config FILE: the configuration, by default /etc/paas-milter/paas-milter.toml.
)";

int usage_error(const std::string& message) {
    std::fprintf(stderr, "paas-milter: %s\n%s", message.c_str(), kUsage);
    return 2;
}

struct Arguments {
    std::string command;
    std::string config = kDefaultConfig;
    bool foreground = false;
    bool debug = false;
    bool verbose = false;
    LogFormat log_format = LogFormat::text;
    Transaction tx;
    PostfixCheckOptions postfix;  // check: --postconf, --postfix-config
    // postfix-config, sendmail-config: --table-dir
    PostfixConfigOptions postfix_config;
    SendmailConfigOptions sendmail_config;
};

// Returns an error message, or empty on success.
std::string parse(int argc, char** argv, Arguments& args) {
    if (argc < 2) return "missing command";
    args.command = argv[1];
    for (int i = 2; i < argc; ++i) {
        std::string_view arg = argv[i];
        auto value = [&](std::string& out) -> bool {
            if (i + 1 >= argc) return false;
            out = argv[++i];
            return true;
        };
        std::string header;
        bool ok = true;
        if (arg == "-c" || arg == "--config") {
            ok = value(args.config);
        } else if (arg == "--foreground" || arg == "-f") {
            args.foreground = true;
        } else if (arg == "--debug") {
            args.debug = true;
        } else if (arg == "--postconf") {
            ok = value(args.postfix.postconf);
        } else if (arg == "--postfix-config") {
            ok = value(args.postfix.config_directory);
        } else if (arg == "--table-dir") {
            ok = value(args.postfix_config.table_directory);
            args.sendmail_config.table_directory = args.postfix_config.table_directory;
        } else if (arg == "--verbose" || arg == "-v") {
            args.verbose = true;
        } else if (arg == "--log-format") {
            std::string format;
            ok = value(format);
            if (ok && !parse_log_format(format, args.log_format)) {
                return fmt::format("--log-format wants \"text\" or \"json\", got '{}'", format);
            }
        } else if (arg == "--client-addr") {
            ok = value(args.tx.client_addr);
        } else if (arg == "--client-name") {
            ok = value(args.tx.client_name);
        } else if (arg == "--cert-subject") {
            ok = value(args.tx.cert_subject);
        } else if (arg == "--cert-issuer") {
            ok = value(args.tx.cert_issuer);
        } else if (arg == "--cert-fingerprint") {
            ok = value(args.tx.cert_fingerprint);
        } else if (arg == "--auth") {
            ok = value(args.tx.auth_user);
        } else if (arg == "--from") {
            std::string from;
            ok = value(from);
            args.tx.sender = strip_angle_brackets(from);
        } else if (arg == "--rcpt") {
            std::string rcpt;
            ok = value(rcpt);
            args.tx.recipients.push_back(strip_angle_brackets(rcpt));
        } else if (arg == "--header") {
            ok = value(header);
            auto colon = header.find(':');
            if (ok && (colon == std::string::npos || colon == 0)) {
                return fmt::format("--header wants 'Name: value', got '{}'", header);
            }
            if (ok) {
                std::string_view rest = std::string_view(header).substr(colon + 1);
                while (!rest.empty() && (rest.front() == ' ' || rest.front() == '\t')) {
                    rest.remove_prefix(1);
                }
                args.tx.headers.push_back({header.substr(0, colon), std::string(rest)});
            }
        } else {
            return fmt::format("unknown option '{}'", arg);
        }
        if (!ok) return fmt::format("option '{}' needs a value", arg);
    }
    return {};
}

int command_check(const Arguments& args) {
    auto config = load_config(args.config);
    if (!config) {
        std::fprintf(stderr, "%s\n", config.error().to_string().c_str());
        return 1;
    }
    // Risky but valid: still exit 0, so that a unit's ExecStartPre does not refuse to start.
    for (const std::string& warning : (*config)->warnings) {
        std::fprintf(stderr, "warning: %s\n", warning.c_str());
    }
    report_postfix_wiring(**config, args.postfix);
    // Without [loop], routed messages are neither stamped nor checked for routing loops.
    const std::string loop = (*config)->loop ? "loop protection as " + (*config)->loop->gateway_id
                                             : std::string("no loop protection");
    std::printf("%s: OK (%zu routes, %zu rules, mode %s, %s)\n", args.config.c_str(),
                (*config)->routes.size(), (*config)->rules.size(), to_string((*config)->mode),
                loop.c_str());
    return 0;
}

int command_query(const Arguments& args) {
    auto config = load_config(args.config);
    if (!config) {
        std::fprintf(stderr, "%s\n", config.error().to_string().c_str());
        return 1;
    }
    Decision decision = classify(**config, args.tx);
    Verdict verdict = decide_verdict(**config, decision, 0);
    std::fputs(format_query_report(decision, verdict, args.tx).c_str(), stdout);
    if (decision.route) std::fputs(format_quota_report(**config, *decision.route).c_str(), stdout);
    return 0;
}

int command_header_checks(const Arguments& args) {
    auto config = load_config(args.config);
    if (!config) {
        std::fprintf(stderr, "%s\n", config.error().to_string().c_str());
        return 1;
    }
    std::fputs(render_header_checks(**config).c_str(), stdout);
    return 0;
}

int command_postfix_config(const Arguments& args) {
    auto config = load_config(args.config);
    if (!config) {
        std::fprintf(stderr, "%s\n", config.error().to_string().c_str());
        return 1;
    }
    std::fputs(render_postfix_config(**config, args.postfix_config).c_str(), stdout);
    return 0;
}

int command_sendmail_config(const Arguments& args) {
    auto config = load_config(args.config);
    if (!config) {
        std::fprintf(stderr, "%s\n", config.error().to_string().c_str());
        return 1;
    }
    std::fputs(render_sendmail_config(**config, args.sendmail_config).c_str(), stdout);
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    try {
        Arguments args;
        if (argc >= 2 && (std::strcmp(argv[1], "--help") == 0 || std::strcmp(argv[1], "-h") == 0 ||
                          std::strcmp(argv[1], "help") == 0)) {
            std::fputs(kUsage, stdout);
            return 0;
        }
        if (argc >= 2 && std::strcmp(argv[1], "health") == 0) {
            return command_health(argc - 2, argv + 2, kDefaultConfig);
        }
        if (std::string error = parse(argc, argv, args); !error.empty()) return usage_error(error);
        if (args.command == "run") {
            return run_daemon(
                {args.config, args.foreground, args.debug, args.verbose, args.log_format});
        }
        if (args.command == "check") return command_check(args);
        if (args.command == "query") return command_query(args);
        if (args.command == "header-checks") return command_header_checks(args);
        if (args.command == "postfix-config") return command_postfix_config(args);
        if (args.command == "sendmail-config") return command_sendmail_config(args);
        if (args.command == "version" || args.command == "--version" || args.command == "-V") {
            std::printf("paas-milter %s\n", kVersion);
            return 0;
        }
        return usage_error(fmt::format("unknown command '{}'", args.command));
    } catch (const std::exception& e) {
        std::fprintf(stderr, "paas-milter: %s\n", e.what());
        return 1;
    }
}
