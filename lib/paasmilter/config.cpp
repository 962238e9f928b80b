#include "paasmilter/config.hpp"
#include "paasmilter/services.hpp"

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>
#include <string_view>

#include <sys/stat.h>
#include <unistd.h>

#include <fmt/format.h>
#include <toml++/toml.h>

#include "paasmilter/config_reader.hpp"
#include "paasmilter/config_routing.hpp"
#include "paasmilter/ip.hpp"
#include "paasmilter/log.hpp"
#include "paasmilter/quota/quota_config.hpp"
#include "paasmilter/text.hpp"

namespace paasmilter {

const char* to_string(Mode mode) {
    return mode == Mode::enforce ? "enforce" : "dry-run";
}

const char* to_string(Mta mta) {
    return mta == Mta::postfix ? "postfix" : "sendmail";
}

const char* to_string(Action action) {
    switch (action) {
        case Action::relay:
            return "relay";
        case Action::pass:
            return "pass";
        case Action::reject:
            return "reject";
        case Action::tempfail:
            return "tempfail";
        case Action::api:
            return "api";
    }
    return "?";
}

const char* to_string(AmbiguityPolicy policy) {
    switch (policy) {
        case AmbiguityPolicy::tempfail:
            return "tempfail";
        case AmbiguityPolicy::hold:
            return "hold";
        case AmbiguityPolicy::assume_sent:
            return "assume-sent";
    }
    return "?";
}

const char* to_string(LookupBeforePost lookup) {
    switch (lookup) {
        case LookupBeforePost::automatic:
            return "auto";
        case LookupBeforePost::always:
            return "always";
        case LookupBeforePost::own_attempts:
            return "own-attempts";
    }
    return "?";
}

const char* to_string(ApiSettings::Provider provider) {
    switch (provider) {
        case ApiSettings::Provider::acs:
            return "acs";
        case ApiSettings::Provider::graph:
            return "graph";
    }
    return "?";
}

std::string to_string(const FailurePolicy& policy) {
    switch (policy.kind) {
        case FailurePolicy::Kind::tempfail:
            return "tempfail";
        case FailurePolicy::Kind::relay:
            return "relay:" + policy.relay_route;
        case FailurePolicy::Kind::hold:
            return "hold";
        case FailurePolicy::Kind::reject:
            return "reject";
    }
    return "?";
}

const char* to_string(Field field) {
    switch (field) {
        case Field::client_addr:
            return "client_addr";
        case Field::client_name:
            return "client_name";
        case Field::cert_subject:
            return "cert_subject";
        case Field::cert_issuer:
            return "cert_issuer";
        case Field::cert_fingerprint:
            return "cert_fingerprint";
        case Field::auth:
            return "auth";
        case Field::sender:
            return "sender";
        case Field::recipient:
            return "recipient";
        case Field::header:
            return "header";
    }
    return "?";
}

const Route* Config::find_route(std::string_view name) const {
    auto it = routes.find(name);
    return it == routes.end() ? nullptr : &it->second;
}

bool Config::has_api_routes() const {
    return std::any_of(routes.begin(), routes.end(),
                       [](const auto& named) { return named.second.action == Action::api; });
}

std::string state_directory_of(const Config& config, const char* state_directory_env) {
    if (!config.state_directory.empty()) return config.state_directory;
    // systemd passes every StateDirectory= entry, separated by colons.
    std::string_view from_env = state_directory_env ? state_directory_env : "";
    from_env = from_env.substr(0, from_env.find(':'));
    if (from_env.starts_with("/")) return std::string(from_env);
    return "/var/lib/paas-milter";
}

namespace {

// Conditions in the order they are evaluated: cheap connection facts first, headers last.
struct FieldSpec {
    const char* key;
    Field field;
    KeyKind kind;
};
constexpr FieldSpec kFields[] = {
    {"client_addr", Field::client_addr, KeyKind::ip},
    {"client_name", Field::client_name, KeyKind::text},
    {"cert_subject", Field::cert_subject, KeyKind::text},
    {"cert_issuer", Field::cert_issuer, KeyKind::text},
    {"cert_fingerprint", Field::cert_fingerprint, KeyKind::text},
    {"auth", Field::auth, KeyKind::text},
    {"sender", Field::sender, KeyKind::address},
    {"recipient", Field::recipient, KeyKind::address},
    {"header", Field::header, KeyKind::header},
};

constexpr std::string_view kDunno = "DUNNO";
constexpr std::string_view kOk = "OK";

// Why a libmilter socket can be reached from other hosts, or "" when it cannot. Whoever
// connects speaks the milter protocol and chooses the macros (client address, certificate)
// that the rules look at.
std::string socket_exposure(std::string_view socket) {
    if (!socket.starts_with("inet:") && !socket.starts_with("inet6:")) return {};
    constexpr std::string_view kRisk =
        "anyone who can reach it speaks the milter protocol with forged client addresses and "
        "certificates, and so picks the route; listen on a loopback address (\"inet:PORT@"
        "127.0.0.1\") or a unix socket";
    const size_t at = socket.find('@');
    if (at == std::string_view::npos)
        return fmt::format("has no host, so libmilter listens on every interface: {}", kRisk);
    const std::string_view host = socket.substr(at + 1);
    if (host == "localhost") return {};
    const auto address = parse_ip_address(host);
    const bool loopback =
        address && (address->family == IpFamily::v4 ? address->bytes[0] == 127
                                                    : *address == *parse_ip_address("::1"));
    if (loopback) return {};
    return fmt::format("listens on {}, not a loopback address: {}", host, kRisk);
}

// "127.0.0.1:9940", "[::1]:9940", "localhost:9940" (civetweb's listening_ports syntax, as
// prometheus-cpp's Exposer takes it, limited to one address and port).
struct ListenAddress {
    bool loopback = false;
};
Result<ListenAddress> parse_listen_address(std::string_view text) {
    const size_t colon = text.rfind(':');
    if (colon == std::string_view::npos || colon == 0)
        return make_error("is not \"HOST:PORT\" (e.g. \"127.0.0.1:9940\")");
    std::string_view host = text.substr(0, colon);
    const std::string_view port = text.substr(colon + 1);
    int number = 0;
    for (char c : port) {
        if (c < '0' || c > '9' || number > 65535) return make_error("has no valid port");
        number = number * 10 + (c - '0');
    }
    if (port.empty() || number < 1 || number > 65535) return make_error("has no valid port");
    if (host.starts_with('[') && host.ends_with(']')) {
        host = host.substr(1, host.size() - 2);
        auto address = parse_ip_address(host);
        if (!address || address->family != IpFamily::v6)
            return make_error("has no valid IPv6 address in brackets");
        return ListenAddress{*address == *parse_ip_address("::1")};
    }
    if (host == "localhost") return ListenAddress{true};
    auto address = parse_ip_address(host);
    if (!address || address->family != IpFamily::v4)
        return make_error("has no IPv4 address (write an IPv6 one as \"[::1]:PORT\")");
    return ListenAddress{address->bytes[0] == 127};
}

// Everything the loader needs to report errors where they are.
class Loader : private ConfigReader {
  public:
    Loader(std::string path, ServiceRegistry* services)
        : ConfigReader(std::move(path)), path_(this->path()), services_(services) {}

    Result<std::shared_ptr<const Config>> load() {
        toml::table root;
        try {
            root = toml::parse_file(path_);
        } catch (const toml::parse_error& e) {
            return make_error(std::string(e.description()), path_,
                              static_cast<int>(e.source().begin.line));
        }
        auto config = std::make_shared<Config>();
        config->path = path_;
        if (auto r =
                check_keys(root, {"milter", "metrics", "quota", "loop", "routes", "rules"}, "");
            !r)
            return r.error();
        if (auto r = load_milter(root, *config); !r) return r.error();
        if (auto r = load_metrics(root, *config); !r) return r.error();
        if (auto r = load_loop(root, *config); !r) return r.error();
        if (auto r = load_quota(root, *config); !r) return r.error();
        if (auto r = load_routes(root, *config); !r) return r.error();
        if (auto r = load_rules(root, *config); !r) return r.error();
        config->warnings = std::move(warnings());
        if (!config->default_route.empty() && !config->find_route(config->default_route)) {
            return error_at(
                *root["milter"]["default_route"].node(),
                fmt::format("milter.default_route: unknown route \"{}\"", config->default_route));
        }
        // Without the shared store each gateway keeps capacity/fleet_size of a bucket: below
        // one token it could never grant a message, and every one would take on_quota.
        for (const auto& [name, route] : config->routes) {
            if (!route.api) continue;
            for (const BucketSpec& bucket : route.api->quota) {
                if (bucket.capacity / config->quota.fleet_size >= 1) continue;
                return error_at_where(
                    route.where,
                    fmt::format("routes.{}.quota_{}: {} shared by quota.fleet_size = {} gateways "
                                "leaves each less than one token: raise it to at least {} or "
                                "lower fleet_size",
                                name, bucket.name, bucket.capacity, config->quota.fleet_size,
                                config->quota.fleet_size));
            }
        }
        // The quota store (a Redis connection, or local buckets) only for a daemon whose
        // routes have buckets; a reload with the same [quota] keeps the same store.
        const bool has_quota = std::any_of(
            config->routes.begin(), config->routes.end(),
            [](const auto& named) { return named.second.api && !named.second.api->quota.empty(); });
        if (services_ && has_quota) config->quota_store = services_->quota_store(config->quota);
        return std::shared_ptr<const Config>(std::move(config));
    }

  private:
    Result<void> load_quota(const toml::table& root, Config& config) {
        const toml::node* node = root.get("quota");
        if (!node) return {};
        const toml::table* quota = node->as_table();
        if (!quota) return error_at(*node, "quota: expected a table");
        if (auto r =
                check_keys(*quota, {"store", "password_file", "fleet_size", "key_prefix"}, "quota");
            !r)
            return r;
        auto settings = load_quota_settings(*this, *quota);
        if (!settings) return settings.error();
        config.quota = std::move(*settings);
        return {};
    }

    // [loop]: loop protection (loop_stamp.hpp). Without the table nothing is stamped or checked.
    Result<void> load_loop(const toml::table& root, Config& config) {
        const toml::node* node = root.get("loop");
        if (!node) return {};
        const toml::table* loop = node->as_table();
        if (!loop) return error_at(*node, "loop: expected a table");
        if (auto r =
                check_keys(*loop, {"secret_file", "gateway_id", "max_hops", "on_loop"}, "loop");
            !r)
            return r;
        auto settings = std::make_shared<LoopSettings>();
        auto secret = read_secret_file(*loop, "secret_file", "loop");
        if (!secret) return secret.error();
        if (secret->size() < 16) {
            return error_at(*loop->get("secret_file"),
                            "loop.secret_file: the secret is shorter than 16 characters (make "
                            "one with: openssl rand -base64 32)");
        }
        settings->secret = std::move(*secret);
        char host[256] = {};
        if (::gethostname(host, sizeof host - 1) != 0) host[0] = '\0';
        auto gateway = get_string(*loop, "gateway_id", "loop", false, host);
        if (!gateway) return gateway.error();
        if (!valid_loop_name(*gateway) || gateway->size() > 64) {
            const toml::node* at = loop->get("gateway_id");
            return error_at(at ? *at : static_cast<const toml::node&>(*loop),
                            fmt::format("loop.gateway_id: \"{}\" is not 1-64 letters, digits, "
                                        "'.', '_' and '-'{}",
                                        *gateway, at ? "" : " (the host name; set gateway_id)"));
        }
        settings->gateway_id = *gateway;
        auto hops = get_integer(*loop, "max_hops", "loop", 1, 1, 20);
        if (!hops) return hops.error();
        settings->max_hops = static_cast<int>(*hops);
        auto on_loop = get_string(*loop, "on_loop", "loop", false, "hold");
        if (!on_loop) return on_loop.error();
        if (*on_loop == "hold") {
            settings->on_loop = LoopAction::hold;
        } else if (*on_loop == "pass") {
            settings->on_loop = LoopAction::pass;
        } else if (*on_loop == "reject") {
            settings->on_loop = LoopAction::reject;
        } else if (*on_loop == "tempfail") {
            settings->on_loop = LoopAction::tempfail;
        } else {
            return error_at(*loop->get("on_loop"),
                            fmt::format("loop.on_loop: \"{}\" is not hold, pass, reject or "
                                        "tempfail",
                                        *on_loop));
        }
        config.loop = std::move(settings);
        return {};
    }

    Result<void> load_metrics(const toml::table& root, Config& config) {
        const toml::node* node = root.get("metrics");
        if (!node) return {};
        const toml::table* metrics = node->as_table();
        if (!metrics) return error_at(*node, "metrics: expected a table");
        if (auto r = check_keys(*metrics, {"listen"}, "metrics"); !r) return r;
        auto listen = get_string(*metrics, "listen", "metrics", true);
        if (!listen) return listen.error();
        auto endpoint = parse_listen_address(*listen);
        if (!endpoint) {
            return error_at(
                *metrics->get("listen"),
                fmt::format("metrics.listen: \"{}\" {}", *listen, endpoint.error().message));
        }
        if (!endpoint->loopback) {
            warnings().push_back(fmt::format(
                "{}: metrics.listen: \"{}\" is not a loopback address: anyone who can reach it "
                "reads your routes, rules and traffic; put a TLS proxy or a firewall in front",
                where(*metrics->get("listen")), *listen));
        }
        config.metrics_listen = *listen;
        return {};
    }

    Result<void> load_milter(const toml::table& root, Config& config) {
        const toml::node* node = root.get("milter");
        if (!node) return make_error("missing table [milter]", path_);
        const toml::table* milter = node->as_table();
        if (!milter) return error_at(*node, "milter: expected a table");
        if (auto r = check_keys(*milter,
                                {"socket", "routing_header", "mode", "mta", "default_route",
                                 "state_directory", "internal_domains", "internal_table"},
                                "milter");
            !r)
            return r;

        auto socket = get_string(*milter, "socket", "milter", true);
        if (!socket) return socket.error();
        const std::string& s = *socket;
        if (!(s.starts_with("inet:") || s.starts_with("inet6:") || s.starts_with("unix:") ||
              s.starts_with("local:"))) {
            return error_at(*milter->get("socket"),
                            fmt::format("milter.socket: \"{}\" is not \"inet:PORT@HOST\", "
                                        "\"inet6:PORT@HOST\" or \"unix:/path\" (libmilter syntax)",
                                        s));
        }
        if ((s.starts_with("inet:") || s.starts_with("inet6:")) &&
            s.find('@') == std::string::npos && s.find(':', s.find(':') + 1) != std::string::npos) {
            return error_at(*milter->get("socket"),
                            fmt::format("milter.socket: \"{}\" looks like Postfix syntax; "
                                        "libmilter wants \"inet:PORT@HOST\"",
                                        s));
        }
        config.socket = s;
        if (std::string exposure = socket_exposure(s); !exposure.empty()) {
            warnings().push_back(fmt::format("{}: milter.socket: \"{}\" {}",
                                             where(*milter->get("socket")), s, exposure));
        }

        auto header = get_string(*milter, "routing_header", "milter", false, "X-PaaS-Route");
        if (!header) return header.error();
        if (!valid_header_name(*header)) {
            return error_at(*milter->get("routing_header"),
                            fmt::format("milter.routing_header: \"{}\" is not a valid header "
                                        "field name",
                                        *header));
        }
        config.routing_header = *header;

        auto mode = get_string(*milter, "mode", "milter", false, "enforce");
        if (!mode) return mode.error();
        if (*mode == "enforce") {
            config.mode = Mode::enforce;
        } else if (*mode == "dry-run") {
            config.mode = Mode::dry_run;
        } else {
            return error_at(
                *milter->get("mode"),
                fmt::format("milter.mode: \"{}\" is not \"enforce\" or \"dry-run\"", *mode));
        }

        auto mta = get_string(*milter, "mta", "milter", false, "postfix");
        if (!mta) return mta.error();
        if (*mta == "postfix") {
            config.mta = Mta::postfix;
        } else if (*mta == "sendmail") {
            config.mta = Mta::sendmail;
        } else {
            return error_at(
                *milter->get("mta"),
                fmt::format("milter.mta: \"{}\" is not \"postfix\" or \"sendmail\"", *mta));
        }

        auto default_route = get_string(*milter, "default_route", "milter", false);
        if (!default_route) return default_route.error();
        config.default_route = *default_route;

        auto state_directory = get_string(*milter, "state_directory", "milter", false);
        if (!state_directory) return state_directory.error();
        if (!state_directory->empty() && !state_directory->starts_with("/")) {
            return error_at(*milter->get("state_directory"),
                            fmt::format("milter.state_directory: \"{}\" is not an absolute path",
                                        *state_directory));
        }
        config.state_directory = *state_directory;
        return load_milter_routing(*this, *milter, config);
    }

    static bool valid_header_name(std::string_view name) {
        if (name.empty()) return false;
        // RFC 5322 field-name: printable US-ASCII except ':'.
        return std::all_of(name.begin(), name.end(),
                           [](unsigned char c) { return c > 32 && c < 127 && c != ':'; });
    }

    static bool valid_route_name(std::string_view name) {
        if (name.empty() || name == kOk || name == kDunno) return false;
        return std::all_of(name.begin(), name.end(), [](unsigned char c) {
            return std::isalnum(c) || c == '.' || c == '_' || c == '-';
        });
    }

    static bool valid_header_value(std::string_view value) {
        return !value.empty() && std::all_of(value.begin(), value.end(),
                                             [](unsigned char c) { return c >= 32 && c != 127; });
    }

    Result<void> load_routes(const toml::table& root, Config& config) {
        const toml::node* node = root.get("routes");
        if (!node) return make_error("missing table [routes]", path_);
        const toml::table* routes = node->as_table();
        if (!routes) return error_at(*node, "routes: expected a table of [routes.NAME] tables");
        for (auto&& [key, value] : *routes) {
            std::string name(key.str());
            std::string context = "routes." + name;
            if (!valid_route_name(name)) {
                return error_at(key, fmt::format("{}: a route name is letters, digits, '.', '_' "
                                                 "and '-', and not OK or DUNNO (table results)",
                                                 context));
            }
            const toml::table* table = value.as_table();
            if (!table) return error_at(value, context + ": expected a table");
            std::vector<std::string_view> known = {"action", "dry_run", "header_value", "transport",
                                                   "reply_code", "reply_status", "reply_text",
                                                   // config_routing.cpp
                                                   "external_only", "internal_domains",
                                                   "internal_table", "sender_rewrite",
                                                   "recipient_rewrite"};
            const auto api_keys = api_route_keys();
            known.insert(known.end(), api_keys.begin(), api_keys.end());
            for (auto&& [k, v] : *table) {
                if (std::find(known.begin(), known.end(), k.str()) == known.end()) {
                    return error_at(k, fmt::format("unknown key \"{}.{}\"", context, k.str()));
                }
            }
            Route route;
            route.name = name;
            route.where = where(value);
            auto action = get_string(*table, "action", context, true);
            if (!action) return action.error();
            if (*action == "relay") {
                route.action = Action::relay;
            } else if (*action == "pass") {
                route.action = Action::pass;
            } else if (*action == "reject") {
                route.action = Action::reject;
            } else if (*action == "tempfail") {
                route.action = Action::tempfail;
            } else if (*action == "api") {
                route.action = Action::api;
            } else {
                return error_at(*table->get("action"),
                                fmt::format("{}.action: \"{}\" is not one of relay, pass, "
                                            "reject, tempfail, api",
                                            context, *action));
            }
            if (const toml::node* dry = table->get("dry_run")) {
                if (!dry->is_boolean())
                    return error_at(*dry, context + ".dry_run: expected true or false");
                route.dry_run = dry->as_boolean()->get();
            }
            if (auto r = load_route_action_keys(*table, context, route); !r) return r;
            if (route.action == Action::api) {
                auto api = load_api_settings(*this, services_, *table, context);
                if (!api) return api.error();
                route.api = std::move(*api);
            } else {
                for (std::string_view key : api_route_keys()) {
                    if (const toml::node* n = table->get(key)) {
                        return error_at(*n, fmt::format("{}.{}: only valid with action = \"api\"",
                                                        context, key));
                    }
                }
            }
            if (auto r = load_route_routing(*this, *table, context, config, route); !r) return r;
            config.routes.emplace(name, std::move(route));
        }
        if (config.routes.empty()) return error_at(*node, "routes: no route is defined");
        // A route's name is its pseudo-domain's label and, by default, its routing header's
        // value, both compared without case: two names that differ only in case would share
        // them, and one route's mail would take the other's next hop.
        for (auto a = config.routes.begin(); a != config.routes.end(); ++a) {
            for (auto b = std::next(a); b != config.routes.end(); ++b) {
                if (iequals(a->first, b->first)) {
                    return error_at(*node, fmt::format("routes.{} and routes.{}: route names must "
                                                       "differ in more than case (a name is a "
                                                       "pseudo-domain label and the default "
                                                       "routing header value, both caseless)",
                                                       a->first, b->first));
                }
            }
        }
        // Fallback policies may only name relay routes (checked once all routes are known).
        for (const auto& [name, route] : config.routes) {
            if (!route.api) continue;
            for (const FailurePolicy* policy :
                 {&route.api->on_failure, &route.api->on_permanent_failure, &route.api->on_oversize,
                  &route.api->on_quota}) {
                if (policy->kind != FailurePolicy::Kind::relay) continue;
                const Route* target = config.find_route(policy->relay_route);
                if (!target || target->action != Action::relay) {
                    return error_at_where(route.where,
                                          fmt::format("routes.{}: fallback \"relay:{}\" does not "
                                                      "name a route with action = \"relay\"",
                                                      name, policy->relay_route));
                }
            }
        }
        return {};
    }

    Result<void> load_route_action_keys(const toml::table& table, const std::string& context,
                                        Route& route) {
        auto only_for = [&](std::string_view key, Action action) -> Result<void> {
            if (const toml::node* n = table.get(key); n && route.action != action) {
                return error_at(*n, fmt::format("{}.{}: only valid with action = \"{}\"", context,
                                                key, to_string(action)));
            }
            return {};
        };
        bool replies = route.action == Action::reject || route.action == Action::tempfail;
        if (route.action == Action::relay) {
            auto value = get_string(table, "header_value", context, false, route.name);
            if (!value) return value.error();
            if (!valid_header_value(*value)) {
                return error_at(
                    table.get("header_value") ? *table.get("header_value")
                                              : static_cast<const toml::node&>(table),
                    fmt::format("{}.header_value: must be a non-empty single line", context));
            }
            route.header_value = *value;
            auto transport = get_string(table, "transport", context, false);
            if (!transport) return transport.error();
            if (!transport_is_well_formed(*transport)) {
                return error_at(*table.get("transport"),
                                fmt::format("{}.transport: \"{}\" is not \"transport:nexthop\" "
                                            "(a transport name of letters, digits, '_', '.', '-'; "
                                            "a next hop without control characters, quotes, '#' "
                                            "or '\\')",
                                            context, sanitize_for_log(*transport, 120)));
            }
            route.transport = *transport;
        } else {
            if (auto r = only_for("header_value", Action::relay); !r) return r;
            if (auto r = only_for("transport", Action::relay); !r) return r;
        }
        for (std::string_view key : {"reply_code", "reply_status", "reply_text"}) {
            if (const toml::node* n = table.get(key); n && !replies) {
                return error_at(*n, fmt::format("{}.{}: only valid with action = \"reject\" or "
                                                "\"tempfail\"",
                                                context, key));
            }
        }
        if (!replies) return {};

        bool reject = route.action == Action::reject;
        char klass = reject ? '5' : '4';
        route.reply_code = reject ? 550 : 451;
        if (const toml::node* n = table.get("reply_code")) {
            if (!n->is_integer()) return error_at(*n, context + ".reply_code: expected an integer");
            route.reply_code = static_cast<int>(n->as_integer()->get());
            if (route.reply_code / 100 != klass - '0' || route.reply_code > 599) {
                return error_at(*n, fmt::format("{}.reply_code: {} is not a {}xx code", context,
                                                route.reply_code, klass));
            }
        }
        auto status = get_string(table, "reply_status", context, false, reject ? "5.7.1" : "4.7.1");
        if (!status) return status.error();
        if (status->size() < 5 || (*status)[0] != klass || (*status)[1] != '.' ||
            !std::all_of(status->begin() + 2, status->end(),
                         [](char c) { return (c >= '0' && c <= '9') || c == '.'; })) {
            return error_at(*table.get("reply_status"),
                            fmt::format("{}.reply_status: \"{}\" is not an enhanced status code "
                                        "{}.X.Y",
                                        context, *status, klass));
        }
        route.reply_status = *status;
        auto text = get_string(table, "reply_text", context, false,
                               reject ? "Message rejected by policy" : "Try again later");
        if (!text) return text.error();
        if (!valid_header_value(*text) || text->find('%') != std::string::npos) {
            // libmilter treats '%' in reply text as a format escape; refuse it plainly.
            return error_at(*table.get("reply_text"),
                            fmt::format("{}.reply_text: must be a non-empty single line "
                                        "without '%'",
                                        context));
        }
        route.reply_text = *text;
        return {};
    }

    Result<void> load_rules(const toml::table& root, Config& config) {
        const toml::node* node = root.get("rules");
        if (!node) return {};  // no rules: everything takes the default route (or is left alone)
        const toml::array* rules = node->as_array();
        if (!rules || !rules->is_array_of_tables()) {
            return error_at(*node, "rules: expected [[rules]] tables");
        }
        std::set<std::string> names;
        for (size_t i = 0; i < rules->size(); ++i) {
            const toml::table& table = *(*rules)[i].as_table();
            std::string context = fmt::format("rules[{}]", i + 1);
            auto rule = load_rule(table, context, config);
            if (!rule) return rule.error();
            if (!names.insert(rule->name).second) {
                // An unnamed rule's default name ("rules[N]") can collide too: it has no
                // "name" key to point at, so point at the rule.
                const toml::node* name = table.get("name");
                return error_at(name ? *name : static_cast<const toml::node&>(table),
                                fmt::format("{}: duplicate rule name \"{}\"", context, rule->name));
            }
            config.rules.push_back(std::move(*rule));
        }
        return {};
    }

    Result<Rule> load_rule(const toml::table& table, const std::string& context,
                           const Config& config) {
        std::vector<std::string_view> known = {"name", "route", "recipient_match"};
        for (const auto& f : kFields) known.push_back(f.key);
        for (auto&& [key, value] : table) {
            if (std::find(known.begin(), known.end(), key.str()) == known.end()) {
                return error_at(key, fmt::format("{}: unknown key \"{}\"", context, key.str()));
            }
        }
        Rule rule;
        rule.where = where(table);
        auto name = get_string(table, "name", context, false, context);
        if (!name) return name.error();
        rule.name = *name;
        std::string rule_context = fmt::format("{} (\"{}\")", context, rule.name);

        auto route = get_string(table, "route", rule_context, false);
        if (!route) return route.error();
        if (!route->empty() && !config.find_route(*route)) {
            return error_at(*table.get("route"),
                            fmt::format("{}.route: unknown route \"{}\"", rule_context, *route));
        }
        rule.route = *route;

        auto match = get_string(table, "recipient_match", rule_context, false, "any");
        if (!match) return match.error();
        if (*match == "any") {
            rule.recipient_match = RecipientMatch::any;
        } else if (*match == "all") {
            rule.recipient_match = RecipientMatch::all;
        } else {
            return error_at(*table.get("recipient_match"),
                            fmt::format("{}.recipient_match: \"{}\" is not \"any\" or \"all\"",
                                        rule_context, *match));
        }

        for (const auto& spec : kFields) {
            const toml::node* n = table.get(spec.key);
            if (!n) continue;
            auto condition = load_condition(*n, spec, rule_context, rule, config);
            if (!condition) return condition.error();
            rule.conditions.push_back(std::move(*condition));
        }
        if (rule.conditions.empty()) {
            return make_error(fmt::format("{}: a rule needs at least one condition (use "
                                          "milter.default_route for a catch-all)",
                                          rule_context),
                              path_, static_cast<int>(table.source().begin.line));
        }
        if (rule.route.empty() &&
            std::none_of(rule.conditions.begin(), rule.conditions.end(),
                         [](const Condition& c) { return c.always_names_route; })) {
            return make_error(fmt::format("{}: no \"route\", and no condition is made only of "
                                          "tables whose results name routes",
                                          rule_context),
                              path_, static_cast<int>(table.source().begin.line));
        }
        return rule;
    }

    Result<Condition> load_condition(const toml::node& node, const FieldSpec& spec,
                                     const std::string& context, const Rule& rule,
                                     const Config& config) {
        std::string key_context = fmt::format("{}.{}", context, spec.key);
        std::vector<const toml::node*> items;
        if (node.is_string()) {
            items.push_back(&node);
        } else if (const toml::array* array = node.as_array()) {
            for (const toml::node& item : *array) items.push_back(&item);
        } else {
            return error_at(node, key_context + ": expected a string or a list of strings");
        }
        if (items.empty()) return error_at(node, key_context + ": empty list");

        Condition condition;
        condition.field = spec.field;
        condition.always_names_route = true;
        std::vector<InlineEntry> pending;
        auto flush_inline = [&]() -> Result<void> {
            if (pending.empty()) return {};
            auto table = make_inline_table(pending, spec.kind, key_context);
            if (!table) return table.error();
            condition.sources.push_back(std::move(*table));
            condition.always_names_route = false;  // inline entries carry no route
            pending.clear();
            return {};
        };
        for (const toml::node* item : items) {
            if (!item->is_string()) {
                return error_at(*item, key_context + ": expected a string");
            }
            const std::string& text = item->as_string()->get();
            if (!is_table_reference(text)) {
                pending.push_back({text, path_, static_cast<int>(item->source().begin.line)});
                continue;
            }
            if (auto r = flush_inline(); !r) return r.error();
            auto table = open_table(resolve(text), spec.kind);
            if (!table) {
                // Name the config line that refers to the table too: the table's own error
                // already carries its file:line.
                Error e = table.error();
                if (e.file.empty()) {
                    e.file = path_;
                    e.line = static_cast<int>(item->source().begin.line);
                    e.message = key_context + ": " + e.message;
                }
                return e;
            }
            if (auto r = check_results(**table, rule, config, condition.always_names_route); !r)
                return r.error();
            condition.sources.push_back(std::move(*table));
        }
        if (auto r = flush_inline(); !r) return r.error();
        return condition;
    }

    // A table's right-hand sides must each name a route, be DUNNO, or be OK (the rule's
    // own route), so that a typo is a load error rather than a silently unrouted message.
    Result<void> check_results(const Table& table, const Rule& rule, const Config& config,
                               bool& always_names_route) const {
        std::optional<Error> failure;
        table.for_each_result([&](const std::string& value, const std::string& at) {
            if (failure) return;
            if (value == kDunno || config.find_route(value)) return;
            if (value == kOk && !rule.route.empty()) {
                always_names_route = false;
                return;
            }
            failure = error_at_where(
                at, value == kOk
                        ? fmt::format("result OK needs a \"route\" in rule \"{}\"", rule.name)
                        : fmt::format("result \"{}\" is not a route name, OK or DUNNO", value));
        });
        if (failure) return *failure;
        return {};
    }

    const std::string& path_;
    ServiceRegistry* services_;  // null: build no services (check, query)
};

// milter_header_checks patterns match the header line literally: escape PCRE specials.
std::string escape_regex(std::string_view text) {
    std::string out;
    for (char c : text) {
        if (std::string_view("\\^$.|?*+()[]{}/").find(c) != std::string_view::npos) out += '\\';
        out += c;
    }
    return out;
}

}  // namespace

Result<std::shared_ptr<const Config>> load_config(const std::string& path,
                                                  ServiceRegistry* services) {
    try {
        return Loader(path, services).load();
    } catch (const std::exception& e) {
        return make_error(fmt::format("cannot load configuration: {}", e.what()), path);
    }
}

std::string render_header_checks(const Config& config) {
    std::string out = fmt::format(
        "# milter_header_checks for {} (generated by paas-milter header-checks).\n"
        "# Postfix applies these only to headers a milter added, never to the client's.\n",
        config.path);
    for (const auto& [name, route] : config.routes) {
        if (route.action != Action::relay) continue;
        std::string pattern = fmt::format("/^{}:\\s*{}$/", escape_regex(config.routing_header),
                                          escape_regex(route.header_value));
        if (route.transport.empty()) {
            out +=
                fmt::format("# route {}: no transport configured\n# {} FILTER transport:nexthop\n",
                            name, pattern);
        } else {
            out += fmt::format("{} FILTER {}\n", pattern, route.transport);
        }
    }
    return out;
}

}  // namespace paasmilter
