// EmailMessage -> the JSON body of ACS Email `POST /emails:send` (api-version 2023-03-31;
// attachments[].contentId needs 2025-09-01 and is written only for inline attachments).
#pragma once

#include <cstddef>
#include <string>

#include "paasmilter/email_message.hpp"

namespace paasmilter {

// The request body, compact, valid UTF-8 whatever the message holds (invalid bytes become
// U+FFFD). Empty optional fields and arrays are left out; recipients.to, content.subject and
// userEngagementTrackingDisabled are always present.
std::string to_acs_json(const EmailMessage& message);

// Exact byte size of to_acs_json(message): what ACS counts against its 10 MB request limit.
size_t acs_request_size(const EmailMessage& message);

}  // namespace paasmilter
