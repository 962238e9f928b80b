// The Graph route's draft flow for messages over one request's limit (upload_sessions = true)
// against a scripted service: the requests in order (draft, attachments by POST or upload
// session, ranges, send), what happens to the draft when something fails, 429s, and the send's
// ambiguity under each on_ambiguous.
#include <doctest/doctest.h>

// GCC 12 reports a false "may be used uninitialized" inside std::variant when scripted
// answers (Result<HttpResponse>) are pushed in a loop.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <atomic>
#include <thread>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "fake_service.hpp"
#include "paasmilter/crypto.hpp"
#include "paasmilter/delivery/message_identity.hpp"
#include "paasmilter/providers/provider.hpp"
#include "paasmilter/spool.hpp"
#include "paasmilter/text.hpp"

using namespace paasmilter;
using namespace paasmilter::testing;
using namespace std::chrono_literals;

namespace {

constexpr std::string_view kUsers = "https://graph.example.test/v1.0/users/scanner%40contoso.com";
constexpr std::string_view kUploadUrl =
    "https://outlook.example.test/api/v2.0/Users('u@t')/Messages('AAMk=')/"
    "AttachmentSessions('AAMkS=')?authtoken=eyJ0b2tlbiI6InNlY3JldCJ9";

ApiSettings upload_settings() {
    ApiSettings api;
    api.provider = ApiSettings::Provider::graph;
    api.graph.endpoint = "https://graph.example.test";
    api.graph.mailbox = "scanner@contoso.com";
    api.graph.upload_sessions = true;
    api.max_request_bytes = 4'000'000;
    api.time_budget = 60s;
    api.max_attempts = 4;
    return api;
}

// Bytes that do not compress or repeat, so a misplaced range shows.
std::string file_bytes(size_t size, unsigned seed) {
    std::string out(size, '\0');
    uint32_t x = 2463534242u ^ seed;
    for (char& c : out) {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        c = static_cast<char>(x & 0xff);
    }
    return out;
}

std::string wrapped_base64(std::string_view bytes) {
    std::string flat = base64_encode(bytes);
    std::string out;
    for (size_t i = 0; i < flat.size(); i += 76) out += flat.substr(i, 76) + "\r\n";
    return out;
}

struct Part {
    std::string name;
    std::string type;
    std::string bytes;
    std::string content_id;  // with it, Content-Disposition: inline
};

std::string message_with(const std::vector<Part>& parts, bool with_message_id = true) {
    std::string m =
        "From: Scanner <scanner@contoso.com>\r\n"
        "To: Alice <alice@example.net>\r\n"
        "X-PaaS-Route: forged\r\n"
        "Subject: scan\r\n";
    if (with_message_id) m += "Message-ID: <scan-1@contoso.com>\r\n";
    m += "MIME-Version: 1.0\r\n"
         "Content-Type: multipart/mixed; boundary=\"b1\"\r\n"
         "\r\n"
         "--b1\r\n"
         "Content-Type: text/plain; charset=utf-8\r\n"
         "\r\n"
         "Your scan is attached.\r\n";
    for (const Part& part : parts) {
        m += "--b1\r\nContent-Type: " + part.type + "; name=\"" + part.name + "\"\r\n";
        m += "Content-Transfer-Encoding: base64\r\n";
        if (part.content_id.empty()) {
            m += "Content-Disposition: attachment; filename=\"" + part.name + "\"\r\n";
        } else {
            m += "Content-Disposition: inline; filename=\"" + part.name + "\"\r\n";
            m += "Content-ID: <" + part.content_id + ">\r\n";
        }
        m += "\r\n" + wrapped_base64(part.bytes);
    }
    return m + "--b1--\r\n";
}

struct Run {
    ApiOutcome outcome;
    std::vector<HttpRequest> requests;  // every request but token fetches, in order
};

Run submit(FakeService& service, const ApiSettings& api, const std::string& source,
           PostedRequests* posted = nullptr) {
    MessageSpool spool(1 << 20, "/tmp", 64 << 20);
    REQUIRE(spool.append(source));
    ApiHooks hooks = service.hooks();
    hooks.bearer_token = [](std::chrono::milliseconds) { return Result<std::string>("tok"); };
    hooks.posted = posted;
    ProviderInput input{spool,
                        "scanner@contoso.com",
                        {},
                        {"alice@example.net", "bob@example.org"},
                        {"X-PaaS-Route"},
                        MessageIdentity{"digest", "scanner@contoso.com"},
                        service.deadline(60s)};
    Run run;
    run.outcome = provider_for(api).submit(api, input, hooks);
    run.requests = service.requests;
    return run;
}

HttpResponse created_draft(std::string id = "AAMk=draft/1",
                           std::string message_id = "<scan-1@contoso.com>") {
    nlohmann::json body = {{"id", id}, {"internetMessageId", message_id}, {"isDraft", true}};
    return status(201, {{"Content-Type", "application/json"}}, body.dump());
}

HttpResponse created_session(std::string_view next = "0-") {
    nlohmann::json body = {{"uploadUrl", kUploadUrl},
                           {"expirationDateTime", "2027-01-15T08:00:00.0000000Z"},
                           {"nextExpectedRanges", {next}}};
    return status(201, {{"Content-Type", "application/json"}}, body.dump());
}

HttpResponse range_taken(std::string_view next) {
    nlohmann::json body = {{"ExpirationDateTime", "2027-01-15T08:00:00.0000000Z"},
                           {"nextExpectedRanges", {next}}};
    return status(200, {{"Content-Type", "application/json"}}, body.dump());
}

HttpResponse upload_complete() {
    return status(201, {{"Location", "https://outlook.example.test/api/v2.0/Attachments('A')"}});
}

bool has_header(const HttpRequest& request, std::string_view name) {
    for (const auto& [key, value] : request.headers) {
        if (iequals(key, name)) return true;
    }
    return false;
}

std::string decoded(const std::string& base64) {
    auto bytes = base64_decode(base64);
    REQUIRE(bytes);
    return *bytes;
}

const std::string kScan = file_bytes(3'500'000, 1);

}  // namespace

TEST_CASE("graph upload: a draft, an upload session in ranges without Authorization, then send") {
    ApiSettings api = upload_settings();
    api.max_request_bytes = 1'000'000;  // ranges of 983,040 bytes (3 x 320 KiB)
    FakeService service;
    service.posts = {created_draft(),
                     created_session(),
                     range_taken("983040"),
                     range_taken("1966080-"),
                     range_taken("2949120-3499999"),
                     upload_complete(),
                     status(202)};
    auto run = submit(service, api, message_with({{"scan.pdf", "application/pdf", kScan, ""}}));
    CHECK(run.outcome.kind == ApiOutcome::Kind::accepted);
    CHECK(run.outcome.detail == "HTTP 202");
    CHECK(run.outcome.requests == 7);  // every upload counts as a request
    CHECK(run.outcome.accepted_recipients() ==
          std::vector<std::string>{"alice@example.net", "bob@example.org"});
    REQUIRE(run.requests.size() == 7);

    const HttpRequest& draft = run.requests[0];
    CHECK(draft.method == "POST");
    CHECK(draft.url == std::string(kUsers) + "/messages");
    CHECK(header_of(draft, "Content-Type") == "text/plain");
    CHECK(header_of(draft, "Authorization") == "Bearer tok");
    std::string mime = decoded(draft.body.str());
    CHECK(mime.find("Your scan is attached.") != std::string::npos);
    CHECK(mime.find("Bcc: bob@example.org") != std::string::npos);
    CHECK(mime.find("X-PaaS-Route") == std::string::npos);
    CHECK(mime.find("scan.pdf") == std::string::npos);  // the attachment left the MIME
    CHECK(draft.body.size() <= api.max_request_bytes);

    const std::string message = std::string(kUsers) + "/messages/AAMk%3Ddraft%2F1";
    const HttpRequest& session = run.requests[1];
    CHECK(session.url == message + "/attachments/createUploadSession");
    CHECK(header_of(session, "Content-Type") == "application/json");
    CHECK(header_of(session, "Authorization") == "Bearer tok");
    auto item = nlohmann::json::parse(session.body.str())["AttachmentItem"];
    CHECK(item["attachmentType"] == "file");
    CHECK(item["name"] == "scan.pdf");
    CHECK(item["size"] == 3'500'000);
    CHECK(item["contentType"] == "application/pdf");
    CHECK(item["isInline"] == false);
    CHECK_FALSE(item.contains("contentId"));

    const char* ranges[] = {"bytes 0-983039/3500000", "bytes 983040-1966079/3500000",
                            "bytes 1966080-2949119/3500000", "bytes 2949120-3499999/3500000"};
    std::string uploaded;
    for (size_t i = 0; i < 4; ++i) {
        const HttpRequest& put = run.requests[2 + i];
        CAPTURE(i);
        CHECK(put.method == "PUT");
        CHECK(put.url == kUploadUrl);  // exactly as returned
        CHECK_FALSE(has_header(put, "Authorization"));
        CHECK(header_of(put, "Content-Type") == "application/octet-stream");
        CHECK(header_of(put, "Content-Range") == ranges[i]);
        CHECK(put.body.size() <= 4 * 1024 * 1024);
        uploaded += put.body.str();
    }
    CHECK(uploaded == kScan);

    const HttpRequest& send = run.requests[6];
    CHECK(send.method == "POST");
    CHECK(send.url == message + "/send");
    CHECK(send.body.empty());
    CHECK(header_of(send, "Authorization") == "Bearer tok");
}

TEST_CASE("graph upload: ranges follow nextExpectedRanges; 3.9 MB ranges by default") {
    SUBCASE("the service asks for bytes again") {
        ApiSettings api = upload_settings();
        api.max_request_bytes = 1'000'000;
        FakeService service;
        service.posts = {created_draft(),        created_session(),      range_taken("983040"),
                         range_taken("500000"),  range_taken("1483040"), range_taken("2466080"),
                         range_taken("3449120"), upload_complete(),      status(202)};
        auto run = submit(service, api, message_with({{"scan.pdf", "application/pdf", kScan, ""}}));
        CHECK(run.outcome.kind == ApiOutcome::Kind::accepted);
        auto puts = service.of("PUT");
        REQUIRE(puts.size() == 6);
        CHECK(header_of(puts[2], "Content-Range") == "bytes 500000-1483039/3500000");
        CHECK(puts[2].body.str() == kScan.substr(500000, 983040));
        CHECK(header_of(puts[5], "Content-Range") == "bytes 3449120-3499999/3500000");
    }
    SUBCASE("default request limit: two ranges of at most 3,932,160 bytes") {
        FakeService service;
        std::string big = file_bytes(7'000'000, 2);
        service.posts = {created_draft(), created_session(), range_taken("3932160"),
                         upload_complete(), status(202)};
        auto run = submit(service, upload_settings(),
                          message_with({{"big.bin", "application/octet-stream", big, ""}}));
        CHECK(run.outcome.kind == ApiOutcome::Kind::accepted);
        auto puts = service.of("PUT");
        REQUIRE(puts.size() == 2);
        CHECK(header_of(puts[0], "Content-Range") == "bytes 0-3932159/7000000");
        CHECK(header_of(puts[1], "Content-Range") == "bytes 3932160-6999999/7000000");
        CHECK(puts[0].body.str() + puts[1].body.str() == big);
    }
}

TEST_CASE("graph upload: attachments under 3 MB go by POST, as fileAttachment JSON") {
    ApiSettings api = upload_settings();
    api.max_request_bytes = 1'000'000;  // two 400 kB files do not fit one request with the text
    std::string a = file_bytes(400'000, 3);
    std::string b = file_bytes(400'000, 4);
    FakeService service;
    service.posts = {created_draft(), status(201), status(201), status(202)};
    auto run = submit(service, api,
                      message_with({{"a.pdf", "application/pdf", a, ""},
                                    {"logo.png", "image/png", b, "logo@contoso.com"}}));
    CHECK(run.outcome.kind == ApiOutcome::Kind::accepted);
    REQUIRE(run.requests.size() == 4);
    const std::string message = std::string(kUsers) + "/messages/AAMk%3Ddraft%2F1";
    for (size_t i : {1u, 2u}) {
        CAPTURE(i);
        CHECK(run.requests[i].url == message + "/attachments");
        CHECK(header_of(run.requests[i], "Content-Type") == "application/json");
        CHECK(run.requests[i].body.size() <= api.max_request_bytes);
    }
    auto first = nlohmann::json::parse(run.requests[1].body.str());
    CHECK(first["@odata.type"] == "#microsoft.graph.fileAttachment");
    CHECK(first["name"] == "a.pdf");
    CHECK(first["contentType"] == "application/pdf");
    CHECK(first["isInline"] == false);
    CHECK(decoded(first["contentBytes"].get<std::string>()) == a);
    auto second = nlohmann::json::parse(run.requests[2].body.str());
    CHECK(second["name"] == "logo.png");
    CHECK(second["isInline"] == true);
    CHECK(second["contentId"] == "logo@contoso.com");
    CHECK(decoded(second["contentBytes"].get<std::string>()) == b);
    CHECK(run.requests[3].url == message + "/send");
    CHECK(service.of("PUT").empty());
}

TEST_CASE("graph upload: a failure before the send deletes the draft and sends nothing") {
    SUBCASE("the upload session is gone mid-upload") {
        ApiSettings api = upload_settings();
        api.max_request_bytes = 1'000'000;
        FakeService service;
        service.posts = {created_draft(), created_session(), range_taken("983040"),
                         status(404, {}, R"({"error":{"code":"ErrorItemNotFound","message":"x"}})"),
                         status(204)};
        auto run = submit(service, api, message_with({{"scan.pdf", "application/pdf", kScan, ""}}));
        CHECK(run.outcome.kind == ApiOutcome::Kind::transient);
        REQUIRE(run.outcome.chunks.size() == 1);
        CHECK(run.outcome.chunks[0].fate == ChunkFate::not_sent);
        CHECK(run.outcome.unresolved_recipients().empty());
        CHECK(run.outcome.detail.find("upload of attachment 1 of 1 (3500000 bytes): HTTP 404") ==
              0);
        CHECK(run.outcome.detail.find("authtoken") == std::string::npos);  // never logged
        REQUIRE(run.requests.size() == 5);
        CHECK(run.requests.back().method == "DELETE");
        CHECK(run.requests.back().url == std::string(kUsers) + "/messages/AAMk%3Ddraft%2F1");
        for (const auto& request : run.requests)
            CHECK(request.url.find("/send") == std::string::npos);
    }
    SUBCASE("no permission to create drafts: on_failure, never a bounce, nothing to delete") {
        FakeService service;
        service.posts = {status(403, {}, R"({"error":{"code":"ErrorAccessDenied",
                                             "message":"Access is denied."}})")};
        auto run = submit(service, upload_settings(),
                          message_with({{"scan.pdf", "application/pdf", kScan, ""}}));
        CHECK(run.outcome.kind == ApiOutcome::Kind::transient);
        CHECK(run.outcome.chunks[0].fate == ChunkFate::not_sent);
        CHECK(run.requests.size() == 1);
        CHECK(run.outcome.detail.find("creating the draft: HTTP 403 ErrorAccessDenied") == 0);
        CHECK(run.outcome.detail.find("Mail.ReadWrite") != std::string::npos);
    }
    SUBCASE("a range without an answer: a new draft from the start, never a blind repeat") {
        FakeService service;
        service.posts = {created_draft("d1"),
                         created_session(),
                         Result<HttpResponse>(make_error(ErrorKind::no_answer, "timed out")),
                         status(204),
                         created_draft("d2"),
                         created_session(),
                         upload_complete(),
                         status(202)};
        auto run = submit(service, upload_settings(),
                          message_with({{"scan.pdf", "application/pdf", kScan, ""}}));
        CHECK(run.outcome.kind == ApiOutcome::Kind::accepted);
        CHECK_FALSE(run.outcome.possible_duplicate);  // nothing had been sent
        REQUIRE(run.requests.size() == 8);
        CHECK(run.requests[3].method == "DELETE");
        CHECK(run.requests[3].url == std::string(kUsers) + "/messages/d1");
        CHECK(header_of(run.requests[6], "Content-Range") == "bytes 0-3499999/3500000");
        CHECK(run.requests[7].url == std::string(kUsers) + "/messages/d2/send");
    }
    SUBCASE("a draft that cannot be deleted is named in the detail") {
        FakeService service;
        service.posts = {created_draft(), status(400, {}, R"({"error":{"code":"BadRequest",
                                                              "message":"no"}})"),
                         status(500), status(500)};
        auto run = submit(service, upload_settings(),
                          message_with({{"scan.pdf", "application/pdf", kScan, ""}}));
        CHECK(run.outcome.kind == ApiOutcome::Kind::transient);
        CHECK(run.outcome.detail.find("a draft could not be deleted") != std::string::npos);
        CHECK(service.of("DELETE").size() == 2);
    }
}

TEST_CASE("graph upload: 429s are waited out, within the time budget") {
    SUBCASE("on a range, with Retry-After: the same range again") {
        FakeService service;
        service.posts = {created_draft(), created_session(), status(429, {{"Retry-After", "3"}}),
                         upload_complete(), status(202)};
        auto run = submit(service, upload_settings(),
                          message_with({{"scan.pdf", "application/pdf", kScan, ""}}));
        CHECK(run.outcome.kind == ApiOutcome::Kind::accepted);
        CHECK(service.slept == 3s);
        auto puts = service.of("PUT");
        REQUIRE(puts.size() == 2);
        CHECK(header_of(puts[0], "Content-Range") == header_of(puts[1], "Content-Range"));
        CHECK(run.outcome.requests == 5);
    }
    SUBCASE("on the draft and on the send, without Retry-After: 1 s, then 2 s") {
        FakeService service;
        service.posts = {status(429),       status(429), created_draft(), created_session(),
                         upload_complete(), status(429), status(202)};
        auto run = submit(service, upload_settings(),
                          message_with({{"scan.pdf", "application/pdf", kScan, ""}}));
        CHECK(run.outcome.kind == ApiOutcome::Kind::accepted);
        CHECK(service.slept == 1s + 2s + 1s);
        CHECK(service.of("POST").size() == 6);
        CHECK(run.outcome.detail == "HTTP 202");
    }
    SUBCASE("a Retry-After past the budget: the draft is deleted, nothing sent") {
        FakeService service;
        service.posts = {created_draft(), created_session(), status(429, {{"Retry-After", "300"}}),
                         status(204)};
        auto run = submit(service, upload_settings(),
                          message_with({{"scan.pdf", "application/pdf", kScan, ""}}));
        CHECK(run.outcome.kind == ApiOutcome::Kind::transient);
        CHECK(run.outcome.chunks[0].fate == ChunkFate::not_sent);
        CHECK(run.outcome.detail.find("would exceed the time budget") != std::string::npos);
        CHECK(service.requests.back().method == "DELETE");
        CHECK(service.slept == 0s);
    }
}

TEST_CASE("graph upload: a send without a clear answer, under each on_ambiguous") {
    const std::string source = message_with({{"scan.pdf", "application/pdf", kScan, ""}});
    auto sends = [](const FakeService& service) {
        size_t n = 0;
        for (const auto& r : service.requests) n += r.url.ends_with("/send");
        return n;
    };
    SUBCASE("tempfail: a new draft is made and sent; the old one deleted; possibly twice") {
        FakeService service;
        service.posts = {created_draft("d1"), created_session(), upload_complete(),
                         status(504),         status(404),       created_draft("d2"),
                         created_session(),   upload_complete(), status(202)};
        auto run = submit(service, upload_settings(), source);
        CHECK(run.outcome.kind == ApiOutcome::Kind::accepted);
        CHECK(run.outcome.possible_duplicate);
        CHECK(run.outcome.detail.find("possibly sent twice") != std::string::npos);
        CHECK(sends(service) == 2);
        REQUIRE(run.requests.size() == 9);
        CHECK(run.requests[4].method == "DELETE");
        CHECK(run.requests[4].url == std::string(kUsers) + "/messages/d1");
        CHECK(run.requests[8].url == std::string(kUsers) + "/messages/d2/send");
    }
    SUBCASE("hold: not sent again; the recipients are unresolved; the draft is deleted") {
        ApiSettings api = upload_settings();
        api.on_ambiguous = AmbiguityPolicy::hold;
        FakeService service;
        service.posts = {created_draft(), created_session(), upload_complete(),
                         Result<HttpResponse>(make_error(ErrorKind::no_answer, "timed out")),
                         status(204)};
        auto run = submit(service, api, source);
        CHECK(run.outcome.kind == ApiOutcome::Kind::transient);
        CHECK(run.outcome.chunks[0].fate == ChunkFate::unresolved);
        CHECK(run.outcome.unresolved_recipients().size() == 2);
        CHECK(run.outcome.detail.find("Graph may have sent it") != std::string::npos);
        CHECK(sends(service) == 1);
        CHECK(run.requests.back().method == "DELETE");
    }
    SUBCASE("assume-sent: not sent again, and the draft is left alone") {
        ApiSettings api = upload_settings();
        api.on_ambiguous = AmbiguityPolicy::assume_sent;
        FakeService service;
        service.posts = {created_draft(), created_session(), upload_complete(), status(503)};
        auto run = submit(service, api, source);
        CHECK(run.outcome.chunks[0].fate == ChunkFate::unresolved);
        CHECK(sends(service) == 1);
        CHECK(service.of("DELETE").empty());
    }
    SUBCASE("sent_items_check: the Message-ID Exchange gave the draft is looked for") {
        ApiSettings api = upload_settings();
        api.on_ambiguous = AmbiguityPolicy::hold;
        api.graph.sent_items_check = true;
        FakeService service;
        service.posts = {created_draft("d1", "<AAA@prod.outlook.com>"), created_session(),
                         upload_complete(), status(504)};
        service.gets = {status(
            200, {},
            R"({"value":[{"id":"sent-1","toRecipients":[{"emailAddress":{"address":"Alice@Example.net"}}],"bccRecipients":[{"emailAddress":{"address":"bob@example.org"}}]}]})")};
        auto run =
            submit(service, api, message_with({{"scan.pdf", "application/pdf", kScan, ""}}, false));
        CHECK(run.outcome.kind == ApiOutcome::Kind::accepted);
        CHECK(run.outcome.detail.find("found in Sent Items") == 0);
        auto gets = service.of("GET");
        REQUIRE(gets.size() == 1);
        CHECK(gets[0].url.find("%3CAAA%40prod.outlook.com%3E") != std::string::npos);
        CHECK(service.of("DELETE").empty());
    }
    SUBCASE("a client's retry after an ambiguous send looks before it makes a draft") {
        PostedRequests posted;
        ApiSettings api = upload_settings();
        api.on_ambiguous = AmbiguityPolicy::hold;
        api.graph.sent_items_check = true;
        {
            FakeService first;
            first.posts = {created_draft(), created_session(), upload_complete(), status(502),
                           status(204)};
            first.gets = {status(200, {}, R"({"value":[]})")};
            CHECK(submit(first, api, source, &posted).outcome.chunks[0].fate ==
                  ChunkFate::unresolved);
        }
        FakeService retry;
        retry.gets = {status(
            200, {},
            R"({"value":[{"id":"x","toRecipients":[{"emailAddress":{"address":"Alice@Example.net"}}],"bccRecipients":[{"emailAddress":{"address":"bob@example.org"}}]}]})")};
        auto run = submit(retry, api, source, &posted);
        CHECK(run.outcome.kind == ApiOutcome::Kind::accepted);
        CHECK(run.outcome.chunks[0].fate == ChunkFate::already_accepted);
        CHECK(retry.of("POST").empty());
    }
}

TEST_CASE("graph upload: what cannot go as a draft takes on_oversize") {
    SUBCASE("without upload_sessions, over one request: the hint names the key") {
        ApiSettings api = upload_settings();
        api.graph.upload_sessions = false;
        const ApiProvider& provider = provider_for(api);
        CHECK(provider.max_source_bytes(api) == 3'000'000);
        std::string hint = provider.oversize_hint(api);
        CHECK(hint.find("upload_sessions = true") != std::string::npos);
        CHECK(hint.find("Mail.ReadWrite") != std::string::npos);
        FakeService service;
        std::string source =
            message_with({{"a.bin", "application/octet-stream", file_bytes(2'200'000, 5), ""}});
        auto run = submit(service, api, source);
        CHECK(run.outcome.kind == ApiOutcome::Kind::oversize);
        CHECK(service.requests.empty());
    }
    SUBCASE("with upload_sessions the spool takes max_message_bytes") {
        ApiSettings api = upload_settings();
        CHECK(provider_for(api).max_source_bytes(api) == 35'000'000);
        CHECK(provider_for(api).oversize_hint(api).empty());
        api.graph.max_message_bytes = 150'000'000;
        CHECK(provider_for(api).max_source_bytes(api) == 150'000'000);
    }
    SUBCASE("a text too large for a draft") {
        FakeService service;
        std::string source =
            "From: s@contoso.com\r\nTo: alice@example.net\r\nSubject: log\r\n\r\n" +
            std::string(3'200'000, 'x') + "\r\n";
        auto run = submit(service, upload_settings(), source);
        CHECK(run.outcome.kind == ApiOutcome::Kind::oversize);
        CHECK(run.outcome.detail.find("its text is too large for a draft") != std::string::npos);
        CHECK(service.requests.empty());
    }
    SUBCASE("a 413 on the draft: oversize, nothing to delete") {
        FakeService service;
        service.posts = {status(413)};
        auto run = submit(service, upload_settings(),
                          message_with({{"scan.pdf", "application/pdf", kScan, ""}}));
        CHECK(run.outcome.kind == ApiOutcome::Kind::oversize);
        CHECK(service.requests.size() == 1);
    }
}

TEST_CASE("graph upload: every request of the flow takes one of the mailbox's 4 slots") {
    ApiSettings api = upload_settings();
    api.graph.mailbox = "uploads@contoso.com";
    std::atomic<int> puts{0};
    auto answer = [&](const HttpRequest& request) {
        if (request.method == "PUT") {
            ++puts;
            return upload_complete();
        }
        if (request.url.ends_with("/send")) return status(202);
        if (request.url.ends_with("/createUploadSession")) return created_session();
        return created_draft();
    };
    const std::string source = message_with({{"scan.pdf", "application/pdf", kScan, ""}});
    auto run = submit_concurrently(api, source, 8, 5ms, answer);
    CHECK(run.accepted == 8);
    CHECK(puts == 8);
    CHECK(run.most_in_flight <= 4);
}
