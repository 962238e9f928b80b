// A scripted API service for unit tests of the providers: POST and GET answers in order,
// the requests recorded, and a fake clock that sleeping advances.
#pragma once

#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <functional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "paasmilter/api_delivery.hpp"
#include "paasmilter/providers/provider.hpp"
#include "paasmilter/spool.hpp"

namespace paasmilter::testing {

using namespace std::chrono_literals;

// A scripted service: POST and GET answers in order (a GET with nothing scripted is 404:
// "no such operation"), records requests, and a fake clock that sleeping advances.
struct FakeService {
    std::vector<Result<HttpResponse>> posts;
    std::vector<Result<HttpResponse>> gets;
    std::vector<HttpRequest> requests;
    std::chrono::steady_clock::time_point clock{std::chrono::hours(1000)};
    std::chrono::system_clock::time_point wall =
        std::chrono::system_clock::from_time_t(1'800'000'000);
    std::chrono::milliseconds slept{0};
    std::vector<std::chrono::milliseconds> timeouts;
    int progress_calls = 0;

    ApiHooks hooks() {
        ApiHooks h;
        h.send = [this](const HttpRequest& request, std::chrono::milliseconds timeout) {
            requests.push_back(request);
            timeouts.push_back(timeout);
            auto& queue = request.method == "GET" ? gets : posts;
            if (queue.empty()) {
                REQUIRE(request.method == "GET");
                HttpResponse absent;
                absent.status = 404;
                return Result<HttpResponse>(absent);
            }
            auto answer = queue.front();
            queue.erase(queue.begin());
            return answer;
        };
        h.sleep = [this](std::chrono::milliseconds d) {
            slept += d;
            clock += d;
            wall += d;
        };
        h.now = [this] { return clock; };
        h.wall_clock = [this] { return wall; };
        h.progress = [this] { ++progress_calls; };
        return h;
    }
    std::chrono::steady_clock::time_point deadline(std::chrono::seconds budget = 60s) const {
        return clock + budget;
    }
    std::vector<HttpRequest> of(std::string_view method) const {
        std::vector<HttpRequest> out;
        for (const auto& r : requests)
            if (r.method == method) out.push_back(r);
        return out;
    }
};

inline HttpResponse status(long code, HttpHeaders headers = {}, std::string body = {}) {
    HttpResponse r;
    r.status = code;
    r.headers = std::move(headers);
    r.body = std::move(body);
    return r;
}

inline std::string header_of(const HttpRequest& request, std::string_view name) {
    for (const auto& [k, v] : request.headers) {
        if (k == name) return v;
    }
    return {};
}

// `threads` clients submit one message each at the same time through `api`'s provider (each
// with its own content identity, to alice@example.net) against `answer`, which holds every
// request `hold` long. How many were accepted, and the most requests in flight at once.
struct ConcurrentRun {
    int accepted = 0;
    int most_in_flight = 0;
};
inline ConcurrentRun submit_concurrently(const ApiSettings& api, const std::string& source,
                                         int threads, std::chrono::milliseconds hold,
                                         std::function<HttpResponse(const HttpRequest&)> answer) {
    std::atomic<int> running{0};
    std::atomic<int> most{0};
    std::atomic<int> accepted{0};
    auto send = [&](const HttpRequest& request, std::chrono::milliseconds) {
        int now = ++running;
        int seen = most.load();
        while (now > seen && !most.compare_exchange_weak(seen, now)) {
        }
        std::this_thread::sleep_for(hold);
        --running;
        return Result<HttpResponse>(answer(request));
    };
    std::vector<std::thread> clients;
    for (int i = 0; i < threads; ++i) {
        clients.emplace_back([&, i] {
            MessageSpool spool(1 << 20, "/tmp", 64 << 20);
            (void)spool.append(source);
            ApiHooks hooks = default_api_hooks(api);
            hooks.send = send;
            hooks.bearer_token = [](std::chrono::milliseconds) {
                return Result<std::string>("tok");
            };
            ProviderInput input{
                spool,
                "scanner@contoso.com",
                {},
                {"alice@example.net"},
                {},
                MessageIdentity{"concurrent-digest-" + std::to_string(i), "s@contoso.com"},
                std::chrono::steady_clock::now() + 30s};
            if (provider_for(api).submit(api, input, hooks).kind == ApiOutcome::Kind::accepted) {
                ++accepted;
            }
        });
    }
    for (auto& client : clients) client.join();
    return {accepted.load(), most.load()};
}

}  // namespace paasmilter::testing
