"""Loop protection end to end ([loop]): real private Postfix instances, paas-milter, the
X-PaaS-Milter-Loop stamp on every routed message, and a message that loops stopped at the hop
count, exactly once, with the decision line saying why.

- SelfLoop: one gateway whose relay route's transport delivers back into its own Postfix; the
  second pass finds its own stamp and takes on_loop = "reject" (the sender gets one DSN).
- Fleet: two gateways (two Postfix instances, two milters, one shared secret) whose relay
  routes point at each other; a message without a Message-ID (Postfix's cleanup adds one before
  the milter sees the header) goes round until it carries max_hops stamps, then is held.
- Stamps: one gateway with a relay sink and the ACS mock: the stamp reaches both and verifies
  (computed here independently); a client's forged stamp is removed and the message routed
  normally; a valid stamp of the fleet stops it; an API route carries the stamps it arrived
  with, folded into ACS's one header value, and so does its relay fallback.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import subprocess
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
import mock_common  # noqa: E402
from mock_acs import MockAcs  # noqa: E402

LOOP_HEADER = "X-PaaS-Milter-Loop"
LOOP_SECRET = "loop-fleet-secret-for-tests-6f1c2a9e"
POSTCAT = "/usr/sbin/postcat"


def loop_signature(gateway: str, route: str, hop: int, message_id: str,
                   secret: str = LOOP_SECRET) -> str:
    """The stamp's signature as lib/paasmilter/loop_stamp.cpp makes it, written again here:
    base64url (no padding) of HMAC-SHA256(secret, "paas-milter-loop-1\\nGW\\nROUTE\\nHOP\\nID")
    over the Message-ID without white space."""
    text = "\n".join(["paas-milter-loop-1", gateway, route, str(hop),
                      re.sub(r"[ \t\r\n]", "", message_id)])
    mac = hmac.new(secret.encode(), text.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


def make_stamp(gateway: str, route: str, hop: int, message_id: str,
               secret: str = LOOP_SECRET) -> str:
    return (f"gw={gateway}; route={route}; hop={hop}; "
            f"sig={loop_signature(gateway, route, hop, message_id, secret)}")


def parse_stamps(value: str) -> list[dict[str, str]]:
    """Every stamp of one header value (several are separated by ',')."""
    out = []
    for part in value.split(","):
        fields = dict(p.strip().split("=", 1) for p in part.split(";"))
        out.append({k.strip(): v.strip() for k, v in fields.items()})
    return out


def verifies(stamp: dict[str, str], message_id: str) -> bool:
    return hmac.compare_digest(
        stamp["sig"], loop_signature(stamp["gw"], stamp["route"], int(stamp["hop"]), message_id))


def unfold(value: str) -> str:
    return re.sub(r"\r?\n[ \t]+", " ", value).strip()


class LoopTestCase(harness.IntegrationTestCase):
    def setUp(self) -> None:
        if not harness.milter_binary():
            self.skipTest("PAAS_MILTER_BIN unset or not an executable")
        # The harness fails the test if any milter or Postfix log shows the fleet's secret.
        mock_common.keep_secret(LOOP_SECRET)

    def gateway_dir(self, name: str) -> str:
        path = os.path.join(self.workdir(), name)
        os.makedirs(path, exist_ok=True)
        os.chmod(path, 0o755)
        key = os.path.join(path, "loop-key")
        with open(key, "w") as f:
            f.write(LOOP_SECRET + "\n")
        os.chmod(key, 0o600)
        return path

    def start_gateway_milter(self, name: str, port: int, body: str) -> harness.Milter:
        config = os.path.join(self.gateway_dir(name), "paas-milter.toml")
        with open(config, "w") as f:
            f.write(harness.milter_config(port, body))
        check = subprocess.run([harness.milter_binary(), "check", "-c", config],
                               capture_output=True, text=True)
        self.assertEqual(check.returncode, 0, check.stderr)
        self.assertIn(": OK (", check.stdout)
        self.assertIn(f"loop protection as {name})", check.stdout)
        self.assertNotIn("loop", check.stderr)  # no warning about [loop] or its secret
        milter = harness.Milter(config, port)
        self._track(milter)
        return milter.start()

    def new_postfix(self, name: str, sink: harness.Sink, milter_port: int,
                    **kw) -> harness.PrivatePostfix:
        """A private Postfix under workdir/NAME, not started (routes still to be pointed)."""
        postfix = harness.PrivatePostfix(os.path.join(self.workdir(), name),
                                         default_sink_port=sink.port, milter_port=milter_port,
                                         **kw)
        self._track(postfix)
        return postfix

    @staticmethod
    def decisions(milter: harness.Milter) -> list[str]:
        return re.findall(r"^.*\brule=.*$", milter.log(), re.M)

    def held_headers(self, postfix: harness.PrivatePostfix, queue_id: str) -> str:
        return subprocess.run([POSTCAT, "-c", postfix.config_dir, "-h", "-q", queue_id],
                              capture_output=True, text=True, check=True).stdout

    def header_values(self, headers_text: str, name: str) -> list[str]:
        unfolded = re.sub(r"\n[ \t]+", " ", headers_text)
        return re.findall(rf"^{re.escape(name)}:\s*(.*)$", unfolded, re.M | re.I)


MESSAGE_WITHOUT_ID = ("From: scanner@contoso.test\r\nTo: customer@example.net\r\n"
                      "Subject: round and round\r\nDate: Fri, 04 Dec 2026 17:00:00 +0000\r\n\r\n"
                      "page 1\r\n")


class SelfLoop(LoopTestCase):
    """The relay route's transport delivers back into the same Postfix."""

    def test_second_pass_is_rejected_and_the_sender_told_once(self) -> None:
        default = self.start_sink("default")
        milter_port = harness.free_port()
        milter = self.start_gateway_milter("gw1", milter_port, """
[loop]
secret_file = "loop-key"
gateway_id = "gw1"
on_loop = "reject"

[routes.acs-smtp]
action = "relay"

[[rules]]
name = "everything"
recipient = ["example.net"]
route = "acs-smtp"
""")
        postfix = self.new_postfix("gw1", default, milter_port,
                                   routes={"acs-smtp": ("acs-relay", 1)},
                                   main_cf={"myhostname": "gw1.test"})
        postfix.routes["acs-smtp"] = ("acs-relay", postfix.smtpd_port)
        postfix.write_header_checks()
        # Postfix's own loop check compares the server's greeting with myhostname: the
        # route's client calls itself something else, so only the stamp can see the loop.
        postfix.postconf_master("acs-relay/unix/myhostname=relay-client.test")
        postfix.start()

        sent = harness.swaks(postfix.smtpd_port, from_="scanner@contoso.test",
                             to=["customer@example.net"])
        self.assertEqual(sent.data_code, 250, sent.transcript)

        # The second pass is refused by the milter: the relay transport bounces, and the DSN
        # (Postfix's own, no smtpd milter on the way) reaches the sender through relayhost.
        dsn = default.wait_for(1, timeout=30)[0]
        self.assertEqual(dsn.mail_from, "")
        self.assertEqual(dsn.rcpt_to, ["scanner@contoso.test"])
        self.assertIn(b"5.4.6", dsn.raw)
        self.assertIn(b"Mail routing loop detected", dsn.raw)

        lines = self.decisions(milter)
        self.assertEqual(len(lines), 2, "\n".join(lines))
        self.assertIn(f"{sent.queue_id}: rule=everything, route=acs-smtp, action=relay, "
                      "header=X-PaaS-Route: acs-smtp, stamped=gw1/acs-smtp hop 1", lines[0])
        # The routing header the first pass added comes back from "the client": removed.
        self.assertIn("route=acs-smtp, action=relay, reply=550 5.4.6 Mail routing loop detected, "
                      "removed_client_header=1xX-PaaS-Route, "
                      "loop=1 stamp (gw1/acs-smtp) >= max_hops 1: on_loop=reject", lines[1])
        postfix.wait_for_empty_queue(timeout=30)
        time.sleep(1)
        self.assertEqual(len(default.messages()), 1, default.describe())
        self.assertEqual(len(self.decisions(milter)), 2)


class Fleet(LoopTestCase):
    """Two gateways of one fleet whose relay routes point at each other."""

    max_hops = 2

    def setUp(self) -> None:
        super().setUp()
        self.default = self.start_sink("default")
        ports = {name: harness.free_port() for name in ("gw1", "gw2")}
        self.milters = {
            name: self.start_gateway_milter(name, port, f"""
[loop]
secret_file = "loop-key"
gateway_id = "{name}"
max_hops = {self.max_hops}

[routes.acs-smtp]
action = "relay"

[[rules]]
name = "external"
recipient = ["example.net"]
route = "acs-smtp"
""") for name, port in ports.items()}
        self.postfix = {
            name: self.new_postfix(name, self.default, port,
                                   routes={"acs-smtp": ("acs-relay", 1)},
                                   main_cf={"myhostname": f"{name}.test"})
            for name, port in ports.items()}
        for name, other in (("gw1", "gw2"), ("gw2", "gw1")):
            self.postfix[name].routes["acs-smtp"] = ("acs-relay",
                                                      self.postfix[other].smtpd_port)
            self.postfix[name].write_header_checks()
        for postfix in self.postfix.values():
            postfix.start()

    def test_message_is_held_at_the_hop_count_exactly_once(self) -> None:
        gw1, gw2 = self.postfix["gw1"], self.postfix["gw2"]
        sent = harness.swaks(gw1.smtpd_port, from_="scanner@contoso.test",
                             to=["customer@example.net"], data=MESSAGE_WITHOUT_ID)
        self.assertEqual(sent.data_code, 250, sent.transcript)

        # gw1 -> gw2 (both stamp it) -> gw1, which finds two stamps: held there.
        queue = gw1.wait_for_queue(lambda q: any(m["queue_name"] == "hold" for m in q),
                                   timeout=30)
        held = [m["queue_id"] for m in queue if m["queue_name"] == "hold"]
        self.assertEqual(len(held), 1, queue)
        gw2.wait_for_empty_queue(timeout=30)

        lines1, lines2 = self.decisions(self.milters["gw1"]), self.decisions(self.milters["gw2"])
        self.assertEqual(len(lines1), 2, "\n".join(lines1))
        self.assertEqual(len(lines2), 1, "\n".join(lines2))
        self.assertIn(f"{sent.queue_id}: rule=external, route=acs-smtp, action=relay, "
                      "header=X-PaaS-Route: acs-smtp, stamped=gw1/acs-smtp hop 1", lines1[0])
        self.assertIn("loop=1 stamp (gw1/acs-smtp) < max_hops 2, stamped=gw2/acs-smtp hop 2",
                      lines2[0])
        self.assertIn(f"{held[0]}: rule=external, route=acs-smtp, action=relay, "
                      "removed_client_header=1xX-PaaS-Route, "
                      "loop=2 stamps (gw1/acs-smtp, gw2/acs-smtp) >= max_hops 2: on_loop=hold",
                      lines1[1])
        self.assertNotIn("header=X-PaaS-Route", lines1[1])

        # The held copy carries both stamps, each bound to the Message-Id Postfix's cleanup
        # gave the message on its first pass (the client sent none), and no routing header.
        headers = self.held_headers(gw1, held[0])
        message_ids = self.header_values(headers, "Message-Id")
        self.assertEqual(len(message_ids), 1, headers)
        self.assertIn("@gw1.test>", message_ids[0])
        stamps = [s for v in self.header_values(headers, LOOP_HEADER) for s in parse_stamps(v)]
        self.assertEqual([(s["gw"], s["route"], s["hop"]) for s in stamps],
                         [("gw1", "acs-smtp", "1"), ("gw2", "acs-smtp", "2")])
        self.assertTrue(all(verifies(s, message_ids[0]) for s in stamps), headers)
        self.assertEqual(self.header_values(headers, harness.ROUTING_HEADER), [], headers)
        self.assertIn(f"{held[0]}!", gw1.queue_text())  # postqueue -p marks held mail

        # Nothing more happens: no third pass, nothing delivered anywhere.
        time.sleep(2)
        self.assertEqual(len(self.decisions(self.milters["gw1"])), 2)
        self.assertEqual(len(self.decisions(self.milters["gw2"])), 1)
        self.assertEqual(self.default.messages(), [])
        self.assertEqual(gw1.held_queue_ids(), held)


STAMPS_CONFIG = """
[metrics]
listen = "127.0.0.1:{metrics_port}"

[loop]
secret_file = "loop-key"
gateway_id = "gw1"
max_hops = {max_hops}

[routes.acs-smtp]
action = "relay"

[routes.acs-api]
action = "api"
connection_string_file = "acs.conn"
ca_file = "{ca_file}"
sender = "DoNotReply@contoso.azurecomm.test"
verified_domains = ["contoso.test"]
spool_directory = "{spool}"
time_budget = 20
request_timeout = 5
on_permanent_failure = "relay:acs-smtp"

[[rules]]
name = "api-devices"
client_addr = ["127.0.0.3"]
route = "acs-api"

[[rules]]
name = "printers"
client_addr = ["127.0.0.2"]
route = "acs-smtp"
"""


class StampsTestCase(LoopTestCase):
    """One gateway: a relay route to a sink, an API route to the ACS mock."""

    max_hops = 1

    def setUp(self) -> None:
        super().setUp()
        self.mock = MockAcs(verified_domains=("contoso.test", "contoso.azurecomm.test"))
        self.mock.start()
        self.addCleanup(self.mock.stop)
        self.default = self.start_sink("default")
        self.acs_sink = self.start_sink("acs")
        directory = self.gateway_dir("gw1")
        spool = os.path.join(directory, "spool")
        os.makedirs(spool, exist_ok=True)
        with open(os.path.join(directory, "acs.conn"), "w") as f:
            f.write(self.mock.connection_string + "\n")
        os.chmod(os.path.join(directory, "acs.conn"), 0o600)
        port = harness.free_port()
        self.metrics_port = harness.free_port()
        self.milter = self.start_gateway_milter(
            "gw1", port,
            STAMPS_CONFIG.format(max_hops=self.max_hops, ca_file=self.mock.ca_file, spool=spool,
                                 metrics_port=self.metrics_port))
        self.postfix = self.new_postfix("gw1", self.default, port,
                                        routes={"acs-smtp": ("acs-relay", self.acs_sink.port)})
        self.postfix.start()

    def send(self, client: str, message_id: str, stamps: list[str] = ()) -> str:
        headers = "".join(f"{LOOP_HEADER}: {s}\r\n" for s in stamps)
        data = (f"From: scanner@contoso.test\r\nTo: customer@example.net\r\n"
                f"Subject: stamps\r\nMessage-ID: {message_id}\r\n{headers}"
                f"Date: Fri, 04 Dec 2026 17:00:00 +0000\r\n\r\npage 1\r\n")
        sent = harness.swaks(self.postfix.smtpd_port, local_interface=client,
                             from_="scanner@contoso.test", to=["customer@example.net"],
                             data=data, timeout=60)
        self.assertEqual(sent.data_code, 250, sent.transcript)
        return sent.queue_id

    def decision(self, queue_id: str) -> str:
        return self.milter.wait_for_log(rf"{queue_id}: (rule=.*)", timeout=30).group(1)

    def metric(self, series: str) -> float | None:
        """The value of one series ('name{label="v"}' as exposed), None when absent."""
        return harness.metric_samples(harness.scrape_metrics(self.metrics_port)).get(series)


class Stamps(StampsTestCase):
    def test_relay_route_stamp_reaches_the_sink_and_a_forged_one_is_removed(self) -> None:
        message_id = "<relay-1@printer.contoso.test>"
        forged = make_stamp("gw1", "acs-smtp", 1, message_id, secret="not-the-fleet-secret")
        qid = self.send("127.0.0.2", message_id, [forged, "garbage"])
        self.postfix.wait_for_status(qid, "sent")
        message = self.acs_sink.wait_for(1)[0]
        values = [unfold(v) for v in message.get_all(LOOP_HEADER)]
        # The client's two go; the message is routed normally, with the gateway's stamp only.
        self.assertEqual(values, [make_stamp("gw1", "acs-smtp", 1, message_id)])
        self.assertTrue(verifies(parse_stamps(values[0])[0], message["Message-ID"]))
        line = self.decision(qid)
        self.assertIn("header=X-PaaS-Route: acs-smtp, removed_forged_stamps=2, "
                      "stamped=gw1/acs-smtp hop 1", line)
        self.assertNotIn("loop=", line)
        self.assertEqual(self.default.messages(), [])
        self.assertEqual(self.metric("paas_milter_forged_loop_stamps_removed_total"), 2)
        self.assertIsNone(self.metric('paas_milter_loops_stopped_total{route="acs-smtp"}'))

    def test_a_valid_stamp_of_the_fleet_stops_the_relay_route(self) -> None:
        message_id = "<relay-2@printer.contoso.test>"
        qid = self.send("127.0.0.2", message_id, [make_stamp("gw9", "acs-smtp", 1, message_id)])
        self.postfix.wait_for_queue(lambda q: [m["queue_name"] for m in q] == ["hold"])
        self.assertIn("loop=1 stamp (gw9/acs-smtp) >= max_hops 1: on_loop=hold",
                      self.decision(qid))
        # The same stamp copied into another message (another Message-ID) counts for nothing.
        other = self.send("127.0.0.2", "<relay-3@printer.contoso.test>",
                          [make_stamp("gw9", "acs-smtp", 1, message_id)])
        self.postfix.wait_for_status(other, "sent")
        self.assertIn("removed_forged_stamps=1, stamped=gw1/acs-smtp hop 1", self.decision(other))
        self.assertEqual(len(self.acs_sink.wait_for(1)), 1)
        self.assertEqual(len(self.postfix.held_queue_ids()), 1)
        self.assertEqual(self.metric('paas_milter_loops_stopped_total{route="acs-smtp"}'), 1)
        self.assertEqual(self.metric("paas_milter_forged_loop_stamps_removed_total"), 1)
        self.assertEqual(self.metric('paas_milter_transactions_total{action="relay",outcome="held",'
                                     'route="acs-smtp",rule="printers"}'), 1)

    def test_api_route_submits_the_stamp(self) -> None:
        message_id = "<api-1@scanner.contoso.test>"
        qid = self.send("127.0.0.3", message_id)
        accepted = self.mock.wait_for_accepted(1)[0]
        headers = accepted.message.get("headers") or {}
        self.assertEqual(headers.get(LOOP_HEADER), make_stamp("gw1", "acs-api", 1, message_id),
                         headers)
        self.assertEqual(headers.get("Message-ID"), message_id)
        self.assertIn("stamped=gw1/acs-api hop 1", self.decision(qid))
        self.assertIn("api=accepted", self.decision(qid))

    def test_api_route_relay_fallback_carries_the_stamp(self) -> None:
        message_id = "<api-2@scanner.contoso.test>"
        self.mock.fail_next(400, code="InvalidRequest", message="refused for the test")
        qid = self.send("127.0.0.3", message_id)
        self.postfix.wait_for_status(qid, "sent")
        message = self.acs_sink.wait_for(1)[0]
        self.assertEqual([unfold(v) for v in message.get_all(LOOP_HEADER)],
                         [make_stamp("gw1", "acs-api", 1, message_id)])
        line = self.decision(qid)
        self.assertIn("policy=relay:acs-smtp", line)
        self.assertIn("stamped=gw1/acs-api hop 1", line)


class StampsTwoHops(StampsTestCase):
    """max_hops = 2: a message with one valid stamp is routed once more, carrying both."""

    max_hops = 2

    def test_api_route_folds_the_stamps_into_one_value(self) -> None:
        message_id = "<api-3@scanner.contoso.test>"
        first = make_stamp("gw2", "acs-smtp", 1, message_id)
        forged = make_stamp("gw2", "acs-smtp", 1, "<another@id>")
        qid = self.send("127.0.0.3", message_id, [first, forged])
        accepted = self.mock.wait_for_accepted(1)[0]
        value = (accepted.message.get("headers") or {}).get(LOOP_HEADER)
        self.assertEqual(value, first + ", " + make_stamp("gw1", "acs-api", 2, message_id))
        self.assertIn("removed_forged_stamps=1, loop=1 stamp (gw2/acs-smtp) < max_hops 2, "
                      "stamped=gw1/acs-api hop 2", self.decision(qid))


if __name__ == "__main__":
    unittest.main(verbosity=2)
