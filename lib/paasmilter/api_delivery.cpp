#include "paasmilter/api_delivery.hpp"
#include "paasmilter/text.hpp"

#include <algorithm>
#include <ctime>
#include <thread>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "paasmilter/acs_auth.hpp"
#include "paasmilter/acs_json.hpp"
#include "paasmilter/crypto.hpp"
#include "paasmilter/delivery/message_identity.hpp"
#include "paasmilter/metrics.hpp"

namespace paasmilter {

const char* to_string(ApiOutcome::Kind kind) {
    switch (kind) {
        case ApiOutcome::Kind::accepted:
            return "accepted";
        case ApiOutcome::Kind::transient:
            return "transient-failure";
        case ApiOutcome::Kind::permanent:
            return "permanent-failure";
        case ApiOutcome::Kind::oversize:
            return "oversize";
        case ApiOutcome::Kind::unconvertible:
            return "conversion-failed";
        case ApiOutcome::Kind::quota:
            return "quota";
    }
    return "?";
}

const char* to_string(ChunkFate fate) {
    switch (fate) {
        case ChunkFate::accepted:
            return "accepted";
        case ChunkFate::already_accepted:
            return "already-accepted";
        case ChunkFate::not_sent:
            return "not-sent";
        case ChunkFate::unresolved:
            return "unresolved";
        case ChunkFate::busy:
            return "busy";
        case ChunkFate::rejected:
            return "rejected";
        case ChunkFate::oversize:
            return "oversize";
        case ChunkFate::quota:
            return "quota";
    }
    return "?";
}

namespace {
bool service_has(ChunkFate fate) {
    return fate == ChunkFate::accepted || fate == ChunkFate::already_accepted;
}
}  // namespace

std::vector<std::string> ApiOutcome::accepted_recipients() const {
    std::vector<std::string> out;
    for (const auto& chunk : chunks) {
        if (service_has(chunk.fate))
            out.insert(out.end(), chunk.recipients.begin(), chunk.recipients.end());
    }
    return out;
}

std::vector<std::string> ApiOutcome::unresolved_recipients() const {
    std::vector<std::string> out;
    for (const auto& chunk : chunks) {
        // Busy: another transaction's attempt may still get it accepted.
        if (chunk.fate == ChunkFate::unresolved || chunk.fate == ChunkFate::busy)
            out.insert(out.end(), chunk.recipients.begin(), chunk.recipients.end());
    }
    return out;
}

bool ApiOutcome::busy() const {
    return std::any_of(chunks.begin(), chunks.end(),
                       [](const ChunkReport& chunk) { return chunk.fate == ChunkFate::busy; });
}

std::vector<std::string> ApiOutcome::accepted_operation_ids() const {
    std::vector<std::string> out;
    for (const auto& chunk : chunks) {
        if (service_has(chunk.fate)) out.push_back(chunk.operation_id);
    }
    return out;
}

ApiHooks default_api_hooks(const ApiSettings& api) {
    ApiHooks hooks;
    hooks.provider = to_string(api.provider);
    hooks.send = [http = api.http, provider = hooks.provider](
                     const HttpRequest& request,
                     std::chrono::milliseconds timeout) -> Result<HttpResponse> {
        return send_measured(http.get(), provider, request, timeout);
    };
    hooks.sleep = [](std::chrono::milliseconds how_long) { std::this_thread::sleep_for(how_long); };
    hooks.now = [] { return std::chrono::steady_clock::now(); };
    hooks.wall_clock = [] { return std::chrono::system_clock::now(); };
    hooks.progress = [] {};
    return hooks;
}

std::chrono::milliseconds retry_after_or(const HttpResponse& response,
                                         std::chrono::milliseconds fallback,
                                         std::chrono::system_clock::time_point now) {
    auto after = parse_retry_after(response.header("Retry-After").value_or(""), now);
    return after ? std::chrono::duration_cast<std::chrono::milliseconds>(*after) : fallback;
}

bool wait_for_retry(const ApiHooks& hooks, std::chrono::steady_clock::time_point deadline,
                    std::chrono::milliseconds how_long, std::string& why,
                    std::chrono::milliseconds keep) {
    using namespace std::chrono;
    if (hooks.now() + how_long + keep >= deadline) {
        why += fmt::format(" (retry in {} s would exceed the time budget)",
                           duration_cast<seconds>(how_long).count());
        return false;
    }
    for (milliseconds left = how_long; left.count() > 0;) {
        milliseconds slice = std::min(left, milliseconds(5000));
        hooks.sleep(slice);
        hooks.progress();
        left -= slice;
    }
    metrics().api_retry(hooks.provider);
    return true;
}

Result<HttpResponse> send_measured(HttpClient* http, const char* provider,
                                   const HttpRequest& request, std::chrono::milliseconds timeout,
                                   SlotPool pool) {
    const auto started = std::chrono::steady_clock::now();
    auto response =
        http ? http->send(request, timeout, pool)
             : Result<HttpResponse>(make_error(ErrorKind::request_not_sent, "no HTTP client"));
    metrics().api_request(
        provider, request.method,
        response ? status_class(response->status) : status_class(response.error()),
        std::chrono::steady_clock::now() - started);
    return response;
}

std::vector<RecipientChunk> split_recipients(const EmailMessage& message, size_t limit) {
    std::vector<RecipientChunk> chunks;
    RecipientChunk current;
    for (auto [list, target] :
         {std::pair{&message.to, &RecipientChunk::to}, std::pair{&message.cc, &RecipientChunk::cc},
          std::pair{&message.bcc, &RecipientChunk::bcc}}) {
        for (const auto& address : *list) {
            if (current.size() == limit) chunks.push_back(std::exchange(current, {}));
            (current.*target).push_back(address);
        }
    }
    if (current.size() > 0 || chunks.empty()) chunks.push_back(std::move(current));
    return chunks;
}

std::optional<std::chrono::seconds> parse_retry_after(const std::string& value,
                                                      std::chrono::system_clock::time_point now) {
    if (value.empty()) return std::nullopt;
    if (std::all_of(value.begin(), value.end(), [](char c) { return c >= '0' && c <= '9'; })) {
        if (value.size() > 6) return std::chrono::seconds(999999);
        return std::chrono::seconds(std::stol(value));
    }
    std::tm tm{};
    if (!strptime(value.c_str(), "%a, %d %b %Y %H:%M:%S GMT", &tm)) return std::nullopt;
    auto when = std::chrono::system_clock::from_time_t(timegm(&tm));
    auto delta = std::chrono::duration_cast<std::chrono::seconds>(when - now);
    return std::max(delta, std::chrono::seconds(0));
}

Result<void> authorize_acs_request(const ApiSettings& api, HttpRequest& request,
                                   std::chrono::system_clock::time_point now,
                                   std::chrono::milliseconds timeout, std::string* bearer) {
    if (api.entra_credentials && !api.entra) {
        return make_error(ErrorKind::request_not_sent, "Entra ID: no token provider");
    }
    if (api.entra) {
        auto token = api.entra->token(timeout);
        if (!token) {
            return make_error(ErrorKind::request_not_sent,
                              "Entra ID token: " + token.error().message);
        }
        if (bearer) *bearer = *token;
        request.headers.emplace_back("Authorization", "Bearer " + *token);
    } else {
        auto signature =
            sign_acs_request(request.method, request.url, request.body, api.access_key, now);
        if (!signature) {
            return make_error(ErrorKind::request_not_sent, "signing: " + signature.error().message);
        }
        request.headers.insert(request.headers.end(), signature->begin(), signature->end());
    }
    auto client_request_id = uuid_v4();
    if (client_request_id)
        request.headers.emplace_back("x-ms-client-request-id", *client_request_id);
    return {};
}

std::string acs_operation_url(const ApiSettings& api, const std::string& operation_id) {
    return fmt::format("{}/emails/operations/{}?api-version={}", api.endpoint, operation_id,
                       api.api_version);
}

namespace {

using namespace std::chrono;
using Steady = steady_clock;

// "InvalidSenderUserName: ..." from ACS's error object {"code", "message"}.
std::string error_text(const nlohmann::json& error) {
    std::string text;
    if (error.contains("code") && error["code"].is_string()) {
        text = error["code"].get<std::string>();
    }
    if (error.contains("message") && error["message"].is_string()) {
        std::string message = error["message"].get<std::string>();
        if (message.size() > 300) message = message.substr(0, 300) + "...";
        text += (text.empty() ? "" : ": ") + message;
    }
    return text;
}

// A status answer for this operation: {"id": <the id>, "status": ...}.
bool names_operation(const HttpResponse& response, const std::string& operation_id) {
    auto status = parse_operation_status(response.body);
    return status && iequals(status->id, operation_id);
}

// Whether the service has an operation: the answer to "was this request accepted before?".
enum class Existence { exists, absent, unknown };

// `automatic` made concrete: a fleet's gateways do not share their journals.
LookupBeforePost concrete_lookup(LookupBeforePost configured, bool fleet) {
    if (configured != LookupBeforePost::automatic) return configured;
    return fleet ? LookupBeforePost::always : LookupBeforePost::own_attempts;
}

// One message's conversation with the service, within its deadline.
class Submission {
  public:
    Submission(const ApiSettings& api, const ApiHooks& hooks, Steady::time_point deadline,
               ApiOutcome& counts)
        : api_(api), hooks_(hooks), deadline_(deadline), counts_(counts) {
        // Keep a little of the budget to ask about an ambiguous last answer.
        auto budget = duration_cast<milliseconds>(deadline - hooks.now());
        reserve_ = std::clamp(budget / 5, milliseconds(0), milliseconds(5000));
    }

    // `recipients`: how many the request names (for the route's quota).
    ChunkReport deliver(const std::string& operation_id, const HttpBody& body, size_t recipients);

  private:
    ChunkReport deliver_alone(const std::string& operation_id, const HttpBody& body,
                              size_t recipients);
    Result<HttpResponse> exchange(HttpRequest request, milliseconds timeout);
    // Asks (with retries while `keep` of the budget remains) whether the service has it.
    Existence check_operation(const std::string& operation_id, bool retry, std::string& why,
                              milliseconds keep);
    // Waits `how_long` (keeping the MTA informed) if that leaves `keep` of the budget.
    bool wait(milliseconds how_long, std::string& why, milliseconds keep);
    milliseconds remaining() const { return duration_cast<milliseconds>(deadline_ - hooks_.now()); }
    milliseconds request_timeout(milliseconds keep) const {
        return std::max(
            std::min(remaining() - keep, duration_cast<milliseconds>(api_.request_timeout)),
            milliseconds(1));
    }
    milliseconds retry_after_or(const HttpResponse& response, milliseconds fallback) const {
        return paasmilter::retry_after_or(response, fallback, hooks_.wall_clock());
    }

    const ApiSettings& api_;
    const ApiHooks& hooks_;
    Steady::time_point deadline_;
    ApiOutcome& counts_;  // where requests and status checks are counted
    milliseconds reserve_{0};
    std::string last_token_;  // the bearer token of the last request, to drop it on a 401
};

Result<HttpResponse> Submission::exchange(HttpRequest request, milliseconds timeout) {
    // The token fetch and the request share one timeout: together they never outlast it.
    auto until = hooks_.now() + timeout;
    if (auto r = authorize_acs_request(api_, request, hooks_.wall_clock(), timeout, &last_token_);
        !r) {
        return r.error();
    }
    hooks_.progress();
    auto left = duration_cast<milliseconds>(until - hooks_.now());
    if (left <= milliseconds(0)) {
        return make_error(ErrorKind::request_not_sent, "no time left after fetching a token");
    }
    ++(request.method == "GET" ? counts_.status_checks : counts_.requests);
    auto response = hooks_.send(request, left);
    hooks_.progress();
    return response;
}

bool Submission::wait(milliseconds how_long, std::string& why, milliseconds keep) {
    return wait_for_retry(hooks_, deadline_, how_long, why, keep);
}

Existence Submission::check_operation(const std::string& operation_id, bool retry, std::string& why,
                                      milliseconds keep) {
    HttpRequest request;
    request.method = "GET";
    request.url = acs_operation_url(api_, operation_id);
    milliseconds backoff{1000};
    for (int attempt = 1;; ++attempt) {
        if (remaining() <= milliseconds(0)) {
            why = "no time left to ask the service about operation " + operation_id;
            return Existence::unknown;
        }
        auto response = exchange(request, request_timeout(milliseconds(0)));
        milliseconds pause = backoff;
        if (!response) {
            why = "status check: " + response.error().message;
        } else if (response->status == 200 && names_operation(*response, operation_id)) {
            return Existence::exists;
        } else if (response->status == 200) {
            // Not the service's answer (a proxy's page?): never take it for an acceptance.
            why = "status check: HTTP 200 without the operation's id and status";
        } else if (response->status == 404) {
            return Existence::absent;
        } else {
            why = "status check: " + describe_failure(*response);
            if (response->status == 429) pause = retry_after_or(*response, backoff);
            if (response->status == 401 && api_.entra) api_.entra->invalidate(last_token_);
        }
        if (!retry || attempt >= api_.max_attempts || !wait(pause, why, keep)) {
            return Existence::unknown;
        }
        backoff = std::min(backoff * 2, milliseconds(16000));
    }
}

ChunkReport Submission::deliver(const std::string& operation_id, const HttpBody& body,
                                size_t recipients) {
    // Another transaction of the same message (a client that gave up and resent) may be
    // delivering this request right now: never post it concurrently.
    DeliveringRequest delivering(hooks_.posted, operation_id);
    if (!delivering.alone()) {
        ChunkReport report;
        report.operation_id = operation_id;
        report.fate = ChunkFate::busy;
        report.detail = "another transaction of this message is delivering this request";
        return report;
    }
    ChunkReport report = deliver_alone(operation_id, body, recipients);
    delivering.finish(
        report.fate == ChunkFate::unresolved,
        report.fate == ChunkFate::accepted || report.fate == ChunkFate::already_accepted);
    return report;
}

ChunkReport Submission::deliver_alone(const std::string& operation_id, const HttpBody& body,
                                      size_t recipients) {
    ChunkReport report;
    report.operation_id = operation_id;

    // 1. Did an earlier attempt of this message (a client retry after a tempfail, a crash
    //    between the service's 202 and our reply to the MTA) get this request accepted?
    //    Only the service can say for an attempt another gateway made; for this gateway's
    //    own attempts its journal knows whether there was one (one round trip less).
    std::string why;
    const bool ask_first =
        concrete_lookup(api_.lookup_before_post, hooks_.fleet) == LookupBeforePost::always ||
        !hooks_.posted || !hooks_.posted->knows_every_post() ||
        hooks_.posted->maybe_posted(operation_id);
    switch (ask_first ? check_operation(operation_id, true, why, reserve_) : Existence::absent) {
        case Existence::exists:
            report.fate = ChunkFate::already_accepted;
            report.detail = "operation exists";
            return report;
        case Existence::unknown:
            // Nothing was posted in this attempt. If no earlier attempt posted it either,
            // the service certainly lacks it; otherwise only the service could tell, and the
            // next attempt asks again.
            report.fate = hooks_.posted && !hooks_.posted->maybe_posted(operation_id)
                              ? ChunkFate::not_sent
                              : ChunkFate::unresolved;
            report.detail =
                "cannot ask the service whether an earlier attempt was accepted: " + why;
            return report;
        case Existence::absent:
            break;
    }

    // 2. Post it, repeatably: every retry in this transaction is the same request to ACS.
    HttpRequest request;
    request.method = "POST";
    request.url = fmt::format("{}/emails:send?api-version={}", api_.endpoint, api_.api_version);
    request.body = body;
    // A request goes out only once it is written down (see PostedRequests): a journal that
    // cannot be written stops the attempts, and what was posted before is asked about.
    bool recorded = true;
    auto use_repeatability = [&](const PostedRequests::Repeatability& r) {
        request.headers = {{"Content-Type", "application/json"},
                           {"Operation-Id", operation_id},
                           {"Repeatability-Request-Id", r.request_id},
                           {"Repeatability-First-Sent", rfc1123_date(r.first_sent)}};
        if (!hooks_.posted) return;
        if (auto remembered = hooks_.posted->remember(operation_id, r); !remembered) {
            recorded = false;
            why += (why.empty() ? "" : "; ") + remembered.error().message;
        }
    };
    auto new_repeatability = [&] {
        auto id = uuid_v4();
        use_repeatability({id ? *id : std::string(), hooks_.wall_clock()});
    };
    // An earlier transaction left this request's fate open, and a client retried at once:
    // the original may still be running although the service has no operation yet. Repeat
    // that very request (the service answers 409 while it runs, or replays its answer)
    // instead of posting a new one. Only while the original can still be running: the
    // earlier transaction may have posted it again until its time budget ran out (counted
    // from before its first post), each post running up to the request timeout, plus a
    // margin. After that an absent operation is proof, and a replayed 409 must not hold the
    // message back for the rest of the service's 5-minute window.
    std::optional<PostedRequests::Repeatability> earlier =
        hooks_.posted ? hooks_.posted->uncertain_repeatability(operation_id) : std::nullopt;
    bool repeating_earlier = earlier && hooks_.wall_clock() - earlier->first_sent <
                                            api_.time_budget + api_.request_timeout + seconds(30);
    // The route's quota, only now: the service said it lacks this request, so it is a new
    // one (a repeat of an earlier attempt's request was charged when that attempt posted it).
    // Without room, nothing is posted and the service certainly lacks it: on_quota may send
    // it elsewhere.
    if (!repeating_earlier && hooks_.admit) {
        if (auto admission = hooks_.admit(recipients); !admission.granted) {
            report.fate = ChunkFate::quota;
            report.detail = admission.detail;
            return report;
        }
    }
    if (repeating_earlier) {
        use_repeatability(*earlier);
    } else {
        new_repeatability();
    }

    // What the last attempt leaves open. `finished`: the service answered without accepting
    // it (500, 503, 412), so an absent operation proves it was not sent. `in_flight`: no
    // answer, a gateway timeout or 409, so the original may still be running and an absent
    // operation proves nothing yet.
    // Once an attempt may still be running it stays so for the whole transaction: a later
    // answer (a 503 from a gateway, a 412, a 429) says nothing about that earlier attempt.
    enum class Doubt { none, finished, in_flight };
    Doubt doubt = repeating_earlier ? Doubt::in_flight : Doubt::none;
    auto raise = [&](Doubt d) { doubt = std::max(doubt, d); };
    // A final answer to this attempt. If an earlier attempt may still be running, only the
    // service can say whether it went through: accepted if the operation exists, else
    // unresolved -- never a verdict that would send the message elsewhere or bounce it.
    // The operations endpoint says the service has it, after `why` had left it open.
    auto confirmed = [&] {
        report.fate = ChunkFate::accepted;
        report.detail = "accepted (confirmed after: " + why + ")";
        return report;
    };
    auto final_answer = [&](ChunkFate fate) {
        report.detail = why;
        if (doubt != Doubt::in_flight) {
            report.fate = fate;
            return report;
        }
        std::string check_why;
        if (check_operation(operation_id, true, check_why, milliseconds(0)) == Existence::exists) {
            return confirmed();
        }
        report.fate = ChunkFate::unresolved;
        report.detail = why + "; an earlier attempt may still be in progress";
        return report;
    };
    bool refreshed_token = false;
    milliseconds backoff{1000};
    for (int attempt = 1; attempt <= api_.max_attempts; ++attempt) {
        if (!recorded) break;
        if (remaining() <= reserve_) {
            why += " (time budget exhausted)";
            break;
        }
        auto response = exchange(request, request_timeout(reserve_));
        milliseconds pause = backoff;
        bool ask_first = false;  // before posting again, ask whether it went through
        if (!response && response.error().kind == ErrorKind::request_not_sent) {
            // Nothing reached the service (DNS, connect, TLS, token): a plain retry.
            why = response.error().message;
        } else if (!response) {
            why = response.error().message;
            raise(Doubt::in_flight);
            ask_first = true;
        } else {
            long status = response->status;
            if (status == 202) {
                report.fate = ChunkFate::accepted;
                report.detail = "HTTP 202";
                return report;
            }
            why = describe_failure(*response);
            if (repeating_earlier && status >= 400 && status < 500 && status != 401 &&
                status != 403 && status != 409) {
                // A repeat of a finished request gets the original's answer (documented): a
                // 4xx means the earlier attempt was not carried out.
                doubt = Doubt::none;
            }
            repeating_earlier = false;
            if (status == 409) {
                // The original of this repeatable request is still in progress (or another
                // attempt of the message holds the operation id): wait, then ask.
                raise(Doubt::in_flight);
                ask_first = true;
                pause = retry_after_or(*response, backoff);
            } else if (status == 412) {
                // First-Sent left the service's 5-minute window: the service will not tell
                // a repeat from a new request any more, so ask whether the original went
                // through and start a new repeatable request only if it did not.
                raise(Doubt::finished);
                ask_first = true;
                pause = milliseconds(0);
            } else if (status == 429) {
                // Throttled: this attempt was not executed. A repeat of the same repeatable
                // request would only be answered with this 429 again (the service replays a
                // 4xx), so the retry is a new one -- unless an earlier attempt may still be
                // running: then only a repeat is safe.
                pause = retry_after_or(*response, backoff);
                if (doubt != Doubt::in_flight) {
                    doubt = Doubt::none;
                    new_repeatability();
                }
            } else if (status == 413) {
                return final_answer(ChunkFate::oversize);
            } else if (status == 401 && api_.entra && !refreshed_token) {
                // A token the service no longer takes: drop it and try once with a new one.
                api_.entra->invalidate(last_token_);
                refreshed_token = true;
                pause = milliseconds(0);
                if (doubt != Doubt::in_flight) {
                    doubt = Doubt::none;
                    new_repeatability();  // a repeat would replay the 401
                }
            } else if (status == 401 || status == 403) {
                // The key or the app's role is wrong: not the message's fault, so never a
                // bounce; retrying now will not help either.
                return final_answer(ChunkFate::not_sent);
            } else if (status >= 500 || status == 408) {
                // A 5xx may come after the message went out (a 502/504 from a gateway in
                // front of a service that carried on): ask before posting again.
                raise(status == 502 || status == 504 || status == 408 ? Doubt::in_flight
                                                                      : Doubt::finished);
                ask_first = true;
            } else {
                // 400 included: the body is identical on every attempt, so a repeatability
                // mismatch cannot be ours; it is the service's verdict on the message.
                return final_answer(ChunkFate::rejected);
            }
        }
        if (attempt == api_.max_attempts) break;
        if (pause.count() > 0 && !wait(pause, why, reserve_)) break;
        if (ask_first) {
            // Only the operations endpoint can say whether the last attempt went through:
            // posting again without its answer could send the message twice (a repeat of a
            // request that got a 5xx is executed again, as documented).
            std::string check_why;
            Existence existence = check_operation(operation_id, true, check_why, reserve_);
            if (existence == Existence::exists) return confirmed();
            if (existence == Existence::unknown) {
                report.fate = ChunkFate::unresolved;
                report.detail = why + "; " + check_why;
                return report;
            }
            // Absent: post again, repeatably. If the original is still running the service
            // answers 409; if it failed with a 5xx the repeat is executed (documented).
            if (response && response->status == 412) {
                // The service no longer tracks the original: a new request is safe only if
                // no attempt may still be running.
                if (doubt == Doubt::in_flight) {
                    report.fate = ChunkFate::unresolved;
                    report.detail = why + "; an earlier attempt may still be in progress";
                    return report;
                }
                new_repeatability();
            }
        }
        backoff = std::min(backoff * 2, milliseconds(16000));
    }

    // 3. Out of attempts or time. If the last answer left it open, ask once more.
    if (doubt != Doubt::none) {
        std::string check_why;
        switch (check_operation(operation_id, true, check_why, milliseconds(0))) {
            case Existence::exists:
                return confirmed();
            case Existence::absent:
                if (doubt == Doubt::in_flight) break;  // it may still arrive
                report.fate = ChunkFate::not_sent;
                report.detail = why;
                return report;
            case Existence::unknown:
                report.fate = ChunkFate::unresolved;
                report.detail = why + "; " + check_why;
                return report;
        }
        report.fate = ChunkFate::unresolved;
        report.detail = why +
                        "; the service has no operation yet, but the last request may "
                        "still be in progress";
        return report;
    }
    report.fate = ChunkFate::not_sent;
    report.detail = why;
    return report;
}

}  // namespace

// "HTTP 400 InvalidSenderUserName: ..." from ACS's error body {"error":{"code","message"}}.
std::string describe_failure(const HttpResponse& response) {
    std::string text = fmt::format("HTTP {}", response.status);
    auto body = nlohmann::json::parse(response.body, nullptr, false);
    if (body.is_object() && body.contains("error") && body["error"].is_object()) {
        std::string error = error_text(body["error"]);
        if (!error.empty()) text += " " + error;
    }
    return text;
}

std::optional<OperationStatus> parse_operation_status(std::string_view body) {
    auto json = nlohmann::json::parse(body, nullptr, false);
    if (!json.is_object() || !json.contains("status") || !json["status"].is_string()) {
        return std::nullopt;
    }
    OperationStatus out;
    out.status = json["status"].get<std::string>();
    if (json.contains("id") && json["id"].is_string()) out.id = json["id"].get<std::string>();
    if (json.contains("error") && json["error"].is_object()) out.error = error_text(json["error"]);
    return out;
}

ApiOutcome submit_to_acs(const ApiSettings& api, EmailMessage message,
                         const MessageIdentity& identity, Steady::time_point deadline,
                         const ApiHooks& hooks) {
    ApiOutcome outcome;
    auto chunks = split_recipients(message, api.max_recipients_per_request);
    AcsRequestRenderer renderer(std::move(message));
    // Size-check every request before sending any, so an oversize message is refused whole
    // instead of half-delivered.
    for (const auto& chunk : chunks) {
        size_t size = renderer.body_size(chunk);
        if (size > api.max_request_bytes) {
            outcome.kind = ApiOutcome::Kind::oversize;
            outcome.detail = fmt::format("request of {} bytes exceeds max_request_bytes {}", size,
                                         api.max_request_bytes);
            return outcome;
        }
    }
    Submission submission(api, hooks, deadline, outcome);
    bool stopped = false;
    for (size_t i = 0; i < chunks.size(); ++i) {
        ChunkReport report;
        report.recipients = chunks[i].addresses();
        report.operation_id =
            request_operation_id(identity.content_digest, identity.sender, report.recipients);
        if (stopped) {
            report.fate = ChunkFate::not_sent;
            report.detail = "not attempted after an earlier request failed";
        } else {
            std::vector<std::string> recipients = std::move(report.recipients);
            report = submission.deliver(report.operation_id, renderer.body(chunks[i]),
                                        recipients.size());
            report.recipients = std::move(recipients);
            // After a failure the rest would most likely fail the same way; they go to the
            // failure policy with it (and are asked about first on the next attempt).
            stopped = !service_has(report.fate);
        }
        outcome.chunks.push_back(std::move(report));
    }

    // The overall kind: the first request the service does not have decides.
    outcome.kind = ApiOutcome::Kind::accepted;
    size_t count = outcome.chunks.size();
    for (size_t i = 0; i < count; ++i) {
        const ChunkReport& report = outcome.chunks[i];
        if (service_has(report.fate)) continue;
        outcome.kind = report.fate == ChunkFate::rejected   ? ApiOutcome::Kind::permanent
                       : report.fate == ChunkFate::oversize ? ApiOutcome::Kind::oversize
                       : report.fate == ChunkFate::quota    ? ApiOutcome::Kind::quota
                                                            : ApiOutcome::Kind::transient;
        outcome.detail = count > 1 ? fmt::format("request {}/{}: {}", i + 1, count, report.detail)
                                   : report.detail;
        return outcome;
    }
    int already = static_cast<int>(
        std::count_if(outcome.chunks.begin(), outcome.chunks.end(),
                      [](const ChunkReport& r) { return r.fate == ChunkFate::already_accepted; }));
    outcome.detail = already ? fmt::format("HTTP 202 x{}, {} accepted by an earlier attempt",
                                           count - already, already)
                             : fmt::format("HTTP 202 x{}", count);
    return outcome;
}

bool address_in_domains(std::string_view address, const std::vector<std::string>& domains) {
    auto at = address.rfind('@');
    if (at == std::string_view::npos) return false;
    std::string_view domain = address.substr(at + 1);
    return std::any_of(domains.begin(), domains.end(),
                       [&](const std::string& d) { return iequals(d, domain); });
}

std::string header_block(const std::vector<HeaderField>& headers) {
    std::string out;
    for (const auto& h : headers) {
        out += h.name;
        out += ": ";
        // Folded values arrive with bare LF (or CRLF); normalise to CRLF.
        for (size_t i = 0; i < h.value.size(); ++i) {
            char c = h.value[i];
            if (c == '\r') continue;
            if (c == '\n') {
                out += "\r\n";
                continue;
            }
            out += c;
        }
        out += "\r\n";
    }
    out += "\r\n";
    return out;
}

}  // namespace paasmilter
