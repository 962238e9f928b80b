#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>

#include <fmt/format.h>

#include "paasmilter/api_delivery.hpp"
#include "paasmilter/delivery/status_poller.hpp"

using namespace paasmilter;
using namespace std::chrono_literals;

namespace {

struct Collected {
    std::mutex mutex;
    std::vector<FinalStatus> statuses;
    void add(const FinalStatus& s) {
        std::lock_guard lock(mutex);
        statuses.push_back(s);
    }
    size_t size() {
        std::lock_guard lock(mutex);
        return statuses.size();
    }
    // Waits (bounded) for `n` reports.
    bool wait_for(size_t n) {
        for (int i = 0; i < 500 && size() < n; ++i) std::this_thread::sleep_for(10ms);
        return size() >= n;
    }
};

StatusPoller::Options fast() {
    StatusPoller::Options o;
    o.first_delay = 1ms;
    o.max_delay = 4ms;
    o.max_polls = 4;
    o.max_age = 10s;
    return o;
}

HttpResponse answer(long status, std::string body = {}) {
    HttpResponse r;
    r.status = status;
    r.body = std::move(body);
    return r;
}

// Answers from a script, one per poll; the last one repeats.
StatusPoller::Fetch scripted(std::vector<Result<HttpResponse>> script,
                             std::shared_ptr<std::atomic<int>> calls) {
    return [script, calls](const std::string&, std::chrono::milliseconds) {
        size_t i = static_cast<size_t>(calls->fetch_add(1));
        return script[std::min(i, script.size() - 1)];
    };
}

}  // namespace

TEST_CASE("status poller: reports the final status with the queue id") {
    Collected got;
    auto calls = std::make_shared<std::atomic<int>>(0);
    {
        StatusPoller poller(fast(), [&](const FinalStatus& s) { got.add(s); });
        REQUIRE(poller.watch(
            "4AB12C", "op-1",
            scripted({answer(200, R"({"id":"op-1","status":"Running"})"), make_error("timed out"),
                      answer(200, R"({"id":"op-1","status":"Succeeded"})")},
                     calls)));
        REQUIRE(poller.watch("4AB12D", "op-2",
                             scripted({answer(200, R"({"status":"Failed","error":{"code":
                                        "EmailDroppedAllRecipientsSuppressed","message":"all suppressed"}})")},
                                      std::make_shared<std::atomic<int>>(0))));
        REQUIRE(got.wait_for(2));
    }
    std::lock_guard lock(got.mutex);
    for (const auto& s : got.statuses) {
        if (s.queue_id == "4AB12C") {
            CHECK(s.status == "Succeeded");
            CHECK(s.polls == 3);
        } else {
            CHECK(s.queue_id == "4AB12D");
            CHECK(s.status == "Failed");
            CHECK(s.detail == "EmailDroppedAllRecipientsSuppressed: all suppressed");
        }
    }
}

TEST_CASE("status poller: bounded by polls, gives up with Unknown; 404 is Unknown at once") {
    Collected got;
    auto running = std::make_shared<std::atomic<int>>(0);
    auto missing = std::make_shared<std::atomic<int>>(0);
    {
        StatusPoller poller(fast(), [&](const FinalStatus& s) { got.add(s); });
        poller.watch("Q1", "op-1", scripted({answer(200, R"({"status":"Running"})")}, running));
        poller.watch("Q2", "op-2", scripted({answer(404)}, missing));
        REQUIRE(got.wait_for(2));
    }
    CHECK(running->load() == 4);
    CHECK(missing->load() == 1);
    for (const auto& s : got.statuses) {
        CHECK(s.status == "Unknown");
        if (s.queue_id == "Q1") CHECK(s.detail == "gave up polling: still Running");
    }
}

TEST_CASE("status poller: refuses work past max_pending and stops promptly") {
    auto options = fast();
    options.max_pending = 2;
    options.first_delay = 1h;  // nothing becomes due during the test
    auto calls = std::make_shared<std::atomic<int>>(0);
    Collected got;
    auto started = std::chrono::steady_clock::now();
    {
        StatusPoller poller(options, [&](const FinalStatus& s) { got.add(s); });
        auto fetch = scripted({answer(200, R"({"status":"Succeeded"})")}, calls);
        CHECK(poller.watch("Q1", "a", fetch));
        CHECK(poller.watch("Q2", "b", fetch));
        CHECK_FALSE(poller.watch("Q3", "c", fetch));
        CHECK(poller.pending() == 2);
    }
    CHECK(calls->load() == 0);
    CHECK(got.size() == 0);
    CHECK(std::chrono::steady_clock::now() - started < 1h);
}

TEST_CASE(
    "status poller: polls concurrently, up to `workers` at once; a slow answer holds up "
    "no other operation") {
    auto options = fast();
    options.workers = 4;
    Collected got;
    std::mutex mutex;
    std::condition_variable changed;
    int active = 0, most_active = 0;
    bool release = false;
    // Every fetch waits until four are in flight at once (or 5 s, so that a poller that
    // polls one at a time fails the check instead of hanging), then answers Succeeded.
    auto fetch = [&](const std::string&, std::chrono::milliseconds) -> Result<HttpResponse> {
        std::unique_lock lock(mutex);
        most_active = std::max(most_active, ++active);
        if (active == 4) release = true;
        changed.notify_all();
        changed.wait_for(lock, 5s, [&] { return release; });
        --active;
        return answer(200, R"({"status":"Succeeded"})");
    };
    {
        StatusPoller poller(options, [&](const FinalStatus& s) { got.add(s); });
        for (int i = 0; i < 12; ++i) {
            REQUIRE(poller.watch(fmt::format("Q{}", i), fmt::format("op-{}", i), fetch));
        }
        REQUIRE(got.wait_for(12));
        // A report comes just before its worker counts the poll done: wait (bounded).
        for (int i = 0; i < 500 && poller.pending() != 0; ++i) std::this_thread::sleep_for(10ms);
        CHECK(poller.pending() == 0);
    }
    CHECK(most_active == 4);
    std::lock_guard lock(got.mutex);
    for (const auto& s : got.statuses) {
        CHECK(s.status == "Succeeded");
        CHECK(s.polls == 1);
    }
}

TEST_CASE("status poller: each operation is polled when it is due, earliest first") {
    auto options = fast();
    options.workers = 1;
    options.first_delay = 50ms;
    Collected got;
    {
        StatusPoller poller(options, [&](const FinalStatus& s) { got.add(s); });
        auto succeeded = [](const std::string&, std::chrono::milliseconds) -> Result<HttpResponse> {
            return answer(200, R"({"status":"Succeeded"})");
        };
        // Watched in this order; each is due first_delay after its watch().
        for (int i = 0; i < 5; ++i) {
            REQUIRE(poller.watch(fmt::format("Q{}", i), "op", succeeded));
            std::this_thread::sleep_for(2ms);
        }
        REQUIRE(got.wait_for(5));
    }
    std::lock_guard lock(got.mutex);
    for (size_t i = 0; i < got.statuses.size(); ++i) {
        CHECK(got.statuses[i].queue_id == fmt::format("Q{}", i));
    }
}

TEST_CASE("operation status bodies") {
    auto s = parse_operation_status(R"({"id":"x","status":"Running"})");
    REQUIRE(s);
    CHECK(s->status == "Running");
    CHECK(s->id == "x");
    CHECK(s->error.empty());
    CHECK_FALSE(parse_operation_status("not json"));
    CHECK_FALSE(parse_operation_status(R"({"id":"x"})"));
}
