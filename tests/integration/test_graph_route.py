"""The Microsoft Graph route end to end: swaks -> a real private Postfix -> paas-milter ->
the loopback Graph double (HTTPS, Entra token). The MIME that reaches Graph is the message as
the client sent it, apart from the Bcc and the removed routing header; discard only after
202; ambiguous answers take on_ambiguous.
"""

from __future__ import annotations

import os
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from mock_graph import MockGraph  # noqa: E402

MAILBOX = "scanner@contoso.test"

ROUTE_TEMPLATE = """
[routes.exo-relay]
action = "relay"

[routes.graph]
action = "api"
provider = "graph"
authority = "{endpoint}"
token_scope = "https://graph.microsoft.com/.default"
graph_endpoint = "{endpoint}"
tenant_id = "{tenant}"
client_id = "{client}"
client_secret_file = "graph.secret"
ca_file = "{ca_file}"
mailbox = "{mailbox}"
local_domains = ["local.test"]
spool_directory = "{spool}"
time_budget = 20
request_timeout = 5
{policies}

[[rules]]
name = "devices"
client_addr = ["127.0.0.2"]
route = "graph"
"""


class GraphRouteTestCase(harness.IntegrationTestCase):
    policies = ""
    mock_options: dict = {}

    def setUp(self) -> None:
        if not harness.milter_binary():
            self.skipTest("PAAS_MILTER_BIN unset or not an executable")
        self.mock = MockGraph(mailboxes=[MAILBOX], **self.mock_options)
        self.mock.start()
        self.addCleanup(self.mock.stop)
        self.default_sink = self.start_sink("default")
        self.relay_sink = self.start_sink("exo")
        self.milter_port = harness.free_port()
        secret = self.write_config("graph.secret", self.mock.client_secret + "\n")
        os.chmod(secret, 0o600)
        self.spool = os.path.join(self.workdir(), "spool")
        os.makedirs(self.spool)
        body = ROUTE_TEMPLATE.format(endpoint=self.mock.endpoint, tenant=self.mock.tenant_id,
                                     client=self.mock.client_id, ca_file=self.mock.ca_file,
                                     mailbox=MAILBOX, spool=self.spool, policies=self.policies)
        self.milter = self.start_milter(self.milter_port,
                                        harness.milter_config(self.milter_port, body))
        self.postfix = self.start_postfix(
            default_sink=self.default_sink, milter_port=self.milter_port,
            routes={"exo-relay": ("exo-relay", self.relay_sink.port)})

    def send(self, **kw) -> harness.SwaksResult:
        kw.setdefault("local_interface", "127.0.0.2")
        kw.setdefault("from_", MAILBOX)
        kw.setdefault("to", ["customer@example.net"])
        return harness.swaks(self.postfix.smtpd_port, timeout=60, **kw)

    def decision(self, queue_id: str) -> str:
        return self.milter.wait_for_log(rf"{queue_id}: (.*)", timeout=30).group(1)


MESSAGE = ("From: Scanner <scanner@contoso.test>\r\n"
           "To: Customer <customer@example.net>,\r\n"
           "\tNot Envelope <stranger@example.org>\r\n"
           "X-PaaS-Route: forged-by-client\r\n"
           "Subject: =?UTF-8?Q?Scan_f=C3=BCr_you?=\r\n"
           "Message-ID: <scan-42@contoso.test>\r\n"
           "MIME-Version: 1.0\r\n"
           "Content-Type: text/plain; charset=utf-8\r\n"
           "Content-Transfer-Encoding: 8bit\r\n"
           "\r\n"
           "Gr\u00fc\u00dfe,\r\n"
           ".. a line that starts with a dot\r\n"
           "the scanner\r\n")


class Sent(GraphRouteTestCase):
    def test_the_message_goes_as_sent_apart_from_bcc_and_routing_header(self) -> None:
        rcpts = ["customer@example.net", "archive@example.net", "colleague@local.test"]
        result = self.send(to=rcpts, data=MESSAGE)
        self.assertEqual(result.data_code, 250, result.transcript)
        sent = self.mock.wait_for_sent(1)[0]
        self.assertEqual(sent.mailbox, MAILBOX)
        self.assertEqual(sent.auth, "secret")
        expected = MESSAGE.replace("X-PaaS-Route: forged-by-client\r\n", "")
        expected = expected.replace("To: Customer <customer@example.net>,\r\n"
                                    "\tNot Envelope <stranger@example.org>\r\n", "")
        # What reached Graph, byte for byte: the client's message, with To narrowed to
        # envelope recipients, the one not in To as Bcc, and no routing header.
        mime = sent.mime.decode("utf-8")
        self.assertNotIn("X-PaaS-Route", mime)
        self.assertNotIn("stranger@example.org", mime)
        self.assertIn("Bcc: archive@example.net", mime)
        head, _, body = mime.partition("\r\n\r\n")
        # (swaks ends the DATA with one more CRLF than the text it was given)
        self.assertEqual(body, MESSAGE.partition("\r\n\r\n")[2] + "\r\n")
        kept = [line for line in head.split("\r\n")
                if not line.startswith(("To:", "Bcc:", "\t", " "))]
        self.assertEqual(kept, [line for line in expected.partition("\r\n\r\n")[0].split("\r\n")])
        self.assertEqual(sorted(sent.recipients), ["archive@example.net", "customer@example.net"])
        line = self.decision(result.queue_id)
        self.assertIn("rule=devices, route=graph, action=api", line)
        self.assertIn("api=accepted, requests=1", line)
        self.assertIn("local_copy=kept for 1 local recipient(s)", line)
        # The local recipient keeps Postfix's copy; nothing else leaves through Postfix.
        self.default_sink.wait_for(1)
        time.sleep(0.5)
        self.assertEqual([m.rcpt_to for m in self.default_sink.messages()],
                         [["colleague@local.test"]])
        self.assertEqual(self.relay_sink.messages(), [])

    def test_throttled_then_sent(self) -> None:
        self.mock.fail_next(429)  # without Retry-After: exponential back-off from 1 s
        result = self.send()
        self.assertEqual(result.data_code, 250, result.transcript)
        self.assertIn("api=accepted, requests=2", self.decision(result.queue_id))
        self.assertEqual(len(self.mock.sent()), 1)

    def test_a_504_after_the_send_is_sent_again_by_default(self) -> None:
        # on_ambiguous = "tempfail" (default): a duplicate beats a loss, and the log says so.
        self.mock.fail_next(504, accept=True)
        result = self.send(data=MESSAGE, to=["customer@example.net"])
        self.assertEqual(result.data_code, 250, result.transcript)
        self.assertIn("possible_duplicate=yes (HTTP 202 after an ambiguous attempt",
                      self.decision(result.queue_id))
        self.mock.wait_for_sent(2)
        self.assertEqual(len(self.mock.duplicates()), 1)

    def test_unknown_mailbox_falls_to_on_failure_and_never_bounces(self) -> None:
        self.mock.mailboxes = {"someone-else@contoso.test"}
        result = self.send()
        self.assertEqual(result.data_code, 451, result.transcript)
        line = self.milter.wait_for_log(r"route=graph, action=api.*").group(0)
        self.assertIn("api=transient-failure", line)
        self.assertIn("HTTP 404", line)
        self.assertEqual(self.mock.sent(), [])


class HoldWhenAmbiguous(GraphRouteTestCase):
    policies = 'on_ambiguous = "hold"\nsent_items_check = true\non_failure = "relay:exo-relay"'

    def test_a_504_after_the_send_is_found_in_sent_items(self) -> None:
        self.mock.fail_next(504, accept=True)
        result = self.send(data=MESSAGE, to=["customer@example.net"])
        self.assertEqual(result.data_code, 250, result.transcript)
        line = self.decision(result.queue_id)
        self.assertIn("api=accepted", line)
        self.assertIn("local_copy=discarded", line)
        self.assertEqual(len(self.mock.sent()), 1)
        self.assertEqual(self.relay_sink.messages(), [])

    def test_a_lost_answer_not_yet_in_sent_items_is_held_not_relayed(self) -> None:
        self.mock.sent_items_delay = 3600  # worst case: the copy shows up much later
        self.mock.fail_next(stall=8)       # sent, then no answer until the milter gives up
        result = self.send(data=MESSAGE, to=["customer@example.net"])
        self.assertEqual(result.data_code, 250, result.transcript)
        line = self.decision(result.queue_id)
        self.assertIn("held, on_ambiguous=hold", line)
        self.assertEqual(len(self.mock.sent()), 1)
        time.sleep(0.5)
        self.assertEqual(self.relay_sink.messages(), [])
        held = self.postfix.queue()
        self.assertEqual(len(held), 1)

    def test_a_throttled_service_is_not_ambiguous_and_falls_back_to_the_relay(self) -> None:
        self.mock.always(429)
        result = self.send(data=MESSAGE, to=["customer@example.net"])
        self.assertEqual(result.data_code, 250, result.transcript)
        line = self.decision(result.queue_id)
        self.assertIn("policy=relay:exo-relay", line)
        self.relay_sink.wait_for(1)
        self.assertEqual(self.mock.sent(), [])


if __name__ == "__main__":
    unittest.main()
