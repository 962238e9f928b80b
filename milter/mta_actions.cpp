#include "mta_actions.hpp"

#include <fmt/format.h>

namespace paasmilter {

namespace {

sfsistat failed(SMFICTX* ctx, std::string& log, std::string_view what) {
    log += fmt::format(", error=MTA refused to {}; tempfail", what);
    smfi_setreply(ctx, const_cast<char*>("451"), const_cast<char*>("4.3.0"),
                  const_cast<char*>("Temporary failure in mail filter, try again later"));
    return SMFIS_TEMPFAIL;
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
    for (const auto& rcpt : plan.delete_recipients) {
        std::string arg = rcpt;
        if (smfi_delrcpt(ctx, arg.data()) != MI_SUCCESS) {
            // After an acceptance, a tempfail is the safe answer: the retry finds the
            // service's operations and sends nothing twice.
            return failed(ctx, log, "delete a recipient");
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

}  // namespace paasmilter
