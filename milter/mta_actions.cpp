#include "mta_actions.hpp"

#include <algorithm>

#include <fmt/format.h>

#include "paasmilter/log.hpp"
#include "paasmilter/metrics.hpp"

namespace paasmilter {

namespace {

sfsistat failed(SMFICTX* ctx, std::string& log, std::string_view what) {
    log += fmt::format(", error=MTA refused to {}; tempfail", what);
    smfi_setreply(ctx, const_cast<char*>("451"), const_cast<char*>("4.3.0"),
                  const_cast<char*>("Temporary failure in mail filter, try again later"));
    return SMFIS_TEMPFAIL;
}

// The rule as logs and metrics name it: "(default)" for milter.default_route, "" for none.
std::string rule_label(const Decision& decision) {
    if (decision.rule) return decision.rule->name;
    return decision.default_route ? "(default)" : "";
}

}  // namespace

sfsistat replay(SMFICTX* ctx, const std::string& routing_header, const MtaPlan& plan,
                std::string& log) {
    std::string header = routing_header;
    // From the last copy backwards so the indexes of the others do not shift.
    for (int index = plan.delete_routing_headers; index >= 1; --index) {
        if (smfi_chgheader(ctx, header.data(), index, nullptr) != MI_SUCCESS) {
            return failed(ctx, log, "remove the client's " + routing_header + " header");
        }
    }
    for (const auto& [name, index] : plan.delete_headers) {
        std::string n = name;
        if (smfi_chgheader(ctx, n.data(), index, nullptr) != MI_SUCCESS) {
            return failed(ctx, log, "remove a " + name + " header");
        }
    }
    for (const auto& rcpt : plan.delete_recipients) {
        std::string arg = rcpt;
        if (smfi_delrcpt(ctx, arg.data()) != MI_SUCCESS) {
            // After an acceptance, a tempfail is the safe answer: the retry finds the
            // service's operations and sends nothing twice.
            return failed(ctx, log, "delete a recipient");
        }
    }
    for (const auto& add : plan.add_recipients) {
        // After the deletions: the same recipient, now in an external_only route's
        // pseudo-domain, with an ORCPT naming the original for DSNs and the next hop.
        std::string rcpt = add.address, esmtp = add.esmtp_args;
        if (smfi_addrcpt_par(ctx, rcpt.data(), esmtp.empty() ? nullptr : esmtp.data()) !=
            MI_SUCCESS) {
            return failed(ctx, log, "add a recipient (SMFIF_ADDRCPT_PAR)");
        }
    }
    for (const auto& [name, value] : plan.add_headers) {
        std::string n = name, v = value;
        if (smfi_addheader(ctx, n.data(), v.data()) != MI_SUCCESS) {
            return failed(ctx, log, "add the " + name + " header");
        }
    }
    if (plan.quarantine_reason) {
        std::string reason = *plan.quarantine_reason;
        if (smfi_quarantine(ctx, reason.data()) != MI_SUCCESS) {
            return failed(ctx, log, "quarantine the message");
        }
    }
    switch (plan.disposition) {
        case MtaPlan::Disposition::accept:
            return SMFIS_CONTINUE;
        case MtaPlan::Disposition::discard:
            return SMFIS_DISCARD;
        case MtaPlan::Disposition::tempfail:
        case MtaPlan::Disposition::reject: {
            std::string code = plan.reply_code, status = plan.reply_status, text = plan.reply_text;
            if (!code.empty()) smfi_setreply(ctx, code.data(), status.data(), text.data());
            return plan.disposition == MtaPlan::Disposition::reject ? SMFIS_REJECT : SMFIS_TEMPFAIL;
        }
    }
    return SMFIS_TEMPFAIL;
}

TransactionOutcome count_transaction(const Decision& decision, const Verdict& verdict,
                                     const MtaPlan& plan, sfsistat told, const ApiResult* api) {
    MtaPlan::Disposition disposition = MtaPlan::Disposition::accept;
    if (told == SMFIS_DISCARD) disposition = MtaPlan::Disposition::discard;
    if (told == SMFIS_REJECT) disposition = MtaPlan::Disposition::reject;
    if (told == SMFIS_TEMPFAIL) disposition = MtaPlan::Disposition::tempfail;
    // When the MTA refused an action (told differs from the plan) nothing was changed.
    if (disposition == plan.disposition) {
        metrics().forged_routing_headers_removed(plan.delete_routing_headers);
        metrics().forged_loop_stamps_removed(static_cast<size_t>(
            std::count_if(plan.delete_headers.begin(), plan.delete_headers.end(),
                          [](const auto& header) { return header.first == kLoopHeader; })));
        if (verdict.loop.stopped && !verdict.dry_run && decision.route) {
            metrics().loop_stopped(decision.route->name);
        }
    }
    const TransactionOutcome outcome = transaction_outcome(
        verdict, plan, disposition, api != nullptr, api && !api->accepted.empty());
    metrics().transaction(rule_label(decision), decision.route ? decision.route->name : "",
                          decision.route ? to_string(decision.route->action) : "", outcome);
    return outcome;
}

void log_decision(const std::string& queue_id, const std::string& line, const Decision& decision,
                  const Transaction& tx, TransactionOutcome outcome) {
    log_for(LogLevel::info, queue_id, line,
            {{"rule", rule_label(decision)},
             {"route", decision.route ? decision.route->name : ""},
             {"action", decision.route ? to_string(decision.route->action) : ""},
             {"outcome", to_string(outcome)},
             {"client", tx.client_addr},
             {"from", sanitize_for_log(tx.sender, 120)},
             {"nrcpt", std::to_string(tx.recipients.size())}});
}

}  // namespace paasmilter
