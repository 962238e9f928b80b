// Microsoft Graph, large messages: the draft route (see graph_upload.hpp for the flow and the
// pages it follows).
//
// Choices where the documentation leaves room:
// - Which attachments leave the MIME: as few as possible. First every file of 3 MB or more
//   (upload sessions); if the rest is still too large for one request, smaller ones too
//   (1 MB, 250 kB, then every attachment), which go by POST .../attachments.
// - Retries, as for sendMail: a 429 waits for Retry-After (or 1, 2, 4 ... s), a 401 gets one
//   new token, a request that never left is sent again; all within the time budget. A request
//   without a clear answer (timeout, reset, 5xx) is repeated only where a repeat cannot change
//   the message: creating the draft (the worst case is an unsent draft left over) and
//   creating an upload session (one never completed attaches nothing). Adding an attachment or
//   uploading a range is never repeated blindly (the attachment could end up twice): the draft
//   is deleted and built again from the start, at most max_attempts times.
// - Every failure before the send leaves nothing sent: the draft is deleted (best effort; one
//   that cannot be deleted is named in the detail: it stays in Drafts, unsent) and the outcome
//   is not_sent (on_failure), or oversize for a 413.
// - After a send without a clear answer the draft is never sent again. The send loop tries a
//   new draft only under on_ambiguous = "tempfail"; the old one is deleted first (if it went
//   out, it left Drafts for Sent Items, where an item has a new id unless immutable ids are
//   asked for (concepts/outlook-immutable-id.md): the delete finds nothing). Under
//   on_ambiguous = "hold" it is deleted too when the loop gives up; under "assume-sent" it is
//   left alone, as deleting a message that may be on its way could turn the assumed send into
//   a loss.
#include "paasmilter/providers/graph_upload.hpp"

#include <algorithm>
#include <cctype>
#include <utility>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "paasmilter/providers/graph_mime.hpp"

namespace paasmilter::graph {

namespace {

using namespace std::chrono;

// Detaching thresholds, tried in order until the rest fits one request.
constexpr size_t kDetachThresholds[] = {kUploadSessionMinBytes - 1, 1'000'000, 250'000, 0};

constexpr std::string_view kReadWriteHint =
    " (the draft route of upload_sessions needs the application permission Mail.ReadWrite "
    "besides Mail.Send)";

std::string to_json(const nlohmann::json& value) {
    // Names come from the message: never throw on bytes that are not UTF-8.
    return value.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

std::optional<std::string> string_member(const nlohmann::json& object, const char* name) {
    if (!object.is_object()) return std::nullopt;
    auto it = object.find(name);
    if (it == object.end() || !it->is_string()) return std::nullopt;
    return it->get<std::string>();
}

// The first byte nextExpectedRanges asks for ("2097152", "2097152-", "2097152-3145727"), or
// `fallback` without a readable one.
size_t next_expected(const HttpResponse& response, size_t fallback) {
    auto body = nlohmann::json::parse(response.body, nullptr, false);
    if (!body.is_object()) return fallback;
    auto ranges = body.find("nextExpectedRanges");
    if (ranges == body.end() || !ranges->is_array() || ranges->empty() ||
        !(*ranges)[0].is_string()) {
        return fallback;
    }
    const std::string range = (*ranges)[0].get<std::string>();
    size_t value = 0;
    size_t digits = 0;
    for (char c : range) {
        if (c < '0' || c > '9' || digits > 15) break;
        value = value * 10 + static_cast<size_t>(c - '0');
        ++digits;
    }
    return digits == 0 ? fallback : value;
}

std::string attachment_name(const DetachedAttachment& attachment) {
    return attachment.file_name.empty() ? std::string("attachment") : attachment.file_name;
}

// What became of one request of the flow.
struct Answer {
    enum class Kind { ok, ambiguous, failed };
    Kind kind = Kind::failed;
    ChunkFate fate = ChunkFate::not_sent;  // failed: not_sent or oversize
    HttpResponse response;                 // ok: the answer; failed: the last one, if any
};

class DraftRoute final : public SendRoute {
  public:
    DraftRoute(GraphConversation& conversation, const ApiSettings& api, DetachedMime detached)
        : conversation_(conversation),
          api_(api),
          draft_body_(base64_encode_mime(detached.mime)),
          attachments_(std::move(detached.attachments)) {}

    std::optional<ChunkFate> prepare(std::string& why) override;
    HttpRequest send_request() const override;
    void send_was_ambiguous() override { send_ambiguous_ = true; }
    std::optional<std::string> internet_message_id() const override { return internet_message_id_; }
    void finish(ChunkReport& report) override;

  private:
    enum class Step { done, rebuild, failed };

    std::optional<ChunkFate> build(std::string& why);
    Step create_draft(std::string& why, ChunkFate& fate);
    Step attach(size_t index, std::string& why, ChunkFate& fate);
    Step upload(size_t index, std::string& why, ChunkFate& fate);
    Answer call(const HttpRequest& request, bool authorize, bool repeat_ambiguous,
                std::string_view what, std::string& why, int max_attempts);
    static Step step_of(const Answer& answer, ChunkFate& fate);
    void discard_draft();
    std::string message_url() const {
        return conversation_.mailbox_url() + "/messages/" + percent_encode(draft_id_.value_or(""));
    }
    size_t range_bytes() const {
        const size_t units = std::max<size_t>(1, api_.max_request_bytes / kUploadRangeUnit);
        return std::min(kMaxUploadRangeBytes, units * kUploadRangeUnit);
    }

    GraphConversation& conversation_;
    const ApiSettings& api_;
    const std::string draft_body_;  // the MIME without the detached attachments, base64
    const std::vector<DetachedAttachment> attachments_;
    std::optional<std::string> draft_id_;
    std::optional<std::string> internet_message_id_;
    bool send_ambiguous_ = false;  // the draft's send may have gone out
    std::string left_over_;        // drafts that could not be deleted, for the detail
};

Answer DraftRoute::call(const HttpRequest& request, bool authorize, bool repeat_ambiguous,
                        std::string_view what, std::string& why, int max_attempts) {
    Answer answer;
    bool refreshed_token = false;
    milliseconds backoff{1000};
    for (int attempt = 1;; ++attempt) {
        if (conversation_.time_left() <= milliseconds(0)) {
            why = fmt::format("{}: time budget exhausted", what);
            return answer;
        }
        auto response = conversation_.send(request, authorize);
        milliseconds pause = backoff;
        bool ambiguous = false;
        if (!response) {
            answer.response = HttpResponse{};
            why = fmt::format("{}: {}", what, response.error().message);
            ambiguous = response.error().kind != ErrorKind::request_not_sent;
        } else {
            const long status = response->status;
            answer.response = *response;
            if (status >= 200 && status < 300) {
                answer.kind = Answer::Kind::ok;
                return answer;
            }
            why = fmt::format("{}: {}", what, describe_failure(*response));
            pause = retry_after_or(*response, pause, conversation_.wall_clock());
            if (status == 429) {
                // Throttled: not carried out.
            } else if (status == 401 && authorize && !refreshed_token) {
                conversation_.token_refused();
                refreshed_token = true;
                pause = milliseconds(0);
            } else if (status == 413 || error_code(*response) == "ErrorMessageSizeExceeded") {
                answer.fate = ChunkFate::oversize;
                return answer;
            } else if (status >= 500 || status == 408) {
                ambiguous = true;
            } else {
                if (status == 403 && authorize) why += kReadWriteHint;
                return answer;  // permissions, mailbox, a refused request: not_sent
            }
        }
        if (ambiguous && !repeat_ambiguous) {
            answer.kind = Answer::Kind::ambiguous;
            return answer;
        }
        if (attempt >= max_attempts) return answer;
        if (pause.count() > 0 && !conversation_.pause(pause, why)) return answer;
        backoff = std::min(backoff * 2, milliseconds(32000));
    }
}

DraftRoute::Step DraftRoute::step_of(const Answer& answer, ChunkFate& fate) {
    switch (answer.kind) {
        case Answer::Kind::ok:
            return Step::done;
        case Answer::Kind::ambiguous:
            return Step::rebuild;
        case Answer::Kind::failed:
            break;
    }
    fate = answer.fate;
    return Step::failed;
}

DraftRoute::Step DraftRoute::create_draft(std::string& why, ChunkFate& fate) {
    // user-post-messages.md: Content-Type text/plain, the MIME in base64; 201 and the message.
    HttpRequest request;
    request.method = "POST";
    request.url = conversation_.mailbox_url() + "/messages";
    request.headers = {{"Content-Type", "text/plain"}};
    request.body = draft_body_;
    Answer answer = call(request, true, true, "creating the draft", why, api_.max_attempts);
    if (answer.kind != Answer::Kind::ok) {
        fate = answer.fate;
        return Step::failed;
    }
    auto body = nlohmann::json::parse(answer.response.body, nullptr, false);
    auto id = string_member(body, "id");
    if (!id || id->empty()) {
        why = fmt::format("creating the draft: HTTP {} without the draft's id",
                          answer.response.status);
        fate = ChunkFate::not_sent;
        return Step::failed;
    }
    draft_id_ = *id;
    internet_message_id_ = string_member(body, "internetMessageId");
    send_ambiguous_ = false;
    return Step::done;
}

DraftRoute::Step DraftRoute::attach(size_t index, std::string& why, ChunkFate& fate) {
    const DetachedAttachment& attachment = attachments_[index];
    if (attachment.bytes.size() >= kUploadSessionMinBytes) return upload(index, why, fate);
    // message-post-attachments.md: a fileAttachment "under 3 MB", in one request.
    nlohmann::json file = {{"@odata.type", "#microsoft.graph.fileAttachment"},
                           {"name", attachment_name(attachment)},
                           {"contentType", attachment.content_type},
                           {"isInline", attachment.is_inline},
                           {"contentBytes", base64_encode_mime(attachment.bytes)}};
    if (!attachment.content_id.empty()) file["contentId"] = attachment.content_id;
    HttpRequest request;
    request.method = "POST";
    request.url = message_url() + "/attachments";
    request.headers = {{"Content-Type", "application/json"}};
    request.body = to_json(file);
    file = nullptr;
    if (request.body.size() > api_.max_request_bytes) return upload(index, why, fate);
    const std::string what = fmt::format("attachment {} of {} ({} bytes)", index + 1,
                                         attachments_.size(), attachment.bytes.size());
    return step_of(call(request, true, false, what, why, api_.max_attempts), fate);
}

DraftRoute::Step DraftRoute::upload(size_t index, std::string& why, ChunkFate& fate) {
    const DetachedAttachment& attachment = attachments_[index];
    const size_t total = attachment.bytes.size();
    const std::string what = fmt::format("upload of attachment {} of {} ({} bytes)", index + 1,
                                         attachments_.size(), total);
    // attachment-createuploadsession.md: an AttachmentItem; 201 with the uploadUrl.
    nlohmann::json item = {{"attachmentType", "file"},
                           {"name", attachment_name(attachment)},
                           {"size", total},
                           {"contentType", attachment.content_type},
                           {"isInline", attachment.is_inline}};
    if (!attachment.content_id.empty()) item["contentId"] = attachment.content_id;
    HttpRequest create;
    create.method = "POST";
    create.url = message_url() + "/attachments/createUploadSession";
    create.headers = {{"Content-Type", "application/json"}};
    create.body = to_json(nlohmann::json{{"AttachmentItem", std::move(item)}});
    Answer session =
        call(create, true, true, what + ", creating its upload session", why, api_.max_attempts);
    if (session.kind != Answer::Kind::ok) return step_of(session, fate);
    auto body = nlohmann::json::parse(session.response.body, nullptr, false);
    // Opaque and pre-authenticated: used exactly as returned, and never logged (it holds a
    // token).
    const std::string upload_url = string_member(body, "uploadUrl").value_or("");
    if (!upload_url.starts_with("https://")) {
        why = what + ": the upload session's answer has no https uploadUrl";
        fate = ChunkFate::not_sent;
        return Step::failed;
    }
    size_t next = next_expected(session.response, 0);
    const size_t range = range_bytes();
    // Bytes go in order; nextExpectedRanges may ask for some again, but not forever.
    const size_t max_puts = 2 * (total / range + 1) + 2;
    for (size_t puts = 0; puts < max_puts; ++puts) {
        if (next >= total) {
            // Every byte went, and the last range was not answered 201: whether the file is
            // attached is unknown, and uploading it again could attach it twice.
            why = what + ": every byte sent, but the upload was not confirmed (no 201)";
            return Step::rebuild;
        }
        const size_t last = std::min(next + range, total) - 1;
        // outlook-large-attachments.md, step 2: no Authorization header; Content-Range
        // "bytes {start}-{end}/{total}"; application/octet-stream.
        HttpRequest put;
        put.method = "PUT";
        put.url = upload_url;
        put.headers = {{"Content-Type", "application/octet-stream"},
                       {"Content-Range", fmt::format("bytes {}-{}/{}", next, last, total)}};
        put.body = attachment.bytes.substr(next, last - next + 1);
        Answer answer = call(put, false, false, what, why, api_.max_attempts);
        if (answer.kind != Answer::Kind::ok) return step_of(answer, fate);
        // The last byte answers 201 Created (with the attachment's Location).
        if (answer.response.status == 201) return Step::done;
        next = next_expected(answer.response, last + 1);
    }
    why = what + ": the upload made no progress";
    fate = ChunkFate::not_sent;
    return Step::failed;
}

std::optional<ChunkFate> DraftRoute::build(std::string& why) {
    for (int attempt = 1; attempt <= api_.max_attempts; ++attempt) {
        ChunkFate fate = ChunkFate::not_sent;
        Step step = create_draft(why, fate);
        for (size_t i = 0; step == Step::done && i < attachments_.size(); ++i) {
            step = attach(i, why, fate);
        }
        if (step == Step::done) return std::nullopt;
        // Nothing was sent; nothing of this draft is used again.
        discard_draft();
        if (step == Step::failed) return fate;
        // An attachment whose fate is unknown: start again from a new draft.
    }
    why += fmt::format(" (gave up after {} drafts)", api_.max_attempts);
    return ChunkFate::not_sent;
}

std::optional<ChunkFate> DraftRoute::prepare(std::string& why) {
    if (draft_id_ && !send_ambiguous_) return std::nullopt;  // ready (e.g. after a 429)
    if (draft_id_) {
        // Its send may have gone out: it is never sent again. The loop comes back here only
        // under on_ambiguous = "tempfail" (a possible duplicate rather than a loss).
        if (api_.on_ambiguous == AmbiguityPolicy::assume_sent) {
            draft_id_.reset();
        } else {
            discard_draft();
        }
    }
    return build(why);
}

HttpRequest DraftRoute::send_request() const {
    // message-send.md: POST .../messages/{id}/send, no body (Content-Length: 0); 202.
    HttpRequest request;
    request.method = "POST";
    request.url = message_url() + "/send";
    request.headers = {{"Content-Type", "application/json"}};
    return request;
}

void DraftRoute::discard_draft() {
    if (!draft_id_) return;
    // message-delete.md: DELETE /users/{m}/messages/{id}, 204.
    HttpRequest request;
    request.method = "DELETE";
    request.url = message_url();
    std::string why;
    Answer answer = call(request, true, true, "deleting the draft", why, 2);
    // 404: it is gone already (it was sent after all, or deleted).
    if (answer.kind != Answer::Kind::ok && answer.response.status != 404) {
        left_over_ += fmt::format(
            "; a draft could not be deleted ({}): it stays unsent in the "
            "mailbox's Drafts folder",
            why);
    }
    draft_id_.reset();
    internet_message_id_.reset();
    send_ambiguous_ = false;
}

void DraftRoute::finish(ChunkReport& report) {
    switch (report.fate) {
        case ChunkFate::accepted:
        case ChunkFate::already_accepted:
            break;  // the draft went out (or none was made)
        case ChunkFate::unresolved:
            if (send_ambiguous_ && api_.on_ambiguous == AmbiguityPolicy::assume_sent) break;
            discard_draft();
            break;
        case ChunkFate::busy:  // none was made: another transaction is sending it
        case ChunkFate::not_sent:
        case ChunkFate::rejected:
        case ChunkFate::oversize:
        case ChunkFate::quota:
            discard_draft();
            break;
    }
    report.detail += left_over_;
    left_over_.clear();
}

Error too_large(std::string detail) {
    return make_error(ErrorKind::too_large, std::string(kMessageTooLarge) + ": " + detail);
}

}  // namespace

std::string percent_encode(std::string_view text) {
    std::string out;
    for (unsigned char c : text) {
        if (std::isalnum(c) || c == '-' || c == '.' || c == '_' || c == '~') {
            out += static_cast<char>(c);
        } else {
            out += fmt::format("%{:02X}", c);
        }
    }
    return out;
}

std::string error_code(const HttpResponse& response) {
    auto body = nlohmann::json::parse(response.body, nullptr, false);
    if (!body.is_object()) return {};
    auto error = body.find("error");
    if (error == body.end()) return {};
    return string_member(*error, "code").value_or("");
}

Result<std::unique_ptr<SendRoute>> make_draft_route(GraphConversation& conversation,
                                                    const ApiSettings& api, std::string mime) {
    if (!api.graph.upload_sessions) {
        return too_large(
            fmt::format("{} bytes of MIME are over one request's limit ({} bytes "
                        "with base64), and the route has no upload_sessions",
                        mime.size(), api.max_request_bytes));
    }
    if (mime.size() > api.graph.max_message_bytes) {
        return too_large(fmt::format("{} bytes of MIME are over max_message_bytes ({})",
                                     mime.size(), api.graph.max_message_bytes));
    }
    size_t rest = mime.size();
    for (size_t threshold : kDetachThresholds) {
        auto detached = detach_large_attachments(mime, threshold);
        if (!detached) return detached.error();
        rest = detached->mime.size();
        if (exceeds_graph_request_limit(rest, api.max_request_bytes)) continue;
        for (const DetachedAttachment& attachment : detached->attachments) {
            if (attachment.bytes.size() > kUploadSessionMaxBytes) {
                return too_large(
                    fmt::format("an attachment of {} bytes is over the {} bytes an "
                                "upload session takes",
                                attachment.bytes.size(), kUploadSessionMaxBytes));
            }
        }
        mime.clear();
        mime.shrink_to_fit();
        return std::unique_ptr<SendRoute>(
            std::make_unique<DraftRoute>(conversation, api, std::move(*detached)));
    }
    return too_large(
        fmt::format("without its attachments the message still has {} bytes of "
                    "MIME, over one request's limit ({} bytes with base64): its "
                    "text is too large for a draft",
                    rest, api.max_request_bytes));
}

ApiOutcome::Kind draft_error_kind(const Error& error) {
    return is_message_too_large(error) || error.kind == ErrorKind::too_many_mime_parts
               ? ApiOutcome::Kind::oversize
               : ApiOutcome::Kind::unconvertible;
}

std::string oversize_hint(const ApiSettings& api) {
    if (api.graph.upload_sessions) return {};
    return fmt::format(
        "upload_sessions = true sends messages up to max_message_bytes ({}) as "
        "a draft with upload sessions; it needs the application permission "
        "Mail.ReadWrite besides Mail.Send",
        api.graph.max_message_bytes);
}

}  // namespace paasmilter::graph
