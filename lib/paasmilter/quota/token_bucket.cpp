#include "paasmilter/quota/token_bucket.hpp"

#include <algorithm>

namespace paasmilter {

std::vector<double> quota_amounts(std::span<const BucketSpec> buckets, size_t recipients) {
    std::vector<double> amounts;
    amounts.reserve(buckets.size());
    for (const BucketSpec& bucket : buckets) {
        amounts.push_back(bucket.per_recipient ? static_cast<double>(recipients) : 1.0);
    }
    return amounts;
}

double TokenBucket::level(int64_t now_ms) const {
    if (now_ms <= updated_ms_ || window_ms_ <= 0) return std::min(level_, capacity_);
    const double refill =
        static_cast<double>(now_ms - updated_ms_) * capacity_ / static_cast<double>(window_ms_);
    return std::min(capacity_, level_ + refill);
}

void TokenBucket::refill(int64_t now_ms) {
    level_ = level(now_ms);
    // A clock that went back leaves the timestamp alone, so no refill is counted twice.
    updated_ms_ = std::max(updated_ms_, now_ms);
}

void TokenBucket::resize(double capacity, std::chrono::milliseconds window, int64_t now_ms) {
    refill(now_ms);
    capacity_ = capacity;
    window_ms_ = window.count();
    level_ = std::min(level_, capacity_);
}

void TokenBucket::take(double amount, int64_t now_ms) {
    refill(now_ms);
    level_ = std::max(0.0, level_ - amount);
}

void TokenBucket::drain(int64_t now_ms) {
    refill(now_ms);
    level_ = 0;
}

std::vector<size_t> buckets_short_of(std::span<const double> levels,
                                     std::span<const double> amounts) {
    std::vector<size_t> out;
    for (size_t i = 0; i < levels.size() && i < amounts.size(); ++i) {
        if (levels[i] < amounts[i]) out.push_back(i);
    }
    return out;
}

bool take_all(std::span<TokenBucket* const> buckets, std::span<const double> amounts,
              int64_t now_ms, std::vector<size_t>* short_of) {
    bool enough = true;
    for (size_t i = 0; i < buckets.size() && i < amounts.size(); ++i) {
        if (buckets[i]->level(now_ms) < amounts[i]) {
            enough = false;
            if (short_of) short_of->push_back(i);
        }
    }
    if (!enough) return false;
    for (size_t i = 0; i < buckets.size() && i < amounts.size(); ++i) {
        buckets[i]->take(amounts[i], now_ms);
    }
    return true;
}

}  // namespace paasmilter
