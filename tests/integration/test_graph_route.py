"""The Microsoft Graph route end to end: swaks -> a real private Postfix -> paas-milter ->
the loopback Graph double (HTTPS, Entra token). The MIME that reaches Graph is the message as
the client sent it, apart from the Bcc and the removed routing header; discard only after
202; ambiguous answers take on_ambiguous.
"""

from __future__ import annotations

import base64
import os
import random
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
    main_cf: dict = {}

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
            routes={"exo-relay": ("exo-relay", self.relay_sink.port)}, main_cf=self.main_cf)

    def send(self, **kw) -> harness.SwaksResult:
        kw.setdefault("local_interface", "127.0.0.2")
        kw.setdefault("from_", MAILBOX)
        kw.setdefault("to", ["customer@example.net"])
        return harness.swaks(self.postfix.smtpd_port, timeout=60, **kw)

    def send_large(self, message: str, **kw) -> tuple[int | None, str | None, str]:
        """Sends MESSAGE without swaks echoing it: (end-of-data code, queue id, reply)."""
        result = self.send(data=message, extra_args=["--suppress-data"], **kw)
        # With --suppress-data the transcript has no "." line: the replies after DATA's 354
        # are the end of data's and QUIT's.
        after_data = [(c, t) for cmd, c, t in result.replies if cmd == "DATA"]
        if len(after_data) < 2:
            return None, None, result.transcript[-2000:]
        code, reply = after_data[1]
        queued = harness.QUEUED_AS_RE.search(reply)
        return code, queued.group(1) if queued else None, reply

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


def file_bytes(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def message_with_attachment(attachment: bytes, name: str = "scan.pdf") -> str:
    """A scanner's message: a line of text and one PDF, base64 in 76-character lines."""
    flat = base64.b64encode(attachment).decode()
    lines = "".join(flat[i:i + 76] + "\r\n" for i in range(0, len(flat), 76))
    return ("From: Scanner <scanner@contoso.test>\r\n"
            "To: Customer <customer@example.net>\r\n"
            "X-PaaS-Route: forged-by-client\r\n"
            "Subject: large scan\r\n"
            "Message-ID: <scan-large@contoso.test>\r\n"
            "MIME-Version: 1.0\r\n"
            "Content-Type: multipart/mixed; boundary=\"b1\"\r\n"
            "\r\n"
            "--b1\r\n"
            "Content-Type: text/plain; charset=utf-8\r\n"
            "\r\n"
            "Your scan is attached.\r\n"
            "--b1\r\n"
            f"Content-Type: application/pdf; name=\"{name}\"\r\n"
            "Content-Transfer-Encoding: base64\r\n"
            f"Content-Disposition: attachment; filename=\"{name}\"\r\n"
            "\r\n"
            f"{lines}"
            "--b1--\r\n")


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

    def test_over_one_request_without_upload_sessions_takes_on_oversize(self) -> None:
        # on_oversize = "reject" (default); the log says what would let it go.
        code, _, reply = self.send_large(message_with_attachment(file_bytes(3_500_000, 1)))
        self.assertEqual(code, 550, reply)
        line = self.milter.wait_for_log(r"route=graph, action=api.*").group(0)
        self.assertIn("api=oversize", line)
        self.assertIn("upload_sessions = true", line)
        self.assertIn("Mail.ReadWrite", line)
        self.assertEqual(self.mock.requests("createMessage"), [])
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


class UploadSessions(GraphRouteTestCase):
    """upload_sessions = true: a message over one request goes as a draft, its large
    attachment by upload session, then the draft is sent."""
    policies = "upload_sessions = true"
    mock_options = {"permissions": ["Mail.Send", "Mail.ReadWrite"]}
    main_cf = {"message_size_limit": 30 * 1024 * 1024}  # Postfix's default is 10,240,000

    def test_a_7_mb_attachment_arrives_whole_through_an_upload_session(self) -> None:
        attachment = file_bytes(7_000_000, 7)
        rcpts = ["customer@example.net", "archive@example.net", "colleague@local.test"]
        code, queue_id, reply = self.send_large(message_with_attachment(attachment), to=rcpts)
        self.assertEqual(code, 250, reply)
        sent = self.mock.wait_for_sent(1, timeout=30)[0]
        self.assertEqual(sent.via, "draft")
        self.assertEqual(sent.mailbox, MAILBOX)
        self.assertEqual(sorted(sent.recipients), ["archive@example.net", "customer@example.net"])
        self.assertEqual(len(sent.attachments), 1)
        uploaded = sent.attachments[0]
        self.assertEqual(uploaded.via, "uploadSession")
        self.assertEqual(uploaded.name, "scan.pdf")
        self.assertEqual(uploaded.content_type, "application/pdf")
        self.assertEqual(uploaded.data, attachment)
        self.assertEqual(sent.incomplete_uploads, [])
        self.assertNotIn(b"X-PaaS-Route", sent.mime)
        self.assertIn(b"Your scan is attached.", sent.mime)
        # The ranges went to the upload URL as returned, without Authorization.
        puts = [r for r in self.mock.requests("upload") if r.method == "PUT"]
        self.assertEqual([r.status for r in puts], [200, 201])
        self.assertTrue(all("authorization" not in r.headers for r in puts))
        self.assertEqual(self.mock.drafts(), [])
        self.assertEqual(self.mock.duplicates(), [])
        line = self.decision(queue_id)
        # the draft, the upload session, two ranges, the send
        self.assertIn("api=accepted, requests=5", line)
        self.assertIn("local_copy=kept for 1 local recipient(s)", line)
        time.sleep(0.5)
        self.assertEqual(self.relay_sink.messages(), [])
        self.assertEqual([m.rcpt_to for m in self.default_sink.messages()],
                         [["colleague@local.test"]])


class UploadSessionsWithoutReadWrite(GraphRouteTestCase):
    """The app has Mail.Send only: creating the draft is refused (403)."""
    policies = 'upload_sessions = true\non_failure = "relay:exo-relay"'
    mock_options = {"permissions": ["Mail.Send"]}

    def test_the_refused_draft_takes_on_failure_and_never_bounces(self) -> None:
        code, queue_id, reply = self.send_large(message_with_attachment(file_bytes(3_500_000, 3)))
        self.assertEqual(code, 250, reply)
        line = self.decision(queue_id)
        self.assertIn("api=transient", line)
        self.assertIn("HTTP 403", line)
        self.assertIn("Mail.ReadWrite", line)
        self.assertIn("policy=relay:exo-relay", line)
        self.relay_sink.wait_for(1)
        self.assertEqual(self.mock.sent(), [])
        self.assertEqual(self.mock.drafts(), [])


if __name__ == "__main__":
    unittest.main()
