#include "paasmilter/services.hpp"

#include <algorithm>
#include <fstream>
#include <sstream>

#include <fmt/format.h>

#include "paasmilter/crypto.hpp"
#include "paasmilter/quota/local_store.hpp"
#include "paasmilter/quota/redis_store.hpp"

namespace paasmilter {

namespace {

// A file's content in a key: a renewed CA bundle or certificate makes a new instance.
std::string file_digest(const std::string& path) {
    if (path.empty()) return {};
    std::ifstream in(path, std::ios::binary);
    std::stringstream content;
    content << in.rdbuf();
    auto digest = sha256(content.str());
    return digest ? hex_encode(*digest) : std::string("unreadable");
}

std::string key_of(const HttpClientOptions& o) {
    return fmt::format("{}\n{}\n{}\n{}\n{}\n{}\n{}", o.ca_file, file_digest(o.ca_file), o.proxy,
                       o.connect_timeout.count(), o.max_concurrency, o.max_response_bytes,
                       o.user_agent);
}

std::string key_of(const EntraCredentials& c) {
    // The secret only as a digest: keys stay in memory, but never a second copy of a secret.
    auto secret = sha256(c.client_secret);
    return fmt::format("{}\n{}\n{}\n{}\n{}\n{}\n{}\n{}", c.authority, c.tenant_id, c.client_id,
                       c.scope, secret ? hex_encode(*secret) : std::string(), c.certificate_file,
                       file_digest(c.certificate_file), to_string(c.assertion_algorithm));
}

// The live instance under `key`, or a new one from `make`; forgets expired entries.
template <class T, class Make>
std::shared_ptr<T> reuse(std::map<std::string, std::weak_ptr<T>>& map, const std::string& key,
                         Make&& make) {
    for (auto it = map.begin(); it != map.end();) {
        it = it->second.expired() ? map.erase(it) : std::next(it);
    }
    if (auto found = map.find(key); found != map.end()) {
        if (auto live = found->second.lock()) return live;
    }
    std::shared_ptr<T> made = make();
    map[key] = made;
    return made;
}

std::string key_of(const QuotaSettings& q) {
    auto password = sha256(q.password);  // as for secrets above: a digest only
    return fmt::format("{}\n{}\n{}\n{}\n{}\n{}\n{}", q.store, q.host, q.port, q.database,
                       password ? hex_encode(*password) : std::string(), q.fleet_size,
                       q.key_prefix);
}

}  // namespace

std::shared_ptr<QuotaStore> ServiceRegistry::quota_store(const QuotaSettings& settings) {
    std::lock_guard lock(mutex_);
    return reuse(quota_stores_, key_of(settings), [&]() -> std::shared_ptr<QuotaStore> {
        if (settings.store.empty()) {
            return std::make_shared<LocalQuotaStore>(1.0 / std::max(1, settings.fleet_size));
        }
        return std::make_shared<RedisQuotaStore>(settings);
    });
}

std::shared_ptr<HttpClient> ServiceRegistry::http_client(const HttpClientOptions& options) {
    std::lock_guard lock(mutex_);
    return reuse(clients_, key_of(options), [&] { return std::make_shared<HttpClient>(options); });
}

std::shared_ptr<EntraTokenProvider> ServiceRegistry::token_provider(
    const EntraCredentials& credentials, const HttpClientOptions& options) {
    std::lock_guard lock(mutex_);
    std::shared_ptr<HttpClient> http =
        reuse(clients_, key_of(options), [&] { return std::make_shared<HttpClient>(options); });
    return reuse(tokens_, key_of(credentials) + "\n" + key_of(options),
                 [&] { return std::make_shared<EntraTokenProvider>(credentials, http); });
}

}  // namespace paasmilter
