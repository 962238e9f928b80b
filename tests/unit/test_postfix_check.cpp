// `paas-milter check` against Postfix: each miswiring yields exactly its warning kind, a
// correctly wired Postfix none. The facts are what postconf would print; nothing runs here.
#include <doctest/doctest.h>

#include <functional>
#include <string>
#include <vector>

#include "config_fixture.hpp"
#include "paasmilter/config.hpp"
#include "paasmilter/postfix_check.hpp"
#include "temp_dir.hpp"

using namespace paasmilter;
using paasmilter::testing::load;
using paasmilter::testing::TempDir;

namespace {

// Two relay routes (one with its own header value), a reject route; every route used.
const std::string kConfig = R"(
[milter]
socket = "SOCKET"

[routes.acs-smtp]
action = "relay"
transport = "acs-relay:[smtp.azurecomm.net]:587"

[routes.exchange-online]
action = "relay"
header_value = "exo"
transport = "exo-relay:[contoso-com.mail.protection.outlook.com]:25"

[routes.block]
action = "reject"

[[rules]]
name = "printers"
client_addr = ["192.0.2.0/24"]
route = "acs-smtp"

[[rules]]
name = "scanners"
client_addr = ["198.51.100.0/24"]
route = "exchange-online"

[[rules]]
name = "blocked"
sender = ["spam@example.com"]
route = "block"
)";

constexpr const char* kInet = "inet:10025@127.0.0.1";
constexpr const char* kUnix = "unix:/var/spool/postfix/paas-milter/milter.sock";

const std::string kHeaderChecks =
    "# milter_header_checks\n"
    "/^X-PaaS-Route:\\s*acs-smtp\\s*$/   FILTER acs-relay:[smtp.azurecomm.net]:587\n"
    "/^X-PaaS-Route:\\s*exo\\s*$/        FILTER "
    "exo-relay:[contoso-com.mail.protection.outlook.com]:25\n";

std::string replaced(std::string text, const std::string& from, const std::string& to) {
    const auto at = text.find(from);
    REQUIRE(at != std::string::npos);
    return text.replace(at, from.size(), to);
}

// A correctly wired Debian Postfix: smtpd chrooted, as Debian ships master.cf.
PostfixFacts wired_facts(const std::string& socket) {
    PostfixFacts facts;
    facts.smtpd_milters =
        socket == kInet ? "inet:127.0.0.1:10025" : "unix:/paas-milter/milter.sock";
    facts.milter_default_action = "tempfail";
    facts.milter_header_checks = "pcre:/etc/postfix/milter_header_checks";
    facts.header_checks_tables = {{"pcre:/etc/postfix/milter_header_checks", kHeaderChecks}};
    facts.smtpd_services = {{"smtp", "inet", true, std::nullopt, std::nullopt}};
    return facts;
}

struct Case {
    const char* name;
    const char* socket;
    std::function<void(PostfixFacts&)> change;
    std::vector<WiringIssue> expected;  // empty: correctly wired
    std::function<std::string(std::string)> change_config = nullptr;
};

std::vector<WiringIssue> kinds_of(const std::vector<WiringWarning>& warnings) {
    std::vector<WiringIssue> kinds;
    for (const WiringWarning& warning : warnings) kinds.push_back(warning.kind);
    return kinds;
}

std::string describe(const std::vector<WiringWarning>& warnings) {
    std::string out;
    for (const WiringWarning& warning : warnings) {
        out += std::string("\n  ") + to_string(warning.kind) + ": " + warning.message;
    }
    return out.empty() ? " none" : out;
}

PostfixSmtpdService service(const char* name, bool chroot) {
    return {name, "inet", chroot, std::nullopt, std::nullopt};
}

const std::vector<Case>& cases() {
    using W = WiringIssue;
    static const std::vector<Case> all = {
        // --- correctly wired --------------------------------------------------------------
        {"inet, as Postfix writes it", kInet, [](PostfixFacts&) {}, {}},
        {"inet, localhost for 127.0.0.1",
         kInet,
         [](PostfixFacts& f) { f.smtpd_milters = "inet:localhost:10025"; },
         {}},
        {"inet, one of several milters",
         kInet,
         [](PostfixFacts& f) { f.smtpd_milters = "inet:127.0.0.1:8891, inet:127.0.0.1:10025"; },
         {}},
        {"inet, per-milter settings in braces",
         kInet,
         [](PostfixFacts& f) {
             f.smtpd_milters =
                 "{ inet:127.0.0.1:10025, connect_timeout=10s, default_action=tempfail }";
         },
         {}},
        {"inet6, as Postfix writes it",
         "inet6:10025@::1",
         [](PostfixFacts& f) { f.smtpd_milters = "inet:[::1]:10025"; },
         {}},
        {"a milter on every address, reached on loopback",
         "inet:10025@0.0.0.0",
         [](PostfixFacts& f) { f.smtpd_milters = "inet:127.0.0.1:10025"; },
         {}},
        {"a per-milter tempfail overrides a global accept",
         kInet,
         [](PostfixFacts& f) {
             f.milter_default_action = "accept";
             f.smtpd_milters = "{ inet:127.0.0.1:10025, default_action=tempfail }";
         },
         {}},
        {"quarantine holds mail: not unfiltered delivery",
         kInet,
         [](PostfixFacts& f) { f.milter_default_action = "quarantine"; },
         {}},
        {"unix, chrooted smtpd, path relative to the chroot", kUnix, [](PostfixFacts&) {}, {}},
        {"unix, smtpd without chroot, the full path",
         kUnix,
         [](PostfixFacts& f) {
             f.smtpd_services = {service("smtp", false)};
             f.smtpd_milters = "unix:/var/spool/postfix/paas-milter/milter.sock";
         },
         {}},
        {"unix, chrooted and plain smtpd, a path relative to queue_directory",
         kUnix,
         [](PostfixFacts& f) {
             f.smtpd_services = {service("smtp", true), service("submission", false)};
             f.smtpd_milters = "unix:paas-milter/milter.sock";
         },
         {}},
        {"unix, another queue_directory",
         "unix:/srv/postfix/paas-milter/milter.sock",
         [](PostfixFacts& f) { f.queue_directory = "/srv/postfix/"; },
         {}},
        {"master.cf unknown: either form",
         kUnix,
         [](PostfixFacts& f) {
             f.smtpd_services.clear();
             f.smtpd_milters = "unix:/var/spool/postfix/paas-milter/milter.sock";
         },
         {}},
        {"only one smtpd service has the milter (-o smtpd_milters)",
         kInet,
         [](PostfixFacts& f) {
             f.smtpd_milters = "";
             f.smtpd_services = {service("smtp", true), service("submission", true)};
             f.smtpd_services[0].smtpd_milters = "inet:127.0.0.1:10025";
         },
         {}},
        {"header checks: regexp:, if blocks, nexthop case",
         kInet,
         [](PostfixFacts& f) {
             f.milter_header_checks = "regexp:/etc/postfix/milter_header_checks";
             f.header_checks_tables = {
                 {"regexp:/etc/postfix/milter_header_checks",
                  "if /^X-PaaS-Route:/\n"
                  "/^X-PaaS-Route: acs-smtp$/ FILTER acs-relay:[SMTP.AzureComm.net]:587\n"
                  "/^X-PaaS-Route: exo$/\n"
                  "  FILTER exo-relay:[contoso-com.mail.protection.outlook.com]:25\n"
                  "endif\n"}};
         },
         {}},
        {"header checks: an inline pcre: table after another table",
         kInet,
         [](PostfixFacts& f) {
             f.milter_header_checks = "pcre:/etc/postfix/other, pcre:{{...}}";
             f.header_checks_tables = {
                 {"pcre:/etc/postfix/other", "/^X-Other:/ FILTER x:y\n"},
                 {"pcre:{{...}}",
                  *inline_table_content(
                      "pcre:{ {/^X-PaaS-Route: acs-smtp$/ FILTER "
                      "acs-relay:[smtp.azurecomm.net]:587}, {/^X-PaaS-Route: "
                      "exo$/ FILTER "
                      "exo-relay:[contoso-com.mail.protection.outlook.com]:25} }")}};
         },
         {}},
        {"header checks: a table that could not be read is not judged",
         kInet,
         [](PostfixFacts& f) {
             f.milter_header_checks = "hash:/etc/postfix/milter_header_checks";
             f.header_checks_tables = {{"hash:/etc/postfix/milter_header_checks", std::nullopt}};
         },
         {}},

        // --- miswired -------------------------------------------------------------------------
        {"smtpd_milters empty",
         kInet,
         [](PostfixFacts& f) { f.smtpd_milters = ""; },
         {W::milter_not_listed}},
        {"smtpd_milters names other milters",
         kInet,
         [](PostfixFacts& f) { f.smtpd_milters = "inet:127.0.0.1:8891"; },
         {W::milter_not_listed}},
        {"smtpd_milters has another port",
         kInet,
         [](PostfixFacts& f) { f.smtpd_milters = "inet:127.0.0.1:10026"; },
         {W::milter_not_listed}},
        {"smtpd_milters has another host",
         kInet,
         [](PostfixFacts& f) { f.smtpd_milters = "inet:192.0.2.1:10025"; },
         {W::milter_not_listed}},
        {"unix: smtpd_milters names another socket",
         kUnix,
         [](PostfixFacts& f) { f.smtpd_milters = "unix:/opendkim/opendkim.sock"; },
         {W::milter_not_listed}},
        {"libmilter's inet:PORT@HOST given to Postfix",
         kInet,
         [](PostfixFacts& f) { f.smtpd_milters = "inet:10025@127.0.0.1"; },
         {W::milter_libmilter_syntax}},
        {"inet6: libmilter's syntax",
         "inet6:10025@::1",
         [](PostfixFacts& f) { f.smtpd_milters = "inet6:10025@::1"; },
         {W::milter_libmilter_syntax}},
        {"libmilter's syntax inside braces",
         kInet,
         [](PostfixFacts& f) { f.smtpd_milters = "{ inet:10025@localhost, protocol=6 }"; },
         {W::milter_libmilter_syntax}},
        {"libmilter's syntax in non_smtpd_milters",
         kInet,
         [](PostfixFacts& f) { f.non_smtpd_milters = "inet:10025@127.0.0.1"; },
         {W::milter_libmilter_syntax}},
        {"chrooted smtpd given the full path",
         kUnix,
         [](PostfixFacts& f) {
             f.smtpd_milters = "unix:/var/spool/postfix/paas-milter/milter.sock";
         },
         {W::milter_chroot_path}},
        {"plain smtpd given the path inside the chroot",
         kUnix,
         [](PostfixFacts& f) { f.smtpd_services = {service("smtp", false)}; },
         {W::milter_chroot_path}},
        {"chrooted and plain smtpd share an absolute path",
         kUnix,
         [](PostfixFacts& f) {
             f.smtpd_services = {service("smtp", true), service("submission", false)};
         },
         {W::milter_chroot_path}},
        {"socket outside the chroot of a chrooted smtpd",
         "unix:/run/paas-milter/milter.sock",
         [](PostfixFacts& f) { f.smtpd_milters = "unix:/run/paas-milter/milter.sock"; },
         {W::socket_outside_chroot}},
        {"milter_default_action = accept",
         kInet,
         [](PostfixFacts& f) { f.milter_default_action = "accept"; },
         {W::default_action_accept}},
        {"per-milter default_action=accept",
         kInet,
         [](PostfixFacts& f) {
             f.smtpd_milters = "{ inet:127.0.0.1:10025, default_action=accept }";
         },
         {W::default_action_accept}},
        {"master.cf -o milter_default_action=accept",
         kInet,
         [](PostfixFacts& f) { f.smtpd_services[0].milter_default_action = "accept"; },
         {W::default_action_accept}},
        {"milter_header_checks empty",
         kInet,
         [](PostfixFacts& f) {
             f.milter_header_checks = "";
             f.header_checks_tables.clear();
         },
         {W::header_check_missing, W::header_check_missing}},
        {"no line for a route",
         kInet,
         [](PostfixFacts& f) {
             f.header_checks_tables[0].content =
                 "/^X-PaaS-Route:\\s*acs-smtp$/ FILTER acs-relay:[smtp.azurecomm.net]:587\n";
         },
         {W::header_check_missing}},
        {"a line for the route name, not its header_value",
         kInet,
         [](PostfixFacts& f) {
             f.header_checks_tables[0].content =
                 "/^X-PaaS-Route:\\s*acs-smtp$/ FILTER acs-relay:[smtp.azurecomm.net]:587\n"
                 "/^X-PaaS-Route:\\s*exchange-online$/ FILTER "
                 "exo-relay:[contoso-com.mail.protection.outlook.com]:25\n";
         },
         {W::header_check_missing}},
        {"the line is inside an if that does not match",
         kInet,
         [](PostfixFacts& f) {
             f.header_checks_tables[0].content =
                 "/^X-PaaS-Route:\\s*exo$/ FILTER "
                 "exo-relay:[contoso-com.mail.protection.outlook.com]:25\n"
                 "if /^X-Other:/\n"
                 "/^X-PaaS-Route:\\s*acs-smtp$/ FILTER acs-relay:[smtp.azurecomm.net]:587\n"
                 "endif\n";
         },
         {W::header_check_missing}},
        {"a line pointing at another transport",
         kInet,
         [](PostfixFacts& f) {
             f.header_checks_tables[0].content =
                 replaced(kHeaderChecks, "FILTER acs-relay:[smtp.azurecomm.net]:587",
                          "FILTER smtp:[smtp.azurecomm.net]:587");
         },
         {W::header_check_mismatch}},
        {"a line pointing at another nexthop",
         kInet,
         [](PostfixFacts& f) {
             f.header_checks_tables[0].content =
                 replaced(kHeaderChecks, "[smtp.azurecomm.net]:587", "[smtp.azurecomm.net]:25");
         },
         {W::header_check_mismatch}},
        {"an earlier line with another action wins",
         kInet,
         [](PostfixFacts& f) {
             f.header_checks_tables[0].content = "/^X-PaaS-Route:/ IGNORE\n" + kHeaderChecks;
         },
         {W::header_check_mismatch, W::header_check_mismatch}},
        {"a route nothing uses",
         kInet,
         [](PostfixFacts&) {},
         {W::route_unused},
         [](std::string text) { return text + "\n[routes.spare]\naction = \"tempfail\"\n"; }},
    };
    return all;
}

}  // namespace

TEST_CASE("check against Postfix: each miswiring gives its warning, a wired Postfix none") {
    for (const Case& c : cases()) {
        CAPTURE(c.name);
        TempDir dir;
        std::string text = replaced(kConfig, "SOCKET", c.socket);
        if (c.change_config) text = c.change_config(text);
        const auto config = load(dir, text);
        PostfixFacts facts = wired_facts(c.socket);
        c.change(facts);
        std::vector<WiringWarning> warnings = check_routes_used(*config);
        for (WiringWarning& warning : check_postfix_wiring(*config, facts)) {
            warnings.push_back(std::move(warning));
        }
        CHECK_MESSAGE(kinds_of(warnings) == c.expected, c.name, ":", describe(warnings));
        for (const WiringWarning& warning : warnings) CHECK_FALSE(warning.message.empty());
    }
}

TEST_CASE("check against Postfix: the messages name the setting and the value to write") {
    TempDir dir;
    const auto inet = load(dir, replaced(kConfig, "SOCKET", kInet));
    const auto first = [](const Config& config, const PostfixFacts& facts) {
        auto warnings = check_postfix_wiring(config, facts);
        REQUIRE(warnings.size() == 1);
        return warnings[0].message;
    };

    PostfixFacts facts = wired_facts(kInet);
    facts.smtpd_milters = "inet:127.0.0.1:8891, inet:10025@127.0.0.1";
    CHECK(first(*inet, facts)
              .find("write smtpd_milters = inet:127.0.0.1:8891, "
                    "inet:127.0.0.1:10025 in main.cf") != std::string::npos);

    facts = wired_facts(kInet);
    facts.smtpd_milters = "inet:127.0.0.1:8891";
    CHECK(first(*inet, facts)
              .find("write smtpd_milters = inet:127.0.0.1:8891, "
                    "inet:127.0.0.1:10025 in main.cf") != std::string::npos);

    facts = wired_facts(kInet);
    facts.smtpd_milters = "{ inet:127.0.0.1:10025, default_action=accept }";
    CHECK(first(*inet, facts).find("{ inet:127.0.0.1:10025, default_action=tempfail }") !=
          std::string::npos);

    facts = wired_facts(kInet);
    facts.milter_default_action = "accept";
    CHECK(first(*inet, facts).find("milter_default_action = tempfail") != std::string::npos);

    facts = wired_facts(kInet);
    facts.header_checks_tables[0].content = "";
    auto warnings = check_postfix_wiring(*inet, facts);
    REQUIRE(warnings.size() == 2);
    CHECK(warnings[0].message.find("add the line /^X-PaaS-Route:\\s*acs-smtp$/ FILTER "
                                   "acs-relay:[smtp.azurecomm.net]:587 to "
                                   "/etc/postfix/milter_header_checks") != std::string::npos);

    TempDir unix_dir;
    const auto unix_config = load(unix_dir, replaced(kConfig, "SOCKET", kUnix));
    facts = wired_facts(kUnix);
    facts.smtpd_milters = "unix:/var/spool/postfix/paas-milter/milter.sock";
    CHECK(first(*unix_config, facts).find("write smtpd_milters = unix:/paas-milter/milter.sock") !=
          std::string::npos);
    facts.smtpd_services = {service("smtp", true), service("submission", false)};
    CHECK(first(*unix_config, facts).find("write smtpd_milters = unix:paas-milter/milter.sock") !=
          std::string::npos);

    TempDir outside_dir;
    const auto outside =
        load(outside_dir, replaced(kConfig, "SOCKET", "unix:/run/paas-milter/milter.sock"));
    facts = wired_facts(kUnix);
    facts.smtpd_milters = "unix:/run/paas-milter/milter.sock";
    CHECK(first(*outside, facts)
              .find("set milter.socket = "
                    "\"unix:/var/spool/postfix/paas-milter/milter.sock\"") != std::string::npos);
}

TEST_CASE("routes used by a table result, default_route or a fallback are used") {
    TempDir dir;
    dir.write("devices.cidr", "192.0.2.7 spare\n");
    dir.write("secrets/acs.conn",
              "endpoint=https://contoso.communication.azure.com/;accesskey=c2VjcmV0\n");
    std::string text = replaced(kConfig, "SOCKET", kInet) + R"(
[routes.spare]
action = "tempfail"

[routes.fallback-only]
action = "relay"

[routes.default]
action = "pass"

[routes.acs-api]
action = "api"
connection_string_file = "secrets/acs.conn"
sender = "DoNotReply@contoso.azurecomm.net"
on_failure = "relay:fallback-only"

[[rules]]
name = "devices"
client_addr = ["cidr:devices.cidr"]

[[rules]]
name = "api"
auth = ["app"]
route = "acs-api"
)";
    text = replaced(text, "socket = ", "default_route = \"default\"\nsocket = ");
    const auto config = load(dir, text);
    CHECK(describe(check_routes_used(*config)) == " none");
}

TEST_CASE("parsing what postconf prints") {
    CHECK(split_postfix_list("a, b\tc\n d") == std::vector<std::string>{"a", "b", "c", "d"});
    CHECK(split_postfix_list("{ inet:h:1, default_action=accept }, unix:/x") ==
          std::vector<std::string>{"{ inet:h:1, default_action=accept }", "unix:/x"});
    CHECK(split_postfix_list("pcre:{{/a/ FILTER x:y}, {/b/ DUNNO}} hash:/z") ==
          std::vector<std::string>{"pcre:{{/a/ FILTER x:y}, {/b/ DUNNO}}", "hash:/z"});
    CHECK(split_postfix_list("").empty());

    PostfixFacts facts;
    apply_main_parameters(
        "queue_directory = /srv/spool\nsmtpd_milters = inet:127.0.0.1:10025, unix:/x\n"
        "non_smtpd_milters =\nmilter_default_action = accept\n"
        "milter_header_checks = pcre:/etc/postfix/h\nother = 1\n",
        facts);
    CHECK(facts.queue_directory == "/srv/spool");
    CHECK(facts.smtpd_milters == "inet:127.0.0.1:10025, unix:/x");
    CHECK(facts.non_smtpd_milters.empty());
    CHECK(facts.milter_default_action == "accept");
    CHECK(facts.milter_header_checks == "pcre:/etc/postfix/h");

    // `postconf -M` as Debian's master.cf prints it, and a folded `postconf -Mf` entry.
    auto services = parse_master_services(
        "smtp       inet  n       -       y       -       -       smtpd\n"
        "#628      inet  n       -       y       -       -       qmqpd\n"
        "pickup     unix  n       -       y       60      1       pickup\n"
        "submission inet  n       -       -       -       -       smtpd -o "
        "syslog_name=postfix/submission -o smtpd_milters=$mua_milters\n"
        "127.0.0.1:2525 inet n    -       n       -       -       smtpd\n"
        "    -o smtpd_tls_security_level=none\n"
        "smtpd      pass  -       -       y       -       -       smtpd\n"
        "relay      unix  -       -       y       -       -       smtp\n");
    REQUIRE(services.size() == 4);
    CHECK(services[0].name == "smtp");
    CHECK(services[0].chroot);
    CHECK(services[1].name == "submission");
    CHECK_FALSE(services[1].chroot);  // "-": n since Postfix 3.0
    CHECK(services[2].name == "127.0.0.1:2525");
    CHECK(services[3].type == "pass");

    apply_service_parameters(
        "relay/unix/syslog_name = postfix/relay\n"
        "submission/inet/smtpd_milters = inet:127.0.0.1:10025\n"
        "submission/inet/milter_default_action = accept\n"
        "127.0.0.1:2525/inet/smtpd_milters =\n",
        services);
    CHECK_FALSE(services[0].smtpd_milters);
    CHECK(services[1].smtpd_milters == "inet:127.0.0.1:10025");
    CHECK(services[1].milter_default_action == "accept");
    CHECK(services[2].smtpd_milters == "");

    CHECK(inline_table_content("pcre:{ {/a/ FILTER x:y}, { /b/ DUNNO } }") ==
          "/a/ FILTER x:y\n/b/ DUNNO\n");
    CHECK_FALSE(inline_table_content("pcre:/etc/postfix/h"));
    CHECK_FALSE(inline_table_content("hash:{x}"));
}
