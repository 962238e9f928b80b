// What this process knows about the requests it posted to a service lately:
// - whether it posted a request at all: when the service cannot be asked whether it has a
//   request (its status endpoint is down or unreachable), one this process never posted -- a
//   message's first attempt -- is certainly not at the service, and the failure policy
//   (relay, hold) may send it elsewhere; one it did post stays unresolved and tempfails;
// - the repeatability headers of a request whose last attempt ended without knowing whether
//   the service carried it out, so that a client's quick retry repeats that very request
//   (the service answers 409 while the original still runs, or replays its answer)
//   instead of posting a new one while the original may still complete;
// - which requests a transaction is delivering right now, so that a second transaction of
//   the same message (a client that gave up and resent) does not post it concurrently.
// Kept in memory: after a restart, or with several gateways sharing the clients, an earlier
// attempt is not known here (see the README).
#pragma once

#include <chrono>
#include <deque>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>

namespace paasmilter {

class PostedRequests {
  public:
    // At most `capacity` ids, each for at most `retention` (Postfix's maximal_queue_lifetime
    // is 5 days by default: a client retries no longer).
    explicit PostedRequests(size_t capacity = 500'000,
                            std::chrono::hours retention = std::chrono::hours(24 * 6));

    struct Repeatability {
        std::string request_id;
        std::chrono::system_clock::time_point first_sent;
    };

    // Called before the first post of a request in a transaction, and whenever it gets new
    // repeatability headers.
    void remember(const std::string& operation_id, const Repeatability& repeatability);
    // Whether the transaction's last attempt left the request's fate open.
    void set_uncertain(const std::string& operation_id, bool uncertain);
    // The repeatability headers of a request whose fate was left open, if any.
    std::optional<Repeatability> uncertain_repeatability(const std::string& operation_id);
    // True when this process posted it within the retention, or the record of that was
    // dropped for room (an unknown id is then treated as posted: the safe side).
    bool maybe_posted(const std::string& operation_id);

    // Marks the request as being delivered by one transaction; false if another one is.
    // Every begin() is paired with an end(), whatever it returned.
    bool begin(const std::string& operation_id);
    void end(const std::string& operation_id);

  private:
    struct Entry {
        std::chrono::steady_clock::time_point posted;
        Repeatability repeatability;
        bool uncertain = false;
    };
    void expire(std::chrono::steady_clock::time_point now);

    size_t capacity_;
    std::chrono::hours retention_;
    std::mutex mutex_;
    std::unordered_map<std::string, Entry> entries_;
    std::deque<std::pair<std::chrono::steady_clock::time_point, std::string>> order_;
    std::unordered_map<std::string, int> delivering_;
    bool dropped_any_ = false;
};

}  // namespace paasmilter
