#include <doctest/doctest.h>

#include <algorithm>

#include <fmt/format.h>

#include "paasmilter/delivery/eom_plan.hpp"

using namespace paasmilter;

namespace {

bool has(const std::vector<std::string>& list, const std::string& item) {
    return std::find(list.begin(), list.end(), item) != list.end();
}

struct Fixture {
    Config config;
    ApiSettings api;
    Verdict verdict;
    std::vector<std::string> recipients;
    std::vector<std::string> args;

    Fixture() {
        config.routing_header = "X-PaaS-Route";
        Route fallback;
        fallback.name = "fallback";
        fallback.action = Action::relay;
        fallback.header_value = "fallback-relay";
        config.routes.emplace("fallback", fallback);
        api.local_domains = {"contoso.test"};
        verdict.submit_to_api = true;
        verdict.forged_headers_to_delete = 1;
    }
    void add(size_t remote, size_t local) {
        for (size_t i = 0; i < remote; ++i) recipients.push_back(fmt::format("r{}@example.net", i));
        for (size_t i = 0; i < local; ++i) recipients.push_back(fmt::format("l{}@contoso.test", i));
        for (const auto& r : recipients) args.push_back("<" + r + ">");
    }
    MtaPlan plan(const ApiResult& result) const {
        return plan_for_api(config, api, verdict, recipients, args, result);
    }
};

FailurePolicy policy(FailurePolicy::Kind kind) {
    return {kind, kind == FailurePolicy::Kind::relay ? "fallback" : ""};
}

}  // namespace

TEST_CASE("plan: accepted by the service") {
    Fixture f;
    f.add(3, 0);
    ApiResult ok;
    ok.accepted = {f.recipients[0], f.recipients[1], f.recipients[2]};
    MtaPlan plan = f.plan(ok);
    CHECK(plan.disposition == MtaPlan::Disposition::discard);
    CHECK(plan.delete_routing_headers == 1);
    CHECK(plan.log.find("local_copy=discarded") != std::string::npos);

    Fixture g;
    g.add(2, 1);
    ok.accepted = {g.recipients[0], g.recipients[1]};
    plan = g.plan(ok);
    CHECK(plan.disposition == MtaPlan::Disposition::accept);
    CHECK(plan.delete_recipients ==
          std::vector<std::string>{"<r0@example.net>", "<r1@example.net>"});
    CHECK(plan.add_headers.empty());
}

TEST_CASE("plan: each policy without a partial acceptance") {
    Fixture f;
    f.add(2, 0);
    ApiResult failed;
    failed.failure = ApiFailure::transient;
    failed.detail = "HTTP 503 100%";

    f.api.on_failure = policy(FailurePolicy::Kind::tempfail);
    MtaPlan plan = f.plan(failed);
    CHECK(plan.disposition == MtaPlan::Disposition::tempfail);
    CHECK(plan.reply_code == "451");
    CHECK(plan.reply_status == "4.3.0");
    CHECK(plan.reply_text.find('%') == std::string::npos);

    f.api.on_failure = policy(FailurePolicy::Kind::reject);
    plan = f.plan(failed);
    CHECK(plan.disposition == MtaPlan::Disposition::reject);
    CHECK(plan.reply_code == "550");
    CHECK(plan.reply_status == "5.3.0");

    failed.failure = ApiFailure::unconvertible;
    f.api.on_permanent_failure = policy(FailurePolicy::Kind::reject);
    CHECK(f.plan(failed).reply_status == "5.6.0");
    failed.failure = ApiFailure::permanent;
    CHECK(f.plan(failed).reply_status == "5.7.1");
    failed.failure = ApiFailure::oversize;
    f.api.on_oversize = policy(FailurePolicy::Kind::reject);
    CHECK(f.plan(failed).reply_status == "5.3.4");

    failed.failure = ApiFailure::transient;
    f.api.on_failure = policy(FailurePolicy::Kind::hold);
    plan = f.plan(failed);
    CHECK(plan.disposition == MtaPlan::Disposition::accept);
    CHECK(plan.quarantine_reason.has_value());
    CHECK(plan.delete_recipients.empty());

    f.api.on_failure = policy(FailurePolicy::Kind::relay);
    plan = f.plan(failed);
    CHECK(plan.disposition == MtaPlan::Disposition::accept);
    REQUIRE(plan.add_headers.size() == 1);
    CHECK(plan.add_headers[0] ==
          std::pair<std::string, std::string>{"X-PaaS-Route", "fallback-relay"});

    // Our own failure is never a bounce, whatever the policies say.
    failed.failure = ApiFailure::internal;
    CHECK(f.plan(failed).disposition == MtaPlan::Disposition::tempfail);
}

TEST_CASE("plan: recipients that differ only in case leave together") {
    Fixture f;
    f.recipients = {"Ann@example.net", "ann@example.net", "bob@example.net"};
    f.args = {"<Ann@example.net>", "<ann@example.net>", "<bob@example.net>"};
    f.api.on_failure = policy(FailurePolicy::Kind::hold);
    ApiResult partial;
    partial.failure = ApiFailure::transient;
    partial.accepted = {"ann@example.net"};
    MtaPlan plan = f.plan(partial);
    CHECK(plan.delete_recipients ==
          std::vector<std::string>{"<Ann@example.net>", "<ann@example.net>"});
}

TEST_CASE("plan: reject after a partial acceptance holds the rest instead") {
    Fixture f;
    f.add(3, 0);
    f.api.on_permanent_failure = policy(FailurePolicy::Kind::reject);
    ApiResult partial;
    partial.failure = ApiFailure::permanent;
    partial.accepted = {f.recipients[0]};
    MtaPlan plan = f.plan(partial);
    CHECK(plan.disposition == MtaPlan::Disposition::accept);
    CHECK(plan.quarantine_reason.has_value());
    CHECK(plan.delete_recipients == std::vector<std::string>{"<r0@example.net>"});
    CHECK(plan.log.find("held instead") != std::string::npos);
}

TEST_CASE("plan: on_quota applies to the recipients the service lacks") {
    Fixture f;
    f.add(3, 1);
    f.api.on_failure = policy(FailurePolicy::Kind::tempfail);
    f.api.on_quota = policy(FailurePolicy::Kind::relay);
    ApiResult partial;
    partial.failure = ApiFailure::quota;
    partial.detail = "request 2/2: route quota exhausted: messages_per_hour";
    partial.accepted = {f.recipients[0], f.recipients[1]};
    MtaPlan plan = f.plan(partial);
    CHECK(plan.disposition == MtaPlan::Disposition::accept);
    CHECK(plan.delete_recipients ==
          std::vector<std::string>{"<r0@example.net>", "<r1@example.net>"});
    REQUIRE(plan.add_headers.size() == 1);
    CHECK(plan.add_headers[0].second == "fallback-relay");
    CHECK(plan.log.find("policy=relay:fallback") != std::string::npos);

    f.api.on_quota = policy(FailurePolicy::Kind::hold);
    plan = f.plan(partial);
    CHECK(plan.quarantine_reason.has_value());
    CHECK(plan.delete_recipients ==
          std::vector<std::string>{"<r0@example.net>", "<r1@example.net>"});
}

TEST_CASE("plan: when the service cannot say whether it has a request, every policy tempfails") {
    for (auto kind : {FailurePolicy::Kind::reject, FailurePolicy::Kind::hold,
                      FailurePolicy::Kind::relay, FailurePolicy::Kind::tempfail}) {
        Fixture f;
        f.add(3, 1);
        f.api.on_failure = policy(kind);
        ApiResult unknown;
        unknown.failure = ApiFailure::transient;
        unknown.accepted = {f.recipients[0]};
        unknown.unresolved = {f.recipients[2]};
        MtaPlan plan = f.plan(unknown);
        CAPTURE(to_string(policy(kind)));
        CHECK(plan.disposition == MtaPlan::Disposition::tempfail);
        CHECK(plan.delete_recipients.empty());
        CHECK(plan.add_headers.empty());
        CHECK_FALSE(plan.quarantine_reason.has_value());
        CHECK(plan.log.find("unresolved requests: tempfail") != std::string::npos);
    }
}

// Every failure, policy, partial acceptance and mix of local recipients: nobody the service
// has gets it again from the MTA, nobody it lacks is dropped, local recipients always stay,
// and no bounce is sent once anyone may have the message.
TEST_CASE("plan: invariants over every combination") {
    using K = FailurePolicy::Kind;
    int combinations = 0;
    for (ApiFailure failure : {ApiFailure::transient, ApiFailure::permanent,
                               ApiFailure::unconvertible, ApiFailure::oversize}) {
        for (K kind : {K::tempfail, K::relay, K::hold, K::reject}) {
            for (size_t accepted = 0; accepted <= 2; ++accepted) {
                for (size_t unresolved = 0; unresolved + accepted <= 2; ++unresolved) {
                    for (size_t local = 0; local <= 1; ++local) {
                        Fixture f;
                        f.add(3, local);
                        f.api.on_failure = f.api.on_permanent_failure = f.api.on_oversize =
                            policy(kind);
                        ApiResult result;
                        result.failure = failure;
                        result.detail = "x";
                        for (size_t i = 0; i < accepted; ++i)
                            result.accepted.push_back(f.recipients[i]);
                        for (size_t i = 0; i < unresolved; ++i)
                            result.unresolved.push_back(f.recipients[accepted + i]);
                        MtaPlan plan = f.plan(result);
                        ++combinations;
                        CAPTURE(to_string(failure));
                        CAPTURE(to_string(policy(kind)));
                        CAPTURE(accepted);
                        CAPTURE(unresolved);
                        CAPTURE(local);
                        CHECK(plan.disposition != MtaPlan::Disposition::discard);
                        CHECK(plan.delete_routing_headers == 1);
                        if (accepted + unresolved > 0) {
                            CHECK(plan.disposition != MtaPlan::Disposition::reject);
                        }
                        if (unresolved > 0) {
                            CHECK(plan.disposition == MtaPlan::Disposition::tempfail);
                        }
                        if (plan.disposition == MtaPlan::Disposition::accept) {
                            // The MTA keeps the message: it must go somewhere deliberate.
                            CHECK(
                                (plan.quarantine_reason.has_value() || !plan.add_headers.empty()));
                            for (size_t i = 0; i < f.recipients.size(); ++i) {
                                bool deleted = has(plan.delete_recipients, f.args[i]);
                                bool at_service = i < accepted;
                                CHECK(deleted == at_service);
                            }
                        } else {
                            CHECK(plan.delete_recipients.empty());
                            REQUIRE_FALSE(plan.reply_code.empty());
                            // libmilter refuses a reply whose status class differs.
                            CHECK(plan.reply_status.substr(0, 1) == plan.reply_code.substr(0, 1));
                        }
                    }
                }
            }
        }
    }
    CHECK(combinations == 4 * 4 * 6 * 2);
}

TEST_CASE("plan: routes that are not the API") {
    Verdict relay;
    relay.forged_headers_to_delete = 2;
    relay.add_routing_header = true;
    relay.routing_header = "X-PaaS-Route";
    relay.routing_value = "acs-smtp";
    MtaPlan plan = plan_for_verdict(relay);
    CHECK(plan.delete_routing_headers == 2);
    REQUIRE(plan.add_headers.size() == 1);
    CHECK(plan.disposition == MtaPlan::Disposition::accept);

    Verdict reject;
    reject.reply = Verdict::Reply::reject;
    reject.reply_code = 550;
    reject.reply_status = "5.7.1";
    reject.reply_text = "no";
    plan = plan_for_verdict(reject);
    CHECK(plan.disposition == MtaPlan::Disposition::reject);
    CHECK(plan.reply_code == "550");

    relay.dry_run = true;
    plan = plan_for_verdict(relay);
    CHECK(plan.delete_routing_headers == 0);
    CHECK(plan.add_headers.empty());
}

TEST_CASE("plan: on_ambiguous decides what becomes of recipients the service may have") {
    Fixture f;
    f.add(2, 1);
    ApiResult ambiguous;
    ambiguous.failure = ApiFailure::transient;
    ambiguous.detail = "HTTP 504";
    ambiguous.unresolved = {f.recipients[0], f.recipients[1]};
    f.api.on_failure = policy(FailurePolicy::Kind::relay);

    SUBCASE("tempfail (default): the client retries, whatever on_failure says") {
        MtaPlan plan = f.plan(ambiguous);
        CHECK(plan.disposition == MtaPlan::Disposition::tempfail);
        CHECK(plan.reply_code == "451");
        CHECK(plan.add_headers.empty());
    }
    SUBCASE("hold: the operator decides") {
        f.api.on_ambiguous = AmbiguityPolicy::hold;
        MtaPlan plan = f.plan(ambiguous);
        CHECK(plan.disposition == MtaPlan::Disposition::accept);
        REQUIRE(plan.quarantine_reason);
        CHECK(plan.quarantine_reason->find("may have it already: HTTP 504") != std::string::npos);
        CHECK(plan.delete_recipients.empty());
        CHECK(plan.add_headers.empty());
        CHECK(plan.log.find("held, on_ambiguous=hold") != std::string::npos);
    }
    SUBCASE("assume-sent: counted as delivered; local recipients keep the MTA's copy") {
        f.api.on_ambiguous = AmbiguityPolicy::assume_sent;
        MtaPlan plan = f.plan(ambiguous);
        CHECK(plan.disposition == MtaPlan::Disposition::accept);
        CHECK(plan.delete_recipients == std::vector<std::string>{f.args[0], f.args[1]});
        CHECK_FALSE(plan.quarantine_reason);
        CHECK(plan.log.find("assumed sent for 2 recipient(s)") != std::string::npos);
        CHECK(plan.log.find("local_copy=kept for 1 local recipient(s)") != std::string::npos);
    }
    SUBCASE("assume-sent with some recipients certainly not sent: they take on_failure") {
        f.api.on_ambiguous = AmbiguityPolicy::assume_sent;
        ambiguous.unresolved = {f.recipients[0]};
        MtaPlan plan = f.plan(ambiguous);
        CHECK(plan.disposition == MtaPlan::Disposition::accept);
        CHECK(plan.delete_recipients == std::vector<std::string>{f.args[0]});
        REQUIRE(plan.add_headers.size() == 1);
        CHECK(plan.add_headers[0].second == "fallback-relay");
    }
}

TEST_CASE("plan: a client the sender_map refuses is rejected whatever the policies") {
    Fixture f;
    f.add(1, 1);
    f.api.on_permanent_failure = policy(FailurePolicy::Kind::hold);
    ApiResult refused;
    refused.failure = ApiFailure::refused;
    refused.detail = "this client may not send through this route";
    MtaPlan plan = f.plan(refused);
    CHECK(plan.disposition == MtaPlan::Disposition::reject);
    CHECK(plan.reply_code == "550");
    CHECK(plan.reply_status == "5.7.1");
    CHECK_FALSE(plan.quarantine_reason);
}

TEST_CASE("plan: another transaction delivering the message always means tempfail") {
    for (AmbiguityPolicy policy :
         {AmbiguityPolicy::tempfail, AmbiguityPolicy::hold, AmbiguityPolicy::assume_sent}) {
        Fixture f;
        f.add(1, 0);
        f.api.on_ambiguous = policy;
        ApiResult busy;
        busy.failure = ApiFailure::transient;
        busy.unresolved = {f.recipients[0]};
        busy.busy = true;
        MtaPlan plan = f.plan(busy);
        CAPTURE(to_string(policy));
        CHECK(plan.disposition == MtaPlan::Disposition::tempfail);
        CHECK_FALSE(plan.quarantine_reason);
    }
}
