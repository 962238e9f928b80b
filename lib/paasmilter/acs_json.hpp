// EmailMessage -> the JSON body of ACS Email `POST /emails:send` (api-version 2023-03-31;
// attachments[].contentId needs 2025-09-01 and is written only for inline attachments).
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include "paasmilter/email_message.hpp"
#include "paasmilter/http_client.hpp"

namespace paasmilter {

// The request body, compact, valid UTF-8 whatever the message holds (invalid bytes become
// U+FFFD). Empty optional fields and arrays are left out; recipients.to, content.subject and
// userEngagementTrackingDisabled are always present.
std::string to_acs_json(const EmailMessage& message);

// Exact byte size of to_acs_json(message): what ACS counts against its 10 MB request limit.
size_t acs_request_size(const EmailMessage& message);

// The recipients of one request (at most 50 for ACS).
struct RecipientChunk {
    std::vector<EmailAddress> to, cc, bcc;
    size_t size() const { return to.size() + cc.size() + bcc.size(); }
    std::vector<std::string> addresses() const;
};

// The requests of one message differ only in their recipients: the rest (content and
// attachments, the bulk of the bytes) is rendered once, and each request's body is a list of
// pieces that share it. The attachments' base64 text is not copied at all: it becomes a
// piece as the conversion made it. So a large message is in memory once, whatever the number
// of requests (500 recipients: ten) and of attempts.
class AcsRequestRenderer {
  public:
    // Takes the message apart: its attachments' text moves into the rendered pieces.
    explicit AcsRequestRenderer(EmailMessage message);

    // to_acs_json() of the message with `chunk` as its recipients, byte for byte.
    HttpBody body(const RecipientChunk& chunk) const;
    size_t body_size(const RecipientChunk& chunk) const;

  private:
    HttpBody before_recipients_;  // {"senderAddress":...,"content":{...},"recipients":
    HttpBody after_recipients_;   // ,"replyTo":[...],...,"userEngagementTrackingDisabled":..}
};

}  // namespace paasmilter
