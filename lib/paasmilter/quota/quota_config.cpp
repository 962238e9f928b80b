#include "paasmilter/quota/quota_config.hpp"

#include <algorithm>

#include <fmt/format.h>

#include "paasmilter/ip.hpp"
#include "paasmilter/quota/redis_store.hpp"

namespace paasmilter {

namespace {

struct BucketKey {
    std::string_view key;   // in the route's table
    std::string_view name;  // the bucket's name in logs, metrics and Redis keys
    std::chrono::milliseconds window;
    bool per_recipient;
};
constexpr BucketKey kBucketKeys[] = {
    {"quota_messages_per_minute", "messages_per_minute", std::chrono::minutes(1), false},
    {"quota_messages_per_hour", "messages_per_hour", std::chrono::hours(1), false},
    {"quota_recipients_per_day", "recipients_per_day", std::chrono::hours(24), true},
};

bool is_loopback(std::string_view host) {
    if (host == "localhost") return true;
    auto address = parse_ip_address(host);
    if (!address) return false;
    return address->family == IpFamily::v4 ? address->bytes[0] == 127
                                           : *address == *parse_ip_address("::1");
}

}  // namespace

Result<void> load_route_quota(ConfigReader& reader, const toml::table& table,
                              const std::string& context, ApiSettings& api) {
    for (const BucketKey& key : kBucketKeys) {
        if (!table.get(key.key)) continue;
        auto capacity = reader.get_integer(table, key.key, context, 0, 1, 1'000'000'000);
        if (!capacity) return capacity.error();
        api.quota.push_back(
            {std::string(key.name), static_cast<double>(*capacity), key.window, key.per_recipient});
    }
    auto policy = reader.get_policy(table, "on_quota", context, FailurePolicy{});
    if (!policy) return policy.error();
    if (policy->kind == FailurePolicy::Kind::reject) {
        // A quota is the gateway's own limit, not the service's verdict on the message.
        return reader.error_at(*table.get("on_quota"),
                               fmt::format("{}.on_quota: \"reject\" is not tempfail, hold or "
                                           "relay:ROUTE",
                                           context));
    }
    api.on_quota = *policy;
    if (table.get("on_quota") && api.quota.empty()) {
        reader.warnings().push_back(
            fmt::format("{}: {}.on_quota: the route has no quota_* bucket, so it never applies",
                        reader.where(*table.get("on_quota")), context));
    }
    return {};
}

namespace {

// "redis://***@host:6379" for "redis://user:pw@host:6379": a refused URL is quoted in the
// error, and its password must not be.
std::string without_userinfo(std::string_view url) {
    const size_t scheme = url.find("://");
    if (scheme == std::string_view::npos) return std::string(url);
    const size_t start = scheme + 3;
    const size_t at = url.substr(start, url.find('/', start) - start).rfind('@');
    if (at == std::string_view::npos) return std::string(url);
    return std::string(url.substr(0, start)) + "***" + std::string(url.substr(start + at));
}

}  // namespace

Result<QuotaSettings> load_quota_settings(ConfigReader& reader, const toml::table& table) {
    QuotaSettings settings;
    auto store = reader.get_string(table, "store", "quota", false);
    if (!store) return store.error();
    settings.store = *store;
    if (!settings.store.empty()) {
        auto address = parse_redis_url(settings.store);
        if (!address) {
            return reader.error_at(
                *table.get("store"),
                fmt::format("quota.store: \"{}\" {}", without_userinfo(settings.store),
                            address.error().message));
        }
        settings.host = address->host;
        settings.port = address->port;
        settings.database = address->database;
    }
    if (table.get("password_file")) {
        if (settings.store.empty()) {
            return reader.error_at(*table.get("password_file"),
                                   "quota.password_file: only with quota.store");
        }
        auto password = reader.read_secret_file(table, "password_file", "quota");
        if (!password) return password.error();
        settings.password = *password;
    }
    if (!settings.store.empty() && settings.password.empty() && !is_loopback(settings.host)) {
        reader.warnings().push_back(fmt::format(
            "{}: quota.store: {} is not a loopback address and has no password_file: anyone "
            "who reaches it can empty or fill your routes' quota buckets; give Redis a "
            "password (requirepass) and keep it on a private network",
            reader.where(*table.get("store")), settings.host));
    }
    auto fleet = reader.get_integer(table, "fleet_size", "quota", 1, 1, 1000);
    if (!fleet) return fleet.error();
    settings.fleet_size = static_cast<int>(*fleet);
    auto prefix = reader.get_string(table, "key_prefix", "quota", false, "paas-milter:");
    if (!prefix) return prefix.error();
    if (std::any_of(prefix->begin(), prefix->end(),
                    [](unsigned char c) { return c <= ' ' || c >= 127 || c == '{' || c == '}'; })) {
        return reader.error_at(*table.get("key_prefix"),
                               fmt::format("quota.key_prefix: \"{}\" may hold printable ASCII "
                                           "only, without spaces, '{{' and '}}'",
                                           *prefix));
    }
    settings.key_prefix = *prefix;
    return settings;
}

}  // namespace paasmilter
