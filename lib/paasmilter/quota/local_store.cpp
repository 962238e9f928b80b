#include "paasmilter/quota/local_store.hpp"

#include <algorithm>
#include <cmath>

#include <fmt/format.h>

namespace paasmilter {

int64_t LocalQuotaStore::steady_now_ms() {
    return std::chrono::duration_cast<std::chrono::milliseconds>(
               std::chrono::steady_clock::now().time_since_epoch())
        .count();
}

LocalQuotaStore::LocalQuotaStore(double share, Clock clock)
    : share_(share > 0 && share <= 1 ? share : 1.0), clock_(std::move(clock)) {}

std::string LocalQuotaStore::name() const {
    if (share_ >= 1.0) return "local";
    return fmt::format("local share 1/{}", std::lround(1.0 / share_));
}

std::vector<TokenBucket*> LocalQuotaStore::buckets_of(RouteState& route,
                                                      std::span<const BucketSpec> specs,
                                                      int64_t now_ms) {
    std::vector<TokenBucket*> out;
    out.reserve(specs.size());
    for (const BucketSpec& spec : specs) {
        const double capacity = spec.capacity * share_;
        auto it = route.buckets.find(spec.name);
        if (it == route.buckets.end()) {
            it = route.buckets.emplace(spec.name, TokenBucket(capacity, spec.window, now_ms)).first;
        } else {
            // A reload may have changed the size or the window.
            it->second.resize(capacity, spec.window, now_ms);
        }
        out.push_back(&it->second);
    }
    return out;
}

QuotaTake LocalQuotaStore::report(const std::vector<TokenBucket*>& buckets, const RouteState& route,
                                  int64_t now_ms) const {
    QuotaTake out;
    out.store = name();
    for (const TokenBucket* bucket : buckets) {
        out.levels.push_back(bucket->level(now_ms));
        out.capacities.push_back(bucket->capacity());
    }
    if (route.blocked_until_ms > now_ms) {
        out.blocked = std::chrono::milliseconds(route.blocked_until_ms - now_ms);
    }
    return out;
}

QuotaTake LocalQuotaStore::take(std::string_view route_name, std::span<const BucketSpec> specs,
                                std::span<const double> amounts) {
    const int64_t now = clock_();
    std::lock_guard lock(mutex_);
    RouteState& route = routes_[std::string(route_name)];
    std::vector<TokenBucket*> buckets = buckets_of(route, specs, now);
    const bool granted = route.blocked_until_ms <= now && take_all(buckets, amounts, now);
    QuotaTake out = report(buckets, route, now);
    out.granted = granted;
    if (!granted) out.short_of = buckets_short_of(out.levels, amounts);
    return out;
}

void LocalQuotaStore::drain(std::string_view route_name, std::span<const BucketSpec> specs,
                            std::chrono::milliseconds block_for) {
    const int64_t now = clock_();
    std::lock_guard lock(mutex_);
    RouteState& route = routes_[std::string(route_name)];
    for (TokenBucket* bucket : buckets_of(route, specs, now)) bucket->drain(now);
    route.blocked_until_ms = std::max(route.blocked_until_ms, now + block_for.count());
}

void LocalQuotaStore::debit(std::string_view route_name, std::span<const BucketSpec> specs,
                            std::span<const double> amounts) {
    const int64_t now = clock_();
    std::lock_guard lock(mutex_);
    RouteState& route = routes_[std::string(route_name)];
    std::vector<TokenBucket*> buckets = buckets_of(route, specs, now);
    for (size_t i = 0; i < buckets.size() && i < amounts.size(); ++i) {
        buckets[i]->take(amounts[i], now);
    }
}

QuotaTake LocalQuotaStore::peek(std::string_view route_name, std::span<const BucketSpec> specs) {
    const int64_t now = clock_();
    std::lock_guard lock(mutex_);
    RouteState& route = routes_[std::string(route_name)];
    return report(buckets_of(route, specs, now), route, now);
}

}  // namespace paasmilter
