// A route's quota at work: the take before each request the provider posts new (ApiHooks::admit,
// with its decision log fields and metrics), the drain when the service throttles the route anyway
// (HTTP 429), and what `paas-milter query` shows.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "paasmilter/api_delivery.hpp"
#include "paasmilter/config.hpp"
#include "paasmilter/quota/quota.hpp"

namespace paasmilter {

struct RouteQuotaCheck {
    bool granted = true;
    // For the decision line: ", quota=messages_per_hour:2/3" when granted, else
    // ", quota=refused (messages_per_hour empty: 0.05 of 3 left, needs 1; store=...)".
    std::string log;
    // Why not, for the failure policy's reply and log ("route quota exhausted: ...").
    std::string detail;
};

// Takes a request's tokens (1 from each message bucket, `recipients` from a recipient
// bucket: the services count each request as one message) from `route`'s buckets in `store`, all or
// none, and updates the metrics paas_milter_quota_tokens and paas_milter_quota_exhausted_total. A
// route without buckets is always granted, with no log.
RouteQuotaCheck take_route_quota(QuotaStore& store, const std::string& route,
                                 const ApiSettings& api, size_t recipients);

// `hooks` whose `send` empties the route's buckets in `store` when the service answers a
// POST with 429, for its Retry-After if it has one: the next messages take on_quota instead
// of being throttled too. The request itself is retried as before.
ApiHooks drain_quota_on_throttle(ApiHooks hooks, std::shared_ptr<QuotaStore> store,
                                 std::string route, std::vector<BucketSpec> buckets);

// For `paas-milter query`: the route's buckets and on_quota and, when [quota] names a shared
// store that answers, their levels there (read-only; nothing is taken). Empty for a route
// without buckets.
std::string format_quota_report(const Config& config, const Route& route);

}  // namespace paasmilter
