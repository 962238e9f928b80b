#include "api_action.hpp"

#include <fmt/format.h>

#include "mta_actions.hpp"
#include "paasmilter/api_delivery.hpp"
#include "paasmilter/delivery/eom_plan.hpp"
#include "paasmilter/delivery/status_poller.hpp"
#include "paasmilter/log.hpp"
#include "paasmilter/providers/provider.hpp"
#include "paasmilter/quota/route_quota.hpp"

namespace paasmilter {

namespace {

bool api_active(const MessageState& message) {
    const Decision& d = *message.decision;
    return d.route && d.route->action == Action::api && !d.route->dry_run &&
           message.config->mode == Mode::enforce;
}

// ", api=accepted, requests=3, status_checks=3, operation_id=a,b" and, for requests that did not go
// through, what became of each.
std::string describe_outcome(const ApiOutcome& outcome) {
    std::string out = fmt::format(", api={}, requests={}, status_checks={}",
                                  to_string(outcome.kind), outcome.requests, outcome.status_checks);
    auto ids = outcome.accepted_operation_ids();
    if (!ids.empty() && !ids.front().empty()) {
        out += ", operation_id=" + fmt::format("{}", fmt::join(ids, ","));
    }
    if (outcome.possible_duplicate) {
        out += ", possible_duplicate=yes (" + sanitize_for_log(outcome.detail, 200) + ")";
    }
    if (outcome.kind != ApiOutcome::Kind::accepted || outcome.chunks.size() > 1) {
        std::vector<std::string> fates;
        for (const auto& chunk : outcome.chunks) fates.emplace_back(to_string(chunk.fate));
        out += ", chunks=" + fmt::format("{}", fmt::join(fates, ","));
    }
    return out;
}

// Operations the service accepted in this transaction: their final status is logged later.
void watch_final_status(const std::string& queue_id, const ApiOutcome& outcome,
                        const ApiProvider& provider,
                        const std::shared_ptr<const ApiSettings>& api) {
    std::optional<StatusPoller::Fetch> fetch;
    for (const auto& chunk : outcome.chunks) {
        if (chunk.fate != ChunkFate::accepted || chunk.operation_id.empty()) continue;
        if (!fetch) fetch = provider.final_status_fetch(api);
        if (!fetch) return;
        if (!status_poller().watch(queue_id, chunk.operation_id, *fetch)) {
            log_warning("{}: too many operations awaiting their final status; not polling {}",
                        queue_id, chunk.operation_id);
        }
    }
}

// For the log of a message too large for the route: what would let it go, if anything.
std::string oversize_note(const ApiProvider& provider, const ApiSettings& api) {
    std::string hint = provider.oversize_hint(api);
    return hint.empty() ? std::string() : "; " + hint;
}

ApiFailure failure_of(ApiOutcome::Kind kind) {
    switch (kind) {
        case ApiOutcome::Kind::accepted:
            return ApiFailure::none;
        case ApiOutcome::Kind::transient:
            return ApiFailure::transient;
        case ApiOutcome::Kind::permanent:
            return ApiFailure::permanent;
        case ApiOutcome::Kind::oversize:
            return ApiFailure::oversize;
        case ApiOutcome::Kind::unconvertible:
            return ApiFailure::unconvertible;
        case ApiOutcome::Kind::quota:
            return ApiFailure::quota;
    }
    return ApiFailure::internal;
}

ApiResult submit(const std::string& queue_id, MessageState& message, const Config& config,
                 const std::vector<std::string>& remote, SMFICTX* ctx,
                 std::chrono::steady_clock::time_point deadline, const LoopVerdict& loop) {
    const auto& api_ptr = message.decision->route->api;
    const ApiSettings& api = *api_ptr;
    const ApiProvider& provider = provider_for(api);
    ApiResult result;
    if (!message.spool || !message.digest) {
        result.failure = ApiFailure::internal;
        result.detail = "no message source";
        result.log = ", api=error (no message source)";
        return result;
    }
    // Who sends: the route's sender_map may name the client's own sender or mailbox.
    std::string sender;
    if (api.sender_map) {
        if (auto choice = map_sender(*api.sender_map, message.tx)) {
            sender = choice->address;
            result.log +=
                fmt::format(", sender={} ({}={}@{})", sender, to_string(choice->hit.field),
                            sanitize_for_log(choice->hit.key, 120), choice->hit.where);
        } else if (api.sender_map->refuse_unmapped) {
            result.failure = ApiFailure::refused;
            result.detail = "this client may not send through this route";
            result.log += ", sender=refused (no sender_map entry knows this client)";
            return result;
        }
    }
    if (message.spool->oversize() || message.headers_truncated) {
        result.failure = ApiFailure::oversize;
        result.detail = "message too large for the service";
        result.log += fmt::format(", api=oversize (message larger than {} bytes{})",
                                  provider.max_source_bytes(api), oversize_note(provider, api));
        return result;
    }
    auto digest = message.digest->finish();
    if (!digest) {
        result.failure = ApiFailure::internal;
        result.detail = digest.error().message;
        result.log += ", api=error (content digest)";
        return result;
    }

    ApiHooks hooks = default_api_hooks(api);
    hooks.progress = [ctx] { smfi_progress(ctx); };
    hooks.posted = &posted_requests();
    hooks.fleet = config.quota.fleet_size > 1 || !config.quota.store.empty();
    // The route's quota, charged by the provider for each request it is about to post new:
    // never for one the service already has (a client's retry of an accepted message), so
    // on_quota never sends elsewhere, or holds, what the service has.
    std::string quota_log;  // the last take's fields for the decision line
    if (config.quota_store && !api.quota.empty()) {
        hooks.admit = [&quota_log, store = config.quota_store.get(),
                       route = message.decision->route->name, &api](size_t recipients) {
            RouteQuotaCheck quota = take_route_quota(*store, route, api, recipients);
            quota_log = quota.log;
            return ApiHooks::Admission{quota.granted, quota.detail};
        };
    }
    // A 429 anyway: the route's buckets empty, so the next messages do not wait for one too.
    hooks = drain_quota_on_throttle(std::move(hooks), config.quota_store,
                                    message.decision->route->name, api.quota);
    // The client's routing header (already removed from the MTA's copy) never goes out.
    ProviderInput input{
        *message.spool, message.tx.sender,       sender,
        remote,         {config.routing_header}, MessageIdentity{*digest, message.tx.sender},
        deadline};
    input.rewrite = &message.decision->route->rewrite;
    if (!loop.header.empty()) {
        // Loop protection: the client's stamp fields never go out as they came; the valid
        // ones and this gateway's stamp go out as fields of the submitted copy.
        input.never_pass_headers.push_back(loop.header);
        for (const auto& field : loop.kept_fields) {
            input.add_headers.emplace_back(loop.header, field);
        }
        if (!loop.stamp.empty()) input.add_headers.emplace_back(loop.header, loop.stamp);
    }
    ApiOutcome outcome = provider.submit(api, input, hooks);
    watch_final_status(queue_id, outcome, provider, api_ptr);
    result.log += quota_log + describe_outcome(outcome);
    if (outcome.kind == ApiOutcome::Kind::oversize) {
        if (auto note = oversize_note(provider, api); !note.empty()) {
            result.log += ", note=" + note.substr(2);
        }
    }
    result.detail = outcome.detail;
    // The service knows the recipients as recipient_rewrite made them, the MTA as sent.
    const DomainMap& rewritten = message.decision->route->rewrite.recipient;
    result.accepted = original_recipients(outcome.accepted_recipients(), remote, rewritten);
    result.unresolved = original_recipients(outcome.unresolved_recipients(), remote, rewritten);
    result.busy = outcome.busy();
    result.failure = failure_of(outcome.kind);
    return result;
}

}  // namespace

StatusPoller& status_poller() {
    // A long-lived service beside the configuration: it outlives reloads, and a route's
    // settings stay alive through the shared_ptr each watched operation holds.
    static StatusPoller poller(StatusPoller::Options{});
    return poller;
}

PostedRequests& posted_requests() {
    static PostedRequests posted;  // a long-lived service, like the poller
    return posted;
}

Result<void> start_api_spool(MessageState& message, const std::string& queue_id) {
    if (!api_active(message)) return {};
    const ApiSettings& api = *message.decision->route->api;
    message.spool = std::make_unique<MessageSpool>(api.spool_threshold, api.spool_directory,
                                                   provider_for(api).max_source_bytes(api));
    message.digest.emplace(std::vector<std::string>{message.config->routing_header}, queue_id);
    for (const auto& h : message.tx.headers) message.digest->add_header(h.name, h.value);
    return message.spool->append(header_block(message.tx.headers));
}

Result<void> append_api_body(MessageState& message, std::string_view data) {
    if (message.digest) message.digest->add_body(data);
    return message.spool->append(data);
}

sfsistat act_api(SMFICTX* ctx, const std::string& id, MessageState& message, const Verdict& verdict,
                 std::chrono::steady_clock::time_point deadline) {
    const Config& config = *message.config;
    const ApiSettings& api = *message.decision->route->api;
    const Transaction& tx = message.tx;
    std::string line = format_decision_log(tx, *message.decision, verdict);

    std::vector<std::string> remote;
    for (const auto& rcpt : tx.recipients) {
        if (!address_in_domains(rcpt, api.local_domains)) remote.push_back(rcpt);
    }
    ApiResult result;
    if (remote.empty()) {
        result.log = fmt::format(", api=skipped (all {} recipients are in local_domains)",
                                 tx.recipients.size());
    } else {
        result = submit(id, message, config, remote, ctx, deadline, verdict.loop);
    }
    MtaPlan plan = plan_for_api(config, api, verdict, tx.recipients, message.recipient_args, result,
                                &message.recipient_esmtp_args);
    line += plan.log;
    sfsistat status = replay(ctx, config.routing_header, plan, line);
    log_decision(id, line, *message.decision, tx,
                 count_transaction(*message.decision, verdict, plan, status, &result));
    return status;
}

}  // namespace paasmilter
