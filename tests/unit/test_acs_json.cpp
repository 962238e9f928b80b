#include <doctest/doctest.h>

#include <nlohmann/json.hpp>
#include <string>

#include "paasmilter/acs_json.hpp"

using namespace paasmilter;
using nlohmann::json;

namespace {

EmailMessage minimal() {
    EmailMessage message;
    message.sender_address = "DoNotReply@contoso.azurecomm.net";
    message.subject = "Hello";
    message.plain_text = "Body";
    message.to.push_back({"alice@example.net", ""});
    return message;
}

}  // namespace

TEST_CASE("to_acs_json: minimal message has only the required fields") {
    const json body = json::parse(to_acs_json(minimal()));
    CHECK(body == json::parse(R"({
        "senderAddress": "DoNotReply@contoso.azurecomm.net",
        "content": {"subject": "Hello", "plainText": "Body"},
        "recipients": {"to": [{"address": "alice@example.net"}]},
        "userEngagementTrackingDisabled": true
    })"));
}

TEST_CASE("to_acs_json: every field") {
    EmailMessage message = minimal();
    message.html = "<p>Body</p>";
    message.to[0].display_name = "Alice";
    message.cc.push_back({"bob@example.net", "Bob"});
    message.bcc.push_back({"carol@example.org", ""});
    message.reply_to.push_back({"scan@printers.local", "MFP"});
    message.attachments.push_back({"scan.pdf", "application/pdf", "JVBERg==", "", 4});
    message.attachments.push_back({"logo.png", "image/png", "iVBO", "logo@contoso.com", 3});
    message.headers = {{"Message-ID", "<1@contoso.com>"}, {"X-Mailer", "MFP"}};
    message.user_engagement_tracking_disabled = false;

    const json body = json::parse(to_acs_json(message));
    CHECK(body == json::parse(R"({
        "senderAddress": "DoNotReply@contoso.azurecomm.net",
        "content": {"subject": "Hello", "plainText": "Body", "html": "<p>Body</p>"},
        "recipients": {
            "to": [{"address": "alice@example.net", "displayName": "Alice"}],
            "cc": [{"address": "bob@example.net", "displayName": "Bob"}],
            "bcc": [{"address": "carol@example.org"}]
        },
        "replyTo": [{"address": "scan@printers.local", "displayName": "MFP"}],
        "attachments": [
            {"name": "scan.pdf", "contentType": "application/pdf", "contentInBase64": "JVBERg=="},
            {"name": "logo.png", "contentType": "image/png", "contentInBase64": "iVBO",
             "contentId": "logo@contoso.com"}
        ],
        "headers": {"Message-ID": "<1@contoso.com>", "X-Mailer": "MFP"},
        "userEngagementTrackingDisabled": false
    })"));
}

TEST_CASE("to_acs_json: recipients.to is present even when everyone is bcc") {
    EmailMessage message = minimal();
    message.bcc = message.to;
    message.to.clear();
    const json body = json::parse(to_acs_json(message));
    REQUIRE(body["recipients"].contains("to"));
    CHECK(body["recipients"]["to"] == json::array());
    CHECK(body["recipients"]["bcc"].size() == 1);
    CHECK_FALSE(body["recipients"].contains("cc"));
}

TEST_CASE("to_acs_json: html only, and an empty plain text, are kept as given") {
    EmailMessage message = minimal();
    message.plain_text.reset();
    message.html = "<b>x</b>";
    json body = json::parse(to_acs_json(message));
    CHECK_FALSE(body["content"].contains("plainText"));
    CHECK(body["content"]["html"] == "<b>x</b>");

    message.html.reset();
    message.plain_text = "";
    body = json::parse(to_acs_json(message));
    CHECK(body["content"]["plainText"] == "");
}

TEST_CASE("to_acs_json: invalid UTF-8 becomes U+FFFD instead of an exception") {
    EmailMessage message = minimal();
    message.subject = "caf\xe9 \xc3\x28";
    message.to[0].display_name = "\xff";
    std::string text;
    REQUIRE_NOTHROW(text = to_acs_json(message));
    const json body = json::parse(text);  // throws on invalid UTF-8
    CHECK(body["content"]["subject"] == "caf\xef\xbf\xbd \xef\xbf\xbd(");
    CHECK(body["recipients"]["to"][0]["displayName"] == "\xef\xbf\xbd");
}

TEST_CASE("to_acs_json: a repeated header name keeps its first value") {
    EmailMessage message = minimal();
    message.headers = {{"X-A", "first"}, {"X-A", "second"}};
    const json body = json::parse(to_acs_json(message));
    CHECK(body["headers"] == json::parse(R"({"X-A": "first"})"));
}

TEST_CASE("to_acs_json: control characters and quotes are escaped") {
    EmailMessage message = minimal();
    message.plain_text = std::string("a\"b\\c\n\td\x01", 9);
    const json body = json::parse(to_acs_json(message));
    CHECK(body["content"]["plainText"] == std::string("a\"b\\c\n\td\x01", 9));
}

TEST_CASE("acs_request_size: exact byte count of the body") {
    EmailMessage message = minimal();
    message.subject = "Grüße 日本";  // multi-byte: bytes, not characters
    message.attachments.push_back(
        {"a.bin", "application/octet-stream", std::string(1000, 'A'), "", 750});
    CHECK(acs_request_size(message) == to_acs_json(message).size());
    CHECK(acs_request_size(message) > 1000);
}
