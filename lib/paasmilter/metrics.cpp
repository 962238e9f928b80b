#include "paasmilter/metrics.hpp"

#include <prometheus/counter.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

namespace paasmilter {

const char* to_string(TransactionOutcome outcome) {
    switch (outcome) {
        case TransactionOutcome::relayed:
            return "relayed";
        case TransactionOutcome::submitted:
            return "submitted";
        case TransactionOutcome::fell_back:
            return "fell_back";
        case TransactionOutcome::tempfailed:
            return "tempfailed";
        case TransactionOutcome::rejected:
            return "rejected";
        case TransactionOutcome::held:
            return "held";
        case TransactionOutcome::passed:
            return "passed";
        case TransactionOutcome::dry_run:
            return "dry_run";
    }
    return "passed";
}

TransactionOutcome transaction_outcome(const Verdict& verdict, const MtaPlan& plan,
                                       MtaPlan::Disposition told, bool api_route,
                                       bool api_accepted) {
    if (verdict.dry_run) return TransactionOutcome::dry_run;
    switch (told) {
        case MtaPlan::Disposition::tempfail:
            return TransactionOutcome::tempfailed;
        case MtaPlan::Disposition::reject:
            return TransactionOutcome::rejected;
        case MtaPlan::Disposition::discard:
            // Only an API route discards: once the service has every remote recipient.
            return api_route ? TransactionOutcome::submitted : TransactionOutcome::passed;
        case MtaPlan::Disposition::accept:
            break;
    }
    if (plan.quarantine_reason) return TransactionOutcome::held;
    // A routing header, or recipients rerouted by an external_only route.
    if (!plan.add_headers.empty() || !plan.add_recipients.empty()) {
        return api_route ? TransactionOutcome::fell_back : TransactionOutcome::relayed;
    }
    // An API route that kept only its local_domains recipients with Postfix.
    if (api_route && api_accepted) return TransactionOutcome::submitted;
    return TransactionOutcome::passed;
}

std::string_view status_class(long status) {
    if (status == 429) return "429";
    if (status >= 200 && status < 300) return "2xx";
    if (status >= 300 && status < 400) return "3xx";
    if (status >= 400 && status < 500) return "4xx";
    if (status >= 500 && status < 600) return "5xx";
    return "other";
}

std::string_view status_class(const Error& error) {
    return error.kind == ErrorKind::request_not_sent ? "not_sent" : "no_answer";
}

struct Metrics::Families {
    explicit Families(prometheus::Registry& registry)
        : transactions(prometheus::BuildCounter()
                           .Name("paas_milter_transactions_total")
                           .Help("Transactions by matched rule, route, the route's action and "
                                 "what the MTA was told (outcome)")
                           .Register(registry)),
          forged_headers(prometheus::BuildCounter()
                             .Name("paas_milter_forged_routing_headers_removed_total")
                             .Help("Routing headers sent by clients and removed")
                             .Register(registry)
                             .Add({})),
          api_requests(prometheus::BuildCounter()
                           .Name("paas_milter_api_requests_total")
                           .Help("HTTP requests to the PaaS services by provider, method and "
                                 "status class (not_sent / no_answer: no HTTP answer)")
                           .Register(registry)),
          api_latency(prometheus::BuildHistogram()
                          .Name("paas_milter_api_request_duration_seconds")
                          .Help("Time from sending an HTTP request to a PaaS service to its "
                                "answer (or the error)")
                          .Register(registry)),
          api_retries(prometheus::BuildCounter()
                          .Name("paas_milter_api_retries_total")
                          .Help("Waits before another request for the same message (429, 5xx, "
                                "timeouts, 409)")
                          .Register(registry)),
          token_refreshes(prometheus::BuildCounter()
                              .Name("paas_milter_token_refreshes_total")
                              .Help("Entra ID token requests by result")
                              .Register(registry)),
          final_statuses(prometheus::BuildCounter()
                             .Name("paas_milter_api_final_status_total")
                             .Help("Final status of operations the service had accepted "
                                   "(polled after the 202)")
                             .Register(registry)),
          in_flight(prometheus::BuildGauge()
                        .Name("paas_milter_messages_in_flight")
                        .Help("Messages between MAIL FROM and their end")
                        .Register(registry)
                        .Add({})),
          generation(prometheus::BuildGauge()
                         .Name("paas_milter_config_generation")
                         .Help("Configurations put in force since start (1 after start-up)")
                         .Register(registry)
                         .Add({})),
          last_reload_ok(prometheus::BuildGauge()
                             .Name("paas_milter_config_last_reload_success")
                             .Help("1 if the last load or reload put the configuration in "
                                   "force, 0 if it was refused")
                             .Register(registry)
                             .Add({})),
          last_reload_time(prometheus::BuildGauge()
                               .Name("paas_milter_config_last_reload_timestamp_seconds")
                               .Help("Unix time of the last load or reload, in force or refused")
                               .Register(registry)
                               .Add({})),
          reloads(prometheus::BuildCounter()
                      .Name("paas_milter_config_loads_total")
                      .Help("Configuration loads (start-up and reloads) by result")
                      .Register(registry)),
          quota_tokens(prometheus::BuildGauge()
                           .Name("paas_milter_quota_tokens")
                           .Help("Tokens left in a route's quota bucket after the last take "
                                 "(of the shared store, or of this gateway's local share)")
                           .Register(registry)),
          quota_exhausted(prometheus::BuildCounter()
                              .Name("paas_milter_quota_exhausted_total")
                              .Help("Messages that took on_quota because a route's bucket was "
                                    "empty (bucket=\"throttled\": a 429's Retry-After running)")
                              .Register(registry)),
          quota_store_up(prometheus::BuildGauge()
                             .Name("paas_milter_quota_store_up")
                             .Help("1 while the shared quota store (Redis) answers, 0 while "
                                   "each bucket's local share is used instead")
                             .Register(registry)),
          loops_stopped(prometheus::BuildCounter()
                            .Name("paas_milter_loops_stopped_total")
                            .Help("Messages of a relay or API route that arrived with max_hops "
                                  "valid loop stamps and took on_loop instead of the route")
                            .Register(registry)),
          forged_loop_stamps(prometheus::BuildCounter()
                                 .Name("paas_milter_forged_loop_stamps_removed_total")
                                 .Help("Loop stamp header fields that did not verify (an unknown "
                                       "party's), removed")
                                 .Register(registry)
                                 .Add({})) {}

    prometheus::Family<prometheus::Counter>& transactions;
    prometheus::Counter& forged_headers;
    prometheus::Family<prometheus::Counter>& api_requests;
    prometheus::Family<prometheus::Histogram>& api_latency;
    prometheus::Family<prometheus::Counter>& api_retries;
    prometheus::Family<prometheus::Counter>& token_refreshes;
    prometheus::Family<prometheus::Counter>& final_statuses;
    prometheus::Gauge& in_flight;
    prometheus::Gauge& generation;
    prometheus::Gauge& last_reload_ok;
    prometheus::Gauge& last_reload_time;
    prometheus::Family<prometheus::Counter>& reloads;
    prometheus::Family<prometheus::Gauge>& quota_tokens;
    prometheus::Family<prometheus::Counter>& quota_exhausted;
    // Without a shared store the family stays empty: no series claims a store is down.
    prometheus::Family<prometheus::Gauge>& quota_store_up;
    prometheus::Family<prometheus::Counter>& loops_stopped;
    prometheus::Counter& forged_loop_stamps;
};

namespace {

// From 5 ms (a loopback double) to 60 s (a request_timeout): service latency is tens to
// hundreds of milliseconds, a throttled or stuck service seconds.
const prometheus::Histogram::BucketBoundaries& latency_buckets() {
    static const prometheus::Histogram::BucketBoundaries buckets{
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60};
    return buckets;
}

double unix_seconds(std::chrono::system_clock::time_point when) {
    return std::chrono::duration<double>(when.time_since_epoch()).count();
}

}  // namespace

Metrics::Metrics()
    : registry_(std::make_shared<prometheus::Registry>()),
      families_(std::make_unique<Families>(*registry_)) {}

Metrics::~Metrics() = default;

std::shared_ptr<prometheus::Registry> Metrics::registry() const {
    return registry_;
}

void Metrics::transaction(std::string_view rule, std::string_view route, std::string_view action,
                          TransactionOutcome outcome) {
    families_->transactions
        .Add({{"rule", std::string(rule)},
              {"route", std::string(route)},
              {"action", std::string(action)},
              {"outcome", to_string(outcome)}})
        .Increment();
}

void Metrics::forged_routing_headers_removed(int count) {
    if (count > 0) families_->forged_headers.Increment(count);
}

void Metrics::api_request(std::string_view provider, std::string_view method,
                          std::string_view status_class, std::chrono::duration<double> took) {
    families_->api_requests
        .Add({{"provider", std::string(provider)},
              {"method", std::string(method)},
              {"status_class", std::string(status_class)}})
        .Increment();
    families_->api_latency
        .Add({{"provider", std::string(provider)}, {"method", std::string(method)}},
             latency_buckets())
        .Observe(took.count());
}

void Metrics::api_retry(std::string_view provider) {
    families_->api_retries.Add({{"provider", std::string(provider)}}).Increment();
}

void Metrics::token_refresh(bool ok) {
    families_->token_refreshes.Add({{"result", ok ? "ok" : "failed"}}).Increment();
}

void Metrics::final_status(std::string_view provider, std::string_view status) {
    families_->final_statuses
        .Add({{"provider", std::string(provider)}, {"status", std::string(status)}})
        .Increment();
}

void Metrics::message_started() {
    families_->in_flight.Increment();
}

void Metrics::message_finished() {
    families_->in_flight.Decrement();
}

void Metrics::config_loaded(std::chrono::system_clock::time_point when) {
    families_->generation.Increment();
    families_->last_reload_ok.Set(1);
    families_->last_reload_time.Set(unix_seconds(when));
    families_->reloads.Add({{"result", "ok"}}).Increment();
}

void Metrics::reload_refused(std::chrono::system_clock::time_point when) {
    families_->last_reload_ok.Set(0);
    families_->last_reload_time.Set(unix_seconds(when));
    families_->reloads.Add({{"result", "refused"}}).Increment();
}

void Metrics::quota_tokens(std::string_view route, std::string_view bucket, double level) {
    families_->quota_tokens.Add({{"route", std::string(route)}, {"bucket", std::string(bucket)}})
        .Set(level);
}

void Metrics::quota_exhausted(std::string_view route, std::string_view bucket) {
    families_->quota_exhausted.Add({{"route", std::string(route)}, {"bucket", std::string(bucket)}})
        .Increment();
}

void Metrics::quota_store_up(bool up) {
    families_->quota_store_up.Add({}).Set(up ? 1 : 0);
}

void Metrics::loop_stopped(std::string_view route) {
    families_->loops_stopped.Add({{"route", std::string(route)}}).Increment();
}

void Metrics::forged_loop_stamps_removed(size_t count) {
    if (count > 0) families_->forged_loop_stamps.Increment(static_cast<double>(count));
}

Metrics& metrics() {
    static Metrics instance;
    return instance;
}

}  // namespace paasmilter
