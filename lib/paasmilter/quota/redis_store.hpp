// The buckets in Redis, shared by every gateway of a fleet ([quota] store = "redis://...").
// Each take is one Lua script (EVALSHA, EVAL when Redis does not know it yet) that refills
// every bucket of the take from Redis' own clock (TIME), checks them all and takes from all
// or none: atomic on the server, never a read-modify-write from the client. A bucket is a
// hash {level, ts} under PREFIX{ROUTE}:BUCKET that expires after its window (by then it
// would be full again anyway); a 429's Retry-After is PREFIX{ROUTE}:throttled with that TTL.
//
// One connection (hiredis), 200 ms to connect and per command. When Redis cannot be
// reached, or answers with an error, this gateway counts on its own share of each bucket
// (capacity/fleet_size, a LocalQuotaStore), says so once in the log and in the metric
// paas_milter_quota_store_up, and tries Redis again after 1, 2, 4 ... up to 30 s. What it
// takes from Redis is also debited from its local share, so a failover starts from what
// this gateway has used, not from a full share.
#pragma once

#include <atomic>
#include <chrono>
#include <memory>
#include <mutex>
#include <optional>
#include <string>

#include "paasmilter/quota/local_store.hpp"
#include "paasmilter/quota/quota.hpp"
#include "paasmilter/result.hpp"

namespace paasmilter {

struct RedisAddress {
    std::string host;  // without brackets for IPv6
    int port = 6379;
    int database = 0;
};
// "redis://HOST[:PORT][/DB]" (an IPv6 host in brackets). No password in the URL (it would
// end up in logs): password_file holds it. No TLS (rediss://).
Result<RedisAddress> parse_redis_url(std::string_view url);
// "redis://HOST:PORT/DB", as logs name the store.
std::string redis_url(const QuotaSettings& settings);

class RedisConnection;

class RedisQuotaStore final : public QuotaStore {
  public:
    struct Options {
        std::chrono::milliseconds timeout{200};  // connect, and each command
        std::chrono::milliseconds first_backoff{1000};
        std::chrono::milliseconds max_backoff{30000};
        LocalQuotaStore::Clock clock = LocalQuotaStore::steady_now_ms;
    };

    // Connects at once (and logs whether Redis is reachable).
    explicit RedisQuotaStore(QuotaSettings settings);
    RedisQuotaStore(QuotaSettings settings, Options options);
    ~RedisQuotaStore() override;
    RedisQuotaStore(const RedisQuotaStore&) = delete;
    RedisQuotaStore& operator=(const RedisQuotaStore&) = delete;

    QuotaTake take(std::string_view route, std::span<const BucketSpec> buckets,
                   std::span<const double> amounts) override;
    void drain(std::string_view route, std::span<const BucketSpec> buckets,
               std::chrono::milliseconds block_for) override;
    std::string name() const override { return url_; }

    // True while Redis answers (the last attempt reached it).
    bool shared() const;

  private:
    enum class Mode { take, drain, peek };
    std::optional<QuotaTake> run(Mode mode, std::string_view route,
                                 std::span<const BucketSpec> buckets,
                                 std::span<const double> amounts, std::chrono::milliseconds block);
    void went_down(const std::string& why);  // caller holds mutex_
    void came_up();                          // caller holds mutex_

    const QuotaSettings settings_;
    const Options options_;
    const std::string url_;
    LocalQuotaStore fallback_;
    std::timed_mutex mutex_;  // the connection and the state below
    std::unique_ptr<RedisConnection> connection_;
    std::atomic<bool> up_{false};  // read without mutex_ to decide whether to wait for it
    bool reported_ = false;        // a state was logged
    int64_t next_attempt_ms_ = 0;
    std::chrono::milliseconds backoff_;
};

// The levels in the shared store now, read-only (paas-milter query): its own connection,
// an error when Redis cannot be reached.
Result<QuotaTake> peek_shared_quota(const QuotaSettings& settings, std::string_view route,
                                    std::span<const BucketSpec> buckets,
                                    std::chrono::milliseconds timeout);

}  // namespace paasmilter
