// Microsoft Graph, large messages (private to providers/): a message over one request's limit
// goes as a draft. graph_provider.cpp's send loop (retries, 429, ambiguity, on_ambiguous, Sent
// Items) stays the one place that sends; this module makes each attempt's draft ready and
// gives the loop the request that sends it.
//
// The flow Microsoft documents (microsoftgraph/microsoft-graph-docs-contrib):
// 1. POST /users/{m}/messages, Content-Type text/plain, the MIME in base64: a draft, 201 with
//    the message resource (api-reference/v1.0/api/user-post-messages.md; needs Mail.ReadWrite).
//    The MIME is the message without its large attachments (graph::detach_large_attachments),
//    and must fit one request.
// 2. Each detached attachment: under 3 MB, POST /users/{m}/messages/{id}/attachments with a
//    fileAttachment (contentBytes in base64), 201 (api-reference/v1.0/api/
//    message-post-attachments.md); from 3 MB to 150 MB, POST .../attachments/
//    createUploadSession with an AttachmentItem, 201 with an uploadUrl (api-reference/v1.0/
//    api/attachment-createuploadsession.md), then PUT the bytes in order to that URL as
//    returned, without an Authorization header, Content-Range "bytes a-b/total", each range
//    up to 4 MB; 200 with nextExpectedRanges until the last byte, which answers 201
//    (concepts/outlook-large-attachments.md).
// 3. POST /users/{m}/messages/{id}/send, empty body: 202 (api-reference/v1.0/api/
//    message-send.md; needs Mail.Send). The draft goes, with its attachments, and is saved to
//    Sent Items.
// Nothing is sent before step 3, and step 3 comes only after every upload answered 201.
#pragma once

#include <chrono>
#include <cstddef>
#include <memory>
#include <optional>
#include <string>

#include "paasmilter/api_delivery.hpp"
#include "paasmilter/config.hpp"
#include "paasmilter/http_client.hpp"
#include "paasmilter/result.hpp"

namespace paasmilter::graph {

// "If the file size is under 3 MB, do a single POST on the attachments navigation property
// [...] If the file size is between 3 MB and 150 MB, create an upload session"
// (concepts/outlook-large-attachments.md); a smaller file gets
// ErrorAttachmentSizeShouldNotBeLessThanMinimumSize. Decimal megabytes, as the test double
// reads them: with 3 MiB, a file just under 3 MiB would fit neither route.
inline constexpr size_t kUploadSessionMinBytes = 3'000'000;
inline constexpr size_t kUploadSessionMaxBytes = 150'000'000;
// Upload ranges: "up to 4 MB each time". A multiple of 320 KiB, the unit OneDrive's upload
// sessions require (driveitem-createuploadsession.md), in case Outlook's do too: 12 x 320 KiB.
inline constexpr size_t kUploadRangeUnit = 320 * 1024;
inline constexpr size_t kMaxUploadRangeBytes = 12 * kUploadRangeUnit;  // 3,932,160

// The conversation with Graph a message's delivery runs in (graph_provider.cpp): every
// request waits for one of the mailbox's request slots, within the message's time budget, and
// is counted in its ApiOutcome (GET as a status check, anything else as a request).
class GraphConversation {
  public:
    // One request; `authorize`: with the route's bearer token (never for an upload URL,
    // which is pre-authenticated). Any HTTP status is a success here.
    virtual Result<HttpResponse> send(HttpRequest request, bool authorize) = 0;
    // "{graph_endpoint}/v1.0/users/{mailbox}", the mailbox percent-encoded.
    virtual std::string mailbox_url() const = 0;
    // Sleeps (in slices, keeping the MTA informed); false, with the reason appended to
    // `why`, when it would end past the time budget.
    virtual bool pause(std::chrono::milliseconds how_long, std::string& why) = 0;
    virtual std::chrono::milliseconds time_left() const = 0;
    // For Retry-After dates.
    virtual std::chrono::system_clock::time_point wall_clock() const = 0;
    // A 401: the token just used is not used again.
    virtual void token_refused() = 0;

  protected:
    ~GraphConversation() = default;
};

// How each attempt of graph_provider.cpp's send loop sends the message.
class SendRoute {
  public:
    virtual ~SendRoute() = default;
    // Before each attempt: makes the request that sends ready (nullopt), or says why no
    // attempt can be made (`why` set): not_sent (nothing was sent) or oversize.
    virtual std::optional<ChunkFate> prepare(std::string& why) = 0;
    // The request that sends the message; after prepare() returned nullopt.
    virtual HttpRequest send_request() const = 0;
    // The last send_request() got no clear answer (timeout, reset, 5xx): it may have gone
    // out, so it is never sent again (only a new draft, if the loop tries again).
    virtual void send_was_ambiguous() = 0;
    // The Message-ID Exchange gave the message, when the route learned it (the draft's
    // internetMessageId): what to look for in Sent Items.
    virtual std::optional<std::string> internet_message_id() const = 0;
    // The loop is over with `report`: removes what must not stay behind (a draft that was
    // not sent), and adds to its detail what the operator should know.
    virtual void finish(ChunkReport& report) = 0;
};

// The draft route for `mime` (prepare_graph_mime's output, too large for one request). Errors:
// the route does not allow it (upload_sessions = false), or the message cannot go as a draft
// (its text alone is too large for one request, over max_message_bytes, an attachment over
// 150 MB): ErrorKind::too_large (is_message_too_large), or too_many_mime_parts, both
// on_oversize; GMime cannot read it (other: unconvertible).
Result<std::unique_ptr<SendRoute>> make_draft_route(GraphConversation& conversation,
                                                    const ApiSettings& api, std::string mime);

// The outcome for an error of make_draft_route: oversize or unconvertible.
ApiOutcome::Kind draft_error_kind(const Error& error);

// For the log, when a message is too large for the route: what would let it go.
std::string oversize_hint(const ApiSettings& api);

// RFC 3986 percent-encoding of everything but the unreserved characters (mailboxes, ids and
// $filter expressions in Graph URLs).
std::string percent_encode(std::string_view text);

// The code of a Graph error answer ({"error": {"code": ...}}), or "".
std::string error_code(const HttpResponse& response);

}  // namespace paasmilter::graph
