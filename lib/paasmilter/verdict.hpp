// From a Decision to what the milter tells the MTA at end of message, and the one log line
// an operator reads for it. Kept out of the libmilter glue so it is unit-tested.
#pragma once

#include <string>
#include <vector>

#include "paasmilter/classifier.hpp"
#include "paasmilter/loop_stamp.hpp"

namespace paasmilter {

// Loop protection's part of a verdict (apply_loop_protection); empty without [loop].
struct LoopVerdict {
    std::string header;              // the stamp header's name; empty: [loop] not configured
    std::vector<int> delete_fields;  // the client's stamp fields that do not verify, last first
    std::vector<std::string> kept_fields;  // the valid stamp fields the message came with
    std::string stamp;        // this gateway's stamp for the routed message; "" when not routed
    bool stopped = false;     // max_hops valid stamps: on_loop instead of the route
    std::string hold_reason;  // stopped with on_loop = hold: for the hold queue
    std::string log;          // ", loop=..." for the decision line
};

struct Verdict {
    enum class Reply { accept, reject, tempfail };
    Reply reply = Reply::accept;
    bool dry_run = false;              // global dry-run mode or the route's dry_run
    int forged_headers_to_delete = 0;  // client-sent routing headers (deleted even for pass)
    bool add_routing_header = false;
    // A relay route that reroutes recipients into its pseudo-domain (route_addresses.hpp)
    // instead of the header: external_only, or any relay route with milter.mta = "sendmail".
    bool reroute_recipients = false;
    bool submit_to_api = false;  // action = "api": the milter submits at end of message
    std::string routing_header;  // name
    std::string routing_value;
    int reply_code = 0;
    std::string reply_status;
    std::string reply_text;
    std::string outcome;  // "relay", "pass", "reject", "tempfail", "api", "none"
    LoopVerdict loop;
};

// `forged_headers` is how many copies of the routing header the client sent.
Verdict decide_verdict(const Config& config, const Decision& decision, int forged_headers);

// Loop protection ([loop]) on a verdict decide_verdict made, from the stamps the message
// arrived with: the stamp fields that do not verify are deleted (whatever the route); a
// message of a relay or API route gets this gateway's stamp, or, when it already carries
// max_hops valid stamps, takes on_loop instead of its route. An error (the HMAC could not be
// computed) leaves the verdict unusable: tempfail.
Result<void> apply_loop_protection(const LoopSettings& settings, const Decision& decision,
                                   const LoopCheck& arrived, Verdict& verdict);

// "rule=printers, route=acs-smtp, action=relay, header=X-PaaS-Route: acs-smtp, client=..."
// Postfix style, prefixed by the caller with the queue id. Client-supplied values are
// sanitized; nothing secret is part of a Transaction.
std::string format_decision_log(const Transaction& tx, const Decision& decision,
                                const Verdict& verdict);

// Multi-line human report for `paas-milter query`.
std::string format_query_report(const Decision& decision, const Verdict& verdict,
                                const Transaction& transaction);

}  // namespace paasmilter
