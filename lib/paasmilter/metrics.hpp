// Prometheus metrics (prometheus-cpp): one registry for the process, its families built once,
// each observation a few atomic operations. A long-lived service beside the configuration
// snapshot: it outlives reloads, so counters never reset while the process runs. The daemon
// serves it over HTTP when [metrics] listen is set; without that it is kept but not served.
#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <string_view>

#include "paasmilter/delivery/eom_plan.hpp"
#include "paasmilter/result.hpp"

namespace prometheus {
class Registry;
}

namespace paasmilter {

// What became of one transaction, as the MTA was told at end of message.
enum class TransactionOutcome {
    relayed,     // a relay route's header was added: Postfix FILTERs it to the route
    submitted,   // the service accepted every remote recipient; the local copy went
    fell_back,   // an API route's failure policy sent it to a relay route
    tempfailed,  // 4xx to the client
    rejected,    // 5xx to the client
    held,        // Postfix's hold queue
    passed,      // left to Postfix's normal delivery (action pass, no route, local recipients)
    dry_run,     // classified and logged only
};
const char* to_string(TransactionOutcome outcome);

// The outcome of a transaction from its verdict, the plan computed for it and what the MTA
// was finally told (`told` differs from the plan's disposition when the MTA refused one of
// the plan's actions: then it is tempfail). `api_accepted` says whether the service
// accepted any recipient.
TransactionOutcome transaction_outcome(const Verdict& verdict, const MtaPlan& plan,
                                       MtaPlan::Disposition told, bool api_route,
                                       bool api_accepted);

// Label values of an HTTP answer: "2xx", "3xx", "429", "4xx", "5xx", or for no answer
// "not_sent" (certainly never reached the service) and "no_answer" (it may have).
std::string_view status_class(long status);
std::string_view status_class(const Error& error);

class Metrics {
  public:
    Metrics();
    ~Metrics();
    Metrics(const Metrics&) = delete;
    Metrics& operator=(const Metrics&) = delete;

    std::shared_ptr<prometheus::Registry> registry() const;

    // `rule` and `route` are empty when none matched; `action` is the route's action.
    void transaction(std::string_view rule, std::string_view route, std::string_view action,
                     TransactionOutcome outcome);
    void forged_routing_headers_removed(int count);
    // One HTTP request to a service (`provider`: "acs", "graph"), answered or not.
    void api_request(std::string_view provider, std::string_view method,
                     std::string_view status_class, std::chrono::duration<double> took);
    // A wait before another request of the same message (a 429, 5xx, timeout, 409).
    void api_retry(std::string_view provider);
    // An Entra ID token request: `ok` when a token came back.
    void token_refresh(bool ok);
    // The final status of an operation the service had accepted (ACS: Succeeded, Failed,
    // Canceled, or Unknown when polling gave up).
    void final_status(std::string_view provider, std::string_view status);
    void message_started();
    void message_finished();
    // A configuration put in force (at start or by a reload), or a reload refused.
    void config_loaded(std::chrono::system_clock::time_point when);
    void reload_refused(std::chrono::system_clock::time_point when);
    // Route quotas: a bucket's level after a take, a take refused by an empty bucket (or
    // "throttled": a 429's Retry-After still running), and whether the shared quota store
    // (Redis) answers.
    void quota_tokens(std::string_view route, std::string_view bucket, double level);
    void quota_exhausted(std::string_view route, std::string_view bucket);
    void quota_store_up(bool up);
    // Loop protection: a message that took on_loop instead of `route`, and the client's stamp
    // fields removed because they did not verify.
    void loop_stopped(std::string_view route);
    void forged_loop_stamps_removed(size_t count);

  private:
    struct Families;
    std::shared_ptr<prometheus::Registry> registry_;
    std::unique_ptr<Families> families_;
};

// The process's metrics (a long-lived service, like the status poller).
Metrics& metrics();

}  // namespace paasmilter
