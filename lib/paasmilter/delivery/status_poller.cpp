#include "paasmilter/delivery/status_poller.hpp"

#include <algorithm>

#include "paasmilter/api_delivery.hpp"
#include "paasmilter/log.hpp"
#include "paasmilter/metrics.hpp"

namespace paasmilter {

using namespace std::chrono;
using Steady = steady_clock;

struct StatusPoller::Job {
    std::string queue_id;
    std::string operation_id;
    Fetch fetch;
    Steady::time_point started;
    Steady::time_point next;
    milliseconds delay;
    int polls = 0;
};

namespace {

void log_final(const FinalStatus& s) {
    metrics().final_status("acs", s.status);  // only ACS has operations to poll
    std::string line = fmt::format("api-status operation_id={}, status={}, polls={}",
                                   s.operation_id, s.status, s.polls);
    if (!s.detail.empty()) line += ", detail=" + sanitize_for_log(s.detail, 300);
    log_for(s.status == "Succeeded" ? LogLevel::info : LogLevel::warning, s.queue_id, line,
            {{"operation_id", s.operation_id}, {"status", s.status}});
}

bool terminal(std::string_view status) {
    return status == "Succeeded" || status == "Failed" || status == "Canceled";
}

}  // namespace

bool StatusPoller::due_later(const std::unique_ptr<Job>& a, const std::unique_ptr<Job>& b) {
    return a->next > b->next;
}

StatusPoller::StatusPoller(Options options, Report report)
    : options_(options), report_(report ? std::move(report) : Report(log_final)) {
    for (int i = 0; i < std::max(1, options_.workers); ++i) {
        workers_.emplace_back([this] { loop(); });
    }
}

StatusPoller::~StatusPoller() {
    {
        std::lock_guard lock(mutex_);
        stopping_ = true;
    }
    wake_.notify_all();
    for (auto& worker : workers_) worker.join();
    if (!jobs_.empty()) {
        log_warning("shutdown: the final status of {} accepted operation(s) was not polled",
                    jobs_.size());
    }
}

bool StatusPoller::watch(std::string queue_id, std::string operation_id, Fetch fetch) {
    auto now = Steady::now();
    auto job =
        std::make_unique<Job>(Job{std::move(queue_id), std::move(operation_id), std::move(fetch),
                                  now, now + options_.first_delay, options_.first_delay, 0});
    {
        std::lock_guard lock(mutex_);
        if (stopping_ || jobs_.size() + in_flight_ >= options_.max_pending) return false;
        jobs_.push_back(std::move(job));
        std::push_heap(jobs_.begin(), jobs_.end(), due_later);
    }
    // One worker is enough: a new job is due after first_delay, which a waiting worker
    // must learn when it is the earliest.
    wake_.notify_one();
    return true;
}

size_t StatusPoller::pending() const {
    std::lock_guard lock(mutex_);
    return jobs_.size() + in_flight_;
}

void StatusPoller::loop() {
    std::unique_lock lock(mutex_);
    while (!stopping_) {
        if (jobs_.empty()) {
            wake_.wait(lock);
            continue;
        }
        if (auto next = jobs_.front()->next; next > Steady::now()) {
            wake_.wait_until(lock, next);
            continue;
        }
        // Poll outside the lock: watch() must never wait for the network.
        std::pop_heap(jobs_.begin(), jobs_.end(), due_later);
        std::unique_ptr<Job> job = std::move(jobs_.back());
        jobs_.pop_back();
        ++in_flight_;
        // Another job may be due already: hand it to an idle worker.
        if (!jobs_.empty()) wake_.notify_one();
        lock.unlock();
        poll(*job);
        lock.lock();
        --in_flight_;
        if (job->next != Steady::time_point::max()) {
            jobs_.push_back(std::move(job));
            std::push_heap(jobs_.begin(), jobs_.end(), due_later);
            wake_.notify_one();
        }
    }
}

void StatusPoller::poll(Job& job) {
    ++job.polls;
    auto response = job.fetch(job.operation_id, options_.request_timeout);
    auto finish = [&](std::string status, std::string detail) {
        report_({job.queue_id, job.operation_id, std::move(status), std::move(detail), job.polls});
        job.next = Steady::time_point::max();
    };
    milliseconds wait = job.delay;
    std::string last;
    if (!response) {
        last = response.error().message;
    } else if (response->status == 200) {
        auto status = parse_operation_status(response->body);
        if (!status) {
            last = "unreadable status answer";
        } else if (terminal(status->status)) {
            return finish(status->status, status->error);
        } else {
            last = "still " + status->status;
        }
    } else if (response->status == 404) {
        return finish("Unknown", "the service has no such operation (HTTP 404)");
    } else {
        last = fmt::format("HTTP {}", response->status);
    }
    if (response) wait = std::max(wait, retry_after_or(*response, wait, system_clock::now()));
    auto now = Steady::now();
    if (job.polls >= options_.max_polls || now + wait > job.started + options_.max_age) {
        return finish("Unknown", "gave up polling: " + last);
    }
    job.next = now + wait;
    job.delay = std::min(job.delay * 2, options_.max_delay);
}

StatusPoller::Fetch acs_status_fetch(std::shared_ptr<const ApiSettings> api) {
    return [api](const std::string& operation_id, milliseconds timeout) -> Result<HttpResponse> {
        HttpRequest request;
        request.method = "GET";
        request.url = acs_operation_url(*api, operation_id);
        if (auto r = authorize_acs_request(*api, request, system_clock::now(), timeout); !r) {
            return r.error();
        }
        return send_measured(api->http.get(), to_string(api->provider), request, timeout,
                             SlotPool::background);
    };
}

}  // namespace paasmilter
