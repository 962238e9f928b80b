// Token buckets with continuous refill: `capacity` tokens per `window`, refilled at
// capacity/window per millisecond, never above capacity. A route's quota is a few of them
// (messages per minute, per hour, recipients per day); a message takes from all of them at
// once or from none. Plain arithmetic on a caller's clock, so it is tested without waiting;
// the Redis store runs the same arithmetic in its script (redis_store.cpp).
#pragma once

#include <chrono>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace paasmilter {

// One bucket of a route, as configured.
struct BucketSpec {
    std::string name;  // "messages_per_minute", "messages_per_hour", "recipients_per_day"
    double capacity = 0;
    std::chrono::milliseconds window{0};
    bool per_recipient = false;  // takes one token per remote recipient, else one per message
};

// The amounts a message takes from each bucket: 1 from a message bucket, its remote
// recipients from a recipient bucket.
std::vector<double> quota_amounts(std::span<const BucketSpec> buckets, size_t recipients);

// A bucket's state: its level when last updated (milliseconds on the caller's clock).
class TokenBucket {
  public:
    TokenBucket(double capacity, std::chrono::milliseconds window, int64_t now_ms)
        : capacity_(capacity), window_ms_(window.count()), level_(capacity), updated_ms_(now_ms) {}

    // The level at `now_ms`, refilled since the last update.
    double level(int64_t now_ms) const;
    double capacity() const { return capacity_; }
    // A new size (a reload): the level keeps its tokens, at most the new capacity.
    void resize(double capacity, std::chrono::milliseconds window, int64_t now_ms);
    // Takes `amount`; the level may not go below 0 (a debit of more than is left empties it).
    void take(double amount, int64_t now_ms);
    // Empties the bucket: it refills from 0.
    void drain(int64_t now_ms);

  private:
    void refill(int64_t now_ms);

    double capacity_;
    int64_t window_ms_;
    double level_;
    int64_t updated_ms_;
};

// All or nothing: when every bucket holds its amount, takes it from each and returns true;
// otherwise takes nothing and returns false. `short_of` receives the indexes of the buckets
// that held too little.
bool take_all(std::span<TokenBucket* const> buckets, std::span<const double> amounts,
              int64_t now_ms, std::vector<size_t>* short_of = nullptr);

// The indexes of the buckets whose level is below the amount a take needs from them.
std::vector<size_t> buckets_short_of(std::span<const double> levels,
                                     std::span<const double> amounts);

}  // namespace paasmilter
