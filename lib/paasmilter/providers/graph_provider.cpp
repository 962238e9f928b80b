// Microsoft Graph: POST {graph}/v1.0/users/{mailbox}/sendMail with the message as the client
// sent it, base64-encoded MIME (graph_mime), authenticated with an Entra ID app token.
//
// What Graph documents, and what this relies on:
// - user-sendmail.md (microsoftgraph/microsoft-graph-docs-contrib, api-reference/v1.0/api):
//   202 Accepted with an empty body; Content-Type text/plain with the MIME in base64.
// - concepts/throttling.md: a 429 means the request failed (was not carried out); wait for
//   Retry-After, or back off exponentially without it. throttling-limits.md (Outlook service
//   limits): at most 4 concurrent requests per app and mailbox.
// - Graph has no idempotency key, and nothing documents whether a 5xx, a timeout or a reset
//   after the request was sent means "not sent" (errors.md says of 503 only that the request
//   may be repeated after a delay). Those are ambiguous here: the message may have gone out.
//   They are resent only where the operator prefers a possible duplicate to a possible loss
//   (on_ambiguous = "tempfail", the default); otherwise on_ambiguous decides. With
//   sent_items_check, the mailbox's Sent Items are searched for the message's Message-ID
//   first (user-list-messages.md, $filter on internetMessageId; needs Mail.ReadBasic.All).
// - A message over one request's limit, on a route with upload_sessions: each attempt below
//   sends a draft that graph_upload.cpp made ready (drafts, upload sessions, their pages).
#include <cctype>
#include <condition_variable>
#include <map>
#include <mutex>
#include <thread>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "paasmilter/crypto.hpp"
#include "paasmilter/delivery/message_identity.hpp"
#include "paasmilter/providers/graph_mime.hpp"
#include "paasmilter/providers/graph_upload.hpp"
#include "paasmilter/providers/provider.hpp"
#include "paasmilter/text.hpp"

namespace paasmilter {

namespace {

using namespace std::chrono;
using Steady = steady_clock;

// The mailbox's request slots: Graph allows 4 concurrent requests per app and mailbox, across
// every route, transaction and reload of this process.
class MailboxSlots {
  public:
    explicit MailboxSlots(size_t limit) : limit_(limit) {}

    bool acquire_until(Steady::time_point until) {
        std::unique_lock lock(mutex_);
        if (!freed_.wait_until(lock, until, [this] { return used_ < limit_; })) return false;
        ++used_;
        return true;
    }
    void release() {
        {
            std::lock_guard lock(mutex_);
            --used_;
        }
        freed_.notify_one();
    }

  private:
    const size_t limit_;
    std::mutex mutex_;
    std::condition_variable freed_;
    size_t used_ = 0;
};

std::shared_ptr<MailboxSlots> slots_for(const GraphSettings& graph, const std::string& mailbox) {
    // A long-lived service, like the token caches: one per mailbox, never dropped.
    static std::mutex mutex;
    static std::map<std::string, std::shared_ptr<MailboxSlots>> slots;
    std::lock_guard lock(mutex);
    std::string key = graph.endpoint + " ";
    for (char c : mailbox) key += ascii_lower(c);
    auto& entry = slots[key];
    if (!entry) entry = std::make_shared<MailboxSlots>(graph.mailbox_concurrency);
    return entry;
}

// One message's conversation with Graph, within its deadline.
class GraphSubmission final : public graph::GraphConversation {
  public:
    // `mailbox`: the one that sends (the route's, or the sender_map's for this client).
    GraphSubmission(const ApiSettings& api, const ApiHooks& hooks, Steady::time_point deadline,
                    ApiOutcome& counts, std::string mailbox)
        : api_(api),
          hooks_(hooks),
          deadline_(deadline),
          counts_(counts),
          mailbox_(std::move(mailbox)),
          slots_(slots_for(api.graph, mailbox_)) {}

    // `route`: how each attempt sends (the draft route, graph_upload.cpp); null: sendMail.
    ChunkReport deliver(const std::string& request_key, const graph::GraphMime& mime,
                        graph::SendRoute* route = nullptr);

    // graph::GraphConversation, for the draft route.
    Result<HttpResponse> send(HttpRequest request, bool authorize) override {
        return exchange(std::move(request), authorize);
    }
    std::string mailbox_url() const override { return user_url(); }
    bool pause(milliseconds how_long, std::string& why) override { return wait(how_long, why); }
    milliseconds time_left() const override { return remaining(); }
    system_clock::time_point wall_clock() const override { return hooks_.wall_clock(); }
    void token_refused() override {
        if (api_.entra) api_.entra->invalidate(last_token_);
    }

  private:
    enum class SentItems { found, absent, unknown };

    ChunkReport deliver_alone(const std::string& request_key, const graph::GraphMime& mime,
                              graph::SendRoute* route);
    // `authorize`: with the bearer token (not for an upload URL: it is pre-authenticated).
    Result<HttpResponse> exchange(HttpRequest request, bool authorize = true);
    // A copy in Sent Items with this Message-ID addressed to every one of `recipients` (Postfix
    // may split one message into several transactions with the same Message-ID).
    SentItems look_in_sent_items(const std::optional<std::string>& message_id,
                                 const std::vector<std::string>& recipients, std::string& why);
    bool wait(milliseconds how_long, std::string& why);
    milliseconds remaining() const { return duration_cast<milliseconds>(deadline_ - hooks_.now()); }
    std::string user_url() const {
        return fmt::format("{}/v1.0/users/{}", api_.graph.endpoint,
                           graph::percent_encode(mailbox_));
    }

    const ApiSettings& api_;
    const ApiHooks& hooks_;
    Steady::time_point deadline_;
    ApiOutcome& counts_;
    std::string mailbox_;
    std::shared_ptr<MailboxSlots> slots_;
    std::string last_token_;
};

bool GraphSubmission::wait(milliseconds how_long, std::string& why) {
    return wait_for_retry(hooks_, deadline_, how_long, why);
}

Result<HttpResponse> GraphSubmission::exchange(HttpRequest request, bool authorize) {
    // A slot of the mailbox's 4, waited for within the budget; the token fetch and the
    // request share one timeout.
    auto timeout = std::min(duration_cast<milliseconds>(api_.request_timeout), remaining());
    if (timeout <= milliseconds(0)) {
        return make_error(ErrorKind::request_not_sent, "time budget exhausted");
    }
    auto until = hooks_.now() + timeout;
    if (!slots_->acquire_until(until)) {
        return make_error(ErrorKind::request_not_sent,
                          fmt::format("no free request slot for mailbox {} (Graph allows {} at "
                                      "a time) within the time budget",
                                      mailbox_, api_.graph.mailbox_concurrency));
    }
    struct Slot {
        MailboxSlots& slots;
        ~Slot() { slots.release(); }
    } slot{*slots_};
    auto left = duration_cast<milliseconds>(until - hooks_.now());
    if (authorize) {
        Result<std::string> token = hooks_.bearer_token ? hooks_.bearer_token(left)
                                    : api_.entra
                                        ? api_.entra->token(left)
                                        : Result<std::string>(make_error("no token provider"));
        if (!token) {
            return make_error(ErrorKind::request_not_sent,
                              "Entra ID token: " + token.error().message);
        }
        last_token_ = *token;
        request.headers.emplace_back("Authorization", "Bearer " + *token);
        if (auto id = uuid_v4()) request.headers.emplace_back("client-request-id", *id);
        hooks_.progress();
        left = duration_cast<milliseconds>(until - hooks_.now());
    }
    if (left <= milliseconds(0)) {
        return make_error(ErrorKind::request_not_sent, "no time left after fetching a token");
    }
    ++(request.method == "GET" ? counts_.status_checks : counts_.requests);
    auto response = hooks_.send(request, left);
    hooks_.progress();
    return response;
}

GraphSubmission::SentItems GraphSubmission::look_in_sent_items(
    const std::optional<std::string>& message_id, const std::vector<std::string>& recipients,
    std::string& why) {
    if (!api_.graph.sent_items_check) return SentItems::unknown;
    if (!message_id) {
        why += "; no Message-ID to look for in Sent Items";
        return SentItems::unknown;
    }
    // OData string literal: a quote is doubled.
    std::string literal;
    for (char c : *message_id) literal += c == '\'' ? std::string("''") : std::string(1, c);
    HttpRequest request;
    request.method = "GET";
    request.url = fmt::format(
        "{}/mailFolders/SentItems/messages?$filter={}"
        "&$select=id,internetMessageId,toRecipients,ccRecipients,bccRecipients&$top=10",
        user_url(), graph::percent_encode("internetMessageId eq '" + literal + "'"));
    auto response = exchange(request);
    if (!response) {
        why += "; Sent Items lookup: " + response.error().message;
        return SentItems::unknown;
    }
    if (response->status != 200) {
        why += "; Sent Items lookup: " + describe_failure(*response);
        return SentItems::unknown;
    }
    auto body = nlohmann::json::parse(response->body, nullptr, false);
    if (!body.is_object() || !body.contains("value") || !body["value"].is_array()) {
        why += "; Sent Items lookup: unexpected answer";
        return SentItems::unknown;
    }
    // A copy counts only if it addresses every recipient of this request.
    for (const auto& item : body["value"]) {
        std::vector<std::string> addressed;
        for (const char* field : {"toRecipients", "ccRecipients", "bccRecipients"}) {
            if (!item.is_object() || !item.contains(field) || !item[field].is_array()) continue;
            for (const auto& recipient : item[field]) {
                if (recipient.is_object() && recipient.contains("emailAddress") &&
                    recipient["emailAddress"].is_object() &&
                    recipient["emailAddress"].contains("address") &&
                    recipient["emailAddress"]["address"].is_string()) {
                    addressed.push_back(recipient["emailAddress"]["address"].get<std::string>());
                }
            }
        }
        bool all = std::all_of(recipients.begin(), recipients.end(), [&](const std::string& r) {
            return std::any_of(addressed.begin(), addressed.end(),
                               [&](const std::string& a) { return iequals(a, r); });
        });
        if (all) return SentItems::found;
    }
    // Messages show up in Sent Items with a delay: absence is no proof.
    return SentItems::absent;
}

ChunkReport GraphSubmission::deliver(const std::string& request_key, const graph::GraphMime& mime,
                                     graph::SendRoute* route) {
    // Another transaction of the same message (a client that gave up and resent) may be
    // sending it right now: never send it concurrently.
    DeliveringRequest delivering(hooks_.posted, request_key);
    if (!delivering.alone()) {
        ChunkReport report;
        report.fate = ChunkFate::busy;
        report.detail = "another transaction of this message is sending it";
        return report;
    }
    ChunkReport report = deliver_alone(request_key, mime, route);
    delivering.finish(
        report.fate == ChunkFate::unresolved,
        report.fate == ChunkFate::accepted || report.fate == ChunkFate::already_accepted);
    return report;
}

ChunkReport GraphSubmission::deliver_alone(const std::string& request_key,
                                           const graph::GraphMime& mime, graph::SendRoute* route) {
    ChunkReport report;
    std::string why;
    // A client that missed our reply to an accepted message sends it again: never twice.
    if (hooks_.posted && hooks_.posted->was_accepted(request_key)) {
        report.fate = ChunkFate::already_accepted;
        report.detail = "accepted by an earlier attempt of this message";
        return report;
    }
    // An earlier attempt of this message (before a tempfail, or before a crash) may have
    // sent it: look for it first.
    bool earlier_open =
        hooks_.posted && hooks_.posted->uncertain_repeatability(request_key).has_value();
    if (earlier_open) {
        if (look_in_sent_items(mime.internet_message_id, mime.recipients(), why) ==
            SentItems::found) {
            report.fate = ChunkFate::already_accepted;
            report.detail = "found in Sent Items after an earlier ambiguous attempt";
            return report;
        }
        if (api_.on_ambiguous != AmbiguityPolicy::tempfail) {
            // Sending it again could deliver twice, which the operator does not want.
            report.fate = ChunkFate::unresolved;
            report.detail = "an earlier attempt may have sent it" + why;
            return report;
        }
        why.clear();
    }
    // The route's quota, only now: a message the service has (accepted before, found in Sent
    // Items) is never charged. Without room nothing is sent; if an earlier attempt may have
    // sent it, it stays unresolved (sent elsewhere it could arrive twice).
    if (hooks_.admit) {
        if (auto admission = hooks_.admit(mime.recipients().size()); !admission.granted) {
            report.fate = earlier_open ? ChunkFate::unresolved : ChunkFate::quota;
            report.detail = admission.detail;
            if (earlier_open) report.detail += "; an earlier attempt may have sent it";
            return report;
        }
    }

    HttpRequest request;
    request.method = "POST";
    request.url = user_url() + "/sendMail";
    request.headers = {{"Content-Type", "text/plain"}};
    request.body = graph::base64_encode_mime(mime.mime);

    bool ambiguous = false;  // an attempt of this transaction may have sent it
    bool refreshed_token = false;
    milliseconds backoff{1000};
    auto settle_ambiguity = [&]() -> std::optional<ChunkReport> {
        auto message_id = route && route->internet_message_id() ? route->internet_message_id()
                                                                : mime.internet_message_id;
        if (look_in_sent_items(message_id, mime.recipients(), why) == SentItems::found) {
            report.fate = ChunkFate::accepted;
            report.detail = "found in Sent Items after: " + why;
            return report;
        }
        return std::nullopt;
    };
    auto final_answer = [&](ChunkFate fate) {
        report.fate = ambiguous ? ChunkFate::unresolved : fate;
        report.detail = why + (ambiguous ? "; an earlier attempt may have sent it" : "");
        return report;
    };
    for (int attempt = 1; attempt <= api_.max_attempts; ++attempt) {
        if (remaining() <= milliseconds(0)) {
            why += " (time budget exhausted)";
            break;
        }
        if (route) {
            // A draft with every attachment uploaded, unless one is ready (graph_upload.cpp);
            // nothing was sent if it cannot be made.
            if (auto stop = route->prepare(why)) return final_answer(*stop);
            request = route->send_request();
        }
        if (hooks_.posted) {
            auto id = uuid_v4();
            if (auto remembered = hooks_.posted->remember(
                    request_key, {id ? *id : std::string(), hooks_.wall_clock()});
                !remembered) {
                why += (why.empty() ? "" : "; ") + remembered.error().message;
                break;
            }
        }
        auto response = exchange(request);
        milliseconds pause = backoff;
        bool was_ambiguous = false;
        if (!response && response.error().kind == ErrorKind::request_not_sent) {
            why = response.error().message;
        } else if (!response) {
            why = response.error().message;
            was_ambiguous = true;
        } else {
            long status = response->status;
            if (status == 202) {
                report.fate = ChunkFate::accepted;
                report.possible_duplicate = ambiguous || earlier_open;
                report.detail = ambiguous || earlier_open
                                    ? "HTTP 202 after an ambiguous attempt (possibly sent twice)"
                                    : "HTTP 202";
                return report;
            }
            why = describe_failure(*response);
            pause = retry_after_or(*response, pause, hooks_.wall_clock());
            if (status == 429) {
                // Throttled: the request failed and was not carried out.
            } else if (status == 401 && !refreshed_token) {
                if (api_.entra) api_.entra->invalidate(last_token_);
                refreshed_token = true;
                pause = milliseconds(0);
            } else if (status == 401 || status == 403 || status == 404) {
                // The app's permissions or the mailbox are wrong: not the message's fault,
                // so never a bounce.
                return final_answer(ChunkFate::not_sent);
            } else if (status == 413 ||
                       graph::error_code(*response) == "ErrorMessageSizeExceeded") {
                // Too large for the mailbox (Exchange's size limits): the oversize policy.
                return final_answer(ChunkFate::oversize);
            } else if (status >= 400 && status < 500 && status != 408) {
                // The service's verdict on the message (400 and the like).
                return final_answer(ChunkFate::rejected);
            } else {
                // 5xx, 408, and anything undocumented (another 2xx, a 3xx): it may have gone
                // out.
                was_ambiguous = true;
            }
        }
        if (was_ambiguous) {
            ambiguous = true;
            if (route) route->send_was_ambiguous();
            if (auto found = settle_ambiguity()) return *found;
            // Sending again could deliver twice: only if the operator prefers that to a loss.
            if (api_.on_ambiguous != AmbiguityPolicy::tempfail) break;
        }
        if (attempt == api_.max_attempts) break;
        if (pause.count() > 0 && !wait(pause, why)) break;
        backoff = std::min(backoff * 2, milliseconds(32000));
    }
    if (ambiguous) {
        report.fate = ChunkFate::unresolved;
        report.detail = why + "; Graph may have sent it (it has no idempotency key)";
        return report;
    }
    report.fate = ChunkFate::not_sent;
    report.detail = why;
    return report;
}

class GraphProvider final : public ApiProvider {
  public:
    const char* name() const override { return "graph"; }

    size_t max_source_bytes(const ApiSettings& api) const override {
        // The MIME goes whole, base64 (4/3) in one request; with upload sessions, up to
        // max_message_bytes as a draft.
        if (api.graph.upload_sessions) {
            return std::max(api.graph.max_message_bytes, api.max_request_bytes / 4 * 3);
        }
        return api.max_request_bytes / 4 * 3;
    }

    std::string oversize_hint(const ApiSettings& api) const override {
        return graph::oversize_hint(api);
    }

    ApiOutcome submit(const ApiSettings& api, const ProviderInput& input,
                      const ApiHooks& hooks) const override {
        ApiOutcome outcome;
        graph::GraphMimeOptions options;
        options.never_pass_headers = input.never_pass_headers;
        options.add_fields = input.add_headers;
        if (input.rewrite) options.rewrite = *input.rewrite;
        options.max_message_bytes = max_source_bytes(api) + 64 * 1024;  // room for a Bcc
        auto prepared =
            input.source.in_memory()
                ? graph::prepare_graph_mime(input.source.memory(), input.recipients, options)
                : graph::prepare_graph_mime_fd(input.source.fd(), input.recipients, options);
        if (!prepared) {
            outcome.kind = graph::is_message_too_large(prepared.error())
                               ? ApiOutcome::Kind::oversize
                               : ApiOutcome::Kind::unconvertible;
            outcome.detail = prepared.error().message;
            return outcome;
        }
        if (graph::exceeds_graph_request_limit(prepared->mime.size(), api.max_request_bytes) &&
            !api.graph.upload_sessions) {
            outcome.kind = ApiOutcome::Kind::oversize;
            outcome.detail = fmt::format(
                "{} bytes of MIME are over Graph's single-request limit ({} bytes with base64)",
                prepared->mime.size(), api.max_request_bytes);
            return outcome;
        }
        // The same key for the same message and recipients across the client's retries.
        std::string key = request_operation_id(input.identity.content_digest, input.identity.sender,
                                               prepared->recipients());
        GraphSubmission submission(api, hooks, input.deadline, outcome,
                                   input.sender.empty() ? api.graph.mailbox : input.sender);
        std::unique_ptr<graph::SendRoute> draft;
        if (graph::exceeds_graph_request_limit(prepared->mime.size(), api.max_request_bytes)) {
            // Too large for sendMail: a draft with upload sessions (graph_upload.cpp).
            auto route = graph::make_draft_route(submission, api, std::move(prepared->mime));
            if (!route) {
                outcome.kind = graph::draft_error_kind(route.error());
                outcome.detail = route.error().message;
                return outcome;
            }
            draft = std::move(*route);
        }
        ChunkReport report = submission.deliver(key, *prepared, draft.get());
        if (draft) draft->finish(report);
        report.recipients = prepared->recipients();
        outcome.detail = report.detail;
        outcome.possible_duplicate = report.possible_duplicate;
        switch (report.fate) {
            case ChunkFate::accepted:
            case ChunkFate::already_accepted:
                outcome.kind = ApiOutcome::Kind::accepted;
                break;
            case ChunkFate::rejected:
                outcome.kind = ApiOutcome::Kind::permanent;
                break;
            case ChunkFate::oversize:
                outcome.kind = ApiOutcome::Kind::oversize;
                break;
            case ChunkFate::quota:
                outcome.kind = ApiOutcome::Kind::quota;
                break;
            case ChunkFate::not_sent:
            case ChunkFate::unresolved:
            case ChunkFate::busy:
                outcome.kind = ApiOutcome::Kind::transient;
                break;
        }
        outcome.chunks.push_back(std::move(report));
        return outcome;
    }
};

}  // namespace

const ApiProvider& graph_provider() {
    static const GraphProvider provider;
    return provider;
}

}  // namespace paasmilter
