#include "paasmilter/verdict.hpp"

#include <fmt/format.h>

#include "paasmilter/log.hpp"

namespace paasmilter {

Verdict decide_verdict(const Config& config, const Decision& decision, int forged_headers) {
    Verdict verdict;
    verdict.routing_header = config.routing_header;
    verdict.forged_headers_to_delete = forged_headers;
    verdict.dry_run = config.mode == Mode::dry_run;
    const Route* route = decision.route;
    if (!route) {
        verdict.outcome = "none";
        return verdict;
    }
    verdict.dry_run = verdict.dry_run || route->dry_run;
    verdict.outcome = to_string(route->action);
    switch (route->action) {
        case Action::relay:
            // external_only, or Sendmail (no milter_header_checks): per recipient
            // (delivery/external_plan.cpp), never the header.
            verdict.reroute_recipients = route->external_only || config.mta == Mta::sendmail;
            verdict.add_routing_header = !verdict.reroute_recipients;
            verdict.routing_value = route->header_value;
            break;
        case Action::pass:
            break;
        case Action::api:
            verdict.submit_to_api = true;
            break;
        case Action::reject:
        case Action::tempfail:
            verdict.reply =
                route->action == Action::reject ? Verdict::Reply::reject : Verdict::Reply::tempfail;
            verdict.reply_code = route->reply_code;
            verdict.reply_status = route->reply_status;
            verdict.reply_text = route->reply_text;
            break;
    }
    return verdict;
}

Result<void> apply_loop_protection(const LoopSettings& settings, const Decision& decision,
                                   const LoopCheck& arrived, Verdict& verdict) {
    LoopVerdict& loop = verdict.loop;
    loop.header = std::string(kLoopHeader);
    loop.delete_fields = arrived.forged_fields;
    loop.kept_fields = arrived.kept_fields;
    if (!loop.delete_fields.empty()) {
        loop.log += fmt::format(", removed_forged_stamps={}", loop.delete_fields.size());
    }
    const Route* route = decision.route;
    // Only the routes that send the message somewhere else: a pass, reject or tempfail route
    // does the same whatever the stamps say.
    if (!route || (route->action != Action::relay && route->action != Action::api)) return {};
    const size_t hops = arrived.valid.size();
    const auto max_hops = static_cast<size_t>(settings.max_hops);
    if (hops > 0) {
        loop.log += fmt::format(", loop={} stamp{} ({}) {} max_hops {}", hops, hops == 1 ? "" : "s",
                                describe_loop_stamps(arrived.valid), hops >= max_hops ? ">=" : "<",
                                max_hops);
    }
    if (hops < max_hops) {
        auto stamp =
            sign_loop_stamp(settings, route->name, static_cast<int>(hops) + 1, arrived.message_id);
        if (!stamp) return stamp.error();
        loop.stamp = format_loop_stamp(*stamp);
        loop.log += fmt::format(", stamped={}/{} hop {}", stamp->gateway, stamp->route, stamp->hop);
        return {};
    }
    // A loop: the message is not routed again.
    loop.stopped = true;
    loop.log += fmt::format(": on_loop={}", to_string(settings.on_loop));
    verdict.add_routing_header = false;
    verdict.reroute_recipients = false;
    verdict.routing_value.clear();
    verdict.submit_to_api = false;
    switch (settings.on_loop) {
        case LoopAction::pass:
            break;
        case LoopAction::reject:
            verdict.reply = Verdict::Reply::reject;
            verdict.reply_code = 550;
            verdict.reply_status = "5.4.6";
            verdict.reply_text = "Mail routing loop detected";
            break;
        case LoopAction::tempfail:
            verdict.reply = Verdict::Reply::tempfail;
            verdict.reply_code = 451;
            verdict.reply_status = "4.4.6";
            verdict.reply_text = "Mail routing loop detected, try again later";
            break;
        case LoopAction::hold:
            loop.hold_reason = fmt::format("paas-milter: routing loop: {} stamp{} >= max_hops {}",
                                           hops, hops == 1 ? "" : "s", max_hops);
            break;
    }
    return {};
}

namespace {

std::string describe_hits(const Decision& decision) {
    std::string out;
    for (const auto& hit : decision.hits) {
        if (!out.empty()) out += ' ';
        out += fmt::format("{}={}@{}", to_string(hit.field), sanitize_for_log(hit.key, 120),
                           hit.where);
    }
    return out;
}

}  // namespace

std::string format_decision_log(const Transaction& tx, const Decision& decision,
                                const Verdict& verdict) {
    std::string line;
    if (verdict.dry_run) line += "dry-run, ";
    line += fmt::format(
        "rule={}, route={}, action={}",
        decision.rule ? decision.rule->name : (decision.default_route ? "(default)" : "(none)"),
        decision.route ? decision.route->name : "(none)", verdict.outcome);
    if (verdict.add_routing_header) {
        line += fmt::format(", header={}: {}", verdict.routing_header, verdict.routing_value);
    }
    if (verdict.reply != Verdict::Reply::accept) {
        line += fmt::format(", reply={} {} {}", verdict.reply_code, verdict.reply_status,
                            verdict.reply_text);
    }
    if (verdict.forged_headers_to_delete > 0) {
        line += fmt::format(", removed_client_header={}x{}", verdict.forged_headers_to_delete,
                            verdict.routing_header);
    }
    line += verdict.loop.log;
    line += fmt::format(", client={}",
                        tx.client_addr.empty() ? "unknown" : sanitize_for_log(tx.client_addr, 64));
    if (!tx.cert_subject.empty()) {
        line += fmt::format(", cert_subject={}", sanitize_for_log(tx.cert_subject, 120));
    }
    if (!tx.auth_user.empty()) line += fmt::format(", sasl={}", sanitize_for_log(tx.auth_user, 80));
    line += fmt::format(", from=<{}>, nrcpt={}", sanitize_for_log(tx.sender, 120),
                        tx.recipients.size());
    if (!decision.hits.empty()) line += fmt::format(", match=[{}]", describe_hits(decision));
    return line;
}

std::string format_query_report(const Decision& decision, const Verdict& verdict,
                                const Transaction& transaction) {
    std::string out;
    if (!decision.route) {
        out += "rule: (none matched)\nroute: (none)\naction: none (message left alone)\n";
        return out;
    }
    if (decision.rule) {
        out += fmt::format("rule: {} ({})\n", decision.rule->name, decision.rule->where);
    } else {
        out += "rule: (none matched; milter.default_route applies)\n";
    }
    out += fmt::format("route: {}\n", decision.route->name);
    out += fmt::format("action: {}{}\n", verdict.outcome,
                       verdict.dry_run ? " (dry-run: logged only)" : "");
    if (verdict.add_routing_header) {
        out += fmt::format("header: {}: {}\n", verdict.routing_header, verdict.routing_value);
        if (!decision.route->transport.empty()) {
            out += fmt::format("transport: {}\n", decision.route->transport);
        }
    }
    if (decision.route->action == Action::relay && verdict.reroute_recipients &&
        !decision.route->external_only) {
        // milter.mta = "sendmail": every recipient, through the route's mailertable entry.
        out += fmt::format("recipients: all to {} (as {}, Sendmail's mailertable)\n",
                           decision.route->transport, route_pseudo_domain(decision.route->name));
    }
    if (decision.route->external_only && decision.route->action == Action::relay) {
        const Route& route = *decision.route;
        out += fmt::format("external_only: external recipients to {} (as {})\n", route.transport,
                           route_pseudo_domain(route.name));
        for (const auto& rcpt : transaction.recipients) {
            const bool internal = route.internal && route.internal->contains(rcpt);
            out +=
                fmt::format("recipient: {} {}\n", sanitize_for_log(rcpt, 200),
                            internal ? "internal (Postfix's normal path)" : "external (the route)");
        }
    }
    if (verdict.reply != Verdict::Reply::accept) {
        out += fmt::format("reply: {} {} {}\n", verdict.reply_code, verdict.reply_status,
                           verdict.reply_text);
    }
    if (const ApiSettings* api = decision.route->api.get()) {
        const bool graph = api->provider == ApiSettings::Provider::graph;
        std::string sender = graph ? api->graph.mailbox : api->conversion.sender;
        if (graph) {
            out += fmt::format("api: {}/v1.0/users/{{mailbox}}/sendMail (Microsoft Graph)\n",
                               api->graph.endpoint);
        } else {
            out +=
                fmt::format("api: {}/emails:send?api-version={} ({})\n", api->endpoint,
                            api->api_version, api->entra_credentials ? "Entra ID" : "access key");
        }
        const char* what = graph ? "mailbox" : "sender";
        if (!api->sender_map) {
            out += fmt::format("{}: {} (the route's)\n", what, sender);
        } else if (auto choice = map_sender(*api->sender_map, transaction)) {
            out += fmt::format("{}: {} (sender_map: {} \"{}\" by {} ({}))\n", what, choice->address,
                               to_string(choice->hit.field), sanitize_for_log(choice->hit.key, 200),
                               choice->hit.source, choice->hit.where);
        } else if (api->sender_map->refuse_unmapped) {
            out += fmt::format("{}: (refused: no sender_map entry knows this client; 550 5.7.1)\n",
                               what);
        } else {
            out += fmt::format("{}: {} (the route's: no sender_map entry knows this client)\n",
                               what, sender);
        }
        out +=
            fmt::format("on failure: {}, permanent: {}, oversize: {}\n", to_string(api->on_failure),
                        to_string(api->on_permanent_failure), to_string(api->on_oversize));
    }
    for (const auto& hit : decision.hits) {
        out += fmt::format("matched: {} \"{}\" by {} ({}){}\n", to_string(hit.field),
                           sanitize_for_log(hit.key, 200), hit.source, hit.where,
                           hit.result.empty() ? "" : " -> " + hit.result);
    }
    return out;
}

}  // namespace paasmilter
