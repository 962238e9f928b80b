// Azure Communication Services Email: the message is converted to the service's JSON
// (mime_convert), split into requests of at most 50 recipients and submitted exactly once
// (api_delivery); accepted operations get their final status polled.
#include <algorithm>

#include "paasmilter/mime_convert.hpp"
#include "paasmilter/providers/provider.hpp"
#include "paasmilter/text.hpp"

namespace paasmilter {

namespace {

// The gateway's own fields (ProviderInput::add_headers) in the `headers` object, which holds
// one value per name: they replace what the conversion passed under that name, and several
// of one name become one value, joined with ", ".
void add_gateway_headers(std::vector<std::pair<std::string, std::string>>& headers,
                         const std::vector<std::pair<std::string, std::string>>& add) {
    std::vector<std::string> added;
    for (const auto& [name, value] : add) {
        auto same = [&](const auto& header) { return iequals(header.first, name); };
        if (std::none_of(added.begin(), added.end(),
                         [&](const std::string& other) { return iequals(other, name); })) {
            headers.erase(std::remove_if(headers.begin(), headers.end(), same), headers.end());
            headers.emplace_back(name, value);
            added.push_back(name);
        } else {
            std::find_if(headers.begin(), headers.end(), same)->second += ", " + value;
        }
    }
}

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
        if (input.rewrite) options.rewrite = *input.rewrite;
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
        add_gateway_headers(converted->headers, input.add_headers);
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
