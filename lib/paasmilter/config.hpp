// The configuration: one TOML file (see etc/paas-milter.toml) plus the tables it names.
// Loaded whole into an immutable snapshot; the daemon swaps snapshots atomically on SIGHUP.
#pragma once

#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "paasmilter/result.hpp"
#include "paasmilter/table.hpp"

namespace paasmilter {

enum class Mode { enforce, dry_run };
enum class Action { relay, pass, reject, tempfail };

const char* to_string(Mode mode);
const char* to_string(Action action);

struct Route {
    std::string name;
    Action action = Action::pass;
    bool dry_run = false;       // log only, whatever the global mode
    std::string header_value;   // relay: value of the routing header (default: the name)
    std::string transport;      // relay: "transport:nexthop", documentation only
    int reply_code = 0;         // reject / tempfail
    std::string reply_status;   // "5.7.1"
    std::string reply_text;
    std::string where;          // "file:line" of the [routes.NAME] table
};

// The transaction facts a condition looks at.
enum class Field {
    client_addr,
    client_name,
    cert_subject,
    cert_issuer,
    cert_fingerprint,
    auth,
    sender,
    recipient,
    header,
};
const char* to_string(Field field);

enum class RecipientMatch { any, all };

struct Condition {
    Field field = Field::client_addr;
    // Inline entries and referenced tables in the order they were listed; the first that
    // yields a (non-DUNNO) match decides.
    std::vector<std::unique_ptr<Table>> sources;
    // True when every source is a table whose results all name routes (or DUNNO), so a
    // match always yields a route: this is what lets a rule omit `route`.
    bool always_names_route = false;
};

struct Rule {
    std::string name;
    std::string route;  // may be empty when a condition's table names the route
    RecipientMatch recipient_match = RecipientMatch::any;
    std::vector<Condition> conditions;  // all must hold; kept in cheap-first order
    std::string where;
};

struct Config {
    std::string path;
    std::string socket;
    std::string routing_header = "X-PaaS-Route";
    Mode mode = Mode::enforce;
    std::string default_route;  // empty: leave unmatched messages alone
    std::map<std::string, Route, std::less<>> routes;
    std::vector<Rule> rules;

    const Route* find_route(std::string_view name) const;
};

// Reads and validates the whole configuration, tables included. Every error names the
// file, the line and the key (or table entry) at fault.
Result<std::shared_ptr<const Config>> load_config(const std::string& path);

// Lines for Postfix's milter_header_checks that send each relay route with a
// `transport` to it (what `paas-milter header-checks` prints).
std::string render_header_checks(const Config& config);

}  // namespace paasmilter
