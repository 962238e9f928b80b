#!/usr/bin/env python3
"""End-to-end throughput of Postfix with and without paas-milter, on loopback only.

The real parts: a private Postfix (tests/integration/harness.py PrivatePostfix, in a temp
dir, never touching /etc/postfix), two smtp-sink downstreams (the relayhost and the
"acs-relay" FILTER next hop), the paas-milter daemon, and Postfix's smtp-source as the load
generator:

    smtp-source -s SESSIONS -m MESSAGES -l SIZE -f FROM -t TO 127.0.0.1:SMTPD_PORT

One run measures every configuration, interleaved round by round (ABBA order), each
measurement preceded by an untimed warm-up batch. Every configuration has its own smtpd
listener in the one Postfix instance (master.cf `-o smtpd_milters=...`; no reloads), and
only the milter of the configuration being measured runs:

  baseline   Postfix alone, no smtpd_milters
  nomatch    paas-milter with the shipped example config (etc/ copied, socket rewritten to a
             free inet port); no rule matches the load: plain pass-through
  relay      the same plus a last rule `client_addr = ["127.0.0.1"]` -> acs-smtp: every
             message gets X-PaaS-Route and milter_header_checks FILTERs it to the second sink
  cidr5000   the example's "printers" rule with a generated 5,000-entry cidr table whose
             last line matches 127.0.0.1 -> acs-smtp

Figures per configuration (median over --rounds):
  accept   MESSAGES / (smtp-source start .. its exit): messages accepted into the queue per s
  deliver  MESSAGES / (smtp-source start .. the last `status=sent` in the maillog)
plus the CPU time per message of each part (Postfix = every process of the instance,
including exited ones through the master's cutime; the split by Postfix program is sampled
every 0.25 s, so a process's last slice before it exits may be missed), the system's busy
CPU time (/proc/stat) and what no part accounts for (kernel threads, softirqs, anything
else running on the machine).

Correctness is checked for every measurement (also the warm-up) and a failure aborts the
run with diagnostics: smtp-source exits 0 (it aborts on any non-2xx reply); exactly MESSAGES
messages queued (qmgr "queue active") and MESSAGES distinct queue ids `status=sent`, none
deferred/bounced/rejected; each at the expected sink port (default sink, or the acs-relay
sink for relay/cidr5000); the sinks' own counters (smtp-sink -c) grew by exactly that many;
one milter decision line per message with the expected rule/action. With --sink-dump the
sinks also append every message to one file each (smtp-sink -D; symmetric for all configs)
and every delivered message is parsed: the routing header is present exactly once at the
relay sink, and absent at the default sink.

Runs as root (postfix start, smtp-sink -u postfix); Python 3.11 standard library only.
Everything it starts is stopped and its temp dir removed on exit, failure, Ctrl-C or
SIGTERM (--keep keeps the temp dir).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(REPO, "tests", "integration"))

import harness  # noqa: E402  (tests/integration/harness.py)
from bench_common import (BenchError, load_average_warned,  # noqa: E402
                          run_bench)

SMTP_SOURCE = "/usr/sbin/smtp-source"
SMTP_SINK = harness.SMTP_SINK
FROM = "bench@example.com"
TO = "rcpt@example.net"       # not contoso.test: the example's "internal-only" rule must not match
RELAY_VALUE = "acs-smtp"       # routing header value of the example's relay route
CLK_TCK = os.sysconf("SC_CLK_TCK")
SAMPLE_INTERVAL = 0.25          # s, per-program CPU sampling of the Postfix processes

CONFIGS = {
    # name: (label, milter?, expected sink, expected decision regex in the milter log)
    "baseline": ("postfix alone", False, "default", None),
    "nomatch": ("+ paas-milter, no match", True, "default",
                r"rule=\(none\), route=\(none\), action=none"),
    "relay": ("+ paas-milter, relay (every msg)", True, "relay",
              rf"rule=bench-relay, route={RELAY_VALUE}, action=relay, "
              rf"header={harness.ROUTING_HEADER}: {RELAY_VALUE}"),
    # the relay route's floor: tests/bench/floor_milter.cpp, a libmilter filter that only adds
    # the same routing header (same negotiation and macros); relay / floor is what
    # paas-milter's own work costs, floor / baseline what the milter protocol and the header
    # edit cost Postfix and libmilter
    "floor": ("+ floor: libmilter adding the header", True, "relay", None),
    "cidr5000": ("+ paas-milter, relay, 5000 cidr", True, "relay",
                 rf"rule=printers, route={RELAY_VALUE}, action=relay, "
                 rf"header={harness.ROUTING_HEADER}: {RELAY_VALUE}.*devices\.cidr:"),
}


def proc_stat(pid: int) -> tuple[str, int, int, int] | None:
    """(comm, ppid, utime+stime, cutime+cstime) in clock ticks, or None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
    except OSError:
        return None
    lp, rp = s.index("("), s.rindex(")")
    comm = s[lp + 1:rp]
    fields = s[rp + 2:].split()
    # fields[0] = state (field 3); utime = field 14, stime 15, cutime 16, cstime 17
    return comm, int(fields[1]), int(fields[11]) + int(fields[12]), int(fields[13]) + int(fields[14])


def system_cpu() -> tuple[int, int, int]:
    """(busy, iowait, total) jiffies of all CPUs, from /proc/stat."""
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (vals + [0] * 8)[:8]
    total = user + nice + system + idle + iowait + irq + softirq + steal
    return total - idle - iowait, iowait, total


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


def fs_type(path: str) -> str:
    """Filesystem type of the mount holding PATH (longest mount point prefix)."""
    path = os.path.realpath(path)
    best, kind = "", "?"
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                mnt = parts[1].replace("\\040", " ")
                if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                    best, kind = mnt, parts[2]
    except OSError:
        pass
    return kind


# --------------------------------------------------------------------------------------------
# smtp-sink without a per-message dump
# --------------------------------------------------------------------------------------------

class CountingSink:
    """smtp-sink on 127.0.0.1:PORT that throws messages away (no -d: no file per message)
    and prints its counters (-c) to a file; with DUMP, appends every message to ONE file
    (-D), which lets the benchmark check each delivered message's headers."""

    COUNTER_RE = re.compile(rb"mesg=(\d+)")

    def __init__(self, workdir: str, name: str, dump: bool):
        self.name = name
        self.port = harness.free_port()
        self.dir = os.path.join(workdir, f"sink-{name}")
        os.makedirs(self.dir)
        os.chmod(self.dir, 0o755)
        uid, gid = harness._postfix_ids()
        os.chown(self.dir, uid, gid)  # smtp-sink -D writes as user postfix
        self.counter_path = os.path.join(self.dir, "counters")
        self.dump_path = os.path.join(self.dir, "dump") if dump else None
        self.proc: subprocess.Popen | None = None

    def start(self) -> "CountingSink":
        argv = [SMTP_SINK, "-u", "postfix", "-c", "-h", f"{self.name}.sink.bench"]
        if self.dump_path:
            argv += ["-D", self.dump_path]
        argv += [f"127.0.0.1:{self.port}", "256"]
        with open(self.counter_path, "wb") as out:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        harness.wait_listening(self.port, alive=lambda: self.proc.poll() is None,
                               what=f"smtp-sink {self.name}")
        return self

    def count(self) -> int:
        """Messages received so far ("." seen), from smtp-sink's last counter line."""
        try:
            with open(self.counter_path, "rb") as f:
                f.seek(max(0, os.path.getsize(self.counter_path) - 200))
                tail = f.read()
        except OSError:
            return 0
        found = self.COUNTER_RE.findall(tail)
        return int(found[-1]) if found else 0

    def dump_size(self) -> int:
        try:
            return os.path.getsize(self.dump_path) if self.dump_path else 0
        except FileNotFoundError:
            return 0

    def dump_messages(self, offset: int) -> list[bytes]:
        """The messages appended to the dump since byte OFFSET, one bytes object each."""
        if not self.dump_path:
            return []
        try:
            with open(self.dump_path, "rb") as f:
                f.seek(offset)
                data = f.read()
        except FileNotFoundError:
            return []
        starts = [m.start() for m in re.finditer(rb"^X-Client-Addr: ", data, re.M)]
        return [data[a:b] for a, b in zip(starts, starts[1:] + [len(data)])]

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


# --------------------------------------------------------------------------------------------
# milter configurations
# --------------------------------------------------------------------------------------------

RELAY_RULE = f"""

# added by tests/bench/throughput.py: every benchmark message matches (last rule, so all
# the example's rules are tried first)
[[rules]]
name = "bench-relay"
client_addr = ["127.0.0.1"]
route = "{RELAY_VALUE}"
"""


def cidr_table(entries: int) -> str:
    """ENTRIES lines: ENTRIES-1 networks in 10/8 and 172.16/12 that never match 127.0.0.1
    (mixed prefix lengths, so the trie has depth), then 127.0.0.1/32 -> acs-smtp last."""
    lines = ["# generated by tests/bench/throughput.py"]
    for i in range(entries - 1):
        if i % 4 == 3:
            lines.append(f"172.{16 + (i >> 16) % 16}.{(i >> 8) & 255}.{i & 255}/32  exchange-online")
        elif i % 4 == 2:
            lines.append(f"10.{(i >> 8) & 255}.{i & 255}.0/24  {RELAY_VALUE}")
        else:
            lines.append(f"10.{128 + ((i >> 8) & 127)}.{i & 255}.{(i * 7) & 255}/32  {RELAY_VALUE}")
    lines.append(f"127.0.0.1/32  {RELAY_VALUE}")
    return "\n".join(lines) + "\n"


def make_milter_config(workdir: str, name: str, socket: str) -> str:
    """Copy etc/ to WORKDIR/milter-NAME, rewrite the socket to SOCKET (libmilter syntax),
    apply NAME's changes; return the path of paas-milter.toml."""
    d = os.path.join(workdir, f"milter-{name}")
    shutil.copytree(os.path.join(REPO, "etc"), d)
    path = os.path.join(d, "paas-milter.toml")
    with open(path) as f:
        text = f.read()
    text, n = re.subn(r'(?m)^socket\s*=.*$', f'socket = "{socket}"', text)
    if n != 1:
        raise BenchError(f"{path}: expected one 'socket =' line, found {n}")
    if name == "relay":
        text += RELAY_RULE
    elif name == "cidr5000":
        if "cidr:tables/devices.cidr" not in text:
            raise BenchError("etc/paas-milter.toml no longer uses cidr:tables/devices.cidr")
        with open(os.path.join(d, "tables", "devices.cidr"), "w") as f:
            f.write(cidr_table(5000))
    with open(path, "w") as f:
        f.write(text)
    return path


def check_milter_config(binary: str, config: str, name: str) -> None:
    """`check` and `query` must agree with what the configuration is for."""
    def run(*args: str) -> str:
        p = subprocess.run([binary, *args, "-c", config], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, timeout=60)
        if p.returncode != 0:
            raise BenchError(f"paas-milter {args[0]} -c {config} exited {p.returncode}:\n{p.stdout}")
        return p.stdout
    run("check")
    out = run("query", "--client-addr", "127.0.0.1", "--from", FROM, "--rcpt", TO)
    want = "action: none" if name == "nomatch" else "action: relay"
    if want not in out or (name != "nomatch" and f"route: {RELAY_VALUE}" not in out):
        raise BenchError(f"{name}: paas-milter query does not say {want!r}:\n{out}")


@dataclasses.dataclass(frozen=True)
class MilterSetup:
    config: str                 # paas-milter.toml
    port: int                   # inet: the milter's port (0 for unix)
    unix_path: str | None       # unix: the socket's path
    postfix_socket: str         # smtpd_milters value (Postfix syntax)


def _unix_listening(path: str) -> bool:
    """True when a unix socket at PATH is in listening state (from /proc/net/unix, without
    connecting: a connection would be a spurious session for the milter)."""
    try:
        with open("/proc/net/unix") as f:
            next(f)
            for line in f:
                fields = line.split()
                # Num RefCount Protocol Flags Type St Inode Path; Flags 00010000 = listening
                if len(fields) >= 8 and fields[7] == path and int(fields[3], 16) & 0x10000:
                    return True
    except OSError:
        pass
    return False


class UnixMilter(harness.Milter):
    """harness.Milter, listening on a unix socket instead of 127.0.0.1:PORT."""

    def __init__(self, config_path: str, unix_path: str, **kw):
        super().__init__(config_path, 0, **kw)
        self.unix_path = unix_path

    def start(self, timeout: float = harness.DEFAULT_TIMEOUT) -> "UnixMilter":
        if self.running:
            return self
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=log, start_new_session=True,
                                         env=self.process_env())
        self.returncode = None
        harness._LIVE.add(self)
        deadline = time.monotonic() + timeout
        while not _unix_listening(self.unix_path):
            if not self.running or time.monotonic() > deadline:
                self.stop()
                raise harness.HarnessError(f"milter not listening on {self.unix_path} "
                                           f"(exit status {self.returncode})\n"
                                           f"{harness._tail(self.log(), 40)}")
            time.sleep(0.05)
        return self


# --------------------------------------------------------------------------------------------
# CPU accounting of the instance's processes
# --------------------------------------------------------------------------------------------

class CpuSampler:
    """CPU ticks per part during a window. Postfix total = all live processes of the
    instance (the master and its children) + the master's cutime (exited, reaped children)."""

    def __init__(self, master_pid: int, others: dict[str, int]):
        self.master = master_pid
        self.others = others          # name -> pid (milter, sinks)
        self.first: dict[int, tuple[str, int]] = {}
        self.last: dict[int, tuple[str, int]] = {}

    def _children(self) -> list[int]:
        try:   # CONFIG_PROC_CHILDREN: much cheaper than reading every /proc/PID/stat
            with open(f"/proc/{self.master}/task/{self.master}/children") as f:
                return [int(p) for p in f.read().split()]
        except OSError:
            pids = []
            for entry in os.listdir("/proc"):
                if entry.isdigit():
                    st = proc_stat(int(entry))
                    if st and st[1] == self.master:
                        pids.append(int(entry))
            return pids

    def _postfix(self) -> tuple[int, dict[int, tuple[str, int]]]:
        procs: dict[int, tuple[str, int]] = {}
        m = proc_stat(self.master)
        if m is None:
            raise BenchError("the Postfix master died")
        procs[self.master] = (m[0], m[2])
        total = m[2] + m[3]
        for pid in self._children():
            st = proc_stat(pid)
            if st and st[1] == self.master:
                procs[pid] = (st[0], st[2])
                total += st[2]
        return total, procs

    def start(self) -> None:
        self.t0_wall = time.monotonic()
        self.t0_sys = system_cpu()
        self.t0_self = resource.getrusage(resource.RUSAGE_SELF)
        self.t0_total, self.first = self._postfix()
        self.last = dict(self.first)
        self.t0_others = {n: (proc_stat(p) or ("", 0, 0, 0))[2] for n, p in self.others.items()}

    def sample(self) -> None:
        _, procs = self._postfix()
        self.last.update(procs)

    def stop(self) -> dict[str, float]:
        """Seconds of CPU per part."""
        total, procs = self._postfix()
        self.last.update(procs)
        sys1 = system_cpu()
        self1 = resource.getrusage(resource.RUSAGE_SELF)
        out: dict[str, float] = {}
        by_prog: dict[str, int] = {}
        for pid, (comm, ticks) in self.last.items():
            base = self.first.get(pid, (comm, 0))[1]
            by_prog[comm] = by_prog.get(comm, 0) + ticks - base
        out["postfix"] = (total - self.t0_total) / CLK_TCK
        for comm, ticks in by_prog.items():
            out[f"postfix/{comm}"] = ticks / CLK_TCK
        for n, p in self.others.items():
            st = proc_stat(p)
            out[n] = ((st[2] if st else 0) - self.t0_others[n]) / CLK_TCK
        out["bench"] = (self1.ru_utime + self1.ru_stime
                        - self.t0_self.ru_utime - self.t0_self.ru_stime)
        out["system_busy"] = (sys1[0] - self.t0_sys[0]) / CLK_TCK
        out["system_iowait"] = (sys1[1] - self.t0_sys[1]) / CLK_TCK
        out["system_total"] = (sys1[2] - self.t0_sys[2]) / CLK_TCK
        out["wall"] = time.monotonic() - self.t0_wall
        return out


# --------------------------------------------------------------------------------------------
# the benchmark
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Result:
    config: str
    round: int
    messages: int
    accept_s: float
    deliver_s: float
    cpu: dict[str, float]

    @property
    def accept_rate(self) -> float:
        return self.messages / self.accept_s

    @property
    def deliver_rate(self) -> float:
        return self.messages / self.deliver_s


SENT_RE = re.compile(r" ([0-9A-Za-z]+): to=<[^>]*>, relay=[^,]*?\]:(\d+), .*\bstatus=sent\b")
ACTIVE_RE = re.compile(r" ([0-9A-Za-z]+): from=<[^>]*>, size=\d+, nrcpt=\d+ \(queue active\)")
BAD_RE = re.compile(r"status=(deferred|bounced|expired)|\breject: |milter-reject|"
                    r"\b(fatal|panic):")


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.workdir = tempfile.mkdtemp(prefix="paas-bench-", dir=args.tmpdir)
        os.chmod(self.workdir, 0o755)  # the postfix user must traverse it
        self.sinks: dict[str, CountingSink] = {}
        self.postfix: harness.PrivatePostfix | None = None
        self.milter: harness.Milter | None = None
        self.milter_configs: dict[str, MilterSetup] = {}
        self.source: subprocess.Popen | None = None
        self.smtpd_ports: dict[str, int] = {}   # config name -> its smtpd listener
        self.warnings: list[str] = []

    # -- setup / teardown ---------------------------------------------------------------------
    def setup(self) -> None:
        dump = self.args.sink_dump
        self.sinks = {"default": CountingSink(self.workdir, "default", dump).start(),
                      "relay": CountingSink(self.workdir, "relay", dump).start()}
        for name in self.args.configs:
            if CONFIGS[name][1]:
                self.milter_configs[name] = self.milter_setup(name)
        self.postfix = harness.PrivatePostfix(
            self.workdir, default_sink_port=self.sinks["default"].port,
            routes={RELAY_VALUE: ("acs-relay", self.sinks["relay"].port)},
            use_milter=False, ipv6=False,
            main_cf={
                # the harness turns this off for test determinism; Postfix's default is on
                "smtp_connection_cache_on_demand": "yes",
                "milter_connect_timeout": "5s",
            })
        # One smtpd listener per configuration, each with its own smtpd_milters (master.cf
        # -o), so that switching configurations needs no `postfix reload`: after a reload,
        # every idle smtpd of the old generation still serves one more session with the OLD
        # smtpd_milters before it exits.
        lines = []
        for name in self.args.configs:
            port = self.postfix.smtpd_port if name == "baseline" else harness.free_port()
            self.smtpd_ports[name] = port
            if name == "baseline":
                continue
            lines.append(f"127.0.0.1:{port} inet n - n - - smtpd\n"
                         f"  -o smtpd_milters={self.milter_configs[name].postfix_socket}")
        with open(self.postfix.master_cf, "a") as f:
            f.write("# tests/bench/throughput.py: one listener per milter configuration\n"
                    + "".join(line + "\n" for line in lines))
        harness._backdate(self.postfix.master_cf)
        self.postfix.start()
        for name, port in self.smtpd_ports.items():
            harness.wait_listening(port, what=f"smtpd for {name}")

    def teardown(self) -> None:
        # Postfix before the milter: with no MTA connection left, the milter exits at once
        # instead of waiting out its grace period for messages in progress
        for step in (self._kill_source, lambda: self.postfix and self.postfix.stop(),
                     self._stop_milter, *[s.stop for s in self.sinks.values()]):
            try:
                step()
            except Exception as exc:  # keep cleaning up
                print(f"throughput: cleanup: {exc}", file=sys.stderr)
        # Postfix's daemons were re-parented to us (harness: child subreaper) when the master
        # exited: collect them, rather than leave zombies to init
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                time.sleep(0.05)
        if self.args.keep:
            print(f"throughput: kept {self.workdir}", file=sys.stderr)
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _kill_source(self) -> None:
        if self.source and self.source.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.source.pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.source.pid, 0)
            self.source.returncode = -9
        self.source = None

    def _stop_milter(self) -> None:
        if self.milter:
            self.milter.stop()
            self.milter = None

    # -- configuration switch -----------------------------------------------------------------
    def configure(self, name: str) -> None:
        """Only NAME's milter runs (its smtpd listener is the only one that gets load)."""
        self._stop_milter()
        if name in self.milter_configs:
            m = self.milter_configs[name]
            log_path = os.path.join(os.path.dirname(m.config), "paas-milter.log")
            kw = {"binary": self.args.binary, "log_path": log_path}
            if name == "floor":
                socket = (f"unix:{m.unix_path}" if m.unix_path else f"inet:{m.port}@127.0.0.1")
                kw["command"] = [self.args.floor_binary, socket, harness.ROUTING_HEADER,
                                 RELAY_VALUE]
            if m.unix_path:
                self.milter = UnixMilter(m.config, m.unix_path, **kw)
            else:
                self.milter = harness.Milter(m.config, m.port, **kw)
            self.milter.start()

    def milter_setup(self, name: str) -> "MilterSetup":
        if name == "floor":
            os.makedirs(os.path.join(self.workdir, "floor"))
        if self.args.socket == "unix":
            # Postfix's smtpd (user postfix, not chrooted here) must reach the socket: the
            # milter creates it group-writable (umask 007), and the setgid directory gives
            # it group postfix
            d = os.path.join(self.workdir, f"sock-{name}")
            os.makedirs(d)
            os.chown(d, 0, harness._postfix_ids()[1])
            os.chmod(d, 0o2750)
            path = os.path.join(d, "milter.sock")
            setup = MilterSetup("", 0, path, f"unix:{path}")
            cfg = make_milter_config(self.workdir, name, f"unix:{path}")
        else:
            port = harness.free_port()
            setup = MilterSetup("", port, None, f"inet:127.0.0.1:{port}")
            cfg = make_milter_config(self.workdir, name, f"inet:{port}@127.0.0.1")
        if name == "floor":
            return dataclasses.replace(setup, config=os.path.join(self.workdir, "floor", "-"))
        check_milter_config(self.args.binary, cfg, name)
        return dataclasses.replace(setup, config=cfg)

    # -- one batch of smtp-source -------------------------------------------------------------
    def run_batch(self, name: str, messages: int, rnd: int, timed: bool) -> Result:
        args = self.args
        what = f"{name} round {rnd}" + ("" if timed else " (warm-up)")
        expected_sink = CONFIGS[name][2]
        expected_port = self.sinks[expected_sink].port
        maillog = LogFollower(self.postfix.maillog_file, self.postfix.log_mark())
        milter_log = (LogFollower(self.milter.log_path, self.milter.log_mark())
                      if self.milter else None)
        sink_before = {n: s.count() for n, s in self.sinks.items()}
        dump_before = {n: s.dump_size() for n, s in self.sinks.items()}
        others = {f"sink-{n}": s.proc.pid for n, s in self.sinks.items()}
        if self.milter:
            others["milter"] = self.milter.pid
        cpu = CpuSampler(self.postfix.master_pid(), others)

        sent: dict[str, int] = {}     # queue id -> relay port
        active: set[str] = set()
        bad: list[str] = []

        def scan() -> None:
            # cheap substring tests first: this runs while the load runs, on the same CPUs
            for line in maillog.lines():
                if "status=" in line:
                    if " status=sent " in line and (m := SENT_RE.search(line)):
                        sent[m.group(1)] = int(m.group(2))
                    elif BAD_RE.search(line):
                        bad.append(line)
                elif "(queue active)" in line:
                    if m := ACTIVE_RE.search(line):
                        active.add(m.group(1))
                elif "reject" in line or "fatal:" in line or "panic:" in line:
                    if BAD_RE.search(line):
                        bad.append(line)
                elif "warning: " in line:
                    self.warnings.append(f"{what}: {line}")

        argv = [SMTP_SOURCE, "-s", str(args.sessions), "-m", str(messages), "-l", str(args.size),
                "-f", FROM, "-t", TO]
        if args.reuse_sessions:
            argv.append("-d")
        argv.append(f"127.0.0.1:{self.smtpd_ports[name]}")
        err_path = os.path.join(self.workdir, "smtp-source.err")
        exit_info: dict[str, object] = {}

        def waiter(pid: int) -> None:
            try:
                _, status, usage = os.wait4(pid, 0)
            except ChildProcessError:   # reaped by _kill_source
                return
            exit_info["t"] = time.monotonic()
            exit_info["rc"] = os.waitstatus_to_exitcode(status)
            exit_info["cpu"] = usage.ru_utime + usage.ru_stime

        cpu.start()
        with open(err_path, "wb") as err:
            t0 = time.monotonic()
            self.source = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                           stdout=subprocess.DEVNULL, stderr=err,
                                           start_new_session=True)
        thread = threading.Thread(target=waiter, args=(self.source.pid,), daemon=True)
        thread.start()
        deadline = t0 + args.timeout
        next_sample = t0 + SAMPLE_INTERVAL
        next_scan = t0 + 0.1
        t_accept: float | None = None
        # until smtp-source has exited and MESSAGES distinct queue ids were sent; the maillog
        # is followed all along (every 0.1 s, then 0.01 s once smtp-source is done), so that
        # its parsing does not pile up behind the end of the acceptance phase
        while True:
            if t_accept is None:
                thread.join(0.02)
                if not thread.is_alive():
                    self.source.returncode = exit_info["rc"]
                    self.source = None
                    t_accept = exit_info["t"] - t0
                    if exit_info["rc"] != 0:
                        raise BenchError(f"{what}: {' '.join(argv)} exited {exit_info['rc']}:\n"
                                         f"{harness._read_text(err_path).strip()}\n"
                                         f"{self.diagnostics()}")
            else:
                time.sleep(0.01)
            now = time.monotonic()
            if t_accept is not None or now >= next_scan:
                scan()
                next_scan = now + 0.1
                if bad:
                    raise BenchError(f"{what}: failures in the maillog:\n" + "\n".join(bad[:20])
                                     + f"\n{self.diagnostics()}")
                if t_accept is not None and len(sent) >= messages:
                    t_deliver = time.monotonic() - t0
                    break
            if now >= next_sample:
                cpu.sample()
                next_sample += SAMPLE_INTERVAL
            if now > deadline:
                if t_accept is None:
                    self._kill_source()
                    thread.join(5)
                    raise BenchError(f"{what}: smtp-source still running after "
                                     f"{args.timeout:.0f}s (killed); {len(sent)} delivered\n"
                                     f"{self.diagnostics()}")
                raise BenchError(f"{what}: {len(sent)} of {messages} delivered after "
                                 f"{args.timeout:.0f}s\n{self.diagnostics()}")
        usage = cpu.stop()
        usage["smtp-source"] = exit_info["cpu"]
        # 3. correctness
        self.verify(what, name, messages, sent, active, expected_port, milter_log,
                    sink_before, dump_before, scan, bad, deadline)
        return Result(name, rnd, messages, t_accept, t_deliver, usage)

    def verify(self, what, name, messages, sent, active, expected_port, milter_log,
               sink_before, dump_before, scan, bad, deadline) -> None:
        problems = []
        time.sleep(0.2)  # late log lines (qmgr "removed", a stray warning)
        scan()
        if bad:
            problems.append("failures in the maillog:\n" + "\n".join(bad[:20]))
        if len(sent) != messages:
            problems.append(f"{len(sent)} distinct queue ids status=sent, expected {messages}")
        if active != set(sent):
            problems.append(f"queued (qmgr 'queue active') {len(active)} != sent {len(sent)}; "
                            f"e.g. {sorted(active ^ set(sent))[:5]}")
        wrong = {q: p for q, p in sent.items() if p != expected_port}
        if wrong:
            problems.append(f"{len(wrong)} message(s) delivered to port(s) "
                            f"{sorted(set(wrong.values()))}, expected {expected_port} "
                            f"({CONFIGS[name][2]} sink)")
        # the sinks' own counts (the counter line is written when "." is received)
        want = {n: (messages if s.port == expected_port else 0) for n, s in self.sinks.items()}
        wait_until = min(deadline, time.monotonic() + 5)
        while True:
            got = {n: s.count() - sink_before[n] for n, s in self.sinks.items()}
            if got == want or time.monotonic() > wait_until or any(got[n] > want[n] for n in got):
                break
            time.sleep(0.05)
        if got != want:
            problems.append(f"smtp-sink counters grew by {got}, expected {want}")
        # one decision per message in the milter log
        regex = CONFIGS[name][3]
        if regex:
            lines = milter_log.lines()
            decisions = [ln for ln in lines if re.search(r"\baction=", ln)]
            matching = [ln for ln in decisions if re.search(regex, ln)]
            if len(decisions) != messages or len(matching) != messages:
                sample = [ln for ln in decisions if not re.search(regex, ln)][:3] or decisions[:3]
                problems.append(f"milter log: {len(decisions)} decision line(s), {len(matching)} "
                                f"matching /{regex}/, expected {messages}; e.g.\n  "
                                + "\n  ".join(sample))
            errors = [ln for ln in lines if re.search(r"(?i)\b(error|warning|fail)", ln)
                      and not re.search(r"\baction=", ln)]
            if errors:
                self.warnings.extend(f"{what}: milter: {ln}" for ln in errors[:10])
        # every delivered message as the sink saw it
        if self.args.sink_dump:
            for n, s in self.sinks.items():
                msgs = s.dump_messages(dump_before[n])
                if len(msgs) != want[n]:
                    problems.append(f"sink {n} dump: {len(msgs)} message(s), expected {want[n]}")
                hdr = re.compile(rb"(?mi)^" + re.escape(harness.ROUTING_HEADER.encode())
                                 + rb":[ \t]*(\S*)[ \t]*$")
                for raw in msgs:
                    head = raw.split(b"\n\n", 1)[0]
                    values = hdr.findall(head)
                    if CONFIGS[name][2] == "relay" and n == "relay":
                        ok = values == [RELAY_VALUE.encode()]
                    else:
                        ok = values == []
                    if not ok:
                        problems.append(f"sink {n}: message with {harness.ROUTING_HEADER} "
                                        f"{values}:\n{head[:1500].decode('utf-8', 'replace')}")
                        break
        if problems:
            raise BenchError(f"{what}: " + "\n".join(problems) + f"\n{self.diagnostics()}")

    def diagnostics(self) -> str:
        parts = []
        with contextlib.suppress(Exception):
            parts.append(self.postfix.diagnostics(30))
        if self.milter:
            with contextlib.suppress(Exception):
                parts.append(self.milter.diagnostics(20))
        return "\n".join(parts)

    # -- the whole run ------------------------------------------------------------------------
    def run(self) -> list[Result]:
        results: list[Result] = []
        total = self.args.rounds * len(self.args.configs)
        done = 0
        for rnd in range(1, self.args.rounds + 1):
            order = list(self.args.configs)
            if rnd % 2 == 0:
                order.reverse()   # ABBA: drift over the run affects every configuration alike
            for name in order:
                self.configure(name)
                if self.args.warmup:
                    self.run_batch(name, self.args.warmup, rnd, timed=False)
                r = self.run_batch(name, self.args.messages, rnd, timed=True)
                results.append(r)
                done += 1
                print(f"  [{done}/{total}] {name:9s} round {rnd}: accept {r.accept_rate:7.1f} msg/s "
                      f"({r.accept_s:.2f} s), deliver {r.deliver_rate:7.1f} msg/s "
                      f"({r.deliver_s:.2f} s)", file=sys.stderr, flush=True)
                self._stop_milter()
        return results


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------

def machine_facts(args: argparse.Namespace, workdir_fs: str, load_before: tuple) -> str:
    pf = subprocess.run([harness.POSTCONF, "-d", "-h", "mail_version"], stdout=subprocess.PIPE,
                        stderr=subprocess.DEVNULL, text=True).stdout.strip()
    mv = subprocess.run([args.binary, "version"], stdout=subprocess.PIPE,
                        stderr=subprocess.DEVNULL, text=True).stdout.strip()
    cpu_model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    return (f"machine: nproc {os.cpu_count()} (usable {len(os.sched_getaffinity(0))})"
            f"{', ' + cpu_model if cpu_model else ''}; kernel {platform.release()}; "
            f"postfix {pf}; {mv}; queue on {workdir_fs}; load average before "
            f"{load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}; "
            f"{args.messages} msgs x {args.size} B, {args.sessions} sessions"
            f"{' (reused: smtp-source -d)' if args.reuse_sessions else ''}, "
            f"warm-up {args.warmup}, {args.rounds} round(s), median; milter socket {args.socket}; "
            f"sinks {'append every message to one file (-D)' if args.sink_dump else 'discard'}")


def report(results: list[Result], args: argparse.Namespace, facts: str) -> str:
    by: dict[str, list[Result]] = {}
    for r in results:
        by.setdefault(r.config, []).append(r)
    med = {n: (statistics.median(r.accept_rate for r in rs),
               statistics.median(r.deliver_rate for r in rs)) for n, rs in by.items()}
    base = med.get("baseline")
    out = [f"{'config':34s} {'accept msg/s':>12s} {'ratio':>6s}  {'deliver msg/s':>13s} {'ratio':>6s}"]
    for n in args.configs:
        a, d = med[n]
        ra = f"{a / base[0]:6.2f}" if base else "     -"
        rd = f"{d / base[1]:6.2f}" if base else "     -"
        spread = ""
        if len(by[n]) > 1:
            acc = sorted(r.accept_rate for r in by[n])
            spread = f"   (accept {acc[0]:.0f}..{acc[-1]:.0f})"
        out.append(f"{CONFIGS[n][0]:34s} {a:12.1f} {ra}  {d:13.1f} {rd}{spread}")
    # CPU per message (median over rounds), microseconds
    out.append("")
    out.append("CPU per message, µs (start of smtp-source .. last delivery; median over rounds; "
               "other = /proc/stat busy not accounted to a part: kernel threads, foreign load; "
               "util = busy share of all CPUs):")
    parts = ["postfix", "milter", "smtp-source", "sink-default", "sink-relay", "bench"]
    ncpu = len(os.sched_getaffinity(0))
    for r in results:
        r.cpu["parts"] = sum(r.cpu.get(p, 0.0) for p in parts)
        # /proc/stat is tick-sampled and under-counts short bursts: clip at 0
        r.cpu["other"] = max(0.0, r.cpu["system_busy"] - r.cpu["parts"])
    cols = parts + ["other", "system_busy", "system_iowait"]
    out.append(f"{'config':34s} " + " ".join(f"{c.replace('system_', 'sys '):>12s}" for c in cols)
               + f" {'util':>5s}")
    for n in args.configs:
        row = []
        for c in cols:
            vals = [r.cpu.get(c, 0.0) / r.messages * 1e6 for r in by[n]]
            row.append(f"{statistics.median(vals):12.0f}")
        util = statistics.median(max(r.cpu["parts"], r.cpu["system_busy"]) / (ncpu * r.cpu["wall"])
                                 for r in by[n])
        out.append(f"{CONFIGS[n][0]:34s} " + " ".join(row) + f" {util:5.0%}")
    out.append("")
    out.append("Postfix CPU by program, µs per message (sampled every 0.25 s; 'unsampled' is the "
               "last slices of processes that exited):")
    progs = sorted({k for r in results for k in r.cpu if k.startswith("postfix/")},
                   key=lambda k: -sum(r.cpu.get(k, 0) for r in results))
    names = [p.split("/", 1)[1] for p in progs]
    out.append(f"{'config':34s} " + " ".join(f"{p[:10]:>10s}" for p in names) + f" {'unsampled':>10s}")
    for n in args.configs:
        row = []
        for p in progs:
            row.append(f"{statistics.median(r.cpu.get(p, 0) / r.messages * 1e6 for r in by[n]):10.0f}")
        rest = statistics.median((r.cpu["postfix"] - sum(v for k, v in r.cpu.items()
                                                         if k.startswith("postfix/")))
                                 / r.messages * 1e6 for r in by[n])
        out.append(f"{CONFIGS[n][0]:34s} " + " ".join(row) + f" {rest:10.0f}")
    out.append("")
    out.append(facts)
    out.extend(result_lines(med, args))
    return "\n".join(out)


# Issue 10's targets for the relay route, against Postfix alone in the same run.
RELAY_TARGET = {"unix": 0.90, "inet": 0.85}


def result_lines(med: dict[str, tuple[float, float]], args: argparse.Namespace) -> list[str]:
    """One machine-readable line per configuration for tests/bench/run.sh's table:
    RESULT, name, value, unit, baseline, ratio, target, met (tab-separated)."""
    base = med.get("baseline")
    lines = []
    for n in args.configs:
        if n == "baseline" or not base:
            continue
        accept = med[n][0]
        ratio = accept / base[0]
        target, met = "-", "-"
        if n == "relay":
            want = RELAY_TARGET[args.socket]
            target, met = f">= {want:.2f} x Postfix alone", "yes" if ratio >= want else "no"
        name = f"{n}, {args.socket} socket, {args.sessions} session(s)"
        lines.append("\t".join(["RESULT", name, f"{accept:.0f}", "msg/s", f"{base[0]:.0f}",
                                f"{ratio:.2f}", target, met]))
    # paas-milter against the floor: what its own work costs on the relay route
    if "relay" in med and "floor" in med:
        lines.append("\t".join(["RESULT", f"relay vs floor, {args.socket} socket, "
                                 f"{args.sessions} session(s)", f"{med['relay'][0]:.0f}",
                                 "msg/s", f"{med['floor'][0]:.0f}",
                                 f"{med['relay'][0] / med['floor'][0]:.2f}", "-", "-"]))
    return lines


# --------------------------------------------------------------------------------------------

def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="End-to-end throughput: Postfix alone vs. Postfix + paas-milter "
                    "(smtp-source -> private Postfix -> smtp-sink, loopback only).")
    p.add_argument("--messages", type=int, default=2000, help="messages per measurement (2000)")
    p.add_argument("--sessions", type=int, default=20, help="parallel SMTP sessions (20)")
    p.add_argument("--size", type=int, default=10240,
                   help="message payload bytes, smtp-source -l (10240)")
    p.add_argument("--rounds", type=int, default=1,
                   help="measure each configuration N times, report the median (1)")
    p.add_argument("--warmup", type=int, default=200,
                   help="untimed messages before each measurement (200; 0: none)")
    p.add_argument("--binary", default=os.path.join(REPO, "build", "milter", "paas-milter"),
                   help="paas-milter executable (build/milter/paas-milter in the repo)")
    p.add_argument("--floor-binary", default=None,
                   help="the floor filter (default: tests/bench/bench-floor-milter in the build "
                        "directory of --binary)")
    p.add_argument("--configs", default=",".join(CONFIGS),
                   help=f"comma-separated subset of {','.join(CONFIGS)} (all)")
    p.add_argument("--timeout", type=float, default=120,
                   help="abort a measurement after this many seconds (120)")
    p.add_argument("--socket", choices=("inet", "unix"), default="inet",
                   help="milter socket: inet (127.0.0.1, a free port; default) or unix")
    p.add_argument("--reuse-sessions", action="store_true",
                   help="smtp-source -d: several messages per SMTP session (default: one "
                        "session, hence one milter connection, per message)")
    p.add_argument("--sink-dump", action="store_true",
                   help="sinks append every message to one file (smtp-sink -D) and every "
                        "delivered message's routing header is checked")
    p.add_argument("--tmpdir", default=None,
                   help="parent of the temp dir (holds the Postfix queue; default $TMPDIR or /tmp)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir")
    a = p.parse_args(argv)
    a.configs = [c.strip() for c in a.configs.split(",") if c.strip()]
    unknown = [c for c in a.configs if c not in CONFIGS]
    if unknown or not a.configs:
        p.error(f"--configs: unknown {unknown}; choose from {','.join(CONFIGS)}")
    for opt in ("messages", "sessions", "size", "rounds"):
        if getattr(a, opt) < 1:
            p.error(f"--{opt} must be >= 1")
    if a.warmup < 0 or a.timeout <= 0:
        p.error("--warmup must be >= 0 and --timeout > 0")
    a.binary = os.path.abspath(a.binary)
    a.floor_binary = os.path.abspath(a.floor_binary or os.path.join(
        os.path.dirname(os.path.dirname(a.binary)), "tests", "bench", "bench-floor-milter"))
    return a


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("throughput: must run as root (postfix start, smtp-sink -u postfix)", file=sys.stderr)
        return 2
    for tool in (harness.POSTFIX, harness.POSTCONF, SMTP_SINK, SMTP_SOURCE):
        if not os.access(tool, os.X_OK):
            print(f"throughput: {tool} missing (Debian package postfix)", file=sys.stderr)
            return 2
    if any(CONFIGS[c][1] for c in args.configs) and not os.access(args.binary, os.X_OK):
        print(f"throughput: no paas-milter at {args.binary} (build it, or --binary PATH)",
              file=sys.stderr)
        return 2
    if "floor" in args.configs and not os.access(args.floor_binary, os.X_OK):
        print(f"throughput: no floor filter at {args.floor_binary} (build it, or --floor-binary)",
              file=sys.stderr)
        return 2
    load_before = load_average_warned("throughput")

    def body(bench: Bench) -> int:
        workdir_fs = fs_type(bench.workdir)
        print(f"throughput: temp dir {bench.workdir} ({workdir_fs}); "
              f"configs {', '.join(args.configs)}", file=sys.stderr, flush=True)
        bench.setup()
        results = bench.run()
        print(report(results, args, machine_facts(args, workdir_fs, load_before)))
        if bench.warnings:
            print(f"\n{len(bench.warnings)} warning(s) in the logs, first ones:")
            for w in bench.warnings[:10]:
                print("  " + w)
        return 0

    return run_bench("throughput", lambda: Bench(args), body)

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
