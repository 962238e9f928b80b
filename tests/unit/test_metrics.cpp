#include <doctest/doctest.h>
#include <prometheus/registry.h>
#include <prometheus/text_serializer.h>

#include <string>

#include "paasmilter/metrics.hpp"

using namespace paasmilter;

namespace {

std::string exposition(const Metrics& metrics) {
    return prometheus::TextSerializer().Serialize(metrics.registry()->Collect());
}

// The sample line "NAME{LABELS} VALUE" as the text exposition writes it, or "" if absent.
std::string sample(const std::string& text, const std::string& name_and_labels) {
    const std::string prefix = name_and_labels + " ";
    for (size_t at = text.find(prefix); at != std::string::npos; at = text.find(prefix, at + 1)) {
        if (at == 0 || text[at - 1] == '\n') {
            size_t end = text.find('\n', at);
            return text.substr(at + prefix.size(), end - at - prefix.size());
        }
    }
    return {};
}

MtaPlan plan_with(MtaPlan::Disposition disposition) {
    MtaPlan plan;
    plan.disposition = disposition;
    return plan;
}

}  // namespace

TEST_CASE("transaction outcome: what the MTA was told, table-driven") {
    using D = MtaPlan::Disposition;
    using O = TransactionOutcome;
    Verdict verdict;
    MtaPlan relay_plan = plan_with(D::accept);
    relay_plan.add_headers = {{"X-PaaS-Route", "smtp"}};
    MtaPlan held = plan_with(D::accept);
    held.quarantine_reason = "paas-milter: API unavailable";
    MtaPlan local_kept = plan_with(D::accept);
    local_kept.delete_recipients = {"<a@example.net>"};

    struct Case {
        const char* name;
        MtaPlan plan;
        D told;
        bool api_route;
        bool accepted;
        O expected;
    };
    const Case cases[] = {
        {"relay route", relay_plan, D::accept, false, false, O::relayed},
        {"pass / no route", plan_with(D::accept), D::accept, false, false, O::passed},
        {"reject route", plan_with(D::reject), D::reject, false, false, O::rejected},
        {"tempfail route", plan_with(D::tempfail), D::tempfail, false, false, O::tempfailed},
        {"MTA refused an action", relay_plan, D::tempfail, false, false, O::tempfailed},
        {"api accepted, copy discarded", plan_with(D::discard), D::discard, true, true,
         O::submitted},
        {"api accepted, local recipients kept", local_kept, D::accept, true, true, O::submitted},
        {"api failed, relay fallback", relay_plan, D::accept, true, false, O::fell_back},
        {"api failed, held", held, D::accept, true, false, O::held},
        {"api failed, tempfail", plan_with(D::tempfail), D::tempfail, true, false, O::tempfailed},
        {"api refused, rejected", plan_with(D::reject), D::reject, true, false, O::rejected},
        {"api, only local recipients", plan_with(D::accept), D::accept, true, false, O::passed},
    };
    for (const Case& c : cases) {
        CAPTURE(c.name);
        CHECK(transaction_outcome(verdict, c.plan, c.told, c.api_route, c.accepted) == c.expected);
    }
    verdict.dry_run = true;
    CHECK(transaction_outcome(verdict, relay_plan, D::accept, false, false) == O::dry_run);
}

TEST_CASE("status classes of HTTP answers and of requests without one") {
    CHECK(status_class(202) == "2xx");
    CHECK(status_class(302) == "3xx");
    CHECK(status_class(429) == "429");
    CHECK(status_class(404) == "4xx");
    CHECK(status_class(503) == "5xx");
    CHECK(status_class(make_error(ErrorKind::request_not_sent, "connect")) == "not_sent");
    CHECK(status_class(make_error(ErrorKind::no_answer, "timeout")) == "no_answer");
}

TEST_CASE("metrics: counters, the latency histogram and gauges in the text exposition") {
    Metrics metrics;
    metrics.transaction("printers", "acs-smtp", "relay", TransactionOutcome::relayed);
    metrics.transaction("printers", "acs-smtp", "relay", TransactionOutcome::relayed);
    metrics.transaction("", "", "", TransactionOutcome::passed);
    metrics.forged_routing_headers_removed(2);
    metrics.forged_routing_headers_removed(0);
    metrics.api_request("acs", "POST", "2xx", std::chrono::milliseconds(30));
    metrics.api_request("acs", "POST", "429", std::chrono::milliseconds(700));
    metrics.api_retry("acs");
    metrics.token_refresh(true);
    metrics.token_refresh(false);
    metrics.final_status("acs", "Succeeded");
    metrics.message_started();
    metrics.message_started();
    metrics.message_finished();
    metrics.config_loaded(std::chrono::system_clock::time_point(std::chrono::seconds(1000)));
    metrics.reload_refused(std::chrono::system_clock::time_point(std::chrono::seconds(2000)));

    const std::string text = exposition(metrics);
    CAPTURE(text);
    CHECK(sample(text,
                 "paas_milter_transactions_total{action=\"relay\",outcome=\"relayed\","
                 "route=\"acs-smtp\",rule=\"printers\"}") == "2");
    CHECK(sample(text,
                 "paas_milter_transactions_total{action=\"\",outcome=\"passed\","
                 "route=\"\",rule=\"\"}") == "1");
    CHECK(sample(text, "paas_milter_forged_routing_headers_removed_total") == "2");
    CHECK(sample(text,
                 "paas_milter_api_requests_total{method=\"POST\",provider=\"acs\","
                 "status_class=\"429\"}") == "1");
    CHECK(sample(text,
                 "paas_milter_api_request_duration_seconds_count{method=\"POST\","
                 "provider=\"acs\"}") == "2");
    CHECK(sample(text,
                 "paas_milter_api_request_duration_seconds_bucket{method=\"POST\","
                 "provider=\"acs\",le=\"0.05\"}") == "1");
    CHECK(sample(text, "paas_milter_api_retries_total{provider=\"acs\"}") == "1");
    CHECK(sample(text, "paas_milter_token_refreshes_total{result=\"failed\"}") == "1");
    CHECK(
        sample(text, "paas_milter_api_final_status_total{provider=\"acs\",status=\"Succeeded\"}") ==
        "1");
    CHECK(sample(text, "paas_milter_messages_in_flight") == "1");
    CHECK(sample(text, "paas_milter_config_generation") == "1");
    CHECK(sample(text, "paas_milter_config_last_reload_success") == "0");
    CHECK(sample(text, "paas_milter_config_last_reload_timestamp_seconds") == "2000");
    CHECK(sample(text, "paas_milter_config_loads_total{result=\"refused\"}") == "1");
}
