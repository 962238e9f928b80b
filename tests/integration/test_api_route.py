"""The API route end to end: swaks -> a real private Postfix -> paas-milter -> the loopback
ACS mock (HTTPS, HMAC-verified), for what needs code: a status the service changes after it
accepted, a milter killed and restarted mid-request, an HTTPS proxy, a client certificate made
for the test.

The one-message cases (accepted and discarded, recipients and local domains, 120 recipients ->
3 requests, 429, every failure policy: tempfail, relay fallback, hold, reject, oversize,
Entra ID client secret) are data: tests/integration/cases/api-*/, run by test_cases.py.
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


class FinalStatus(ApiRouteTestCase):
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
