// Submitting one converted message to Azure Communication Services Email: split into
// requests of at most 50 recipients, sign, retry within the message's time budget, and say
// exactly which recipients the service accepted.
#pragma once

#include <chrono>
#include <functional>
#include <string>
#include <vector>

#include "paasmilter/classifier.hpp"
#include "paasmilter/config.hpp"
#include "paasmilter/email_message.hpp"
#include "paasmilter/http_client.hpp"

namespace paasmilter {

struct ApiOutcome {
    enum class Kind { accepted, transient, permanent, oversize };
    Kind kind = Kind::transient;
    std::string detail;  // "HTTP 400 InvalidSenderUserName: ..." (no secrets)
    // Envelope addresses the service accepted (all of them when kind == accepted).
    std::vector<std::string> accepted_recipients;
    std::vector<std::string> operation_ids;  // of the accepted requests
    int requests = 0;                        // HTTP requests made
};
const char* to_string(ApiOutcome::Kind kind);

// Hooks, so tests can run the retry logic without a network or a clock, and the milter
// can keep the MTA's timeout alive (smfi_progress) while waiting.
struct ApiHooks {
    std::function<Result<HttpResponse>(const HttpRequest&, std::chrono::milliseconds)> send;
    std::function<void(std::chrono::milliseconds)> sleep;
    std::function<std::chrono::system_clock::time_point()> now;
    std::function<void()> progress;
};
ApiHooks default_api_hooks(const ApiSettings& api);

// `idempotency_key` identifies the message across retries (Message-ID, envelope): the
// Operation-Id of each request derives from it, so the service drops a repeated request
// whose earlier copy it had accepted.
ApiOutcome submit_to_acs(const ApiSettings& api, const EmailMessage& message,
                         const std::string& idempotency_key, const ApiHooks& hooks);

// The requests' recipient split: chunks of at most `limit`, in to, cc, bcc order.
std::vector<EmailMessage> split_recipients(const EmailMessage& message, size_t limit);

// A UUID (v5) for request `index` of `count` of the message.
std::string operation_id(const std::string& idempotency_key, size_t index, size_t count);

// Seconds to wait from a Retry-After header (delta-seconds or an HTTP date); nullopt if absent
// or unparsable.
std::optional<std::chrono::seconds> parse_retry_after(const std::string& value,
                                                      std::chrono::system_clock::time_point now);

// True when the address's domain is one of `domains` (case-insensitive, exact).
bool address_in_domains(std::string_view address, const std::vector<std::string>& domains);

// Identifies a message across the client's retries: Message-ID (or Date+Subject+From when
// there is none), envelope sender and the API recipients.
std::string idempotency_key(const Transaction& tx, std::vector<std::string> api_recipients);

// The header block as the MTA passed it to us, ready for a MIME parser: "Name: value" lines,
// folds kept, CRLF line ends, and the empty line that ends the header.
std::string header_block(const std::vector<HeaderField>& headers);

}  // namespace paasmilter
