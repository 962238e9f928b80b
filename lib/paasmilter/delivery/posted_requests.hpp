// Which requests this process has posted to a service lately. When the service cannot be
// asked whether it has a request (its status endpoint is down or unreachable), a request
// this process never posted -- a message's first attempt -- is certainly not at the service,
// and the failure policy (relay, hold) may send it elsewhere; one it did post stays
// unresolved and the message tempfails. Kept in memory: after a restart, or with several
// gateways sharing the clients, an earlier attempt is not known here (see the README).
#pragma once

#include <chrono>
#include <deque>
#include <mutex>
#include <string>
#include <unordered_set>

namespace paasmilter {

class PostedRequests {
  public:
    // At most `capacity` ids, each for at most `retention` (Postfix's maximal_queue_lifetime
    // is 5 days by default: a client retries no longer).
    explicit PostedRequests(size_t capacity = 500'000,
                            std::chrono::hours retention = std::chrono::hours(24 * 6));

    // Called before the first post of a request.
    void remember(const std::string& operation_id);
    // True when this process posted it within the retention, or the record of that was
    // dropped for room (an unknown id is then treated as posted: the safe side).
    bool maybe_posted(const std::string& operation_id);

  private:
    void expire(std::chrono::steady_clock::time_point now);

    size_t capacity_;
    std::chrono::hours retention_;
    std::mutex mutex_;
    std::unordered_set<std::string> ids_;
    std::deque<std::pair<std::chrono::steady_clock::time_point, std::string>> order_;
    bool dropped_any_ = false;
};

}  // namespace paasmilter
