#include "paasmilter/delivery/posted_requests.hpp"

namespace paasmilter {

PostedRequests::PostedRequests(size_t capacity, std::chrono::hours retention)
    : capacity_(capacity), retention_(retention) {}

void PostedRequests::expire(std::chrono::steady_clock::time_point now) {
    while (!order_.empty() &&
           (order_.front().first + retention_ < now || order_.size() > capacity_)) {
        if (order_.size() > capacity_) dropped_any_ = true;
        ids_.erase(order_.front().second);
        order_.pop_front();
    }
}

void PostedRequests::remember(const std::string& operation_id) {
    auto now = std::chrono::steady_clock::now();
    std::lock_guard lock(mutex_);
    if (ids_.insert(operation_id).second) order_.emplace_back(now, operation_id);
    expire(now);
}

bool PostedRequests::maybe_posted(const std::string& operation_id) {
    std::lock_guard lock(mutex_);
    expire(std::chrono::steady_clock::now());
    return dropped_any_ || ids_.count(operation_id) > 0;
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
