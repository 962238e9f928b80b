// MIME -> EmailMessage with GMime 3 (never a hand-written MIME parser).
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "paasmilter/email_message.hpp"
#include "paasmilter/result.hpp"
#include "paasmilter/route_addresses.hpp"

namespace paasmilter {

enum class SenderSource { header, envelope };

struct ConversionOptions {
    // What the API sends from, e.g. "DoNotReply@contoso.azurecomm.net". Used when the original
    // sender is not in a verified domain (ACS only sends from verified domains).
    std::string sender;
    // Domains verified at the provider: an original sender in one of them (exactly, case-
    // insensitive) is kept as the sender.
    std::vector<std::string> verified_domains;
    // Which original sender is considered: the From: header (default) or the envelope sender.
    SenderSource sender_source = SenderSource::header;
    // When the sender is rewritten, the original From goes into replyTo (unless the message
    // already has a Reply-To, which is then used).
    bool reply_to_original = true;
    // Headers passed through as custom headers: exact names (case-insensitive) or prefixes
    // ending in '*' ("X-*"). Hop-by-hop, Received and the standard address/content headers are
    // never passed, whatever this says.
    std::vector<std::string> pass_headers = {"X-*", "Message-ID", "In-Reply-To", "References"};
    // Inline parts referenced by cid: become inline attachments (contentId) when true
    // (ACS api-version 2025-09-01), regular attachments otherwise.
    bool inline_attachments = false;
    bool disable_engagement_tracking = true;
    // Header names never passed through, in addition to the built-in list (the milter's own
    // routing header, for one).
    std::vector<std::string> never_pass_headers;
    // More MIME entities (multiparts and leaves) than this is an error (kTooManyMimeParts): a
    // message built to make the conversion expensive, for the caller's oversize policy. Checked
    // before GMime builds anything, on an upper bound: the message's lines that delimit a
    // declared boundary, wherever they are (forwarded messages included).
    size_t max_mime_parts = 500;
    // The route's domain rewrite maps (sender_rewrite, recipient_rewrite): the envelope
    // sender, From: and Reply-To: by the sender map, the envelope recipients and To:/Cc: by
    // the recipient map, before anything is compared or sent (so a rewritten sender can be
    // in verified_domains).
    AddressRewrite rewrite;
};

// Error::message of a conversion refused because of max_mime_parts.
inline constexpr std::string_view kTooManyMimeParts = "too many MIME parts";

struct Envelope {
    std::string sender;                   // envelope sender, "" for the null sender
    std::vector<std::string> recipients;  // the recipients the API must deliver to: authoritative
};

// `source` is the whole message as received (header, blank line, body; CRLF or LF).
// Recipients: envelope recipients found in To/Cc keep their place and display name; the
// others go to bcc; header addresses that are not envelope recipients are not sent to.
Result<EmailMessage> convert_message(std::string_view source, const Envelope& envelope,
                                     const ConversionOptions& options);
// The same, reading the message from a file (large messages are spooled to disk).
Result<EmailMessage> convert_message_file(const std::string& path, const Envelope& envelope,
                                          const ConversionOptions& options);
// The same, reading the whole file open on `fd` from offset 0 (MessageSpool::fd()). The fd's
// file offset is not used; the caller keeps the fd.
Result<EmailMessage> convert_message_fd(int fd, const Envelope& envelope,
                                        const ConversionOptions& options);

}  // namespace paasmilter
