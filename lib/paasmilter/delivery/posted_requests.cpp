#include "paasmilter/delivery/posted_requests.hpp"

namespace paasmilter {

PostedRequests::PostedRequests(size_t capacity, std::chrono::hours retention)
    : capacity_(capacity), retention_(retention) {}

void PostedRequests::expire(std::chrono::steady_clock::time_point now) {
    while (!order_.empty() &&
           (order_.front().first + retention_ < now || order_.size() > capacity_)) {
        if (order_.size() > capacity_) dropped_any_ = true;
        auto found = entries_.find(order_.front().second);
        // Only the newest order entry of an id owns its record.
        if (found != entries_.end() && found->second.posted == order_.front().first) {
            entries_.erase(found);
        }
        order_.pop_front();
    }
}

void PostedRequests::remember(const std::string& operation_id, const Repeatability& repeatability) {
    auto now = std::chrono::steady_clock::now();
    std::lock_guard lock(mutex_);
    entries_[operation_id] = Entry{now, repeatability, false};
    order_.emplace_back(now, operation_id);
    expire(now);
}

void PostedRequests::set_uncertain(const std::string& operation_id, bool uncertain) {
    std::lock_guard lock(mutex_);
    if (auto found = entries_.find(operation_id); found != entries_.end()) {
        found->second.uncertain = uncertain;
    }
}

std::optional<PostedRequests::Repeatability> PostedRequests::uncertain_repeatability(
    const std::string& operation_id) {
    std::lock_guard lock(mutex_);
    auto found = entries_.find(operation_id);
    if (found == entries_.end() || !found->second.uncertain) return std::nullopt;
    return found->second.repeatability;
}

bool PostedRequests::maybe_posted(const std::string& operation_id) {
    std::lock_guard lock(mutex_);
    expire(std::chrono::steady_clock::now());
    return dropped_any_ || entries_.count(operation_id) > 0;
}

bool PostedRequests::begin(const std::string& operation_id) {
    std::lock_guard lock(mutex_);
    return ++delivering_[operation_id] == 1;
}

void PostedRequests::end(const std::string& operation_id) {
    std::lock_guard lock(mutex_);
    if (auto found = delivering_.find(operation_id);
        found != delivering_.end() && --found->second <= 0) {
        delivering_.erase(found);
    }
}

}  // namespace paasmilter
