#include "paasmilter/providers/provider.hpp"

namespace paasmilter {

const ApiProvider& acs_provider();
const ApiProvider& graph_provider();

const ApiProvider& provider_for(const ApiSettings& api) {
    switch (api.provider) {
        case ApiSettings::Provider::acs:
            break;
        case ApiSettings::Provider::graph:
            return graph_provider();
    }
    return acs_provider();
}

}  // namespace paasmilter
