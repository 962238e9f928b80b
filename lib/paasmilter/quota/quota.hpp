// Per-route quotas: token buckets sized to the PaaS quota (ACS: 30 messages a minute and 100
// an hour on a new custom domain; Graph: 30 a minute and 10,000 recipients a day per
// mailbox). A message takes its tokens before any API call; a route whose bucket is empty
// does not call the API and takes its `on_quota` policy instead. The buckets live in a
// QuotaStore: in this process (LocalQuotaStore), or in Redis, shared by every gateway of a
// fleet (RedisQuotaStore, which falls back to a local share when Redis is unreachable).
// A store is a long-lived service beside the configuration (see services.hpp): its buckets
// survive reloads.
#pragma once

#include <chrono>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "paasmilter/quota/token_bucket.hpp"

namespace paasmilter {

// [quota]: where the buckets live.
struct QuotaSettings {
    // "redis://HOST:PORT[/DB]"; empty: in this process only.
    std::string store;
    std::string host;  // parsed from `store`
    int port = 6379;
    int database = 0;
    std::string password;  // from password_file; never logged
    // Gateways sharing the PaaS quota: without the shared store (none configured, or
    // unreachable) each keeps capacity/fleet_size of every bucket.
    int fleet_size = 1;
    std::string key_prefix = "paas-milter:";
};

// What a take found and did.
struct QuotaTake {
    bool granted = false;
    // Per bucket: the level after the take (when granted) or now (when not), and the
    // capacity the answering store counts with (a local share counts capacity/fleet_size).
    std::vector<double> levels;
    std::vector<double> capacities;
    // Indexes of the buckets that held less than the message needs.
    std::vector<size_t> short_of;
    // Time left of a service's throttling (a 429's Retry-After): nothing is taken meanwhile.
    std::chrono::milliseconds blocked{0};
    // Who answered: "redis://127.0.0.1:6379/0", "local", or "local share 1/3 (redis://...
    // unreachable)".
    std::string store;
    // A shared store was configured but could not answer: the local share did.
    bool local_fallback = false;
};

class QuotaStore {
  public:
    virtual ~QuotaStore() = default;
    // Takes amounts[i] tokens from bucket i of `route`, from every bucket or from none.
    virtual QuotaTake take(std::string_view route, std::span<const BucketSpec> buckets,
                           std::span<const double> amounts) = 0;
    // The service throttled the route (HTTP 429): every bucket is emptied, and for
    // `block_for` (its Retry-After) nothing is taken at all.
    virtual void drain(std::string_view route, std::span<const BucketSpec> buckets,
                       std::chrono::milliseconds block_for) = 0;
    // "local", "local share 1/3", "redis://127.0.0.1:6379/0".
    virtual std::string name() const = 0;
};

}  // namespace paasmilter
