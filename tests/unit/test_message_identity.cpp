#include <doctest/doctest.h>

#include "paasmilter/delivery/message_identity.hpp"

using namespace paasmilter;

namespace {

struct Field {
    std::string name, value;
};

std::string digest_of(const std::vector<Field>& headers, const std::vector<std::string>& body,
                      std::vector<std::string> skip = {"X-PaaS-Route"}) {
    ContentDigest digest(std::move(skip));
    for (const auto& h : headers) digest.add_header(h.name, h.value);
    for (const auto& piece : body) digest.add_body(piece);
    auto out = digest.finish();
    REQUIRE(out.ok());
    return *out;
}

const std::vector<Field> kHeaders = {
    {"From", "scanner@contoso.test"}, {"To", "a@example.net"}, {"Subject", "Scan"}};

}  // namespace

TEST_CASE("content digest: the same message on a retry, whatever Postfix added per attempt") {
    std::string first = digest_of(kHeaders, {"hello\r\n"});
    CHECK(first.size() == 64);
    auto retried = kHeaders;
    retried.insert(retried.begin(), {"Received", "from printer by gw (Postfix) id 4AB12C"});
    retried.insert(retried.begin(), {"Authentication-Results", "gw; spf=pass"});
    retried.push_back({"X-PaaS-Route", "acs"});  // forged by the client, removed anyway
    CHECK(digest_of(retried, {"hel", "lo\r\n"}) == first);
    // Folds handed over with CRLF or LF hash alike.
    CHECK(digest_of({{"Subject", "a\r\n\tb"}}, {}) == digest_of({{"Subject", "a\n\tb"}}, {}));
    // Header names fold case.
    CHECK(digest_of({{"SUBJECT", "x"}}, {}) == digest_of({{"Subject", "x"}}, {}));
}

TEST_CASE("content digest: any difference in content gives another digest") {
    std::string base = digest_of(kHeaders, {"hello\r\n"});
    CHECK(digest_of(kHeaders, {"hello!\r\n"}) != base);
    auto other = kHeaders;
    other[2].value = "Scan 2";
    CHECK(digest_of(other, {"hello\r\n"}) != base);
    // Without Message-ID or Date, two scans with the same subject but another body differ.
    CHECK(digest_of(kHeaders, {"page 1"}) != digest_of(kHeaders, {"page 2"}));
    // Framing: moving bytes between a header's name and value, or between a value and the
    // body, never collides.
    CHECK(digest_of({{"Subject", "ab"}}, {}) != digest_of({{"Subjecta", "b"}}, {}));
    CHECK(digest_of({{"Subject", "ab"}}, {}) != digest_of({{"Subject", "a"}}, {"b"}));
    CHECK(is_per_attempt_header("received"));
    CHECK(is_per_attempt_header("X-PaaS-Route", {"x-paas-route"}));
    CHECK_FALSE(is_per_attempt_header("Message-ID"));
}

TEST_CASE("content digest: the Message-Id and Date Postfix adds per attempt are left out") {
    auto digest = [](const std::string& queue_id, const std::vector<Field>& headers) {
        ContentDigest d({}, queue_id);
        for (const auto& h : headers) d.add_header(h.name, h.value);
        d.add_body("body");
        return *d.finish();
    };
    std::vector<Field> bare = {{"From", "a@contoso.test"}, {"Subject", "alert"}};
    auto attempt = [&](const std::string& qid, const std::string& date) {
        auto h = bare;
        h.push_back({"Message-Id", "<20261204120000." + qid + "@gw.contoso.test>"});
        h.push_back({"Date", date});
        return digest(qid, h);
    };
    CHECK(attempt("4AB12C", "Fri,  4 Dec 2026 12:00:00 +0000") ==
          attempt("77CD01", "Fri,  4 Dec 2026 13:30:00 +0000"));
    CHECK(attempt("4AB12C", "x") == digest("4AB12C", bare));
    // The client's own Message-Id and Date count: two alerts an hour apart are two messages.
    auto client = [&](const std::string& qid, const std::string& date) {
        auto h = bare;
        h.push_back({"Message-Id", "<alert-1@monitor.contoso.test>"});
        h.push_back({"Date", date});
        return digest(qid, h);
    };
    CHECK(client("4AB12C", "Fri,  4 Dec 2026 12:00:00 +0000") !=
          client("4AB12C", "Fri,  4 Dec 2026 13:00:00 +0000"));
    CHECK(client("4AB12C", "d") == client("77CD01", "d"));
}

TEST_CASE("request ids: content, sender and the request's own recipients, in any order") {
    std::string id = request_operation_id("d1", "s@x", {"a@y", "b@y"});
    REQUIRE(id.size() == 36);
    CHECK(id[14] == '5');
    CHECK(id == request_operation_id("d1", "s@x", {"b@y", "a@y"}));
    CHECK(id != request_operation_id("d2", "s@x", {"a@y", "b@y"}));
    CHECK(id != request_operation_id("d1", "t@x", {"a@y", "b@y"}));
    CHECK(id != request_operation_id("d1", "s@x", {"a@y"}));
    CHECK(id != request_operation_id("d1", "", {"a@y", "b@y"}));
}
