// The buckets in this process: one mutex, a map from route and bucket to its state. Holds
// `share` of each configured capacity (1/fleet_size when gateways share one PaaS quota
// without a shared store, or while it is unreachable).
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <string>

#include "paasmilter/quota/quota.hpp"

namespace paasmilter {

class LocalQuotaStore final : public QuotaStore {
  public:
    // Milliseconds on a monotonic clock; tests pass their own.
    using Clock = std::function<int64_t()>;
    static int64_t steady_now_ms();

    explicit LocalQuotaStore(double share = 1.0, Clock clock = steady_now_ms);

    QuotaTake take(std::string_view route, std::span<const BucketSpec> buckets,
                   std::span<const double> amounts) override;
    void drain(std::string_view route, std::span<const BucketSpec> buckets,
               std::chrono::milliseconds block_for) override;
    std::string name() const override;

    // Takes amounts without asking (down to 0 at most): what this gateway took from the
    // shared store also leaves its local share, so a failover does not start from a full
    // share.
    void debit(std::string_view route, std::span<const BucketSpec> buckets,
               std::span<const double> amounts);
    // The levels now, without taking.
    QuotaTake peek(std::string_view route, std::span<const BucketSpec> buckets);
    double share() const { return share_; }

  private:
    struct RouteState {
        std::map<std::string, TokenBucket, std::less<>> buckets;
        int64_t blocked_until_ms = 0;
    };
    // The route's buckets, made or resized to `specs` (times share_); caller holds mutex_.
    std::vector<TokenBucket*> buckets_of(RouteState& route, std::span<const BucketSpec> specs,
                                         int64_t now_ms);
    QuotaTake report(const std::vector<TokenBucket*>& buckets, const RouteState& route,
                     int64_t now_ms) const;

    const double share_;
    const Clock clock_;
    std::mutex mutex_;
    std::map<std::string, RouteState, std::less<>> routes_;
};

}  // namespace paasmilter
