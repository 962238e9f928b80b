#include "paasmilter/config_routing.hpp"
#include "paasmilter/text.hpp"

#include <algorithm>
#include <cctype>

#include <fmt/format.h>

#include "paasmilter/sendmail_config.hpp"

namespace paasmilter {

namespace {

// A domain as the maps and lists take it: labels of letters, digits, '-' and '_', separated
// by single dots. `subdomains_allowed`: a leading '.' ("all subdomains of") is accepted.
bool valid_domain(std::string_view domain, bool subdomains_allowed) {
    if (subdomains_allowed && domain.starts_with('.')) domain.remove_prefix(1);
    if (domain.empty() || domain.size() > 253 || domain.front() == '.' || domain.back() == '.')
        return false;
    if (domain.find("..") != std::string_view::npos) return false;
    return std::all_of(domain.begin(), domain.end(), [](unsigned char c) {
        return std::isalnum(c) || c == '-' || c == '_' || c == '.';
    });
}

const toml::node& node_or(const toml::table& table, std::string_view key) {
    const toml::node* node = table.get(key);
    return node ? *node : static_cast<const toml::node&>(table);
}

// internal_domains and internal_table of `table` (the [milter] table or a route's), or null
// when neither is set.
Result<std::shared_ptr<const InternalRecipients>> load_internal(ConfigReader& reader,
                                                                const toml::table& table,
                                                                const std::string& context) {
    if (!table.get("internal_domains") && !table.get("internal_table")) {
        return std::shared_ptr<const InternalRecipients>();
    }
    auto internal = std::make_shared<InternalRecipients>();
    internal->where = reader.where(node_or(table, "internal_domains"));
    auto domains = reader.get_string_list(table, "internal_domains", context);
    if (!domains) return domains.error();
    for (const std::string& domain : *domains) {
        if (!valid_domain(domain, true)) {
            return reader.error_at(*table.get("internal_domains"),
                                   fmt::format("{}.internal_domains: \"{}\" is not a domain "
                                               "(\"contoso.com\", or \".contoso.com\" for its "
                                               "subdomains)",
                                               context, domain));
        }
        internal->domains.push_back(ascii_lowercase(domain));
    }
    if (const toml::node* node = table.get("internal_table")) {
        auto spec = reader.get_string(table, "internal_table", context, true);
        if (!spec) return spec.error();
        const std::string type = spec->substr(0, spec->find(':'));
        if (type == "hash" || type == "btree" || type == "lmdb" || type == "cdb") {
            return reader.error_at(
                *node, fmt::format("{}.internal_table: \"{}\": {} tables are Postfix's indexed "
                                   "files, which paas-milter does not read; name the source "
                                   "file as \"texthash:{}\"",
                                   context, *spec, type, spec->substr(spec->find(':') + 1)));
        }
        if (!is_table_reference(*spec) ||
            (type != "texthash" && type != "regexp" && type != "pcre" && type != "cidr")) {
            return reader.error_at(*node, fmt::format("{}.internal_table: \"{}\" is not a "
                                                      "texthash:, regexp:, pcre: or cidr: table",
                                                      context, *spec));
        }
        internal->table_is_cidr = type == "cidr";
        auto opened = open_table(reader.resolve(*spec),
                                 internal->table_is_cidr ? KeyKind::ip : KeyKind::address);
        if (!opened) {
            Error e = opened.error();
            if (e.file.empty()) {
                e.file = reader.path();
                e.line = static_cast<int>(node->source().begin.line);
                e.message = context + ".internal_table: " + e.message;
            }
            return e;
        }
        internal->table = std::shared_ptr<const Table>(std::move(*opened));
        if (!table.get("internal_domains")) internal->where = reader.where(*node);
    }
    return std::shared_ptr<const InternalRecipients>(std::move(internal));
}

Result<DomainMap> load_domain_map(ConfigReader& reader, const toml::table& table,
                                  std::string_view key, const std::string& context) {
    DomainMap map;
    const toml::node* node = table.get(key);
    if (!node) return map;
    const toml::table* entries = node->as_table();
    if (!entries) {
        return reader.error_at(*node, fmt::format("{}.{}: expected a table of domains, "
                                                  "{{ \"contoso.local\" = \"contoso.com\" }}",
                                                  context, key));
    }
    for (auto&& [from, to] : *entries) {
        const std::string from_domain(from.str());
        if (!valid_domain(from_domain, false)) {
            return reader.error_at(
                from, fmt::format("{}.{}: \"{}\" is not a domain", context, key, from_domain));
        }
        if (!to.is_string() || !valid_domain(to.as_string()->get(), false)) {
            return reader.error_at(
                to, fmt::format("{}.{}.\"{}\": expected a domain", context, key, from_domain));
        }
        if (map.find(from_domain)) {
            return reader.error_at(
                from, fmt::format("{}.{}: \"{}\" is listed twice", context, key, from_domain));
        }
        map.entries.emplace_back(ascii_lowercase(from_domain),
                                 ascii_lowercase(to.as_string()->get()));
    }
    return map;
}

}  // namespace

Result<void> load_milter_routing(ConfigReader& reader, const toml::table& milter, Config& config) {
    auto internal = load_internal(reader, milter, "milter");
    if (!internal) return internal.error();
    config.internal_recipients = std::move(*internal);
    return {};
}

bool transport_is_well_formed(std::string_view transport) {
    const size_t colon = transport.find(':');
    const std::string_view name = transport.substr(0, colon);
    const std::string_view hop =
        colon == std::string_view::npos ? std::string_view() : transport.substr(colon + 1);
    const bool name_ok = std::all_of(name.begin(), name.end(), [](char c) {
        return std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '.' || c == '-';
    });
    return name_ok && std::all_of(hop.begin(), hop.end(), [](char c) {
               const auto u = static_cast<unsigned char>(c);
               return u >= 0x20 && u < 0x7f &&
                      std::string_view("\"'`#\\").find(c) == std::string_view::npos;
           });
}

Result<void> load_route_routing(ConfigReader& reader, const toml::table& table,
                                const std::string& context, const Config& config, Route& route) {
    const bool relay = route.action == Action::relay;
    auto external_only = reader.get_bool(table, "external_only", context, false);
    if (!external_only) return external_only.error();
    if (*external_only && !relay) {
        return reader.error_at(
            *table.get("external_only"),
            fmt::format("{}.external_only: only valid with action = \"relay\" (an API route "
                        "keeps its local_domains recipients with Postfix; its relay: fallback "
                        "follows the fallback route's external_only)",
                        context));
    }
    route.external_only = *external_only;
    if (relay && config.mta == Mta::sendmail) {
        // Sendmail routes every relay route per recipient: the route's pseudo-domain goes to
        // its next hop through a mailertable entry (paas-milter sendmail-config).
        const toml::node& at = node_or(table, "transport");
        if (route.transport.empty() || route.transport.find(':') == std::string::npos) {
            return reader.error_at(
                at, fmt::format("{}: with milter.mta = \"sendmail\" a relay route needs "
                                "transport = \"transport:nexthop\": sendmail-config makes the "
                                "mailertable entry for its next hop from it",
                                context));
        }
        // What sendmail-config could not make an entry of would send the route's pseudo-domain
        // nowhere: refused here, not left to a NOTE in its output.
        if (auto hop = sendmail_next_hop(route.transport); !hop) {
            return reader.error_at(at,
                                   fmt::format("{}.transport: {}", context, hop.error().message));
        }
        if (!valid_route_label(route.name)) {
            return reader.error_at(
                at, fmt::format("{}: with milter.mta = \"sendmail\" the route name becomes a "
                                "DNS label of its pseudo-domain ({}): letters, digits and '-' "
                                "only, at most 63",
                                context, route_pseudo_domain(route.name)));
        }
    }
    for (std::string_view key : {"internal_domains", "internal_table"}) {
        if (const toml::node* node = table.get(key); node && !route.external_only) {
            return reader.error_at(*node, fmt::format("{}.{}: only valid with external_only = "
                                                      "true",
                                                      context, key));
        }
    }
    if (route.external_only) {
        if (route.transport.empty() || route.transport.find(':') == std::string::npos) {
            return reader.error_at(
                *table.get("external_only"),
                fmt::format("{}.external_only: needs transport = \"transport:nexthop\": "
                            "Postfix's transport_maps sends the route's recipients there "
                            "(paas-milter postfix-config)",
                            context));
        }
        if (!valid_route_label(route.name)) {
            return reader.error_at(
                *table.get("external_only"),
                fmt::format("{}.external_only: the route name becomes a DNS label of its "
                            "pseudo-domain ({}): letters, digits and '-' only, at most 63",
                            context, route_pseudo_domain(route.name)));
        }
        auto internal = load_internal(reader, table, context);
        if (!internal) return internal.error();
        route.internal = *internal ? std::move(*internal) : config.internal_recipients;
        if (!route.internal) {
            return reader.error_at(
                *table.get("external_only"),
                fmt::format("{}.external_only: no internal recipients defined: set "
                            "internal_domains or internal_table here or in [milter]",
                            context));
        }
    }

    auto sender = load_domain_map(reader, table, "sender_rewrite", context);
    if (!sender) return sender.error();
    auto recipient = load_domain_map(reader, table, "recipient_rewrite", context);
    if (!recipient) return recipient.error();
    route.rewrite = AddressRewrite{std::move(*sender), std::move(*recipient)};
    if (route.rewrite.empty()) return {};
    const toml::node& at =
        node_or(table, table.get("sender_rewrite") ? "sender_rewrite" : "recipient_rewrite");
    if (!relay && route.action != Action::api) {
        return reader.error_at(at, fmt::format("{}: sender_rewrite and recipient_rewrite are "
                                               "only valid with action = \"relay\" or \"api\"",
                                               context));
    }
    if (relay) {
        if (route.transport.empty() || route.transport.find(':') == std::string::npos) {
            return reader.error_at(
                at, fmt::format("{}: a relay route's rewrite maps become smtp_generic_maps of "
                                "its transport: set transport = \"transport:nexthop\"",
                                context));
        }
        // smtp_generic_maps rewrites every address, sender or recipient: one map. (Sendmail's
        // mailer has a sender and a recipient ruleset of its own: no conflict there.)
        if (config.mta == Mta::sendmail) return {};
        for (const auto& [from, to] : route.rewrite.sender.entries) {
            const std::string* other = route.rewrite.recipient.find(from);
            if (other && *other != to) {
                return reader.error_at(
                    at, fmt::format("{}: \"{}\" is rewritten to \"{}\" as a sender and to "
                                    "\"{}\" as a recipient; Postfix's smtp_generic_maps "
                                    "cannot tell the two apart on a relay route",
                                    context, from, to, *other));
            }
        }
    }
    return {};
}

}  // namespace paasmilter
