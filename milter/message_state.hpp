// Per-connection and per-message state kept by the libmilter callbacks (smfi_setpriv).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "paasmilter/classifier.hpp"
#include "paasmilter/config.hpp"
#include "paasmilter/delivery/message_identity.hpp"
#include "paasmilter/spool.hpp"

namespace paasmilter {

// Counts a message from MAIL FROM until it is finished or aborted, so shutdown can wait
// for messages in progress instead of cutting them off.
class InFlight {
  public:
    InFlight();
    ~InFlight();
    InFlight(const InFlight&) = delete;
    InFlight& operator=(const InFlight&) = delete;
};

struct MessageState {
    InFlight in_flight;
    std::shared_ptr<const Config> config;  // the snapshot this message started with
    Transaction tx;
    std::vector<std::string> recipient_args;  // RCPT TO arguments as the MTA sent them
    // ... and each one's ESMTP parameters ("NOTIFY=NEVER ORCPT=rfc822;a@example.net")
    std::vector<std::string> recipient_esmtp_args;
    int forged_routing_headers = 0;
    // Loop protection ([loop]): each stamp header field as the MTA passed it (nullopt past
    // kMaxLoopFields or kMaxLoopFieldBytes), and the first Message-ID, which stamps bind.
    std::vector<std::optional<std::string>> loop_fields;
    std::optional<std::string> message_id;
    size_t stored_header_bytes = 0;
    bool headers_truncated = false;
    bool failed = false;                  // an earlier callback failed without being able to say so
    std::optional<Decision> decision;     // made at end of headers
    std::unique_ptr<MessageSpool> spool;  // the whole message, for API routes only
    std::optional<ContentDigest> digest;  // its identity across client retries, ditto
};

struct ConnectionState {
    uint64_t session = 0;  // serial number of the MTA's SMTP session, for --verbose lines
    std::string client_addr;
    std::string client_name;
    std::string cert_subject;
    std::string cert_issuer;
    std::string cert_fingerprint;
    // The SMFIP_NR_* steps negotiated: their callbacks answer SMFIS_NOREPLY, and a failure
    // there is remembered and answered at the next step the MTA waits for.
    unsigned long no_reply_steps = 0;
    bool body_skip = false;  // SMFIP_SKIP negotiated
    // A no-reply step failed before there was a message to mark (connect, helo, mail).
    bool failed = false;
    std::optional<MessageState> message;
};

}  // namespace paasmilter
