// `paas-milter postfix-config`: everything Postfix needs for the configured routes, as blocks
// an operator pastes (main.cf lines, master.cf transports, the tables' contents), so that the
// milter's configuration and Postfix's cannot drift apart. Pure: renders text from a Config;
// writes no file and runs nothing.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "paasmilter/config.hpp"

namespace paasmilter {

struct PostfixConfigOptions {
    // Where the generated tables are to live; the main.cf and master.cf lines name them there.
    std::string table_directory = "/etc/postfix";
};

// One master.cf service: a clone of smtp(8) that relay routes name in their `transport`.
struct PostfixTransport {
    std::string name;                 // "acs-relay"
    std::vector<std::string> routes;  // the relay routes that use it, in name order
    std::string generic_map;          // table file for -o smtp_generic_maps; "" when none
};

// A table file and its content (pcre_table(5) lines, with comments).
struct PostfixTableFile {
    std::string path;
    std::string content;
};

struct PostfixWiring {
    std::vector<std::string> main_cf;  // "name = value" lines, "# ..." comment lines
    std::vector<PostfixTransport> transports;
    std::vector<PostfixTableFile> tables;
    std::vector<std::string> notes;  // what the operator must know (shared transports, ...)
};

PostfixWiring postfix_wiring(const Config& config, const PostfixConfigOptions& options);

// The whole output of `paas-milter postfix-config`: blocks that each start with a line
// "# ==== TARGET ====" (TARGET is "main.cf", "master.cf" or a table's path).
std::string render_postfix_config(const Config& config, const PostfixConfigOptions& options);

// milter.socket (libmilter syntax) as main.cf's smtpd_milters names it: "inet:10025@127.0.0.1"
// -> "inet:127.0.0.1:10025", "unix:/var/spool/postfix/paas-milter/milter.sock" ->
// "unix:/paas-milter/milter.sock" (relative to a chrooted smtpd's queue directory).
// `note` gets a comment for the operator when the translation involves a guess.
std::string postfix_milter_socket(std::string_view socket, std::string* note = nullptr);

// The transport of a route's "transport:nexthop" ("acs-relay:[host]:587" -> "acs-relay").
std::string transport_name(std::string_view transport);

// transport_maps (pcre:) lines sending each external_only route's pseudo-domain to its
// transport:nexthop.
std::string render_route_transport_map(const Config& config);

// smtp_generic_maps (pcre:) lines for one master.cf transport: the original address of
// every external_only route's recipients, and the routes' sender/recipient rewrite maps.
// `notes` gets conflicts between routes sharing the transport.
std::string render_generic_map(const Config& config, std::string_view transport,
                               std::vector<std::string>* notes = nullptr);

}  // namespace paasmilter
