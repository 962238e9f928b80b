"""Fault soak for the API route: every recipient of every message ends up in exactly one place.

Messages with 1-150 recipients go from an SMTP client (threads that resend whatever got a 4xx
or a broken connection, as an MTA would) through a real private Postfix and paas-milter to the
loopback ACS mock. The mock injects faults at random -- 429 with and without Retry-After,
500/503, 409, resets before and after it accepted the message, a 504 after it accepted it, and
answers so slow that the client times out while the message is accepted -- and it EXECUTES A
REPEATED Operation-Id AGAIN, as a service that deduplicates nothing undocumented would. Meanwhile
the milter is SIGKILLed and restarted a few times and SIGHUPed in bursts.

At the end every (message, recipient) is counted where it arrived: at the service (each
execution counts), at the fallback relay's sink, at the default sink (recipients in
local_domains), in Postfix's hold queue, or refused to the client with a 5xx. Lost = counted 0
times, duplicate = counted more than once; both must be 0 for each failure policy.

Small runs are part of `meson test` (test_soak_api.py); a large one:

    PAAS_MILTER_BIN=build/milter/paas-milter python3 tests/integration/soak_api.py \\
        --messages 300 --policy tempfail --policy relay --policy hold --policy reject
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import random
import re
import signal
import smtplib
import socket
import sys
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
import mock_acs  # noqa: E402
from mock_acs import Fault, MockAcs  # noqa: E402

POLICIES = {
    "tempfail": 'on_failure = "tempfail"\non_permanent_failure = "tempfail"',
    "relay": 'on_failure = "relay:fallback"\non_permanent_failure = "relay:fallback"',
    "hold": 'on_failure = "hold"\non_permanent_failure = "hold"',
    "reject": 'on_failure = "reject"\non_permanent_failure = "reject"',
}

CONFIG = """
[routes.fallback]
action = "relay"

[routes.acs-api]
action = "api"
connection_string_file = "acs.conn"
ca_file = "{ca_file}"
sender = "DoNotReply@contoso.azurecomm.test"
verified_domains = ["contoso.test"]
local_domains = ["local.test"]
spool_directory = "{spool}"
time_budget = {budget}
request_timeout = {request_timeout}
max_attempts = 3
{policy}

[[rules]]
name = "devices"
client_addr = ["127.0.0.2"]
route = "acs-api"
"""

# The faults of a "send" request and their weights (the rest pass untouched).
SEND_FAULTS = [
    ("429 with Retry-After", 6),
    ("429 without Retry-After", 6),
    ("500", 5),
    ("503", 5),
    ("409", 3),
    ("reset before accepting", 3),
    ("accepted, then reset", 4),
    ("accepted, then 504", 4),
    ("accepted after the client timed out", 3),
    ("accepted, then no answer", 3),
]
STATUS_FAULTS = [("503", 4)]


@dataclasses.dataclass
class SoakSettings:
    policy: str = "tempfail"
    messages: int = 12
    max_recipients: int = 150
    local_share: float = 0.05        # share of recipients in local_domains
    fault_rate: float = 0.35         # share of send requests that get a fault
    kills: int = 1                   # SIGKILL + restart of the milter during the run
    hup_bursts: int = 2              # bursts of SIGHUPs during the run
    outages: int = 1                 # periods in which the service fails every send
    outage_seconds: float = 8.0
    hups_per_burst: int = 20
    client_threads: int = 4
    seed: int = 1
    budget: int = 12                 # the route's time_budget (s)
    request_timeout: int = 3         # the route's request_timeout (s)
    max_client_attempts: int = 40    # per message; then it counts as never delivered
    deadline: float = 600.0          # the whole run (s)


@dataclasses.dataclass
class SoakReport:
    settings: SoakSettings
    messages: int = 0
    recipients: int = 0
    at_service: int = 0
    via_relay: int = 0
    held: int = 0
    refused: int = 0
    local: int = 0
    lost: int = 0
    duplicates: int = 0
    client_attempts: int = 0
    client_retries: int = 0
    kills: int = 0
    hups: int = 0
    outages: int = 0
    events: list[str] = dataclasses.field(default_factory=list)
    faults: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    service_executions: int = 0
    unfinished: int = 0
    elapsed: float = 0.0
    problems: list[str] = dataclasses.field(default_factory=list)

    def row(self) -> str:
        return (f"| {self.settings.policy:8} | {self.messages:4} | {self.recipients:5} | "
                f"{self.at_service:5} | {self.via_relay:5} | {self.held:4} | {self.refused:5} | "
                f"{self.local:5} | {self.lost:4} | {self.duplicates:4} | {self.client_retries:5} | "
                f"{self.kills:5} | {self.hups:4} | {sum(self.faults.values()):6} | "
                f"{self.elapsed:6.0f} |")

    @staticmethod
    def header() -> str:
        return ("| policy   | msgs | rcpts | api   | relay | held | refus | local | lost | dup  | "
                "retry | kills | hups | faults | time s |\n"
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


class RandomFaults:
    """Replaces the mock's scripted faults with random ones, and counts them."""

    def __init__(self, rng: random.Random, rate: float, request_timeout: float):
        self.rng = rng
        self.rate = rate
        self.stall = request_timeout + 1.5
        self.lock = threading.Lock()
        self.counts: collections.Counter = collections.Counter()
        self.outage_until = 0.0

    def outage(self, seconds: float) -> None:
        """Every send fails (500/503/reset) for SECONDS: longer than a message's retries."""
        with self.lock:
            self.outage_until = time.monotonic() + seconds

    def __call__(self, endpoint: str) -> Fault | None:
        with self.lock:
            if endpoint == "send" and time.monotonic() < self.outage_until:
                name = self.rng.choice(["500", "503", "reset before accepting",
                                        "accepted, then 504"])
            elif endpoint == "send":
                if self.rng.random() >= self.rate:
                    return None
                names, weights = zip(*SEND_FAULTS)
                name = self.rng.choices(names, weights)[0]
            elif endpoint == "status":
                if self.rng.random() >= 0.05:
                    return None
                name = "status 503"
            else:
                return None
            self.counts[name] += 1
        make = MockAcs._make_fault
        if name == "429 with Retry-After":
            return make(429, None, None, 1, 0.0, False, False, None, endpoint)
        if name == "429 without Retry-After":
            return make(429, None, None, None, 0.0, False, False, None, endpoint)
        if name in ("500", "503", "409"):
            return make(int(name), None, None, None, 0.0, False, False, None, endpoint)
        if name == "status 503":
            return make(503, None, None, None, 0.0, False, False, None, endpoint)
        if name == "reset before accepting":
            return make(None, None, None, None, 0.0, True, False, None, endpoint)
        if name == "accepted, then reset":
            return make(None, None, None, None, 0.0, True, True, None, endpoint)
        if name == "accepted, then 504":
            return make(504, None, None, None, 0.0, False, True, None, endpoint)
        if name == "accepted, then no answer":
            return Fault(stall=self.stall)
        # accepted after the client timed out: the answer comes too late
        return make(None, None, None, None, self.stall, False, False, None, endpoint)


@dataclasses.dataclass
class Message:
    number: int
    sender: str
    recipients: list[str]
    data: bytes
    attempts: int = 0
    done: bool = False
    refused: bool = False


def make_messages(settings: SoakSettings, rng: random.Random, run_id: str) -> list[Message]:
    out = []
    for n in range(settings.messages):
        count = rng.randint(1, settings.max_recipients)
        rcpts = []
        for i in range(count):
            domain = "local.test" if rng.random() < settings.local_share else "example.net"
            rcpts.append(f"m{n}r{i}@{domain}")
        # Every other message has no Message-ID or Date: its identity is its content.
        headers = [f"From: device{n % 7}@contoso.test", "To: team@example.net",
                   f"Subject: soak {run_id} #{n}"]
        if n % 2:
            headers += [f"Message-ID: <soak-{run_id}-{n}@client.test>",
                        "Date: Fri, 04 Dec 2026 12:00:00 +0000"]
        body = f"message {n} of soak run {run_id}\r\n" + "x" * rng.randint(10, 4000) + "\r\n"
        data = ("\r\n".join(headers) + "\r\n\r\n" + body).encode()
        out.append(Message(n, f"device{n % 7}@contoso.test", rcpts, data))
    return out


class Client:
    """Threads that send each message until Postfix takes it (2xx) or refuses it (5xx),
    resending after any 4xx or broken connection as an MTA would."""

    def __init__(self, port: int, messages: list[Message], settings: SoakSettings,
                 report: SoakReport):
        self.port = port
        self.queue: collections.deque[Message] = collections.deque(messages)
        self.settings = settings
        self.report = report
        self.lock = threading.Lock()
        self.outstanding = len(messages)

    def run(self, deadline: float) -> None:
        threads = [threading.Thread(target=self._work, args=(deadline,), daemon=True)
                   for _ in range(self.settings.client_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()) + 5)

    def _next(self) -> Message | None:
        with self.lock:
            if self.queue:
                return self.queue.popleft()
            return None

    def _work(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            msg = self._next()
            if msg is None:
                with self.lock:
                    if self.outstanding == 0:
                        return
                time.sleep(0.1)
                continue
            outcome = self._send(msg)
            retry = outcome == "retry" and msg.attempts < self.settings.max_client_attempts
            with self.lock:
                self.report.client_attempts += 1
                if retry:
                    self.report.client_retries += 1
                    self.queue.append(msg)
                else:
                    msg.refused = outcome == "refused"
                    msg.done = outcome in ("accepted", "refused")
                    self.outstanding -= 1
            if retry:
                time.sleep(random.uniform(0.5, 1.5))  # an MTA's queue runner is slower still

    def _send(self, msg: Message) -> str:
        msg.attempts += 1
        try:
            with smtplib.SMTP("127.0.0.1", self.port, local_hostname="client.test", timeout=120,
                              source_address=("127.0.0.2", 0)) as s:
                s.ehlo()
                code, _ = s.mail(msg.sender)
                if code >= 500:
                    return "refused"
                if code >= 400:
                    return "retry"
                for r in msg.recipients:
                    code, _ = s.rcpt(r)
                    if code >= 400:
                        return "retry"  # none is expected: resend the whole message
                code, _ = s.data(msg.data)
                if code == 250:
                    return "accepted"
                return "refused" if code >= 500 else "retry"
        except (smtplib.SMTPException, OSError):
            return "retry"


def _hold_recipients(postfix: harness.PrivatePostfix) -> dict[str, list[str]]:
    """queue id -> recipients of each message in the hold queue."""
    return {m["queue_id"]: [r["address"] for r in m.get("recipients", [])]
            for m in postfix.queue() if m.get("queue_name") == "hold"}


def run_soak(tc: harness.IntegrationTestCase, settings: SoakSettings) -> SoakReport:
    """One run with TC's resources (temp dir, processes stopped by its cleanups)."""
    report = SoakReport(settings)
    rng = random.Random(settings.seed)
    run_id = f"{settings.policy}-{settings.seed}"
    started = time.monotonic()

    mock = MockAcs(verified_domains=("contoso.test", "contoso.azurecomm.test"))
    if hasattr(mock, "reexecute_repeated_operation_id"):
        mock.reexecute_repeated_operation_id = True
    else:
        report.problems.append("mock cannot re-execute repeated Operation-Ids")
    faults = RandomFaults(random.Random(settings.seed + 1), settings.fault_rate,
                          settings.request_timeout)
    mock._take_fault = faults  # every request gets a random fault (or none)
    mock.start()
    tc.addCleanup(mock.stop)

    default_sink = tc.start_sink("default")
    relay_sink = tc.start_sink("relay")
    milter_port = harness.free_port()
    tc.write_config("acs.conn", mock.connection_string + "\n")
    spool = os.path.join(tc.workdir(), "spool")
    os.makedirs(spool, exist_ok=True)
    body = CONFIG.format(ca_file=mock.ca_file, spool=spool, budget=settings.budget,
                         request_timeout=settings.request_timeout,
                         policy=POLICIES[settings.policy])
    milter = tc.start_milter(milter_port, harness.milter_config(milter_port, body))
    postfix = tc.start_postfix(default_sink=default_sink, milter_port=milter_port,
                               routes={"fallback": ("acs-relay", relay_sink.port)},
                               main_cf={"milter_content_timeout": "120s"})

    messages = make_messages(settings, rng, run_id)
    report.messages = len(messages)
    report.recipients = sum(len(m.recipients) for m in messages)
    deadline = started + settings.deadline
    client = Client(postfix.smtpd_port, messages, settings, report)
    sender = threading.Thread(target=client.run, args=(deadline,), daemon=True)
    sender.start()

    # Disturb the milter while the client works: SIGKILL + restart, bursts of SIGHUP.
    events = (["kill"] * settings.kills + ["hup"] * settings.hup_bursts +
              ["outage"] * settings.outages)
    rng.shuffle(events)
    for event in events:
        time.sleep(rng.uniform(1.0, 4.0))
        report.events.append(f"{time.monotonic() - started:.1f}s {event}")
        if event == "outage":
            faults.outage(settings.outage_seconds)
            report.outages += 1
            continue
        if not sender.is_alive():
            break
        if not milter.running:
            report.problems.append(f"the milter stopped by itself (exit {milter.proc})")
            milter.start()
        if event == "kill":
            milter.proc.kill()
            milter.proc.wait(10)
            report.kills += 1
            time.sleep(0.5)
            milter.start()
        else:
            for _ in range(settings.hups_per_burst):
                milter.proc.send_signal(signal.SIGHUP)
                report.hups += 1
            time.sleep(0.5)
            if not milter.running:
                report.problems.append("the milter stopped after a burst of SIGHUPs")
                milter.start()
    sender.join(max(0.0, deadline - time.monotonic()) + 10)
    if sender.is_alive() or client.outstanding:
        report.problems.append(f"{client.outstanding} message(s) still being sent at the deadline")
    report.unfinished = sum(1 for m in messages if not m.done)

    # Let Postfix finish delivering (relay fallback, local recipients); held mail stays.
    settle = time.monotonic() + 60
    while time.monotonic() < settle:
        q = postfix.queue()
        if all(m.get("queue_name") == "hold" for m in q):
            break
        postfix.flush()
        time.sleep(1)
    time.sleep(1)

    # Reconcile.
    counts: collections.Counter = collections.Counter()
    where: dict[tuple[int, str], list[str]] = collections.defaultdict(list)
    subject_re = re.compile(rf"soak {re.escape(run_id)} #(\d+)")

    def count(n: int, rcpt: str, place: str) -> None:
        counts[(n, rcpt)] += 1
        where[(n, rcpt)].append(place)

    for acc in mock.accepted_messages():
        m = subject_re.search(acc.message["content"]["subject"])
        if not m:
            continue
        report.service_executions += 1
        for kind in ("to", "cc", "bcc"):
            for r in acc.message["recipients"].get(kind, []):
                count(int(m.group(1)), r["address"], "service")
                report.at_service += 1
    for sink, place in ((relay_sink, "relay"), (default_sink, "default")):
        for msg in sink.messages():
            m = subject_re.search(str(msg["Subject"] or ""))
            if not m:
                continue
            for r in msg.rcpt_to:
                count(int(m.group(1)), r, place)
                if place == "relay":
                    report.via_relay += 1
                else:
                    report.local += 1
    for qid, rcpts in _hold_recipients(postfix).items():
        m = subject_re.search(_postcat(postfix, qid))
        if not m:
            report.problems.append(f"held message {qid} without a soak subject")
            continue
        for r in rcpts:
            count(int(m.group(1)), r, "hold")
            report.held += 1
    for msg in messages:
        if msg.refused:
            for r in msg.recipients:
                count(msg.number, r, "refused")
                report.refused += 1

    for msg in messages:
        for r in msg.recipients:
            c = counts[(msg.number, r)]
            if c == 0:
                report.lost += 1
                if len(report.problems) < 20:
                    report.problems.append(f"lost: message {msg.number} to {r}")
            elif c > 1:
                report.duplicates += c - 1
                if len(report.problems) < 20:
                    report.problems.append(f"duplicate: message {msg.number} to {r} at "
                                           f"{', '.join(where[(msg.number, r)])}")
    report.faults = faults.counts
    report.elapsed = time.monotonic() - started
    return report


def _postcat(postfix: harness.PrivatePostfix, queue_id: str) -> str:
    """The header of a queued message (`postcat -hq`)."""
    return harness._run(["/usr/sbin/postcat", "-c", postfix.config_dir, "-hq", queue_id],
                        check=False).text


class _Runner(harness.IntegrationTestCase):
    """Lets the command line use the test case's resource handling."""

    settings: SoakSettings = SoakSettings()
    report: SoakReport | None = None

    def test_soak(self) -> None:
        type(self).report = run_soak(self, self.settings)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--policy", action="append", choices=sorted(POLICIES))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--hup-bursts", type=int, default=4)
    parser.add_argument("--fault-rate", type=float, default=0.30)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--deadline", type=float, default=1800.0)
    args = parser.parse_args(argv)
    reports = []
    for policy in args.policy or ["tempfail", "relay", "hold", "reject"]:
        _Runner.settings = SoakSettings(policy=policy, messages=args.messages, seed=args.seed,
                                        kills=args.kills, hup_bursts=args.hup_bursts,
                                        fault_rate=args.fault_rate,
                                        client_threads=args.threads, deadline=args.deadline)
        _Runner.report = None
        result = unittest.TextTestRunner(verbosity=0).run(_Runner("test_soak"))
        if _Runner.report is None or not result.wasSuccessful():
            print(f"{policy}: the run itself failed", file=sys.stderr)
            return 2
        reports.append(_Runner.report)
    print(SoakReport.header())
    for r in reports:
        print(r.row())
    failed = False
    for r in reports:
        print(f"\n{r.settings.policy}: faults injected: "
              + ", ".join(f"{k} {v}" for k, v in sorted(r.faults.items())))
        print(f"{r.settings.policy}: {r.service_executions} executions at the service, "
              f"{r.client_attempts} SMTP attempts")
        for p in r.problems:
            print(f"{r.settings.policy}: PROBLEM: {p}")
        failed |= bool(r.lost or r.duplicates or r.unfinished or r.problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
