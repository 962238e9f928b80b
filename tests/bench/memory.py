"""Peak memory of the milter for one large API-routed message to many recipients.

A private Postfix, the loopback ACS mock and paas-milter (as in the integration tests); one
small message first (the baseline: libraries, TLS, connection pool), then one message of
--size MB (a binary attachment) to --recipients recipients. Prints the milter's peak RSS
(VmHWM) after each, and the growth as a multiple of the message's size.

    PAAS_MILTER_BIN=build/milter/paas-milter python3 tests/bench/memory.py --size 10 --recipients 500
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "integration"))
import harness  # noqa: E402
from mock_acs import MockAcs  # noqa: E402

CONFIG = """
[routes.acs-api]
action = "api"
connection_string_file = "acs.conn"
ca_file = "{ca_file}"
sender = "DoNotReply@contoso.azurecomm.test"
verified_domains = ["contoso.test"]
spool_directory = "{spool}"
max_request_bytes = {max_bytes}
time_budget = 120
request_timeout = 60

[[rules]]
name = "devices"
client_addr = ["127.0.0.2"]
route = "acs-api"
"""


def peak_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("no VmHWM")


def message(size_mb: float, recipients: list[str]) -> bytes:
    payload = os.urandom(int(size_mb * 1024 * 1024 * 3 / 4))  # base64 makes it size_mb
    encoded = base64.encodebytes(payload).replace(b"\n", b"\r\n")
    head = ("From: scanner@contoso.test\r\nTo: team@example.net\r\nSubject: big scan\r\n"
            "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b1\r\n\r\n"
            "--b1\r\nContent-Type: text/plain\r\n\r\nThe scan.\r\n"
            "--b1\r\nContent-Type: application/pdf; name=scan.pdf\r\n"
            "Content-Transfer-Encoding: base64\r\n"
            "Content-Disposition: attachment; filename=scan.pdf\r\n\r\n").encode()
    return head + encoded + b"--b1--\r\n"


class _Bench(harness.IntegrationTestCase):
    size_mb = 10.0
    recipients = 500
    result: dict = {}

    def test_memory(self) -> None:
        max_bytes = int(self.size_mb * 3 * 1024 * 1024)
        mock = MockAcs(verified_domains=("contoso.test", "contoso.azurecomm.test"),
                       max_request_bytes=max_bytes)
        mock.start()
        self.addCleanup(mock.stop)
        sink = self.start_sink("default")
        port = harness.free_port()
        self.write_config("acs.conn", mock.connection_string + "\n")
        spool = os.path.join(self.workdir(), "spool")
        os.makedirs(spool)
        milter = self.start_milter(port, harness.milter_config(port, CONFIG.format(
            ca_file=mock.ca_file, spool=spool, max_bytes=max_bytes)))
        postfix = self.start_postfix(default_sink=sink, milter_port=port,
                                     main_cf={"message_size_limit": 100 * 1024 * 1024})
        rcpts = [f"user{i:04d}@example.net" for i in range(self.recipients)]

        def send(data: bytes, to: list[str]) -> None:
            result = harness.smtp_session(postfix.smtpd_port, [("scanner@contoso.test", to, data)],
                                          source_addr="127.0.0.2", timeout=300)
            assert result[0].data and result[0].data[0] == 250, result

        send(message(0.01, ["a@example.net"]), ["a@example.net"])
        milter.wait_for_log(r"api=accepted")
        baseline = peak_rss_kib(milter.pid)
        big = message(self.size_mb, rcpts)
        mark = milter.log_mark()
        send(big, rcpts)
        line = milter.wait_for_log(r"api=\S+.*", timeout=300, since=mark).group(0)
        peak = peak_rss_kib(milter.pid)
        type(self).result = {"baseline_kib": baseline, "peak_kib": peak,
                             "message_bytes": len(big), "line": line,
                             "requests": len(mock.requests("send"))}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=float, default=10.0, help="message size in MB")
    parser.add_argument("--recipients", type=int, default=500)
    args = parser.parse_args(argv)
    _Bench.size_mb = args.size
    _Bench.recipients = args.recipients
    outcome = unittest.TextTestRunner(verbosity=0).run(_Bench("test_memory"))
    if not outcome.wasSuccessful() or not _Bench.result:
        return 1
    r = _Bench.result
    growth = (r["peak_kib"] - r["baseline_kib"]) * 1024
    print(f"message: {r['message_bytes'] / 1e6:.1f} MB to {args.recipients} recipients "
          f"({r['requests'] - 1} requests)")
    print(f"milter peak RSS: baseline {r['baseline_kib'] / 1024:.1f} MiB, "
          f"after the message {r['peak_kib'] / 1024:.1f} MiB, "
          f"growth {growth / 1e6:.1f} MB = {growth / r['message_bytes']:.2f} x the message")
    print(f"decision: {r['line'][:200]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
