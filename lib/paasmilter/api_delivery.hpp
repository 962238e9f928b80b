// Submitting one converted message to Azure Communication Services Email exactly once:
// split into requests of at most 50 recipients, find out whether an earlier attempt of the
// same message already got each request accepted, post the rest with the repeatability
// headers ACS documents, resolve every ambiguous answer before retrying or giving up, and say
// exactly which recipients the service has.
//
// What the service documents, and what this relies on (nothing else):
// - Repeatable requests (learn.microsoft.com/rest/api/communication/repeatable-requests,
//   "Applies to: ACS Email (Email Send API)"): with Repeatability-Request-Id and
//   Repeatability-First-Sent, a repeat within 5 minutes gets the original's answer if it was
//   2xx/4xx, 409 while the original is still in progress, a re-execution if it was 5xx; 412
//   once First-Sent is older than the window; 400 for malformed headers or a different body.
// - GET /emails/operations/{operationId} (CommunicationServicesEmail.json, "Get the status
//   of the email send operation"): 200 for an operation the service accepted, 404 otherwise.
//   The Operation-Id header names the operation the service creates.
// Nothing assumes the service drops a repeated Operation-Id: a repeat is only ever posted
// after the operations endpoint said the id does not exist.
#pragma once

#include <chrono>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "paasmilter/acs_json.hpp"
#include "paasmilter/classifier.hpp"
#include "paasmilter/config.hpp"
#include "paasmilter/delivery/posted_requests.hpp"
#include "paasmilter/email_message.hpp"
#include "paasmilter/http_client.hpp"

namespace paasmilter {

// What became of one request (one chunk of at most 50 recipients).
enum class ChunkFate {
    accepted,          // 202 now
    already_accepted,  // an earlier attempt of this message got it accepted (operation exists)
    not_sent,          // not accepted, and the service does not have it: safe to send elsewhere
    unresolved,        // may or may not have been accepted: the service could not tell us
    busy,              // another transaction of the same message is delivering it right now
    rejected,          // the service refused it for good (4xx)
    oversize,          // too large for the service
    quota,             // not posted: the route's quota has no room for it, and no earlier
                       // attempt left it at the service (safe to send elsewhere)
};
const char* to_string(ChunkFate fate);

struct ChunkReport {
    std::string operation_id;
    std::vector<std::string> recipients;
    ChunkFate fate = ChunkFate::not_sent;
    std::string detail;  // "HTTP 400 InvalidSenderUserName: ..." (no secrets)
    // Accepted after an attempt without a clear answer that may have been carried out too.
    bool possible_duplicate = false;
};

struct ApiOutcome {
    enum class Kind {
        accepted,       // every recipient: the local copy may go
        transient,      // some or all not accepted, worth retrying later
        permanent,      // the service refused the message for good
        oversize,       // too large for the service
        unconvertible,  // the message could not be made into the service's request
        quota,          // the route's quota let some or all of it not be posted
    };
    Kind kind = Kind::transient;
    std::string detail;
    std::vector<ChunkReport> chunks;
    int requests = 0;  // messages posted (each attempt counts)
    // Accepted, but an earlier attempt got no clear answer and may have been carried out
    // too (a service without idempotency: Graph).
    bool possible_duplicate = false;
    int status_checks = 0;  // operation status lookups

    // Recipients the service has (accepted now or by an earlier attempt).
    std::vector<std::string> accepted_recipients() const;
    // Recipients whose request may or may not have been accepted.
    std::vector<std::string> unresolved_recipients() const;
    // True when another transaction of the message is delivering part of it: only a
    // tempfail is safe (its outcome is not known yet, whatever on_ambiguous says).
    bool busy() const;
    // Operation ids of the requests the service has.
    std::vector<std::string> accepted_operation_ids() const;
};
const char* to_string(ApiOutcome::Kind kind);

// Hooks, so tests can run the protocol without a network or a clock, and the milter can keep
// the MTA's timeout alive (smfi_progress) while waiting.
struct ApiHooks {
    std::function<Result<HttpResponse>(const HttpRequest&, std::chrono::milliseconds)> send;
    std::function<void(std::chrono::milliseconds)> sleep;
    // Deadlines and waits run on a monotonic clock; dates sent in headers use the wall clock.
    std::function<std::chrono::steady_clock::time_point()> now;
    std::function<std::chrono::system_clock::time_point()> wall_clock;
    std::function<void()> progress;
    // A bearer token for a service that takes only tokens (Graph), fetched within the
    // timeout; unset: the route's Entra ID token provider.
    std::function<Result<std::string>(std::chrono::milliseconds)> bearer_token;
    // Requests this process posted (see delivery/posted_requests.hpp); null: every request
    // counts as possibly posted before.
    PostedRequests* posted = nullptr;
    // The service, for metric labels ("acs", "graph").
    const char* provider = "acs";
    // Asked right before a request would be posted new -- once the provider knows that no
    // earlier attempt of the message got it to the service, and it is not repeating an
    // earlier attempt's own request -- with the request's recipient count: whether the
    // route's quota lets it go. A request the service already has is never charged, so a
    // client's retry of an accepted message is discarded even with the bucket empty.
    // Unset: every request may go.
    struct Admission {
        bool granted = true;
        std::string detail;  // why not ("route quota exhausted: messages_per_hour")
    };
    std::function<Admission(size_t recipients)> admit;
    // Other gateways may serve the same clients ([quota] declares a fleet): with
    // lookup_before_post = auto, the service is asked before every first post.
    bool fleet = false;
};
ApiHooks default_api_hooks(const ApiSettings& api);

// `http`->send (an Error of kind request_not_sent when null), counted and timed in the
// metrics under `provider`.
Result<HttpResponse> send_measured(HttpClient* http, const char* provider,
                                   const HttpRequest& request, std::chrono::milliseconds timeout,
                                   SlotPool pool = SlotPool::requests);

// Waits `how_long` before a retry, in slices so the MTA hears from us (smfi_progress), if
// that still leaves `keep` before `deadline`; otherwise adds why not to `why` and returns
// false at once.
bool wait_for_retry(const ApiHooks& hooks, std::chrono::steady_clock::time_point deadline,
                    std::chrono::milliseconds how_long, std::string& why,
                    std::chrono::milliseconds keep = std::chrono::milliseconds(0));

// The message's identity across the client's retries: the content digest (see
// delivery/message_identity.hpp) and the envelope sender.
struct MessageIdentity {
    std::string content_digest;
    std::string sender;
};

// Submits `message` (its recipients are the ones the API must deliver to) before `deadline`.
ApiOutcome submit_to_acs(const ApiSettings& api, EmailMessage message,
                         const MessageIdentity& identity,
                         std::chrono::steady_clock::time_point deadline, const ApiHooks& hooks);

// Adds the authentication headers (HMAC signature or Entra bearer token, fetched within
// `timeout`) and a client request id. `bearer` receives the token used, if any.
Result<void> authorize_acs_request(const ApiSettings& api, HttpRequest& request,
                                   std::chrono::system_clock::time_point now,
                                   std::chrono::milliseconds timeout,
                                   std::string* bearer = nullptr);

// GET URL of an operation's status.
std::string acs_operation_url(const ApiSettings& api, const std::string& operation_id);

// An operation status body {"id", "status", "error":{"code","message"}}: error is
// "code: message"; nullopt when `body` has no status.
struct OperationStatus {
    std::string id;
    std::string status;
    std::string error;
};
std::optional<OperationStatus> parse_operation_status(std::string_view body);

// "HTTP 400 InvalidSenderUserName: ..." for the log and the reply: the status and the error
// object {"error": {"code", "message"}} that ACS and Graph both answer with (no secrets).
std::string describe_failure(const HttpResponse& response);

// The requests' recipient split: chunks of at most `limit`, in to, cc, bcc order.
std::vector<RecipientChunk> split_recipients(const EmailMessage& message, size_t limit);

// Seconds to wait from a Retry-After header (delta-seconds or an HTTP date); nullopt if absent
// or unparsable.
std::optional<std::chrono::seconds> parse_retry_after(const std::string& value,
                                                      std::chrono::system_clock::time_point now);

// How long to wait before retrying after `response`: its Retry-After, else `fallback`.
std::chrono::milliseconds retry_after_or(const HttpResponse& response,
                                         std::chrono::milliseconds fallback,
                                         std::chrono::system_clock::time_point now);

// True when the address's domain is one of `domains` (case-insensitive, exact).
bool address_in_domains(std::string_view address, const std::vector<std::string>& domains);

// The header block as the MTA passed it to us, ready for a MIME parser: "Name: value" lines,
// folds kept, CRLF line ends, and the empty line that ends the header.
std::string header_block(const std::vector<HeaderField>& headers);

}  // namespace paasmilter
