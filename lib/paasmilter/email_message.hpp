// A message as a PaaS mail API sees it: the result of converting the MIME message Postfix
// received (see mime_convert.hpp), before it is rendered into one provider's JSON.
#pragma once

#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace paasmilter {

struct EmailAddress {
    std::string address;       // "user@example.com"
    std::string display_name;  // UTF-8, decoded from RFC 2047; may be empty
};

struct Attachment {
    std::string name;            // UTF-8 file name (RFC 2231/2047 decoded); never empty
    std::string content_type;    // "application/pdf"
    std::string content_base64;  // the decoded content, base64-encoded again (no line breaks)
    std::string content_id;      // without <>; set only for inline parts referenced by cid:
    size_t size = 0;             // decoded size in bytes
};

struct EmailMessage {
    std::string sender_address;  // what the API sends from (a verified domain)
    std::string subject;         // UTF-8
    std::optional<std::string> plain_text;
    std::optional<std::string> html;
    std::vector<EmailAddress> to;
    std::vector<EmailAddress> cc;
    std::vector<EmailAddress> bcc;
    std::vector<EmailAddress> reply_to;
    std::vector<Attachment> attachments;
    std::vector<std::pair<std::string, std::string>> headers;  // custom headers passed through
    bool user_engagement_tracking_disabled = true;

    size_t recipient_count() const { return to.size() + cc.size() + bcc.size(); }
};

}  // namespace paasmilter
