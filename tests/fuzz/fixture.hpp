// Tables and a configuration that use every condition, table type and table feature
// (if-blocks, negation, DUNNO, OK, route-naming results). The classify target runs on this
// configuration; the config target's seeds refer to the same tables by relative path.
#pragma once

#include <string_view>

#include "fuzz_util.hpp"

namespace paasmilter::fuzz {

constexpr std::string_view kFixtureConfig = R"toml(
[milter]
socket = "unix:/run/paas-milter/milter.sock"
routing_header = "X-PaaS-Route"
mode = "enforce"
default_route = "local"

[routes.acs-smtp]
action = "relay"
header_value = "acs-smtp"
transport = "acs-relay:[smtp.azurecomm.net]:587"

[routes.exchange-online]
action = "relay"
dry_run = true

[routes.local]
action = "pass"

[routes.blocked]
action = "reject"
reply_code = 554
reply_status = "5.7.1"
reply_text = "Device not allowed"

[routes.later]
action = "tempfail"

[[rules]]
name = "bad-firmware"
header = ["/^X-Mailer: OldScan Firmware 1\\./", "pcre:tables/headers.pcre"]
route = "blocked"

[[rules]]
name = "devices"
client_addr = ["cidr:tables/devices.cidr"]

[[rules]]
name = "inline-networks"
client_addr = ["10.0.0.0/8", "2001:db8::/32", "192.0.2.7", "[2001:db8:ffff::]/48"]
client_name = ["/\\.contoso\\.test$/", "printer.example"]
route = "acs-smtp"

[[rules]]
name = "certificates"
cert_issuer = ["Contoso Device CA", "regexp:tables/issuers.regexp"]
cert_subject = ["regexp:tables/subjects.regexp"]
route = "exchange-online"

[[rules]]
name = "fingerprint"
cert_fingerprint = ["AA:BB:CC", "/^de:ad/"]
route = "later"

[[rules]]
name = "erp"
auth = ["texthash:tables/users.texthash"]
sender = ["erp.contoso.com", "<>", "postmaster@", "@exact.test", "/^bounce-/"]
route = "exchange-online"

[[rules]]
name = "internal"
recipient = ["texthash:tables/recipients.texthash", "contoso.example"]
recipient_match = "all"
route = "local"

[[rules]]
name = "alerts"
recipient = "/^alerts@/"
route = "acs-smtp"
)toml";

inline void write_fixture_tables(const TempDir& dir) {
    dir.write("tables/devices.cidr",
              "192.0.2.99              DUNNO\n"
              "192.0.2.0/24            acs-smtp\n"
              "[2001:db8:10::]/48      acs-smtp\n"
              "if 172.16.0.0/12\n"
              "!172.16.5.0/24          exchange-online\n"
              "172.16.0.0/12           blocked\n"
              "endif\n"
              "if !2001:db8::/32\n"
              "::/0                    later\n"
              "endif\n");
    dir.write("tables/subjects.regexp",
              "/^scanner-[0-9]+\\.contoso\\.test$/  exchange-online\n"
              "if /^lab-/\n"
              "/-a$/                               acs-smtp\n"
              "!/-b$/                              DUNNO\n"
              "endif\n"
              "/^printer-/i                        OK\n");
    dir.write("tables/issuers.regexp", "/Device CA$/ OK\n");
    dir.write("tables/headers.pcre",
              "/^Subject:.*\\[ALERT\\]/             acs-smtp\n"
              "/^X-Mailer: (?:scan|copy)\\d+$/      OK\n"
              "/^From:\\s+\"?Scanner/m              DUNNO\n"
              "/^Subject:.*ünïcödé/                 later\n");
    dir.write("tables/users.texthash",
              "erp-batch   OK\n"
              "scanner     exchange-online\n");
    dir.write("tables/recipients.texthash",
              "contoso.test         OK\n"
              ".corp.contoso.test   OK\n"
              "postmaster@          DUNNO\n"
              "<>                   OK\n");
}

}  // namespace paasmilter::fuzz
