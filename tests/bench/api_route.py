#!/usr/bin/env python3
"""The API route under load: SMTP sessions -> private Postfix -> paas-milter -> the loopback
ACS mock with a fixed simulated service latency, against a naive HTTPS client.

What runs (loopback only, everything in one temp dir, stopped and removed on exit, failure,
Ctrl-C or SIGTERM; --keep keeps the dir):

* the ACS double (tests/integration/mock_acs.py MockAcs) in its OWN process (multiprocessing,
  spawn: its TLS, HMAC checks and JSON validation do not share a GIL with the SMTP clients
  that take the timings), with `always(delay=L)` on BOTH of its endpoints, "send" (POST
  /emails:send) and "status" (GET /emails/operations/{id}): every request is in progress L
  seconds before it is processed and answered -- a service latency on every request.
  (`hold=L` would delay the answer too, but after processing and with accept=True; and
  `always()` without `endpoint=` only delays the POSTs, not the status GETs.)
* a private Postfix (tests/integration/harness.py PrivatePostfix) with two smtpd listeners:
  the harness's, with smtpd_milters = paas-milter, and a second one with `-o smtpd_milters=`
  (Postfix alone). Messages that Postfix keeps (the references) go to recipients in
  baseline.test, which transport_maps sends to discard:, so no sink ever gets anything; the
  relayhost is an smtp-sink that must stay empty.
* paas-milter ($PAAS_MILTER_BIN, --binary) with one api route (connection string + the
  mock's CA) and the rule client_addr 127.0.0.2 -> the api route; messages from 127.0.0.1
  match no rule (pass-through).

Load: Python smtplib threads, one SMTP session per message, each thread sending its messages
back to back; all threads start together. For every message the client takes the time from
sending the end-of-data "." to the reply (where Postfix asks the milter for its end-of-message
verdict, and so where the milter's API work happens). Per max_concurrency value and per
session count N, three measurements:

  alone        Postfix without a milter (second listener), from 127.0.0.1
  passthrough  Postfix + paas-milter, no rule matches, from 127.0.0.1
  api          Postfix + paas-milter, api route, from 127.0.0.2 (the mock accepts it, the
               milter discards Postfix's copy)

each after an untimed warm-up of one message per session. msg/s = messages / (first
session start .. last reply). Added latency pX = the api measurement's pX minus the median
of the Postfix-alone measurement at the same N (per round, then the median over rounds):
everything the milter adds at the end of the message, as the client sees it. The reference's
median, not its own pX: its tail is the machine's noise, and it ran at several times the api
measurement's message rate. Not the pass-through measurement: the milter protocol's own
stalls at end of message (a delayed-ACK stall after a fast verdict, target 1's business)
would be subtracted from the API route, which does not have them; the difference to the
pass-through median is printed too.

Baseline: a naive client in this process sends, one message at a time, the same requests the
milter sent per message in the first api measurement (from the mock's request log: POST
/emails:send -> 202, or GET /emails/operations/{id} -> 404 first with lookup_before_post =
"always" or a fleet; the bodies are the milter's own, with a new Operation-Id and subject),
each over a NEW TLS connection (http.client.HTTPSConnection per request, the mock's CA,
HMAC-signed as the milter signs), against the same mock latency. Ratio = milter msg/s /
naive msg/s.

Checked on every run (a failure aborts with diagnostics): every SMTP reply 2xx/354 (no
tempfail, no reject), every api message accepted by the mock exactly once (by subject,
no re-execution), one decision line per message in the milter's log (api=accepted,
local_copy=discarded; action=none for pass-through), no message at the sink, the Postfix queue
empty at the end.

Printed: a table per max_concurrency (median over --rounds, min..max), and for each session
count what the mock saw: the requests of each message in order (its request log), background
status polls, requests in flight (peak, time-weighted mean), TLS connections, the mock's
service time, CPU per message of Postfix (every process of the instance), milter, mock,
clients and foreign load, the milter's peak thread count (libmilter's worker pool), and each
message's timeline: "." sent -> GET at the mock -> answered -> POST at the mock -> answered ->
reply at the client (waits for a max_concurrency slot show up before the GET and between the
two requests; the journal's fdatasync between them too). Then one line per figure for
tests/bench/run.sh:

    RESULT<TAB>name<TAB>value<TAB>unit<TAB>baseline<TAB>ratio<TAB>target<TAB>met

(`-` where a field does not apply; figures without a target have target and met `-`; a
max_concurrency other than the default 8 is named in the figure's name).

Options for the analysis: --max-concurrency 8,32,128 (one milter each), --lookup-before-post
always (a status check before every post: two round trips per message), --status-latency-ms
(the status checks' own latency), --state-directory
/dev/shm/DIR (the journal without a disk's fdatasync), --mock-nagle (the integration tests'
mock as it is: every request on a reused connection stalls ~40 ms on a delayed ACK).
A default run (3 rounds) takes about 100 s.

    sudo PAAS_MILTER_BIN=build/milter/paas-milter python3 tests/bench/api_route.py
    sudo python3 tests/bench/api_route.py --max-concurrency 8,32 --sessions 20,100 --rounds 1

Root (postfix start, smtp-sink -u postfix); Python 3.11 standard library only.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import email.utils
import http.client
import json
import math
import multiprocessing
import os
import platform
import re
import shutil
import signal
import smtplib
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(REPO, "tests", "integration"))

import harness  # noqa: E402  (tests/integration/harness.py)
from bench_common import (BenchError, load_average_warned,  # noqa: E402
                          run_bench)
import mock_acs  # noqa: E402  (tests/integration/mock_acs.py)

sys.path.insert(0, HERE)
from throughput import CpuSampler  # noqa: E402  (tests/bench/throughput.py)

SENDER = "scanner@contoso.test"
API_SOURCE = "127.0.0.2"        # the rule's client_addr: api route
PLAIN_SOURCE = "127.0.0.1"      # no rule matches
BASELINE_DOMAIN = "baseline.test"  # transport_maps -> discard:
API_RCPT_DOMAIN = "example.net"
DEFAULT_MAX_CONCURRENCY = 8     # lib/paasmilter/config_api.cpp

MILTER_BODY = """
[routes.acs-api]
action = "api"
connection_string_file = "{conn_file}"
ca_file = "{ca_file}"
sender = "DoNotReply@contoso.azurecomm.test"
verified_domains = ["contoso.test"]
spool_directory = "{spool}"
max_concurrency = {max_concurrency}
{lookup}
[[rules]]
name = "bench-api"
client_addr = ["{api_source}"]
route = "acs-api"
"""

API_DECISION_RE = re.compile(r"rule=bench-api, route=acs-api, action=api\b.*\bapi=(\S+?),"
                             r" requests=(\d+), status_checks=(\d+)")
NONE_DECISION_RE = re.compile(r"rule=\(none\), route=\(none\), action=none")


# --------------------------------------------------------------------------------------------
# the ACS double, in its own process
# --------------------------------------------------------------------------------------------

def _mock_process(conn, tmpdir: str, send_delay: float, status_delay: float,
                  nagle: bool) -> None:
    """Runs in the child: a MockAcs whose records also carry the time they were answered,
    and whose connections have TCP_NODELAY unless NAGLE."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops it
    tempfile.tempdir = tmpdir  # its TLS material goes below the bench's temp dir

    class BenchMockAcs(mock_acs.MockAcs):
        def _register_connection(self, sock: Any) -> int:
            # http.server writes a response's header block and its body in two send()s. With
            # Nagle's algorithm on, the body waits for the ACK of the headers, which a client
            # on a warm keep-alive connection delays (Linux: 40 ms): 44 ms added to every
            # request of a connection-reusing client (the milter), none to a client with a
            # fresh connection per request (in quick-ACK mode). A real service answers at
            # once, so the bench's mock does too.
            if not nagle:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return super()._register_connection(sock)

        def _finish_record(self, rec: Any) -> None:
            rec.done_time = time.time()
            super()._finish_record(rec)

    mock = BenchMockAcs(verified_domains=("contoso.test", "contoso.azurecomm.test"),
                        idle_timeout=900.0)
    mock.start()
    try:
        if send_delay > 0:
            mock.always(delay=send_delay, endpoint="send")
        if status_delay > 0:
            mock.always(delay=status_delay, endpoint="status")
        conn.send({"endpoint": mock.endpoint, "host": mock.host, "port": mock.port,
                   "ca_file": mock.ca_file, "connection_string": mock.connection_string,
                   "access_key": mock.access_key, "pid": os.getpid()})
        while True:
            try:
                cmd, *args = conn.recv()
            except EOFError:
                return
            if cmd == "stop":
                return
            if cmd == "marks":
                with mock._lock:
                    conn.send((len(mock._requests), len(mock._accepted)))
            elif cmd == "since":
                req_from, acc_from = args
                with mock._lock:
                    reqs = list(mock._requests[req_from:])
                    accs = list(mock._accepted[acc_from:])
                conn.send((
                    [(r.seq, r.time, getattr(r, "done_time", None), r.method, r.route, r.status,
                      r.connection_id, r.operation_id, r.accepted, r.duplicate, r.target,
                      r.body if r.route == "send" and r.accepted else b"") for r in reqs],
                    [(a.operation_id, a.subject, a.recipients(), a.execution) for a in accs]))
            else:
                conn.send(("error", f"unknown command {cmd!r}"))
    finally:
        mock.stop()


@dataclasses.dataclass
class Req:
    seq: int
    start: float          # wall clock, after the request's body was read
    done: float | None    # wall clock, answered (or dropped)
    method: str
    route: str
    status: int | None
    conn: int
    op: str | None
    accepted: bool
    duplicate: bool
    target: str
    body: bytes


class MockProcess:
    def __init__(self, tmpdir: str, send_delay: float, status_delay: float, nagle: bool):
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_mock_process, args=(child, tmpdir, send_delay,
                                                           status_delay, nagle),
                                name="mock-acs", daemon=True)
        self.proc.start()
        child.close()
        if not self._conn.poll(60):
            self.stop()
            raise BenchError("the ACS mock process did not start within 60 s")
        self.info: dict[str, Any] = self._conn.recv()
        self.lock = threading.Lock()

    def call(self, *cmd: Any) -> Any:
        with self.lock:
            self._conn.send(cmd)
            if not self._conn.poll(60):
                raise BenchError(f"the ACS mock process did not answer {cmd[0]!r}")
            return self._conn.recv()

    def marks(self) -> tuple[int, int]:
        return self.call("marks")

    def since(self, marks: tuple[int, int]) -> tuple[list[Req], list[tuple]]:
        reqs, accs = self.call("since", *marks)
        return [Req(*r) for r in reqs], accs

    @property
    def pid(self) -> int:
        return self.info["pid"]

    def stop(self) -> None:
        if self.proc.is_alive():
            with contextlib.suppress(Exception):
                self._conn.send(("stop",))
            self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------

def thread_count(pid: int | None) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return 0


def percentile(values: list[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * p / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def fs_type(path: str) -> str:
    path = os.path.realpath(path)
    best, kind = "", "?"
    with contextlib.suppress(OSError), open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            mnt = parts[1].replace("\\040", " ")
            if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                best, kind = mnt, parts[2]
    return kind


def fdatasync_probe(directory: str, count: int = 40) -> tuple[float, float]:
    """(p50, p99) ms of append + fdatasync in DIRECTORY: what the milter's journal of posted
    requests pays once per POST (posted_requests.cpp, under one mutex)."""
    path = os.path.join(directory, ".bench-fdatasync-probe")
    times = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for i in range(count):
            t = time.perf_counter()
            os.write(fd, f"P {uuid.uuid4()} {i} - 0\n".encode())
            os.fdatasync(fd)
            times.append((time.perf_counter() - t) * 1000)
    finally:
        os.close(fd)
        os.unlink(path)
    return percentile(times, 50), percentile(times, 99)


class LogFollower:
    """Complete new lines of a growing file, from a byte offset on."""

    def __init__(self, path: str, offset: int):
        self.path, self.offset, self.partial = path, offset, b""

    def lines(self) -> list[str]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        data = self.partial + data
        cut = data.rfind(b"\n") + 1
        self.partial = data[cut:]
        return data[:cut].decode("utf-8", "replace").splitlines()


# --------------------------------------------------------------------------------------------
# SMTP load
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Sent:
    subject: str
    rcpt: str
    ok: bool
    eod: float | None     # s from sending "." to the reply
    reply: str            # the failing or final reply, for diagnostics
    eod_wall: float = 0.0  # wall clock when "." was sent (to line up with the mock's log)
    session: float = 0.0   # s from connect to the end of QUIT


def make_message(subject: str, rcpt: str, body_bytes: int) -> bytes:
    line = "The quick brown fox jumps over the lazy dog, again and again and again.\r\n"
    body = (line * (body_bytes // len(line) + 1))[:body_bytes]
    return (f"From: Scanner <{SENDER}>\r\nTo: <{rcpt}>\r\nSubject: {subject}\r\n"
            f"Message-ID: <{uuid.uuid4()}@client.test>\r\n"
            f"Date: {email.utils.formatdate(localtime=False)}\r\n"
            f"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
            f"{body}\r\n").encode()


def smtp_one(port: int, source: str, rcpt: str, data: bytes,
             timeout: float) -> tuple[bool, float | None, str, float]:
    """One SMTP session with one transaction. (ok, seconds "." -> reply, last reply, wall
    clock when "." was sent)."""
    try:
        with smtplib.SMTP("127.0.0.1", port, local_hostname="bench.test", timeout=timeout,
                          source_address=(source, 0)) as s:
            code, text = s.ehlo()
            if code != 250:
                return False, None, f"EHLO {code} {text!r}", 0.0
            code, text = s.mail(SENDER)
            if code != 250:
                return False, None, f"MAIL {code} {text!r}", 0.0
            code, text = s.rcpt(rcpt)
            if code not in (250, 251):
                return False, None, f"RCPT {code} {text!r}", 0.0
            s.putcmd("data")
            code, text = s.getreply()
            if code != 354:
                return False, None, f"DATA {code} {text!r}", 0.0
            # as smtplib.SMTP.data() does it, with the clock around the last step
            q = smtplib._quote_periods(data)  # type: ignore[attr-defined]
            if q[-2:] != b"\r\n":
                q += b"\r\n"
            q += b".\r\n"
            wall = time.time()
            t0 = time.perf_counter()
            s.send(q)
            code, text = s.getreply()
            eod = time.perf_counter() - t0
            reply = f"{code} {text.decode('utf-8', 'replace')}"
            if code != 250:
                return False, eod, f". {reply}", wall
            with contextlib.suppress(smtplib.SMTPException, OSError):
                s.quit()
            return True, eod, reply, wall
    except (smtplib.SMTPException, OSError) as exc:
        return False, None, f"{type(exc).__name__}: {exc}", 0.0


@dataclasses.dataclass
class Load:
    sent: list[Sent]
    wall: float           # first session start .. last reply, s
    t_begin: float        # wall clock
    t_end: float

    @property
    def rate(self) -> float:
        return len(self.sent) / self.wall if self.wall > 0 else float("nan")

    def eods(self) -> list[float]:
        return [s.eod for s in self.sent if s.ok and s.eod is not None]

    def failures(self) -> list[Sent]:
        return [s for s in self.sent if not s.ok]


def run_load(port: int, source: str, sessions: int, per_session: int, tag: str,
             rcpt_domain: str, body_bytes: int, timeout: float) -> Load:
    """SESSIONS threads, each PER_SESSION messages back to back, one SMTP session each."""
    results: list[list[Sent]] = [[] for _ in range(sessions)]
    barrier = threading.Barrier(sessions + 1)
    smtp_timeout = max(60.0, timeout)

    def worker(i: int) -> None:
        rcpt = f"customer-{i}@{rcpt_domain}"
        messages = [(f"{tag} s{i} m{k}", make_message(f"{tag} s{i} m{k}", rcpt, body_bytes))
                    for k in range(per_session)]
        barrier.wait()
        for subject, data in messages:
            started = time.perf_counter()
            ok, eod, reply, wall = smtp_one(port, source, rcpt, data, smtp_timeout)
            results[i].append(Sent(subject, rcpt, ok, eod, reply, wall,
                                   time.perf_counter() - started))

    threads = [threading.Thread(target=worker, args=(i,), daemon=True, name=f"smtp-{i}")
               for i in range(sessions)]
    for t in threads:
        t.start()
    barrier.wait()
    t_begin, p0 = time.time(), time.perf_counter()
    deadline = p0 + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.perf_counter()))
    if any(t.is_alive() for t in threads):
        done = sum(len(r) for r in results)
        raise BenchError(f"{tag}: {done} of {sessions * per_session} messages after "
                         f"{timeout:.0f} s (--timeout)")
    wall = time.perf_counter() - p0
    return Load([s for r in results for s in r], wall, t_begin, time.time())


# --------------------------------------------------------------------------------------------
# the naive client
# --------------------------------------------------------------------------------------------

def naive_client(info: dict[str, Any], bodies: list[bytes], count: int, api_version: str,
                 tag: str, lookup: bool) -> tuple[float, list[float], list[str]]:
    """COUNT messages one at a time, each: GET the operation (404) when LOOKUP, then POST it
    (202), every request over a new TLS connection. (msg/s, per-message seconds, problems)."""
    ctx = ssl.create_default_context(cafile=info["ca_file"])
    host, port, key = info["host"], info["port"], info["access_key"]
    problems: list[str] = []

    def request(method: str, target: str, body: bytes, extra: dict[str, str]) -> int:
        date = email.utils.formatdate(usegmt=True)
        digest = mock_acs.content_hash(body)
        signature = mock_acs.hmac_signature(key, method, target, date, host, digest)
        headers = {"Host": host, "x-ms-date": date, "x-ms-content-sha256": digest,
                   "Authorization": f"HMAC-SHA256 SignedHeaders={mock_acs.SIGNED_HEADERS}"
                                    f"&Signature={signature}",
                   "x-ms-client-request-id": str(uuid.uuid4()), **extra}
        conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=60)
        try:
            conn.request(method, target, body=body if method == "POST" else None, headers=headers)
            response = conn.getresponse()
            response.read()
            return response.status
        finally:
            conn.close()

    latencies = []
    t0 = time.perf_counter()
    for i in range(count):
        message = json.loads(bodies[i % len(bodies)])
        message["content"]["subject"] = f"{tag} {i}"
        body = json.dumps(message, separators=(",", ":")).encode()
        operation_id = str(uuid.uuid4())
        started = time.perf_counter()
        if lookup:
            status = request("GET",
                             f"/emails/operations/{operation_id}?api-version={api_version}",
                             b"", {})
            if status != 404:
                problems.append(f"naive GET {operation_id}: HTTP {status}, expected 404")
        status = request("POST", f"/emails:send?api-version={api_version}", body,
                         {"Content-Type": "application/json", "Operation-Id": operation_id,
                          "Repeatability-Request-Id": str(uuid.uuid4()),
                          "Repeatability-First-Sent": email.utils.formatdate(usegmt=True)})
        if status != 202:
            problems.append(f"naive POST {operation_id}: HTTP {status}, expected 202")
        latencies.append(time.perf_counter() - started)
    return count / (time.perf_counter() - t0), latencies, problems


# --------------------------------------------------------------------------------------------
# the benchmark
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Phase:
    """One measurement: KIND (alone/passthrough/api) at SESSIONS, max_concurrency MC."""
    kind: str
    sessions: int
    mc: int
    round: int
    load: Load
    cpu: dict[str, float]
    mock: dict[str, Any] = dataclasses.field(default_factory=dict)


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.workdir = tempfile.mkdtemp(prefix="paas-bench-api-", dir=args.tmpdir)
        os.chmod(self.workdir, 0o755)  # the postfix user must traverse it
        self.run_id = uuid.uuid4().hex[:6]
        self.sink: harness.Sink | None = None
        self.postfix: harness.PrivatePostfix | None = None
        self.milter: harness.Milter | None = None
        self.mock: MockProcess | None = None
        self.alone_port = 0
        self.milter_port = 0
        self.state_dir = ""
        self.api_sent: list[Sent] = []        # every api message (warm-ups included)
        self.naive_subjects: list[str] = []
        self.seen_conns: set[int] = set()
        self.milter_bodies: list[bytes] = []
        self.milter_shape = ""  # e.g. "GET 404 -> POST 202"
        self.api_version = "2023-03-31"
        self.warnings: list[str] = []
        self.notes: list[str] = []

    # -- setup / teardown ---------------------------------------------------------------------
    def setup(self) -> None:
        a = self.args
        mock_tmp = os.path.join(self.workdir, "mock")
        os.makedirs(mock_tmp)
        self.mock = MockProcess(mock_tmp, a.latency_ms / 1000, a.status_latency_ms / 1000,
                                a.mock_nagle)
        self.sink = harness.Sink(self.workdir, "relayhost")
        harness._LIVE.add(self.sink)
        self.sink.start()
        self.milter_port = harness.free_port()
        self.postfix = harness.PrivatePostfix(
            self.workdir, default_sink_port=self.sink.port, use_milter=True,
            milter_port=self.milter_port, ipv6=False,
            main_cf={"transport_maps": f"inline:{{{BASELINE_DOMAIN}=discard:}}",
                     # Postfix's default; the harness lowers it for quick tests
                     "milter_connect_timeout": "30s"})
        self.alone_port = harness.free_port()
        with open(self.postfix.master_cf, "a") as f:
            f.write("# tests/bench/api_route.py: Postfix alone\n"
                    f"127.0.0.1:{self.alone_port} inet n - n - - smtpd\n"
                    "  -o smtpd_milters=\n")
        harness._backdate(self.postfix.master_cf)
        self.postfix.start()
        harness.wait_listening(self.alone_port, what="smtpd without milter")
        limit = self.postfix.postconf("default_process_limit")["default_process_limit"]
        if max(a.sessions) > int(limit):
            self.notes.append(f"Postfix default_process_limit {limit} < {max(a.sessions)} "
                              "sessions: the rest wait in the listen queue")
        self.state_dir = a.state_directory or os.path.join(self.workdir, "milter-state")
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        # A gateway in its steady state: a journal of posted requests started longer ago
        # than its retention (6 days). A new journal cannot know what was posted before it,
        # so for its first 6 days every first attempt asks the service before posting.
        journal = os.path.join(self.state_dir, "posted-requests.journal")
        if not os.path.exists(journal):
            week_ago_ms = int((time.time() - 7 * 86400) * 1000)
            fd = os.open(journal, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(f"D {week_ago_ms}\n")
        self.conn_file = os.path.join(self.workdir, "acs.conn")
        fd = os.open(self.conn_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.mock.info["connection_string"] + "\n")
        self.spool = os.path.join(self.workdir, "spool")
        os.makedirs(self.spool)

    def start_milter(self, mc: int) -> None:
        self.stop_milter()
        d = os.path.join(self.workdir, f"milter-mc{mc}")
        os.makedirs(d, exist_ok=True)
        config = os.path.join(d, "paas-milter.toml")
        with open(config, "w") as f:
            f.write(harness.milter_config(self.milter_port, MILTER_BODY.format(
                conn_file=self.conn_file, ca_file=self.mock.info["ca_file"], spool=self.spool,
                max_concurrency=mc, api_source=API_SOURCE,
                lookup=(f'lookup_before_post = "{self.args.lookup_before_post}"\n'
                        if self.args.lookup_before_post else ""))))
        self.milter = harness.Milter(config, self.milter_port, binary=self.args.binary,
                                     log_path=os.path.join(d, "paas-milter.log"),
                                     env={**os.environ, "STATE_DIRECTORY": self.state_dir})
        harness._LIVE.add(self.milter)
        self.milter.start()

    def stop_milter(self) -> None:
        if self.milter:
            self.milter.stop()
            self.milter = None

    def teardown(self) -> None:
        # Postfix before the milter: with no MTA connection left, the milter exits at once
        for step in (lambda: self.postfix and self.postfix.stop(), self.stop_milter,
                     lambda: self.mock and self.mock.stop(),
                     lambda: self.sink and self.sink.stop()):
            try:
                step()
            except Exception as exc:  # keep cleaning up
                print(f"api_route: cleanup: {exc}", file=sys.stderr)
        deadline = time.monotonic() + 2  # Postfix daemons re-parented to us (subreaper)
        while time.monotonic() < deadline:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                time.sleep(0.05)
        if self.args.keep:
            print(f"api_route: kept {self.workdir}", file=sys.stderr)
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # -- one measurement ----------------------------------------------------------------------
    def diagnostics(self) -> str:
        parts = []
        with contextlib.suppress(Exception):
            parts.append(self.postfix.diagnostics(30))
        if self.milter:
            with contextlib.suppress(Exception):
                parts.append(self.milter.diagnostics(20))
        return "\n".join(parts)

    def measure(self, kind: str, sessions: int, mc: int, rnd: int) -> Phase:
        a = self.args
        port = self.alone_port if kind == "alone" else self.postfix.smtpd_port
        source = API_SOURCE if kind == "api" else PLAIN_SOURCE
        domain = API_RCPT_DOMAIN if kind == "api" else BASELINE_DOMAIN
        tag = f"{self.run_id} mc{mc} r{rnd} n{sessions} {kind}"
        per_session = a.messages_per_session or max(4, math.ceil(a.min_messages / sessions))
        # untimed warm-up: one message per session (smtpd processes, milter threads, HTTP
        # connections up to max_concurrency, TLS session)
        warm = run_load(port, source, sessions, 1, tag + " warm", domain, a.size, a.timeout)
        self.check_smtp(tag + " warm-up", warm)
        if kind == "api":
            self.api_sent.extend(warm.sent)
        milter_log = LogFollower(self.milter.log_path, self.milter.log_mark())
        marks = self.mock.marks()
        # CPU of every part: Postfix (all processes of the instance), milter, mock process,
        # this process (the SMTP clients), and the machine (foreign load included)
        sampler_cpu = CpuSampler(self.postfix.master_pid(),
                                 {"milter": self.milter.pid, "mock": self.mock.pid})
        sampler_cpu.start()
        peak_threads = [0]
        stop_sampling = threading.Event()

        def sample_threads() -> None:  # libmilter's worker pool grows with the load
            ticks = 0
            while not stop_sampling.wait(0.02):
                peak_threads[0] = max(peak_threads[0], thread_count(self.milter.pid))
                ticks += 1
                if ticks % 12 == 0:
                    sampler_cpu.sample()

        sampler = threading.Thread(target=sample_threads, daemon=True)
        sampler.start()
        try:
            load = run_load(port, source, sessions, per_session, tag, domain, a.size, a.timeout)
        finally:
            stop_sampling.set()
            sampler.join()
        cpu = sampler_cpu.stop()
        cpu["milter_threads"] = peak_threads[0]
        self.check_smtp(tag, load)
        phase = Phase(kind, sessions, mc, rnd, load, cpu)
        time.sleep(0.3)  # the decision lines of the last messages
        lines = milter_log.lines()
        if kind == "api":
            self.api_sent.extend(load.sent)
            self.check_api(tag, phase, marks, lines)
        elif kind == "passthrough":
            n = sum(1 for ln in lines if NONE_DECISION_RE.search(ln))
            if n != len(load.sent):
                raise BenchError(f"{tag}: {n} pass-through decision lines in the milter log, "
                                 f"expected {len(load.sent)}\n{self.diagnostics()}")
        self.warnings.extend(f"{tag}: milter: {ln}" for ln in lines
                             if re.search(r"(?i)\b(error|warning)\b", ln))
        return phase

    def check_smtp(self, tag: str, load: Load) -> None:
        bad = load.failures()
        if bad:
            tempfails = sum(1 for s in bad if re.search(r"\b4\d\d\b", s.reply))
            raise BenchError(f"{tag}: {len(bad)} of {len(load.sent)} SMTP transactions failed "
                             f"({tempfails} with a 4xx), e.g. {bad[0].subject}: {bad[0].reply}\n"
                             f"{self.diagnostics()}")

    def check_api(self, tag: str, phase: Phase, marks: tuple[int, int], lines: list[str]) -> None:
        load = phase.load
        reqs, accs = self.mock.since(marks)
        problems = []
        subjects = collections.Counter(acc[1] for acc in accs)
        want = {s.subject for s in load.sent}
        missing = want - set(subjects)
        extra = set(subjects) - want
        twice = {s: n for s, n in subjects.items() if n > 1}
        reexecuted = [acc for acc in accs if acc[3] > 1]
        if missing:
            problems.append(f"{len(missing)} message(s) not accepted by the mock, e.g. "
                            f"{sorted(missing)[:3]}")
        if extra:
            problems.append(f"the mock accepted {len(extra)} unexpected message(s), e.g. "
                            f"{sorted(extra)[:3]}")
        if twice or reexecuted:
            problems.append(f"accepted more than once: {list(twice.items())[:3]} "
                            f"{reexecuted[:3]}")
        rcpt_of = {s.subject: s.rcpt for s in load.sent}
        wrong_rcpt = [acc for acc in accs if acc[1] in want and acc[2] != [rcpt_of[acc[1]]]]
        if wrong_rcpt:
            problems.append(f"{len(wrong_rcpt)} accepted with other recipients, e.g. "
                            f"{wrong_rcpt[0]}")
        decisions = [m for ln in lines if (m := API_DECISION_RE.search(ln))]
        if len(decisions) != len(load.sent) or any(m.group(1) != "accepted" for m in decisions):
            problems.append(f"{len(decisions)} api decision lines (outcomes "
                            f"{collections.Counter(m.group(1) for m in decisions)}), expected "
                            f"{len(load.sent)} accepted")
        discarded = sum(1 for ln in lines if "local_copy=discarded" in ln)
        if discarded != len(load.sent):
            problems.append(f"{discarded} decision lines with local_copy=discarded, expected "
                            f"{len(load.sent)}")
        if problems:
            raise BenchError(f"{tag}: " + "; ".join(problems) + f"\n{self.diagnostics()}")
        # -- what the service saw, for the report
        ops = {acc[0] for acc in accs}
        by_op: dict[str, list[Req]] = collections.defaultdict(list)
        for r in reqs:
            if r.op in ops:
                by_op[r.op].append(r)
        shapes = collections.Counter()
        for op in ops:
            during = [r for r in sorted(by_op[op], key=lambda r: r.seq) if r.start <= load.t_end]
            shapes[" -> ".join(f"{r.method} {r.status}" for r in during)] += 1
        window = [r for r in reqs if r.start < load.t_end and (r.done or r.start) > load.t_begin]
        conns = {r.conn for r in window}
        new_conns = conns - self.seen_conns
        self.seen_conns |= {r.conn for r in reqs}
        events = sorted([(r.start, 1) for r in window] + [(r.done or r.start, -1) for r in window])
        inflight = peak = 0
        for _, step in events:
            inflight += step
            peak = max(peak, inflight)
        # time-weighted mean in flight over the measurement window
        busy = sum(min(r.done or r.start, load.t_end) - max(r.start, load.t_begin) for r in window)
        service = {m: [((r.done or r.start) - r.start) * 1000 for r in window if r.method == m
                       and r.done] for m in ("GET", "POST")}
        polls = sum(1 for r in window if r.method == "GET" and r.status == 200)
        # each message's timeline: "." sent -> each request of the transaction at the mock
        # (arrived, answered) -> reply at the client (wall clocks of two processes on one
        # machine); waits between the requests are the milter's (slots, journal, signing)
        op_of = {acc[1]: acc[0] for acc in accs}
        segments: dict[str, list[float]] = collections.defaultdict(list)
        for sent in load.sent:
            if sent.eod is None:
                continue
            end = sent.eod_wall + sent.eod
            rs = [r for r in sorted(by_op.get(op_of.get(sent.subject, ""), []),
                                    key=lambda r: r.seq) if r.start <= end and r.done]
            if not rs:
                continue
            segments[f"before {rs[0].method}"].append((rs[0].start - sent.eod_wall) * 1000)
            for k, r in enumerate(rs):
                if k:
                    segments[f"{rs[k - 1].method}->{r.method}"].append(
                        (r.start - rs[k - 1].done) * 1000)
                segments[r.method].append((r.done - r.start) * 1000)
            segments[f"after {rs[-1].method}"].append((end - rs[-1].done) * 1000)
        phase.mock = {
            "shapes": shapes, "peak": peak, "mean_inflight": busy / max(1e-9, load.wall),
            "conns": len(conns), "new_conns": len(new_conns), "polls": polls,
            "requests": len(window),
            "service_ms": {m: statistics.median(v) if v else float("nan")
                           for m, v in service.items()},
            "decision_requests": collections.Counter((int(m.group(2)), int(m.group(3)))
                                                     for m in decisions),
            "segments": {k: (percentile(v, 50), percentile(v, 90)) for k, v in segments.items()},
        }
        if not self.milter_bodies:
            self.milter_bodies = [r.body for r in reqs if r.route == "send" and r.body][:50]
            # what the naive client repeats: the milter's requests of a message
            self.milter_shape = shapes.most_common(1)[0][0]
            posts = [r for r in reqs if r.route == "send"]
            if posts:
                m = re.search(r"api-version=([0-9-]+)", posts[0].target)
                if m:
                    self.api_version = m.group(1)

    def naive(self, rnd: int) -> tuple[float, list[float]]:
        if not self.milter_bodies:
            raise BenchError("no request body of the milter's to replay")
        tag = f"{self.run_id} naive r{rnd}"
        marks = self.mock.marks()
        if self.milter_shape not in ("POST 202", "GET 404 -> POST 202"):
            raise BenchError(f"the milter's requests per message are {self.milter_shape!r}: "
                             "the naive client knows 'POST 202' and 'GET 404 -> POST 202'")
        lookup = self.milter_shape.startswith("GET")
        rate, latencies, problems = naive_client(self.mock.info, self.milter_bodies,
                                                 self.args.naive_messages, self.api_version, tag,
                                                 lookup)
        reqs, accs = self.mock.since(marks)
        subjects = collections.Counter(acc[1] for acc in accs)
        want = {f"{tag} {i}" for i in range(self.args.naive_messages)}
        if {s for s in subjects if s.startswith(tag)} != want or \
                any(subjects[s] != 1 for s in want):
            problems.append(f"naive: the mock accepted {sum(subjects[s] for s in want)} of "
                            f"{len(want)} naive messages (each once expected)")
        new_conns = {r.conn for r in reqs} - self.seen_conns
        self.seen_conns |= {r.conn for r in reqs}
        if problems:
            raise BenchError("; ".join(problems[:5]))
        self.naive_subjects.extend(want)
        self.notes.append(f"naive round {rnd}: {self.milter_shape} per message as the milter "
                          f"does it, {len(new_conns)} TLS connections for "
                          f"{(2 if lookup else 1) * self.args.naive_messages} requests")
        return rate, latencies

    def final_checks(self) -> None:
        problems = []
        # the queue drains (pass-through and Postfix-alone mail goes to discard:)
        try:
            self.postfix.wait_for_empty_queue(timeout=30)
        except AssertionError as exc:
            problems.append(f"the Postfix queue is not empty: {str(exc)[:500]}")
        if self.sink.messages():
            problems.append(f"{len(self.sink.messages())} message(s) at the sink (relayhost)")
        reqs, accs = self.mock.since((0, 0))
        subjects = collections.Counter(acc[1] for acc in accs)
        api_subjects = {s.subject for s in self.api_sent}
        if len(api_subjects) != len(self.api_sent):
            problems.append("duplicate subjects among the api messages sent")
        twice = {s: n for s, n in subjects.items() if n > 1}
        if twice:
            problems.append(f"{len(twice)} subject(s) accepted more than once over the run, "
                            f"e.g. {list(twice.items())[:3]}")
        if set(subjects) != api_subjects | set(self.naive_subjects):
            problems.append(f"the mock accepted {len(subjects)} distinct messages over the run, "
                            f"expected {len(api_subjects) + len(self.naive_subjects)}")
        if any(acc[3] > 1 for acc in accs):
            problems.append("re-executed operations at the mock")
        maillog = self.postfix.maillog()
        bad = re.findall(r"^.*(?:status=(?:deferred|bounced)|milter-reject|\breject: |"
                         r"\b(?:fatal|panic):).*$", maillog, re.M)
        if bad:
            problems.append("failures in the maillog:\n" + "\n".join(bad[:10]))
        if problems:
            raise BenchError("final checks: " + "; ".join(problems) + f"\n{self.diagnostics()}")
        sends = sum(1 for r in reqs if r.route == "send")
        gets = collections.Counter(r.status for r in reqs if r.route == "status")
        self.notes.append(f"whole run at the mock: {len(accs)} messages accepted, {sends} POST "
                          f"/emails:send, GET /emails/operations/{{id}} by status "
                          f"{dict(sorted(gets.items(), key=lambda kv: str(kv[0])))}")

    # -- the whole run ------------------------------------------------------------------------
    def run(self) -> tuple[list[Phase], list[tuple[float, list[float]]]]:
        a = self.args
        phases: list[Phase] = []
        naive: list[tuple[float, list[float]]] = []
        for rnd in range(1, a.rounds + 1):
            for mc in a.max_concurrency:
                self.start_milter(mc)
                for n in a.sessions:
                    order = ["alone", "passthrough", "api"]
                    if rnd % 2 == 0:
                        order.reverse()
                    for kind in order:
                        p = self.measure(kind, n, mc, rnd)
                        phases.append(p)
                        e = p.load.eods()
                        extra = ""
                        if kind == "api":
                            extra = (f", peak {p.mock['peak']} requests in flight at the mock, "
                                     f"{p.mock['conns']} TLS connections "
                                     f"({p.mock['new_conns']} new)")
                        print(f"  round {rnd} max_concurrency {mc:3d} {n:3d} sessions "
                              f"{kind:11s}: {p.load.rate:7.1f} msg/s ({len(p.load.sent)} msgs, "
                              f"{p.load.wall:.2f} s), '.'->reply p50 "
                              f"{percentile(e, 50) * 1000:7.1f} ms p99 "
                              f"{percentile(e, 99) * 1000:7.1f} ms, session p50 "
                              f"{percentile([x.session for x in p.load.sent], 50) * 1000:.1f} "
                              f"ms{extra}",
                              file=sys.stderr, flush=True)
                if not naive or len(naive) < rnd:
                    rate, lat = self.naive(rnd)
                    naive.append((rate, lat))
                    print(f"  round {rnd} naive client (new TLS connection per request): "
                          f"{rate:.2f} msg/s, per message p50 "
                          f"{percentile(lat, 50) * 1000:.1f} ms", file=sys.stderr, flush=True)
            self.stop_milter_keep_last(rnd)
        self.final_checks()
        return phases, naive

    def stop_milter_keep_last(self, rnd: int) -> None:
        # the last milter of the last round stays up for the final checks' diagnostics
        if rnd < self.args.rounds:
            self.stop_milter()


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------

def fmt_spread(values: list[float], fmt: str = "{:.1f}") -> str:
    if len(values) < 2:
        return ""
    return f" ({fmt.format(min(values))}..{fmt.format(max(values))})"


def report(phases: list[Phase], naive: list[tuple[float, list[float]]], args: argparse.Namespace,
           bench: Bench, facts: str) -> str:
    out: list[str] = []
    latency = args.latency_ms
    naive_rates = [r for r, _ in naive]
    naive_rate = statistics.median(naive_rates)
    naive_lat = [x for _, lat in naive for x in lat]
    out.append(f"mock latency {latency:g} ms on POST /emails:send, {args.status_latency_ms:g} ms "
               f"on GET /emails/operations/{{id}} (MockAcs.always(delay=...) on both endpoints); "
               f"mock sockets {'with Nagle (--mock-nagle)' if args.mock_nagle else 'TCP_NODELAY'}")
    out.append(f"naive client, one message at a time, new TLS connection per request: "
               f"{naive_rate:.2f} msg/s{fmt_spread(naive_rates, '{:.2f}')}, per message p50 "
               f"{percentile(naive_lat, 50) * 1000:.1f} ms")
    by: dict[tuple[str, int, int], list[Phase]] = collections.defaultdict(list)
    for p in phases:
        by[(p.kind, p.sessions, p.mc)].append(p)

    def med(kind: str, n: int, mc: int, f) -> tuple[float, list[float]]:
        vals = [f(p) for p in by[(kind, n, mc)]]
        return statistics.median(vals), vals

    results: list[str] = []
    for mc in args.max_concurrency:
        suffix = "" if mc == DEFAULT_MAX_CONCURRENCY and len(args.max_concurrency) == 1 \
            else f", max_concurrency {mc}"
        out.append("")
        out.append(f"== max_concurrency {mc}  (median over {args.rounds} round(s), "
                   f"min..max in brackets; latencies: '.' -> reply at the SMTP client, ms; "
                   f"added pX = api pX - alone p50; vs passthrough = api pX - passthrough p50)")
        out.append(f"{'sessions':>8s} {'api msg/s':>18s} {'x naive':>7s} "
                   f"{'passthru':>8s} {'alone':>7s} | {'api p50':>7s} {'api p99':>7s} "
                   f"{'alone p50':>9s} {'p99':>6s} {'passthru p50':>12s} {'p99':>6s} "
                   f"{'added p50':>17s} {'added p99':>17s} {'vs passthru p50/p99':>19s}")
        for n in args.sessions:
            rate, rates = med("api", n, mc, lambda p: p.load.rate)
            pt, _ = med("passthrough", n, mc, lambda p: p.load.rate)
            al, _ = med("alone", n, mc, lambda p: p.load.rate)
            ap = {q: med("api", n, mc, lambda p, q=q: percentile(p.load.eods(), q) * 1000)
                  for q in (50, 99)}
            rp = {q: med("passthrough", n, mc, lambda p, q=q: percentile(p.load.eods(), q) * 1000)
                  for q in (50, 99)}
            lp = {q: med("alone", n, mc, lambda p, q=q: percentile(p.load.eods(), q) * 1000)
                  for q in (50, 99)}
            added = {}
            for q in (50, 99):
                # per round: the api percentile minus the same round's Postfix-alone MEDIAN
                # (the reference's own tail is noise of the machine, and it ran at several
                # times the api measurement's message rate), then the median over rounds
                vals = [percentile(a.load.eods(), q) * 1000 - percentile(r.load.eods(), 50) * 1000
                        for a, r in zip(by[("api", n, mc)], by[("alone", n, mc)])]
                added[q] = (statistics.median(vals), vals)
            vs_passthrough = [ap[q][0] - rp[50][0] for q in (50, 99)]
            out.append(f"{n:8d} {rate:7.1f}{fmt_spread(rates):>11s} {rate / naive_rate:7.2f} "
                       f"{pt:8.1f} {al:7.1f} | {ap[50][0]:7.1f} {ap[99][0]:7.1f} "
                       f"{lp[50][0]:9.1f} {lp[99][0]:6.1f} {rp[50][0]:12.1f} {rp[99][0]:6.1f} "
                       f"{added[50][0]:7.1f}{fmt_spread(added[50][1], '{:.0f}'):>10s} "
                       f"{added[99][0]:7.1f}{fmt_spread(added[99][1], '{:.0f}'):>10s} "
                       f"{vs_passthrough[0]:10.1f}/{vs_passthrough[1]:.1f}")
            ratio = rate / naive_rate
            target = ">= 5x baseline" if n == 20 else "-"
            met = ("yes" if ratio >= 5 else "no") if n == 20 else "-"
            s = "session" if n == 1 else "sessions"
            results.append(f"RESULT\tapi route, {n} {s}{suffix}\t{rate:.1f}\tmsg/s\t"
                           f"{naive_rate:.2f}\t{ratio:.1f}\t{target}\t{met}")
            results.append(f"RESULT\tapi route added p50, {n} {s}{suffix}\t{added[50][0]:.1f}\tms\t"
                           f"{latency:g}\t{added[50][0] / latency:.2f}\t-\t-")
            limit = latency + 5
            results.append(f"RESULT\tapi route added p99, {n} {s}{suffix}\t{added[99][0]:.1f}\tms\t"
                           f"{latency:g}\t{added[99][0] / latency:.2f}\t<= {limit:g} ms\t"
                           f"{'yes' if added[99][0] <= limit else 'no'}")
        # what the service saw
        out.append("  at the mock during the api measurements (last round):")
        for n in args.sessions:
            p = by[("api", n, mc)][-1]
            m = p.mock
            shapes = ", ".join(f"{shape}: {k}" for shape, k in m["shapes"].most_common(3))
            dr = ", ".join(f"requests={r} status_checks={c}: {k}"
                           for (r, c), k in sorted(m["decision_requests"].items()))
            cpu = p.cpu
            msgs = len(p.load.sent)
            other = max(0.0, cpu["system_busy"] - sum(cpu[k] for k in ("postfix", "milter",
                                                                         "mock", "bench")))
            out.append(
                f"  {n:4d} sessions: per message [{shapes}] (milter log: {dr}); "
                f"{m['requests']} requests in the window ({m['polls']} background status "
                f"polls GET 200); in flight peak {m['peak']}, mean {m['mean_inflight']:.1f}; "
                f"{m['conns']} TLS connections ({m['new_conns']} new); service time median "
                f"GET {m['service_ms']['GET']:.1f} ms, POST {m['service_ms']['POST']:.1f} ms; "
                f"CPU ms/msg: postfix {cpu['postfix'] / msgs * 1000:.2f}, milter "
                f"{cpu['milter'] / msgs * 1000:.2f}, mock {cpu['mock'] / msgs * 1000:.2f}, "
                f"clients {cpu['bench'] / msgs * 1000:.2f}, other (foreign load) "
                f"{other / msgs * 1000:.2f}; machine busy "
                f"{cpu['system_busy'] / max(1e-9, cpu['system_total']):.0%}; milter threads "
                f"peak {cpu['milter_threads']:.0f}")
            seg = m["segments"]
            if seg:
                out.append("        timeline ms (p50/p90): " + ", ".join(
                    f"{k} {v[0]:.1f}/{v[1]:.1f}" for k, v in seg.items()))
        # Little's law: at most max_concurrency requests in flight, each taking the service
        # time, and a message's requests go one after the other
        p = by[("api", max(args.sessions), mc)][-1]
        methods = [part.split()[0] for part in bench.milter_shape.split(" -> ")]
        per_msg = sum(p.mock["service_ms"][m] for m in methods)
        out.append(f"  ceiling set by max_concurrency: {mc} slots / ({per_msg:.1f} ms of service "
                   f"time per message: {' + '.join(methods)}) = {mc / per_msg * 1000:.1f} msg/s; "
                   f"measured at {max(args.sessions)} sessions {p.load.rate:.1f} msg/s")
    out.append("")
    for note in bench.notes:
        out.append("note: " + note)
    out.append(facts)
    out.append("")
    results.insert(0, f"RESULT\tapi naive client (new TLS connection per request)\t"
                      f"{naive_rate:.2f}\tmsg/s\t-\t-\t-\t-")
    out.extend(results)
    return "\n".join(out)


def machine_facts(args: argparse.Namespace, bench: Bench, load_before: tuple,
                  fsync: tuple[float, float]) -> str:
    pf = subprocess.run([harness.POSTCONF, "-d", "-h", "mail_version"], stdout=subprocess.PIPE,
                        stderr=subprocess.DEVNULL, text=True).stdout.strip()
    mv = subprocess.run([args.binary, "version"], stdout=subprocess.PIPE,
                        stderr=subprocess.DEVNULL, text=True).stdout.strip().splitlines()
    return (f"machine: {os.cpu_count()} CPUs, kernel {platform.release()}; postfix {pf}; "
            f"{mv[0] if mv else args.binary}; milter state directory on "
            f"{fs_type(bench.state_dir)} (append+fdatasync p50 {fsync[0]:.2f} ms, p99 "
            f"{fsync[1]:.2f} ms); load average before {load_before[0]:.2f}, after "
            f"{os.getloadavg()[0]:.2f}; body {args.size} B; {args.rounds} round(s)")


# --------------------------------------------------------------------------------------------

def int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}")
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"need integers >= 1: {text!r}")
    return values


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--latency-ms", type=float, default=50.0,
                   help="simulated service latency of every request (50)")
    p.add_argument("--status-latency-ms", type=float, default=None,
                   help="latency of GET /emails/operations/{id} only (default: --latency-ms; "
                        "0 shows what the route costs if the status check were free)")
    p.add_argument("--sessions", type=int_list, default=[1, 20, 100],
                   help="concurrent SMTP sessions, comma-separated (1,20,100)")
    p.add_argument("--messages-per-session", type=int, default=0,
                   help="messages each session sends (default: max(4, --min-messages / N))")
    p.add_argument("--min-messages", type=int, default=60,
                   help="with the default --messages-per-session: at least this many messages "
                        "per measurement (60)")
    p.add_argument("--max-concurrency", type=int_list, default=[DEFAULT_MAX_CONCURRENCY],
                   help="the api route's max_concurrency, comma-separated: each value is "
                        "measured with its own milter (8, the default)")
    p.add_argument("--naive-messages", type=int, default=30,
                   help="messages the naive client sends per round (30)")
    p.add_argument("--rounds", type=int, default=3,
                   help="repeat everything (alternating the order), report medians (3)")
    p.add_argument("--size", type=int, default=1024, help="message body bytes (1024)")
    p.add_argument("--binary", default=os.environ.get("PAAS_MILTER_BIN") or
                   os.path.join(REPO, "build", "milter", "paas-milter"),
                   help="paas-milter executable ($PAAS_MILTER_BIN or build/milter/paas-milter)")
    p.add_argument("--lookup-before-post", choices=("auto", "always", "own-attempts"),
                   default=None,
                   help="the api route's lookup_before_post (default: not set, the milter's "
                        "default); always = GET /emails/operations/{id} before every post")
    p.add_argument("--state-directory", default=None,
                   help="the milter's STATE_DIRECTORY (journal of posted requests, fdatasync'd "
                        "per POST; default: in the temp dir)")
    p.add_argument("--mock-nagle", action="store_true",
                   help="leave Nagle's algorithm on at the mock, as the integration tests' mock "
                        "has it: ~40 ms delayed-ACK stall per request on a reused connection")
    p.add_argument("--timeout", type=float, default=120.0,
                   help="abort a measurement after this many seconds (120)")
    p.add_argument("--tmpdir", default=None,
                   help="parent of the temp dir (default $TMPDIR or /tmp)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir")
    a = p.parse_args(argv)
    if a.status_latency_ms is None:
        a.status_latency_ms = a.latency_ms
    if a.latency_ms <= 0 or a.status_latency_ms < 0:
        p.error("--latency-ms must be > 0 and --status-latency-ms >= 0")
    if a.messages_per_session < 0 or a.naive_messages < 1 or a.rounds < 1 or a.size < 1:
        p.error("--messages-per-session >= 0, --naive-messages, --rounds and --size >= 1")
    if max(a.max_concurrency) > 256:
        p.error("--max-concurrency: the milter allows at most 256")
    a.binary = os.path.abspath(a.binary)
    return a


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("api_route: must run as root (postfix start, smtp-sink -u postfix)", file=sys.stderr)
        return 2
    for tool in (harness.POSTFIX, harness.POSTCONF, harness.SMTP_SINK, harness.OPENSSL):
        if not os.access(tool, os.X_OK):
            print(f"api_route: {tool} missing", file=sys.stderr)
            return 2
    if not os.access(args.binary, os.X_OK):
        print(f"api_route: no paas-milter at {args.binary} (build it, or --binary PATH)",
              file=sys.stderr)
        return 2
    sys.setswitchinterval(0.0005)  # client threads take their timestamps promptly
    load_before = load_average_warned("api_route")

    def body(bench: Bench) -> int:
        print(f"api_route: temp dir {bench.workdir}; milter {args.binary}", file=sys.stderr,
              flush=True)
        bench.setup()
        fsync = fdatasync_probe(bench.state_dir)
        phases, naive = bench.run()
        print(report(phases, naive, args, bench, machine_facts(args, bench, load_before, fsync)))
        if bench.warnings:
            print(f"\n{len(bench.warnings)} warning/error line(s) in the milter log, first ones:",
                  file=sys.stderr)
            for w in bench.warnings[:10]:
                print("  " + w[:300], file=sys.stderr)
        return 0

    return run_bench("api_route", lambda: Bench(args), body)

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
