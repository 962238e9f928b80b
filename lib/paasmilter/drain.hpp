// How long a stopping daemon waits for the messages in flight.
#pragma once

#include <algorithm>
#include <chrono>

#include "paasmilter/config.hpp"

namespace paasmilter {

// The floor: relay decisions take milliseconds, but a message may be between its MAIL FROM
// and its end of message while we stop.
inline constexpr std::chrono::seconds kMinimumDrain{30};
// Beyond an API route's time budget: the reply to the MTA and the log line after the last
// attempt.
inline constexpr std::chrono::seconds kDrainMargin{5};

// An API route may spend its whole time_budget on one message, and the MTA may already
// have been told nothing yet when the API accepted it: wait for the longest budget of any
// API route (plus a margin), and at least kMinimumDrain.
inline std::chrono::seconds drain_time(const Config& config) {
    std::chrono::seconds longest = kMinimumDrain;
    for (const auto& [name, route] : config.routes) {
        if (route.action == Action::api && route.api)
            longest = std::max(longest, route.api->time_budget + kDrainMargin);
    }
    return longest;
}

}  // namespace paasmilter
