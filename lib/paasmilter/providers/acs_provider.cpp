// Azure Communication Services Email: the message is converted to the service's JSON
// (mime_convert), split into requests of at most 50 recipients and submitted exactly once
// (api_delivery); accepted operations get their final status polled.
#include "paasmilter/mime_convert.hpp"
#include "paasmilter/providers/provider.hpp"

namespace paasmilter {

namespace {

class AcsProvider final : public ApiProvider {
  public:
    const char* name() const override { return "acs"; }

    size_t max_source_bytes(const ApiSettings& api) const override {
        // Twice the request limit: base64 attachments are about as large in the message as
        // in the JSON, so a source past this can never fit.
        return api.max_request_bytes * 2;
    }

    ApiOutcome submit(const ApiSettings& api, const ProviderInput& input,
                      const ApiHooks& hooks) const override {
        ConversionOptions options = api.conversion;
        options.never_pass_headers.insert(options.never_pass_headers.end(),
                                          input.never_pass_headers.begin(),
                                          input.never_pass_headers.end());
        if (!input.sender.empty()) {
            // The client's own sender, whatever its From says (the original goes to
            // Reply-To, as for any rewritten sender).
            options.sender = input.sender;
            options.verified_domains.clear();
        }
        Envelope envelope{input.envelope_sender, input.recipients};
        auto converted = input.source.in_memory()
                             ? convert_message(input.source.memory(), envelope, options)
                             : convert_message_fd(input.source.fd(), envelope, options);
        if (!converted) {
            ApiOutcome outcome;
            outcome.kind = converted.error().kind == ErrorKind::too_many_mime_parts
                               ? ApiOutcome::Kind::oversize
                               : ApiOutcome::Kind::unconvertible;
            outcome.detail = converted.error().message;
            return outcome;
        }
        return submit_to_acs(api, std::move(*converted), input.identity, input.deadline, hooks);
    }

    std::optional<StatusPoller::Fetch> final_status_fetch(
        std::shared_ptr<const ApiSettings> api) const override {
        return acs_status_fetch(std::move(api));
    }
};

}  // namespace

const ApiProvider& acs_provider() {
    static const AcsProvider provider;
    return provider;
}

}  // namespace paasmilter
