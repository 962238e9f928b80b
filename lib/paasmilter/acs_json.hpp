// EmailMessage -> the JSON body of ACS Email `POST /emails:send` (api-version 2023-03-31;
// attachments[].contentId needs 2025-09-01 and is written only for inline attachments).
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include "paasmilter/email_message.hpp"

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
// attachments, the bulk of the bytes) is rendered once and each request's body is put
// together when it is sent, so a message to 500 recipients is not held ten times.
class AcsRequestRenderer {
  public:
    // Takes the message apart: its attachments are moved into the rendered text.
    explicit AcsRequestRenderer(EmailMessage message);

    // to_acs_json() of the message with `chunk` as its recipients, byte for byte.
    std::string body(const RecipientChunk& chunk) const;
    size_t body_size(const RecipientChunk& chunk) const;

  private:
    std::string before_recipients_;  // {"senderAddress":...,"content":{...},"recipients":
    std::string after_recipients_;   // ,"replyTo":[...],...,"userEngagementTrackingDisabled":..}
};

}  // namespace paasmilter
