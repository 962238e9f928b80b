"""The relay slice end to end, for what needs code: swaks -> a real private Postfix ->
paas-milter -> milter_header_checks FILTER -> the smtp-sink the message must arrive at, while
the milter is reloaded (SIGHUP, good and broken configurations) or stopped (SIGTERM).

The routing cases themselves (by client address, cidr: table, certificate, header, recipient;
forged headers, reject/tempfail/pass routes, dry-run, one session with several messages) are
data: tests/integration/cases/relay-*/, run by test_cases.py.
"""

from __future__ import annotations

import os
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

ROUTES = """
[routes.acs-smtp]
action = "relay"
transport = "acs-relay:[smtp.azurecomm.net]:587"

[routes.exchange-online]
action = "relay"

[routes.local]
action = "pass"

[routes.blocked]
action = "reject"
reply_text = "Device not allowed"

[routes.later]
action = "tempfail"
reply_text = "Maintenance window"
"""

RULES = """
[[rules]]
name = "printers"
client_addr = ["127.0.0.2", "cidr:devices.cidr"]
route = "acs-smtp"

[[rules]]
name = "scanners"
cert_issuer = ["Test CA"]
cert_subject = ["regexp:certs.regexp"]

[[rules]]
name = "alerts"
header = ["/^Subject:.*\\\\[ALERT\\\\]/"]
route = "acs-smtp"

[[rules]]
name = "blocked-firmware"
header = ["/^X-Mailer: OldScan 1\\\\./"]
route = "blocked"

[[rules]]
name = "maintenance"
recipient = ["maintenance.test"]
route = "later"

[[rules]]
name = "internal"
recipient = ["contoso.test"]
recipient_match = "all"
route = "local"
"""

DEVICES_CIDR = """\
# first match in file order: the DUNNO exception comes before the wider block
192.0.2.99          DUNNO
192.0.2.0/24        acs-smtp
198.51.100.0/24     exchange-online
2001:db8:10::/48    acs-smtp
"""

CERTS_REGEXP = """\
/^scanner-[0-9]+\\.contoso\\.test$/   exchange-online
/^printer-[0-9]+\\.contoso\\.test$/   acs-smtp
"""


class RoutingTestCase(harness.IntegrationTestCase):
    """A private Postfix with three downstream sinks (default relayhost, ACS relay, EXO
    relay) and paas-milter on the configuration above."""

    mode = "enforce"
    tls = False

    def setUp(self) -> None:
        if not harness.milter_binary():
            self.skipTest("PAAS_MILTER_BIN unset or not an executable")
        self.default_sink = self.start_sink("default")
        self.acs_sink = self.start_sink("acs")
        self.exo_sink = self.start_sink("exo")
        self.milter_port = harness.free_port()
        self.write_config("devices.cidr", DEVICES_CIDR)
        self.write_config("certs.regexp", CERTS_REGEXP)
        self.milter = self.start_milter(self.milter_port, self.config_text())
        self.postfix = self.start_postfix(
            default_sink=self.default_sink, tls=self.tls, milter_port=self.milter_port,
            routes={"acs-smtp": ("acs-relay", self.acs_sink.port),
                    "exchange-online": ("exo-relay", self.exo_sink.port)},
            # clients impersonated with XCLIENT must still be allowed to relay
            main_cf={"mynetworks": "127.0.0.0/8 [::1]/128 192.0.2.0/24 198.51.100.0/24 "
                                   "[2001:db8::]/32"})

    def config_text(self, rules: str = RULES, **milter_keys) -> str:
        milter_keys.setdefault("mode", self.mode)
        return harness.milter_config(self.milter_port, ROUTES + rules, **milter_keys)

    # -- helpers ---------------------------------------------------------------------------
    def send(self, **kw) -> harness.SwaksResult:
        result = harness.swaks(self.postfix.smtpd_port, **kw)
        return result

    def send_ok(self, **kw) -> str:
        result = self.send(**kw)
        self.assertEqual(result.data_code, 250, result.transcript)
        self.assertTrue(result.queue_id, result.transcript)
        return result.queue_id

    def assert_arrived(self, sink: harness.Sink, queue_id: str, *, others_empty: bool = True,
                       **expected) -> harness.SinkMessage:
        """Exactly one message, the one whose Postfix queue id is QUEUE_ID, reached SINK
        (and none reached the other sinks)."""
        self.postfix.wait_for_status(queue_id, "sent")
        messages = sink.wait_for(1)
        self.assertEqual(len(messages), 1, sink.describe())
        message = messages[0]
        self.assertIn(queue_id, message.get_all("Received")[0])
        for key, value in expected.items():
            self.assertEqual(getattr(message, key), value)
        if others_empty:
            for other in (self.default_sink, self.acs_sink, self.exo_sink):
                if other is not sink:
                    self.assertEqual(other.messages(), [], f"unexpected mail at {other.name}")
        return message

    def clear_sinks(self) -> None:
        for sink in (self.default_sink, self.acs_sink, self.exo_sink):
            sink.clear()


class RelayRouting(RoutingTestCase):
    def test_sighup_reloads_and_a_broken_config_keeps_routing(self) -> None:
        config_path = self.milter.config_path
        good = open(config_path).read()
        # 1. A broken configuration is refused; the running one stays in force.
        broken = good.replace('route = "acs-smtp"\n', 'route = "no-such-route"\n', 1)
        self.assertNotEqual(broken, good)
        with open(config_path, "w") as f:
            f.write(broken)
        mark = self.milter.log_mark()
        self.milter.reload()
        self.milter.wait_for_log(r"reload refused, the running configuration stays in force: "
                                 r".*paas-milter\.toml:\d+: .*unknown route \"no-such-route\"",
                                 since=mark)
        qid = self.send_ok(local_interface="127.0.0.2")
        self.assert_arrived(self.acs_sink, qid)

        # 2. A valid new configuration takes effect: 127.0.0.2 now goes to Exchange Online.
        self.clear_sinks()
        with open(config_path, "w") as f:
            f.write(good.replace('client_addr = ["127.0.0.2", "cidr:devices.cidr"]\nroute = '
                                 '"acs-smtp"',
                                 'client_addr = ["127.0.0.2", "cidr:devices.cidr"]\nroute = '
                                 '"exchange-online"'))
        mark = self.milter.log_mark()
        self.milter.reload()
        self.milter.wait_for_log(r"configuration reloaded", since=mark)
        qid = self.send_ok(local_interface="127.0.0.2")
        message = self.assert_arrived(self.exo_sink, qid)
        self.assertEqual(message.get_all(harness.ROUTING_HEADER), ["exchange-online"])

        # 3. A broken table is refused as well.
        self.write_config("devices.cidr", DEVICES_CIDR + "10.0.0.0/33 acs-smtp\n")
        mark = self.milter.log_mark()
        self.milter.reload()
        self.milter.wait_for_log(r"reload refused.*devices\.cidr:6:", since=mark)

    def test_sigterm_stops_cleanly(self) -> None:
        start = time.monotonic()
        self.assertEqual(self.milter.stop(), 0, self.milter.log())
        self.assertLess(time.monotonic() - start, 5)  # generous; not a performance check
        self.assertIn("stopped", self.milter.log())
        # With the milter gone, Postfix applies milter_default_action = tempfail.
        result = self.send(local_interface="127.0.0.2")
        self.assertEqual(result.first_error[0] // 100, 4, result.transcript)
        self.assertEqual(self.acs_sink.messages() + self.default_sink.messages(), [])


if __name__ == "__main__":
    unittest.main(verbosity=2)
