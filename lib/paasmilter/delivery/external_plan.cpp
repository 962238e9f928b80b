// Per-recipient routing in the end-of-message plan: which recipients leave the message's
// normal path for the route, and how (see route_addresses.hpp for the pseudo-domain). Used by
// external_only routes, and by every relay route when the MTA is Sendmail (milter.mta), which
// has no milter_header_checks: there the pseudo-domain reaches the route's next hop through a
// mailertable entry (`paas-milter sendmail-config`).
#include <algorithm>

#include <fmt/format.h>

#include "paasmilter/delivery/eom_plan.hpp"
#include "paasmilter/log.hpp"
#include "paasmilter/route_addresses.hpp"
#include "paasmilter/text.hpp"

namespace paasmilter {

namespace {

bool contains_ignoring_case(const std::vector<std::string>& list, std::string_view item) {
    return std::any_of(list.begin(), list.end(),
                       [&](const std::string& other) { return iequals(other, item); });
}

}  // namespace

MtaPlan plan_for_verdict(const Verdict& verdict, const Route* route,
                         const EnvelopeRecipients& recipients) {
    MtaPlan plan = plan_for_verdict(verdict);
    if (!route || route->action != Action::relay ||
        !(route->external_only || verdict.reroute_recipients) || verdict.dry_run ||
        verdict.reply != Verdict::Reply::accept || verdict.loop.stopped) {
        return plan;
    }
    // Per recipient instead of for the whole message: never the routing header, whose
    // FILTER would take the internal recipients along (and which Sendmail would ignore).
    std::erase_if(plan.add_headers, [&](const auto& header) {
        return iequals(header.first, verdict.routing_header) &&
               header.second == route->header_value;
    });
    route_external_recipients(plan, *route, recipients, {});
    return plan;
}

void route_external_recipients(MtaPlan& plan, const Route& relay,
                               const EnvelopeRecipients& recipients,
                               const std::vector<std::string>& keep) {
    size_t rerouted = 0, staying = 0;
    // What the plan held before: recipients an API route already delivered stay deleted.
    const size_t deletes_before = plan.delete_recipients.size();
    const size_t adds_before = plan.add_recipients.size();
    std::vector<std::string> unroutable;
    std::vector<std::string> added;  // pseudo-addresses, to add each once
    const size_t count = std::min(recipients.addresses.size(), recipients.args.size());
    for (size_t i = 0; i < count; ++i) {
        const std::string& address = recipients.addresses[i];
        const std::string& arg = recipients.args[i];
        const bool deleted = std::find(plan.delete_recipients.begin(), plan.delete_recipients.end(),
                                       arg) != plan.delete_recipients.end();
        if (contains_ignoring_case(keep, address) ||
            (relay.external_only && relay.internal && relay.internal->contains(address))) {
            if (!deleted) ++staying;
            continue;
        }
        if (deleted) continue;  // the same RCPT twice
        auto encoded = encode_route_address(address, relay.name);
        if (!encoded) {
            // Stays on Postfix's path (and is named in the log): better delivered the
            // usual way than not at all.
            unroutable.push_back(address);
            continue;
        }
        plan.delete_recipients.push_back(arg);
        ++rerouted;
        if (contains_ignoring_case(added, *encoded)) continue;
        added.push_back(*encoded);
        const std::string esmtp =
            recipients.esmtp && i < recipients.esmtp->size() ? (*recipients.esmtp)[i] : "";
        plan.add_recipients.push_back({"<" + *encoded + ">", reroute_esmtp_args(address, esmtp)});
    }
    // The same counters either way; "route_by=recipients" is a route that is not
    // external_only taking every recipient this way (milter.mta = "sendmail").
    if (relay.external_only) {
        plan.log += fmt::format(", external_only={}, rerouted={}, staying={}", relay.name, rerouted,
                                staying);
    } else {
        plan.log +=
            fmt::format(", route_by=recipients, rerouted={}, staying={}", rerouted, staying);
    }
    if (!unroutable.empty()) {
        // Never Postfix's normal path: that would let a client dodge the route with an
        // address the pseudo-domain cannot carry. Held for the operator, all recipients.
        std::string names;
        for (const std::string& address : unroutable) {
            names += (names.empty() ? "<" : ",<") + sanitize_for_log(address, 120) + ">";
        }
        plan.delete_recipients.resize(deletes_before);
        plan.add_recipients.resize(adds_before);
        plan.quarantine_reason = reply_text(fmt::format(
            "paas-milter: recipient(s) the route {} cannot carry: {}", relay.name, names));
        plan.log += fmt::format(", not_routable={} (held)", names);
    }
}

}  // namespace paasmilter
