#include "paasmilter/postfix_config.hpp"

#include "paasmilter/generated_text.hpp"

#include <algorithm>
#include <cctype>
#include <map>

#include <fmt/format.h>

#include "paasmilter/route_addresses.hpp"

namespace paasmilter {

namespace {

// pcre_table(5) patterns match literally: escape PCRE specials and the '/' delimiter.
std::string escape_regex(std::string_view text) {
    std::string out;
    for (char c : text) {
        if (std::string_view("\\^$.|?*+()[]{}/").find(c) != std::string_view::npos) out += '\\';
        out += c;
    }
    return out;
}

// A transport's name as part of a file name.
std::string file_safe(std::string_view name) {
    std::string out;
    for (unsigned char c : name) {
        out += (std::isalnum(c) || c == '-' || c == '_' || c == '.') ? static_cast<char>(c) : '_';
    }
    return out;
}

// Services of Debian's master.cf that other mail uses too: a relay route should have a
// transport of its own before generic maps are put on it.
bool shared_service(std::string_view name) {
    static constexpr std::string_view kBuiltIn[] = {"smtp",  "relay", "lmtp",    "local", "virtual",
                                                    "error", "retry", "discard", "pipe"};
    return std::find(std::begin(kBuiltIn), std::end(kBuiltIn), name) != std::end(kBuiltIn);
}

bool needs_generic_map(const Route& route) {
    return route.external_only || !route.rewrite.empty();
}

std::vector<const Route*> relay_routes(const Config& config) {
    std::vector<const Route*> out;
    for (const auto& [name, route] : config.routes) {
        if (route.action == Action::relay && !route.transport.empty()) out.push_back(&route);
    }
    return out;
}

constexpr std::string_view kTransportMapFile = "paas_route_transport";
constexpr std::string_view kHeaderChecksFile = "milter_header_checks";

std::string generic_map_file(std::string_view transport) {
    return "paas_route_generic_" + file_safe(transport);
}

// `text` as "# " comment lines of at most about 90 columns.
std::string comment(std::string_view text) {
    return wrapped_comment("#", text) + "\n";
}

}  // namespace

std::string transport_name(std::string_view transport) {
    return std::string(transport.substr(0, transport.find(':')));
}

std::string postfix_milter_socket(std::string_view socket, std::string* note) {
    auto say = [&](std::string text) {
        if (note) *note = std::move(text);
    };
    const bool inet6 = socket.starts_with("inet6:");
    if (socket.starts_with("inet:") || inet6) {
        const std::string_view rest = socket.substr(socket.find(':') + 1);
        const size_t at = rest.find('@');
        const std::string_view port = rest.substr(0, at);
        std::string_view host = at == std::string_view::npos ? "" : rest.substr(at + 1);
        if (host.empty()) {
            host = inet6 ? "::1" : "127.0.0.1";
            say(
                fmt::format("milter.socket names no host (libmilter listens on every address); "
                            "Postfix asks {}",
                            host));
        }
        if (host.find(':') != std::string_view::npos)
            return fmt::format("inet:[{}]:{}", host, port);
        return fmt::format("inet:{}:{}", host, port);
    }
    std::string_view path = socket;
    if (path.starts_with("unix:")) path.remove_prefix(5);
    if (path.starts_with("local:")) path.remove_prefix(6);
    constexpr std::string_view kQueueDirectory = "/var/spool/postfix";
    if (path.starts_with(kQueueDirectory) && path.size() > kQueueDirectory.size() &&
        path[kQueueDirectory.size()] == '/') {
        say(
            fmt::format("a chrooted smtpd (Debian's default) names the socket relative to "
                        "queue_directory; without the chroot write unix:{}",
                        path));
        return fmt::format("unix:{}", path.substr(kQueueDirectory.size()));
    }
    say("a chrooted smtpd cannot reach a unix socket outside /var/spool/postfix: put it "
        "there, or use an inet socket");
    return fmt::format("unix:{}", path);
}

std::string render_route_transport_map(const Config& config) {
    std::string out;
    for (const auto& [name, route] : config.routes) {
        if (route.action != Action::relay || !route.external_only) continue;
        out += fmt::format("# route {}: its external recipients, in {}\n", name,
                           route_pseudo_domain(name));
        out +=
            fmt::format("/[.@]{}$/ {}\n", escape_regex(route_pseudo_domain(name)), route.transport);
    }
    return out;
}

std::string render_generic_map(const Config& config, std::string_view transport,
                               std::vector<std::string>* notes) {
    std::string restore, rewrite;
    std::map<std::string, std::pair<std::string, std::string>> rewritten;  // from -> (to, route)
    for (const Route* route : relay_routes(config)) {
        if (transport_name(route->transport) != transport || !needs_generic_map(*route)) continue;
        if (route->external_only) {
            const std::string suffix = escape_regex(route_pseudo_domain(route->name));
            restore += fmt::format("# route {}: each rerouted recipient's own address again\n",
                                   route->name);
            // One lookup, one result: a rerouted recipient in a recipient_rewrite domain
            // needs both changes in one line, before the general one.
            for (const auto& [from, to] : route->rewrite.recipient.entries) {
                restore +=
                    fmt::format("/^(.*)@{}\\.{}$/ ${{1}}@{}\n", escape_regex(from), suffix, to);
            }
            restore += fmt::format("/^(.*)@(.+)\\.{}$/ ${{1}}@${{2}}\n", suffix);
            restore += fmt::format("/^\"(.*@\\[[^]]*\\])\"@{}$/ ${{1}}\n", suffix);
        }
        for (const DomainMap* map : {&route->rewrite.sender, &route->rewrite.recipient}) {
            for (const auto& [from, to] : map->entries) {
                auto [it, inserted] = rewritten.emplace(from, std::pair{to, route->name});
                if (inserted) {
                    rewrite += fmt::format("/^(.*)@{}$/ ${{1}}@{}\n", escape_regex(from), to);
                } else if (it->second.first != to && notes) {
                    notes->push_back(fmt::format(
                        "transport {}: route {} rewrites {} to {}, route {} to {}; the first "
                        "one applies to both (give each route a transport of its own)",
                        transport, it->second.second, from, it->second.first, route->name, to));
                }
            }
        }
    }
    std::string out = restore;
    if (!rewrite.empty()) {
        out +=
            "# sender_rewrite and recipient_rewrite: every address on this transport, "
            "envelope and header\n";
        out += rewrite;
    }
    return out;
}

PostfixWiring postfix_wiring(const Config& config, const PostfixConfigOptions& options) {
    PostfixWiring wiring;
    if (config.mta == Mta::sendmail) {
        wiring.notes.push_back(
            "milter.mta is \"sendmail\": the milter adds no routing header and reroutes every "
            "relay route's recipients, which this output does not wire for Postfix; run "
            "paas-milter sendmail-config, or set mta = \"postfix\"");
    }
    const std::string& dir = options.table_directory;
    std::string note;
    wiring.main_cf.push_back("smtpd_milters = " + postfix_milter_socket(config.socket, &note));
    if (!note.empty()) wiring.main_cf.push_back(comment("(" + note + ")"));
    wiring.main_cf.push_back(
        comment("a stopped or hung milter means \"try again later\", never unfiltered mail"));
    wiring.main_cf.push_back("milter_default_action = tempfail");
    const std::vector<const Route*> relays = relay_routes(config);
    if (std::any_of(relays.begin(), relays.end(),
                    [](const Route* route) { return !route->external_only; })) {
        wiring.main_cf.push_back("milter_header_checks = pcre:" +
                                 join_path(dir, kHeaderChecksFile));
        wiring.tables.push_back({join_path(dir, kHeaderChecksFile), render_header_checks(config)});
    }
    const bool any_external_only = std::any_of(
        relays.begin(), relays.end(), [](const Route* route) { return route->external_only; });
    if (any_external_only) {
        wiring.main_cf.push_back(
            comment("external_only routes: their recipients' pseudo-domains to the routes' "
                    "transports; if main.cf already has transport_maps, list this table first"));
        wiring.main_cf.push_back("transport_maps = pcre:" + join_path(dir, kTransportMapFile));
        wiring.tables.push_back(
            {join_path(dir, kTransportMapFile),
             "# transport_maps for the external_only routes (paas-milter postfix-config)\n" +
                 render_route_transport_map(config)});
    }
    for (const auto& [name, route] : config.routes) {
        if (route.action == Action::relay && route.transport.empty()) {
            wiring.notes.push_back(fmt::format(
                "route {} has no transport: nothing for Postfix is generated for it", name));
        }
    }

    std::map<std::string, PostfixTransport> transports;
    for (const Route* route : relays) {
        const std::string name = transport_name(route->transport);
        PostfixTransport& transport = transports[name];
        transport.name = name;
        transport.routes.push_back(route->name);
        if (needs_generic_map(*route))
            transport.generic_map = join_path(dir, generic_map_file(name));
    }
    for (auto& [name, transport] : transports) {
        if (shared_service(name)) {
            wiring.notes.push_back(fmt::format(
                "transport {} (route {}) is a service other mail uses too: {}give the route a "
                "transport of its own (e.g. {}-relay) and write that in its transport",
                name, fmt::join(transport.routes, ", "),
                transport.generic_map.empty() ? ""
                                              : "its smtp_generic_maps would apply to all of it; ",
                transport.routes.front()));
            if (!transport.generic_map.empty()) continue;
        }
        if (!transport.generic_map.empty()) {
            std::string content = fmt::format(
                "# smtp_generic_maps of transport {} (paas-milter postfix-config)\n", name);
            content += render_generic_map(config, name, &wiring.notes);
            wiring.tables.push_back({transport.generic_map, content});
        }
        wiring.transports.push_back(transport);
    }
    return wiring;
}

std::string render_postfix_config(const Config& config, const PostfixConfigOptions& options) {
    const PostfixWiring wiring = postfix_wiring(config, options);
    std::string out = fmt::format(
        "# Postfix configuration for the routes of {} (paas-milter postfix-config).\n"
        "# Each block starts with \"# ==== TARGET ====\": add the main.cf lines (postconf -e),\n"
        "# append the master.cf entries, write each table to the file named; then\n"
        "# `postfix check && postfix reload`. Needs the postfix-pcre package.\n",
        config.path);
    for (const std::string& note : wiring.notes) out += comment("NOTE: " + note);

    out += "\n# ==== main.cf ====\n";
    for (const std::string& line : wiring.main_cf) {
        out += line;
        if (!line.ends_with('\n')) out += '\n';
    }

    if (!wiring.transports.empty()) {
        out += "\n# ==== master.cf ====\n";
        out +=
            "# chroot \"y\" as in Debian's master.cf: the tables are opened before the "
            "chroot.\n";
        for (const PostfixTransport& transport : wiring.transports) {
            out += comment(fmt::format(
                "{}: route {}. If master.cf already has it (contrib/postfix/master.cf.snippet: "
                "TLS, SASL, strip_route_header), add only the lines missing there.",
                transport.name, fmt::join(transport.routes, ", ")));
            out += fmt::format("{} unix  -       -       y       -       -       smtp\n",
                               transport.name);
            out += fmt::format("  -o syslog_name=postfix/{}\n", transport.name);
            if (!transport.generic_map.empty()) {
                out += fmt::format("  -o smtp_generic_maps=pcre:{}\n", transport.generic_map);
            }
        }
    }
    for (const PostfixTableFile& table : wiring.tables) {
        out += fmt::format("\n# ==== {} ====\n{}", table.path, table.content);
    }
    return out;
}

}  // namespace paasmilter
