// Replays an end-of-message plan (lib/paasmilter/delivery/eom_plan.hpp) through libmilter.
#pragma once

#include <libmilter/mfapi.h>

#include <string>

#include "paasmilter/delivery/eom_plan.hpp"
#include "paasmilter/metrics.hpp"

namespace paasmilter {

// Carries out `plan` in order: delete routing headers (last copy first), the other headers
// it names (forged loop stamps), delete recipients, add recipients, add headers, quarantine,
// reply. If the MTA refuses any action the message is tempfailed (the MTA then drops every
// change made so far) and `log` says which action failed.
sfsistat replay(SMFICTX* ctx, const std::string& routing_header, const MtaPlan& plan,
                std::string& log);

// Counts the transaction in the metrics: its rule, route, action and what the MTA was told
// (`told`, replay()'s answer). `api` is the service's result on an API route, else null.
// Returns the outcome counted.
TransactionOutcome count_transaction(const Decision& decision, const Verdict& verdict,
                                     const MtaPlan& plan, sfsistat told, const ApiResult* api);

// Logs the transaction's one decision line (`line`) with its queue id; JSON lines also carry
// rule, route, action, outcome, client, from and nrcpt as members.
void log_decision(const std::string& queue_id, const std::string& line, const Decision& decision,
                  const Transaction& tx, TransactionOutcome outcome);

}  // namespace paasmilter
