#include <doctest/doctest.h>

// GCC 12 reports a false "may be used uninitialized" inside std::variant when scripted
// answers (Result<HttpResponse>) are pushed in a loop.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <filesystem>
#include <fstream>

#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "fake_service.hpp"
#include "paasmilter/acs_json.hpp"
#include "paasmilter/api_delivery.hpp"
#include "paasmilter/delivery/message_identity.hpp"
#include "paasmilter/spool.hpp"
#include "temp_dir.hpp"
#include "test_support.hpp"

using namespace paasmilter;
using namespace std::chrono_literals;
using paasmilter::testing::TempDir;
using namespace paasmilter::testing;

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

const MessageIdentity kIdentity{"0123abcd", "s@contoso.test"};

// The status answer for an existing operation: the request to to{first}..to{first+count-1}.
HttpResponse exists(size_t first, size_t count, std::string_view state = "Succeeded") {
    std::vector<std::string> rcpts;
    for (size_t i = first; i < first + count; ++i)
        rcpts.push_back(fmt::format("to{}@example.net", i));
    std::string id = request_operation_id(kIdentity.content_digest, kIdentity.sender, rcpts);
    return status(200, {}, fmt::format(R"({{"id":"{}","status":"{}"}})", id, state));
}

ApiOutcome submit(FakeService& service, const EmailMessage& message, ApiSettings api = settings(),
                  std::chrono::seconds budget = 60s) {
    return submit_to_acs(api, message, kIdentity, service.deadline(budget), service.hooks());
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
        CHECK(c.size() <= 50);
        for (const auto& a : c.addresses()) all.insert(a);
    }
    CHECK(all.size() == 120);
    CHECK(split_recipients(message_with(50, 0, 0), 50).size() == 1);
}

TEST_CASE("request bodies: the whole message's JSON with each chunk's recipients") {
    EmailMessage m = message_with(3, 1, 1);
    m.subject = "Quote \" and \\ and \u00e9";
    m.html = "<p>x</p>";
    m.attachments.push_back({"a \"b\".pdf", "application/pdf", "QUJD", "", 3});
    m.attachments.push_back({"i.png", "image/png", "iVBO", "img1", 3});
    m.reply_to.push_back({"r@contoso.test", "R"});
    m.headers.push_back({"X-Tag", "1"});
    auto whole = nlohmann::json::parse(to_acs_json(m));
    CHECK(whole["attachments"][0]["name"] == "a \"b\".pdf");
    CHECK(whole["attachments"][0]["contentInBase64"] == "QUJD");
    CHECK(whole["attachments"][1]["contentId"] == "img1");
    CHECK(whole["content"]["subject"] == m.subject);
    CHECK(whole["userEngagementTrackingDisabled"] == true);
    AcsRequestRenderer renderer(m);
    for (const auto& chunk : split_recipients(m, 2)) {
        std::string text = renderer.body(chunk).str();
        CHECK(renderer.body_size(chunk) == text.size());
        auto body = nlohmann::json::parse(text);
        auto addresses = [](const nlohmann::json& list) {
            std::vector<std::string> out;
            for (const auto& a : list) out.push_back(a["address"]);
            return out;
        };
        std::vector<std::string> got = addresses(body["recipients"]["to"]);
        for (const char* kind : {"cc", "bcc"}) {
            if (body["recipients"].contains(kind)) {
                auto more = addresses(body["recipients"][kind]);
                got.insert(got.end(), more.begin(), more.end());
            }
        }
        CHECK(got == chunk.addresses());
        body.erase("recipients");
        auto rest = whole;
        rest.erase("recipients");
        CHECK(body == rest);
    }
}

TEST_CASE("request bodies: the attachments' base64 is shared by every request, never copied") {
    EmailMessage m = message_with(120, 0, 0);
    m.attachments.push_back({"a.pdf", "application/pdf", std::string(300000, 'A'), "", 225000});
    m.attachments.push_back({"b.txt", "text/plain", "QUJD", "", 3});
    const char* const big_bytes = m.attachments[0].content_base64.data();
    const std::string whole = to_acs_json(m);
    AcsRequestRenderer renderer(std::move(m));
    const auto chunks = split_recipients(message_with(120, 0, 0), 50);
    REQUIRE(chunks.size() == 3);
    std::vector<HttpBody> bodies;
    for (const auto& chunk : chunks) bodies.push_back(renderer.body(chunk));
    // The piece holding the large attachment is the conversion's own string, moved (its bytes
    // did not move either), in each request's body.
    auto holding = [&](const HttpBody& body) -> HttpBody::Piece {
        for (const auto& piece : body.pieces())
            if (piece->data() == big_bytes) return piece;
        return nullptr;
    };
    const HttpBody::Piece shared = holding(bodies[0]);
    REQUIRE(shared != nullptr);
    CHECK(shared->size() == 300000);
    for (const HttpBody& body : bodies) CHECK(holding(body) == shared);
    // The first request's bytes are those of the whole message's JSON but for the recipients.
    auto first = nlohmann::json::parse(bodies[0].str());
    auto expected = nlohmann::json::parse(whole);
    first.erase("recipients");
    expected.erase("recipients");
    CHECK(first == expected);
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

TEST_CASE("submission: each request is checked, then posted repeatably and signed") {
    FakeService service;
    service.posts = {status(202), status(202), status(202)};
    auto outcome = submit(service, message_with(120, 0, 0));
    CHECK(outcome.kind == ApiOutcome::Kind::accepted);
    CHECK(outcome.requests == 3);
    CHECK(outcome.status_checks == 3);
    CHECK(outcome.accepted_recipients().size() == 120);
    auto ids = outcome.accepted_operation_ids();
    REQUIRE(ids.size() == 3);
    CHECK(std::set<std::string>(ids.begin(), ids.end()).size() == 3);
    REQUIRE(service.requests.size() == 6);
    for (size_t i = 0; i < 3; ++i) {
        const auto& check = service.requests[2 * i];
        const auto& post = service.requests[2 * i + 1];
        CHECK(check.method == "GET");
        CHECK(check.url ==
              "https://acs.example.test/emails/operations/" + ids[i] + "?api-version=2023-03-31");
        CHECK(header_of(check, "Authorization").starts_with("HMAC-SHA256 SignedHeaders="));
        CHECK(post.method == "POST");
        CHECK(post.url == "https://acs.example.test/emails:send?api-version=2023-03-31");
        CHECK(header_of(post, "Operation-Id") == ids[i]);
        CHECK(header_of(post, "Repeatability-Request-Id").size() == 36);
        CHECK(header_of(post, "Repeatability-First-Sent") == "Fri, 15 Jan 2027 08:00:00 GMT");
        CHECK(header_of(post, "Authorization").starts_with("HMAC-SHA256 SignedHeaders="));
        CHECK_FALSE(header_of(post, "x-ms-content-sha256").empty());
    }
}

TEST_CASE("request ids: the same message and recipients give the same ids, anything else not") {
    auto ids_for = [](const MessageIdentity& identity, const EmailMessage& m) {
        FakeService service;
        service.posts = {status(202), status(202)};
        return submit_to_acs(settings(), m, identity, service.deadline(), service.hooks())
            .accepted_operation_ids();
    };
    auto first = ids_for(kIdentity, message_with(70, 0, 0));
    REQUIRE(first.size() == 2);
    CHECK(first == ids_for(kIdentity, message_with(70, 0, 0)));
    CHECK(first != ids_for({"0123abce", kIdentity.sender}, message_with(70, 0, 0)));
    CHECK(first !=
          ids_for({kIdentity.content_digest, "other@contoso.test"}, message_with(70, 0, 0)));
    auto fewer = ids_for(kIdentity, message_with(69, 0, 0));
    CHECK(first[0] == fewer[0]);  // the first 50 are the same request
    CHECK(first[1] != fewer[1]);
}

TEST_CASE("submission: 429 honours Retry-After (and backs off without it), then a new request") {
    FakeService service;
    service.posts = {status(429, {{"Retry-After", "3"}}), status(429), status(202)};
    auto outcome = submit(service, message_with(1, 0, 0));
    CHECK(outcome.kind == ApiOutcome::Kind::accepted);
    CHECK(service.slept == 3s + 2s);  // Retry-After, then the second backoff step
    CHECK(service.progress_calls >= 3);
    auto posts = service.of("POST");
    REQUIRE(posts.size() == 3);
    CHECK(header_of(posts[0], "Operation-Id") == header_of(posts[2], "Operation-Id"));
    // The service replays a 4xx to a repeat of the same repeatable request: a throttled
    // request is retried as a new one.
    CHECK(header_of(posts[0], "Repeatability-Request-Id") !=
          header_of(posts[1], "Repeatability-Request-Id"));
    CHECK(header_of(posts[1], "Repeatability-Request-Id") !=
          header_of(posts[2], "Repeatability-Request-Id"));
    CHECK(service.of("GET").size() == 1);  // throttled requests were not executed: no check
}

TEST_CASE("submission: a 5xx or a lost answer is resolved by asking before posting again") {
    SUBCASE("504 after the message went out: the operation exists, nothing is posted again") {
        FakeService service;
        service.posts = {status(504)};
        service.gets = {status(404), exists(0, 1, "Running")};
        auto outcome = submit(service, message_with(1, 0, 0));
        CHECK(outcome.kind == ApiOutcome::Kind::accepted);
        CHECK(outcome.chunks[0].fate == ChunkFate::accepted);
        CHECK(service.of("POST").size() == 1);
    }
    SUBCASE("a reset before the service took it: posted again with the same repeatability") {
        FakeService service;
        service.posts = {make_error(ErrorKind::no_answer, "connection reset"), status(202)};
        auto outcome = submit(service, message_with(1, 0, 0));
        CHECK(outcome.kind == ApiOutcome::Kind::accepted);
        auto posts = service.of("POST");
        REQUIRE(posts.size() == 2);
        CHECK(header_of(posts[0], "Repeatability-Request-Id") ==
              header_of(posts[1], "Repeatability-Request-Id"));
        CHECK(service.of("GET").size() == 2);
    }
    SUBCASE("out of attempts after 500s, and the service has nothing: not sent") {
        FakeService service;
        service.posts = {status(500), status(500), status(500), status(500)};
        auto outcome = submit(service, message_with(1, 0, 0));
        CHECK(outcome.kind == ApiOutcome::Kind::transient);
        CHECK(outcome.chunks[0].fate == ChunkFate::not_sent);
        CHECK(service.of("POST").size() == 4);
        CHECK(service.slept == 1s + 2s + 4s);
        CHECK(outcome.detail == "HTTP 500");
    }
    SUBCASE("out of attempts after timeouts: an absent operation may still be on its way") {
        FakeService service;
        for (int i = 0; i < 4; ++i)
            service.posts.push_back(make_error(ErrorKind::no_answer, "timed out"));
        auto outcome = submit(service, message_with(1, 0, 0));
        CHECK(outcome.chunks[0].fate == ChunkFate::unresolved);
        CHECK(service.of("POST").size() == 4);
        CHECK(outcome.detail.find("timed out; the service has no operation yet") == 0);
    }
    SUBCASE("out of attempts and the service cannot say: unresolved") {
        FakeService service;
        for (int i = 0; i < 4; ++i)
            service.posts.push_back(make_error(ErrorKind::no_answer, "timed out"));
        service.gets = {status(404), status(404), status(404), status(404)};
        for (int i = 0; i < 4; ++i) service.gets.push_back(status(503));
        auto outcome = submit(service, message_with(1, 0, 0));
        CHECK(outcome.kind == ApiOutcome::Kind::transient);
        CHECK(outcome.chunks[0].fate == ChunkFate::unresolved);
        CHECK(outcome.unresolved_recipients() == std::vector<std::string>{"to0@example.net"});
    }
    SUBCASE("a 5xx the service cannot explain is never posted again") {
        // The worst legal case: the message went out despite the 504, the status endpoint
        // is down, and a repeat of the 5xx'd request would be executed again.
        FakeService service;
        service.posts = {status(504)};
        service.gets = {status(404)};
        for (int i = 0; i < 4; ++i) service.gets.push_back(status(503));
        auto outcome = submit(service, message_with(1, 0, 0));
        CHECK(outcome.chunks[0].fate == ChunkFate::unresolved);
        CHECK(service.of("POST").size() == 1);
        CHECK(outcome.detail.find("HTTP 504") == 0);
    }
}

TEST_CASE("submission: a request that never left is retried without asking") {
    FakeService service;
    service.posts = {make_error(ErrorKind::request_not_sent, "connection refused"),
                     make_error(ErrorKind::request_not_sent, "connection refused"),
                     make_error(ErrorKind::request_not_sent, "connection refused"),
                     make_error(ErrorKind::request_not_sent, "connection refused")};
    auto outcome = submit(service, message_with(1, 0, 0));
    // Certainly not at the service: the failure policy may send it elsewhere.
    CHECK(outcome.chunks[0].fate == ChunkFate::not_sent);
    CHECK(service.of("GET").size() == 1);  // only the check before the first post
    CHECK(outcome.detail == "connection refused");
}

TEST_CASE("submission: after a lost answer, a 429 is retried as a repeat, not a new request") {
    FakeService service;
    service.posts = {make_error(ErrorKind::no_answer, "timed out"), status(429), status(202)};
    auto outcome = submit(service, message_with(1, 0, 0));
    CHECK(outcome.kind == ApiOutcome::Kind::accepted);
    auto posts = service.of("POST");
    REQUIRE(posts.size() == 3);
    // The first attempt may still be running: only a repeat of it is safe.
    CHECK(header_of(posts[0], "Repeatability-Request-Id") ==
          header_of(posts[2], "Repeatability-Request-Id"));
}

TEST_CASE("submission: once an attempt may still be running, later answers do not settle it") {
    SUBCASE("timeout, then a gateway 503, then a 429: still a repeat, never a new request") {
        FakeService service;
        service.posts = {make_error(ErrorKind::no_answer, "timed out"), status(503), status(429),
                         status(202)};
        ApiSettings api = settings();
        api.max_attempts = 4;
        auto outcome = submit(service, message_with(1, 0, 0), api);
        CHECK(outcome.kind == ApiOutcome::Kind::accepted);
        auto posts = service.of("POST");
        REQUIRE(posts.size() == 4);
        for (size_t i = 1; i < posts.size(); ++i) {
            CHECK(header_of(posts[0], "Repeatability-Request-Id") ==
                  header_of(posts[i], "Repeatability-Request-Id"));
        }
    }
    SUBCASE("timeout, then 503s until out of attempts: unresolved, not 'not sent'") {
        FakeService service;
        service.posts = {make_error(ErrorKind::no_answer, "timed out"), status(503), status(503),
                         status(503)};
        auto outcome = submit(service, message_with(1, 0, 0));
        CHECK(outcome.chunks[0].fate == ChunkFate::unresolved);
    }
    SUBCASE("timeout, then a 401 or 400: the first attempt may have gone through") {
        for (long final_status : {401L, 403L, 400L, 413L}) {
            FakeService service;
            service.posts = {make_error(ErrorKind::no_answer, "timed out"), status(final_status)};
            auto outcome = submit(service, message_with(1, 0, 0));
            CAPTURE(final_status);
            CHECK(outcome.chunks[0].fate == ChunkFate::unresolved);
        }
    }
    SUBCASE("timeout, then 412: no new request while the first may still run") {
        FakeService service;
        service.posts = {make_error(ErrorKind::no_answer, "timed out"), status(412)};
        auto outcome = submit(service, message_with(1, 0, 0));
        CHECK(outcome.chunks[0].fate == ChunkFate::unresolved);
        CHECK(service.of("POST").size() == 2);
    }
}

TEST_CASE("submission: a 200 that does not name the operation is not an acceptance") {
    FakeService service;
    service.gets = {status(200, {}, "<html>blocked by policy</html>"), status(404)};
    service.posts = {status(202)};
    auto outcome = submit(service, message_with(1, 0, 0));
    CHECK(outcome.chunks[0].fate == ChunkFate::accepted);
    CHECK(service.of("POST").size() == 1);
}

TEST_CASE("submission: never two transactions of one message posting the same request") {
    PostedRequests posted;
    FakeService service;
    service.posts = {status(202)};
    ApiHooks hooks = service.hooks();
    hooks.posted = &posted;
    std::string id =
        request_operation_id(kIdentity.content_digest, kIdentity.sender, {"to0@example.net"});
    REQUIRE(posted.begin(id));  // another transaction is delivering it
    auto outcome =
        submit_to_acs(settings(), message_with(1, 0, 0), kIdentity, service.deadline(), hooks);
    CHECK(outcome.chunks[0].fate == ChunkFate::busy);
    CHECK(outcome.busy());
    CHECK(service.of("POST").empty());
    posted.end(id);
    outcome =
        submit_to_acs(settings(), message_with(1, 0, 0), kIdentity, service.deadline(), hooks);
    CHECK(outcome.chunks[0].fate == ChunkFate::accepted);
}

TEST_CASE("submission: a quick client retry repeats an uncertain earlier request") {
    PostedRequests posted;
    auto attempt = [&posted](std::vector<Result<HttpResponse>> posts,
                             std::chrono::seconds later = 0s) {
        FakeService service;
        service.wall += later;
        service.posts = std::move(posts);
        ApiHooks hooks = service.hooks();
        hooks.posted = &posted;
        auto outcome =
            submit_to_acs(settings(), message_with(1, 0, 0), kIdentity, service.deadline(), hooks);
        return std::pair{outcome.chunks[0].fate, service.of("POST")};
    };
    auto timeouts = [] {
        std::vector<Result<HttpResponse>> out;
        for (int i = 0; i < 4; ++i) out.push_back(make_error(ErrorKind::no_answer, "timed out"));
        return out;
    };
    auto [first, first_posts] = attempt(timeouts());
    CHECK(first == ChunkFate::unresolved);
    std::string r1 = header_of(first_posts[0], "Repeatability-Request-Id");
    // The earlier request may still be running (no operation yet): the retry repeats it.
    auto [second, second_posts] = attempt({status(202)}, 20s);
    CHECK(second == ChunkFate::accepted);
    REQUIRE(second_posts.size() == 1);
    CHECK(header_of(second_posts[0], "Repeatability-Request-Id") == r1);
    CHECK(header_of(second_posts[0], "Repeatability-First-Sent") ==
          header_of(first_posts[0], "Repeatability-First-Sent"));
    // A replayed 429 says the earlier request was not carried out: a new request at once.
    std::tie(first, first_posts) = attempt(timeouts());
    r1 = header_of(first_posts[0], "Repeatability-Request-Id");
    auto [third, third_posts] = attempt({status(429), status(202)}, 20s);
    CHECK(third == ChunkFate::accepted);
    REQUIRE(third_posts.size() == 2);
    CHECK(header_of(third_posts[0], "Repeatability-Request-Id") == r1);
    CHECK(header_of(third_posts[1], "Repeatability-Request-Id") != r1);
    // The earlier transaction may have posted it again until its time budget (60 s) ran out,
    // each post running up to the request timeout (30 s): still a repeat 100 s after the
    // first post.
    std::tie(first, first_posts) = attempt(timeouts());
    r1 = header_of(first_posts[0], "Repeatability-Request-Id");
    auto [late, late_posts] = attempt({status(202)}, 100s);
    CHECK(late == ChunkFate::accepted);
    CHECK(header_of(late_posts[0], "Repeatability-Request-Id") == r1);
    // Long after the original could have run, the absent operation is proof: a new request.
    std::tie(first, first_posts) = attempt(timeouts());
    r1 = header_of(first_posts[0], "Repeatability-Request-Id");
    auto [fourth, fourth_posts] = attempt({status(202)}, 125s);
    CHECK(fourth == ChunkFate::accepted);
    CHECK(header_of(fourth_posts[0], "Repeatability-Request-Id") != r1);
}

TEST_CASE("submission: 409 means wait and ask, never permanent") {
    FakeService service;
    service.posts = {make_error(ErrorKind::no_answer, "timed out"),
                     status(409, {{"Retry-After", "2"}})};
    service.gets = {status(404), status(404), exists(0, 1)};
    auto outcome = submit(service, message_with(1, 0, 0));
    CHECK(outcome.kind == ApiOutcome::Kind::accepted);
    CHECK(service.of("POST").size() == 2);
    CHECK(service.slept == 1s + 2s);
}

TEST_CASE("submission: 412 (first attempt left the 5-minute window) starts a new request") {
    FakeService service;
    service.posts = {status(412), status(202)};
    auto outcome = submit(service, message_with(1, 0, 0));
    CHECK(outcome.kind == ApiOutcome::Kind::accepted);
    auto posts = service.of("POST");
    REQUIRE(posts.size() == 2);
    CHECK(header_of(posts[0], "Repeatability-Request-Id") !=
          header_of(posts[1], "Repeatability-Request-Id"));
    CHECK(header_of(posts[0], "Operation-Id") == header_of(posts[1], "Operation-Id"));
}

TEST_CASE("submission: a request an earlier attempt got accepted is not posted again") {
    FakeService service;
    service.gets = {exists(0, 50), status(404)};
    service.posts = {status(202)};
    auto outcome = submit(service, message_with(70, 0, 0));
    CHECK(outcome.kind == ApiOutcome::Kind::accepted);
    CHECK(outcome.chunks[0].fate == ChunkFate::already_accepted);
    CHECK(outcome.chunks[1].fate == ChunkFate::accepted);
    auto posts = service.of("POST");
    REQUIRE(posts.size() == 1);
    CHECK(header_of(posts[0], "Operation-Id") == outcome.chunks[1].operation_id);
    CHECK(outcome.detail == "HTTP 202 x1, 1 accepted by an earlier attempt");
}

TEST_CASE("submission: whether the service is asked before the first post") {
    PostedRequests posted;
    auto attempt = [&posted](LookupBeforePost lookup, bool fleet,
                             std::vector<Result<HttpResponse>> gets = {}) {
        FakeService service;
        service.posts = {status(202)};
        service.gets = std::move(gets);
        ApiHooks hooks = service.hooks();
        hooks.posted = &posted;
        hooks.fleet = fleet;
        ApiSettings api = settings();
        api.lookup_before_post = lookup;
        auto outcome =
            submit_to_acs(api, message_with(1, 0, 0), kIdentity, service.deadline(), hooks);
        return std::tuple{outcome.chunks[0].fate, service.of("GET").size(),
                          service.of("POST").size()};
    };
    SUBCASE("own attempts: a first attempt posts at once; a retry asks first") {
        CHECK(attempt(LookupBeforePost::own_attempts, true) ==
              std::tuple{ChunkFate::accepted, size_t{0}, size_t{1}});
        // The client never saw our 250 and sends it again: this gateway posted it, so the
        // service is asked, and has it.
        CHECK(attempt(LookupBeforePost::own_attempts, true, {exists(0, 1)}) ==
              std::tuple{ChunkFate::already_accepted, size_t{1}, size_t{0}});
    }
    SUBCASE("always: asked before every first post (a fleet's gateways share no journal)") {
        // Another gateway got it accepted: this one has no record of it, the service has.
        CHECK(attempt(LookupBeforePost::always, false, {exists(0, 1)}) ==
              std::tuple{ChunkFate::already_accepted, size_t{1}, size_t{0}});
        CHECK(attempt(LookupBeforePost::always, false) ==
              std::tuple{ChunkFate::accepted, size_t{1}, size_t{1}});
    }
    SUBCASE("auto: always in a fleet, own attempts on a lone gateway") {
        CHECK(attempt(LookupBeforePost::automatic, true) ==
              std::tuple{ChunkFate::accepted, size_t{1}, size_t{1}});
    }
    SUBCASE("auto on a lone gateway") {
        CHECK(attempt(LookupBeforePost::automatic, false) ==
              std::tuple{ChunkFate::accepted, size_t{0}, size_t{1}});
    }
    SUBCASE("own attempts with a new journal: asked first, an earlier post may be lost to it") {
        TempDir dir;
        REQUIRE(posted.open_journal((dir.path() / "posted-requests.journal").string()));
        REQUIRE_FALSE(posted.knows_every_post());
        CHECK(attempt(LookupBeforePost::automatic, false, {exists(0, 1)}) ==
              std::tuple{ChunkFate::already_accepted, size_t{1}, size_t{0}});
        CHECK(attempt(LookupBeforePost::own_attempts, false) ==
              std::tuple{ChunkFate::accepted, size_t{1}, size_t{1}});
    }
}

// A route's quota as ApiHooks::admit sees it: the recipient counts it was asked about, and
// how many requests it lets through (-1: all).
struct QuotaProbe {
    int room = -1;
    std::vector<size_t> asked;
    void install(ApiHooks& hooks) {
        hooks.admit = [this](size_t recipients) {
            asked.push_back(recipients);
            if (room == 0) return ApiHooks::Admission{false, "route quota exhausted: test"};
            if (room > 0) --room;
            return ApiHooks::Admission{};
        };
    }
};

TEST_CASE("submission: the route's quota is charged only for a request about to be posted new") {
    FakeService service;
    QuotaProbe quota;
    auto run = [&](const EmailMessage& message, PostedRequests* posted = nullptr) {
        ApiHooks hooks = service.hooks();
        hooks.posted = posted;
        quota.install(hooks);
        return submit_to_acs(settings(), message, kIdentity, service.deadline(), hooks);
    };
    SUBCASE("the service has every request from an earlier attempt: nothing taken or posted") {
        // The client's retry of an accepted message, with the bucket empty: discarded as a
        // duplicate, never sent elsewhere by on_quota.
        quota.room = 0;
        service.gets = {exists(0, 50), exists(50, 20)};
        auto outcome = run(message_with(70, 0, 0));
        CHECK(outcome.kind == ApiOutcome::Kind::accepted);
        CHECK(outcome.chunks[0].fate == ChunkFate::already_accepted);
        CHECK(outcome.chunks[1].fate == ChunkFate::already_accepted);
        CHECK(quota.asked.empty());
        CHECK(service.of("POST").empty());
    }
    SUBCASE("no room: nothing posted, and the service lacks it") {
        quota.room = 0;
        auto outcome = run(message_with(3, 0, 0));
        CHECK(outcome.kind == ApiOutcome::Kind::quota);
        REQUIRE(outcome.chunks.size() == 1);
        CHECK(outcome.chunks[0].fate == ChunkFate::quota);
        CHECK(outcome.detail == "route quota exhausted: test");
        CHECK(outcome.accepted_recipients().empty());
        CHECK(outcome.unresolved_recipients().empty());
        CHECK(quota.asked == std::vector<size_t>{3});
        CHECK(service.of("POST").empty());
        CHECK(service.of("GET").size() == 1);  // asked first whether it has it
    }
    SUBCASE("room for one request of two: each request is charged with its recipients") {
        quota.room = 1;
        service.posts = {status(202)};
        auto outcome = run(message_with(70, 0, 0));
        CHECK(outcome.kind == ApiOutcome::Kind::quota);
        REQUIRE(outcome.chunks.size() == 2);
        CHECK(outcome.chunks[0].fate == ChunkFate::accepted);
        CHECK(outcome.chunks[1].fate == ChunkFate::quota);
        CHECK(outcome.accepted_recipients().size() == 50);
        CHECK(outcome.detail == "request 2/2: route quota exhausted: test");
        CHECK(quota.asked == std::vector<size_t>{50, 20});
        CHECK(service.of("POST").size() == 1);
    }
    SUBCASE("the first request the service has, the second new: only the second is charged") {
        service.gets = {exists(0, 50), status(404)};
        service.posts = {status(202)};
        auto outcome = run(message_with(70, 0, 0));
        CHECK(outcome.kind == ApiOutcome::Kind::accepted);
        CHECK(quota.asked == std::vector<size_t>{20});
    }
    SUBCASE("retries within the transaction (429, lost answer) are one charge") {
        service.posts = {status(429), make_error(ErrorKind::no_answer, "timed out"), status(202)};
        auto outcome = run(message_with(1, 0, 0));
        CHECK(outcome.kind == ApiOutcome::Kind::accepted);
        CHECK(service.of("POST").size() == 3);
        CHECK(quota.asked == std::vector<size_t>{1});
    }
    SUBCASE("a repeat of an earlier attempt's uncertain request is not charged again") {
        PostedRequests posted;
        for (int i = 0; i < 4; ++i)
            service.posts.push_back(make_error(ErrorKind::no_answer, "timed out"));
        CHECK(run(message_with(1, 0, 0), &posted).chunks[0].fate == ChunkFate::unresolved);
        CHECK(quota.asked.size() == 1);
        // The client retries at once; the bucket is empty by now. The earlier request may
        // still be running: it is repeated (the service replays or answers 409), not a new
        // message, so the quota has no say.
        quota.room = 0;
        service.requests.clear();
        service.wall += 20s;
        service.posts = {status(202)};
        auto outcome = run(message_with(1, 0, 0), &posted);
        CHECK(outcome.chunks[0].fate == ChunkFate::accepted);
        CHECK(quota.asked.size() == 1);
        CHECK(service.of("POST").size() == 1);
    }
    SUBCASE("when the service cannot say whether it has it, the quota is not asked") {
        quota.room = 0;
        for (int i = 0; i < 8; ++i) service.gets.push_back(status(503));
        auto outcome = run(message_with(1, 0, 0));
        CHECK(quota.asked.empty());
        CHECK(outcome.kind == ApiOutcome::Kind::transient);
        CHECK(service.of("POST").empty());
    }
}

TEST_CASE("submission: when the service cannot say whether it has a request, nothing is posted") {
    PostedRequests posted;
    auto run = [&posted] {
        FakeService service;
        for (int i = 0; i < 4; ++i) service.gets.push_back(status(503));
        ApiHooks hooks = service.hooks();
        hooks.posted = &posted;
        auto outcome =
            submit_to_acs(settings(), message_with(1, 0, 0), kIdentity, service.deadline(), hooks);
        CHECK(service.of("POST").empty());
        CHECK(outcome.kind == ApiOutcome::Kind::transient);
        CHECK(outcome.detail.find("cannot ask the service whether an earlier attempt") == 0);
        return outcome.chunks[0];
    };
    // Never posted by this process: certainly not at the service, the policy may apply.
    auto first = run();
    CHECK(first.fate == ChunkFate::not_sent);
    // Posted by an earlier attempt: only the service knows.
    CHECK(posted.remember(first.operation_id, {}));
    CHECK(run().fate == ChunkFate::unresolved);
    // Without a record of what was posted, every request counts as possibly posted.
    FakeService service;
    for (int i = 0; i < 4; ++i) service.gets.push_back(status(503));
    CHECK(submit(service, message_with(1, 0, 0)).chunks[0].fate == ChunkFate::unresolved);
}

TEST_CASE("submission: a request that cannot be written down first never goes out") {
    testing::TempDir dir;
    PostedRequests posted;
    REQUIRE(posted.open_journal((dir.path() / "journal").string()));
    FakeService service;
    service.gets = {status(404)};
    ApiHooks hooks = service.hooks();
    hooks.posted = &posted;
    ApiOutcome outcome;
    {
        testing::FileSizeLimit full_disk(0);
        outcome =
            submit_to_acs(settings(), message_with(1, 0, 0), kIdentity, service.deadline(), hooks);
    }
    CHECK(service.of("POST").empty());
    CHECK(outcome.kind == ApiOutcome::Kind::transient);
    REQUIRE(outcome.chunks.size() == 1);
    CHECK(outcome.chunks[0].fate == ChunkFate::not_sent);
    CHECK(outcome.detail.find("cannot write") != std::string::npos);
}

TEST_CASE("submission: a Retry-After beyond the budget is a transient failure at once") {
    FakeService service;
    service.posts = {status(429, {{"Retry-After", "600"}})};
    auto outcome = submit(service, message_with(1, 0, 0));
    CHECK(outcome.kind == ApiOutcome::Kind::transient);
    CHECK(service.of("POST").size() == 1);
    CHECK(service.slept == 0s);
    CHECK(outcome.detail.find("HTTP 429") == 0);
    CHECK(outcome.detail.find("time budget") != std::string::npos);
}

TEST_CASE("submission: no request outlasts the deadline") {
    FakeService service;
    service.posts = {status(503), status(503), status(503), status(503)};
    auto outcome = submit(service, message_with(1, 0, 0), settings(), 10s);
    CHECK(outcome.kind == ApiOutcome::Kind::transient);
    for (auto timeout : service.timeouts) CHECK(timeout <= 10s);
    CHECK(service.slept < 10s);
}

TEST_CASE("submission: 4xx is permanent with the service's error text, 413 is oversize") {
    FakeService service;
    service.posts = {
        status(400, {}, R"({"error":{"code":"InvalidSenderUserName","message":"bad sender"}})")};
    auto outcome = submit(service, message_with(1, 0, 0));
    CHECK(outcome.kind == ApiOutcome::Kind::permanent);
    CHECK(outcome.detail == "HTTP 400 InvalidSenderUserName: bad sender");
    service.posts = {status(413)};
    CHECK(submit(service, message_with(1, 0, 0)).kind == ApiOutcome::Kind::oversize);
    service.posts = {status(401)};
    CHECK(submit(service, message_with(1, 0, 0)).kind == ApiOutcome::Kind::transient);
}

TEST_CASE("submission: a partial failure reports exactly what was accepted") {
    FakeService service;
    service.posts = {status(202), status(400, {}, R"({"error":{"code":"BadRequest"}})")};
    auto outcome = submit(service, message_with(120, 0, 0));
    CHECK(outcome.kind == ApiOutcome::Kind::permanent);
    CHECK(outcome.accepted_recipients().size() == 50);
    REQUIRE(outcome.chunks.size() == 3);
    CHECK(outcome.chunks[1].fate == ChunkFate::rejected);
    CHECK(outcome.chunks[2].fate == ChunkFate::not_sent);
    CHECK(outcome.detail == "request 2/3: HTTP 400 BadRequest");
    CHECK(service.of("POST").size() == 2);
}

TEST_CASE("submission: an oversize request is refused before anything is sent") {
    FakeService service;
    ApiSettings api = settings();
    api.max_request_bytes = 2000;
    EmailMessage m = message_with(1, 0, 0);
    m.attachments.push_back(
        {"big.bin", "application/octet-stream", std::string(4000, 'A'), "", 3000});
    auto outcome = submit(service, m, api);
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
