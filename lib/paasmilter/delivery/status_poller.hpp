// After the service's 202 the message still has to be delivered: ask for each operation's
// final status in the background (never delaying the SMTP reply) and report it with the
// Postfix queue id, so an operator sees mail that failed after it left the gateway.
// Bounded: at most `max_pending` operations watched, `max_polls` polls each, `max_age` after
// the 202; the service's retry-after is honoured. `workers` threads poll concurrently, so
// the rate of polls is about workers / the service's latency and one slow answer delays no
// other operation's poll by more than that; the poller's requests never take a slot of a
// route's max_concurrency, so it cannot slow the SMTP replies.
#pragma once

#include <chrono>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "paasmilter/config.hpp"
#include "paasmilter/http_client.hpp"

namespace paasmilter {

struct FinalStatus {
    std::string queue_id;
    std::string operation_id;
    // "Succeeded", "Failed", "Canceled" from the service; "Unknown" when it gave no final
    // answer within the bounds (the detail says why).
    std::string status;
    std::string detail;  // the service's error for Failed, or why polling stopped
    int polls = 0;
};

class StatusPoller {
  public:
    struct Options {
        size_t max_pending = 10'000;
        int max_polls = 6;
        std::chrono::milliseconds first_delay{5'000};
        std::chrono::milliseconds max_delay{120'000};
        std::chrono::milliseconds max_age{600'000};
        std::chrono::milliseconds request_timeout{10'000};
        // At 2–3 polls an operation and 50 ms a poll, 8 workers keep up with a sustained
        // 50+ messages/s; the default quotas of ACS allow far fewer.
        int workers = 8;
    };
    // GETs an operation's status: the service-specific part (URL, authentication).
    using Fetch = std::function<Result<HttpResponse>(const std::string& operation_id,
                                                     std::chrono::milliseconds timeout)>;
    using Report = std::function<void(const FinalStatus&)>;

    // `report` defaults to a log line per operation.
    explicit StatusPoller(Options options, Report report = {});
    ~StatusPoller();  // stops polling; logs how many operations were left unpolled
    StatusPoller(const StatusPoller&) = delete;
    StatusPoller& operator=(const StatusPoller&) = delete;

    // False (and nothing watched) when max_pending operations are already being watched.
    bool watch(std::string queue_id, std::string operation_id, Fetch fetch);
    size_t pending() const;

  private:
    struct Job;
    // For std::push_heap/pop_heap: the front of jobs_ is the job due first.
    static bool due_later(const std::unique_ptr<Job>& a, const std::unique_ptr<Job>& b);
    void loop();
    void poll(Job& job);

    Options options_;
    Report report_;
    mutable std::mutex mutex_;
    std::condition_variable wake_;
    // A min-heap on each job's next poll; jobs being polled are out of it, counted here.
    std::vector<std::unique_ptr<Job>> jobs_;
    size_t in_flight_ = 0;
    bool stopping_ = false;
    std::vector<std::thread> workers_;  // last: started once the fields they use exist
};

// The Fetch for an ACS route: GET {endpoint}/emails/operations/{id}, authenticated as the
// route's requests are.
StatusPoller::Fetch acs_status_fetch(std::shared_ptr<const ApiSettings> api);

}  // namespace paasmilter
