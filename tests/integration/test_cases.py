"""Integration cases as data: one test per directory under tests/integration/cases/ (format:
cases/README.md). Each case names its milter configuration, tables, SMTP transactions, the
API double's faults and what must happen; this module runs them against a real private
Postfix, the smtp-sink downstreams, the paas-milter daemon and the loopback ACS/Graph double.

Sharing: cases with the same `[postfix]` table share one Postfix instance, its three sinks
(default, acs, exo) and its test CA, started once; everything a case can change is fresh per
case: its own milter process (configuration, state directory, log), its own mock, and
Postfix's queue and the sinks are emptied before it runs. Tests are ordered so that cases
sharing a Postfix run one after the other; after a failure the next case gets a new Postfix.

    python3 -m unittest -v test_cases                          # every case
    python3 -m unittest -v test_cases.Cases.test_relay_by_header   # one
    python3 -m unittest -v -k graph test_cases                  # some
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
import socket
import sys
import tempfile
import time
import tomllib
import unittest
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from mock_acs import MockAcs  # noqa: E402
from mock_graph import MockGraph  # noqa: E402

CASES_DIR = Path(os.environ.get("PAAS_IT_CASES_DIR")
                 or Path(__file__).resolve().parent / "cases")
CASE_FILE = "case.toml"
CONFIG_FILE = "config.toml"

SINKS = ("default", "acs", "exo")
# routing-header value -> (Postfix transport, sink); a case's [postfix] routes may add more
DEFAULT_ROUTES = {"acs-smtp": ("acs-relay", "acs"),
                  "exchange-online": ("exo-relay", "exo"),
                  "exo-relay": ("exo-relay", "exo")}
# clients impersonated with XCLIENT must still be allowed to relay; 15 MB test messages
DEFAULT_MAIN_CF = {"mynetworks": "127.0.0.0/8 [::1]/128 192.0.2.0/24 198.51.100.0/24 "
                                 "[2001:db8::]/32",
                   "message_size_limit": 30 * 1024 * 1024}

MOCKS = {"acs": MockAcs, "graph": MockGraph}
MESSAGE_ROUTE = {"acs": "send", "graph": "sendMail"}

PLACEHOLDER_RE = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_.]*)\s*\}\}")
RANGE_RE = re.compile(r"\{(\d+)\.\.(\d+)\}")
DECISION_RE = re.compile(r"\b([0-9A-Za-z]+): ((?:dry-run, )?rule=.*)$", re.M)


class CaseError(Exception):
    """The case's files are wrong (not the code under test)."""


# --------------------------------------------------------------------------------------------
# reading a case
# --------------------------------------------------------------------------------------------

CASE_KEYS = {"description", "timeout", "postfix", "mock", "transaction", "expect"}
POSTFIX_KEYS = {"main_cf", "routes"}
TRANSACTION_KEYS = {"client", "xclient", "helo", "from", "to", "headers", "body", "message",
                    "fill", "tls", "tls_cert", "swaks_args", "session", "fault",
                    "clear_faults", "expect"}
FAULT_KEYS = {"status", "code", "message", "retry_after", "delay", "reset", "accept",
              "headers", "hold", "stall", "count", "endpoint", "always", "outage"}
TX_EXPECT_KEYS = {"rcpt", "data", "reply", "decision", "decision_regex", "milter_log",
                  "maillog", "arrival", "queue", "queue_recipients", "mock_messages"}
ARRIVAL_KEYS = {"sink", "mail_from", "rcpt_to", "headers", "contains"}
CASE_EXPECT_KEYS = {"quiet", "spool_empty", "milter_log", "milter_log_lacks", "mock"}
MOCK_EXPECT_KEYS = {"messages", "requests", "duplicates", "recipients", "recipient_counts",
                    "auth", "tokens", "message"}
MESSAGE_KEYS = {"auth", "recipients", "mailbox", "json", "json_contains", "json_lacks_keys",
                "mime_headers", "mime_contains", "mime_lacks"}
TOKEN_KEYS = {"kind", "status", "scope"}


def _check_keys(table: Any, allowed: set[str], where: str) -> dict:
    if not isinstance(table, dict):
        raise CaseError(f"{where}: expected a table, got {table!r}")
    unknown = set(table) - allowed
    if unknown:
        raise CaseError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
    return table


def _list(value: Any) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def expand_ranges(values: Any) -> list[str]:
    """["user{000..119}@example.net"] -> user000@... user119@... (width of the first number)."""
    out: list[str] = []
    for value in _list(values):
        m = RANGE_RE.search(value)
        if not m:
            out.append(value)
            continue
        first, last = m.group(1), m.group(2)
        for n in range(int(first), int(last) + 1):
            out += expand_ranges(value[:m.start()] + str(n).zfill(len(first)) + value[m.end():])
    return out


@dataclasses.dataclass
class Case:
    name: str
    dir: Path
    spec: dict

    @property
    def method_name(self) -> str:
        return "test_" + re.sub(r"[^0-9A-Za-z]", "_", self.name)

    @property
    def description(self) -> str:
        return str(self.spec.get("description", "")).strip()

    @property
    def postfix_key(self) -> str:
        return json.dumps(self.spec.get("postfix", {}), sort_keys=True)

    @property
    def message_files(self) -> set[str]:
        return {t["message"] for t in self.spec.get("transaction", []) if "message" in t}


def load_case(directory: Path) -> Case:
    path = directory / CASE_FILE
    try:
        with open(path, "rb") as f:
            spec = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise CaseError(f"{path}: {exc}") from None
    _check_keys(spec, CASE_KEYS, str(path))
    if not (directory / CONFIG_FILE).is_file():
        raise CaseError(f"{directory}: no {CONFIG_FILE}")
    _check_keys(spec.get("postfix", {}), POSTFIX_KEYS, f"{path} [postfix]")
    mock = spec.get("mock")
    if mock is not None and mock.get("kind") not in MOCKS:
        raise CaseError(f"{path} [mock]: kind must be one of {sorted(MOCKS)}")
    transactions = spec.get("transaction")
    if not transactions:
        raise CaseError(f"{path}: no [[transaction]]")
    for i, tx in enumerate(transactions, 1):
        where = f"{path} transaction {i}"
        _check_keys(tx, TRANSACTION_KEYS, where)
        for fault in tx.get("fault", []):
            _check_keys(fault, FAULT_KEYS, f"{where} [[fault]]")
            if mock is None:
                raise CaseError(f"{where}: a fault needs a [mock]")
        if "message" in tx and "body" in tx:
            raise CaseError(f"{where}: message and body exclude each other")
        if "message" in tx and not (directory / tx["message"]).is_file():
            raise CaseError(f"{where}: no file {tx['message']}")
        expect = _check_keys(tx.get("expect", {}), TX_EXPECT_KEYS, f"{where} [expect]")
        for arrival in expect.get("arrival", []):
            _check_keys(arrival, ARRIVAL_KEYS, f"{where} [[expect.arrival]]")
            if arrival.get("sink") not in SINKS:
                raise CaseError(f"{where} [[expect.arrival]]: sink must be one of {SINKS}")
    expect = _check_keys(spec.get("expect", {}), CASE_EXPECT_KEYS, f"{path} [expect]")
    if "mock" in expect:
        if mock is None:
            raise CaseError(f"{path} [expect.mock]: the case has no [mock]")
        _check_keys(expect["mock"], MOCK_EXPECT_KEYS, f"{path} [expect.mock]")
        for m in expect["mock"].get("message", []):
            _check_keys(m, MESSAGE_KEYS, f"{path} [[expect.mock.message]]")
        for t in expect["mock"].get("tokens", []):
            _check_keys(t, TOKEN_KEYS, f"{path} [expect.mock] tokens")
    return Case(directory.name, directory, spec)


def discover(root: Path = CASES_DIR) -> list[Case]:
    if not root.is_dir():
        return []
    return [load_case(d) for d in sorted(root.iterdir())
            if d.is_dir() and (d / CASE_FILE).is_file()]


# --------------------------------------------------------------------------------------------
# the shared part: Postfix, sinks, CA
# --------------------------------------------------------------------------------------------

def fixed_port() -> int:
    """A free port below the kernel's ephemeral range: Postfix keeps using it for milters
    that come and go, and nothing bound to port 0 meanwhile (the mocks, sinks, clients)
    can be handed it."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(10000, max(low, 10001))
        if harness.is_listening(port):
            continue
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind(("127.0.0.1", port))
            return port
        except OSError:
            continue
    return harness.free_port()


class Environment:
    """A private Postfix with three sinks and a test CA (STARTTLS listener with client
    certificates asked), its milter address fixed; the milter itself is the case's."""

    def __init__(self, postfix_spec: dict):
        self.spec = postfix_spec
        self.workdir = tempfile.mkdtemp(prefix="paas-cases-")
        os.chmod(self.workdir, 0o755)
        if os.environ.get("PAAS_IT_KEEP"):
            print(f"\ntest_cases: keeping {self.workdir}", file=sys.stderr)
        self.sinks: dict[str, harness.Sink] = {}
        self.postfix: harness.PrivatePostfix | None = None
        self.ca: harness.TestCA | None = None
        self.milter_port = fixed_port()
        self._certs: dict[tuple, harness.Cert] = {}
        self.broken = False

    def start(self) -> "Environment":
        try:
            for name in SINKS:
                self.sinks[name] = harness.Sink(self.workdir, name).start()
            self.ca = harness.make_test_ca(os.path.join(self.workdir, "ca"))
            routes = {value: tuple(target) for value, target in DEFAULT_ROUTES.items()}
            routes.update({v: tuple(t) for v, t in self.spec.get("routes", {}).items()})
            main_cf = {**DEFAULT_MAIN_CF, **self.spec.get("main_cf", {})}
            self.postfix = harness.PrivatePostfix(
                self.workdir, default_sink_port=self.sinks["default"].port,
                routes={value: (transport, self.sinks[sink].port)
                        for value, (transport, sink) in routes.items()},
                milter_port=self.milter_port, tls_ca=self.ca, main_cf=main_cf).start()
        except BaseException:
            self.stop()
            raise
        return self

    def healthy(self) -> bool:
        return (not self.broken and self.postfix is not None and self.postfix.running
                and all(s.running for s in self.sinks.values()))

    def reset(self) -> None:
        """Empty Postfix's queues and the sinks (what the previous case left)."""
        assert self.postfix is not None
        if self.postfix.queue():
            self.postfix.postsuper("-d", "ALL")
            self.postfix.wait_for_empty_queue()
        for sink in self.sinks.values():
            sink.clear()

    def client_cert(self, spec: dict) -> harness.Cert:
        key = (spec["cn"], spec.get("org"), bool(spec.get("untrusted")))
        if key not in self._certs:
            assert self.ca is not None
            name = ("untrusted-" if key[2] else "client-") + f"{len(self._certs)}"
            self._certs[key] = self.ca.make_client_cert(key[0], org=key[1], untrusted=key[2],
                                                        name=name)
        return self._certs[key]

    def stop(self) -> None:
        if self.postfix is not None:
            try:
                self.postfix.stop()
            finally:
                self.postfix = None
        for sink in self.sinks.values():
            sink.stop()
        self.sinks.clear()
        if not os.environ.get("PAAS_IT_KEEP"):
            shutil.rmtree(self.workdir, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# one case
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Sent:
    """What one transaction got back."""
    index: int
    spec: dict
    milter_mark: int
    rcpt_codes: list[int]
    data: tuple[int, str] | None
    queue_id: str | None
    transcript: str
    decision: str | None = None

    @property
    def label(self) -> str:
        return f"transaction {self.index}"


def _match_json(expected: Any, actual: Any, path: str = "$") -> list[str]:
    """Tables match as subsets, arrays element by element (same length), the rest equal."""
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return [f"{path}: expected an object, got {actual!r}"]
        errors = []
        for k, v in expected.items():
            if k not in actual:
                errors.append(f"{path}.{k}: missing (have {sorted(actual)})")
            else:
                errors += _match_json(v, actual[k], f"{path}.{k}")
        return errors
    if isinstance(expected, list):
        if not isinstance(actual, list) or len(actual) != len(expected):
            return [f"{path}: expected {expected!r}, got {actual!r}"]
        errors = []
        for i, (e, a) in enumerate(zip(expected, actual)):
            errors += _match_json(e, a, f"{path}[{i}]")
        return errors
    return [] if expected == actual else [f"{path}: expected {expected!r}, got {actual!r}"]


def _json_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        if isinstance(obj, dict):
            obj = obj.get(part)
        elif isinstance(obj, list) and part.isdigit() and int(part) < len(obj):
            obj = obj[int(part)]
        else:
            return None
    return obj


class CaseRun:
    def __init__(self, case: Case, env: Environment):
        self.case = case
        self.env = env
        self.spec = case.spec
        self.timeout = float(self.spec.get("timeout", 30))
        self.dir = Path(env.workdir, "cases", case.name)
        self.spool = self.dir / "spool"
        self.mock: Any = None
        self.milter: harness.Milter | None = None
        self.sent: list[Sent] = []
        self.maillog_mark = 0
        self.sink_before: dict[str, set[str]] = {}   # sink files from before the case
        self.arrived: set[str] = set()                # sink files claimed by an arrival
        self.last_sent_at = time.monotonic()

    # -- set-up -------------------------------------------------------------------------------
    def values(self) -> dict[str, str]:
        values = {"milter_socket": f"inet:{self.env.milter_port}@127.0.0.1",
                  "dir": str(self.dir), "spool": str(self.spool)}
        if self.mock is not None:
            for name in ("endpoint", "authority", "ca_file", "host", "tenant_id", "client_id",
                         "client_secret", "token_url"):
                values[f"mock.{name}"] = str(getattr(self.mock, name))
            if isinstance(self.mock, MockAcs):
                values["mock.connection_string"] = self.mock.connection_string
                values["mock.access_key"] = self.mock.access_key
            if isinstance(self.mock, MockGraph):
                values["mock.graph_url"] = self.mock.graph_url
        return values

    def substitute(self, text: str, where: str, values: dict[str, str] | None = None) -> str:
        values = self.values() if values is None else values

        def repl(m: re.Match) -> str:
            if m.group(1) not in values:
                raise CaseError(f"{where}: unknown placeholder {{{{{m.group(1)}}}}}; "
                                f"known: {sorted(values)}")
            return values[m.group(1)]
        return PLACEHOLDER_RE.sub(repl, text)

    def prepare(self) -> None:
        if self.dir.exists():
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True)
        self.spool.mkdir()
        mock_spec = dict(self.spec.get("mock") or {})
        if mock_spec:
            kind = mock_spec.pop("kind")
            self.mock = MOCKS[kind](**mock_spec)
            self.mock.start()
        skip = {CASE_FILE} | self.case.message_files
        for src in sorted(self.case.dir.rglob("*")):
            rel = src.relative_to(self.case.dir)
            if src.is_dir() or str(rel) in skip:
                continue
            dst = self.dir / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                text = src.read_text()
            except UnicodeDecodeError:
                shutil.copyfile(src, dst)
            else:
                dst.write_text(self.substitute(text, str(rel)))
            os.chmod(dst, 0o600)   # secrets among them; only the milter (root) reads them
        self.milter = harness.Milter(str(self.dir / CONFIG_FILE), self.env.milter_port,
                                     log_path=str(self.dir / "paas-milter.log"))
        self.milter.start()
        assert self.env.postfix is not None
        self.maillog_mark = self.env.postfix.log_mark()
        self.sink_before = {n: set(s.files(complete_only=False))
                            for n, s in self.env.sinks.items()}

    def cleanup(self) -> None:
        if self.milter is not None:
            self.milter.stop()
        if self.mock is not None:
            self.mock.stop()

    # -- faults ---------------------------------------------------------------------------------
    def apply_faults(self, tx: dict) -> None:
        if tx.get("clear_faults"):
            self.mock.clear_faults()
        for fault in tx.get("fault", []):
            fault = dict(fault)
            if fault.pop("outage", False):
                self.mock.stop()
                continue
            if fault.pop("always", False):
                fault.pop("count", None)
                self.mock.always(**fault)
            else:
                self.mock.fail_next(**fault)

    # -- sending --------------------------------------------------------------------------------
    def message_bytes(self, tx: dict) -> bytes | None:
        data: bytes | None = None
        if "message" in tx:
            data = (self.case.dir / tx["message"]).read_bytes()
        fill = tx.get("fill")
        if fill:
            line = fill["line"].encode() + b"\r\n"
            data = (data or b"") + line * (int(fill["bytes"]) // len(line))
        return data

    def send_swaks(self, index: int, tx: dict) -> Sent:
        assert self.env.postfix is not None
        mark = self.milter.log_mark()
        kw: dict[str, Any] = {}
        if "client" in tx:
            kw["local_interface"] = tx["client"]
        if "xclient" in tx:
            x = tx["xclient"]
            kw["xclient"] = {"ADDR": x} if isinstance(x, str) else dict(x)
        if "helo" in tx:
            kw["helo"] = tx["helo"]
        data = self.message_bytes(tx)
        body = tx.get("body")
        if data is not None and "message" not in tx:   # fill without a message: the body
            body, data = (body or "").encode() + data, None
        port = self.env.postfix.smtpd_port
        if tx.get("tls") or tx.get("tls_cert"):
            port = self.env.postfix.tls_port
            kw["tls"] = True
            if tx.get("tls_cert"):
                kw["tls_cert"] = self.env.client_cert(tx["tls_cert"])
        result = harness.swaks(port, from_=tx.get("from", "sender@example.com"),
                               to=expand_ranges(tx.get("to", ["rcpt@example.net"])),
                               headers=tx.get("headers", []), body=body, data=data,
                               extra_args=tx.get("swaks_args", []), timeout=60, **kw)
        rcpt = [code for cmd, code, _ in result.replies if cmd == "RCPT"]
        data_reply = (result.data_code, result.data_reply or "") if result.data_code else None
        return Sent(index, tx, mark, rcpt, data_reply, result.queue_id, result.transcript)

    def send_session(self, batch: list[tuple[int, dict]]) -> list[Sent]:
        assert self.env.postfix is not None
        mark = self.milter.log_mark()
        items = []
        for _, tx in batch:
            if "xclient" in tx or tx.get("tls_cert") or tx.get("swaks_args"):
                raise CaseError(f"{self.case.name}: a session transaction takes no xclient, "
                                f"tls_cert or swaks_args")
            rcpts = expand_ranges(tx.get("to", ["rcpt@example.net"]))
            sender = tx.get("from", "sender@example.com")
            data = self.message_bytes(tx)
            if data is None:
                headers = list(tx.get("headers", []))
                subject = next((h.split(":", 1)[1].strip() for h in headers
                                if h.lower().startswith("subject:")), "test")
                headers = [h for h in headers if not h.lower().startswith("subject:")]
                data = harness.make_message(sender, rcpts, subject, tx.get("body", "test\n"),
                                            headers)
            items.append((sender, rcpts, data))
        first = batch[0][1]
        tls = bool(first.get("tls"))
        port = self.env.postfix.tls_port if tls else self.env.postfix.smtpd_port
        results = harness.smtp_session(port, items, source_addr=first.get("client"),
                                       starttls=tls, timeout=60)
        out = []
        for (index, tx), r in zip(batch, results):
            out.append(Sent(index, tx, mark, [c for c, _ in r.rcpt], r.data, r.queue_id,
                            f"(one SMTP session) MAIL {r.mail} RCPT {r.rcpt} DATA {r.data}"))
        return out

    # -- checks ---------------------------------------------------------------------------------
    def fail(self, sent: Sent | None, text: str) -> None:
        where = f"{self.case.name}: " + (f"{sent.label}: " if sent else "")
        extra = f"\n--- SMTP:\n{sent.transcript}" if sent else ""
        raise AssertionError(where + text + extra)

    def wait(self, what: Any, timeout: float | None = None, interval: float = 0.1) -> Any:
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            value = what()
            if value or time.monotonic() >= deadline:
                return value
            time.sleep(interval)

    def decision_lines(self, since: int) -> list[tuple[str, str]]:
        return [(m.group(1), m.group(2)) for m in DECISION_RE.finditer(self.milter.log(since))]

    def find_decision(self, sent: Sent, claimed: set[str]) -> tuple[str, str] | None:
        def look() -> tuple[str, str] | None:
            for qid, line in self.decision_lines(sent.milter_mark):
                if sent.queue_id and qid == sent.queue_id:
                    return qid, line
                if not sent.queue_id and qid not in claimed:
                    return qid, line
            return None
        return self.wait(look)

    def expand(self, text: str, sent: Sent | None, escape: bool = False) -> str:
        """TEXT with its placeholders filled in (regex-escaped for a pattern): those of the
        files, plus {{qid}} (the transaction's queue id) and {{mock.operation_id}} (the
        Operation-Id of the first message the ACS double accepted)."""
        values = self.values()
        if sent is not None and sent.queue_id:
            values["qid"] = sent.queue_id
        if "mock.operation_id" in text and isinstance(self.mock, MockAcs):
            values["mock.operation_id"] = \
                self.mock.wait_for_accepted(1, self.timeout)[0].operation_id
        if escape:
            values = {k: re.escape(v) for k, v in values.items()}
        return self.substitute(text, f"{self.case.name} expectation", values)

    def check_transaction(self, sent: Sent, claimed: set[str]) -> None:
        expect = sent.spec.get("expect", {})
        if "rcpt" in expect:
            want = expect["rcpt"]
            want = want if isinstance(want, list) else [want] * len(sent.rcpt_codes)
            if sent.rcpt_codes != want:
                self.fail(sent, f"RCPT replies {sent.rcpt_codes}, expected {want}")
        want_data = expect.get("data", 250)
        got_data = sent.data[0] if sent.data else None
        if got_data != (want_data or None):
            self.fail(sent, f"reply to DATA {got_data}, expected {want_data}")
        for text in _list(expect.get("reply")):
            if text not in (sent.data[1] if sent.data else ""):
                self.fail(sent, f"reply to DATA {sent.data!r} lacks {text!r}")
        if got_data == 250 and not sent.queue_id:
            self.fail(sent, "no queue id in the reply to DATA")

        needs_decision = any(k in expect for k in ("decision", "decision_regex"))
        if needs_decision or sent.queue_id:
            found = self.find_decision(sent, claimed)
            if found:
                qid, sent.decision = found
                claimed.add(qid)
                sent.queue_id = sent.queue_id or qid
            elif needs_decision:
                self.fail(sent, f"no decision line in the milter's log within {self.timeout}s")
        for text in _list(expect.get("decision")):
            text = self.expand(text, sent)
            if text not in sent.decision:
                self.fail(sent, f"decision line lacks {text!r}:\n  {sent.decision}")
        for rx in _list(expect.get("decision_regex")):
            if not re.search(self.expand(rx, sent, escape=True), sent.decision):
                self.fail(sent, f"decision line does not match /{rx}/:\n  {sent.decision}")
        for rx in _list(expect.get("milter_log")):
            rx = self.expand(rx, sent, escape=True)
            if not self.wait(lambda: re.search(rx, self.milter.log(sent.milter_mark), re.M)):
                self.fail(sent, f"milter log since the transaction lacks /{rx}/")
        for rx in _list(expect.get("maillog")):
            if not sent.queue_id:
                self.fail(sent, "maillog expectations need a queue id")
            rx = self.expand(rx, sent, escape=True)
            pf = self.env.postfix

            def in_maillog() -> bool:
                return any(re.search(rx, line) for line in pf.maillog(self.maillog_mark)
                           .splitlines() if f" {sent.queue_id}: " in line)
            if not self.wait(in_maillog):
                self.fail(sent, f"no maillog line of {sent.queue_id} matches /{rx}/")
        if "mock_messages" in expect:
            self.check_message_count(int(expect["mock_messages"]), sent)
        for arrival in expect.get("arrival", []):
            self.check_arrival(sent, arrival)
        if "queue" in expect:
            self.check_queued(sent, expect)

    def new_sink_messages(self, name: str) -> list[harness.SinkMessage]:
        sink = self.env.sinks[name]
        return [m for m in sink.messages() if m.path not in self.sink_before[name]]

    def check_arrival(self, sent: Sent, arrival: dict) -> None:
        if not sent.queue_id:
            self.fail(sent, "an arrival needs a queue id")
        name = arrival["sink"]

        def candidates() -> list[harness.SinkMessage]:
            return [m for m in self.new_sink_messages(name) if m.path not in self.arrived
                    and sent.queue_id in (m.get_all("Received") or [""])[0]]
        found = self.wait(candidates)
        if not found:
            self.fail(sent, f"nothing with queue id {sent.queue_id} reached sink {name!r} "
                            f"within {self.timeout}s\n{self.env.sinks[name].describe()}")
        errors: list[str] = []
        for message in found:
            errors = self.arrival_errors(message, arrival)
            if not errors:
                self.arrived.add(message.path)
                return
        self.fail(sent, f"at sink {name!r}: " + "; ".join(errors))

    @staticmethod
    def arrival_errors(message: harness.SinkMessage, arrival: dict) -> list[str]:
        errors = []
        if "mail_from" in arrival and message.mail_from != arrival["mail_from"]:
            errors.append(f"envelope sender {message.mail_from!r}, expected "
                          f"{arrival['mail_from']!r}")
        if "rcpt_to" in arrival and message.rcpt_to != expand_ranges(arrival["rcpt_to"]):
            errors.append(f"envelope recipients {message.rcpt_to}, expected "
                          f"{expand_ranges(arrival['rcpt_to'])}")
        for header, values in arrival.get("headers", {}).items():
            got = message.get_all(header)
            if got != _list(values):
                errors.append(f"header {header}: {got}, expected {_list(values)}")
        raw = message.raw.decode("utf-8", "replace")
        for text in _list(arrival.get("contains")):
            if text not in raw:
                errors.append(f"message lacks {text!r}")
        return errors

    def check_queued(self, sent: Sent, expect: dict) -> None:
        if not sent.queue_id:
            self.fail(sent, "a queue expectation needs a queue id")
        pf = self.env.postfix
        want = expect["queue"]

        def entry() -> dict | None:
            return next((q for q in pf.queue() if q["queue_id"] == sent.queue_id
                         and q["queue_name"] == want), None)
        found = self.wait(entry)
        if not found:
            self.fail(sent, f"{sent.queue_id} not in the {want} queue within "
                            f"{self.timeout}s:\n{pf.queue_text()}")
        if "queue_recipients" in expect:
            got = sorted(r["address"] for r in found["recipients"])
            wanted = sorted(expand_ranges(expect["queue_recipients"]))
            if got != wanted:
                self.fail(sent, f"recipients of the queued message {got}, expected {wanted}")

    # mock
    def mock_messages(self) -> list[Any]:
        return self.mock.accepted_messages() if isinstance(self.mock, MockAcs) else self.mock.sent()

    def check_message_count(self, n: int, sent: Sent | None = None) -> list[Any]:
        if n:
            self.wait(lambda: len(self.mock_messages()) >= n)
        got = self.mock_messages()
        if len(got) != n:
            self.fail(sent, f"the {self.case.spec['mock']['kind']} double has "
                            f"{len(self.mock_messages())} message(s), expected {n}\n"
                            f"{self.mock.diagnostics()}")
        return got

    @staticmethod
    def recipients_of(message: Any) -> list[str]:
        r = message.recipients
        return list(r() if callable(r) else r)

    def check_mock(self, expect: dict) -> None:
        kind = self.spec["mock"]["kind"]
        if "messages" in expect:
            self.check_message_count(int(expect["messages"]))
        for route, n in expect.get("requests", {}).items():
            if n:
                try:
                    self.mock.wait_for_requests(n, route, timeout=self.timeout)
                except AssertionError:
                    pass   # reported below, with the count
            got = len(self.mock.requests(route))
            if got != n:
                self.fail(None, f"{got} {route} request(s) at the {kind} double, expected {n}\n"
                                f"{self.mock.diagnostics()}")
        messages = self.mock_messages()
        if "duplicates" in expect:
            got = len([m for m in messages if m.duplicate])
            if got != expect["duplicates"]:
                self.fail(None, f"{got} duplicate(s), expected {expect['duplicates']}")
        if "recipients" in expect:
            got = sorted(a for m in messages for a in self.recipients_of(m))
            want = sorted(expand_ranges(expect["recipients"]))
            if got != want:
                self.fail(None, f"recipients at the {kind} double:\n  {got}\nexpected\n  {want}")
        if "recipient_counts" in expect:
            got = sorted(len(self.recipients_of(m)) for m in messages)
            if got != sorted(expect["recipient_counts"]):
                self.fail(None, f"recipients per message {got}, expected "
                                f"{sorted(expect['recipient_counts'])}")
        if "auth" in expect:
            got = sorted({m.auth for m in messages})
            if got != [expect["auth"]]:
                self.fail(None, f"authentication {got}, expected {expect['auth']!r}")
        if "tokens" in expect:
            tokens = self.mock.token_requests()
            want = expect["tokens"]
            got = [{"kind": t.kind, "status": t.status, "scope": t.form.get("scope")}
                   for t in tokens]
            if len(got) != len(want) or any(
                    any(g[k] != v for k, v in w.items()) for g, w in zip(got, want)):
                self.fail(None, f"token requests {got}, expected {want}")
        specs = expect.get("message", [])
        if len(messages) < len(specs):
            self.fail(None, f"{len(messages)} message(s) at the {kind} double, "
                            f"{len(specs)} described")
        for i, (spec, message) in enumerate(zip(specs, messages)):
            errors = self.message_errors(spec, message)
            if errors:
                self.fail(None, f"message {i} at the {kind} double:\n  " + "\n  ".join(errors))

    def message_errors(self, spec: dict, message: Any) -> list[str]:
        errors = []
        if "auth" in spec and message.auth != spec["auth"]:
            errors.append(f"auth {message.auth!r}, expected {spec['auth']!r}")
        if "recipients" in spec:
            got = sorted(self.recipients_of(message))
            if got != sorted(expand_ranges(spec["recipients"])):
                errors.append(f"recipients {got}, expected {sorted(spec['recipients'])}")
        if "mailbox" in spec and getattr(message, "mailbox", None) != spec["mailbox"]:
            errors.append(f"mailbox {getattr(message, 'mailbox', None)!r}, expected "
                          f"{spec['mailbox']!r}")
        body = getattr(message, "message", None)
        if isinstance(body, dict):   # ACS: the request's "message" JSON
            errors += _match_json(spec.get("json", {}), body)
            for path, texts in spec.get("json_contains", {}).items():
                value = _json_path(body, path)
                for text in _list(texts):
                    if not isinstance(value, str) or text not in value:
                        errors.append(f"{path} = {value!r} lacks {text!r}")
            for path, keys in spec.get("json_lacks_keys", {}).items():
                value = _json_path(body, path) or {}
                present = {k.lower() for k in value} if isinstance(value, dict) else set()
                for key in _list(keys):
                    if key.lower() in present:
                        errors.append(f"{path} has key {key!r}: {value!r}")
        elif any(k.startswith("json") for k in spec):
            errors.append("json expectations apply to the ACS double only")
        mime = getattr(message, "mime", None)
        if isinstance(mime, bytes):  # Graph: the MIME message as sent
            parsed = message.message()
            for header, values in spec.get("mime_headers", {}).items():
                got = [str(v) for v in (parsed.get_all(header) or [])]
                if got != _list(values):
                    errors.append(f"MIME header {header}: {got}, expected {_list(values)}")
            text = mime.decode("utf-8", "replace")
            for t in _list(spec.get("mime_contains")):
                if t not in text:
                    errors.append(f"MIME lacks {t!r}")
            for t in _list(spec.get("mime_lacks")):
                if t in text:
                    errors.append(f"MIME contains {t!r}")
        elif any(k.startswith("mime") for k in spec):
            errors.append("mime expectations apply to the Graph double only")
        return errors

    def check_case(self) -> None:
        expect = self.spec.get("expect", {})
        if "mock" in expect:
            self.check_mock(expect["mock"])
        for rx in _list(expect.get("milter_log")):
            rx = self.expand(rx, None, escape=True)
            if not self.wait(lambda: re.search(rx, self.milter.log(), re.M)):
                self.fail(None, f"the milter's log lacks /{rx}/")
        # nothing else arrives, nothing else stays queued, nothing else reaches the service
        quiet = float(expect.get("quiet", 0.5))
        time.sleep(max(0.0, self.last_sent_at + quiet - time.monotonic()))
        for name in SINKS:
            extra = [m for m in self.new_sink_messages(name) if m.path not in self.arrived]
            if extra:
                self.fail(None, f"unexpected message(s) at sink {name!r}: " + "; ".join(
                    f"from=<{m.mail_from}> to={m.rcpt_to} subject={m['Subject']!r}"
                    for m in extra))
        wanted = {s.queue_id: s.spec["expect"]["queue"] for s in self.sent
                  if "queue" in s.spec.get("expect", {})}
        pf = self.env.postfix

        def queue_as_expected() -> bool:
            return {q["queue_id"]: q["queue_name"] for q in pf.queue()} == wanted
        if not self.wait(queue_as_expected):
            self.fail(None, f"Postfix's queue should hold {wanted or 'nothing'}:\n"
                            f"{pf.queue_text()}")
        if "mock" in expect and "messages" in expect["mock"]:
            self.check_message_count(int(expect["mock"]["messages"]))
        if expect.get("spool_empty") and os.listdir(self.spool):
            self.fail(None, f"spool directory not empty: {os.listdir(self.spool)}")
        log = self.milter.log()
        for text in _list(expect.get("milter_log_lacks")):
            if self.expand(text, None) in log:
                self.fail(None, f"the milter's log contains {text!r}")

    # -- the whole case -----------------------------------------------------------------------
    def run(self) -> None:
        self.prepare()
        transactions = list(enumerate(self.spec["transaction"], 1))
        claimed: set[str] = set()
        i = 0
        while i < len(transactions):
            index, tx = transactions[i]
            if self.mock is not None:
                self.apply_faults(tx)
            if "session" in tx:
                batch = [transactions[i]]
                while (i + len(batch) < len(transactions)
                       and transactions[i + len(batch)][1].get("session") == tx["session"]):
                    batch.append(transactions[i + len(batch)])
                if any("fault" in t or "clear_faults" in t for _, t in batch[1:]):
                    raise CaseError(f"{self.case.name}: faults go on a session's first "
                                    f"transaction")
                results = self.send_session(batch)
            else:
                batch = [transactions[i]]
                results = [self.send_swaks(index, tx)]
            self.last_sent_at = time.monotonic()
            self.sent += results
            for sent in results:
                self.check_transaction(sent, claimed)
            i += len(batch)
        self.check_case()

    def diagnostics(self) -> str:
        parts = [f"--- case {self.case.name} ({self.case.dir}), work dir {self.dir}"]
        for s in self.sent:
            parts.append(f"--- {s.label}: queue id {s.queue_id}, RCPT {s.rcpt_codes}, "
                         f"DATA {s.data}\n    decision: {s.decision}")
        if self.milter is not None:
            parts.append(self.milter.diagnostics(60))
        if self.mock is not None:
            parts.append(self.mock.diagnostics())
        pf = self.env.postfix
        if pf is not None:
            parts.append(f"--- {pf!r} maillog of this case:\n"
                         f"{harness._tail(pf.maillog(self.maillog_mark), 60)}\n"
                         f"--- queue:\n{pf.queue_text().strip() if pf.running else '(down)'}")
        parts += [s.describe() for s in self.env.sinks.values()]
        return "\n".join(parts)


# --------------------------------------------------------------------------------------------
# unittest
# --------------------------------------------------------------------------------------------

class Cases(harness.IntegrationTestCase):
    """One test method per case directory (added below)."""

    _env: Environment | None = None
    _env_key: str | None = None

    @classmethod
    def tearDownClass(cls) -> None:
        cls._drop_env()
        super().tearDownClass()

    @classmethod
    def _drop_env(cls) -> None:
        env, cls._env, cls._env_key = cls._env, None, None
        if env is not None:
            env.stop()

    @classmethod
    def _environment(cls, case: Case) -> Environment:
        if cls._env is not None and (cls._env_key != case.postfix_key or not cls._env.healthy()):
            cls._drop_env()
        if cls._env is None:
            cls._env = Environment(case.spec.get("postfix", {})).start()
            cls._env_key = case.postfix_key
        return cls._env

    def run_case(self, case: Case) -> None:
        if not harness.milter_binary():
            self.skipTest("PAAS_MILTER_BIN unset or not an executable")
        env = self._environment(case)
        env.reset()
        run = CaseRun(case, env)
        try:
            run.run()
        except unittest.SkipTest:
            raise
        except BaseException:
            env.broken = True   # the next case gets a fresh Postfix
            self._diag_text = run.diagnostics()
            raise
        finally:
            run.cleanup()


def _add_tests() -> list[Case]:
    try:
        cases = discover()
    except CaseError as exc:
        message = str(exc)

        def test_case_files(self: Cases) -> None:
            self.fail(message)
        Cases.test_case_files = test_case_files  # type: ignore[attr-defined]
        return []
    seen: dict[str, str] = {}
    for case in cases:
        if case.method_name in seen:
            raise CaseError(f"cases {seen[case.method_name]} and {case.name} make the same "
                            f"test name {case.method_name}")
        seen[case.method_name] = case.name

        def test(self: Cases, case: Case = case) -> None:
            self.run_case(case)
        test.__name__ = case.method_name
        test.__doc__ = f"cases/{case.name}: {case.description}".splitlines()[0]
        setattr(Cases, case.method_name, test)
    return cases


CASES = _add_tests()


def load_tests(loader: unittest.TestLoader, tests: unittest.TestSuite,
               pattern: str | None) -> unittest.TestSuite:
    """Cases sharing a Postfix one after the other (then by name)."""
    order = {c.method_name: (c.postfix_key, c.name) for c in CASES}
    names = loader.getTestCaseNames(Cases)
    suite = unittest.TestSuite()
    for name in sorted(names, key=lambda n: order.get(n, ("", n))):
        suite.addTest(Cases(name))
    return suite


if __name__ == "__main__":
    unittest.main(verbosity=2)
