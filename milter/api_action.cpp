#include "api_action.hpp"

#include <fmt/format.h>

#include "paasmilter/api_delivery.hpp"
#include "paasmilter/log.hpp"
#include "paasmilter/mime_convert.hpp"

namespace paasmilter {

namespace {

bool api_active(const MessageState& message) {
    const Decision& d = *message.decision;
    return d.route && d.route->action == Action::api && !d.route->dry_run &&
           message.config->mode == Mode::enforce;
}

// Reply text from the service or our own: one line, no '%' (libmilter format escapes).
std::string reply_text(std::string_view text) {
    std::string out;
    for (unsigned char c : text) {
        if (out.size() >= 200) break;
        out += (c < 0x20 || c >= 0x7f || c == '%') ? ' ' : static_cast<char>(c);
    }
    return out;
}

struct Failure {
    const FailurePolicy* policy;
    const char* status;  // enhanced status code for a tempfail/reject reply
    std::string detail;
};

// Applies `failure.policy`. Recipients the service already accepted are removed from the
// MTA's copy first where the message stays in Postfix, so nobody gets it twice.
sfsistat apply_policy(SMFICTX* ctx, MessageState& message, const Failure& failure,
                      const std::vector<std::string>& accepted, std::string& log_extra) {
    const Config& config = *message.config;
    const FailurePolicy& policy = *failure.policy;
    log_extra += fmt::format(", policy={}", to_string(policy));
    auto remove_accepted = [&]() -> bool {
        for (size_t i = 0; i < message.tx.recipients.size(); ++i) {
            const std::string& rcpt = message.tx.recipients[i];
            if (std::find(accepted.begin(), accepted.end(), rcpt) == accepted.end()) continue;
            if (smfi_delrcpt(ctx, message.recipient_args[i].data()) != MI_SUCCESS) return false;
        }
        return true;
    };
    switch (policy.kind) {
        case FailurePolicy::Kind::tempfail: {
            std::string text =
                reply_text("Mail service unavailable, try again later: " + failure.detail);
            smfi_setreply(ctx, const_cast<char*>("451"), const_cast<char*>("4.3.0"), text.data());
            return SMFIS_TEMPFAIL;
        }
        case FailurePolicy::Kind::reject: {
            std::string text = reply_text("Rejected by the mail service: " + failure.detail);
            std::string status = failure.status;
            smfi_setreply(ctx, const_cast<char*>("550"), status.data(), text.data());
            return SMFIS_REJECT;
        }
        case FailurePolicy::Kind::hold: {
            if (!remove_accepted()) return SMFIS_TEMPFAIL;
            std::string reason = reply_text("paas-milter: " + failure.detail);
            if (smfi_quarantine(ctx, reason.data()) != MI_SUCCESS) return SMFIS_TEMPFAIL;
            return SMFIS_CONTINUE;
        }
        case FailurePolicy::Kind::relay: {
            const Route* relay = config.find_route(policy.relay_route);
            if (!relay || !remove_accepted()) return SMFIS_TEMPFAIL;
            if (auto r = add_routing_header(ctx, config, relay->header_value); !r) {
                return SMFIS_TEMPFAIL;
            }
            log_extra += fmt::format(", header={}: {}", config.routing_header, relay->header_value);
            return SMFIS_CONTINUE;
        }
    }
    return SMFIS_TEMPFAIL;
}

}  // namespace

Result<void> start_api_spool(MessageState& message) {
    if (!api_active(message)) return {};
    const ApiSettings& api = *message.decision->route->api;
    // Twice the request limit: base64 attachments are about as large in the message as in
    // the JSON, so a source past this can never fit.
    message.spool = std::make_unique<MessageSpool>(api.spool_threshold, api.spool_directory,
                                                   api.max_request_bytes * 2);
    return message.spool->append(header_block(message.tx.headers));
}

Result<void> add_routing_header(SMFICTX* ctx, const Config& config, const std::string& value) {
    std::string name = config.routing_header;
    std::string copy = value;
    if (smfi_addheader(ctx, name.data(), copy.data()) != MI_SUCCESS) {
        return make_error(fmt::format("cannot add {} header", name));
    }
    return {};
}

sfsistat act_api(SMFICTX* ctx, const std::string& id, MessageState& message,
                 const Verdict& verdict) {
    const Decision& decision = *message.decision;
    const ApiSettings& api = *decision.route->api;
    const Transaction& tx = message.tx;
    std::string prefix = format_decision_log(tx, decision, verdict);

    std::vector<std::string> remote, local;
    for (const auto& rcpt : tx.recipients) {
        (address_in_domains(rcpt, api.local_domains) ? local : remote).push_back(rcpt);
    }
    if (remote.empty()) {
        log_info("{}: {}, api=skipped (all {} recipients are in local_domains)", id, prefix,
                 local.size());
        return SMFIS_CONTINUE;
    }
    std::string extra;
    auto finish = [&](sfsistat status) {
        log_info("{}: {}{}", id, prefix, extra);
        return status;
    };
    if (!message.spool) {
        extra = ", api=error (no message source)";
        return finish(SMFIS_TEMPFAIL);
    }
    if (message.spool->oversize() || message.headers_truncated) {
        extra =
            fmt::format(", api=oversize (message larger than {} bytes)", api.max_request_bytes * 2);
        return finish(apply_policy(ctx, message,
                                   {&api.on_oversize, "5.3.4", "message too large for the service"},
                                   {}, extra));
    }

    Envelope envelope{tx.sender, remote};
    auto converted = message.spool->in_memory()
                         ? convert_message(message.spool->memory(), envelope, api.conversion)
                         : convert_message_file(message.spool->path(), envelope, api.conversion);
    if (!converted) {
        const std::string& why = converted.error().message;
        bool too_complex = why == kTooManyMimeParts;
        extra = fmt::format(", api=conversion-failed ({})", sanitize_for_log(why, 200));
        return finish(apply_policy(ctx, message,
                                   {too_complex ? &api.on_oversize : &api.on_permanent_failure,
                                    too_complex ? "5.3.4" : "5.6.0", why},
                                   {}, extra));
    }

    ApiHooks hooks = default_api_hooks(api);
    hooks.progress = [ctx] { smfi_progress(ctx); };
    ApiOutcome outcome = submit_to_acs(api, *converted, idempotency_key(tx, remote), hooks);
    extra = fmt::format(", api={}, requests={}", to_string(outcome.kind), outcome.requests);
    if (!outcome.operation_ids.empty()) {
        extra += ", operation_id=";
        for (size_t i = 0; i < outcome.operation_ids.size(); ++i) {
            extra += (i ? "," : "") + outcome.operation_ids[i];
        }
    }
    if (outcome.kind != ApiOutcome::Kind::accepted) {
        extra += fmt::format(", detail={}", sanitize_for_log(outcome.detail, 300));
        const FailurePolicy* policy = &api.on_failure;
        const char* status = "4.3.0";
        if (outcome.kind == ApiOutcome::Kind::permanent) {
            policy = &api.on_permanent_failure;
            status = "5.7.1";
        } else if (outcome.kind == ApiOutcome::Kind::oversize) {
            policy = &api.on_oversize;
            status = "5.3.4";
        }
        return finish(apply_policy(ctx, message, {policy, status, outcome.detail},
                                   outcome.accepted_recipients, extra));
    }

    // Accepted: the service has the message for every remote recipient.
    if (local.empty()) {
        extra += ", local_copy=discarded";
        return finish(SMFIS_DISCARD);
    }
    for (size_t i = 0; i < tx.recipients.size(); ++i) {
        if (address_in_domains(tx.recipients[i], api.local_domains)) continue;
        if (smfi_delrcpt(ctx, message.recipient_args[i].data()) != MI_SUCCESS) {
            // The API has it, but Postfix would deliver it again: a duplicate beats a loss,
            // and retrying would duplicate too, so keep going with the whole message.
            extra += ", warning=delrcpt-failed";
            return finish(SMFIS_CONTINUE);
        }
    }
    extra += fmt::format(", local_copy=kept for {} local recipient(s)", local.size());
    return finish(SMFIS_CONTINUE);
}

}  // namespace paasmilter
