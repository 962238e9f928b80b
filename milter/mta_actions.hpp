// Replays an end-of-message plan (lib/paasmilter/delivery/eom_plan.hpp) through libmilter.
#pragma once

#include <libmilter/mfapi.h>

#include <string>

#include "paasmilter/delivery/eom_plan.hpp"

namespace paasmilter {

// Carries out `plan` in order: delete routing headers (last copy first), delete recipients,
// add headers, quarantine, reply. If the MTA refuses any action the message is tempfailed
// (the MTA then drops every change made so far) and `log` says which action failed.
sfsistat replay(SMFICTX* ctx, const std::string& routing_header, const MtaPlan& plan,
                std::string& log);

}  // namespace paasmilter
