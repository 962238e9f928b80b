// An API provider: what turns one message, as the client sent it, into the service's
// requests and says which recipients the service has. Azure Communication Services Email
// (acs_provider.cpp) and Microsoft Graph (graph_provider.cpp) implement it; a third service
// that takes raw MIME (Amazon SES SendEmail, Mailgun messages.mime) would too, without
// touching the milter glue. What stays shared above it: the spool, the content identity,
// the time budget, the record of posted requests, the failure policies and the
// end-of-message plan (delivery/eom_plan).
#pragma once

#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "paasmilter/api_delivery.hpp"
#include "paasmilter/config.hpp"
#include "paasmilter/delivery/status_poller.hpp"
#include "paasmilter/spool.hpp"

namespace paasmilter {

struct ProviderInput {
    // The message as the client sent it (header block, empty line, body).
    const MessageSpool& source;
    std::string envelope_sender;
    // Who sends, from the route's sender_map: the sender address (ACS) or the mailbox
    // (Graph); empty: the route's own `sender` / `mailbox`.
    std::string sender;
    // The recipients the service must deliver to (the envelope's, minus local_domains).
    std::vector<std::string> recipients;
    // Header fields that never go out (the routing header).
    std::vector<std::string> never_pass_headers;
    MessageIdentity identity;
    std::chrono::steady_clock::time_point deadline;
    // Header fields the gateway adds to the submitted copy, in order (its loop stamps), whatever
    // pass_headers says. ACS takes one value per header name: fields of one name go as one,
    // their values joined with ", ".
    std::vector<std::pair<std::string, std::string>> add_headers{};
    // The route's sender_rewrite / recipient_rewrite, applied in the conversion (envelope
    // and address headers); null: none. `recipients` are as the client sent them.
    const AddressRewrite* rewrite = nullptr;
};

class ApiProvider {
  public:
    virtual ~ApiProvider() = default;
    virtual const char* name() const = 0;
    // Past this many bytes of source the message can never be submitted: the spool stops
    // storing it and the oversize policy applies.
    virtual size_t max_source_bytes(const ApiSettings& api) const = 0;
    // For the log, when a message is too large for the route: what setting would let it go
    // (and what it needs); empty when none would.
    virtual std::string oversize_hint(const ApiSettings& api) const {
        (void)api;
        return {};
    }
    // Converts and submits. Never throws; every failure is an outcome.
    virtual ApiOutcome submit(const ApiSettings& api, const ProviderInput& input,
                              const ApiHooks& hooks) const = 0;
    // How to ask for the final status of an operation the service accepted (polled in the
    // background after the reply to the MTA), or nothing when the service has no such thing.
    virtual std::optional<StatusPoller::Fetch> final_status_fetch(
        std::shared_ptr<const ApiSettings> api) const {
        (void)api;
        return std::nullopt;
    }
};

// The provider a route names (ApiSettings::provider).
const ApiProvider& provider_for(const ApiSettings& api);

}  // namespace paasmilter
