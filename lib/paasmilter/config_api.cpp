#include <filesystem>
#include <span>
#include <vector>

#include <fmt/format.h>
#include <toml++/toml.h>

#include "paasmilter/config_reader.hpp"
#include "paasmilter/quota/quota_config.hpp"
#include "paasmilter/services.hpp"
#include "paasmilter/table.hpp"

namespace paasmilter {

namespace {

// Keys only one provider has (see etc/paas-milter.toml).
constexpr std::string_view kAcsOnlyKeys[] = {
    "api_version",         "endpoint",      "connection_string_file", "sender",
    "verified_domains",    "sender_source", "reply_to_original",      "pass_headers",
    "engagement_tracking",
};
constexpr std::string_view kGraphOnlyKeys[] = {
    "mailbox",         "graph_endpoint",    "sent_items_check", "mailbox_concurrency",
    "upload_sessions", "max_message_bytes",
};
// Keys both have.
constexpr std::string_view kSharedKeys[] = {
    "provider",
    "tenant_id",
    "client_id",
    "client_secret_file",
    "client_certificate_file",
    "authority",
    "token_scope",
    "assertion_algorithm",
    "local_domains",
    "sender_map",
    "on_failure",
    "on_permanent_failure",
    "on_oversize",
    "on_ambiguous",
    "lookup_before_post",
    "time_budget",
    "request_timeout",
    "max_attempts",
    "max_request_bytes",
    "spool_threshold",
    "spool_directory",
    "ca_file",
    "proxy",
    "connect_timeout",
    "max_concurrency",
    "quota_messages_per_minute",
    "quota_messages_per_hour",
    "quota_recipients_per_day",
    "on_quota",
};

// ACS: api_version, an access key (connection string) or Entra ID, the endpoint, and how the
// message is converted to the service's JSON.
Result<void> load_acs_keys(ConfigReader& reader, const toml::table& table,
                           const std::string& context, ApiSettings& settings) {
    ApiSettings* api = &settings;
    auto version = reader.get_string(table, "api_version", context, false, "2023-03-31");
    if (!version) return version.error();
    if (version->size() != 10 || (*version)[4] != '-' || (*version)[7] != '-') {
        return reader.error_at(
            *table.get("api_version"),
            fmt::format("{}.api_version: \"{}\" is not YYYY-MM-DD", context, *version));
    }
    api->api_version = *version;
    api->inline_attachments = *version >= "2025-09-01";

    // Authentication: a connection string (endpoint + access key) or Entra ID.
    bool has_key = table.get("connection_string_file") != nullptr;
    bool has_entra = table.get("tenant_id") || table.get("client_id");
    if (has_key == has_entra) {
        return make_error(fmt::format("{}: set either connection_string_file (access key) "
                                      "or tenant_id + client_id (Entra ID)",
                                      context),
                          reader.path(), static_cast<int>(table.source().begin.line));
    }
    auto endpoint = reader.get_string(table, "endpoint", context, false);
    if (!endpoint) return endpoint.error();
    api->endpoint = *endpoint;
    if (has_key) {
        auto secret = reader.read_secret_file(table, "connection_string_file", context);
        if (!secret) return secret.error();
        auto parsed = parse_connection_string(*secret);
        if (!parsed) {
            return reader.error_at(
                *table.get("connection_string_file"),
                fmt::format("{}.connection_string_file: {}", context, parsed.error().message));
        }
        api->access_key = parsed->access_key;
        if (api->endpoint.empty()) api->endpoint = parsed->endpoint;
    }
    while (!api->endpoint.empty() && api->endpoint.back() == '/') api->endpoint.pop_back();
    if (!api->endpoint.starts_with("https://")) {
        return make_error(
            fmt::format("{}: endpoint \"{}\" must be an https:// URL", context, api->endpoint),
            reader.path(),
            static_cast<int>(
                (table.get("endpoint") ? table.get("endpoint")->source() : table.source())
                    .begin.line));
    }

    ConversionOptions& conversion = api->conversion;
    auto sender = reader.get_string(table, "sender", context, true);
    if (!sender) return sender.error();
    if (sender->find('@') == std::string::npos) {
        return reader.error_at(
            *table.get("sender"),
            fmt::format("{}.sender: \"{}\" is not an address", context, *sender));
    }
    conversion.sender = *sender;
    auto verified = reader.get_string_list(table, "verified_domains", context);
    if (!verified) return verified.error();
    conversion.verified_domains = *verified;
    auto source = reader.get_string(table, "sender_source", context, false, "header");
    if (!source) return source.error();
    if (*source == "header") {
        conversion.sender_source = SenderSource::header;
    } else if (*source == "envelope") {
        conversion.sender_source = SenderSource::envelope;
    } else {
        return reader.error_at(*table.get("sender_source"),
                               fmt::format("{}.sender_source: \"{}\" is not \"header\" or "
                                           "\"envelope\"",
                                           context, *source));
    }
    auto reply_to = reader.get_bool(table, "reply_to_original", context, true);
    if (!reply_to) return reply_to.error();
    conversion.reply_to_original = *reply_to;
    if (table.get("pass_headers")) {
        auto pass = reader.get_string_list(table, "pass_headers", context);
        if (!pass) return pass.error();
        conversion.pass_headers = *pass;
    }
    auto tracking = reader.get_bool(table, "engagement_tracking", context, false);
    if (!tracking) return tracking.error();
    conversion.disable_engagement_tracking = !*tracking;
    conversion.inline_attachments = api->inline_attachments;

    return {};
}

// Graph: Entra ID only; the mailbox that sends; the Graph endpoint; Sent Items lookups.
Result<void> load_graph_keys(ConfigReader& reader, const toml::table& table,
                             const std::string& context, ApiSettings& api) {
    if (!table.get("tenant_id") || !table.get("client_id")) {
        return make_error(fmt::format("{}: provider = \"graph\" needs tenant_id and client_id "
                                      "(Entra ID app credentials)",
                                      context),
                          reader.path(), static_cast<int>(table.source().begin.line));
    }
    auto mailbox = reader.get_string(table, "mailbox", context, true);
    if (!mailbox) return mailbox.error();
    if (mailbox->empty() || mailbox->find_first_of("/?#% \t") != std::string::npos) {
        return reader.error_at(*table.get("mailbox"),
                               fmt::format("{}.mailbox: \"{}\" is not a user principal name "
                                           "or object id",
                                           context, *mailbox));
    }
    api.graph.mailbox = *mailbox;
    auto endpoint =
        reader.get_string(table, "graph_endpoint", context, false, "https://graph.microsoft.com");
    if (!endpoint) return endpoint.error();
    api.graph.endpoint = *endpoint;
    while (!api.graph.endpoint.empty() && api.graph.endpoint.back() == '/') {
        api.graph.endpoint.pop_back();
    }
    if (!api.graph.endpoint.starts_with("https://")) {
        return reader.error_at(*table.get("graph_endpoint"),
                               fmt::format("{}.graph_endpoint: \"{}\" must be an https:// URL",
                                           context, api.graph.endpoint));
    }
    auto sent_items = reader.get_bool(table, "sent_items_check", context, false);
    if (!sent_items) return sent_items.error();
    api.graph.sent_items_check = *sent_items;
    auto slots = reader.get_integer(table, "mailbox_concurrency", context, 4, 1, 4);
    if (!slots) return slots.error();
    api.graph.mailbox_concurrency = static_cast<size_t>(*slots);
    // Larger messages as a draft with upload sessions: Mail.ReadWrite besides Mail.Send.
    auto upload_sessions = reader.get_bool(table, "upload_sessions", context, false);
    if (!upload_sessions) return upload_sessions.error();
    api.graph.upload_sessions = *upload_sessions;
    // Exchange Online's default maximum message size is 35 MB, 150 MB at most (REFERENCE.md
    // "Microsoft Graph"; attachment-createuploadsession.md).
    auto max_message =
        reader.get_integer(table, "max_message_bytes", context, 35'000'000, 1'000'000, 150'000'000);
    if (!max_message) return max_message.error();
    api.graph.max_message_bytes = static_cast<size_t>(*max_message);
    // One sendMail request carries about 4 MB (REFERENCE.md "Microsoft Graph"), base64
    // included: about 3 MB of MIME.
    api.max_request_bytes = 4'000'000;
    return {};
}

// [routes.NAME.sender_map]: tables by the client's identity, strongest first.
Result<std::shared_ptr<const SenderMap>> load_sender_map(ConfigReader& reader,
                                                         const toml::node& node,
                                                         const std::string& context,
                                                         ApiSettings::Provider provider) {
    const std::string map_context = context + ".sender_map";
    const toml::table* table = node.as_table();
    if (!table) return reader.error_at(node, map_context + ": expected a table");
    struct Source {
        std::string_view key;
        Field field;
        KeyKind kind;
    };
    constexpr Source kSources[] = {
        {"cert_subject", Field::cert_subject, KeyKind::text},
        {"auth", Field::auth, KeyKind::text},
        {"client_addr", Field::client_addr, KeyKind::ip},
        {"sender", Field::sender, KeyKind::address},
    };
    if (auto r = reader.check_keys(
            *table, {"cert_subject", "auth", "client_addr", "sender", "unmapped"}, map_context);
        !r) {
        return r.error();
    }
    auto map = std::make_shared<SenderMap>();
    for (const Source& source : kSources) {
        const toml::node* item = table->get(source.key);
        if (!item) continue;
        std::vector<const toml::node*> specs;
        if (const toml::array* list = item->as_array()) {
            for (const toml::node& spec : *list) specs.push_back(&spec);
        } else {
            specs.push_back(item);
        }
        Condition condition;
        condition.field = source.field;
        for (const toml::node* spec : specs) {
            const std::string key_context = fmt::format("{}.{}", map_context, source.key);
            if (!spec->is_string() || !is_table_reference(spec->as_string()->get())) {
                return reader.error_at(*spec, key_context +
                                                  ": expected a table (\"type:/path\", e.g. "
                                                  "\"cidr:senders.cidr\") or a list of them");
            }
            auto opened = open_table(reader.resolve(spec->as_string()->get()), source.kind);
            if (!opened) {
                Error e = opened.error();
                if (e.file.empty()) {
                    e.file = reader.path();
                    e.line = static_cast<int>(spec->source().begin.line);
                    e.message = key_context + ": " + e.message;
                }
                return e;
            }
            // Every right-hand side must be usable as the sender: an address for ACS, a user
            // principal name or object id for Graph.
            std::optional<Error> bad;
            (*opened)->for_each_result([&](const std::string& value, const std::string& where) {
                if (bad || value == "DUNNO") return;
                bool usable =
                    provider == ApiSettings::Provider::acs
                        ? value.find('@') != std::string::npos &&
                              value.find_first_of(" \t<>") == std::string::npos
                        : !value.empty() && value.find_first_of("/?#% \t") == std::string::npos;
                if (!usable) {
                    bad = ConfigReader::error_at_where(
                        where, fmt::format("{}: \"{}\" is not {}", key_context, value,
                                           provider == ApiSettings::Provider::acs
                                               ? "a sender address"
                                               : "a mailbox (user principal name or object id)"));
                }
            });
            if (bad) return *bad;
            condition.sources.push_back(std::move(*opened));
        }
        map->conditions.push_back(std::move(condition));
    }
    if (map->conditions.empty()) {
        return reader.error_at(node, map_context +
                                         ": names no table (cert_subject, auth, "
                                         "client_addr, sender)");
    }
    auto unmapped = reader.get_string(*table, "unmapped", map_context, false, "route");
    if (!unmapped) return unmapped.error();
    if (*unmapped != "route" && *unmapped != "refuse") {
        return reader.error_at(*table->get("unmapped"),
                               fmt::format("{}.unmapped: \"{}\" is not \"route\" or \"refuse\"",
                                           map_context, *unmapped));
    }
    map->refuse_unmapped = *unmapped == "refuse";
    return std::shared_ptr<const SenderMap>(std::move(map));
}

}  // namespace

std::vector<std::string_view> api_route_keys() {
    std::vector<std::string_view> keys;
    for (std::span<const std::string_view> list :
         {std::span<const std::string_view>(kAcsOnlyKeys),
          std::span<const std::string_view>(kGraphOnlyKeys),
          std::span<const std::string_view>(kSharedKeys)}) {
        keys.insert(keys.end(), list.begin(), list.end());
    }
    return keys;
}

Result<std::shared_ptr<const ApiSettings>> load_api_settings(ConfigReader& reader,
                                                             ServiceRegistry* services,
                                                             const toml::table& table,
                                                             const std::string& context) {
    auto api = std::make_shared<ApiSettings>();
    auto provider = reader.get_string(table, "provider", context, false, "acs");
    if (!provider) return provider.error();
    if (*provider == "acs") {
        api->provider = ApiSettings::Provider::acs;
    } else if (*provider == "graph") {
        api->provider = ApiSettings::Provider::graph;
    } else {
        return reader.error_at(
            *table.get("provider"),
            fmt::format("{}.provider: \"{}\" is not \"acs\" or \"graph\"", context, *provider));
    }
    const bool graph = api->provider == ApiSettings::Provider::graph;
    // Keys of the other provider are mistakes, not options to ignore.
    for (std::string_view key : graph ? std::span<const std::string_view>(kAcsOnlyKeys)
                                      : std::span<const std::string_view>(kGraphOnlyKeys)) {
        if (const toml::node* node = table.get(key)) {
            return reader.error_at(*node, fmt::format("{}.{}: not a key of provider = \"{}\"",
                                                      context, key, *provider));
        }
    }
    if (graph) {
        if (auto loaded = load_graph_keys(reader, table, context, *api); !loaded) {
            return loaded.error();
        }
    } else {
        if (auto loaded = load_acs_keys(reader, table, context, *api); !loaded) {
            return loaded.error();
        }
    }
    HttpClientOptions http;
    auto ca_file = reader.get_string(table, "ca_file", context, false);
    if (!ca_file) return ca_file.error();
    http.ca_file = *ca_file;
    auto proxy = reader.get_string(table, "proxy", context, false);
    if (!proxy) return proxy.error();
    http.proxy = *proxy;
    auto connect_timeout = reader.get_integer(table, "connect_timeout", context, 10, 1, 120);
    if (!connect_timeout) return connect_timeout.error();
    http.connect_timeout = std::chrono::seconds(*connect_timeout);
    auto concurrency = reader.get_integer(table, "max_concurrency", context, 8, 1, 256);
    if (!concurrency) return concurrency.error();
    http.max_concurrency = static_cast<size_t>(*concurrency);
    api->http_options = http;
    if (services) api->http = services->http_client(http);

    if (table.get("tenant_id") || table.get("client_id")) {
        EntraCredentials credentials;
        for (auto [key, field] : {std::pair{"tenant_id", &credentials.tenant_id},
                                  std::pair{"client_id", &credentials.client_id}}) {
            auto value = reader.get_string(table, key, context, true);
            if (!value) return value.error();
            *field = *value;
        }
        auto authority = reader.get_string(table, "authority", context, false,
                                           "https://login.microsoftonline.com");
        if (!authority) return authority.error();
        credentials.authority = *authority;
        while (!credentials.authority.empty() && credentials.authority.back() == '/') {
            credentials.authority.pop_back();
        }
        bool has_secret = table.get("client_secret_file") != nullptr;
        bool has_certificate = table.get("client_certificate_file") != nullptr;
        if (has_secret == has_certificate) {
            return make_error(fmt::format("{}: Entra ID needs client_secret_file or "
                                          "client_certificate_file (one of them)",
                                          context),
                              reader.path(), static_cast<int>(table.source().begin.line));
        }
        if (has_secret) {
            auto secret = reader.read_secret_file(table, "client_secret_file", context);
            if (!secret) return secret.error();
            credentials.client_secret = *secret;
        } else {
            auto file = reader.secret_path(table, "client_certificate_file", context);
            if (!file) return file.error();
            const std::filesystem::path& certificate = *file;
            credentials.certificate_file = certificate.string();
            reader.warn_if_others_can_read(certificate, *table.get("client_certificate_file"),
                                           context, "client_certificate_file");
        }
        // The token is for the service the route talks to.
        auto scope = reader.get_string(table, "token_scope", context, false,
                                       graph ? api->graph.endpoint + "/.default"
                                             : "https://communication.azure.com//.default");
        if (!scope) return scope.error();
        credentials.scope = *scope;
        auto algorithm = reader.get_string(table, "assertion_algorithm", context, false, "PS256");
        if (!algorithm) return algorithm.error();
        auto parsed_algorithm = parse_client_assertion_algorithm(*algorithm);
        if (!parsed_algorithm) {
            return reader.error_at(*table.get("assertion_algorithm"),
                                   fmt::format("{}.assertion_algorithm: \"{}\" is not \"PS256\" "
                                               "or \"RS256\"",
                                               context, *algorithm));
        }
        credentials.assertion_algorithm = *parsed_algorithm;
        if (services) api->entra = services->token_provider(credentials, http);
        api->entra_credentials = std::move(credentials);
    }

    if (const toml::node* node = table.get("sender_map")) {
        auto map = load_sender_map(reader, *node, context, api->provider);
        if (!map) return map.error();
        api->sender_map = std::move(*map);
        if (const toml::node* by_sender = node->as_table()->get("sender")) {
            // MAIL FROM is whatever the client says.
            reader.warnings().push_back(fmt::format(
                "{}: {}.sender_map.sender: the envelope sender is chosen by the client, so any "
                "client that reaches this route can send as any mailbox listed there{}; tie "
                "MAIL FROM to a login in Postfix (reject_sender_login_mismatch) or map by "
                "cert_subject, auth or client_addr",
                reader.where(*by_sender), context,
                api->sender_map->refuse_unmapped ? " and get past unmapped = \"refuse\"" : ""));
        }
    }

    auto local = reader.get_string_list(table, "local_domains", context);
    if (!local) return local.error();
    api->local_domains = *local;

    auto on_failure = reader.get_policy(table, "on_failure", context, api->on_failure);
    if (!on_failure) return on_failure.error();
    api->on_failure = *on_failure;
    auto on_permanent =
        reader.get_policy(table, "on_permanent_failure", context, api->on_permanent_failure);
    if (!on_permanent) return on_permanent.error();
    api->on_permanent_failure = *on_permanent;
    auto on_oversize = reader.get_policy(table, "on_oversize", context, api->on_oversize);
    if (!on_oversize) return on_oversize.error();
    api->on_oversize = *on_oversize;
    auto on_ambiguous = reader.get_string(table, "on_ambiguous", context, false, "tempfail");
    if (!on_ambiguous) return on_ambiguous.error();
    if (*on_ambiguous == "tempfail") {
        api->on_ambiguous = AmbiguityPolicy::tempfail;
    } else if (*on_ambiguous == "hold") {
        api->on_ambiguous = AmbiguityPolicy::hold;
    } else if (*on_ambiguous == "assume-sent") {
        api->on_ambiguous = AmbiguityPolicy::assume_sent;
    } else {
        return reader.error_at(*table.get("on_ambiguous"),
                               fmt::format("{}.on_ambiguous: \"{}\" is not tempfail, hold or "
                                           "assume-sent",
                                           context, *on_ambiguous));
    }

    auto lookup = reader.get_string(table, "lookup_before_post", context, false, "auto");
    if (!lookup) return lookup.error();
    if (*lookup == "auto") {
        api->lookup_before_post = LookupBeforePost::automatic;
    } else if (*lookup == "always") {
        api->lookup_before_post = LookupBeforePost::always;
    } else if (*lookup == "own-attempts") {
        api->lookup_before_post = LookupBeforePost::own_attempts;
    } else {
        return reader.error_at(*table.get("lookup_before_post"),
                               fmt::format("{}.lookup_before_post: \"{}\" is not auto, always or "
                                           "own-attempts",
                                           context, *lookup));
    }

    auto budget = reader.get_integer(table, "time_budget", context, 60, 5, 280);
    if (!budget) return budget.error();
    api->time_budget = std::chrono::seconds(*budget);
    auto request_timeout = reader.get_integer(table, "request_timeout", context, 30, 1, 280);
    if (!request_timeout) return request_timeout.error();
    api->request_timeout = std::chrono::seconds(*request_timeout);
    auto attempts = reader.get_integer(table, "max_attempts", context, 4, 1, 20);
    if (!attempts) return attempts.error();
    api->max_attempts = static_cast<int>(*attempts);
    // Graph: at most its documented ~4 MB per request (a larger value would send what Graph
    // refuses with 413), and enough for a 3 MB attachment as JSON (4/3 of it).
    const bool graph_route = api->provider == ApiSettings::Provider::graph;
    auto max_bytes = reader.get_integer(
        table, "max_request_bytes", context, static_cast<int64_t>(api->max_request_bytes),
        graph_route ? 1'000'000 : 1024, graph_route ? 4'000'000 : int64_t{1} << 30);
    if (!max_bytes) return max_bytes.error();
    api->max_request_bytes = static_cast<size_t>(*max_bytes);
    auto threshold = reader.get_integer(table, "spool_threshold", context, 1024 * 1024, 0, 1 << 30);
    if (!threshold) return threshold.error();
    api->spool_threshold = static_cast<size_t>(*threshold);
    auto spool = reader.get_string(table, "spool_directory", context, false, "/var/tmp");
    if (!spool) return spool.error();
    api->spool_directory = *spool;
    if (auto quota = load_route_quota(reader, table, context, *api); !quota) return quota.error();
    return std::shared_ptr<const ApiSettings>(std::move(api));
}

}  // namespace paasmilter
