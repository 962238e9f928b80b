#include "paasmilter/sendmail_config.hpp"
#include "paasmilter/text.hpp"

#include "paasmilter/generated_text.hpp"

#include <algorithm>
#include <cctype>

#include <fmt/format.h>

#include "paasmilter/route_addresses.hpp"

namespace paasmilter {

namespace {

bool host_name(std::string_view host) {
    return !host.empty() && std::all_of(host.begin(), host.end(), [](unsigned char c) {
        return std::isalnum(c) || c == '-' || c == '.' || c == '_';
    });
}

bool digits(std::string_view text) {
    return !text.empty() && text.size() <= 5 &&
           std::all_of(text.begin(), text.end(), [](unsigned char c) { return std::isdigit(c); });
}

// "contoso.local" -> "contoso . local": a domain as the tokens of a rewriting rule ('.' is one
// of Sendmail's OperatorChars, '-' and '_' are not).
std::string domain_tokens(std::string_view domain) {
    std::string out;
    for (char c : domain) {
        if (c == '.') {
            out += " . ";
        } else {
            out += c;
        }
    }
    return out;
}

// One line of sendmail.cf text in m4 quotes: m4 copies it unexpanded (a route named "index"
// or "eval" is no m4 macro call then). The rules hold no quote characters.
std::string m4_quoted(std::string_view line) {
    return fmt::format("`{}'", line);
}

// `text` as "dnl " comment lines of sendmail.mc (m4 discards them unexpanded).
std::string dnl_comment(std::string_view text) {
    return wrapped_comment("dnl", text);
}

// `text` as "# " comment lines of at most about 90 columns.
std::string comment(std::string_view text) {
    return wrapped_comment("#", text) + "\n";
}

// milter.socket as INPUT_MAIL_FILTER's S= (Sendmail takes libmilter's syntax).
std::string sendmail_socket(std::string_view socket, std::string* note) {
    if (socket.starts_with("inet:") || socket.starts_with("inet6:")) {
        if (socket.find('@') == std::string_view::npos) {
            const bool inet6 = socket.starts_with("inet6:");
            const std::string host = inet6 ? "::1" : "127.0.0.1";
            *note = fmt::format(
                "milter.socket names no host (libmilter listens on every address); Sendmail "
                "connects to {}",
                host);
            return fmt::format("{}@{}", socket, host);
        }
    }
    return std::string(socket);
}

// The rules that give an address of the route's pseudo-domain its own address again:
//   bob < @ example . net . ROUTE . paas-route . invalid . >      -> bob < @ example . net . >
//   "carol@[192.0.2.9]" < @ ROUTE . paas-route . invalid . >       -> carol < @ [192.0.2.9] >
// (both with and without the trailing dot of a canonical host); see encode_route_address.
void strip_rules(std::vector<std::string>& out, std::string_view route) {
    const std::string suffix = sendmail_pseudo_domain_tokens(route);
    for (std::string_view dot : {" .", ""}) {
        out.push_back(m4_quoted(
            fmt::format("R$* < @ $+ . {}{} > $*\t$: $1 < @ $2{} > $3", suffix, dot, dot)));
    }
    for (std::string_view dot : {" .", ""}) {
        out.push_back(m4_quoted(
            fmt::format("R$* < @ {}{} > $*\t$: < PaasLiteral > $(dequote $1 $)", suffix, dot)));
    }
    out.push_back(m4_quoted("R< PaasLiteral > $+ @ $+\t$: $1 < @ $2 >"));
    out.push_back(m4_quoted("R< PaasLiteral > $*\t$: $1"));
}

// One domain map as rules: exact domains (Sendmail compares tokens case-insensitively).
void map_rules(std::vector<std::string>& out, const DomainMap& map) {
    for (const auto& [from, to] : map.entries) {
        for (std::string_view dot : {" .", ""}) {
            out.push_back(m4_quoted(fmt::format("R$* < @ {}{} > $*\t$: $1 < @ {}{} > $2",
                                                domain_tokens(from), dot, domain_tokens(to), dot)));
        }
    }
}

}  // namespace

std::string rule_label(std::string_view route_name) {
    std::string out;
    for (char c : route_name) out += c == '-' ? '_' : c;
    return out;
}

Result<SendmailNextHop> sendmail_next_hop(std::string_view transport) {
    const size_t colon = transport.find(':');
    if (colon == std::string_view::npos) {
        return make_error(fmt::format("\"{}\" is not \"transport:nexthop\"", transport));
    }
    std::string_view rest = transport.substr(colon + 1);
    if (rest.empty()) {
        return make_error(fmt::format(
            "\"{}\" names no next hop: Sendmail's mailertable needs a host", transport));
    }
    SendmailNextHop hop;
    std::string_view port;
    if (rest.front() == '[') {
        const size_t close = rest.find(']');
        if (close == std::string_view::npos) {
            return make_error(fmt::format("\"{}\": no ']' after '['", transport));
        }
        std::string_view host = rest.substr(1, close - 1);
        std::string_view after = rest.substr(close + 1);
        if (!after.empty()) {
            if (after.front() != ':') {
                return make_error(
                    fmt::format("\"{}\": expected \":port\" after the host", transport));
            }
            port = after.substr(1);
        }
        if (host.find(':') != std::string_view::npos) {
            // An IPv6 address: Sendmail writes the literal as [IPv6:...].
            if (host.starts_with("IPv6:") || host.starts_with("ipv6:")) host.remove_prefix(5);
            const bool ok = !host.empty() && std::all_of(host.begin(), host.end(), [](char c) {
                return std::isxdigit(static_cast<unsigned char>(c)) || c == ':' || c == '.';
            });
            if (!ok) return make_error(fmt::format("\"{}\": not a host", transport));
            hop.host = fmt::format("[IPv6:{}]", host);
        } else {
            if (!host_name(host)) return make_error(fmt::format("\"{}\": not a host", transport));
            hop.host = fmt::format("[{}]", host);
        }
    } else {
        const size_t last = rest.rfind(':');
        std::string_view host = rest.substr(0, last);
        if (last != std::string_view::npos) port = rest.substr(last + 1);
        if (!host_name(host)) return make_error(fmt::format("\"{}\": not a host", transport));
        hop.host = std::string(host);
    }
    if (!port.empty() || rest.back() == ':') {
        if (!digits(port) || port.size() > 5 || std::stoi(std::string(port)) == 0 ||
            std::stoi(std::string(port)) > 65535) {
            return make_error(fmt::format("\"{}\": not a port (1-65535)", transport));
        }
        hop.port = std::string(port);
    }
    return hop;
}

std::string sendmail_mailer_name(std::string_view route_name) {
    return std::string(kSendmailRouteMailerPrefix) + rule_label(route_name);
}

std::string sendmail_pseudo_domain_tokens(std::string_view route_name) {
    return domain_tokens(route_pseudo_domain(route_name));
}

SendmailWiring sendmail_wiring(const Config& config, const SendmailConfigOptions& options) {
    SendmailWiring wiring;
    wiring.mailertable_path = join_path(options.table_directory, "mailertable");
    if (config.mta != Mta::sendmail) {
        wiring.notes.push_back(
            "milter.mta is \"postfix\": the milter adds the routing header for relay routes, "
            "which Sendmail ignores; set mta = \"sendmail\" in [milter] so that it reroutes the "
            "recipients instead");
    }

    std::string note;
    const std::string socket = sendmail_socket(config.socket, &note);
    wiring.mc_features.push_back(
        dnl_comment("paas-milter: F=T: a stopped or hung milter means \"try again later\" "
                    "(Postfix's milter_default_action = tempfail). Timeouts: connect, sending, "
                    "reading, end of message; keep R and E above the longest time_budget of an "
                    "API route."));
    if (!note.empty()) wiring.mc_features.push_back(dnl_comment("(" + note + ")"));
    wiring.mc_features.push_back(fmt::format(
        "INPUT_MAIL_FILTER(`paas-milter', `S={}, F=T, T=C:10s;S:30s;R:60s;E:5m')dnl", socket));

    for (const auto& [name, route] : config.routes) {
        if (route.action != Action::relay) continue;
        if (route.transport.empty()) {
            wiring.notes.push_back(fmt::format(
                "route {} has no transport: nothing for Sendmail is generated for it", name));
            continue;
        }
        if (!valid_route_label(name)) {
            wiring.notes.push_back(fmt::format(
                "route {}: its name cannot be a DNS label of a pseudo-domain (letters, digits "
                "and '-'): nothing for Sendmail is generated for it",
                name));
            continue;
        }
        auto hop = sendmail_next_hop(route.transport);
        if (!hop) {
            wiring.notes.push_back(
                fmt::format("route {}: transport {}: nothing for Sendmail is "
                            "generated for it",
                            name, hop.error().message));
            continue;
        }
        wiring.routes.push_back({name, sendmail_mailer_name(name), rule_label(name), *hop});
    }
    if (wiring.routes.empty()) return wiring;

    wiring.mc_features.push_back(dnl_comment(
        "relay routes: the milter puts each recipient of a relay route into the route's "
        "pseudo-domain; the mailertable sends that domain to the route's mailer (if sendmail.mc "
        "already has FEATURE(`mailertable'), keep one, naming this file)."));
    wiring.mc_features.push_back(
        fmt::format("FEATURE(`mailertable', `hash {}')dnl", wiring.mailertable_path));

    std::vector<std::string>& defs = wiring.mc_definitions;
    defs.push_back("LOCAL_CONFIG");
    defs.push_back(dnl_comment(
        "pseudo-domains (class P, as .UUCP): no DNS lookup for the rerouted recipients"));
    defs.push_back(m4_quoted(fmt::format("CP{}", kRoutePseudoDomain)));
    defs.push_back("MAILER_DEFINITIONS");
    for (const SendmailRoute& r : wiring.routes) {
        const Route& route = config.routes.find(r.route)->second;
        defs.push_back(dnl_comment(fmt::format(
            "route {} ({}): Sendmail's esmtp mailer to {}{}, recipients restored by {}", r.route,
            route.transport, r.next_hop.host,
            r.next_hop.port.empty() ? "" : " port " + r.next_hop.port, "PaasRcpt_" + r.label)));
        const std::string sender = route.rewrite.sender.empty()
                                       ? std::string("EnvFromSMTP/HdrFromSMTP")
                                       : fmt::format("PaasEnvFrom_{0}/PaasHdrFrom_{0}", r.label);
        defs.push_back(m4_quoted(fmt::format(
            "M{}, P=[IPC], F=mDFMuXa, S={}, R=PaasRcpt_{}, E=\\r\\n, L=990, T=DNS/RFC822/SMTP, "
            "A=TCP $h{}",
            r.mailer, sender, r.label, r.next_hop.port.empty() ? "" : " " + r.next_hop.port)));
    }
    defs.push_back("LOCAL_RULESETS");
    for (const SendmailRoute& r : wiring.routes) {
        const Route& route = config.routes.find(r.route)->second;
        defs.push_back(dnl_comment(
            fmt::format("route {}: the recipient's own address again{}, then as Sendmail's esmtp "
                        "mailer (EnvToSMTP)",
                        r.route, route.rewrite.recipient.empty() ? "" : ", recipient_rewrite")));
        defs.push_back(m4_quoted("SPaasRcpt_" + r.label));
        strip_rules(defs, r.route);
        map_rules(defs, route.rewrite.recipient);
        defs.push_back(m4_quoted("R$*\t$: $>EnvToSMTP $1"));
        if (route.rewrite.sender.empty()) continue;
        defs.push_back(dnl_comment(fmt::format(
            "route {}: sender_rewrite, envelope (EnvFromSMTP) and header (HdrFromSMTP)", r.route)));
        defs.push_back(m4_quoted("SPaasSender_" + r.label));
        map_rules(defs, route.rewrite.sender);
        for (std::string_view kind : {"Env", "Hdr"}) {
            defs.push_back(m4_quoted(fmt::format("SPaas{}From_{}", kind, r.label)));
            defs.push_back(m4_quoted(fmt::format("R$*\t$: $>PaasSender_{} $1", r.label)));
            defs.push_back(m4_quoted(fmt::format("R$*\t$: $>{}FromSMTP $1", kind)));
        }
    }

    for (const SendmailRoute& r : wiring.routes) {
        const std::string domain = ascii_lowercase(route_pseudo_domain(r.route));
        const std::string value = fmt::format("{}:{}", r.mailer, r.next_hop.host);
        wiring.mailertable.push_back(fmt::format(".{}\t{}", domain, value));
        wiring.mailertable.push_back(fmt::format("{}\t{}", domain, value));
    }
    wiring.notes.push_back(
        "TLS and SMTP AUTH towards a route's next hop are Sendmail's own settings, not generated "
        "here: STARTTLS is used when the next hop offers it (require it with a TLS_Srv: entry "
        "in the access map), credentials come from FEATURE(`authinfo') (AuthInfo:HOST entries)");
    return wiring;
}

std::string render_sendmail_config(const Config& config, const SendmailConfigOptions& options) {
    const SendmailWiring wiring = sendmail_wiring(config, options);
    std::string out = fmt::format(
        "# Sendmail configuration for the routes of {} (paas-milter sendmail-config).\n",
        config.path);
    if (wiring.routes.empty()) {
        out +=
            "# No relay route: add the sendmail.mc lines before the MAILER() lines, rebuild\n"
            "# sendmail.cf (make -C /etc/mail, or m4 sendmail.mc > sendmail.cf) and restart "
            "Sendmail.\n";
    } else {
        out += fmt::format(
            "# Each block starts with \"# ==== TARGET ====\": put the first sendmail.mc block\n"
            "# before the MAILER() lines and the second after them, write the mailertable, "
            "then\n"
            "#   makemap hash {} < {}\n"
            "# rebuild sendmail.cf (make -C /etc/mail, or m4 sendmail.mc > sendmail.cf) and\n"
            "# restart Sendmail.\n",
            wiring.mailertable_path, wiring.mailertable_path);
    }
    for (const std::string& note : wiring.notes) out += comment("NOTE: " + note);
    out += "\n# ==== sendmail.mc (before the MAILER() lines) ====\n";
    for (const std::string& line : wiring.mc_features) out += line + "\n";
    if (!wiring.mc_definitions.empty()) {
        out += "\n# ==== sendmail.mc (after the MAILER() lines) ====\n";
        for (const std::string& line : wiring.mc_definitions) out += line + "\n";
    }
    if (!wiring.mailertable.empty()) {
        out += fmt::format("\n# ==== {} ====\n", wiring.mailertable_path);
        for (const SendmailRoute& r : wiring.routes) {
            out += fmt::format("# route {}: {}\n", r.route,
                               config.routes.find(r.route)->second.transport);
        }
        for (const std::string& line : wiring.mailertable) out += line + "\n";
    }
    return out;
}

}  // namespace paasmilter
