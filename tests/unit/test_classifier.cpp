#include <doctest/doctest.h>

#include <string>

#include "paasmilter/classifier.hpp"
#include "paasmilter/verdict.hpp"
#include "temp_dir.hpp"

using namespace paasmilter;
using paasmilter::testing::TempDir;

namespace {

// A configuration exercising every condition type, inline and from tables.
struct Fixture {
    TempDir dir;
    std::shared_ptr<const Config> config;

    explicit Fixture(const std::string& milter_extra = "") {
        dir.write("tables/devices.cidr",
                  "# printers\n"
                  "192.0.2.99      DUNNO\n"
                  "192.0.2.0/24    acs\n"
                  "198.51.100.0/24 exo\n"
                  "2001:db8:10::/48 acs\n");
        dir.write("tables/certs.regexp",
                  "/^scanner-[0-9]+\\.contoso\\.test$/ exo\n"
                  "/^printer-[0-9]+\\.contoso\\.test$/ acs\n");
        dir.write("tables/senders.texthash", "alerts@monitoring.test OK\n");
        std::string text = R"(
[milter]
socket = "inet:10025@127.0.0.1"
)" + milter_extra + R"(
[routes.acs]
action = "relay"
[routes.exo]
action = "relay"
header_value = "exchange-online"
[routes.keep]
action = "pass"
[routes.block]
action = "reject"
reply_text = "Not from here"
[routes.later]
action = "tempfail"
[routes.trial]
action = "relay"
dry_run = true

[[rules]]
name = "blocked-client"
client_addr = "203.0.113.66"
route = "block"

[[rules]]
name = "devices"
client_addr = ["cidr:tables/devices.cidr"]

[[rules]]
name = "certificates"
cert_issuer = ["Test CA", "/^Contoso Device CA/"]
cert_subject = ["regexp:tables/certs.regexp"]

[[rules]]
name = "erp"
auth = ["erp-batch"]
sender = ["erp.contoso.test"]
route = "exo"

[[rules]]
name = "alerts"
sender = ["texthash:tables/senders.texthash"]
header = ["/^Subject:.*\\[ALERT\\]/"]
route = "acs"

[[rules]]
name = "all-internal"
recipient = ["internal.test"]
recipient_match = "all"
route = "keep"

[[rules]]
name = "any-partner"
recipient = ["partner.test"]
route = "later"

[[rules]]
name = "trial"
client_name = ["/\\.trial\\.test$/"]
route = "trial"
)";
        auto loaded = load_config(dir.write("paas-milter.toml", text));
        REQUIRE_MESSAGE(loaded.ok(), (loaded.ok() ? "" : loaded.error().to_string()));
        config = *loaded;
    }

    Decision classify(const Transaction& tx) const { return paasmilter::classify(*config, tx); }
};

std::string route_of(const Decision& d) {
    return d.route ? d.route->name : "(none)";
}
std::string rule_of(const Decision& d) {
    return d.rule ? d.rule->name : "(none)";
}

Transaction from_client(std::string addr) {
    Transaction tx;
    tx.client_addr = std::move(addr);
    tx.sender = "device@contoso.test";
    tx.recipients = {"someone@example.net"};
    return tx;
}

}  // namespace

TEST_CASE("client address rules use the table's route, first match in file order") {
    Fixture f;
    CHECK(route_of(f.classify(from_client("192.0.2.7"))) == "acs");
    CHECK(rule_of(f.classify(from_client("192.0.2.7"))) == "devices");
    CHECK(route_of(f.classify(from_client("198.51.100.200"))) == "exo");
    CHECK(route_of(f.classify(from_client("2001:db8:10:ffff::1"))) == "acs");
    // DUNNO carves an exception out of the /24: no rule matches, the message is left alone.
    CHECK(route_of(f.classify(from_client("192.0.2.99"))) == "(none)");
    CHECK(rule_of(f.classify(from_client("192.0.2.99"))) == "(none)");
    CHECK(route_of(f.classify(from_client("10.0.0.1"))) == "(none)");
    CHECK(route_of(f.classify(from_client(""))) == "(none)");
}

TEST_CASE("rule order: the first rule whose conditions all hold wins") {
    Fixture f;
    // 203.0.113.66 is blocked by the first rule even though other rules could match.
    Transaction tx = from_client("203.0.113.66");
    tx.auth_user = "erp-batch";
    tx.sender = "batch@erp.contoso.test";
    CHECK(rule_of(f.classify(tx)) == "blocked-client");
    tx.client_addr = "203.0.113.67";
    CHECK(rule_of(f.classify(tx)) == "erp");
    CHECK(route_of(f.classify(tx)) == "exo");
}

TEST_CASE("certificate rules need every condition and take the route from the table") {
    Fixture f;
    Transaction tx = from_client("10.9.9.9");
    tx.cert_subject = "printer-42.contoso.test";
    CHECK(route_of(f.classify(tx)) == "(none)");  // no issuer: the rule does not hold
    tx.cert_issuer = "Test CA";
    CHECK(route_of(f.classify(tx)) == "acs");
    tx.cert_subject = "SCANNER-7.contoso.test";  // regexp tables are case-insensitive
    CHECK(route_of(f.classify(tx)) == "exo");
    tx.cert_issuer = "Another CA";
    CHECK(route_of(f.classify(tx)) == "(none)");
    tx.cert_issuer = "Contoso Device CA 2";  // inline regex entry
    CHECK(route_of(f.classify(tx)) == "exo");

    SUBCASE("Sendmail's full DNs match by their CN") {
        tx.cert_subject = "/C=DE/O=Contoso/CN=printer-1.contoso.test";
        tx.cert_issuer = "/C=DE/O=Contoso/CN=Test CA";
        CHECK(route_of(f.classify(tx)) == "acs");
    }
    SUBCASE("decision records why") {
        Decision d = f.classify(tx);
        REQUIRE(d.hits.size() == 2);
        CHECK(d.hits[0].field == Field::cert_subject);
        CHECK(d.hits[0].result == "exo");
        CHECK(d.hits[0].where.find("certs.regexp:1") != std::string::npos);
        CHECK(d.hits[1].field == Field::cert_issuer);
        CHECK(d.hits[1].result == "");
    }
}

TEST_CASE("SASL login and envelope sender domains") {
    Fixture f;
    Transaction tx = from_client("10.1.1.1");
    tx.auth_user = "erp-batch";
    tx.sender = "reports@erp.contoso.test";
    CHECK(rule_of(f.classify(tx)) == "erp");
    tx.sender = "reports@eu.erp.contoso.test";  // subdomains match, as in access(5)
    CHECK(rule_of(f.classify(tx)) == "erp");
    tx.sender = "reports@erp.contoso.test.evil.example";
    CHECK(rule_of(f.classify(tx)) == "(none)");
    tx.sender = "reports@erp.contoso.test";
    tx.auth_user = "ERP-BATCH";  // case-insensitive
    CHECK(rule_of(f.classify(tx)) == "erp");
    tx.auth_user = "";
    CHECK(rule_of(f.classify(tx)) == "(none)");
}

TEST_CASE("header conditions match unfolded header lines") {
    Fixture f;
    Transaction tx = from_client("10.1.1.1");
    tx.sender = "alerts@monitoring.test";
    tx.headers = {{"From", "Monitor <alerts@monitoring.test>"}, {"Subject", "disk full"}};
    CHECK(rule_of(f.classify(tx)) == "(none)");
    tx.headers.push_back({"Subject", "host1\r\n\t[ALERT] disk full"});
    CHECK(rule_of(f.classify(tx)) == "alerts");
    CHECK(route_of(f.classify(tx)) == "acs");
    tx.sender = "other@monitoring.test";  // the sender condition must hold too
    CHECK(rule_of(f.classify(tx)) == "(none)");
}

TEST_CASE("header lines are unfolded: every CR and LF dropped, wherever it is") {
    TempDir dir;
    auto loaded = load_config(dir.write("paas-milter.toml", R"(
[milter]
socket = "inet:10025@127.0.0.1"
[routes.r]
action = "relay"
[[rules]]
name = "h"
header = ["/^X-Test: /"]
route = "r"
)"));
    REQUIRE_MESSAGE(loaded.ok(), (loaded.ok() ? "" : loaded.error().to_string()));
    const std::string long_value =
        "0123456\r\n\t89abcdef0123456\r\n"
        " 7\n\n89abcdefXYZ\r";
    const std::vector<std::pair<std::string, std::string>> cases = {
        {"", ""},
        {"a", "a"},
        {"a\r\n\tb", "a\tb"},
        {"\r\n", ""},
        {"x\ry\nz", "xyz"},
        {"\n\n\n", ""},
        {"01234567\r\n 89", "01234567 89"},  // a break right after an 8-byte block
        {long_value, "0123456\t89abcdef0123456 789abcdefXYZ"},
    };
    for (const auto& [value, unfolded] : cases) {
        Transaction tx = from_client("10.1.1.1");
        tx.headers = {{"From", "a@b"}, {"X-Test", value}};
        const Decision decision = paasmilter::classify(**loaded, tx);
        CAPTURE(value);
        REQUIRE(rule_of(decision) == "h");
        REQUIRE(decision.hits.size() == 1);
        CHECK(decision.hits.front().key == "X-Test: " + unfolded);
    }
}

TEST_CASE("recipient_match any and all") {
    Fixture f;
    Transaction tx = from_client("10.1.1.1");
    tx.recipients = {"a@internal.test", "b@sub.internal.test"};
    CHECK(rule_of(f.classify(tx)) == "all-internal");
    tx.recipients.push_back("c@partner.test");
    CHECK(rule_of(f.classify(tx)) == "any-partner");
    tx.recipients = {"c@elsewhere.test"};
    CHECK(rule_of(f.classify(tx)) == "(none)");
    tx.recipients.clear();
    CHECK(rule_of(f.classify(tx)) == "(none)");
}

TEST_CASE("default route applies only when no rule matches") {
    Fixture f("default_route = \"exo\"\n");
    Decision d = f.classify(from_client("10.0.0.1"));
    CHECK(route_of(d) == "exo");
    CHECK(d.default_route);
    CHECK(d.rule == nullptr);
    CHECK(route_of(f.classify(from_client("192.0.2.1"))) == "acs");
}

TEST_CASE("verdicts") {
    Fixture f;
    SUBCASE("relay adds the routing header and removes forged ones") {
        Decision d = f.classify(from_client("198.51.100.1"));
        Verdict v = decide_verdict(*f.config, d, 2);
        CHECK(v.reply == Verdict::Reply::accept);
        CHECK(v.add_routing_header);
        CHECK(v.routing_header == "X-PaaS-Route");
        CHECK(v.routing_value == "exchange-online");
        CHECK(v.forged_headers_to_delete == 2);
        CHECK_FALSE(v.dry_run);
        std::string line = format_decision_log(from_client("198.51.100.1"), d, v);
        CHECK(line.find("rule=devices, route=exo, action=relay, header=X-PaaS-Route: "
                        "exchange-online, removed_client_header=2xX-PaaS-Route, "
                        "client=198.51.100.1") == 0);
        CHECK(line.find("match=[client_addr=198.51.100.1@") != std::string::npos);
    }
    SUBCASE("no match still removes forged headers") {
        Decision d = f.classify(from_client("10.0.0.1"));
        Verdict v = decide_verdict(*f.config, d, 1);
        CHECK_FALSE(v.add_routing_header);
        CHECK(v.forged_headers_to_delete == 1);
        CHECK(v.outcome == "none");
    }
    SUBCASE("reject and tempfail carry their replies") {
        Decision d = f.classify(from_client("203.0.113.66"));
        Verdict v = decide_verdict(*f.config, d, 0);
        CHECK(v.reply == Verdict::Reply::reject);
        CHECK(v.reply_code == 550);
        CHECK(v.reply_status == "5.7.1");
        CHECK(v.reply_text == "Not from here");
        Transaction tx = from_client("10.0.0.1");
        tx.recipients = {"x@partner.test"};
        v = decide_verdict(*f.config, f.classify(tx), 0);
        CHECK(v.reply == Verdict::Reply::tempfail);
        CHECK(v.reply_code == 451);
        CHECK(v.reply_status == "4.7.1");
    }
    SUBCASE("route dry_run logs only") {
        Transaction tx = from_client("10.0.0.1");
        tx.client_name = "box.trial.test";
        Decision d = f.classify(tx);
        Verdict v = decide_verdict(*f.config, d, 0);
        CHECK(v.dry_run);
        CHECK(format_decision_log(tx, d, v).find("dry-run, rule=trial") == 0);
    }
    SUBCASE("global dry-run mode") {
        Fixture dry("mode = \"dry-run\"\n");
        Verdict v = decide_verdict(*dry.config, dry.classify(from_client("192.0.2.1")), 0);
        CHECK(v.dry_run);
        CHECK(v.add_routing_header);  // what would have been done is still reported
    }
    SUBCASE("query report") {
        Transaction client = from_client("192.0.2.1");
        Decision d = f.classify(client);
        std::string report = format_query_report(d, decide_verdict(*f.config, d, 0), client);
        CHECK(report.find("rule: devices (") == 0);
        CHECK(report.find("route: acs\naction: relay\nheader: X-PaaS-Route: acs\n") !=
              std::string::npos);
        CHECK(report.find("matched: client_addr \"192.0.2.1\" by cidr:") != std::string::npos);
        CHECK(report.find("-> acs") != std::string::npos);
    }
}

TEST_CASE("client-supplied text is sanitized in log lines") {
    Fixture f;
    Transaction tx = from_client("10.0.0.1");
    tx.sender = std::string("evil\r\nfake: line\0x", 18);
    Decision d = f.classify(tx);
    std::string line = format_decision_log(tx, d, decide_verdict(*f.config, d, 0));
    CHECK(line.find('\n') == std::string::npos);
    CHECK(line.find('\r') == std::string::npos);
    CHECK(line.find("from=<evil\\x0d\\x0afake: line\\x00x>") != std::string::npos);
}

TEST_CASE("helpers") {
    CHECK(strip_angle_brackets("<a@b.c>") == "a@b.c");
    CHECK(strip_angle_brackets(" <> ") == "");
    CHECK(strip_angle_brackets("a@b.c") == "a@b.c");
    CHECK(common_name_from_dn("/C=US/O=Contoso/CN=printer-42/emailAddress=x@y") == "printer-42");
    CHECK(common_name_from_dn("/C=US/O=Contoso") == "");
}
