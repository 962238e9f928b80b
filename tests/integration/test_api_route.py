"""The API route end to end: swaks -> a real private Postfix -> paas-milter -> the loopback
ACS mock (HTTPS, HMAC-verified). Discard only after 202; every failure takes its policy.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import pathlib
import select
import signal
import socket
import socketserver
import sys
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from mock_acs import MockAcs  # noqa: E402

ROUTE_TEMPLATE = """
[routes.acs-smtp]
action = "relay"

[routes.acs-api]
action = "api"
{auth}
ca_file = "{ca_file}"
sender = "DoNotReply@contoso.azurecomm.test"
verified_domains = ["contoso.test"]
local_domains = ["local.test"]
spool_directory = "{spool}"
spool_threshold = 65536
time_budget = 20
request_timeout = 5
{policies}

[[rules]]
name = "devices"
client_addr = ["127.0.0.2"]
route = "acs-api"
"""


class ApiRouteTestCase(harness.IntegrationTestCase):
    policies = ""
    mock_options: dict = {}

    def auth_config(self) -> str:
        return 'connection_string_file = "acs.conn"'

    def setUp(self) -> None:
        if not harness.milter_binary():
            self.skipTest("PAAS_MILTER_BIN unset or not an executable")
        self.mock = MockAcs(verified_domains=("contoso.test", "contoso.azurecomm.test"),
                            **self.mock_options)
        self.mock.start()
        self.addCleanup(self.mock.stop)
        self.default_sink = self.start_sink("default")
        self.acs_sink = self.start_sink("acs")
        self.milter_port = harness.free_port()
        self.write_config("acs.conn", self.mock.connection_string + "\n")
        self.spool = os.path.join(self.workdir(), "spool")
        os.makedirs(self.spool)
        body = ROUTE_TEMPLATE.format(ca_file=self.mock.ca_file, spool=self.spool,
                                     policies=self.policies, auth=self.auth_config())
        self.milter = self.start_milter(self.milter_port,
                                        harness.milter_config(self.milter_port, body))
        self.postfix = self.start_postfix(
            default_sink=self.default_sink, milter_port=self.milter_port,
            routes={"acs-smtp": ("acs-relay", self.acs_sink.port)},
            main_cf={"message_size_limit": 30 * 1024 * 1024})

    def send(self, **kw) -> harness.SwaksResult:
        kw.setdefault("local_interface", "127.0.0.2")
        kw.setdefault("from_", "scanner@contoso.test")
        kw.setdefault("to", ["customer@example.net"])
        return harness.swaks(self.postfix.smtpd_port, timeout=60, **kw)

    def decision(self, queue_id: str) -> str:
        return self.milter.wait_for_log(rf"{queue_id}: (.*)", timeout=30).group(1)

    def assert_sinks_empty(self) -> None:
        time.sleep(0.5)
        self.assertEqual(self.default_sink.messages(), [])
        self.assertEqual(self.acs_sink.messages(), [])


class Accepted(ApiRouteTestCase):
    def test_accepted_message_is_discarded_locally(self) -> None:
        result = self.send(headers=["Subject: Scan 42", "To: Customer <customer@example.net>"],
                           body="Please find the scan attached.\n")
        self.assertEqual(result.data_code, 250, result.transcript)
        accepted = self.mock.wait_for_accepted(1)[0]
        message = accepted.message
        self.assertEqual(accepted.auth, "hmac")
        # From is in a verified domain: kept.
        self.assertEqual(message["senderAddress"], "scanner@contoso.test")
        self.assertEqual(message["content"]["subject"], "Scan 42")
        self.assertIn("Please find the scan attached.", message["content"]["plainText"])
        self.assertEqual(message["recipients"]["to"],
                         [{"address": "customer@example.net", "displayName": "Customer"}])
        line = self.decision(result.queue_id)
        self.assertIn("rule=devices, route=acs-api, action=api", line)
        self.assertIn("api=accepted, requests=1", line)
        self.assertIn(f"operation_id={accepted.operation_id}", line)
        self.assertIn("local_copy=discarded", line)
        self.postfix.wait_for_log(rf"{result.queue_id}: milter-discard")
        self.assert_sinks_empty()
        self.assertEqual(self.postfix.queue(), [])

    def test_final_status_is_logged_with_the_queue_id(self) -> None:
        ok = self.send()
        failed = self.send(to=["bounce@example.net"])
        self.assertEqual((ok.data_code, failed.data_code), (250, 250))
        op = self.mock.wait_for_accepted(2)[1].operation_id
        self.mock.set_operation_status(op, "Failed", error_code="EmailDroppedAllRecipientsSuppressed",
                                       error_message="All recipients are suppressed.")
        line = self.milter.wait_for_log(rf"{ok.queue_id}: api-status .*", timeout=30).group(0)
        self.assertIn("status=Succeeded", line)
        line = self.milter.wait_for_log(rf"{failed.queue_id}: api-status .*", timeout=30).group(0)
        self.assertIn(f"operation_id={op}, status=Failed", line)
        self.assertIn("EmailDroppedAllRecipientsSuppressed: All recipients are suppressed.", line)

    def test_the_clients_routing_header_never_reaches_the_service(self) -> None:
        result = self.send(headers=["X-PaaS-Route: acs-smtp", "X-Printer: floor-3"])
        self.assertEqual(result.data_code, 250, result.transcript)
        headers = self.mock.wait_for_accepted(1)[0].message.get("headers", {})
        self.assertEqual(headers.get("X-Printer"), "floor-3")
        self.assertNotIn("x-paas-route", [name.lower() for name in headers])

    def test_envelope_recipients_are_authoritative_and_local_domains_stay(self) -> None:
        result = self.send(to=["a@example.net", "hidden@example.org", "desk@local.test"],
                           headers=["To: A <a@example.net>, Not Envelope <x@example.com>",
                                    "From: Printer <printer@elsewhere.test>"])
        self.assertEqual(result.data_code, 250, result.transcript)
        message = self.mock.wait_for_accepted(1)[0].message
        self.assertEqual(message["recipients"]["to"],
                         [{"address": "a@example.net", "displayName": "A"}])
        self.assertEqual([r["address"] for r in message["recipients"]["bcc"]],
                         ["hidden@example.org"])
        # From not in a verified domain: rewritten, original in replyTo.
        self.assertEqual(message["senderAddress"], "DoNotReply@contoso.azurecomm.test")
        self.assertEqual(message["replyTo"][0]["address"], "printer@elsewhere.test")
        # The local recipient still gets Postfix's copy, and only it.
        self.postfix.wait_for_status(result.queue_id, "sent")
        delivered = self.default_sink.wait_for(1)
        self.assertEqual(delivered[0].rcpt_to, ["desk@local.test"])
        self.assertIn("local_copy=kept for 1 local recipient(s)", self.decision(result.queue_id))

    def test_120_recipients_make_three_requests(self) -> None:
        rcpts = [f"user{i:03d}@example.net" for i in range(120)]
        result = self.send(to=rcpts)
        self.assertEqual(result.data_code, 250, result.transcript)
        accepted = self.mock.wait_for_accepted(3)
        counts = sorted(sum(len(m.message["recipients"].get(k, [])) for k in ("to", "cc", "bcc"))
                        for m in accepted)
        self.assertEqual(counts, [20, 50, 50])
        got = {r["address"] for m in accepted for k in ("to", "cc", "bcc")
               for r in m.message["recipients"].get(k, [])}
        self.assertEqual(got, set(rcpts))
        self.assertIn("api=accepted, requests=3", self.decision(result.queue_id))
        self.assert_sinks_empty()

    def test_429_is_retried_after_retry_after(self) -> None:
        self.mock.fail_next(429, retry_after=1)
        result = self.send()
        self.assertEqual(result.data_code, 250, result.transcript)
        self.mock.wait_for_accepted(1)
        self.assertIn("api=accepted, requests=2", self.decision(result.queue_id))

    def test_attachment_and_html(self) -> None:
        data = ("From: scanner@contoso.test\r\nTo: customer@example.net\r\n"
                "Subject: =?ISO-8859-1?Q?R=E9sum=E9?=\r\nMIME-Version: 1.0\r\n"
                "Content-Type: multipart/mixed; boundary=b1\r\n\r\n"
                "--b1\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<p>Hello</p>\r\n"
                "--b1\r\nContent-Type: application/pdf\r\n"
                "Content-Disposition: attachment; filename=\"scan.pdf\"\r\n"
                "Content-Transfer-Encoding: base64\r\n\r\nJVBERi0xLjQK\r\n--b1--\r\n")
        result = self.send(data=data)
        self.assertEqual(result.data_code, 250, result.transcript)
        message = self.mock.wait_for_accepted(1)[0].message
        self.assertEqual(message["content"]["subject"], "Résumé")
        self.assertIn("<p>Hello</p>", message["content"]["html"])
        self.assertEqual(message["attachments"], [{"name": "scan.pdf",
                                                   "contentType": "application/pdf",
                                                   "contentInBase64": "JVBERi0xLjQK"}])

    def test_not_api_routed_mail_is_untouched(self) -> None:
        result = self.send(local_interface="127.0.0.3")
        self.assertEqual(result.data_code, 250, result.transcript)
        self.postfix.wait_for_status(result.queue_id, "sent")
        self.assertEqual(len(self.default_sink.wait_for(1)), 1)
        self.assertEqual(self.mock.accepted_messages(), [])


class TempfailPolicy(ApiRouteTestCase):
    policies = 'on_failure = "tempfail"\nmax_attempts = 2'

    def test_5xx_tempfails_and_nothing_is_lost(self) -> None:
        self.mock.always(503)
        result = self.send()
        self.assertEqual(result.data_code, 451, result.transcript)
        self.assertIn("4.3.0", result.data_reply)
        self.assertIn("policy=tempfail", self.milter.wait_for_log(r"api=transient-failure.*").group(0))
        self.assert_sinks_empty()
        self.assertEqual(self.postfix.queue(), [])
        # The client retries later; now the service answers.
        self.mock.clear_faults()
        retry = self.send()
        self.assertEqual(retry.data_code, 250, retry.transcript)
        self.assertEqual(len(self.mock.wait_for_accepted(1)), 1)

    def test_a_client_retry_after_a_partial_acceptance_sends_only_the_rest(self) -> None:
        # 120 recipients make 3 requests. The first is accepted, the second keeps failing: the
        # client is told to try again. On the retry the milter asks the service about each
        # request first: the accepted one exists and is not posted again. The message has no
        # Message-ID or Date: its identity is its content.
        self.mock.fail_next(delay=0.01)  # the first request goes through
        self.mock.fail_next(503, count=2)
        rcpts = [f"user{i:03d}@example.net" for i in range(120)]
        data = ("From: scanner@contoso.test\r\nTo: team@example.net\r\n"
                "Subject: scan 1\r\n\r\npage 1\r\n")
        first = self.send(to=rcpts, data=data)
        self.assertEqual(first.data_code, 451, first.transcript)
        line = self.milter.wait_for_log(r"chunks=accepted,not-sent,not-sent.*").group(0)
        self.assertIn("policy=tempfail", line)
        self.assertEqual(len(self.mock.accepted_messages()), 1)
        second = self.send(to=rcpts, data=data)
        self.assertEqual(second.data_code, 250, second.transcript)
        self.assertIn("chunks=already-accepted,accepted,accepted", self.decision(second.queue_id))
        self.mock.wait_for_accepted(3)
        time.sleep(0.5)
        accepted = self.mock.accepted_messages()
        self.assertEqual(len(accepted), 3)
        got = sorted(r["address"] for m in accepted for k in ("to", "cc", "bcc")
                     for r in m.message["recipients"].get(k, []))
        self.assertEqual(got, rcpts)
        # A different message from the same client to the same recipients is not mistaken
        # for the first one.
        other = self.send(to=rcpts, data=data.replace("page 1", "page 2"))
        self.assertEqual(other.data_code, 250, other.transcript)
        self.mock.wait_for_accepted(6)

    def test_a_5xx_after_the_message_went_out_is_not_sent_twice(self) -> None:
        # Accepted by the service, but the client sees 504 (a gateway timeout in front of a
        # service that carried on): the milter asks before posting again.
        self.mock.fail_next(504, accept=True)
        result = self.send()
        self.assertEqual(result.data_code, 250, result.transcript)
        self.assertIn("api=accepted", self.decision(result.queue_id))
        time.sleep(0.5)
        self.assertEqual(len(self.mock.accepted_messages()), 1)
        self.assertEqual(len(self.mock.requests("send")), 1)

    def test_too_many_mime_parts_take_the_oversize_policy(self) -> None:
        parts = "".join(f"--b\r\nContent-Type: text/plain\r\n\r\npart {i}\r\n" for i in range(600))
        data = ("From: scanner@contoso.test\r\nTo: customer@example.net\r\nSubject: parts\r\n"
                "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
                + parts + "--b--\r\n")
        result = self.send(data=data)
        self.assertEqual(result.data_code, 550, result.transcript)
        self.assertIn("5.3.4", result.data_reply)
        self.assertEqual(self.mock.requests("send"), [])

    def test_permanent_failure_rejects(self) -> None:
        self.mock.fail_next(400, code="InvalidSenderUserName", message="bad sender")
        result = self.send()
        self.assertEqual(result.data_code, 550, result.transcript)
        self.assertIn("InvalidSenderUserName", result.data_reply)

    def test_oversize_message_takes_the_oversize_policy_without_a_request(self) -> None:
        big = "x" * 76 + "\r\n"
        data = ("From: scanner@contoso.test\r\nTo: customer@example.net\r\nSubject: big\r\n\r\n"
                + big * (15 * 1024 * 1024 // len(big)))
        result = self.send(data=data)
        self.assertEqual(result.data_code, 550, result.transcript)
        self.assertIn("5.3.4", result.data_reply)
        self.assertEqual(self.mock.requests("send"), [])
        self.assertEqual(os.listdir(self.spool), [])  # spool file removed


class RelayFallback(ApiRouteTestCase):
    policies = 'on_failure = "relay:acs-smtp"\nmax_attempts = 1\non_oversize = "relay:acs-smtp"'

    def test_failure_falls_back_to_the_relay_route(self) -> None:
        self.mock.always(500)
        result = self.send()
        self.assertEqual(result.data_code, 250, result.transcript)
        self.postfix.wait_for_status(result.queue_id, "sent")
        delivered = self.acs_sink.wait_for(1)
        self.assertEqual(delivered[0].get_all(harness.ROUTING_HEADER), ["acs-smtp"])
        line = self.decision(result.queue_id)
        self.assertIn("policy=relay:acs-smtp", line)

    def test_an_unreachable_service_falls_back_to_the_relay_route(self) -> None:
        # Nothing listens: the request never left, and this process never posted it before,
        # so the service certainly lacks it and the fallback may carry it.
        self.mock.stop()
        result = self.send()
        self.assertEqual(result.data_code, 250, result.transcript)
        self.postfix.wait_for_status(result.queue_id, "sent")
        self.assertEqual(len(self.acs_sink.wait_for(1)), 1)
        line = self.decision(result.queue_id)
        self.assertIn("chunks=not-sent", line)
        self.assertIn("policy=relay:acs-smtp", line)

    def test_oversize_falls_back_to_the_relay_route(self) -> None:
        big = "y" * 76 + "\r\n"
        data = ("From: scanner@contoso.test\r\nTo: customer@example.net\r\nSubject: big\r\n\r\n"
                + big * (15 * 1024 * 1024 // len(big)))
        result = self.send(data=data)
        self.assertEqual(result.data_code, 250, result.transcript)
        self.postfix.wait_for_status(result.queue_id, "sent", timeout=60)
        self.assertEqual(len(self.acs_sink.wait_for(1)), 1)
        self.assertEqual(self.mock.requests("send"), [])


class RejectPolicy(ApiRouteTestCase):
    policies = 'on_failure = "reject"\nmax_attempts = 1'

    def test_reject_after_a_partial_acceptance_holds_the_rest(self) -> None:
        # The first 50 recipients have the message: a bounce would tell the sender nobody
        # got it. The other 20 are held for the operator instead.
        self.mock.fail_next(delay=0.01)
        self.mock.always(503)
        rcpts = [f"user{i:03d}@example.net" for i in range(70)]
        result = self.send(to=rcpts)
        self.assertEqual(result.data_code, 250, result.transcript)
        line = self.decision(result.queue_id)
        self.assertIn("policy=reject, partly_accepted=50", line)
        self.assertIn("held instead", line)
        self.postfix.wait_for_queue(lambda q: any(m.get("queue_name") == "hold" for m in q))
        held = [m for m in self.postfix.queue() if m["queue_name"] == "hold"]
        self.assertEqual(len(held), 1)
        self.assertEqual(sorted(r["address"] for r in held[0]["recipients"]), rcpts[50:])
        self.assert_sinks_empty()

    def test_reject_without_any_acceptance_bounces(self) -> None:
        self.mock.always(503)
        result = self.send()
        self.assertEqual(result.data_code, 550, result.transcript)
        self.assertEqual(self.postfix.queue(), [])


class HoldPolicy(ApiRouteTestCase):
    policies = 'on_failure = "hold"\nmax_attempts = 1'

    def test_failure_holds_the_message(self) -> None:
        self.mock.fail_next(503)
        result = self.send()
        self.assertEqual(result.data_code, 250, result.transcript)
        self.postfix.wait_for_queue(lambda q: any(m.get("queue_name") == "hold" for m in q))
        self.assertEqual(self.postfix.held_queue_ids(), [result.queue_id])
        self.assertIn("policy=hold", self.decision(result.queue_id))
        self.assert_sinks_empty()

    def test_a_lost_answer_is_not_held_but_tempfailed(self) -> None:
        # The connection broke after the request was sent: the service may still carry it
        # out, so holding (and later releasing) the message could deliver it twice.
        # Twice: libcurl resends once on a fresh connection when a reused one breaks.
        self.mock.fail_next(reset=True, count=2)
        result = self.send()
        self.assertEqual(result.data_code, 451, result.transcript)
        line = self.milter.wait_for_log(r"chunks=unresolved.*").group(0)
        self.assertIn("unresolved requests: tempfail", line)
        self.assertEqual(self.postfix.queue(), [])


class MilterRestart(ApiRouteTestCase):
    # The worst legal service: a repeated Operation-Id is executed again.
    mock_options = {"reexecute_repeated_operation_id": True}
    policies = "max_attempts = 8"

    def test_a_request_in_flight_when_the_milter_dies_is_repeated_after_the_restart(self) -> None:
        # The service takes 8 s to carry out the request, and the milter is SIGKILLed while it
        # waits. The client retries after the restart, while the original still runs: the
        # operation does not exist yet, so only the journal says that a request went out.
        # The milter repeats that very request (same Repeatability-Request-Id), the service
        # answers 409 until the original is done, and the message goes out once.
        self.mock.fail_next(delay=8)
        data = ("From: scanner@contoso.test\r\nTo: customer@example.net\r\n"
                "Subject: crash test\r\n\r\npage 1\r\n")
        first: list[harness.SwaksResult] = []
        client = threading.Thread(target=lambda: first.append(self.send(data=data)))
        client.start()
        deadline = time.monotonic() + 20
        while not self.mock.requests("send") and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertTrue(self.mock.requests("send"), "the milter posted nothing")
        os.kill(self.milter.pid, signal.SIGKILL)
        client.join(60)
        self.assertEqual(first[0].data_code, 451, first[0].transcript)

        mark = self.milter.log_mark()
        self.milter.start()
        self.milter.wait_for_log(r"1 from earlier runs, 1 of them left open", since=mark)
        second = self.send(data=data)
        self.assertEqual(second.data_code, 250, second.transcript)
        self.assertIn("api=accepted", self.decision(second.queue_id))
        # Once every request the service got is done, the original included:
        posts = self.mock.wait_for_requests(len(self.mock.requests("send")), timeout=20)
        self.assertEqual(len(self.mock.accepted_messages()), 1)
        self.assertGreater(len(posts), 1)
        self.assertEqual({p.repeatability_id for p in posts}, {posts[0].repeatability_id})

    def test_without_its_state_directory_the_milter_does_not_start(self) -> None:
        self.milter.stop()
        missing = os.path.join(self.workdir(), "no-such-directory")
        milter = harness.Milter(self.milter.config_path, self.milter_port,
                                log_path=os.path.join(self.workdir(), "refused.log"),
                                env={**os.environ, "STATE_DIRECTORY": missing})
        with self.assertRaises(harness.HarnessError):
            milter.start(timeout=10)
        self.assertEqual(milter.returncode, 1)
        self.assertIn(f"API routes need a state directory the milter can write "
                      f"(milter.state_directory, systemd's StateDirectory=, or {missing})",
                      milter.log())


class ConnectProxy:
    """A minimal HTTP CONNECT proxy on 127.0.0.1 (what a gateway's egress proxy does for
    HTTPS), recording the targets it tunnelled to."""

    def __init__(self) -> None:
        self.tunnels: list[str] = []
        outer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                request = b""
                while b"\r\n\r\n" not in request:
                    chunk = self.request.recv(4096)
                    if not chunk:
                        return
                    request += chunk
                method, target = request.split(b" ")[:2]
                if method != b"CONNECT":
                    self.request.sendall(b"HTTP/1.1 405 Method Not Allowed\r\n\r\n")
                    return
                host, port = target.decode().rsplit(":", 1)
                if host != "127.0.0.1":  # loopback only, whatever a client asks
                    self.request.sendall(b"HTTP/1.1 403 Forbidden\r\n\r\n")
                    return
                outer.tunnels.append(target.decode())
                with socket.create_connection((host, int(port)), timeout=10) as upstream:
                    self.request.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    sockets = [self.request, upstream]
                    while True:
                        readable, _, _ = select.select(sockets, [], [], 30)
                        if not readable:
                            return
                        for sock in readable:
                            data = sock.recv(65536)
                            if not data:
                                return
                            (upstream if sock is self.request else self.request).sendall(data)

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class ThroughProxy(ApiRouteTestCase):
    def auth_config(self) -> str:
        self.proxy = ConnectProxy()
        self.addCleanup(self.proxy.stop)
        return f'connection_string_file = "acs.conn"\nproxy = "http://127.0.0.1:{self.proxy.port}"'

    def test_requests_go_through_the_https_proxy(self) -> None:
        result = self.send()
        self.assertEqual(result.data_code, 250, result.transcript)
        self.mock.wait_for_accepted(1)
        self.assertEqual(self.proxy.tunnels, [self.mock.host])


class EntraAuth(ApiRouteTestCase):
    mock_options = {"tenant_id": "contoso-tenant", "client_id": "paas-milter-app",
                    "client_secret": "entra-secret-for-tests", "token_lifetime": 3600}

    def auth_config(self) -> str:
        self.write_config("entra.secret", "entra-secret-for-tests\n")
        return (f'endpoint = "{self.mock.endpoint}"\nauthority = "{self.mock.authority}"\n'
                'tenant_id = "contoso-tenant"\nclient_id = "paas-milter-app"\n'
                'client_secret_file = "entra.secret"')

    def test_bearer_token_is_fetched_once_and_reused(self) -> None:
        for _ in range(3):
            result = self.send()
            self.assertEqual(result.data_code, 250, result.transcript)
        accepted = self.mock.wait_for_accepted(3)
        self.assertEqual({m.auth for m in accepted}, {"bearer"})
        tokens = self.mock.token_requests()
        self.assertEqual(len(tokens), 1, tokens)
        self.assertEqual(tokens[0].kind, "secret")
        self.assertEqual(tokens[0].form.get("scope"), "https://communication.azure.com//.default")
        # The secret never reaches the log.
        self.assertNotIn("entra-secret-for-tests", self.milter.log())


class EntraCertificateAuth(ApiRouteTestCase):
    def setUp(self) -> None:
        # An app certificate (RSA, as Entra ID takes) made before the mock starts, which
        # verifies the client assertion's signature with it.
        directory = self.workdir()
        self.key = os.path.join(directory, "app.key")
        self.cert = os.path.join(directory, "app.pem")
        harness._run([harness.OPENSSL, "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                      "-keyout", self.key, "-out", self.cert, "-days", "2",
                      "-subj", "/CN=paas-milter-app"])
        pathlib.Path(directory, "app-with-key.pem").write_text(
            pathlib.Path(self.cert).read_text() + pathlib.Path(self.key).read_text())
        self.mock_options = {"tenant_id": "contoso-tenant", "client_id": "paas-milter-app",
                             "client_certificate": self.cert}
        super().setUp()

    def auth_config(self) -> str:
        return (f'endpoint = "{self.mock.endpoint}"\nauthority = "{self.mock.authority}"\n'
                'tenant_id = "contoso-tenant"\nclient_id = "paas-milter-app"\n'
                'client_certificate_file = "app-with-key.pem"')

    def test_client_assertion_signed_with_the_certificate(self) -> None:
        result = self.send()
        self.assertEqual(result.data_code, 250, result.transcript)
        self.assertEqual(self.mock.wait_for_accepted(1)[0].auth, "bearer")
        tokens = self.mock.token_requests()
        self.assertEqual([(t.kind, t.status) for t in tokens], [("assertion", 200)])
        # By default PS256 with x5t#S256, as Microsoft's certificate-credentials page says
        # (the mock verified the RSASSA-PSS signature).
        encoded = tokens[0].form["client_assertion"].split(".")[0]
        header = json.loads(base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)))
        der = base64.b64decode("".join(
            pathlib.Path(self.cert).read_text().split("-----")[2].split()))
        x5t_s256 = base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()
        self.assertEqual(header, {"alg": "PS256", "typ": "JWT", "x5t#S256": x5t_s256})


if __name__ == "__main__":
    unittest.main(verbosity=2)
