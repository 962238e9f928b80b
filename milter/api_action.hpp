// The API route at end of message: convert, submit, and only after the service accepted the
// message tell the MTA to discard its copy; otherwise apply the route's failure policy.
#pragma once

#include <libmilter/mfapi.h>

#include <chrono>
#include <string>

#include "message_state.hpp"
#include "paasmilter/verdict.hpp"

namespace paasmilter {

// At end of headers: an API-routed message (not in dry-run) starts collecting its source and
// its content digest. `queue_id` is Postfix's (the "i" macro), to recognise the headers
// Postfix generated for this attempt.
Result<void> start_api_spool(MessageState& message, const std::string& queue_id);

// Polls the final status of accepted operations in the background (started on first use).
class StatusPoller;
StatusPoller& status_poller();

// The requests this process posted (started on first use).
class PostedRequests;
PostedRequests& posted_requests();

// A piece of the body of a message start_api_spool() started.
Result<void> append_api_body(MessageState& message, std::string_view data);

// Everything, conversion included, must be done by `deadline` (time_budget from end of
// message, on the monotonic clock).
sfsistat act_api(SMFICTX* ctx, const std::string& id, MessageState& message, const Verdict& verdict,
                 std::chrono::steady_clock::time_point deadline);

}  // namespace paasmilter
