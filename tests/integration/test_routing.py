"""The relay slice end to end: swaks/smtplib -> a real private Postfix -> paas-milter ->
milter_header_checks FILTER -> the smtp-sink the message must arrive at.

Every test asserts where each message actually arrived (which sink, with which envelope and
headers) and what the milter logged for its Postfix queue id.
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

    def decision(self, queue_id: str) -> str:
        """The milter's log line for QUEUE_ID."""
        match = self.milter.wait_for_log(rf"{queue_id}: (.*)")
        return match.group(1)

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
    def test_routed_by_client_ip(self) -> None:
        qid = self.send_ok(local_interface="127.0.0.2", from_="printer@contoso.test",
                           to=["someone@example.net"])
        message = self.assert_arrived(self.acs_sink, qid, mail_from="printer@contoso.test",
                                      rcpt_to=["someone@example.net"])
        self.assertEqual(message.get_all(harness.ROUTING_HEADER), ["acs-smtp"])
        line = self.decision(qid)
        self.assertIn("rule=printers, route=acs-smtp, action=relay", line)
        self.assertIn("client=127.0.0.2", line)
        self.assertIn("from=<printer@contoso.test>, nrcpt=1", line)

    def test_no_match_takes_the_default_relayhost(self) -> None:
        qid = self.send_ok(local_interface="127.0.0.3", to=["someone@example.net"])
        message = self.assert_arrived(self.default_sink, qid)
        self.assertEqual(message.get_all(harness.ROUTING_HEADER), [])
        self.assertIn("rule=(none), route=(none), action=none", self.decision(qid))

    def test_routed_by_cidr_table_with_xclient_addresses(self) -> None:
        # XCLIENT (authorized for 127/8 in the test instance) replays the connection to the
        # milter with the given client address, so the table's real addresses can be used.
        cases = [("192.0.2.7", self.acs_sink, "acs-smtp"),
                 ("198.51.100.20", self.exo_sink, "exchange-online"),
                 ("192.0.2.99", self.default_sink, None),  # DUNNO exception
                 ("IPV6:2001:db8:10::5", self.acs_sink, "acs-smtp"),
                 ("IPV6:2001:db8:11::5", self.default_sink, None)]
        for addr, sink, route in cases:
            with self.subTest(addr=addr):
                self.clear_sinks()
                qid = self.send_ok(xclient={"ADDR": addr}, to=["someone@example.net"])
                message = self.assert_arrived(sink, qid)
                self.assertEqual(message.get_all(harness.ROUTING_HEADER),
                                 [route] if route else [])
                line = self.decision(qid)
                self.assertIn(f"client={addr.removeprefix('IPV6:')}", line)
                if route:
                    self.assertIn(f"devices.cidr:", line)

    def test_routed_by_header(self) -> None:
        qid = self.send_ok(local_interface="127.0.0.3", headers=["Subject: host1 [ALERT] disk full"])
        message = self.assert_arrived(self.acs_sink, qid)
        self.assertEqual(message["Subject"], "host1 [ALERT] disk full")
        self.assertIn("rule=alerts, route=acs-smtp", self.decision(qid))

    def test_client_forged_routing_header_is_removed(self) -> None:
        # Not routed: the forged header must not survive, whatever its case.
        qid = self.send_ok(local_interface="127.0.0.3",
                           headers=["X-PaaS-Route: acs-smtp", "x-paas-route: exchange-online"])
        message = self.assert_arrived(self.default_sink, qid)
        self.assertEqual(message.get_all(harness.ROUTING_HEADER), [], message.raw.decode())
        self.assertIn("removed_client_header=2xX-PaaS-Route", self.decision(qid))

    def test_forged_header_cannot_override_the_decision(self) -> None:
        qid = self.send_ok(local_interface="127.0.0.2",
                           headers=["X-PaaS-Route: exchange-online"])
        message = self.assert_arrived(self.acs_sink, qid)
        self.assertEqual(message.get_all(harness.ROUTING_HEADER), ["acs-smtp"])

    def test_two_messages_in_one_session_are_routed_separately(self) -> None:
        alert = harness.make_message("mon@contoso.test", ["ops@example.net"], "[ALERT] one")
        plain = harness.make_message("mon@contoso.test", ["ops@example.net"], "all fine")
        forged = ("X-PaaS-Route: acs-smtp\r\n").encode() + plain
        results = harness.smtp_session(
            self.postfix.smtpd_port,
            [("mon@contoso.test", ["ops@example.net"], alert),
             ("mon@contoso.test", ["ops@example.net"], forged),
             ("mon@contoso.test", ["ops@example.net"], alert)],
            source_addr="127.0.0.3")
        qids = [r.queue_id for r in results]
        self.assertTrue(all(qids), results)
        for qid in qids:
            self.postfix.wait_for_status(qid, "sent")
        acs = self.acs_sink.wait_for(2)
        default = self.default_sink.wait_for(1)
        self.assertEqual(len(acs), 2)
        self.assertEqual(len(default), 1)
        self.assertEqual(default[0]["Subject"], "all fine")
        self.assertEqual(default[0].get_all(harness.ROUTING_HEADER), [])
        self.assertIn("rule=alerts", self.decision(qids[0]))
        self.assertIn("rule=(none)", self.decision(qids[1]))
        self.assertIn("rule=alerts", self.decision(qids[2]))

    def test_pipelined_client(self) -> None:
        # swaks --pipeline sends MAIL, RCPTs and DATA in one go when the server offers it.
        qid = self.send_ok(local_interface="127.0.0.2", to=["a@example.net", "b@example.net"],
                           extra_args=["--pipeline"])
        self.assert_arrived(self.acs_sink, qid, rcpt_to=["a@example.net", "b@example.net"])

    def test_reject_and_tempfail_routes(self) -> None:
        rejected = self.send(local_interface="127.0.0.3", headers=["X-Mailer: OldScan 1.2"])
        self.assertEqual(rejected.data_code, 550, rejected.transcript)
        self.assertIn("5.7.1 Device not allowed", rejected.data_reply)
        later = self.send(local_interface="127.0.0.3", to=["tech@maintenance.test"])
        self.assertEqual(later.data_code, 451, later.transcript)
        self.assertIn("4.7.1 Maintenance window", later.data_reply)
        self.milter.wait_for_log(r"rule=blocked-firmware, route=blocked, action=reject")
        self.milter.wait_for_log(r"rule=maintenance, route=later, action=tempfail")
        time.sleep(0.5)
        for sink in (self.default_sink, self.acs_sink, self.exo_sink):
            self.assertEqual(sink.messages(), [])
        self.assertEqual(self.postfix.queue(), [])

    def test_pass_route_leaves_the_message_alone(self) -> None:
        qid = self.send_ok(local_interface="127.0.0.3", to=["a@contoso.test", "b@contoso.test"])
        message = self.assert_arrived(self.default_sink, qid)
        self.assertEqual(message.get_all(harness.ROUTING_HEADER), [])
        self.assertIn("rule=internal, route=local, action=pass", self.decision(qid))

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


class CertificateRouting(RoutingTestCase):
    tls = True

    def send_tls(self, cert) -> harness.SwaksResult:
        return harness.swaks(self.postfix.tls_port, local_interface="127.0.0.3", tls=True,
                             tls_cert=cert, to=["someone@example.net"])

    def test_routed_by_verified_certificate_subject(self) -> None:
        ca = self.make_ca()
        for cn, sink, route in [("scanner-7.contoso.test", self.exo_sink, "exchange-online"),
                                ("printer-42.contoso.test", self.acs_sink, "acs-smtp")]:
            with self.subTest(cn=cn):
                self.clear_sinks()
                result = self.send_tls(ca.make_client_cert(cn, org="Contoso"))
                self.assertEqual(result.data_code, 250, result.transcript)
                message = self.assert_arrived(sink, result.queue_id)
                self.assertEqual(message.get_all(harness.ROUTING_HEADER), [route])
                line = self.decision(result.queue_id)
                self.assertIn(f"rule=scanners, route={route}", line)
                self.assertIn(f"cert_subject={cn}", line)

    def test_untrusted_or_missing_certificate_is_not_routed(self) -> None:
        ca = self.make_ca()
        untrusted = self.send_tls(ca.make_client_cert("scanner-7.contoso.test", untrusted=True,
                                                      name="untrusted-scanner"))
        self.assertEqual(untrusted.data_code, 250, untrusted.transcript)
        self.assert_arrived(self.default_sink, untrusted.queue_id)
        self.assertIn("rule=(none)", self.decision(untrusted.queue_id))
        self.clear_sinks()
        plain = self.send_tls(None)
        self.assertEqual(plain.data_code, 250, plain.transcript)
        self.assert_arrived(self.default_sink, plain.queue_id)


class DryRun(RoutingTestCase):
    mode = "dry-run"

    def test_dry_run_logs_but_changes_nothing(self) -> None:
        qid = self.send_ok(local_interface="127.0.0.2", headers=["X-PaaS-Route: acs-smtp"])
        # Not relayed, and even the client's header is left as it was.
        message = self.assert_arrived(self.default_sink, qid)
        self.assertEqual(message.get_all(harness.ROUTING_HEADER), ["acs-smtp"])
        line = self.decision(qid)
        self.assertTrue(line.startswith("dry-run, rule=printers, route=acs-smtp, action=relay"),
                        line)
        # Reject routes only log, too.
        qid = self.send_ok(local_interface="127.0.0.3", headers=["X-Mailer: OldScan 1.0"])
        self.assertIn("dry-run, rule=blocked-firmware, route=blocked, action=reject",
                      self.decision(qid))


if __name__ == "__main__":
    unittest.main(verbosity=2)
