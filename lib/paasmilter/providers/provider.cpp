#include "paasmilter/providers/provider.hpp"

namespace paasmilter {

const ApiProvider& acs_provider();

const ApiProvider& provider_for(const ApiSettings& api) {
    switch (api.provider) {
        case ApiSettings::Provider::acs:
            break;
        case ApiSettings::Provider::graph:
            break;  // not yet: the configuration refuses it
    }
    return acs_provider();
}

}  // namespace paasmilter
