// `paas-milter check` against Postfix: does main.cf/master.cf wire the milter the way the
// configuration expects? Pure comparison: the caller runs postconf, reads the
// milter_header_checks tables and fills PostfixFacts; nothing here touches a file or runs
// a program, so every miswiring is a unit test.
#pragma once

#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "paasmilter/config.hpp"

namespace paasmilter {

// One master.cf service that runs smtpd(8), as `postconf -M` prints it, with the per-service
// overrides (-o name=value, as `postconf -Px` prints them) of the settings the check uses.
struct PostfixSmtpdService {
    std::string name;     // "smtp", "submission", "127.0.0.1:2525"
    std::string type;     // "inet", "unix", "pass"
    bool chroot = false;  // the fifth column: "y"; "n" and "-" (the default since 3.0) are not
    std::optional<std::string> smtpd_milters;
    std::optional<std::string> milter_default_action;
};

// One map named by milter_header_checks.
struct PostfixTable {
    std::string spec;                    // "pcre:/etc/postfix/milter_header_checks"
    std::optional<std::string> content;  // its lines; nullopt: not read (other type, unreadable)
};

// What Postfix says, as `postconf -x` prints the main.cf values (so "$smtpd_milters" in
// non_smtpd_milters is already expanded).
struct PostfixFacts {
    std::string queue_directory = "/var/spool/postfix";
    std::string smtpd_milters;
    std::string non_smtpd_milters;
    std::string milter_default_action = "tempfail";
    std::string milter_header_checks;
    std::vector<PostfixTable> header_checks_tables;  // in milter_header_checks order
    // transport_maps and its regexp:/pcre: tables (the external_only routes' pseudo-domains)
    std::string transport_maps;
    std::vector<PostfixTable> transport_tables;  // in transport_maps order
    // The services running smtpd; empty when master.cf is unknown (then either chroot
    // setting is taken as possible).
    std::vector<PostfixSmtpdService> smtpd_services;
};

enum class WiringIssue {
    milter_not_listed,        // smtpd_milters does not name milter.socket
    milter_libmilter_syntax,  // ... names it as libmilter writes it (inet:PORT@HOST)
    milter_chroot_path,       // ... names a unix path that smtpd resolves elsewhere (chroot)
    socket_outside_chroot,    // a unix socket a chrooted smtpd cannot reach
    default_action_accept,    // milter down or timing out: mail delivered unfiltered
    header_check_missing,     // relay route: no milter_header_checks line for its header
    header_check_mismatch,    // ... the line that matches is not FILTER <route.transport>
    route_unused,             // no rule, default_route or fallback names the route
    transport_map_missing,    // external_only route: transport_maps misses its pseudo-domain
    transport_map_mismatch,   // ... sends it to another transport:nexthop
    milter_not_last,          // external_only routes, and a milter listed after paas-milter
};
const char* to_string(WiringIssue issue);

struct WiringWarning {
    WiringIssue kind;
    std::string message;  // for the operator: the setting to change and the value to write
};

// Routes that nothing can select: no rule (by `route` or a table result), not
// milter.default_route, not the relay fallback of an API route. Needs no Postfix.
std::vector<WiringWarning> check_routes_used(const Config& config);

// Compares the configuration with what Postfix says: the socket in smtpd_milters (and
// non_smtpd_milters when it lists it), milter_default_action, the chroot, a
// milter_header_checks line per relay route, and a transport_maps line per external_only
// route.
std::vector<WiringWarning> check_postfix_wiring(const Config& config, const PostfixFacts& facts);

// --- parsing what postconf prints (pure, for the caller and the tests) --------------------

// Splits a Postfix list value at commas and whitespace, keeping "{ ... }" groups (per-milter
// settings, inline tables) whole: "a, { b, c } pcre:{{x}}" -> "a", "{ b, c }", "pcre:{{x}}".
std::vector<std::string> split_postfix_list(std::string_view value);

// `postconf -x NAME...` output ("name = value" lines) applied to the main.cf fields of
// `facts` (queue_directory, smtpd_milters, non_smtpd_milters, milter_default_action,
// milter_header_checks); other names are ignored.
void apply_main_parameters(std::string_view postconf_output, PostfixFacts& facts);

// The smtpd services of `postconf -M` (or `-Mf`, folded) output.
std::vector<PostfixSmtpdService> parse_master_services(std::string_view postconf_m_output);

// `postconf -Px` output ("service/type/name = value") applied to `services`.
void apply_service_parameters(std::string_view postconf_p_output,
                              std::vector<PostfixSmtpdService>& services);

// "pcre:{ {rule}, {rule} }" (an inline table, Postfix 3.7): the rules as table lines.
// nullopt when `spec` is not an inline regexp:/pcre: table.
std::optional<std::string> inline_table_content(std::string_view spec);

}  // namespace paasmilter
