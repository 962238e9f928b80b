"""Relay routes in front of a real Sendmail 8.17 (milter.mta = "sendmail"): swaks -> Sendmail
(podman, host network, loopback) -> paas-milter (on the host), with smtp-sinks on the host as
the next hops. Sendmail has no milter_header_checks: the milter puts each recipient of a relay
route into the route's pseudo-domain (bob@example.net -> bob@example.net.acs-smtp.paas-route.
invalid, ORCPT=rfc822;bob@example.net), and what `paas-milter sendmail-config` prints -- pasted
unchanged into the test's sendmail.mc and mailertable -- sends that domain to a mailer of the
route's own, whose recipient ruleset gives every recipient its own address back.

Shown here, each through the real Sendmail:

* each relay route's mail reaches that route's sink, with the original recipients in RCPT TO
  (and their ORCPT), the route's sender_rewrite/recipient_rewrite applied to the envelope and
  the header fields, and nothing else arrives there; unrouted mail goes to the smart host;
* an external_only route sends only the external recipients, the internal ones take Sendmail's
  normal path, from the one queue file;
* a client cannot pick its route: a RCPT TO naming a pseudo-domain is refused, a client's own
  X-PaaS-Route header is removed and changes nothing;
* an API route's relay fallback (on_failure = "relay:acs-smtp", the ACS double answering 500)
  reaches the relay route's sink, recipients in local_domains staying on the normal path;
* with Sendmail's relay checks on (no promiscuous_relay), the recipients the milter adds in a
  pseudo-domain are not refused: Sendmail runs check_rcpt only on the client's own RCPT
  commands (sendmail/milter.c, milter_addrcpt_par: parseaddr() and recipient() only).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sendmail_harness as sh  # noqa: E402  (puts tests/integration on sys.path)
from sendmail_harness import harness  # noqa: E402
from mock_acs import MockAcs  # noqa: E402

ROUTES = """
[routes.acs-smtp]
action = "relay"
transport = "acs-relay:[127.0.0.1]:{acs_port}"
sender_rewrite = {{ "contoso.local" = "contoso.test" }}
recipient_rewrite = {{ "fabrikam.local" = "fabrikam.test" }}

[routes.exo]
action = "relay"
transport = "exo-relay:[127.0.0.1]:{exo_port}"
external_only = true

[routes.acs-api]
action = "api"
connection_string_file = "acs.conn"
ca_file = "{ca_file}"
sender = "DoNotReply@contoso.azurecomm.test"
verified_domains = ["contoso.test"]
local_domains = ["local.test"]
spool_directory = "{spool}"
time_budget = 20
request_timeout = 5
max_attempts = 1
on_failure = "relay:acs-smtp"

[[rules]]
name = "printers"
client_addr = ["127.0.0.2"]
route = "acs-smtp"

[[rules]]
name = "scanners"
client_addr = ["127.0.0.3"]
route = "exo"

[[rules]]
name = "devices"
client_addr = ["127.0.0.4"]
route = "acs-api"
"""

# `sendmail-config --table-dir` for the test's directory, as the container sees it
TABLE_DIR = sh.CONTAINER_DIR
BEFORE = "sendmail.mc (before the MAILER() lines)"
AFTER = "sendmail.mc (after the MAILER() lines)"


def blocks(output: str) -> dict[str, str]:
    """The "# ==== TARGET ====" blocks of `paas-milter sendmail-config`."""
    parts = re.split(r"^# ==== (.*) ====\n", output, flags=re.M)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts), 2)}


class PastedSendmail(sh.Sendmail):
    """sh.Sendmail with what `paas-milter sendmail-config` printed pasted in: its first
    sendmail.mc block where the harness puts extra lines (before the MAILER() lines), its
    second after the MAILER() lines, its mailertable as written (comments and all) and hashed
    with makemap. With RELAY_DOMAINS, Sendmail's relay checks are on: no promiscuous_relay,
    relaying only to those domains."""

    def __init__(self, workdir: str, *, generated: dict[str, str],
                 relay_domains: list[str] | None = None, **kw):
        self.generated = generated
        self.relay_domains = relay_domains
        super().__init__(workdir, milter_port=None, mc_extra=generated[BEFORE], **kw)

    def mc_text(self) -> str:
        text = super().mc_text()
        if self.relay_domains is not None:
            promiscuous = "FEATURE(`promiscuous_relay')dnl\n"
            assert promiscuous in text
            text = text.replace(promiscuous, "".join(f"RELAY_DOMAIN(`{d}')dnl\n"
                                                     for d in self.relay_domains))
        return text + self.generated.get(AFTER, "")

    def _write_files(self) -> None:
        super()._write_files()
        table = self.generated.get(f"{TABLE_DIR}/mailertable")
        if table is not None:
            self._write("mailertable", table)

    def start_script(self) -> str:
        script = super().start_script()
        if f"{TABLE_DIR}/mailertable" in self.generated:
            script = script.replace("m4 sendmail.mc > sendmail.cf\n",
                                    "m4 sendmail.mc > sendmail.cf\n"
                                    "makemap hash mailertable < mailertable\n", 1)
        return script


class SendmailRelayCase(sh.SendmailTestCase):
    relay_domains: list[str] | None = None

    def setUp(self) -> None:
        self.mock = MockAcs(verified_domains=("contoso.test", "contoso.azurecomm.test"))
        self.mock.start()
        self.addCleanup(self.mock.stop)
        self.default_sink = self.start_sink("default")
        self.acs_sink = self.start_sink("acs")
        self.exo_sink = self.start_sink("exo")
        self.sinks = [self.default_sink, self.acs_sink, self.exo_sink]
        port = harness.free_port()
        self.write_config("acs.conn", self.mock.connection_string + "\n")
        spool = os.path.join(self.workdir(), "spool")
        os.makedirs(spool)
        body = ROUTES.format(acs_port=self.acs_sink.port, exo_port=self.exo_sink.port,
                             ca_file=self.mock.ca_file, spool=spool)
        text = harness.milter_config(port, body, mta="sendmail",
                                     internal_domains=["contoso.test", "local.test"])
        self.milter = self.start_milter(port, text)
        config = os.path.join(self.workdir(), "paas-milter.toml")
        proc = subprocess.run([harness.milter_binary(), "sendmail-config", "-c", config,
                               "--table-dir", TABLE_DIR], capture_output=True, text=True,
                              timeout=30)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.generated = blocks(proc.stdout)
        self.assertIn(f"{TABLE_DIR}/mailertable", self.generated, proc.stdout)
        self.sendmail = PastedSendmail(self.workdir(), generated=self.generated,
                                       relay_domains=self.relay_domains,
                                       smart_host_port=self.default_sink.port)
        self.addCleanup(self._check_sendmail_log_for_secrets, self.sendmail)
        self._track(self.sendmail)
        self.sendmail.start()

    def send(self, client: str, to: list[str], **kw) -> harness.SwaksResult:
        kw.setdefault("from_", "scanner@contoso.test")
        return harness.swaks(self.sendmail.port, local_interface=client, to=to, timeout=60,
                             **kw)

    def accepted(self, result: harness.SwaksResult) -> str:
        self.assertEqual(result.data_code, 250, result.transcript)
        qid = sh.queue_id(result)
        self.assertIsNotNone(qid, result.data_reply)
        return qid

    def decision(self, qid: str) -> str:
        return self.milter.wait_for_log(rf"{qid}: (rule=.*)", timeout=40).group(1)

    def assert_only(self, sink: harness.Sink, count: int = 1) -> list[harness.SinkMessage]:
        """COUNT messages arrive at SINK and nothing at the other sinks."""
        arrived = sink.wait_for(count)
        for other in self.sinks:
            if other is not sink:
                other.assert_stays_empty(0.5)
        self.assertEqual(len(sink.messages()), count, sink.describe())
        return arrived


class Routes(SendmailRelayCase):
    def test_a_relay_route_reaches_its_own_next_hop_with_the_original_addresses(self) -> None:
        result = self.send("127.0.0.2", ["bob@example.net", "alice@contoso.test",
                                         "x@fabrikam.local", "carol@[192.0.2.9]"],
                           from_="scanner@contoso.local",
                           headers=["From: Scanner <scanner@contoso.local>",
                                    "To: x@fabrikam.local, bob@example.net",
                                    "Subject: printers"])
        qid = self.accepted(result)
        decision = self.decision(qid)
        self.assertIn("rule=printers, route=acs-smtp, action=relay", decision)
        self.assertIn("route_by=recipients, rerouted=4, staying=0", decision)
        self.assertNotIn(", header=", decision)
        [msg] = self.assert_only(self.acs_sink)
        # every recipient (internal ones too: the route is not external_only), each with its
        # own address and ORCPT (an address literal too, carried as
        # "carol@[192.0.2.9]"@acs-smtp.paas-route.invalid); recipient_rewrite applied to the
        # envelope (Sendmail sends them in its own order)
        self.assertEqual(sorted(msg.rcpt_to), ["alice@contoso.test", "bob@example.net",
                                               "carol@[192.0.2.9]", "x@fabrikam.test"])
        self.assertIn("<bob@example.net> ORCPT=rfc822;bob@example.net", msg.rcpt_args)
        # sender_rewrite: the envelope sender and From:; recipient_rewrite: To:
        self.assertEqual(msg.mail_from, "scanner@contoso.test")
        self.assertIn("scanner@contoso.test", msg["From"])
        self.assertIn("x@fabrikam.test", msg["To"])
        self.assertEqual(msg["Subject"], "printers")
        self.assertEqual(msg.get_all(harness.ROUTING_HEADER), [])
        self.assertNotIn("paas-route.invalid", msg.raw.decode("utf-8", "replace"))
        # Sendmail's own log names the pseudo-addresses and the route's mailer
        self.sendmail.wait_for_log(rf"{qid}: to=.*<bob@example\.net\.acs-smtp\.paas-route\."
                                   rf"invalid>.*mailer=paas_acs_smtp, .*stat=Sent")

    def test_an_external_only_route_sends_only_the_external_recipients(self) -> None:
        qid = self.accepted(self.send("127.0.0.3", ["bob@example.net", "alice@contoso.test",
                                                    "carol@example.org"]))
        self.assertIn("external_only=exo, rerouted=2, staying=1", self.decision(qid))
        [routed] = self.exo_sink.wait_for(1)
        self.assertEqual(sorted(routed.rcpt_to), ["bob@example.net", "carol@example.org"])
        [normal] = self.default_sink.wait_for(1)
        self.assertEqual(normal.rcpt_to, ["alice@contoso.test"])
        self.acs_sink.assert_stays_empty(0.5)
        self.assertEqual(len(self.exo_sink.messages()), 1)

    def test_unrouted_mail_goes_the_normal_way(self) -> None:
        qid = self.accepted(self.send("127.0.0.1", ["someone@example.org"]))
        self.assertIn("rule=(none), route=(none), action=none", self.decision(qid))
        [msg] = self.assert_only(self.default_sink)
        self.assertEqual(msg.rcpt_to, ["someone@example.org"])


    def test_check_skips_the_postfix_checks(self) -> None:
        # a postconf that would fail: with mta = "sendmail" it is not even run
        config = os.path.join(self.workdir(), "paas-milter.toml")
        proc = subprocess.run([harness.milter_binary(), "check", "-c", config, "--postconf",
                               "/nonexistent/postconf"], capture_output=True, text=True,
                              timeout=30)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertIn("info: milter.mta = sendmail: Postfix wiring not checked", proc.stdout)
        self.assertNotIn("postconf", proc.stderr)
        self.assertIn(": OK (3 routes, 3 rules", proc.stdout)


class ClientCannotPickItsRoute(SendmailRelayCase):
    def test_a_pseudo_domain_recipient_is_refused(self) -> None:
        for client in ("127.0.0.1", "127.0.0.2"):
            result = self.send(client, ["bob@example.net", "bob@example.net.exo.paas-route.invalid",
                                        "eve@[192.0.2.9].acs-smtp.paas-route.invalid"])
            self.accepted(result)
            codes = [code for cmd, code, _ in result.replies if cmd == "RCPT"]
            self.assertEqual(codes[0], 250, result.transcript)
            self.assertEqual([c // 100 for c in codes[1:]], [5, 5], result.transcript)
        self.milter.wait_for_log(r"refused: a route's pseudo-domain")
        # the unrouted message to the smart host, the routed one to acs: none to exo
        self.acs_sink.wait_for(1)
        self.default_sink.wait_for(1)
        self.exo_sink.assert_stays_empty(1.0)
        for sink in (self.acs_sink, self.default_sink):
            self.assertEqual([m.rcpt_to for m in sink.messages()], [["bob@example.net"]])

    def test_a_disguised_pseudo_domain_recipient_is_refused(self) -> None:
        # Sendmail's address parser drops comments and white space and reads a backslash as
        # quoting the next character: each of these would resolve to the route's mailer
        # (review finding: they got 250 and reached the acs sink unclassified).
        disguises = ["bob@example.net.acs-smtp.paas-route.(x)invalid",
                     "bob@example.net.acs-smtp.paas-route. invalid",
                     "bob@example.net.acs-smtp.paas-route\\.invalid"]
        result = self.send("127.0.0.1", ["someone@example.org", *disguises])
        qid = self.accepted(result)
        codes = [code for cmd, code, _ in result.replies if cmd == "RCPT"]
        self.assertEqual(codes, [250, 550, 550, 550], result.transcript)
        self.assertIn("rule=(none), route=(none), action=none", self.decision(qid))
        [msg] = self.assert_only(self.default_sink)
        self.assertEqual(msg.rcpt_to, ["someone@example.org"])

    def test_a_clients_routing_header_changes_nothing(self) -> None:
        qid = self.accepted(self.send("127.0.0.1", ["someone@example.org"],
                                      headers=[f"{harness.ROUTING_HEADER}: acs-smtp"]))
        self.assertIn("removed_client_header=1xX-PaaS-Route", self.decision(qid))
        [msg] = self.assert_only(self.default_sink)
        self.assertEqual(msg.get_all(harness.ROUTING_HEADER), [])
        # a routed client naming another route: still its own
        qid = self.accepted(self.send("127.0.0.3", ["bob@example.net"],
                                      headers=[f"{harness.ROUTING_HEADER}: acs-smtp"]))
        self.assertIn("external_only=exo, rerouted=1", self.decision(qid))
        [msg] = self.exo_sink.wait_for(1)
        self.assertEqual(msg.get_all(harness.ROUTING_HEADER), [])
        self.acs_sink.assert_stays_empty(0.5)


class ApiRelayFallback(SendmailRelayCase):
    def test_a_failing_service_falls_back_to_the_relay_routes_next_hop(self) -> None:
        self.mock.always(500)
        qid = self.accepted(self.send("127.0.0.4", ["customer@example.net", "desk@local.test"]))
        decision = self.decision(qid)
        self.assertIn("rule=devices, route=acs-api, action=api", decision)
        self.assertIn("policy=relay:acs-smtp, route_by=recipients, rerouted=1, staying=1",
                      decision)
        [routed] = self.acs_sink.wait_for(1)
        self.assertEqual(routed.rcpt_to, ["customer@example.net"])
        self.assertIn("ORCPT=rfc822;customer@example.net", routed.rcpt_args[0])
        self.assertEqual(routed.get_all(harness.ROUTING_HEADER), [])
        [normal] = self.default_sink.wait_for(1)
        self.assertEqual(normal.rcpt_to, ["desk@local.test"])
        self.exo_sink.assert_stays_empty(0.5)
        self.assertEqual(self.mock.accepted_messages(), [])


class WithRelayChecks(SendmailRelayCase):
    # Sendmail refuses to relay except to these (and nothing in a pseudo-domain)
    relay_domains = ["example.net", "contoso.test"]

    def test_recipients_the_milter_adds_pass_sendmails_relay_checks(self) -> None:
        # the relay check itself is on: a domain it does not list is refused at RCPT
        result = self.send("127.0.0.2", ["bob@example.net", "carol@example.org"])
        self.assertEqual([code for cmd, code, _ in result.replies if cmd == "RCPT"], [250, 550],
                         result.transcript)
        qid = self.accepted(result)
        self.assertIn("route_by=recipients, rerouted=1", self.decision(qid))
        [msg] = self.assert_only(self.acs_sink)
        self.assertEqual(msg.rcpt_to, ["bob@example.net"])
        self.sendmail.wait_for_log(rf"{qid}: Milter \(paas-milter\) add: rcpt: "
                                   rf"<bob@example\.net\.acs-smtp\.paas-route\.invalid>")


if __name__ == "__main__":
    unittest.main(verbosity=2)
