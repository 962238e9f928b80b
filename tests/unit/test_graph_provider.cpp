// The Microsoft Graph provider against a scripted service: what it sends, how it retries,
// and what it makes of answers that leave open whether the message went out.
#include <doctest/doctest.h>

// GCC 12 reports a false "may be used uninitialized" inside std::variant when scripted
// answers (Result<HttpResponse>) are pushed in a loop.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <atomic>
#include <mutex>
#include <thread>

#include <fmt/format.h>

#include "fake_service.hpp"
#include "paasmilter/crypto.hpp"
#include "paasmilter/delivery/message_identity.hpp"
#include "paasmilter/providers/provider.hpp"
#include "paasmilter/spool.hpp"

using namespace paasmilter;
using namespace paasmilter::testing;
using namespace std::chrono_literals;

namespace {

const std::string kMessage =
    "From: Scanner <scanner@contoso.com>\r\n"
    "To: Alice <alice@example.net>\r\n"
    "X-PaaS-Route: forged\r\n"
    "Subject: scan\r\n"
    "Message-ID: <scan-1@contoso.com>\r\n"
    "\r\n"
    "page 1\r\n";

ApiSettings graph_settings() {
    ApiSettings api;
    api.provider = ApiSettings::Provider::graph;
    api.graph.endpoint = "https://graph.example.test";
    api.graph.mailbox = "scanner@contoso.com";
    api.max_request_bytes = 4'000'000;
    api.time_budget = 60s;
    api.max_attempts = 4;
    return api;
}

struct Run {
    ApiOutcome outcome;
    std::vector<HttpRequest> posts;
    std::vector<HttpRequest> gets;
};

Run submit_graph(FakeService& service, const ApiSettings& api, PostedRequests* posted = nullptr,
                 const std::string& source = kMessage,
                 std::vector<std::string> recipients = {"alice@example.net", "bob@example.org"}) {
    MessageSpool spool(1 << 20, "/tmp", 1 << 24);
    REQUIRE(spool.append(source));
    ApiHooks hooks = service.hooks();
    hooks.bearer_token = [](std::chrono::milliseconds) { return Result<std::string>("tok"); };
    hooks.posted = posted;
    ProviderInput input{spool,
                        "scanner@contoso.com",
                        {},
                        std::move(recipients),
                        {"X-PaaS-Route"},
                        MessageIdentity{"digest", "scanner@contoso.com"},
                        service.deadline(60s)};
    Run run;
    run.outcome = provider_for(api).submit(api, input, hooks);
    run.posts = service.of("POST");
    run.gets = service.of("GET");
    return run;
}

std::string submitted_mime(const HttpRequest& request) {
    auto decoded = base64_decode(request.body.str());
    REQUIRE(decoded);
    return *decoded;
}

}  // namespace

TEST_CASE("graph: the message goes to sendMail as MIME, with the envelope as Bcc") {
    FakeService service;
    service.posts = {status(202)};
    auto run = submit_graph(service, graph_settings());
    CHECK(run.outcome.kind == ApiOutcome::Kind::accepted);
    REQUIRE(run.posts.size() == 1);
    const HttpRequest& post = run.posts[0];
    CHECK(post.url == "https://graph.example.test/v1.0/users/scanner%40contoso.com/sendMail");
    CHECK(header_of(post, "Content-Type") == "text/plain");
    CHECK(header_of(post, "Authorization") == "Bearer tok");
    std::string mime = submitted_mime(post);
    CHECK(mime.find("X-PaaS-Route") == std::string::npos);
    CHECK(mime.find("To: Alice <alice@example.net>\r\n") != std::string::npos);
    CHECK(mime.find("Bcc: bob@example.org") != std::string::npos);
    CHECK(mime.find("\r\n\r\npage 1\r\n") != std::string::npos);
    REQUIRE(run.outcome.chunks.size() == 1);
    CHECK(run.outcome.accepted_recipients() ==
          std::vector<std::string>{"alice@example.net", "bob@example.org"});
}

TEST_CASE("graph: a 429 is waited out, with or without Retry-After") {
    FakeService service;
    service.posts = {status(429), status(429, {{"Retry-After", "7"}}), status(202)};
    auto run = submit_graph(service, graph_settings());
    CHECK(run.outcome.kind == ApiOutcome::Kind::accepted);
    CHECK(run.posts.size() == 3);
    CHECK(service.slept == 1s + 7s);  // exponential from 1 s without the header
    CHECK(run.outcome.detail == "HTTP 202");
    CHECK_FALSE(run.outcome.possible_duplicate);
}

TEST_CASE("graph: failures that are not the message's fault are not bounces") {
    for (long code : {401L, 403L, 404L}) {
        CAPTURE(code);
        FakeService service;
        service.posts = {status(code), status(code)};
        auto run = submit_graph(service, graph_settings());
        CHECK(run.outcome.kind == ApiOutcome::Kind::transient);
        CHECK(run.outcome.chunks[0].fate == ChunkFate::not_sent);
        CHECK(run.posts.size() == (code == 401 ? 2u : 1u));  // one new token after a 401
    }
    FakeService refused;
    refused.posts = {status(400, {}, R"({"error":{"code":"ErrorInvalidRecipients",
                                         "message":"bad"}})")};
    auto run = submit_graph(refused, graph_settings());
    CHECK(run.outcome.kind == ApiOutcome::Kind::permanent);
    CHECK(run.outcome.detail == "HTTP 400 ErrorInvalidRecipients: bad");
    FakeService too_big;
    too_big.posts = {status(413)};
    CHECK(submit_graph(too_big, graph_settings()).outcome.kind == ApiOutcome::Kind::oversize);
    FakeService over_mailbox_limit;
    over_mailbox_limit.posts = {status(400, {}, R"({"error":{"code":"ErrorMessageSizeExceeded",
                                                    "message":"too big"}})")};
    CHECK(submit_graph(over_mailbox_limit, graph_settings()).outcome.kind ==
          ApiOutcome::Kind::oversize);
}

TEST_CASE("graph: an ambiguous answer is sent again only when duplicates are preferred") {
    SUBCASE("on_ambiguous = tempfail: sent again, and the log says it may have gone twice") {
        FakeService service;
        service.posts = {status(504), status(202)};
        auto run = submit_graph(service, graph_settings());
        CHECK(run.outcome.kind == ApiOutcome::Kind::accepted);
        CHECK(run.posts.size() == 2);
        CHECK(run.outcome.possible_duplicate);
        CHECK(run.outcome.detail.find("possibly sent twice") != std::string::npos);
    }
    SUBCASE("on_ambiguous = hold: not sent again; the recipients are unresolved") {
        ApiSettings api = graph_settings();
        api.on_ambiguous = AmbiguityPolicy::hold;
        FakeService service;
        service.posts = {Result<HttpResponse>(make_error(ErrorKind::no_answer, "timed out"))};
        auto run = submit_graph(service, api);
        CHECK(run.posts.size() == 1);
        CHECK(run.outcome.kind == ApiOutcome::Kind::transient);
        CHECK(run.outcome.unresolved_recipients().size() == 2);
        CHECK(run.outcome.detail.find("Graph may have sent it") != std::string::npos);
    }
    SUBCASE("a request that never left is retried whatever the policy") {
        ApiSettings api = graph_settings();
        api.on_ambiguous = AmbiguityPolicy::hold;
        FakeService service;
        service.posts = {Result<HttpResponse>(make_error(ErrorKind::request_not_sent, "refused")),
                         status(202)};
        auto run = submit_graph(service, api);
        CHECK(run.outcome.kind == ApiOutcome::Kind::accepted);
        CHECK(run.outcome.detail == "HTTP 202");
    }
    SUBCASE("with sent_items_check: found in Sent Items counts as sent") {
        ApiSettings api = graph_settings();
        api.graph.sent_items_check = true;
        FakeService service;
        service.posts = {status(504)};
        service.gets = {status(200, {}, R"({"value":[{"id":"other-batch","toRecipients":[
                                            {"emailAddress":{"address":"carol@example.com"}}]},
                                           {"id":"AAMk","internetMessageId":"<scan-1@contoso.com>","toRecipients":[{"emailAddress":{"address":"Alice@Example.net"}}],"bccRecipients":[{"emailAddress":{"address":"bob@example.org"}}]}]})")};
        auto run = submit_graph(service, api);
        CHECK(run.outcome.kind == ApiOutcome::Kind::accepted);
        CHECK(run.posts.size() == 1);
        REQUIRE(run.gets.size() == 1);
        CHECK(run.gets[0].url ==
              "https://graph.example.test/v1.0/users/scanner%40contoso.com/mailFolders/SentItems/"
              "messages?$filter=internetMessageId%20eq%20%27%3Cscan-1%40contoso.com%3E%27"
              "&$select=id,internetMessageId,toRecipients,ccRecipients,bccRecipients&$top=10");
        CHECK(run.outcome.detail.find("found in Sent Items") == 0);
    }
}

TEST_CASE("graph: a copy in Sent Items counts only if it went to these recipients") {
    // Postfix may split one message into several transactions with the same Message-ID.
    ApiSettings api = graph_settings();
    api.graph.sent_items_check = true;
    api.on_ambiguous = AmbiguityPolicy::hold;
    FakeService service;
    service.posts = {status(504)};
    service.gets = {status(200, {}, R"({"value":[{"id":"batch-1","toRecipients":[
                                        {"emailAddress":{"address":"alice@example.net"}}]}]})")};
    auto run = submit_graph(service, api);
    CHECK(run.outcome.chunks[0].fate == ChunkFate::unresolved);
    CHECK(run.posts.size() == 1);
}

TEST_CASE("graph: a client's retry after an accepted attempt is not sent again") {
    PostedRequests posted;
    FakeService first;
    first.posts = {status(202)};
    CHECK(submit_graph(first, graph_settings(), &posted).outcome.kind ==
          ApiOutcome::Kind::accepted);
    for (int retry_number = 1; retry_number <= 2; ++retry_number) {
        CAPTURE(retry_number);
        FakeService retry;  // the client never saw our 250 and sends the message again
        auto run = submit_graph(retry, graph_settings(), &posted);
        CHECK(run.posts.empty());
        CHECK(run.outcome.kind == ApiOutcome::Kind::accepted);
        CHECK(run.outcome.chunks[0].fate == ChunkFate::already_accepted);
    }
}

TEST_CASE("graph: the route's quota is charged only for a message about to be sent") {
    PostedRequests posted;
    std::vector<size_t> asked;
    bool room = true;
    auto with_quota = [&](FakeService& service, const ApiSettings& api) {
        MessageSpool spool(1 << 20, "/tmp", 1 << 24);
        REQUIRE(spool.append(kMessage));
        ApiHooks hooks = service.hooks();
        hooks.bearer_token = [](std::chrono::milliseconds) { return Result<std::string>("tok"); };
        hooks.posted = &posted;
        hooks.admit = [&](size_t recipients) {
            asked.push_back(recipients);
            return room ? ApiHooks::Admission{}
                        : ApiHooks::Admission{false, "route quota exhausted: test"};
        };
        ProviderInput input{spool,
                            "scanner@contoso.com",
                            {},
                            {"alice@example.net", "bob@example.org"},
                            {"X-PaaS-Route"},
                            MessageIdentity{"digest", "scanner@contoso.com"},
                            service.deadline(60s)};
        return provider_for(api).submit(api, input, hooks);
    };
    SUBCASE("no room: nothing sent, the quota policy applies") {
        room = false;
        FakeService service;
        auto outcome = with_quota(service, graph_settings());
        CHECK(outcome.kind == ApiOutcome::Kind::quota);
        CHECK(outcome.chunks[0].fate == ChunkFate::quota);
        CHECK(service.of("POST").empty());
        CHECK(asked == std::vector<size_t>{2});
    }
    SUBCASE("a client's retry of an accepted message takes nothing, even with no room") {
        FakeService first;
        first.posts = {status(202)};
        CHECK(with_quota(first, graph_settings()).kind == ApiOutcome::Kind::accepted);
        CHECK(asked.size() == 1);
        room = false;
        FakeService retry;
        auto outcome = with_quota(retry, graph_settings());
        CHECK(outcome.kind == ApiOutcome::Kind::accepted);
        CHECK(outcome.chunks[0].fate == ChunkFate::already_accepted);
        CHECK(asked.size() == 1);
        CHECK(retry.of("POST").empty());
    }
    SUBCASE("after an ambiguous attempt, no room keeps it unresolved (never sent elsewhere)") {
        ApiSettings api = graph_settings();
        api.graph.sent_items_check = true;
        api.on_ambiguous = AmbiguityPolicy::tempfail;
        FakeService first;
        first.posts = {status(502), status(502), status(502), status(502)};
        for (int i = 0; i < 4; ++i) first.gets.push_back(status(200, {}, R"({"value":[]})"));
        CHECK(with_quota(first, api).chunks[0].fate == ChunkFate::unresolved);
        room = false;
        FakeService retry;
        retry.gets = {status(200, {}, R"({"value":[]})")};
        auto outcome = with_quota(retry, api);
        CHECK(outcome.chunks[0].fate == ChunkFate::unresolved);
        CHECK(outcome.kind == ApiOutcome::Kind::transient);
        CHECK(retry.of("POST").empty());
    }
}

TEST_CASE("graph: an undocumented success is not taken for a failure of the message") {
    ApiSettings api = graph_settings();
    api.on_ambiguous = AmbiguityPolicy::hold;
    FakeService service;
    service.posts = {status(200)};
    auto run = submit_graph(service, api);
    CHECK(run.outcome.chunks[0].fate == ChunkFate::unresolved);
    CHECK(run.outcome.kind == ApiOutcome::Kind::transient);
}

TEST_CASE("graph: a client's retry after an ambiguous attempt looks before it sends") {
    PostedRequests posted;
    ApiSettings api = graph_settings();
    api.graph.sent_items_check = true;
    {
        FakeService first;
        first.posts = {status(502)};
        first.gets = {status(200, {}, R"({"value":[]})")};
        api.on_ambiguous = AmbiguityPolicy::hold;
        auto run = submit_graph(first, api, &posted);
        CHECK(run.outcome.chunks[0].fate == ChunkFate::unresolved);
    }
    SUBCASE("found: not sent again") {
        FakeService retry;
        retry.gets = {status(
            200, {},
            R"({"value":[{"id":"x","toRecipients":[{"emailAddress":{"address":"Alice@Example.net"}}],"bccRecipients":[{"emailAddress":{"address":"bob@example.org"}}]}]})")};
        auto run = submit_graph(retry, api, &posted);
        CHECK(run.posts.empty());
        CHECK(run.outcome.kind == ApiOutcome::Kind::accepted);
        CHECK(run.outcome.chunks[0].fate == ChunkFate::already_accepted);
    }
    SUBCASE("not found, and duplicates are not wanted: still unresolved, nothing sent") {
        FakeService retry;
        retry.gets = {status(200, {}, R"({"value":[]})")};
        auto run = submit_graph(retry, api, &posted);
        CHECK(run.posts.empty());
        CHECK(run.outcome.chunks[0].fate == ChunkFate::unresolved);
    }
    SUBCASE("not found, and on_ambiguous = tempfail: sent again") {
        api.on_ambiguous = AmbiguityPolicy::tempfail;
        FakeService retry;
        retry.gets = {status(200, {}, R"({"value":[]})")};
        retry.posts = {status(202)};
        auto run = submit_graph(retry, api, &posted);
        CHECK(run.posts.size() == 1);
        CHECK(run.outcome.kind == ApiOutcome::Kind::accepted);
        CHECK(run.outcome.detail.find("possibly sent twice") != std::string::npos);
    }
}

TEST_CASE("graph: a message over the single-request limit takes the oversize policy unsent") {
    FakeService service;
    std::string big = kMessage + std::string(3'100'000, 'x');
    auto run = submit_graph(service, graph_settings(), nullptr, big);
    CHECK(run.outcome.kind == ApiOutcome::Kind::oversize);
    CHECK(service.requests.empty());
    CHECK(run.outcome.detail.find("too large for Microsoft Graph") != std::string::npos);
}

TEST_CASE("graph: never more than 4 requests at a time per mailbox") {
    ApiSettings api = graph_settings();
    api.graph.mailbox = "busy@contoso.com";
    auto run = submit_concurrently(api, kMessage, 10, 30ms,
                                   [](const HttpRequest&) { return status(202); });
    CHECK(run.accepted == 10);
    CHECK(run.most_in_flight <= 4);
    CHECK(run.most_in_flight >= 2);
}
