"""`paas-milter health`: the container health check. Against the real daemon (TCP and a unix
socket) it must answer OK after a milter option negotiation, without making the daemon log
anything; against nothing, or against something that is not a milter, it must exit 1 with
a message that says which of the two it was.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

CONFIG_BODY = """
[routes.acs-smtp]
action = "relay"

[[rules]]
name = "printers"
client_addr = ["127.0.0.2"]
route = "acs-smtp"
"""

OK_RE = r"^paas-milter: OK: milter on {spec} answered option negotiation \(version 6\) in [0-9.]+ ms\n$"


class FakeServer:
    """A TCP server on 127.0.0.1 that treats every connection with HANDLE(conn)."""

    def __init__(self, handle: Callable[[socket.socket], None]):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.handle = handle
        self.connections = 0
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                try:
                    self.handle(conn)
                except OSError:
                    pass

    def stop(self) -> None:
        self.stopped.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self.thread.join(5)


class Health(harness.IntegrationTestCase):
    def setUp(self) -> None:
        self.binary = harness.milter_binary()
        if not self.binary:
            self.skipTest("PAAS_MILTER_BIN unset or not an executable")

    def health(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run([self.binary, "health", *args], stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout)

    def fake_server(self, handle: Callable[[socket.socket], None]) -> FakeServer:
        server = FakeServer(handle)
        self.addCleanup(server.stop)
        return server

    def assert_fails(self, result: subprocess.CompletedProcess, *patterns: str) -> None:
        self.assertEqual(result.returncode, 1, f"stdout={result.stdout!r} stderr={result.stderr!r}")
        self.assertEqual(result.stdout, "")
        self.assertTrue(result.stderr.startswith("paas-milter: health: "), result.stderr)
        for pattern in patterns:
            self.assertRegex(result.stderr, pattern)

    # -- the real daemon ----------------------------------------------------------------------
    def test_ok_against_the_daemon_over_tcp(self) -> None:
        port = harness.free_port()
        milter = self.start_milter(port, harness.milter_config(port, CONFIG_BODY))
        mark = milter.log_mark()
        spec = f"inet:{port}@127.0.0.1"
        result = self.health("-c", milter.config_path)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertRegex(result.stdout, OK_RE.format(spec=re.escape(spec)))
        self.assertEqual(result.stderr, "")
        # --socket instead of the configuration, a host-less spec (libmilter's "every
        # address": asked on the loopback address), a timeout
        for args, shown in ((["--socket", spec], spec),
                            (["--socket", f"inet:{port}", "--timeout", "2.5"], f"inet:{port}")):
            result = self.health(*args)
            self.assertEqual(result.returncode, 0, result.stderr)
            self.assertRegex(result.stdout, OK_RE.format(spec=re.escape(shown)))
        # a health check is not worth a log line, and the daemon keeps serving
        time.sleep(0.5)
        self.assertEqual(milter.log(mark), "")
        self.assertTrue(milter.running)

    def test_ok_against_the_daemon_on_a_unix_socket_and_usable_as_a_readiness_probe(self) -> None:
        directory = tempfile.mkdtemp(prefix="paas-health-")
        self.addCleanup(lambda: subprocess.run(["rm", "-rf", directory], check=False))
        path = os.path.join(directory, "milter.sock")
        spec = f"unix:{path}"
        config = os.path.join(directory, "paas-milter.toml")
        with open(config, "w") as f:
            f.write(harness.milter_config(0, CONFIG_BODY, socket=spec))
        # before the daemon runs: no socket file
        self.assert_fails(self.health("-c", config),
                          rf"cannot connect to {re.escape(spec)}: No such file or directory")
        log = open(os.path.join(directory, "milter.log"), "wb")
        proc = subprocess.Popen([self.binary, "run", "--foreground", "-c", config],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                env={**os.environ, "STATE_DIRECTORY": directory})
        log.close()

        def stop() -> None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.addCleanup(stop)
        deadline = time.monotonic() + harness.DEFAULT_TIMEOUT
        while True:
            result = self.health("-c", config, "--timeout", "1")
            if result.returncode == 0 or time.monotonic() > deadline or proc.poll() is not None:
                break
            time.sleep(0.1)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertRegex(result.stdout, OK_RE.format(spec=re.escape(spec)))
        stop()
        # the daemon may leave its socket file behind: either way, nobody answers
        result = self.health("-c", config)
        self.assert_fails(result, rf"cannot connect to {re.escape(spec)}: "
                                  r"(No such file or directory|Connection refused)")

    # -- nothing there ------------------------------------------------------------------------
    def test_nothing_listening(self) -> None:
        port = harness.free_port()
        spec = f"inet:{port}@127.0.0.1"
        self.assert_fails(self.health("--socket", spec),
                          rf"cannot connect to {re.escape(spec)}: 127\.0\.0\.1 port {port}: "
                          r"Connection refused")

    # -- something that is not a milter -------------------------------------------------------
    def test_an_smtp_server_is_not_a_milter(self) -> None:
        def smtp(conn: socket.socket) -> None:
            conn.sendall(b"220 mail.example ESMTP Postfix\r\n")
            while conn.recv(1000):
                conn.sendall(b"502 5.5.2 Error: command not recognized\r\n")
        server = self.fake_server(smtp)
        spec = f"inet:{server.port}@127.0.0.1"
        self.assert_fails(self.health("--socket", spec),
                          rf"^paas-milter: health: {re.escape(spec)}: not a milter: answered "
                          r'"220 mail\.example ESMTP Postfix\\r\\n')
        self.assertEqual(server.connections, 1)

    def test_a_banner_and_a_close(self) -> None:
        # closed with our request unread: the banner may be lost to the reset
        server = self.fake_server(lambda c: c.sendall(b"* OK IMAP4rev1 ready\r\n"))
        self.assert_fails(self.health("--socket", f"inet:{server.port}@127.0.0.1"),
                          r'(not a milter: answered "\* OK IMAP4rev1|closed without an answer)')

    def test_a_server_that_closes_at_once(self) -> None:
        server = self.fake_server(lambda c: None)
        self.assert_fails(self.health("--socket", f"inet:{server.port}@127.0.0.1"),
                          "closed without an answer to the option negotiation")

    def test_a_server_that_never_answers(self) -> None:
        def silent(conn: socket.socket) -> None:
            conn.recv(100)
            time.sleep(3)
        server = self.fake_server(silent)
        started = time.monotonic()
        result = self.health("--socket", f"inet:{server.port}@127.0.0.1", "--timeout", "0.5")
        self.assertLess(time.monotonic() - started, 2.5)
        self.assert_fails(result, r"no answer to the option negotiation within 0\.5 s")

    def test_a_wrong_milter_reply(self) -> None:
        def tempfail(conn: socket.socket) -> None:
            conn.recv(100)
            conn.sendall(b"\x00\x00\x00\x01t")
        server = self.fake_server(tempfail)
        self.assert_fails(self.health("--socket", f"inet:{server.port}@127.0.0.1"),
                          r"answered 't' \(tempfail\) instead of the option negotiation")

    # -- what it is asked ---------------------------------------------------------------------
    def test_configuration_and_usage_errors(self) -> None:
        missing = os.path.join(tempfile.gettempdir(), "paas-health-missing.toml")
        self.assert_fails(self.health("-c", missing), f"cannot read {re.escape(missing)}: "
                                                      "No such file or directory")
        no_socket = self.write_config("no-socket.toml", "[milter]\nmode = \"enforce\"\n")
        self.assert_fails(self.health("-c", no_socket), "no milter.socket")
        broken = self.write_config("broken.toml", "[milter\n")
        self.assert_fails(self.health("-c", broken), rf"{re.escape(broken)}:1: ")
        bad_spec = self.write_config("bad.toml", '[milter]\nsocket = "tcp:25"\n')
        self.assert_fails(self.health("-c", bad_spec), r'socket "tcp:25" is not')
        self.assert_fails(self.health("--bogus"), "unknown option '--bogus'", "usage: ")
        self.assert_fails(self.health("--timeout", "soon"), "--timeout wants seconds")
        # exit code 1, never 2: container engines reserve 2 in health checks
        self.assertEqual(self.health("--socket").returncode, 1)


if __name__ == "__main__":
    unittest.main()
