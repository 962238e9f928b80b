// Loop protection: stamps (sign, parse, verify), the check of what a message arrived with,
// the verdict and end-of-message plans they lead to, and the [loop] configuration.
#include <doctest/doctest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <optional>
#include <string>
#include <vector>

#include "paasmilter/config.hpp"
#include "paasmilter/delivery/eom_plan.hpp"
#include "paasmilter/loop_stamp.hpp"
#include "paasmilter/providers/graph_mime.hpp"
#include "paasmilter/verdict.hpp"
#include "temp_dir.hpp"

using namespace paasmilter;
using paasmilter::testing::TempDir;

namespace {

constexpr const char* kMessageId = "<20261204.1@printer-7.contoso.test>";

LoopSettings settings(std::string gateway = "gw1", std::string secret = "fleet-secret-0123456789") {
    LoopSettings s;
    s.secret = std::move(secret);
    s.gateway_id = std::move(gateway);
    return s;
}

std::string stamp_field(const LoopSettings& s, const std::string& route, int hop,
                        const std::string& message_id = kMessageId) {
    auto stamp = sign_loop_stamp(s, route, hop, loop_message_id(message_id));
    REQUIRE(stamp.ok());
    return format_loop_stamp(*stamp);
}

using Fields = std::vector<std::optional<std::string>>;

bool contains(const std::string& text, const std::string& part) {
    return text.find(part) != std::string::npos;
}

// A relay route and an API route with a relay fallback, as the verdict and plan see them.
struct Fixture {
    Config config;
    Route relay;
    Route api_route;
    std::shared_ptr<ApiSettings> api = std::make_shared<ApiSettings>();
    LoopSettings loop = settings();

    Fixture() {
        config.routing_header = "X-PaaS-Route";
        relay.name = "acs-smtp";
        relay.action = Action::relay;
        relay.header_value = "acs-smtp";
        config.routes.emplace("acs-smtp", relay);
        api->on_failure = {FailurePolicy::Kind::relay, "acs-smtp"};
        api_route.name = "acs-api";
        api_route.action = Action::api;
        api_route.api = api;
        config.routes.emplace("acs-api", api_route);
    }

    Verdict verdict(const Route& route, const Fields& fields,
                    const std::string& message_id = kMessageId) {
        Decision decision;
        decision.route = &route;
        Verdict v = decide_verdict(config, decision, 0);
        LoopCheck arrived = check_loop_stamps(loop, fields, message_id);
        REQUIRE(apply_loop_protection(loop, decision, arrived, v).ok());
        return v;
    }
};

}  // namespace

TEST_CASE("loop stamp: signed, formatted, parsed back and verified") {
    const LoopSettings s = settings();
    const std::string field = stamp_field(s, "acs-smtp", 1);
    CHECK(field.starts_with("gw=gw1; route=acs-smtp; hop=1; sig="));
    CHECK(field.size() == std::string("gw=gw1; route=acs-smtp; hop=1; sig=").size() + 43);

    auto parsed = parse_loop_field(field);
    REQUIRE(parsed);
    REQUIRE(parsed->size() == 1);
    const LoopStamp& stamp = parsed->front();
    CHECK(stamp.gateway == "gw1");
    CHECK(stamp.route == "acs-smtp");
    CHECK(stamp.hop == 1);
    CHECK(verify_loop_stamp(s, stamp, loop_message_id(kMessageId)));
    // Deterministic: the same message gets the same stamp (a client's retry, the same API
    // request body).
    CHECK(stamp_field(s, "acs-smtp", 1) == field);
    // White space in the Message-ID (folding on the way) does not matter.
    CHECK(
        verify_loop_stamp(s, stamp, loop_message_id(" <20261204.1@printer-7.\r\n\tcontoso.test>")));
    // Nor around and inside the field's parts.
    auto refolded =
        parse_loop_field(" gw = gw1 ;\r\n\troute=acs-smtp;hop=1;  sig=" + stamp.signature + " ");
    REQUIRE(refolded);
    CHECK(verify_loop_stamp(s, refolded->front(), loop_message_id(kMessageId)));
}

TEST_CASE("loop stamp: a tampered stamp, another message, another secret do not verify") {
    const LoopSettings s = settings();
    LoopStamp stamp = parse_loop_field(stamp_field(s, "acs-smtp", 1))->front();
    const std::string id = loop_message_id(kMessageId);
    REQUIRE(verify_loop_stamp(s, stamp, id));

    LoopStamp other_route = stamp;
    other_route.route = "exchange-online";
    CHECK_FALSE(verify_loop_stamp(s, other_route, id));
    LoopStamp other_gateway = stamp;
    other_gateway.gateway = "gw2";
    CHECK_FALSE(verify_loop_stamp(s, other_gateway, id));
    LoopStamp other_hop = stamp;
    other_hop.hop = 2;
    CHECK_FALSE(verify_loop_stamp(s, other_hop, id));
    LoopStamp flipped = stamp;
    flipped.signature[10] = flipped.signature[10] == 'A' ? 'B' : 'A';
    CHECK_FALSE(verify_loop_stamp(s, flipped, id));

    CHECK_FALSE(verify_loop_stamp(s, stamp, loop_message_id("<another@printer-7.contoso.test>")));
    CHECK_FALSE(verify_loop_stamp(s, stamp, ""));
    CHECK_FALSE(verify_loop_stamp(settings("gw1", "another-fleet-secret-xyz"), stamp, id));
    // Another gateway of the same fleet (same secret) verifies it.
    CHECK(verify_loop_stamp(settings("gw2"), stamp, id));
    // No secret, no valid stamp.
    CHECK_FALSE(verify_loop_stamp(settings("gw1", ""), stamp, id));
}

TEST_CASE("loop stamp: malformed fields are not stamps") {
    const std::string sig(43, 'A');
    const std::string good = "gw=gw1; route=r; hop=1; sig=" + sig;
    CHECK(parse_loop_field(good));
    for (const std::string& bad : std::vector<std::string>{
             std::string(""),
             std::string("garbage"),
             "gw=gw1; route=r; hop=1",                        // no signature
             "gw=gw1; route=r; sig=" + sig,                   // no hop
             "gw=gw1; gw=gw2; route=r; hop=1; sig=" + sig,    // a key twice
             "gw=gw1; route=r; hop=1; sig=" + sig + "; x=1",  // an unknown key
             "gw=gw 1; route=r; hop=1; sig=" + sig,           // not a name
             "gw=gw1; route=r/x; hop=1; sig=" + sig,
             "gw=gw1; route=r; hop=0; sig=" + sig,
             "gw=gw1; route=r; hop=01; sig=" + sig,
             "gw=gw1; route=r; hop=1000; sig=" + sig,
             "gw=gw1; route=r; hop=-1; sig=" + sig,
             "gw=gw1; route=r; hop=1; sig=" + sig.substr(1),  // too short
             "gw=gw1; route=r; hop=1; sig=" + sig.substr(1) + "=",
             "gw=gw1; route=r; hop=1; sig=" + sig.substr(1) + "+",
             good + ",",  // an empty stamp after the comma
             good + ", garbage",
         }) {
        CAPTURE(bad);
        CHECK_FALSE(parse_loop_field(bad));
    }
    auto two = parse_loop_field(good + ",\r\n " + good);
    REQUIRE(two);
    CHECK(two->size() == 2);
    CHECK_FALSE(valid_loop_name(std::string(256, 'a')));
    CHECK(valid_loop_name(std::string(255, 'a')));
    CHECK(valid_loop_name("gw-1.contoso_test"));
}

TEST_CASE("loop check: valid stamps counted once, others forged, last first") {
    const LoopSettings gw1 = settings("gw1"), gw2 = settings("gw2");
    const std::string a = stamp_field(gw1, "acs-smtp", 1);
    const std::string b = stamp_field(gw2, "acs-smtp", 2);
    const std::string forged = "gw=gw9; route=acs-smtp; hop=1; sig=" + std::string(43, 'x');
    const std::string foreign = stamp_field(settings("gw1", "another-fleet-secret-xyz"), "r", 1);
    const std::string other_message = stamp_field(gw1, "acs-smtp", 1, "<other@example.net>");

    LoopCheck check = check_loop_stamps(
        gw1,
        Fields{a, forged, b, "garbage", a, foreign, std::nullopt, other_message, a + ", " + forged},
        kMessageId);
    CHECK(check.message_id == kMessageId);
    REQUIRE(check.valid.size() == 2);  // a (three times) and b
    CHECK(describe_loop_stamps(check.valid) == "gw1/acs-smtp, gw2/acs-smtp");
    CHECK(check.kept_fields == std::vector<std::string>{a, b, a});
    // A field with one stamp that does not verify goes whole, valid stamps in it included.
    CHECK(check.forged_fields == std::vector<int>{9, 8, 7, 6, 4, 2});

    // Folded into one field (an API submission), both count. Kept fields are canonical.
    check = check_loop_stamps(gw1, Fields{a + ",\r\n\t" + b}, kMessageId);
    CHECK(check.valid.size() == 2);
    CHECK(check.forged_fields.empty());
    CHECK(check.kept_fields == std::vector<std::string>{a + ", " + b});

    // Past the field limit, or too long: forged without being read.
    Fields many(kMaxLoopFields + 1, a);
    check = check_loop_stamps(gw1, many, kMessageId);
    CHECK(check.valid.size() == 1);
    CHECK(check.forged_fields == std::vector<int>{static_cast<int>(kMaxLoopFields + 1)});
    check = check_loop_stamps(gw1, Fields{a + std::string(kMaxLoopFieldBytes, ' ')}, kMessageId);
    CHECK(check.valid.empty());
    CHECK(check.forged_fields == std::vector<int>{1});

    // Without a Message-ID, stamps bind the empty one.
    const std::string no_id = stamp_field(gw1, "acs-smtp", 1, "");
    CHECK(check_loop_stamps(gw1, Fields{no_id}, "").valid.size() == 1);
    CHECK(check_loop_stamps(gw1, Fields{no_id}, kMessageId).valid.empty());
}

TEST_CASE("loop verdict: a first pass is stamped and routed") {
    Fixture f;
    Verdict v = f.verdict(f.relay, {});
    CHECK_FALSE(v.loop.stopped);
    CHECK(v.add_routing_header);
    CHECK(v.loop.header == "X-PaaS-Milter-Loop");
    CHECK(v.loop.stamp == stamp_field(f.loop, "acs-smtp", 1));
    CHECK(v.loop.log == ", stamped=gw1/acs-smtp hop 1");

    MtaPlan plan = plan_for_verdict(v);
    REQUIRE(plan.add_headers.size() == 2);
    CHECK(plan.add_headers[0].first == "X-PaaS-Route");
    CHECK(plan.add_headers[1] ==
          std::pair<std::string, std::string>("X-PaaS-Milter-Loop", v.loop.stamp));
    CHECK(plan.disposition == MtaPlan::Disposition::accept);
    CHECK_FALSE(plan.quarantine_reason);

    // The decision line says so.
    Transaction tx;
    Decision decision;
    decision.route = &f.relay;
    CHECK(contains(format_decision_log(tx, decision, v), ", stamped=gw1/acs-smtp hop 1, client="));

    // Below max_hops: routed again, with the next hop.
    f.loop.max_hops = 2;
    v = f.verdict(f.relay, {stamp_field(settings("gw2"), "acs-smtp", 1)});
    CHECK_FALSE(v.loop.stopped);
    CHECK(v.add_routing_header);
    CHECK(v.loop.stamp == stamp_field(f.loop, "acs-smtp", 2));
    CHECK(v.loop.log == ", loop=1 stamp (gw2/acs-smtp) < max_hops 2, stamped=gw1/acs-smtp hop 2");
}

TEST_CASE("loop verdict: max_hops valid stamps take on_loop instead of the route") {
    Fixture f;
    const Fields two = {stamp_field(settings("gw1"), "acs-smtp", 1),
                        stamp_field(settings("gw2"), "acs-smtp", 2)};

    // hold (default)
    Verdict v = f.verdict(f.relay, two);
    CHECK(v.loop.stopped);
    CHECK_FALSE(v.add_routing_header);
    CHECK(v.loop.stamp.empty());
    CHECK(v.loop.log == ", loop=2 stamps (gw1/acs-smtp, gw2/acs-smtp) >= max_hops 1: on_loop=hold");
    MtaPlan plan = plan_for_verdict(v);
    CHECK(plan.add_headers.empty());
    REQUIRE(plan.quarantine_reason);
    CHECK(*plan.quarantine_reason == "paas-milter: routing loop: 2 stamps >= max_hops 1");
    CHECK(plan.disposition == MtaPlan::Disposition::accept);

    f.loop.on_loop = LoopAction::reject;
    plan = plan_for_verdict(f.verdict(f.relay, two));
    CHECK(plan.disposition == MtaPlan::Disposition::reject);
    CHECK(plan.reply_code == "550");
    CHECK(plan.reply_status == "5.4.6");
    CHECK(plan.add_headers.empty());

    f.loop.on_loop = LoopAction::tempfail;
    plan = plan_for_verdict(f.verdict(f.relay, two));
    CHECK(plan.disposition == MtaPlan::Disposition::tempfail);
    CHECK(plan.reply_code == "451");
    CHECK(plan.reply_status == "4.4.6");

    f.loop.on_loop = LoopAction::pass;
    v = f.verdict(f.relay, two);
    plan = plan_for_verdict(v);
    CHECK(plan.disposition == MtaPlan::Disposition::accept);
    CHECK(plan.add_headers.empty());
    CHECK_FALSE(plan.quarantine_reason);
    CHECK(contains(v.loop.log, ": on_loop=pass"));

    // An API route is not submitted.
    f.loop.on_loop = LoopAction::hold;
    v = f.verdict(f.api_route, two);
    CHECK(v.loop.stopped);
    CHECK_FALSE(v.submit_to_api);
    CHECK(plan_for_verdict(v).quarantine_reason);

    // Dry run: logged, nothing done.
    v = f.verdict(f.relay, two);
    v.dry_run = true;
    plan = plan_for_verdict(v);
    CHECK_FALSE(plan.quarantine_reason);
    CHECK(plan.delete_headers.empty());
}

TEST_CASE("loop verdict: forged stamps are removed and never count") {
    Fixture f;
    const std::string forged = "gw=gw1; route=acs-smtp; hop=1; sig=" + std::string(43, 'x');
    const std::string valid = stamp_field(f.loop, "acs-smtp", 1);
    // A client faking a loop is still routed; its stamps go.
    Verdict v = f.verdict(f.relay, {forged, "junk"});
    CHECK_FALSE(v.loop.stopped);
    CHECK(v.add_routing_header);
    CHECK(v.loop.log == ", removed_forged_stamps=2, stamped=gw1/acs-smtp hop 1");
    MtaPlan plan = plan_for_verdict(v);
    CHECK(plan.delete_headers == std::vector<std::pair<std::string, int>>{
                                     {"X-PaaS-Milter-Loop", 2}, {"X-PaaS-Milter-Loop", 1}});

    // A valid stamp of another message (copied into this one) does not count either.
    v = f.verdict(f.relay, {stamp_field(f.loop, "acs-smtp", 1, "<copied@example.net>")});
    CHECK_FALSE(v.loop.stopped);
    CHECK(v.loop.delete_fields == std::vector<int>{1});

    // Routes that do not reroute ignore valid stamps, but forged ones still go.
    Route pass;
    pass.name = "local";
    pass.action = Action::pass;
    v = f.verdict(pass, {valid, forged});
    CHECK_FALSE(v.loop.stopped);
    CHECK(v.loop.stamp.empty());
    CHECK(v.loop.log == ", removed_forged_stamps=1");
    plan = plan_for_verdict(v);
    CHECK(plan.delete_headers ==
          std::vector<std::pair<std::string, int>>{{"X-PaaS-Milter-Loop", 2}});
    CHECK(plan.add_headers.empty());
    Decision none;
    Verdict unrouted = decide_verdict(f.config, none, 0);
    REQUIRE(apply_loop_protection(f.loop, none, check_loop_stamps(f.loop, {forged}, kMessageId),
                                  unrouted)
                .ok());
    CHECK(plan_for_verdict(unrouted).delete_headers.size() == 1);
}

TEST_CASE("loop plan: an API route's relay fallback carries the stamp, its other outcomes not") {
    Fixture f;
    const std::string forged = "gw=gw9; route=x; hop=1; sig=" + std::string(43, 'x');
    Verdict v = f.verdict(f.api_route, {forged});
    REQUIRE(v.submit_to_api);
    REQUIRE_FALSE(v.loop.stamp.empty());
    const std::vector<std::string> rcpts = {"a@example.net"}, args = {"<a@example.net>"};

    ApiResult failed;
    failed.failure = ApiFailure::transient;
    failed.detail = "HTTP 503";
    MtaPlan plan = plan_for_api(f.config, *f.api, v, rcpts, args, failed);
    CHECK(plan.delete_headers ==
          std::vector<std::pair<std::string, int>>{{"X-PaaS-Milter-Loop", 1}});
    CHECK(std::find(plan.add_headers.begin(), plan.add_headers.end(),
                    std::pair<std::string, std::string>("X-PaaS-Milter-Loop", v.loop.stamp)) !=
          plan.add_headers.end());
    CHECK(std::find(plan.add_headers.begin(), plan.add_headers.end(),
                    std::pair<std::string, std::string>("X-PaaS-Route", "acs-smtp")) !=
          plan.add_headers.end());

    ApiResult accepted;
    accepted.accepted = rcpts;
    plan = plan_for_api(f.config, *f.api, v, rcpts, args, accepted);
    CHECK(plan.disposition == MtaPlan::Disposition::discard);
    CHECK(plan.add_headers.empty());

    f.api->on_failure = {FailurePolicy::Kind::hold, ""};
    plan = plan_for_api(f.config, *f.api, v, rcpts, args, failed);
    CHECK(plan.quarantine_reason);
    CHECK(plan.add_headers.empty());
    CHECK(plan.delete_headers.size() == 1);
}

TEST_CASE("[loop] configuration") {
    TempDir dir;
    const std::string base = R"(
[milter]
socket = "inet:10025@127.0.0.1"

[routes.acs]
action = "relay"
)";
    dir.write("secrets/loop-key", "0123456789abcdef0123456789abcdef\n");
    ::chmod((dir.path() / "secrets/loop-key").c_str(), 0600);
    auto load = [&](const std::string& loop) {
        return load_config(dir.write("paas-milter.toml", base + loop));
    };
    auto error = [&](const std::string& loop) {
        auto config = load(loop);
        return config ? std::string() : config.error().to_string();
    };

    auto off = load("");
    REQUIRE(off.ok());
    CHECK_FALSE((*off)->loop);

    auto on = load("[loop]\nsecret_file = \"secrets/loop-key\"\n");
    REQUIRE_MESSAGE(on.ok(), (on.ok() ? "" : on.error().to_string()));
    REQUIRE((*on)->loop);
    const LoopSettings& s = *(*on)->loop;
    CHECK(s.secret == "0123456789abcdef0123456789abcdef");
    char host[256] = {};
    REQUIRE(::gethostname(host, sizeof host - 1) == 0);
    CHECK(s.gateway_id == host);
    CHECK(s.max_hops == 1);
    CHECK(s.on_loop == LoopAction::hold);
    CHECK((*on)->warnings.empty());

    auto full = load(
        "[loop]\nsecret_file = \"secrets/loop-key\"\ngateway_id = \"gw-2.contoso\"\n"
        "max_hops = 3\non_loop = \"reject\"\n");
    REQUIRE(full.ok());
    CHECK((*full)->loop->gateway_id == "gw-2.contoso");
    CHECK((*full)->loop->max_hops == 3);
    CHECK((*full)->loop->on_loop == LoopAction::reject);

    // Errors name the file and the line; the secret never appears in them.
    const std::string key = "[loop]\nsecret_file = \"secrets/loop-key\"\n";
    CHECK(contains(error("[loop]\n"), "loop: missing key \"secret_file\""));
    CHECK(contains(error("[loop]\nsecret_file = \"secrets/none\"\n"),
                   "paas-milter.toml:8: loop.secret_file: cannot read"));
    CHECK(contains(error(key + "gateway_id = \"gw 1\"\n"),
                   "paas-milter.toml:9: loop.gateway_id: \"gw 1\" is not"));
    CHECK(contains(error(key + "gateway_id = \"" + std::string(65, 'g') + "\"\n"),
                   "loop.gateway_id: \"ggg"));
    CHECK(contains(error(key + "max_hops = 0\n"), "paas-milter.toml:9: loop.max_hops: 0 is not"));
    CHECK(contains(error(key + "max_hops = 21\n"), "loop.max_hops: 21 is not between 1 and 20"));
    CHECK(contains(error(key + "on_loop = \"drop\"\n"),
                   "paas-milter.toml:9: loop.on_loop: \"drop\" is not hold, pass, reject or "
                   "tempfail"));
    CHECK(contains(error(key + "hops = 2\n"), "paas-milter.toml:9: unknown key \"loop.hops\""));
    auto not_a_table = load_config(dir.write("paas-milter.toml", "loop = 1\n" + base));
    REQUIRE_FALSE(not_a_table.ok());
    CHECK(not_a_table.error().to_string().ends_with("paas-milter.toml:1: loop: expected a table"));
    dir.write("secrets/short", "too-short\n");
    const std::string short_error = error("[loop]\nsecret_file = \"secrets/short\"\n");
    CHECK(contains(short_error, "paas-milter.toml:8: loop.secret_file: the secret is shorter"));
    CHECK_FALSE(contains(short_error, "too-short"));

    // A secret others can read: a warning naming the file and its mode, not the secret.
    ::chmod((dir.path() / "secrets/loop-key").c_str(), 0644);
    auto readable = load(key);
    REQUIRE(readable.ok());
    REQUIRE((*readable)->warnings.size() == 1);
    CHECK(contains((*readable)->warnings[0], "loop.secret_file"));
    CHECK(contains((*readable)->warnings[0], "mode 0644"));
    CHECK_FALSE(contains((*readable)->warnings[0], "0123456789abcdef"));
}

TEST_CASE("loop stamps in a Graph submission: fields at the end of the header section") {
    graph::GraphMimeOptions options;
    options.never_pass_headers = {"X-PaaS-Route", "X-PaaS-Milter-Loop"};
    options.add_fields = {{"X-PaaS-Milter-Loop", "gw=gw2; route=r; hop=1; sig=a"},
                          {"X-PaaS-Milter-Loop", "gw=gw1; route=graph; hop=2; sig=b"}};
    const std::string source =
        "From: a@contoso.test\r\nTo: b@example.net\r\nX-PaaS-Milter-Loop: forged\r\n"
        "Subject: s\r\n\r\nbody\r\n";
    auto prepared = graph::prepare_graph_mime(source, {"b@example.net"}, options);
    REQUIRE(prepared.ok());
    CHECK(prepared->mime ==
          "From: a@contoso.test\r\nTo: b@example.net\r\nSubject: s\r\n"
          "X-PaaS-Milter-Loop: gw=gw2; route=r; hop=1; sig=a\r\n"
          "X-PaaS-Milter-Loop: gw=gw1; route=graph; hop=2; sig=b\r\n\r\nbody\r\n");
}
