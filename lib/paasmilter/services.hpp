// Long-lived services built from configuration data: HTTPS clients (their connection pools)
// and Entra ID token caches. Only the daemon builds them (`check` and `query` start none),
// and a reload gets back the very instances whose settings did not change, so connection
// pools and tokens survive it; instances no configuration uses any more go with the last
// configuration that did.
#pragma once

#include <map>
#include <memory>
#include <mutex>
#include <string>

#include "paasmilter/acs_auth.hpp"
#include "paasmilter/http_client.hpp"
#include "paasmilter/quota/quota.hpp"

namespace paasmilter {

class ServiceRegistry {
  public:
    std::shared_ptr<HttpClient> http_client(const HttpClientOptions& options);
    // One token cache per set of credentials (and HTTP settings it is fetched with).
    std::shared_ptr<EntraTokenProvider> token_provider(const EntraCredentials& credentials,
                                                       const HttpClientOptions& options);
    // The routes' quota buckets: in Redis when `settings.store` names it, else in this
    // process. The same settings get the same store back, so buckets survive a reload.
    std::shared_ptr<QuotaStore> quota_store(const QuotaSettings& settings);

  private:
    std::mutex mutex_;
    std::map<std::string, std::weak_ptr<HttpClient>> clients_;
    std::map<std::string, std::weak_ptr<EntraTokenProvider>> tokens_;
    std::map<std::string, std::weak_ptr<QuotaStore>> quota_stores_;
};

}  // namespace paasmilter
