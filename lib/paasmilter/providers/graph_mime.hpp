// Microsoft Graph, MIME route: the pure preparation of the message the client sent for
// POST /users/{mailbox}/sendMail (Content-Type: text/plain, body = the MIME in base64).
// No I/O besides reading a spool file, no HTTP, no GMime object escapes this module.
//
// Done:
// - prepare_graph_mime / prepare_graph_mime_fd: the MIME to submit. It equals the input byte
//   for byte except in the header section: never-pass fields removed, To/Cc (and Resent-To/
//   Resent-Cc) narrowed to the envelope recipients, Bcc (and Resent-Bcc) replaced by one Bcc
//   naming the envelope recipients To/Cc do not show. The body is never read past the blank
//   line that ends the header section. Also the Message-ID and the recipients addressed.
// - base64_encode_mime and Base64Encoder (streaming): the request body.
// - exceeds_graph_request_limit: whether one sendMail request can carry the MIME.
// - detach_large_attachments: the MIME without its large attachment parts, and those parts
//   decoded, for the draft + upload-session flow (not wired to anything yet).
// Not done (belongs to the route that will use this):
// - the HTTP requests (sendMail, draft creation, createUploadSession, send), tokens, retries;
// - deciding the sender: Exchange only sends From/Sender addresses the mailbox may send as;
// - reconciling a sendMail whose answer was lost (Graph has no idempotency key): a message
//   without Message-ID gets one from Exchange that we never learn; adding one before the
//   submission would make the copy in Sent Items findable. Nothing is added here.
// - streaming the detached attachments: their decoded bytes are returned in memory.
//
// Reading the header section: a field splitter restricted to it (RFC 5322 2.2 and 3.2.2: a
// field is a line that does not start with a blank, plus the lines starting with a blank that
// follow it; the section ends at the first empty line). Each field keeps its exact bytes unless
// it is changed. Address fields are read by GMime (internet_address_list_parse) and, when
// changed, rendered by GMime (internet_address_list_encode). Lines that are not a
// "name: value" field are kept as they are and never match a name.
#pragma once

#include <cstddef>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "paasmilter/result.hpp"
#include "paasmilter/route_addresses.hpp"

namespace paasmilter::graph {

// Largest message the preparation accepts, input and output: Exchange Online's default
// maximum message size, 35 MB (/work/shared/REFERENCE.md "Microsoft Graph"), read as decimal
// megabytes, the smaller reading. Larger messages cannot go through Graph by any flow.
inline constexpr size_t kDefaultMaxMessageBytes = 35'000'000;

// One sendMail request: "about 4 MB per request (413 beyond), i.e. about 3 MB of MIME after
// base64" (/work/shared/REFERENCE.md "Microsoft Graph"). Decimal megabytes: with "about",
// the smaller reading is the safe one.
inline constexpr size_t kGraphMaxRequestBytes = 4'000'000;

// Error::message (its start) of a message refused because of GraphMimeOptions::max_message_bytes;
// its kind is ErrorKind::too_large (is_message_too_large), and the caller applies its oversize
// policy.
inline constexpr std::string_view kMessageTooLarge = "message too large for Microsoft Graph";
bool is_message_too_large(const Error& error);

struct GraphMimeOptions {
    // Header fields removed wherever they occur: the routing header ("X-PaaS-Route") and the
    // configured list. Names compare case-insensitively; an entry ending in '*' is a prefix
    // ("X-Internal-*"), as in ConversionOptions::never_pass_headers.
    std::vector<std::string> never_pass_headers;
    // Input larger than this is refused (kMessageTooLarge) before its header is read (a spool
    // file before it is mapped); so is output grown past it (by the Bcc field).
    size_t max_message_bytes = kDefaultMaxMessageBytes;
    // Fields added at the end of the header section, in order, each "name: value" with the
    // section's line end (the gateway's loop stamps). Names and values are the caller's: one
    // line each, no checks here.
    std::vector<std::pair<std::string, std::string>> add_fields;
    // The route's domain rewrite maps: the envelope recipients and To/Cc/Resent-To/Resent-Cc
    // by the recipient map, From/Sender/Reply-To by the sender map (a field with a rewritten
    // address is rendered again by GMime). The recipients returned are the rewritten ones.
    AddressRewrite rewrite;
};

struct GraphMime {
    // What to submit (base64_encode_mime makes the request body of it).
    std::string mime;
    // The first Message-ID field's msg-id as GMime reads it, angle brackets included
    // ("<id@host>", comments and folding removed); nullopt without a readable one.
    std::optional<std::string> internet_message_id;
    // Every envelope recipient exactly once, spelled as in the envelope (without <>): those
    // the To/Cc of the submitted copy show, in the order they appear there ...
    std::vector<std::string> visible_recipients;
    // ... and the others, in envelope order: the Bcc field of the submitted copy names exactly
    // these (no Bcc field when empty).
    std::vector<std::string> bcc_recipients;

    // Who the submitted copy addresses: visible_recipients then bcc_recipients.
    std::vector<std::string> recipients() const;
};

// `source` is the message as the milter spooled it: header section, empty line, body (CRLF
// line ends from the milter; LF-only input keeps LF, and the fields rendered here then end in
// LF too). `envelope_recipients` are the recipients the API must deliver to (RCPT TO
// addresses, with or without <>, local-domain recipients already left out); they are
// authoritative: sendMail takes its recipients from To, Cc and Bcc, so those are made to name
// exactly these.
//
// Rules, in order:
// 1. every field named in options.never_pass_headers is removed (all occurrences);
// 2. To, Cc, Resent-To, Resent-Cc keep only the addresses that are envelope recipients
//    (addr-spec compared ASCII case-insensitively, IDN domains in either form); a group keeps
//    its name and the members left, a group left with no member goes, a group that was empty
//    ("undisclosed-recipients:;") stays. A field left without any entry is removed, except the
//    first such To/Cc when no To/Cc would remain at all: it becomes
//    "To: undisclosed-recipients:;" (with the field's own name), the RFC 5322 A.1.3 form, so
//    the copy still has a To/Cc stating that its recipients are hidden rather than none, which
//    mail clients show sensibly and spam filters do not score as a missing To. A message that
//    had no To/Cc gets none (nothing is added that the client did not write).
//    A field keeps its exact bytes when nothing was removed from it and GMime accounted for
//    every '@' in it (each one inside an addr-spec) and it has no NUL byte; otherwise it is
//    rendered again from what GMime read, so that text GMime skipped ("a@x; b@y", stray
//    "@@") can never reach a parser that would see an address in it.
// 3. Bcc and Resent-Bcc fields are removed; one "Bcc:" field naming the envelope recipients
//    that no To/Cc shows (Resent-To/Resent-Cc do not count) takes the place of the first
//    removed Bcc, or ends the header section.
// Everything else, the body included, is copied unchanged.
// Errors: no envelope recipients; kMessageTooLarge; (for the fd) the file cannot be read.
Result<GraphMime> prepare_graph_mime(std::string_view source,
                                     const std::vector<std::string>& envelope_recipients,
                                     const GraphMimeOptions& options);

// The same, reading the whole file open on `fd` from offset 0 (MessageSpool::fd()). The fd's
// offset is neither used nor moved; the caller keeps the fd.
Result<GraphMime> prepare_graph_mime_fd(int fd, const std::vector<std::string>& envelope_recipients,
                                        const GraphMimeOptions& options);

// ---- the request body ----

// Standard base64 (RFC 4648 section 4, '+' '/' and '=' padding) without line breaks.
// user-sendmail.md (microsoftgraph/microsoft-graph-docs-contrib, api-reference/v1.0/api/) only
// asks for "the MIME content as a base64-encoded string in the request body"; its example 4
// wraps the string at 76 characters, so breaks are tolerated but not required. Without them
// the body has no whitespace left for any decoder to judge, and is the shortest.
std::string base64_encode_mime(std::string_view mime);

// The same in pieces: feeding a message chunk by chunk gives exactly base64_encode_mime of
// the whole. For a message read from a spool file without holding its base64 in memory.
class Base64Encoder {
  public:
    // Appends the base64 of `bytes` that is complete so far to `out`.
    void add(std::string_view bytes, std::string& out);
    // Appends the rest (with padding) to `out`; the encoder starts afresh afterwards.
    void finish(std::string& out);

  private:
    int state_ = 0;  // GLib's g_base64_encode_step state (gint)
    int save_ = 0;
};

// Length of the base64 of `bytes` bytes (no line breaks).
constexpr size_t base64_size(size_t bytes) {
    return (bytes + 2) / 3 * 4;
}

// Whether the sendMail request for `mime_bytes` of MIME (its base64 is the whole body) would
// be larger than `max_request_bytes`; then the draft + upload-session flow is needed.
constexpr bool exceeds_graph_request_limit(size_t mime_bytes,
                                           size_t max_request_bytes = kGraphMaxRequestBytes) {
    return base64_size(mime_bytes) > max_request_bytes;
}

// ---- large messages: draft + upload session (REFERENCE.md: attachments of 3-150 MB) ----

struct DetachedAttachment {
    std::string file_name;     // declared name (RFC 2231/2047 decoded, UTF-8); may be empty
    std::string content_type;  // "application/pdf", lower case
    std::string content_id;    // without <>; empty when the part has none
    bool is_inline = false;    // Content-Disposition: inline
    std::string bytes;         // the content, transfer encoding removed
};

struct DetachedMime {
    // The message without the detached parts. Written back by GMime (g_mime_object_write_to_
    // stream, line ends as in the input): unchanged fields and parts come out as they were read
    // in the cases tested, but unlike prepare_graph_mime this is not a byte-exact promise. A
    // multipart left without parts, or a message whose whole body was detached, gets an empty
    // text/plain part instead (RFC 2046 5.1.1 wants at least one body part).
    std::string mime;
    std::vector<DetachedAttachment> attachments;  // in document order
};

// Detaches every leaf part whose decoded content is larger than `max_attachment_bytes`,
// except the message text (text/plain or text/html that is neither a named part nor marked
// as an attachment). Not descended into: message/rfc822 parts (a forwarded message stays
// whole, and is never detached: upload sessions take files) and multipart/signed or
// multipart/encrypted (removing a part would break the signature or cannot be done).
// Errors: the MIME cannot be parsed; more than 1000 entities (ErrorKind::too_many_mime_parts).
Result<DetachedMime> detach_large_attachments(std::string_view mime, size_t max_attachment_bytes);

}  // namespace paasmilter::graph
