// `paas-milter postfix-config`: the main.cf lines, master.cf transports and tables generated
// for the configured routes.
#include <doctest/doctest.h>

#include <string>
#include <vector>

#include "config_fixture.hpp"
#include "paasmilter/config.hpp"
#include "paasmilter/postfix_check.hpp"
#include "paasmilter/postfix_config.hpp"
#include "temp_dir.hpp"

using namespace paasmilter;
using paasmilter::testing::block;
using paasmilter::testing::has;
using paasmilter::testing::load;
using paasmilter::testing::TempDir;

namespace {

const std::string kConfig = R"(
[milter]
socket = "inet:10025@127.0.0.1"
internal_domains = ["contoso.test"]

[routes.acs-smtp]
action = "relay"
transport = "acs-relay:[smtp.azurecomm.net]:587"
external_only = true
sender_rewrite = { "contoso.local" = "contoso.com" }
recipient_rewrite = { "fabrikam.local" = "fabrikam.com" }

[routes.exchange-online]
action = "relay"
transport = "exo-relay:[contoso-com.mail.protection.outlook.com]:25"

[routes.plain]
action = "relay"

[routes.block]
action = "reject"
)";

}  // namespace

TEST_CASE("postfix-config: milter.socket as Postfix writes it") {
    std::string note;
    CHECK(postfix_milter_socket("inet:10025@127.0.0.1", &note) == "inet:127.0.0.1:10025");
    CHECK(note.empty());
    CHECK(postfix_milter_socket("inet6:10025@::1") == "inet:[::1]:10025");
    CHECK(postfix_milter_socket("inet:10025", &note) == "inet:127.0.0.1:10025");
    CHECK(has(note, "no host"));
    note.clear();
    CHECK(postfix_milter_socket("unix:/var/spool/postfix/paas-milter/milter.sock", &note) ==
          "unix:/paas-milter/milter.sock");
    CHECK(has(note, "chrooted"));
    CHECK(postfix_milter_socket("unix:/run/paas-milter.sock", &note) ==
          "unix:/run/paas-milter.sock");
    CHECK(has(note, "cannot reach"));
    CHECK(transport_name("acs-relay:[smtp.azurecomm.net]:587") == "acs-relay");
}

TEST_CASE("postfix-config: main.cf, master.cf and the tables for the routes") {
    TempDir dir;
    auto config = load(dir, kConfig);
    PostfixConfigOptions options;
    options.table_directory = "/etc/postfix/";
    const std::string out = render_postfix_config(*config, options);

    const std::string main_cf = block(out, "main.cf");
    CHECK(has(main_cf, "smtpd_milters = inet:127.0.0.1:10025\n"));
    CHECK(has(main_cf, "milter_default_action = tempfail\n"));
    CHECK(has(main_cf, "milter_header_checks = pcre:/etc/postfix/milter_header_checks\n"));
    CHECK(has(main_cf, "transport_maps = pcre:/etc/postfix/paas_route_transport\n"));

    const std::string master = block(out, "master.cf");
    CHECK(has(master,
              "acs-relay unix  -       -       y       -       -       smtp\n"
              "  -o syslog_name=postfix/acs-relay\n"
              "  -o smtp_generic_maps=pcre:/etc/postfix/paas_route_generic_acs-relay\n"));
    // No rewrite, not external_only: an entry without generic maps.
    CHECK(has(master,
              "exo-relay unix  -       -       y       -       -       smtp\n"
              "  -o syslog_name=postfix/exo-relay\n"));
    CHECK_FALSE(has(master, "paas_route_generic_exo-relay"));
    CHECK(has(out, "# NOTE: route plain has no transport"));

    CHECK(block(out, "/etc/postfix/paas_route_transport") ==
          "# transport_maps for the external_only routes (paas-milter postfix-config)\n"
          "# route acs-smtp: its external recipients, in acs-smtp.paas-route.invalid\n"
          "/[.@]acs-smtp\\.paas-route\\.invalid$/ acs-relay:[smtp.azurecomm.net]:587\n");
    const std::string generic = block(out, "/etc/postfix/paas_route_generic_acs-relay");
    CHECK(has(generic,
              "/^(.*)@fabrikam\\.local\\.acs-smtp\\.paas-route\\.invalid$/ ${1}@fabrikam.com\n"
              "/^(.*)@(.+)\\.acs-smtp\\.paas-route\\.invalid$/ ${1}@${2}\n"
              "/^\"(.*@\\[[^]]*\\])\"@acs-smtp\\.paas-route\\.invalid$/ ${1}\n"));
    CHECK(has(generic,
              "/^(.*)@contoso\\.local$/ ${1}@contoso.com\n"
              "/^(.*)@fabrikam\\.local$/ ${1}@fabrikam.com\n"));
    const std::string checks = block(out, "/etc/postfix/milter_header_checks");
    CHECK(has(checks, "FILTER exo-relay:[contoso-com.mail.protection.outlook.com]:25"));
    CHECK(block(out, "/etc/postfix/paas_route_generic_exo-relay").empty());
}

TEST_CASE("postfix-config: only external_only routes, shared and built-in transports") {
    TempDir dir;
    auto config = load(dir, R"(
[milter]
socket = "unix:/var/spool/postfix/paas-milter/milter.sock"

[routes.a]
action = "relay"
transport = "shared-relay:[192.0.2.1]:25"
external_only = true
internal_domains = ["contoso.test"]
sender_rewrite = { "x.local" = "x.com" }

[routes.b]
action = "relay"
transport = "shared-relay:[192.0.2.2]:25"
sender_rewrite = { "x.local" = "y.com" }

[routes.c]
action = "relay"
transport = "smtp:[192.0.2.3]:25"
recipient_rewrite = { "z.local" = "z.com" }
)");
    const std::string out = render_postfix_config(*config, {});
    CHECK(has(block(out, "main.cf"), "smtpd_milters = unix:/paas-milter/milter.sock\n"));
    // route a and b share a transport: one generic map, the conflict named.
    CHECK(has(out,
              "# NOTE: transport shared-relay: route a rewrites x.local to x.com, route b "
              "to y.com"));
    const std::string generic = block(out, "/etc/postfix/paas_route_generic_shared-relay");
    CHECK(has(generic, "/^(.*)@x\\.local$/ ${1}@x.com\n"));
    CHECK_FALSE(has(generic, "y.com"));
    // "smtp" is everybody's transport: no generic maps on it, only advice.
    CHECK(has(out, "# NOTE: transport smtp (route c) is a service other mail uses too"));
    CHECK_FALSE(has(block(out, "master.cf"), "\nsmtp unix"));
    CHECK(block(out, "/etc/postfix/paas_route_generic_smtp").empty());
}

TEST_CASE("check: an external_only route needs its pseudo-domain in transport_maps") {
    TempDir dir;
    auto config = load(dir, kConfig);
    PostfixFacts facts;
    facts.smtpd_milters = "inet:127.0.0.1:10025";
    const auto issues = [&](WiringIssue kind) {
        std::vector<std::string> found;
        for (const WiringWarning& warning : check_postfix_wiring(*config, facts)) {
            if (warning.kind == kind) found.push_back(warning.message);
        }
        return found;
    };
    auto missing = issues(WiringIssue::transport_map_missing);
    REQUIRE(missing.size() == 1);
    CHECK(has(missing[0], "route \"acs-smtp\""));
    CHECK(has(missing[0], "transport_maps is empty"));
    CHECK(has(missing[0],
              "/[.@]acs-smtp\\.paas-route\\.invalid$/ acs-relay:[smtp.azurecomm.net]:587"));
    // An external_only route adds no header: no milter_header_checks warning for it.
    for (const std::string& message : issues(WiringIssue::header_check_missing)) {
        CHECK_FALSE(has(message, "acs-smtp"));
    }
    // paas-milter must be the last milter: it re-adds the recipients it saw at RCPT.
    CHECK(issues(WiringIssue::milter_not_last).empty());
    facts.smtpd_milters = "inet:127.0.0.1:10025, inet:127.0.0.1:8891";
    auto not_last = issues(WiringIssue::milter_not_last);
    REQUIRE(not_last.size() == 1);
    CHECK(has(not_last[0], "lists \"inet:127.0.0.1:8891\" after paas-milter"));
    facts.smtpd_milters = "inet:127.0.0.1:8891, inet:127.0.0.1:10025";
    CHECK(issues(WiringIssue::milter_not_last).empty());
    facts.smtpd_milters = "inet:127.0.0.1:10025";

    // What postfix-config generates is right by construction.
    facts.transport_maps = "pcre:/etc/postfix/paas_route_transport";
    facts.transport_tables = {{facts.transport_maps, render_route_transport_map(*config)}};
    CHECK(issues(WiringIssue::transport_map_missing).empty());
    CHECK(issues(WiringIssue::transport_map_mismatch).empty());

    facts.transport_tables = {{facts.transport_maps, "/\\.invalid$/ error:nope\n"}};
    auto mismatch = issues(WiringIssue::transport_map_mismatch);
    REQUIRE(mismatch.size() == 1);
    CHECK(has(mismatch[0], "to \"error:nope\""));

    facts.transport_tables = {{facts.transport_maps, "/^other$/ smtp:\n"}};
    CHECK(issues(WiringIssue::transport_map_missing).size() == 1);

    // An indexed table first might hold the line: not judged.
    facts.transport_maps = "hash:/etc/postfix/transport, pcre:/x";
    facts.transport_tables = {{"hash:/etc/postfix/transport", std::nullopt},
                              {"pcre:/x", "/^other$/ smtp:\n"}};
    CHECK(issues(WiringIssue::transport_map_missing).empty());
}
