// The API route at end of message: convert, submit, and only after the service accepted the
// message tell the MTA to discard its copy; otherwise apply the route's failure policy.
#pragma once

#include <libmilter/mfapi.h>

#include <string>

#include "message_state.hpp"
#include "paasmilter/verdict.hpp"

namespace paasmilter {

// At end of headers: an API-routed message (not in dry-run) starts collecting its source.
Result<void> start_api_spool(MessageState& message);

Result<void> add_routing_header(SMFICTX* ctx, const Config& config, const std::string& value);

sfsistat act_api(SMFICTX* ctx, const std::string& id, MessageState& message,
                 const Verdict& verdict);

}  // namespace paasmilter
