#!/usr/bin/env python3
"""Memory of the milter: many idle milter connections, and many large API-routed messages.

Two measurements (issue 10, target 4), each with its own paas-milter (as in the integration
tests: tests/integration/harness.py, the loopback ACS mock), each printing one line for
tests/bench/run.sh's table:

    RESULT<TAB>name<TAB>value<TAB>unit<TAB>baseline<TAB>ratio<TAB>target<TAB>met

idle     --connections (1,000) milter connections opened straight to the milter's socket from
         this process, each doing what Postfix's smtpd does at session start: SMFIC_OPTNEG,
         then SMFIC_MACRO + SMFIC_CONNECT (waiting for the reply unless the milter
         negotiated SMFIP_NR_CONN), then held idle. Value: the milter's VmRSS with all of them
         open; baseline: its VmRSS before (idle, no connection). Target < 200 MB. Also
         printed: VmHWM, threads, RSS per connection, descriptors. The milter inherits this
         process's RLIMIT_NOFILE (raised to fit); --milter-nofile 1024 gives it what systemd
         gives a unit without LimitNOFILE=.
large    --messages (20) messages of --size MB (10^6 bytes; a binary attachment, base64 in
         the MIME) sent at once, one SMTP session each, through a private Postfix
         (message_size_limit raised) to the API route, against the ACS mock with
         max_request_bytes raised to --max-request-bytes (30 MiB, what ACS grants on
         request; the route's max_request_bytes too), answering each send after
         --service-latency s (2: all of them are in flight at once). The milter's VmRSS is
         sampled every --sample-ms (a thread reading /proc/PID/status); VmHWM (reset after
         the warm-up message through /proc/PID/clear_refs) catches what falls between
         samples. Value:
         peak RSS minus the idle baseline (after one small warm-up message: libraries, TLS,
         connection pool); baseline: the bytes in flight (messages x message size); ratio:
         value / bytes in flight, target < 2 ("a large message is never held whole more than
         once"). Checked: every SMTP transaction 250, one api=accepted decision per message,
         each message accepted by the mock exactly once (by subject, no duplicate), its
         attachment's SHA-256 the one sent. Also printed: the peak's split (anonymous, file
         mappings) and what stays resident 2 s after the last decision.

    sudo PAAS_MILTER_BIN=build/milter/paas-milter python3 tests/bench/memory.py
    sudo python3 tests/bench/memory.py --binary build/milter/paas-milter --only large \\
        --messages 5 --size 10 --recipients 120

A default run takes under a minute (2 cores). Root (postfix start); Python 3.11 standard
library. The ACS mock runs in this process: it holds every request it accepted until the end.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import re
import resource
import signal
import socket
import struct
import sys
import threading
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "integration"))
import harness  # noqa: E402
from mock_acs import MockAcs  # noqa: E402

MB = 1_000_000
IDLE_TARGET_MB = 200
LARGE_TARGET_RATIO = 2.0

CONFIG = """
[routes.acs-api]
action = "api"
connection_string_file = "acs.conn"
ca_file = "{ca_file}"
sender = "DoNotReply@contoso.azurecomm.test"
verified_domains = ["contoso.test"]
spool_directory = "{spool}"
max_request_bytes = {max_bytes}
max_concurrency = {max_concurrency}
time_budget = 240
request_timeout = 120

[[rules]]
name = "devices"
client_addr = ["127.0.0.2"]
route = "acs-api"
"""

# ---- the milter's memory, from /proc ---------------------------------------------------------

STATUS_FIELDS = ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem", "Threads")


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile, RssShmem (KiB) and Threads of PID."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in STATUS_FIELDS:
                out[name] = int(value.split()[0])
    return out


def reset_peak(pid: int) -> None:
    """VmHWM := VmRSS now (proc(5), clear_refs "5")."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


def mb(kib: float) -> float:
    return kib * 1024 / MB


class RssSampler(threading.Thread):
    """Reads PID's /proc status every INTERVAL s; keeps the sample with the highest VmRSS."""

    def __init__(self, pid: int, interval: float):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak: dict[str, int] = {}
        self.samples = 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            try:
                s = proc_status(self.pid)
            except OSError:
                return
            self.samples += 1
            if s.get("VmRSS", 0) > self.peak.get("VmRSS", -1):
                self.peak = s
            self._done.wait(self.interval)

    def stop(self) -> dict[str, int]:
        self._done.set()
        self.join()
        return self.peak


def raise_fd_limit(wanted: int) -> int:
    """Raises our soft RLIMIT_NOFILE towards WANTED (the milter inherits it). Returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        soft = new
    return soft


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def fd_limit_of(pid: int) -> str:
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                return " ".join(line.split()[3:5])
    return "?"


# ---- the MTA's side of the milter protocol (libmilter's mfdef.h) ---------------------------

SMFI_PROT_VERSION = 6
SMFI_CURR_ACTS = 0x000001FF
SMFI_CURR_PROT = 0x001FFFFF
SMFIP_NR_CONN = 0x00001000
SMFIR_CONTINUE = b"c"


def packet(command: bytes, data: bytes = b"") -> bytes:
    return struct.pack(">I", len(data) + 1) + command + data


def recv_exact(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise ConnectionError(f"the milter closed the connection ({len(out)}/{n} bytes)")
        out += chunk
    return bytes(out)


def recv_packet(sock: socket.socket) -> tuple[bytes, bytes]:
    (length,) = struct.unpack(">I", recv_exact(sock, 4))
    body = recv_exact(sock, length)
    return body[:1], body[1:]


def milter_session_start(port: int, n: int) -> socket.socket:
    """A connection to the milter as Postfix's smtpd opens one for a new SMTP client."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(packet(b"O", struct.pack(">III", SMFI_PROT_VERSION, SMFI_CURR_ACTS,
                                          SMFI_CURR_PROT)))
    command, data = recv_packet(sock)
    if command != b"O" or len(data) < 12:
        raise RuntimeError(f"connection {n}: no option negotiation answer ({command!r})")
    _, _, steps = struct.unpack(">III", data[:12])
    # milter_connect_macros' default: j {daemon_name} {daemon_addr} v _
    macros = b"".join(name + b"\0" + value + b"\0" for name, value in (
        (b"j", b"mx.localdomain"), (b"{daemon_name}", b"smtpd"),
        (b"{daemon_addr}", b"127.0.0.1"), (b"v", b"Postfix 3.7.11"),
        (b"_", f"client{n}.test [127.0.0.1]".encode())))
    client_port = 10000 + n % 50000
    connect = (f"client{n}.test".encode() + b"\0" + b"4" + struct.pack(">H", client_port) +
               b"127.0.0.1\0")
    sock.sendall(packet(b"D", b"C" + macros) + packet(b"C", connect))
    if not steps & SMFIP_NR_CONN:
        command, _ = recv_packet(sock)
        if command != SMFIR_CONTINUE:
            raise RuntimeError(f"connection {n}: the connect stage answered {command!r}")
    return sock


# ---- the messages -------------------------------------------------------------------------------

def message(size: int, subject: str, recipients: list[str]) -> tuple[bytes, str]:
    """A message of about SIZE bytes: a line of text and one binary attachment (random bytes,
    base64 in 76-character lines). Returns it and the attachment's SHA-256 (hex)."""
    payload = os.urandom(max(1, size * 3 * 76 // (4 * 78)))
    encoded = base64.encodebytes(payload).replace(b"\n", b"\r\n")
    head = (f"From: scanner@contoso.test\r\nTo: {', '.join(recipients[:3])}\r\n"
            f"Subject: {subject}\r\nMIME-Version: 1.0\r\n"
            "Content-Type: multipart/mixed; boundary=b1\r\n\r\n"
            "--b1\r\nContent-Type: text/plain\r\n\r\nThe scan.\r\n"
            "--b1\r\nContent-Type: application/pdf; name=scan.pdf\r\n"
            "Content-Transfer-Encoding: base64\r\n"
            "Content-Disposition: attachment; filename=scan.pdf\r\n\r\n").encode()
    return head + encoded + b"--b1--\r\n", hashlib.sha256(payload).hexdigest()


def wait_for_decisions(milter: harness.Milter, mark: int, count: int,
                       timeout: float) -> list[str]:
    """The milter's first COUNT decision lines for API messages (api=...) after MARK."""
    deadline = time.monotonic() + timeout
    while True:
        lines = re.findall(r"^.*\bapi=\S+.*$", milter.log(mark), re.M)
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.2)


# ---- the two measurements -----------------------------------------------------------------------

class _Bench(harness.IntegrationTestCase):
    args: argparse.Namespace
    results: dict = {}

    def start_api_milter(self, max_bytes: int) -> tuple[MockAcs, harness.Milter, int]:
        mock = MockAcs(verified_domains=("contoso.test", "contoso.azurecomm.test"),
                       max_request_bytes=max_bytes)
        mock.start()
        self.addCleanup(mock.stop)
        port = harness.free_port()
        self.write_config("acs.conn", mock.connection_string + "\n")
        spool = os.path.join(self.workdir(), "spool")
        os.makedirs(spool, exist_ok=True)
        milter = self.start_milter(port, harness.milter_config(port, CONFIG.format(
            ca_file=mock.ca_file, spool=spool, max_bytes=max_bytes,
            max_concurrency=self.args.max_concurrency)))
        return mock, milter, port

    def test_idle(self) -> None:
        n = self.args.connections
        if self.args.milter_nofile:
            # What the milter gets under systemd without LimitNOFILE= (1024 by default).
            _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (self.args.milter_nofile, hard))
        _, milter, port = self.start_api_milter(self.args.max_request_bytes)
        limit = raise_fd_limit(n + 256)
        time.sleep(1)
        before = proc_status(milter.pid)
        socks: list[socket.socket] = []
        started = time.monotonic()
        try:
            for i in range(n):
                socks.append(milter_session_start(port, i))
            opened = time.monotonic() - started
            time.sleep(self.args.settle)
            during = proc_status(milter.pid)
            fds = open_fds(milter.pid)
            # still all alive? a closed connection reads as EOF at once
            for s in socks:
                s.setblocking(False)
                try:
                    if s.recv(1) == b"":
                        raise AssertionError("the milter closed an idle connection")
                except BlockingIOError:
                    pass
        finally:
            for s in socks:
                try:
                    s.setblocking(True)
                    s.sendall(packet(b"Q"))
                except OSError:
                    pass
                s.close()
        time.sleep(1)
        after = proc_status(milter.pid)
        type(self).results["idle"] = {"before": before, "during": during, "after": after,
                                      "opened_s": opened, "fd_limit_bench": limit,
                                      "milter_fds": fds,
                                      "fd_limit_milter": fd_limit_of(milter.pid)}

    def test_large(self) -> None:
        a = self.args
        mock, milter, port = self.start_api_milter(a.max_request_bytes)
        sink = self.start_sink("default")
        postfix = self.start_postfix(default_sink=sink, milter_port=port, main_cf={
            "message_size_limit": 4 * int(a.size * MB) + 10 * MB,
            "milter_content_timeout": "600s"})

        def send(data: bytes, to: list[str], errors: list) -> None:
            try:
                result = harness.smtp_session(postfix.smtpd_port,
                                              [("scanner@contoso.test", to, data)],
                                              source_addr="127.0.0.2", timeout=600)
                if not (result[0].data and result[0].data[0] == 250):
                    errors.append(result)
            except Exception as exc:  # noqa: BLE001 -- reported below
                errors.append(exc)

        errors: list = []
        warm, _ = message(10_000, "warm-up", ["a@example.net"])
        send(warm, ["a@example.net"], errors)
        self.assertFalse(errors, errors)
        milter.wait_for_log(r"api=accepted")
        time.sleep(1)
        baseline = proc_status(milter.pid)
        reset_peak(milter.pid)
        if a.service_latency > 0:
            # A service that takes its time (a 25 MB upload over a WAN): every message is still
            # held when the last one arrives.
            mock.always(hold=a.service_latency, endpoint="send")

        rcpts = [f"user{i:04d}@example.net" for i in range(a.recipients)]
        messages, digests = [], {}
        for i in range(a.messages):
            subject = f"big scan {i:03d}"
            data, digests[subject] = message(int(a.size * MB), subject, rcpts)
            messages.append(data)
        size = sum(len(m) for m in messages)
        mark = milter.log_mark()
        sampler = RssSampler(milter.pid, a.sample_ms / 1000)
        sampler.start()
        started = time.monotonic()
        threads = [threading.Thread(target=send, args=(m, rcpts, errors)) for m in messages]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        lines = wait_for_decisions(milter, mark, a.messages, timeout=600)
        elapsed = time.monotonic() - started
        peak_sample = sampler.stop()
        hwm = proc_status(milter.pid)["VmHWM"]
        time.sleep(2)  # what stays resident once the messages are gone (malloc's free lists)
        settled = proc_status(milter.pid)
        del messages, threads
        self.assertFalse(errors, errors)
        self.assertEqual(len(lines), a.messages, lines)
        self.assertTrue(all("api=accepted" in line for line in lines), lines)

        # each message accepted by the mock exactly once, intact
        accepted = mock.accepted_messages()[1:]  # the warm-up first
        per_subject: dict[str, int] = {}
        for acc in accepted:
            self.assertFalse(acc.duplicate, acc.subject)
            per_subject[acc.subject] = per_subject.get(acc.subject, 0) + 1
            atts = acc.message.get("attachments") or []
            self.assertEqual(len(atts), 1, acc.subject)
            got = hashlib.sha256(base64.b64decode(atts[0]["contentInBase64"])).hexdigest()
            self.assertEqual(got, digests[acc.subject], acc.subject)
        requests_per_message = -(-max(1, a.recipients) // 50)
        self.assertEqual(sorted(per_subject), sorted(digests))
        self.assertTrue(all(k == requests_per_message for k in per_subject.values()),
                        per_subject)
        mock.reset()
        type(self).results["large"] = {"baseline": baseline, "peak_sample": peak_sample,
                                       "hwm": hwm, "bytes": size, "elapsed_s": elapsed,
                                       "settled": settled,
                                       "samples": sampler.samples,
                                       "requests": len(accepted)}


def result_line(name: str, value: str, unit: str, baseline: str, ratio: str, target: str,
                met: bool) -> str:
    return "\t".join(["RESULT", name, value, unit, baseline, ratio, target,
                      "yes" if met else "no"])


def report(args: argparse.Namespace, results: dict) -> list[str]:
    out, lines = [], []
    if "idle" in results:
        r = results["idle"]
        b, d, af = r["before"], r["during"], r["after"]
        n = args.connections
        out.append(f"== {n} idle milter connections (opened in {r['opened_s']:.1f} s; open files "
                   f"limit: bench {r['fd_limit_bench']}, milter {r['fd_limit_milter']})")
        for label, s in (("idle milter", b), (f"{n} open", d), ("after closing", af)):
            out.append(f"  {label:14s} VmRSS {mb(s['VmRSS']):7.1f} MB (anon {mb(s['RssAnon']):.1f}, "
                       f"file {mb(s['RssFile']):.1f})  VmHWM {mb(s['VmHWM']):7.1f} MB  "
                       f"threads {s['Threads']}")
        per = (d["VmRSS"] - b["VmRSS"]) * 1024 / n / 1000
        out.append(f"  per connection: {per:.1f} kB RSS; the milter had {r['milter_fds']} "
                   f"descriptors open")
        value = mb(d["VmRSS"])
        lines.append(result_line(f"RSS, {n} idle milter connections", f"{value:.0f}", "MB",
                                 f"{mb(b['VmRSS']):.0f}", f"{value / mb(b['VmRSS']):.2f}",
                                 f"< {IDLE_TARGET_MB} MB", value < IDLE_TARGET_MB))
    if "large" in results:
        r = results["large"]
        base, peak = r["baseline"], r["peak_sample"]
        flight = r["bytes"] / MB
        peak_kib = max(r["hwm"], peak.get("VmRSS", 0))
        growth = mb(peak_kib - base["VmRSS"])
        ratio = growth / flight
        out.append(f"== {args.messages} concurrent messages of {args.size:g} MB to "
                   f"{args.recipients} recipient(s) on the API route ({r['requests']} requests, "
                   f"service latency {args.service_latency:g} s, {r['elapsed_s']:.1f} s)")
        out.append(f"  bytes in flight {flight:.1f} MB; idle baseline VmRSS "
                   f"{mb(base['VmRSS']):.1f} MB")
        out.append(f"  peak VmRSS sampled every {args.sample_ms} ms ({r['samples']} samples): "
                   f"{mb(peak.get('VmRSS', 0)):.1f} MB (anon {mb(peak.get('RssAnon', 0)):.1f}, "
                   f"file {mb(peak.get('RssFile', 0)):.1f}, shmem "
                   f"{mb(peak.get('RssShmem', 0)):.1f}; threads {peak.get('Threads', 0)}); "
                   f"VmHWM {mb(r['hwm']):.1f} MB")
        out.append(f"  peak growth {growth:.1f} MB = {ratio:.2f} x the bytes in flight, "
                   f"{growth / args.messages:.1f} MB per message of {flight / args.messages:.1f} MB")
        out.append(f"  2 s after the last decision: VmRSS {mb(r['settled']['VmRSS']):.1f} MB "
                   f"(anon {mb(r['settled']['RssAnon']):.1f})")
        lines.append(result_line(
            f"peak RSS growth, {args.messages} concurrent {args.size:g} MB API messages",
            f"{growth:.0f}", "MB", f"{flight:.0f}", f"{ratio:.2f}",
            f"< {LARGE_TARGET_RATIO:g} x bytes in flight", ratio < LARGE_TARGET_RATIO))
    return out + [""] + lines


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=("idle", "large", "both"), default="both")
    p.add_argument("--binary", help="paas-milter to run (default: $PAAS_MILTER_BIN)")
    p.add_argument("--connections", type=int, default=1000, help="idle milter connections")
    p.add_argument("--milter-nofile", type=int, default=0,
                   help="start the milter with this soft RLIMIT_NOFILE (systemd's default is "
                        "1024); default: this process's")
    p.add_argument("--settle", type=float, default=2.0,
                   help="seconds to wait with every connection open before measuring")
    p.add_argument("--messages", type=int, default=20, help="concurrent large messages")
    p.add_argument("--size", type=float, default=25.0, help="message size in MB (10^6 bytes)")
    p.add_argument("--recipients", type=int, default=1,
                   help="recipients per large message (50 per ACS request)")
    p.add_argument("--max-request-bytes", type=int, default=30 * 1024 * 1024,
                   help="the route's and the mock's max_request_bytes")
    p.add_argument("--max-concurrency", type=int, default=32,
                   help="the route's max_concurrency (requests in flight)")
    p.add_argument("--service-latency", type=float, default=2.0,
                   help="seconds the ACS mock holds each accepted send before answering")
    p.add_argument("--sample-ms", type=int, default=50)
    args = p.parse_args(argv)
    if args.binary:
        os.environ["PAAS_MILTER_BIN"] = os.path.abspath(args.binary)
    if not harness.milter_binary():
        p.error("no milter binary: --binary or $PAAS_MILTER_BIN")
    _Bench.args = args
    # SIGTERM unwinds like Ctrl-C: the harness stops what it started (test cleanups, atexit).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    tests = ["test_idle", "test_large"] if args.only == "both" else [f"test_{args.only}"]
    ok = True
    for name in tests:
        outcome = unittest.TextTestRunner(verbosity=0).run(_Bench(name))
        ok = ok and outcome.wasSuccessful() and not outcome.skipped
    print("\n".join(report(args, _Bench.results)))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
