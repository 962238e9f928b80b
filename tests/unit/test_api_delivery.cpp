#include <doctest/doctest.h>

#include <filesystem>
#include <fstream>

#include <fmt/format.h>
#include <set>
#include <sstream>

#include "paasmilter/api_delivery.hpp"
#include "paasmilter/spool.hpp"
#include "temp_dir.hpp"

using namespace paasmilter;
using namespace std::chrono_literals;
using paasmilter::testing::TempDir;

namespace {

EmailMessage message_with(size_t to, size_t cc, size_t bcc) {
    EmailMessage m;
    m.sender_address = "DoNotReply@contoso.test";
    m.subject = "s";
    m.plain_text = "hello";
    for (size_t i = 0; i < to; ++i) m.to.push_back({fmt::format("to{}@example.net", i), ""});
    for (size_t i = 0; i < cc; ++i) m.cc.push_back({fmt::format("cc{}@example.net", i), ""});
    for (size_t i = 0; i < bcc; ++i) m.bcc.push_back({fmt::format("bcc{}@example.net", i), ""});
    return m;
}

ApiSettings settings() {
    ApiSettings api;
    api.endpoint = "https://acs.example.test";
    api.access_key = "c2VjcmV0LWtleS1mb3ItdGVzdHM=";  // "secret-key-for-tests"
    api.time_budget = 60s;
    api.max_attempts = 4;
    return api;
}

// A scripted service: answers in order, records requests, and a fake clock that sleeping
// advances.
struct FakeService {
    std::vector<Result<HttpResponse>> answers;
    std::vector<HttpRequest> requests;
    std::chrono::system_clock::time_point clock =
        std::chrono::system_clock::from_time_t(1'800'000'000);
    std::chrono::milliseconds slept{0};
    int progress_calls = 0;

    ApiHooks hooks() {
        ApiHooks h;
        h.send = [this](const HttpRequest& request, std::chrono::milliseconds) {
            requests.push_back(request);
            REQUIRE(!answers.empty());
            auto answer = answers.front();
            answers.erase(answers.begin());
            return answer;
        };
        h.sleep = [this](std::chrono::milliseconds d) {
            slept += d;
            clock += d;
        };
        h.now = [this] { return clock; };
        h.progress = [this] { ++progress_calls; };
        return h;
    }
};

HttpResponse status(long code, HttpHeaders headers = {}, std::string body = {}) {
    HttpResponse r;
    r.status = code;
    r.headers = std::move(headers);
    r.body = std::move(body);
    return r;
}

std::string header_of(const HttpRequest& request, std::string_view name) {
    for (const auto& [k, v] : request.headers) {
        if (k == name) return v;
    }
    return {};
}

}  // namespace

TEST_CASE("recipients are split into requests of at most 50, in to/cc/bcc order") {
    auto chunks = split_recipients(message_with(60, 40, 20), 50);
    REQUIRE(chunks.size() == 3);
    CHECK(chunks[0].to.size() == 50);
    CHECK(chunks[0].cc.empty());
    CHECK(chunks[1].to.size() == 10);
    CHECK(chunks[1].cc.size() == 40);
    CHECK(chunks[2].bcc.size() == 20);
    std::set<std::string> all;
    for (const auto& c : chunks) {
        CHECK(c.recipient_count() <= 50);
        CHECK(c.subject == "s");
        for (const auto* list : {&c.to, &c.cc, &c.bcc}) {
            for (const auto& a : *list) all.insert(a.address);
        }
    }
    CHECK(all.size() == 120);
    CHECK(split_recipients(message_with(50, 0, 0), 50).size() == 1);
}

TEST_CASE("operation ids are stable per message and chunk, and differ otherwise") {
    std::string a = operation_id("<m1@x>|s@x|r@y", 0, 3);
    CHECK(a == operation_id("<m1@x>|s@x|r@y", 0, 3));
    CHECK(a != operation_id("<m1@x>|s@x|r@y", 1, 3));
    CHECK(a != operation_id("<m2@x>|s@x|r@y", 0, 3));
    REQUIRE(a.size() == 36);
    CHECK(a[14] == '5');  // version 5
}

TEST_CASE("idempotency key: Message-ID, envelope sender and sorted recipients") {
    Transaction tx;
    tx.sender = "s@contoso.test";
    tx.headers = {{"Subject", "x"}, {"message-id", "<abc@contoso.test>"}};
    CHECK(idempotency_key(tx, {"b@y", "a@y"}) == "<abc@contoso.test>|s@contoso.test|a@y|b@y");
    tx.headers = {{"Date", "d"}, {"Subject", "x"}, {"From", "f"}};
    CHECK(idempotency_key(tx, {"a@y"}) == "date=d|subject=x|from=f|s@contoso.test|a@y");
}

TEST_CASE("local domains") {
    CHECK(address_in_domains("a@Contoso.TEST", {"contoso.test"}));
    CHECK_FALSE(address_in_domains("a@sub.contoso.test", {"contoso.test"}));
    CHECK_FALSE(address_in_domains("contoso.test", {"contoso.test"}));
}

TEST_CASE("header block") {
    CHECK(header_block({{"Subject", "a\n\tb"}, {"X", "y"}}) == "Subject: a\r\n\tb\r\nX: y\r\n\r\n");
}

TEST_CASE("Retry-After") {
    auto now = std::chrono::system_clock::from_time_t(1'800'000'000);  // 2027-01-15 08:00:00
    CHECK(parse_retry_after("7", now) == 7s);
    CHECK(parse_retry_after("Fri, 15 Jan 2027 08:00:30 GMT", now) == 30s);
    CHECK(parse_retry_after("Fri, 15 Jan 2027 07:00:00 GMT", now) == 0s);
    CHECK_FALSE(parse_retry_after("soon", now).has_value());
    CHECK_FALSE(parse_retry_after("", now).has_value());
}

TEST_CASE("submission: accepted, signed, one request per 50 recipients") {
    FakeService service;
    service.answers = {status(202), status(202), status(202)};
    ApiSettings api = settings();
    auto outcome = submit_to_acs(api, message_with(120, 0, 0), "key", service.hooks());
    CHECK(outcome.kind == ApiOutcome::Kind::accepted);
    CHECK(outcome.requests == 3);
    CHECK(outcome.accepted_recipients.size() == 120);
    REQUIRE(outcome.operation_ids.size() == 3);
    REQUIRE(service.requests.size() == 3);
    for (size_t i = 0; i < 3; ++i) {
        const auto& r = service.requests[i];
        CHECK(r.url == "https://acs.example.test/emails:send?api-version=2023-03-31");
        CHECK(header_of(r, "Operation-Id") == outcome.operation_ids[i]);
        CHECK(header_of(r, "Authorization").starts_with("HMAC-SHA256 SignedHeaders="));
        CHECK_FALSE(header_of(r, "x-ms-date").empty());
        CHECK_FALSE(header_of(r, "x-ms-content-sha256").empty());
    }
}

TEST_CASE("submission: 429 honours Retry-After, 5xx backs off, within the budget") {
    FakeService service;
    service.answers = {status(429, {{"Retry-After", "3"}}), status(503), status(202)};
    auto outcome = submit_to_acs(settings(), message_with(1, 0, 0), "key", service.hooks());
    CHECK(outcome.kind == ApiOutcome::Kind::accepted);
    CHECK(outcome.requests == 3);
    CHECK(service.slept == 3s + 2s);  // Retry-After, then the second backoff step
    CHECK(service.progress_calls >= 3);
    // The retry repeats the same Operation-Id, so the service can drop a duplicate.
    CHECK(header_of(service.requests[0], "Operation-Id") ==
          header_of(service.requests[2], "Operation-Id"));
}

TEST_CASE("submission: a Retry-After beyond the budget is a transient failure at once") {
    FakeService service;
    service.answers = {status(429, {{"Retry-After", "600"}})};
    auto outcome = submit_to_acs(settings(), message_with(1, 0, 0), "key", service.hooks());
    CHECK(outcome.kind == ApiOutcome::Kind::transient);
    CHECK(outcome.requests == 1);
    CHECK(service.slept == 0s);
    CHECK(outcome.detail.find("HTTP 429") == 0);
    CHECK(outcome.detail.find("time budget") != std::string::npos);
}

TEST_CASE("submission: transport errors are retried up to max_attempts") {
    FakeService service;
    for (int i = 0; i < 4; ++i) service.answers.push_back(make_error("connection reset"));
    auto outcome = submit_to_acs(settings(), message_with(1, 0, 0), "key", service.hooks());
    CHECK(outcome.kind == ApiOutcome::Kind::transient);
    CHECK(outcome.requests == 4);
    CHECK(service.slept == 1s + 2s + 4s);
    CHECK(outcome.detail == "connection reset");
}

TEST_CASE("submission: 4xx is permanent with the service's error text, 413 is oversize") {
    FakeService service;
    service.answers = {
        status(400, {}, R"({"error":{"code":"InvalidSenderUserName","message":"bad sender"}})")};
    auto outcome = submit_to_acs(settings(), message_with(1, 0, 0), "key", service.hooks());
    CHECK(outcome.kind == ApiOutcome::Kind::permanent);
    CHECK(outcome.detail == "HTTP 400 InvalidSenderUserName: bad sender");
    service.answers = {status(413)};
    CHECK(submit_to_acs(settings(), message_with(1, 0, 0), "key", service.hooks()).kind ==
          ApiOutcome::Kind::oversize);
    service.answers = {status(401)};
    CHECK(submit_to_acs(settings(), message_with(1, 0, 0), "key", service.hooks()).kind ==
          ApiOutcome::Kind::transient);
}

TEST_CASE("submission: a partial failure reports exactly what was accepted") {
    FakeService service;
    service.answers = {status(202), status(400, {}, R"({"error":{"code":"BadRequest"}})")};
    auto outcome = submit_to_acs(settings(), message_with(70, 0, 0), "key", service.hooks());
    CHECK(outcome.kind == ApiOutcome::Kind::permanent);
    CHECK(outcome.accepted_recipients.size() == 50);
    CHECK(outcome.detail == "request 2/2: HTTP 400 BadRequest");
}

TEST_CASE("submission: an oversize request is refused before anything is sent") {
    FakeService service;
    ApiSettings api = settings();
    api.max_request_bytes = 2000;
    EmailMessage m = message_with(1, 0, 0);
    m.attachments.push_back(
        {"big.bin", "application/octet-stream", std::string(4000, 'A'), "", 3000});
    auto outcome = submit_to_acs(api, m, "key", service.hooks());
    CHECK(outcome.kind == ApiOutcome::Kind::oversize);
    CHECK(outcome.requests == 0);
}

TEST_CASE("spool: memory below the threshold, a file above it, oversize past the limit") {
    TempDir dir;
    {
        MessageSpool spool(10, dir.path().string(), 100);
        REQUIRE(spool.append("12345").ok());
        CHECK(spool.in_memory());
        REQUIRE(spool.append("6789012345").ok());
        CHECK_FALSE(spool.in_memory());
        std::string path = spool.path();
        std::ifstream in(path);
        std::stringstream content;
        content << in.rdbuf();
        CHECK(content.str() == "123456789012345");
        CHECK(spool.size() == 15);
        REQUIRE(spool.append(std::string(90, 'x')).ok());
        CHECK(spool.oversize());
    }
    CHECK(std::filesystem::is_empty(dir.path()));  // the file went with the spool
    MessageSpool broken(0, "/nonexistent-directory", 100);
    CHECK_FALSE(broken.append("x").ok());
}
