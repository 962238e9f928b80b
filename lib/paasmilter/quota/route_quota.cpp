#include "paasmilter/quota/route_quota.hpp"

#include <cmath>

#include <fmt/format.h>

#include "paasmilter/metrics.hpp"
#include "paasmilter/quota/redis_store.hpp"

namespace paasmilter {

namespace {

// "3", "0.05", "9998": whole tokens without decimals.
std::string tokens(double value) {
    if (std::abs(value - std::round(value)) < 0.005) return fmt::format("{:.0f}", value);
    return fmt::format("{:.2f}", value);
}

}  // namespace

RouteQuotaCheck take_route_quota(QuotaStore& store, const std::string& route,
                                 const ApiSettings& api, size_t recipients) {
    RouteQuotaCheck check;
    if (api.quota.empty()) return check;
    const std::vector<double> amounts = quota_amounts(api.quota, recipients);
    QuotaTake take = store.take(route, api.quota, amounts);
    for (size_t i = 0; i < api.quota.size() && i < take.levels.size(); ++i) {
        metrics().quota_tokens(route, api.quota[i].name, take.levels[i]);
    }
    std::vector<std::string> parts;
    if (take.granted) {
        for (size_t i = 0; i < api.quota.size() && i < take.levels.size(); ++i) {
            parts.push_back(fmt::format("{}:{}/{}", api.quota[i].name, tokens(take.levels[i]),
                                        tokens(take.capacities[i])));
        }
        check.log = fmt::format(", quota={}", fmt::join(parts, ","));
        if (take.local_fallback) check.log += fmt::format(" (store={})", take.store);
        return check;
    }
    check.granted = false;
    std::vector<std::string> names;
    if (take.blocked.count() > 0) {
        metrics().quota_exhausted(route, "throttled");
        const auto seconds = (take.blocked.count() + 999) / 1000;
        parts.push_back(fmt::format("throttled by the service: no request for {} s", seconds));
        names.emplace_back("throttled");
    }
    for (size_t i : take.short_of) {
        if (i >= api.quota.size() || i >= take.levels.size()) continue;
        metrics().quota_exhausted(route, api.quota[i].name);
        parts.push_back(fmt::format("{} empty: {} of {} left, needs {}", api.quota[i].name,
                                    tokens(take.levels[i]), tokens(take.capacities[i]),
                                    tokens(amounts[i])));
        names.push_back(api.quota[i].name);
    }
    if (parts.empty()) parts.emplace_back("not granted");
    check.log = fmt::format(", quota=refused ({}; store={})", fmt::join(parts, ", "), take.store);
    check.detail = names.empty() ? std::string("route quota exhausted")
                                 : fmt::format("route quota exhausted: {}", fmt::join(names, ", "));
    return check;
}

ApiHooks drain_quota_on_throttle(ApiHooks hooks, std::shared_ptr<QuotaStore> store,
                                 std::string route, std::vector<BucketSpec> buckets) {
    if (!store || buckets.empty()) return hooks;
    hooks.send = [send = hooks.send, wall_clock = hooks.wall_clock, store = std::move(store),
                  route = std::move(route), buckets = std::move(buckets)](
                     const HttpRequest& request,
                     std::chrono::milliseconds timeout) -> Result<HttpResponse> {
        auto response = send(request, timeout);
        if (response && response->status == 429 && request.method == "POST") {
            const auto now = wall_clock ? wall_clock() : std::chrono::system_clock::now();
            store->drain(route, buckets,
                         retry_after_or(*response, std::chrono::milliseconds(0), now));
        }
        return response;
    };
    return hooks;
}

std::string format_quota_report(const Config& config, const Route& route) {
    if (!route.api || route.api->quota.empty()) return {};
    const ApiSettings& api = *route.api;
    std::vector<std::string> sizes;
    for (const BucketSpec& bucket : api.quota) {
        sizes.push_back(fmt::format("{} {}", bucket.name, tokens(bucket.capacity)));
    }
    std::string out =
        fmt::format("quota: {} (on_quota: {})\n", fmt::join(sizes, ", "), to_string(api.on_quota));
    const QuotaSettings& settings = config.quota;
    if (settings.store.empty()) {
        out += fmt::format(
            "quota levels: kept by each gateway{} (no quota.store; the metric "
            "paas_milter_quota_tokens shows them)\n",
            settings.fleet_size > 1 ? fmt::format(", 1/{} of each bucket", settings.fleet_size)
                                    : std::string());
        return out;
    }
    auto shared = peek_shared_quota(settings, route.name, api.quota, std::chrono::seconds(1));
    if (!shared) {
        out += fmt::format(
            "quota levels: {} unreachable ({}): each gateway uses its local share "
            "(1/{})\n",
            redis_url(settings), shared.error().message, settings.fleet_size);
        return out;
    }
    std::vector<std::string> levels;
    for (size_t i = 0; i < api.quota.size() && i < shared->levels.size(); ++i) {
        levels.push_back(fmt::format("{} {}/{}", api.quota[i].name, tokens(shared->levels[i]),
                                     tokens(shared->capacities[i])));
    }
    out += fmt::format("quota levels: {} in {}", fmt::join(levels, ", "), shared->store);
    if (shared->blocked.count() > 0) {
        out += fmt::format(" (throttled by the service for {} s more)",
                           (shared->blocked.count() + 999) / 1000);
    }
    return out + "\n";
}

}  // namespace paasmilter
