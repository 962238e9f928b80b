// `paas-milter sendmail-config`: what Sendmail needs for the configured routes, as blocks an
// operator pastes into sendmail.mc and /etc/mail/mailertable. Sendmail has no
// milter_header_checks, so with milter.mta = "sendmail" every relay route goes per recipient:
// the milter puts each recipient into the route's pseudo-domain (route_addresses.hpp), a
// mailertable entry sends that domain to a mailer of the route's own, and that mailer's
// recipient ruleset (R=) takes the pseudo-domain off again, so that the next hop sees the
// original address in RCPT TO. Pure: renders text from a Config; writes no file, runs nothing.
//
// Sendmail facts this relies on, from Sendmail 8.17's documentation (Debian's sendmail-doc:
// cf/README and doc/op/op.me) and tried on Debian 12's Sendmail 8.17 by `sendmail -bt` and
// tests/sendmail/test_sendmail_relay.py:
// - cf/README "USING MAILERTABLES": a key with a leading dot matches every host ending in
//   that domain, a key without it the host itself; the value is "mailer:host", and
//   "[host]" turns off MX lookups. A mailertable value has no port.
// - op.me 5.4 "M -- Define Mailer": for P=[IPC], A=TCP host [port] (default 25); the S= and
//   R= rewriting sets may be two, "envelope/header". A route's mailer is Sendmail's esmtp
//   mailer (cf/mailer/smtp.m4: F=mDFMuXa, S=EnvFromSMTP/HdrFromSMTP, R=EnvToSMTP) with a
//   recipient ruleset of its own, which strips the pseudo-domain and then calls EnvToSMTP.
// - cf/README "ADDING NEW MAILERS OR RULESETS": new mailers after MAILER_DEFINITIONS, new
//   rulesets after LOCAL_RULESETS; its introduction orders a .mc as FEATURE, ..., MAILER,
//   LOCAL_CONFIG, LOCAL_RULE_*, LOCAL_RULESETS: hence one block before the MAILER() lines and
//   one after them. LOCAL_CONFIG holds class definitions. Class P holds pseudo-domains
//   (cf/README, the class table; cf/m4/proto.m4's Canonify2 rule "R$* < @ $* $=P > $*"
//   marks them canonical without a DNS lookup).
// - Recipients a milter adds (SMFIR_ADDRCPT_PAR) go through parseaddr() and recipient()
//   (rulesets 3 and 0, so the mailertable), not through check_rcpt (sendmail/milter.c,
//   milter_addrcpt_par): the relay checks do not refuse the pseudo-domain.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "paasmilter/config.hpp"
#include "paasmilter/result.hpp"

namespace paasmilter {

struct SendmailConfigOptions {
    // Where the mailertable source (and its hash map) live; FEATURE(`mailertable') names it.
    std::string table_directory = "/etc/mail";
};

// A route's "transport:nexthop" as Sendmail addresses it.
struct SendmailNextHop {
    std::string host;  // "[smtp.azurecomm.net]" (no MX lookup) or "mx.example.net"
    std::string port;  // "587"; empty: the mailer's default (25)
};

// "acs-relay:[smtp.azurecomm.net]:587" -> {"[smtp.azurecomm.net]", "587"};
// "relay:[2001:db8::1]:25" -> {"[IPv6:2001:db8::1]", "25"}. An error for no next hop, or a
// host or port Sendmail cannot take.
Result<SendmailNextHop> sendmail_next_hop(std::string_view transport);

// Every route's mailer is named with this prefix: the milter refuses a client's RCPT that
// Sendmail resolved to one ({rcpt_mailer}).
inline constexpr std::string_view kSendmailRouteMailerPrefix = "paas_";

// The route's name in sendmail.cf names: "acs-smtp" -> "acs_smtp" (rulesets
// "PaasRcpt_acs_smtp", ...), and its mailer: "acs-smtp" -> "paas_acs_smtp".
std::string rule_label(std::string_view route_name);
std::string sendmail_mailer_name(std::string_view route_name);

// "acs-smtp" -> "acs-smtp . paas-route . invalid": the pseudo-domain as rule tokens.
std::string sendmail_pseudo_domain_tokens(std::string_view route_name);

struct SendmailRoute {
    std::string route;   // "acs-smtp"
    std::string mailer;  // "paas_acs_smtp"
    std::string label;   // "acs_smtp": in the rulesets' names
    SendmailNextHop next_hop;
};

struct SendmailWiring {
    // sendmail.mc lines before the MAILER() lines (INPUT_MAIL_FILTER, FEATURE(`mailertable'))
    std::vector<std::string> mc_features;
    // sendmail.mc lines after the MAILER() lines (MAILER_DEFINITIONS, LOCAL_RULESETS)
    std::vector<std::string> mc_definitions;
    std::string mailertable_path;
    std::vector<std::string> mailertable;  // "key<TAB>mailer:host" lines
    std::vector<SendmailRoute> routes;
    std::vector<std::string> notes;  // what the operator must know
};

SendmailWiring sendmail_wiring(const Config& config, const SendmailConfigOptions& options);

// The whole output of `paas-milter sendmail-config`: blocks that each start with a line
// "# ==== TARGET ====" (the two places in sendmail.mc, and the mailertable's path).
std::string render_sendmail_config(const Config& config, const SendmailConfigOptions& options);

}  // namespace paasmilter
