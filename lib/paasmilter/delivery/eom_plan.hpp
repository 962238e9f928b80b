// What the milter tells the MTA at end of message, as plain data: which routing headers to
// delete, which recipients to drop, which header to add, whether to quarantine, and the reply.
// Computed here from the verdict and (for an API route) what the service accepted; the
// libmilter glue only replays it, so every combination is unit-tested without an MTA.
#pragma once

#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "paasmilter/config.hpp"
#include "paasmilter/verdict.hpp"

namespace paasmilter {

struct MtaPlan {
    enum class Disposition { accept, discard, tempfail, reject };

    // Copies of the routing header the client sent, deleted from the last one backwards.
    int delete_routing_headers = 0;
    // Other header fields to delete, in this order: the name and the field's 1-based index
    // among the fields of that name (the client's loop stamps that do not verify, last first).
    std::vector<std::pair<std::string, int>> delete_headers;
    // RCPT TO arguments exactly as the MTA passed them (for smfi_delrcpt).
    std::vector<std::string> delete_recipients;
    // Recipients added after the deletions (smfi_addrcpt_par), with their ESMTP arguments
    // ("NOTIFY=... ORCPT=rfc822;..."): the external recipients of an external_only route, in
    // its pseudo-domain (route_addresses.hpp).
    struct AddRecipient {
        std::string address;  // with angle brackets
        std::string esmtp_args;
    };
    std::vector<AddRecipient> add_recipients;
    std::vector<std::pair<std::string, std::string>> add_headers;
    std::optional<std::string> quarantine_reason;
    Disposition disposition = Disposition::accept;
    // For tempfail and reject: "451", "4.3.0", one line of text (no '%', printable ASCII).
    std::string reply_code;
    std::string reply_status;
    std::string reply_text;
    // Fields appended to the message's decision log line: ", api=..., policy=...".
    std::string log;
};
const char* to_string(MtaPlan::Disposition disposition);

// Why an API route did not deliver to every remote recipient.
enum class ApiFailure {
    none,           // the service has every remote recipient
    internal,       // our own failure (no message source): always tempfail, never a policy
    transient,      // 429/5xx/timeouts/auth after retries: on_failure
    permanent,      // the service refused the message: on_permanent_failure
    unconvertible,  // the MIME could not be converted: on_permanent_failure
    oversize,       // too large (or too many MIME parts): on_oversize
    refused,        // the route's sender_map does not know the client: always rejected
    quota,          // a quota bucket of the route is empty: on_quota for the recipients the
                    // service lacks (it has `accepted`, from earlier attempts)
};
const char* to_string(ApiFailure failure);

struct ApiResult {
    ApiFailure failure = ApiFailure::none;
    std::string detail;  // the service's or the converter's words, for the log and reply
    // Remote recipients the service has; those whose fate is unknown (the service could not
    // tell whether it accepted them); the remaining remote recipients are not at the service.
    std::vector<std::string> accepted;
    std::vector<std::string> unresolved;
    // Some of the unresolved are being delivered by another transaction of the same message
    // right now: only a tempfail is safe, whatever on_ambiguous says.
    bool busy = false;
    std::string log;  // ", api=accepted, requests=3, operation_id=..." from the submission
};

// A route that is not the API (relay, pass, reject, tempfail, no route) or a dry run.
MtaPlan plan_for_verdict(const Verdict& verdict);

// A message's envelope recipients as the MTA passed them, in RCPT order.
struct EnvelopeRecipients {
    const std::vector<std::string>& addresses;  // without angle brackets
    const std::vector<std::string>& args;       // the RCPT address argument (for smfi_delrcpt)
    // Each RCPT's ESMTP parameters, separated by spaces ("NOTIFY=NEVER"); null: none known.
    const std::vector<std::string>* esmtp = nullptr;
};

// plan_for_verdict, and for a relay route that reroutes recipients (verdict.reroute_recipients:
// external_only, or milter.mta = "sendmail"; not in a dry run, not when a loop stopped it)
// its recipients rerouted into its pseudo-domain instead of the routing header: the external
// ones of an external_only route, else all (delivery/external_plan.cpp).
MtaPlan plan_for_verdict(const Verdict& verdict, const Route* route,
                         const EnvelopeRecipients& recipients);

// Sends the recipients of the message that are not in `keep` (and, when `relay` is
// external_only, that it does not count as internal) through the route: each is deleted and
// added again in the route's pseudo-domain, with an ORCPT naming it (or the client's own ORCPT
// and NOTIFY). The others keep the MTA's normal path. Appends ", external_only=ROUTE,
// rerouted=N, staying=M" to plan.log, or ", route_by=recipients, rerouted=N, staying=M" for a
// route that is not external_only (milter.mta = "sendmail").
void route_external_recipients(MtaPlan& plan, const Route& relay,
                               const EnvelopeRecipients& recipients,
                               const std::vector<std::string>& keep);

// An API route. `recipients`/`recipient_args` are the envelope recipients (without and with
// angle brackets, in RCPT order); those in the route's local_domains stay with the MTA.
MtaPlan plan_for_api(const Config& config, const ApiSettings& api, const Verdict& verdict,
                     const std::vector<std::string>& recipients,
                     const std::vector<std::string>& recipient_args, const ApiResult& result,
                     const std::vector<std::string>* recipient_esmtp = nullptr);

// One reply line the MTA can take: printable ASCII, no '%' (libmilter format escapes),
// at most 200 characters.
std::string reply_text(std::string_view text);

}  // namespace paasmilter
