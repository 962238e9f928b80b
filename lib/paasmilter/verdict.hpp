// From a Decision to what the milter tells the MTA at end of message, and the one log line
// an operator reads for it. Kept out of the libmilter glue so it is unit-tested.
#pragma once

#include <string>

#include "paasmilter/classifier.hpp"

namespace paasmilter {

struct Verdict {
    enum class Reply { accept, reject, tempfail };
    Reply reply = Reply::accept;
    bool dry_run = false;              // global dry-run mode or the route's dry_run
    int forged_headers_to_delete = 0;  // client-sent routing headers (deleted even for pass)
    bool add_routing_header = false;
    bool submit_to_api = false;  // action = "api": the milter submits at end of message
    std::string routing_header;  // name
    std::string routing_value;
    int reply_code = 0;
    std::string reply_status;
    std::string reply_text;
    std::string outcome;  // "relay", "pass", "reject", "tempfail", "api", "none"
};

// `forged_headers` is how many copies of the routing header the client sent.
Verdict decide_verdict(const Config& config, const Decision& decision, int forged_headers);

// "rule=printers, route=acs-smtp, action=relay, header=X-PaaS-Route: acs-smtp, client=..."
// Postfix style, prefixed by the caller with the queue id. Client-supplied values are
// sanitized; nothing secret is part of a Transaction.
std::string format_decision_log(const Transaction& tx, const Decision& decision,
                                const Verdict& verdict);

// Multi-line human report for `paas-milter query`.
std::string format_query_report(const Decision& decision, const Verdict& verdict,
                                const Transaction& transaction);

}  // namespace paasmilter
