#include "paasmilter/delivery/eom_plan.hpp"

#include <algorithm>

#include <fmt/format.h>

#include "paasmilter/api_delivery.hpp"
#include "paasmilter/log.hpp"
#include "paasmilter/text.hpp"

namespace paasmilter {

const char* to_string(MtaPlan::Disposition disposition) {
    switch (disposition) {
        case MtaPlan::Disposition::accept:
            return "accept";
        case MtaPlan::Disposition::discard:
            return "discard";
        case MtaPlan::Disposition::tempfail:
            return "tempfail";
        case MtaPlan::Disposition::reject:
            return "reject";
    }
    return "?";
}

const char* to_string(ApiFailure failure) {
    switch (failure) {
        case ApiFailure::none:
            return "none";
        case ApiFailure::internal:
            return "internal";
        case ApiFailure::transient:
            return "transient";
        case ApiFailure::permanent:
            return "permanent";
        case ApiFailure::unconvertible:
            return "unconvertible";
        case ApiFailure::oversize:
            return "oversize";
        case ApiFailure::refused:
            return "refused";
        case ApiFailure::quota:
            return "quota";
    }
    return "?";
}

std::string reply_text(std::string_view text) {
    std::string out;
    for (unsigned char c : text) {
        if (out.size() >= 200) break;
        out += (c < 0x20 || c >= 0x7f || c == '%') ? ' ' : static_cast<char>(c);
    }
    return out;
}

namespace {

// Loop protection: the client's stamp fields that do not verify go, whatever the outcome.
void delete_forged_stamps(MtaPlan& plan, const Verdict& verdict) {
    for (int index : verdict.loop.delete_fields)
        plan.delete_headers.emplace_back(verdict.loop.header, index);
}

// This gateway's stamp, on a copy that leaves through a route.
void add_loop_stamp(MtaPlan& plan, const Verdict& verdict) {
    if (!verdict.loop.stamp.empty())
        plan.add_headers.emplace_back(verdict.loop.header, verdict.loop.stamp);
}

}  // namespace

MtaPlan plan_for_verdict(const Verdict& verdict) {
    MtaPlan plan;
    if (verdict.dry_run) return plan;
    plan.delete_routing_headers = verdict.forged_headers_to_delete;
    delete_forged_stamps(plan, verdict);
    if (verdict.add_routing_header) {
        plan.add_headers.emplace_back(verdict.routing_header, verdict.routing_value);
    }
    add_loop_stamp(plan, verdict);
    if (!verdict.loop.hold_reason.empty())
        plan.quarantine_reason = reply_text(verdict.loop.hold_reason);
    if (verdict.reply != Verdict::Reply::accept) {
        plan.disposition = verdict.reply == Verdict::Reply::reject ? MtaPlan::Disposition::reject
                                                                   : MtaPlan::Disposition::tempfail;
        plan.reply_code = std::to_string(verdict.reply_code);
        plan.reply_status = verdict.reply_status;
        plan.reply_text = reply_text(verdict.reply_text);
    }
    return plan;
}

namespace {

void tempfail(MtaPlan& plan, std::string_view detail) {
    plan.disposition = MtaPlan::Disposition::tempfail;
    plan.reply_code = "451";
    plan.reply_status = "4.3.0";
    plan.reply_text =
        reply_text(fmt::format("Mail service unavailable, try again later: {}", detail));
}

// Case-insensitive: the conversion merges recipients that differ only in case, and the
// service delivers to that one address for all of them.
bool contains(const std::vector<std::string>& list, const std::string& item) {
    return std::any_of(list.begin(), list.end(),
                       [&](const std::string& other) { return iequals(other, item); });
}

// The recipients' RCPT arguments for those in `which`.
void delete_recipients(MtaPlan& plan, const std::vector<std::string>& recipients,
                       const std::vector<std::string>& recipient_args,
                       const std::vector<std::string>& which) {
    for (size_t i = 0; i < recipients.size() && i < recipient_args.size(); ++i) {
        if (contains(which, recipients[i])) plan.delete_recipients.push_back(recipient_args[i]);
    }
}

}  // namespace

MtaPlan plan_for_api(const Config& config, const ApiSettings& api, const Verdict& verdict,
                     const std::vector<std::string>& recipients,
                     const std::vector<std::string>& recipient_args, const ApiResult& submitted,
                     const std::vector<std::string>* recipient_esmtp) {
    ApiResult result = submitted;
    std::string assumed;  // the log's note when on_ambiguous = assume-sent applied
    if (!result.unresolved.empty() && !result.busy &&
        api.on_ambiguous == AmbiguityPolicy::assume_sent) {
        // The operator prefers a possible loss to a possible duplicate: what the service may
        // have counts as delivered.
        assumed = fmt::format(
            " (unresolved requests: assumed sent for {} recipient(s), "
            "on_ambiguous=assume-sent)",
            result.unresolved.size());
        result.accepted.insert(result.accepted.end(), result.unresolved.begin(),
                               result.unresolved.end());
        result.unresolved.clear();
    }
    MtaPlan plan;
    plan.delete_routing_headers = verdict.forged_headers_to_delete;
    plan.log = result.log;
    delete_forged_stamps(plan, verdict);
    std::vector<std::string> remote, local;
    for (const auto& rcpt : recipients) {
        (address_in_domains(rcpt, api.local_domains) ? local : remote).push_back(rcpt);
    }

    if (result.failure != ApiFailure::none && result.failure != ApiFailure::internal &&
        !assumed.empty() && std::all_of(remote.begin(), remote.end(), [&](const std::string& rcpt) {
            return contains(result.accepted, rcpt);
        })) {
        plan.log += fmt::format(", detail={}", sanitize_for_log(result.detail, 300)) + assumed;
        result.failure = ApiFailure::none;
    } else if (!assumed.empty()) {
        plan.log += assumed;
    }
    if (result.failure == ApiFailure::none) {
        // The service has the message for every remote recipient.
        if (local.empty()) {
            plan.disposition = MtaPlan::Disposition::discard;
            plan.log += ", local_copy=discarded";
        } else {
            delete_recipients(plan, recipients, recipient_args, remote);
            plan.log += fmt::format(", local_copy=kept for {} local recipient(s)", local.size());
        }
        return plan;
    }

    plan.log += fmt::format(", detail={}", sanitize_for_log(result.detail, 300));
    if (result.failure == ApiFailure::internal) {
        tempfail(plan, "internal error");
        return plan;
    }
    if (result.failure == ApiFailure::refused) {
        // An allow-list says no: not a failure of the service, so no failure policy.
        plan.disposition = MtaPlan::Disposition::reject;
        plan.reply_code = "550";
        plan.reply_status = "5.7.1";
        plan.reply_text = reply_text("Sender not allowed to send through this gateway");
        return plan;
    }
    const FailurePolicy* policy = &api.on_failure;
    // The enhanced status of a bounce (RFC 3463): the class must match the 5xx reply, or the
    // MTA refuses the reply text.
    const char* status = "5.3.0";
    switch (result.failure) {
        case ApiFailure::permanent:
            policy = &api.on_permanent_failure;
            status = "5.7.1";
            break;
        case ApiFailure::unconvertible:
            policy = &api.on_permanent_failure;
            status = "5.6.0";
            break;
        case ApiFailure::oversize:
            policy = &api.on_oversize;
            status = "5.3.4";
            break;
        case ApiFailure::quota:
            policy = &api.on_quota;  // never reject (the loader refuses it)
            break;
        default:
            break;
    }
    plan.log += fmt::format(", policy={}", to_string(*policy));
    if (!result.accepted.empty() || !result.unresolved.empty()) {
        plan.log += fmt::format(", partly_accepted={}, unresolved={}, not_accepted={}",
                                result.accepted.size(), result.unresolved.size(),
                                remote.size() - result.accepted.size() - result.unresolved.size());
    }

    if (!result.unresolved.empty()) {
        // The service could not say whether it has some of them: relaying them could deliver
        // twice, a bounce could lie. The client's retry asks again (on_ambiguous = tempfail),
        // or the operator decides (hold).
        if (api.on_ambiguous == AmbiguityPolicy::hold && !result.busy) {
            plan.log += " (unresolved requests: held, on_ambiguous=hold)";
            delete_recipients(plan, recipients, recipient_args, result.accepted);
            plan.quarantine_reason =
                reply_text("paas-milter: the service may have it already: " + result.detail);
            return plan;
        }
        plan.log += " (unresolved requests: tempfail, the retry asks the service again)";
        tempfail(plan, result.detail);
        return plan;
    }
    FailurePolicy::Kind kind = policy->kind;
    if (kind == FailurePolicy::Kind::reject && !result.accepted.empty()) {
        // Some recipients have (or may have) the message: a bounce would tell the sender that
        // nobody got it. Hold the rest for the operator instead.
        kind = FailurePolicy::Kind::hold;
        plan.log += " (reject after a partial acceptance: held instead)";
    }
    switch (kind) {
        case FailurePolicy::Kind::tempfail:
            // Safe after a partial acceptance: the retry asks the service which requests it
            // already has and sends only the rest.
            tempfail(plan, result.detail);
            return plan;
        case FailurePolicy::Kind::reject:
            plan.disposition = MtaPlan::Disposition::reject;
            plan.reply_code = "550";
            plan.reply_status = status;
            plan.reply_text = reply_text("Rejected by the mail service: " + result.detail);
            return plan;
        case FailurePolicy::Kind::hold:
            // Recipients the service has leave the MTA's copy.
            delete_recipients(plan, recipients, recipient_args, result.accepted);
            plan.quarantine_reason = reply_text("paas-milter: " + result.detail);
            return plan;
        case FailurePolicy::Kind::relay: {
            const Route* relay = config.find_route(policy->relay_route);
            if (!relay) {
                tempfail(plan, "fallback route " + policy->relay_route + " is not configured");
                return plan;
            }
            add_loop_stamp(plan, verdict);
            delete_recipients(plan, recipients, recipient_args, result.accepted);
            if (relay->external_only || config.mta == Mta::sendmail) {
                // Only the (external) recipients the service does not have take the fallback;
                // local_domains recipients stay with the MTA, as on success. Sendmail has no
                // milter_header_checks: there every relay route goes per recipient.
                std::vector<std::string> keep = result.accepted;
                keep.insert(keep.end(), local.begin(), local.end());
                route_external_recipients(plan, *relay,
                                          {recipients, recipient_args, recipient_esmtp}, keep);
                return plan;
            }
            plan.add_headers.emplace_back(config.routing_header, relay->header_value);
            plan.log += fmt::format(", header={}: {}", config.routing_header, relay->header_value);
            return plan;
        }
    }
    tempfail(plan, "unknown failure policy");
    return plan;
}

}  // namespace paasmilter
