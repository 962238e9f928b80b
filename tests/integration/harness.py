"""Integration-test harness: a real private Postfix, smtp-sink capture servers, swaks, smtplib,
a throw-away test CA and the paas-milter daemon, all on the loopback interface only.

Python 3.11 standard library only. Must run as root (Postfix's `postfix start`, smtp-sink's
`-u postfix`). Typical use, from unittest:

    class MyTest(harness.IntegrationTestCase):
        def test_something(self):
            sink = self.start_sink("default")
            acs = self.start_sink("acs")
            pf = self.start_postfix(default_sink=sink, paas_sink=acs, use_milter=False)
            res = harness.swaks(pf.smtpd_port, to=["rcpt@example.com"], local_interface="127.0.0.2")
            self.assertEqual(res.data_code, 250)
            msg = sink.wait_for(1)[0]

Everything a test starts through IntegrationTestCase is stopped and its temp dir removed by
addCleanup, also when the test fails; on a failure the tails of the Postfix maillog, the
queue, the milter's log and the sinks' contents are appended to the failure report.
Set PAAS_IT_KEEP=1 to keep the temp dirs (their paths are printed).

Findings this harness relies on (Postfix 3.7.11, swaks 20201014, Debian 12):

* smtp-sink `-d TEMPLATE` writes one file per transaction named strftime(TEMPLATE) + "." +
  8 hex digits; the file is created at DATA and stays open until the final "." (nothing is
  written for a transaction that ends before DATA), so a file that smtp-sink still has open
  (see /proc/PID/fd) is incomplete. Content: smtp-sink's own
  pseudo-headers X-Client-Addr, X-Client-Proto, X-Helo-Args, X-Mail-Args ("<sender> SIZE=..."),
  one X-Rcpt-Args per RCPT ("<rcpt> ORCPT=..."), a 3-line "Received: ... (smtp-sink) ..."
  header, then the message exactly as received (dot-unstuffed, LF line ends), then one extra
  empty line. So the envelope IS in the dump. smtp-sink must run with `-u USER` as root
  (it setuid()s after binding), the dump directory must be writable by that user, and a
  backlog argument is mandatory. No STARTTLS.
* `postqueue -c DIR` / `postsuper -c DIR` / `postconf -c DIR` work for root with any
  directory. A non-root caller of the set-gid postqueue gets "unauthorized configuration
  directory name" unless DIR is listed in alternate_config_directories (or
  multi_instance_directories) of the DEFAULT /etc/postfix/main.cf; we always run as root,
  so /etc/postfix is never touched.
* The processes of an instance started with `postfix -c DIR start` do not show DIR on their
  command line, but all carry MAIL_CONFIG=DIR in their environment (import_environment
  passes it on); stop() uses that to make sure nothing of the instance survives.
* With maillog_file set, `postfix start` and the daemons log there through postlogd; the
  file must be under maillog_file_prefixes. With no /dev/log this is the ONLY place where
  fatal errors appear.
* swaks --local-interface 127.0.0.x works (any address in 127/8 is local on Linux).
  swaks --tls / --tls-cert need Net::SSLeay (libnet-ssleay-perl, only Recommended by swaks,
  so absent with --no-install-recommends), IPv6 needs IO::Socket::INET6.
"""

from __future__ import annotations

import atexit
import dataclasses
import email
import email.message
import email.policy
import email.utils
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from typing import Any

POSTFIX = "/usr/sbin/postfix"
POSTCONF = "/usr/sbin/postconf"
POSTQUEUE = "/usr/sbin/postqueue"
POSTSUPER = "/usr/sbin/postsuper"
SMTP_SINK = "/usr/sbin/smtp-sink"
SWAKS = "/usr/bin/swaks"
OPENSSL = "/usr/bin/openssl"

TEST_HOSTNAME = "paas-test.localdomain"
ROUTING_HEADER = "X-PaaS-Route"
QUEUED_AS_RE = re.compile(r"queued as ([0-9A-Za-z]+)")

DEFAULT_TIMEOUT = 15.0


class HarnessError(RuntimeError):
    """Something in the test infrastructure (not the code under test) went wrong."""


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------

def free_port(host: str = "127.0.0.1") -> int:
    """A currently unused TCP port on HOST (127.0.0.1 or ::1). Racy by nature, but the port
    is bound immediately by the caller in practice."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def have_ipv6_loopback() -> bool:
    try:
        with open("/proc/net/if_inet6") as f:
            return any(line.split()[0] == "0" * 31 + "1" for line in f if line.strip())
    except OSError:
        return False


def _listening_ports() -> set[tuple[str, int]]:
    """(address, port) of every TCP socket in LISTEN state, from /proc/net/tcp{,6}."""
    out: set[tuple[str, int]] = set()
    for path, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        try:
            with open(path) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if len(fields) < 4 or fields[3] != "0A":
                        continue
                    addr_hex, port_hex = fields[1].split(":")
                    raw = bytes.fromhex(addr_hex)
                    if v6:
                        # four little-endian 32-bit words
                        raw = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
                        addr = socket.inet_ntop(socket.AF_INET6, raw)
                    else:
                        addr = socket.inet_ntop(socket.AF_INET, raw[::-1])
                    out.add((addr, int(port_hex, 16)))
        except OSError:
            continue
    return out


def is_listening(port: int, host: str = "127.0.0.1") -> bool:
    """True when something listens on HOST:PORT, checked WITHOUT connecting (a connect would
    show up as a spurious session in Postfix's or the milter's log)."""
    wild = "::" if ":" in host else "0.0.0.0"
    ports = _listening_ports()
    return (host, port) in ports or (wild, port) in ports or ("::", port) in ports


_METRIC_SAMPLE = re.compile(r"^([a-z_]+)(\{[^}]*\})? (\S+)$", re.M)


def scrape_metrics(port: int, host: str = "127.0.0.1") -> str:
    """The milter's Prometheus exposition from http://HOST:PORT/metrics, as Prometheus reads it."""
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as reply:
        if reply.status != 200:
            raise HarnessError(f"metrics on {host}:{port} answered HTTP {reply.status}")
        return reply.read().decode()


def metric_samples(text: str) -> dict[str, float]:
    """{'name{labels}': value} of every sample, labels as the exposition writes them."""
    return {m.group(1) + (m.group(2) or ""): float(m.group(3))
            for m in _METRIC_SAMPLE.finditer(text)}


def wait_listening(port: int, host: str = "127.0.0.1", timeout: float = DEFAULT_TIMEOUT,
                   alive: Callable[[], bool] | None = None, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if is_listening(port, host):
            return
        if alive is not None and not alive():
            raise HarnessError(f"{what or 'process'} exited before listening on {host}:{port}")
        time.sleep(0.05)
    raise HarnessError(f"{what or 'nothing'} listening on {host}:{port} after {timeout}s")


def _pid_alive(pid: int) -> bool:
    """Alive and not a zombie (a daemonized master is reaped by init, not by us)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    state = stat[stat.rfind(")") + 2:].split(" ", 1)[0]
    return state not in ("Z", "X")


def _run(argv: Sequence[str], *, check: bool = True, timeout: float = 60,
         env: dict[str, str] | None = None, input: bytes | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          stdin=subprocess.DEVNULL if input is None else None, input=input,
                          timeout=timeout, env=env)
    proc.text = proc.stdout.decode("utf-8", "replace")  # type: ignore[attr-defined]
    if check and proc.returncode != 0:
        raise HarnessError(f"{' '.join(argv)} exited {proc.returncode}:\n{proc.text}")
    return proc


def _tail(text: str, lines: int) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _read_text(path: str, offset: int = 0) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


def _wait_for_regex(read: Callable[[], str], pattern: str | re.Pattern, timeout: float,
                    describe: Callable[[], str], flags: int = re.M) -> re.Match:
    rx = re.compile(pattern, flags) if isinstance(pattern, str) else pattern
    deadline = time.monotonic() + timeout
    while True:
        m = rx.search(read())
        if m:
            return m
        if time.monotonic() >= deadline:
            raise AssertionError(f"pattern {rx.pattern!r} not seen within {timeout}s\n{describe()}")
        time.sleep(0.1)


_SUBREAPER = False


def _become_subreaper() -> None:
    """Make this process the child subreaper (prctl PR_SET_CHILD_SUBREAPER), so that a
    daemonized Postfix master is re-parented to us instead of init and stop() can reap it:
    otherwise `pgrep -a master` shows "[master] <defunct>" until init gets round to it."""
    global _SUBREAPER
    if _SUBREAPER:
        return
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        _SUBREAPER = libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        pass


def _reap(pid: int, timeout: float = 2.0) -> None:
    """Collect PID's exit status if it is (re-parented to be) our child."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return
        if done or time.monotonic() >= deadline:
            return
        time.sleep(0.02)


def _backdate(*paths: str) -> None:
    """Set mtime 10 s into the past. Postfix's main.cf reader (dict_load_file) re-reads a file
    modified within the current second, sleeping 300 ms per try, until the mtime is old
    enough: a freshly written main.cf costs every postfix/postconf/postqueue command ~2 s."""
    t = time.time() - 10
    for p in paths:
        if os.path.exists(p):
            os.utime(p, (t, t))


def _postfix_ids() -> tuple[int, int]:
    pw = pwd.getpwnam("postfix")
    return pw.pw_uid, pw.pw_gid


# running things that must not survive the test process, whatever happens
_LIVE: set[Any] = set()


@atexit.register
def _stop_leftovers() -> None:
    for obj in list(_LIVE):
        try:
            obj.stop()
        except Exception as exc:  # pragma: no cover - best effort at interpreter exit
            print(f"harness: could not stop {obj!r}: {exc}", file=sys.stderr)


# --------------------------------------------------------------------------------------------
# smtp-sink
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class SinkMessage:
    """One transaction captured by smtp-sink."""
    path: str
    client_addr: str           # X-Client-Addr (the Postfix SMTP client's source address)
    client_proto: str          # SMTP / ESMTP / LMTP
    helo: str | None           # X-Helo-Args
    mail_from: str             # envelope sender, without <> ("" for the null sender)
    rcpt_to: list[str]         # envelope recipients, without <>, in RCPT order
    mail_args: str             # whole MAIL FROM argument ("<a@b> SIZE=123 BODY=8BITMIME")
    rcpt_args: list[str]       # whole RCPT TO arguments ("<a@b> ORCPT=rfc822;a@b")
    raw: bytes                 # the message (header + body) as received
    message: email.message.Message

    def __getitem__(self, name: str) -> Any:     # sink_msg["Subject"]
        return self.message[name]

    def get_all(self, name: str) -> list[str]:
        return [str(v) for v in (self.message.get_all(name) or [])]


def _envelope_address(args: str) -> str:
    m = re.match(r"\s*<([^>]*)>", args)
    if m:
        return m.group(1)
    return args.split()[0] if args.split() else ""


def parse_sink_dump(path: str, data: bytes | None = None) -> SinkMessage:
    """Parse one smtp-sink `-d` dump file (format: see the module docstring)."""
    if data is None:
        with open(path, "rb") as f:
            data = f.read()
    lines = data.split(b"\n")
    pseudo: dict[str, list[str]] = {}
    i = 0
    while i < len(lines):
        line = lines[i]
        m = re.match(rb"(X-Client-Addr|X-Client-Proto|X-Helo-Args|X-Mail-Args|X-Rcpt-Args): ?(.*)$",
                     line)
        if m:
            pseudo.setdefault(m.group(1).decode(), []).append(m.group(2).decode("utf-8", "replace"))
            i += 1
            continue
        if line.startswith(b"Received: ") and b"(smtp-sink)" in b"\n".join(lines[i:i + 3]):
            i += 1
            while i < len(lines) and lines[i][:1] in (b" ", b"\t"):
                i += 1
        break
    body_lines = lines[i:]
    raw = b"\n".join(body_lines)
    # smtp-sink appends one empty line after the message
    if raw.endswith(b"\n\n"):
        raw = raw[:-1]
    mail_args = (pseudo.get("X-Mail-Args") or [""])[0]
    rcpt_args = pseudo.get("X-Rcpt-Args", [])
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    return SinkMessage(
        path=path,
        client_addr=(pseudo.get("X-Client-Addr") or [""])[0],
        client_proto=(pseudo.get("X-Client-Proto") or [""])[0],
        helo=(pseudo.get("X-Helo-Args") or [None])[0],
        mail_from=_envelope_address(mail_args),
        rcpt_to=[_envelope_address(a) for a in rcpt_args],
        mail_args=mail_args,
        rcpt_args=rcpt_args,
        raw=raw,
        message=msg,
    )


class Sink:
    """Postfix's smtp-sink on 127.0.0.1:PORT, dumping each transaction to a directory."""

    def __init__(self, workdir: str, name: str = "sink", port: int | None = None,
                 extra_args: Sequence[str] = ()):
        self.name = name
        self.port = port or free_port()
        self.dir = os.path.join(workdir, f"sink-{name}")
        self.dump_dir = os.path.join(self.dir, "dump")
        self.log_path = os.path.join(self.dir, "smtp-sink.log")
        self.extra_args = list(extra_args)
        self.proc: subprocess.Popen | None = None
        os.makedirs(self.dump_dir, exist_ok=True)
        os.chmod(self.dir, 0o755)
        uid, gid = _postfix_ids()
        os.chown(self.dump_dir, uid, gid)  # smtp-sink writes as user postfix

    def __repr__(self) -> str:
        return f"<Sink {self.name} 127.0.0.1:{self.port}>"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = DEFAULT_TIMEOUT) -> "Sink":
        if self.running:
            return self
        argv = [SMTP_SINK, "-u", "postfix", "-h", f"{self.name}.sink.test",
                "-d", os.path.join(self.dump_dir, "%Y%m%d%H%M%S."), *self.extra_args,
                f"inet:127.0.0.1:{self.port}", "64"]
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         start_new_session=True)
        finally:
            log.close()
        _LIVE.add(self)
        try:
            wait_listening(self.port, timeout=timeout, alive=lambda: self.running,
                           what=f"smtp-sink {self.name}")
        except HarnessError as exc:
            self.stop()
            raise HarnessError(f"{exc}\n{_read_text(self.log_path)}") from None
        return self

    def stop(self, timeout: float = 10) -> None:
        _LIVE.discard(self)
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        self.proc = None

    def _open_files(self) -> set[str]:
        if self.proc is None:
            return set()
        fd_dir = f"/proc/{self.proc.pid}/fd"
        found = set()
        try:
            for fd in os.listdir(fd_dir):
                try:
                    found.add(os.readlink(os.path.join(fd_dir, fd)))
                except OSError:
                    pass
        except OSError:
            pass
        return found

    def files(self, complete_only: bool = True) -> list[str]:
        """Dump files, oldest first; by default only transactions that have ended."""
        try:
            names = os.listdir(self.dump_dir)
        except FileNotFoundError:
            return []
        paths = [os.path.join(self.dump_dir, n) for n in names]
        if complete_only:
            busy = self._open_files()
            paths = [p for p in paths if p not in busy]
        entries = []
        for p in paths:
            try:
                entries.append((os.stat(p).st_mtime_ns, p))
            except FileNotFoundError:
                pass
        return [p for _, p in sorted(entries)]

    def messages(self) -> list[SinkMessage]:
        out = []
        for p in self.files():
            try:
                out.append(parse_sink_dump(p))
            except FileNotFoundError:
                pass
        return out

    def wait_for(self, count: int, timeout: float = DEFAULT_TIMEOUT) -> list[SinkMessage]:
        """Wait until at least COUNT complete messages were received; return all of them."""
        deadline = time.monotonic() + timeout
        while True:
            msgs = self.messages()
            if len(msgs) >= count:
                return msgs
            if time.monotonic() >= deadline:
                raise AssertionError(f"{self!r}: {len(msgs)} message(s) after {timeout}s, "
                                     f"expected {count}\n{self.describe()}")
            time.sleep(0.1)

    def assert_stays_empty(self, seconds: float = 1.0) -> None:
        time.sleep(seconds)
        msgs = self.messages()
        if msgs:
            raise AssertionError(f"{self!r} received {len(msgs)} message(s), expected none\n"
                                 f"{self.describe()}")

    def clear(self) -> None:
        for p in self.files(complete_only=False):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass

    def describe(self) -> str:
        lines = [f"--- {self!r} ({'running' if self.running else 'stopped'}):"]
        for m in self.messages():
            lines.append(f"  {os.path.basename(m.path)} from=<{m.mail_from}> to={m.rcpt_to} "
                         f"subject={m.message['Subject']!r} {ROUTING_HEADER}="
                         f"{m.message.get_all(ROUTING_HEADER)}")
        log = _read_text(self.log_path).strip()
        if log:
            lines.append("  log: " + _tail(log, 10))
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# test CA (openssl CLI)
# --------------------------------------------------------------------------------------------

_OPENSSL_CNF = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[v3_ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[v3_server]
basicConstraints = CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost,DNS:paas-test.localdomain,IP:127.0.0.1,IP:::1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[v3_client]
basicConstraints = CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


@dataclasses.dataclass
class Cert:
    cert: str      # PEM certificate path
    key: str       # PEM private key path (unencrypted)
    subject: str   # as given to openssl, e.g. "/O=Contoso/CN=printer-42.contoso.test"
    cn: str
    issuer_cn: str


class TestCA:
    """A throw-away PKI: "Test CA" (trusted by the private Postfix via smtpd_tls_CAfile), a
    server certificate for smtpd, and a second "Untrusted Test CA" nobody trusts."""
    __test__ = False  # not a test class (pytest)

    CN = "Test CA"
    UNTRUSTED_CN = "Untrusted Test CA"

    def __init__(self, directory: str):
        self.dir = directory
        os.makedirs(directory, exist_ok=True)
        os.chmod(directory, 0o755)
        self.cnf = os.path.join(directory, "openssl.cnf")
        with open(self.cnf, "w") as f:
            f.write(_OPENSSL_CNF)
        self.ca_cert, self.ca_key = self._make_ca("ca", self.CN)
        self.untrusted_ca_cert, self.untrusted_ca_key = self._make_ca("untrusted-ca", self.UNTRUSTED_CN)
        self.server = self._make_leaf("server", f"/CN={TEST_HOSTNAME}", "v3_server",
                                      self.ca_cert, self.ca_key, self.CN)
        self.server_cert, self.server_key = self.server.cert, self.server.key

    def _openssl(self, *args: str) -> None:
        _run([OPENSSL, *args])

    def _make_ca(self, name: str, cn: str) -> tuple[str, str]:
        cert = os.path.join(self.dir, f"{name}.pem")
        key = os.path.join(self.dir, f"{name}.key")
        self._openssl("req", "-x509", "-config", self.cnf, "-extensions", "v3_ca",
                      "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                      "-keyout", key, "-out", cert, "-days", "3650", "-subj", f"/CN={cn}")
        return cert, key

    def _make_leaf(self, name: str, subject: str, ext: str, ca_cert: str, ca_key: str,
                   issuer_cn: str) -> Cert:
        base = os.path.join(self.dir, name)
        self._openssl("req", "-new", "-config", self.cnf, "-newkey", "ec",
                      "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                      "-keyout", base + ".key", "-out", base + ".csr", "-subj", subject)
        self._openssl("x509", "-req", "-in", base + ".csr", "-CA", ca_cert, "-CAkey", ca_key,
                      "-set_serial", "0x" + secrets.token_hex(8), "-days", "825",
                      "-extfile", self.cnf, "-extensions", ext, "-out", base + ".pem")
        m = re.search(r"CN=([^/]*)", subject)
        return Cert(cert=base + ".pem", key=base + ".key", subject=subject,
                    cn=m.group(1) if m else "", issuer_cn=issuer_cn)

    def make_client_cert(self, cn: str, *, org: str | None = None, untrusted: bool = False,
                         name: str | None = None) -> Cert:
        """A client certificate with CommonName CN (subject "/O=ORG/CN=CN" when ORG is given),
        signed by "Test CA", or by "Untrusted Test CA" when UNTRUSTED."""
        subject = (f"/O={org}" if org else "") + f"/CN={cn}"
        name = name or ("untrusted-" if untrusted else "client-") + re.sub(r"[^A-Za-z0-9.-]", "_", cn)
        if untrusted:
            return self._make_leaf(name, subject, "v3_client", self.untrusted_ca_cert,
                                   self.untrusted_ca_key, self.UNTRUSTED_CN)
        return self._make_leaf(name, subject, "v3_client", self.ca_cert, self.ca_key, self.CN)


def make_test_ca(directory: str) -> TestCA:
    return TestCA(directory)


# --------------------------------------------------------------------------------------------
# private Postfix
# --------------------------------------------------------------------------------------------

# Every service of Debian's master.cf that can matter, all with chroot = n. The smtpd
# listeners and the relay transports are added by PrivatePostfix.
_MASTER_CF_SERVICES = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def _cf_value(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (list, tuple)):
        return ", ".join(str(x) for x in v)
    return str(v)


class PrivatePostfix:
    """A complete Postfix instance under BASE_DIR/postfix, started with `postfix -c DIR start`.

    Layout: etc/ (config_directory: main.cf, master.cf, milter_header_checks),
    spool/ (queue_directory), data/ (data_directory, owned by postfix), log/maillog.
    Only root runs the Postfix commands here, so nothing needs alternate_config_directories
    in /etc/postfix/main.cf (see the module docstring); /etc/postfix is only read (Debian's
    meta_directory: dynamicmaps.cf for the pcre: map type, postfix-files).

    Listeners (master.cf, all chroot = n):
      smtpd_port   127.0.0.1, plain (no STARTTLS)
      smtpd6_port  [::1], plain (only when ::1 exists; else None)
      tls_port     127.0.0.1, STARTTLS offered, client certificate asked (only with tls_ca)
    Delivery: relayhost = [127.0.0.1]:default_sink.port; milter_header_checks maps
    "X-PaaS-Route: <value>" to "FILTER <transport>:[127.0.0.1]:<port>" for each route
    (default: acs-smtp -> acs-relay, an smtp(8) clone, to the paas sink).
    """

    def __init__(self, base_dir: str, *, default_sink_port: int, paas_sink_port: int | None = None,
                 routes: dict[str, tuple[str, int]] | None = None, use_milter: bool = True,
                 milter_port: int | None = None, tls_ca: TestCA | None = None,
                 ipv6: bool | None = None, peername_lookup: bool = False,
                 main_cf: dict[str, Any] | None = None):
        self.dir = os.path.join(base_dir, "postfix")
        self.config_dir = os.path.join(self.dir, "etc")
        self.queue_dir = os.path.join(self.dir, "spool")
        self.data_dir = os.path.join(self.dir, "data")
        self.log_dir = os.path.join(self.dir, "log")
        self.maillog_file = os.path.join(self.log_dir, "maillog")
        self.main_cf = os.path.join(self.config_dir, "main.cf")
        self.master_cf = os.path.join(self.config_dir, "master.cf")
        self.header_checks_file = os.path.join(self.config_dir, "milter_header_checks")
        self.default_sink_port = default_sink_port
        if routes is None:
            routes = {"acs-smtp": ("acs-relay", paas_sink_port)} if paas_sink_port else {}
        self.routes = dict(routes)
        self.use_milter = use_milter
        self.milter_port = (milter_port or free_port()) if use_milter else None
        self.tls_ca = tls_ca
        self.ipv6 = have_ipv6_loopback() if ipv6 is None else ipv6
        self.smtpd_port = free_port()
        self.smtpd6_port = free_port("::1") if self.ipv6 else None
        self.tls_port = free_port() if tls_ca else None
        self._started = False
        self._write_config(peername_lookup, main_cf or {})

    def __repr__(self) -> str:
        return f"<PrivatePostfix {self.config_dir} smtpd 127.0.0.1:{self.smtpd_port}>"

    # -- configuration ------------------------------------------------------------------------
    def _write_config(self, peername_lookup: bool, extra: dict[str, Any]) -> None:
        for d in (self.dir, self.config_dir, self.queue_dir, self.data_dir, self.log_dir):
            os.makedirs(d, exist_ok=True)
            os.chmod(d, 0o755)
        uid, gid = _postfix_ids()
        os.chown(self.data_dir, uid, gid)
        os.chmod(self.data_dir, 0o700)

        main: dict[str, Any] = {
            "compatibility_level": "3.6",
            "config_directory": self.config_dir,
            "queue_directory": self.queue_dir,
            "data_directory": self.data_dir,
            "maillog_file": self.maillog_file,
            "maillog_file_prefixes": self.log_dir,
            "myhostname": TEST_HOSTNAME,
            "mydomain": "localdomain",
            "myorigin": "$myhostname",
            "mydestination": "",
            "relay_domains": "",
            "local_recipient_maps": "",
            "alias_maps": "",
            "alias_database": "",
            "biff": "no",
            "append_dot_mydomain": "no",
            "inet_interfaces": "loopback-only",
            "inet_protocols": "ipv4, ipv6" if self.ipv6 else "ipv4",
            "mynetworks": "127.0.0.0/8 [::1]/128",
            # lets a test impersonate any client address/name (swaks --xclient-addr)
            "smtpd_authorized_xclient_hosts": "127.0.0.0/8 [::1]/128",
            "smtpd_peername_lookup": peername_lookup,
            "relayhost": f"[127.0.0.1]:{self.default_sink_port}",
            # never DNS: next hops are [literal]:port, client names not looked up
            "smtp_dns_support_level": "disabled",
            "smtp_host_lookup": "native",
            "lmtp_host_lookup": "native",
            "smtp_connect_timeout": "2s",
            "smtp_connection_cache_on_demand": "no",
            "smtputf8_enable": "yes",
            # fast retries of deferred mail
            "queue_run_delay": "1s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "2s",
            "transport_retry_time": "1s",
            "delay_warning_time": "0",
            "smtpd_tls_security_level": "none",
            "milter_protocol": "6",
            "milter_default_action": "tempfail",
            "milter_header_checks": f"pcre:{self.header_checks_file}",
        }
        if self.use_milter:
            main["smtpd_milters"] = f"inet:127.0.0.1:{self.milter_port}"
            main["milter_connect_timeout"] = "5s"
        if self.tls_ca:
            main.update({
                "smtpd_tls_cert_file": self.tls_ca.server_cert,
                "smtpd_tls_key_file": self.tls_ca.server_key,
                "smtpd_tls_CAfile": self.tls_ca.ca_cert,
                "smtpd_tls_ask_ccert": "yes",
                "smtpd_tls_loglevel": "1",
                "smtpd_tls_received_header": "yes",
            })
        main.update(extra)
        with open(self.main_cf, "w") as f:
            f.write("# generated by tests/integration/harness.py\n")
            for k, v in main.items():
                if v is not None:
                    f.write(f"{k} = {_cf_value(v)}\n")

        lines = ["# generated by tests/integration/harness.py; chroot = n everywhere",
                 f"127.0.0.1:{self.smtpd_port} inet n - n - - smtpd"]
        if self.smtpd6_port:
            lines.append(f"[::1]:{self.smtpd6_port} inet n - n - - smtpd")
        if self.tls_port:
            lines.append(f"127.0.0.1:{self.tls_port} inet n - n - - smtpd\n"
                         f"  -o syslog_name=postfix/tls\n"
                         f"  -o smtpd_tls_security_level=may")
        lines.append(_MASTER_CF_SERVICES.rstrip("\n"))
        for transport in sorted({t for t, _ in self.routes.values()}):
            lines.append(f"{transport} unix - - n - - smtp\n  -o syslog_name=postfix/{transport}")
        with open(self.master_cf, "w") as f:
            f.write("\n".join(lines) + "\n")
        self.write_header_checks()
        _backdate(self.main_cf, self.master_cf)

    def header_checks_lines(self) -> list[str]:
        return [f"/^{ROUTING_HEADER}:\\s*{re.escape(value)}\\s*$/ FILTER {transport}:[127.0.0.1]:{port}"
                for value, (transport, port) in self.routes.items()]

    def write_header_checks(self, lines: Iterable[str] | None = None) -> None:
        """(Re)write milter_header_checks; default: one FILTER line per route. pcre tables are
        re-read by cleanup(8) processes only when they restart: reload() after changing it."""
        with open(self.header_checks_file, "w") as f:
            f.write("# generated by tests/integration/harness.py\n")
            for line in (self.header_checks_lines() if lines is None else lines):
                f.write(line + "\n")

    # -- commands -----------------------------------------------------------------------------
    def _cmd(self, tool: str, *args: str, check: bool = True, timeout: float = 60):
        return _run([tool, "-c", self.config_dir, *args], check=check, timeout=timeout)

    def check(self) -> str:
        """`postfix -c DIR check`; raises with its output (and the maillog tail) on failure."""
        proc = self._cmd(POSTFIX, "check", check=False)
        if proc.returncode != 0:
            raise HarnessError(f"postfix check failed ({proc.returncode}):\n{proc.text}\n"
                               f"--- maillog:\n{self.maillog_tail()}")
        return proc.text

    def master_pid(self) -> int | None:
        try:
            with open(os.path.join(self.queue_dir, "pid", "master.pid")) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None

    @property
    def running(self) -> bool:
        pid = self.master_pid()
        return pid is not None and _pid_alive(pid)

    def processes(self) -> list[int]:
        """PIDs of every live process of this instance (MAIL_CONFIG=config_dir in environ)."""
        needle = b"MAIL_CONFIG=" + self.config_dir.encode()
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    env = f.read().split(b"\0")
            except OSError:
                continue
            if needle in env and _pid_alive(int(entry)):
                pids.append(int(entry))
        return pids

    def start(self, timeout: float = DEFAULT_TIMEOUT) -> "PrivatePostfix":
        if self.running:
            return self
        _LIVE.add(self)
        _become_subreaper()
        mark = self.log_mark()
        proc = self._cmd(POSTFIX, "start", check=False, timeout=timeout + 30)
        if proc.returncode != 0:
            self.stop()
            raise HarnessError(f"postfix start failed ({proc.returncode}):\n{proc.text}\n"
                               f"--- maillog:\n{self.maillog_tail()}")
        self._started = True
        try:
            # master -w returned, so the listeners exist; the log line also proves postlogd
            self.wait_for_log(r"postfix/master\[\d+\]: daemon started", timeout=timeout,
                              since=mark)
            for host, port in (("127.0.0.1", self.smtpd_port), ("::1", self.smtpd6_port),
                               ("127.0.0.1", self.tls_port)):
                if port:
                    wait_listening(port, host, timeout=timeout, alive=lambda: self.running,
                                   what="postfix master")
        except HarnessError as exc:
            self.stop()
            raise HarnessError(f"{exc}\n--- maillog:\n{self.maillog_tail()}") from None
        return self

    def stop(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        """`postfix stop`, then make sure no process of this instance is left."""
        _LIVE.discard(self)
        pid = self.master_pid()
        if pid is not None and _pid_alive(pid):
            proc = self._cmd(POSTFIX, "stop", check=False, timeout=timeout)
            deadline = time.monotonic() + timeout
            while _pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _pid_alive(pid):
                self._cmd(POSTFIX, "abort", check=False, timeout=timeout)
                time.sleep(0.5)
            if proc.returncode != 0 and _pid_alive(pid):
                print(f"harness: postfix stop: {proc.text}", file=sys.stderr)
            _reap(pid)
        # daemons notice the master's death through their status pipe; wait, then insist
        deadline = time.monotonic() + 5
        while self.processes() and time.monotonic() < deadline:
            time.sleep(0.05)
        leftovers = self.processes()
        for p in leftovers:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 5
        while self.processes() and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.processes():
            raise HarnessError(f"processes of {self!r} survive SIGKILL: {self.processes()}")
        self._started = False

    def reload(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        """`postfix reload` and wait until the master has re-read its configuration."""
        mark = self.log_mark()
        self._cmd(POSTFIX, "reload")
        self.wait_for_log(r"postfix/master\[\d+\]: reload -- version", timeout=timeout, since=mark)

    def postconf(self, *names: str, **params: Any) -> dict[str, str]:
        """Set main.cf PARAMS (None removes one) and return the values of NAMES.
        Call reload() for a running instance to pick changes up. Edit main.cf through this
        (or _backdate() it after editing by hand): see _backdate()."""
        sets = [f"{k}={_cf_value(v)}" for k, v in params.items() if v is not None]
        removes = [k for k, v in params.items() if v is None]
        if sets:
            self._cmd(POSTCONF, "-e", *sets)
        if removes:
            self._cmd(POSTCONF, "-X", *removes)
        if sets or removes:
            _backdate(self.main_cf)
        values: dict[str, str] = {}
        if names:
            for line in self._cmd(POSTCONF, *names).text.splitlines():
                k, _, v = line.partition(" = ")
                values[k.strip()] = v.strip()
        return values

    def postconf_master(self, *entries: str) -> None:
        """Set master.cf service parameters: "service/type/name=value" (postconf -P)."""
        self._cmd(POSTCONF, "-P", *entries)
        _backdate(self.master_cf)

    def postqueue(self, *args: str, check: bool = True) -> str:
        return self._cmd(POSTQUEUE, *args, check=check).text

    def postsuper(self, *args: str, check: bool = True) -> str:
        return self._cmd(POSTSUPER, *args, check=check).text

    def queue(self) -> list[dict]:
        """`postqueue -j`: one dict per message (queue_name, queue_id, sender,
        recipients[{address, delay_reason}], ...)."""
        out = []
        for line in self.postqueue("-j").splitlines():
            line = line.strip()
            if line.startswith("{"):
                out.append(json.loads(line))
        return out

    def queue_text(self) -> str:
        return self.postqueue("-p", check=False)

    def queue_ids(self, queue_name: str | None = None) -> list[str]:
        return [q["queue_id"] for q in self.queue() if queue_name in (None, q["queue_name"])]

    def held_queue_ids(self) -> list[str]:
        return self.queue_ids("hold")

    def wait_for_queue(self, predicate: Callable[[list[dict]], bool],
                       timeout: float = DEFAULT_TIMEOUT) -> list[dict]:
        deadline = time.monotonic() + timeout
        while True:
            q = self.queue()
            if predicate(q):
                return q
            if time.monotonic() >= deadline:
                raise AssertionError(f"queue condition not met within {timeout}s:\n"
                                     f"{json.dumps(q, indent=1)}\n{self.diagnostics()}")
            time.sleep(0.1)

    def wait_for_empty_queue(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.wait_for_queue(lambda q: not q, timeout)

    def flush(self) -> None:
        """`postqueue -f`: retry deferred mail now."""
        self.postqueue("-f")

    # -- log ----------------------------------------------------------------------------------
    def maillog(self, since: int = 0) -> str:
        return _read_text(self.maillog_file, since)

    def log_mark(self) -> int:
        """Current end of the maillog; pass it as `since` to look only at newer lines."""
        try:
            return os.path.getsize(self.maillog_file)
        except FileNotFoundError:
            return 0

    def maillog_tail(self, lines: int = 60) -> str:
        return _tail(self.maillog(), lines)

    def wait_for_log(self, pattern: str | re.Pattern, timeout: float = DEFAULT_TIMEOUT,
                     since: int = 0) -> re.Match:
        return _wait_for_regex(lambda: self.maillog(since), pattern, timeout,
                               lambda: self.diagnostics())

    def log_for(self, queue_id: str) -> list[str]:
        return [line for line in self.maillog().splitlines() if f" {queue_id}: " in line]

    def wait_for_status(self, queue_id: str, status: str = "sent",
                        timeout: float = DEFAULT_TIMEOUT) -> re.Match:
        """Wait for a delivery log line of QUEUE_ID with STATUS (sent/deferred/bounced)."""
        return self.wait_for_log(rf"^.* {re.escape(queue_id)}: .*\bstatus={status}\b.*$", timeout)

    def diagnostics(self, lines: int = 60) -> str:
        q = self.queue_text() if self.running else "(not running)"
        return (f"--- {self!r} maillog tail:\n{self.maillog_tail(lines)}\n"
                f"--- queue:\n{q.strip()}")


# --------------------------------------------------------------------------------------------
# the milter daemon
# --------------------------------------------------------------------------------------------

def milter_binary() -> str | None:
    """$PAAS_MILTER_BIN when it names an executable file, else None."""
    path = os.environ.get("PAAS_MILTER_BIN")
    if path and os.path.isfile(path) and os.access(path, os.X_OK):
        return path
    return None


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v))  # a JSON string is a valid TOML basic string


def milter_config(port: int, body: str = "", **milter_keys: Any) -> str:
    """TOML text: a [milter] table listening on inet:PORT@127.0.0.1 (plus MILTER_KEYS, e.g.
    mode="dry-run", default_route="acs-smtp"), followed by BODY (routes, rules)."""
    keys = {"socket": f"inet:{port}@127.0.0.1", "routing_header": ROUTING_HEADER,
            "mode": "enforce", **milter_keys}
    head = "[milter]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in keys.items())
    return head + "\n" + body.strip() + "\n"


class Milter:
    """Runs `BINARY run --foreground -c CONFIG` (or COMMAND, a full argv) with stdout and
    stderr in LOG_PATH, waiting until it listens on 127.0.0.1:PORT."""

    def __init__(self, config_path: str, port: int, *, binary: str | None = None,
                 log_path: str | None = None, command: Sequence[str] | None = None,
                 env: dict[str, str] | None = None):
        self.config_path = config_path
        self.port = port
        self.binary = binary or milter_binary()
        if command is None and not self.binary:
            raise HarnessError("no milter binary: set PAAS_MILTER_BIN")
        self.command = list(command) if command else [self.binary, "run", "--foreground",
                                                      "-c", config_path]
        self.log_path = log_path or os.path.join(os.path.dirname(config_path) or ".",
                                                 "paas-milter.log")
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.returncode: int | None = None

    def __repr__(self) -> str:
        return f"<Milter {' '.join(self.command)} port {self.port}>"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def process_env(self) -> dict[str, str]:
        """ENV if given, else ours plus what systemd's StateDirectory= passes: the journal
        of posted API requests goes to a directory beside the configuration (never to
        /var/lib) and survives the milter's restarts."""
        if self.env is not None:
            return self.env
        state = os.path.join(os.path.dirname(os.path.abspath(self.config_path)), "state")
        os.makedirs(state, mode=0o700, exist_ok=True)
        return {**os.environ, "STATE_DIRECTORY": state}

    def start(self, timeout: float = DEFAULT_TIMEOUT) -> "Milter":
        if self.running:
            return self
        if is_listening(self.port):
            raise HarnessError(f"port {self.port} already in use before the milter started")
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=log, start_new_session=True,
                                         env=self.process_env())
        finally:
            log.close()
        self.returncode = None
        _LIVE.add(self)
        try:
            wait_listening(self.port, timeout=timeout, alive=lambda: self.running,
                           what="milter")
        except HarnessError as exc:
            self.stop()
            raise HarnessError(f"{exc} (exit status {self.returncode})\n--- milter log:\n"
                               f"{_tail(self.log(), 40)}") from None
        return self

    def log(self, since: int = 0) -> str:
        return _read_text(self.log_path, since)

    def log_mark(self) -> int:
        try:
            return os.path.getsize(self.log_path)
        except FileNotFoundError:
            return 0

    def wait_for_log(self, pattern: str | re.Pattern, timeout: float = DEFAULT_TIMEOUT,
                     since: int = 0) -> re.Match:
        return _wait_for_regex(lambda: self.log(since), pattern, timeout,
                               lambda: self.diagnostics())

    def reload(self) -> None:
        """SIGHUP: re-read the configuration."""
        if not self.running:
            raise HarnessError(f"{self!r} is not running")
        self.proc.send_signal(signal.SIGHUP)

    def stop(self, timeout: float = 10) -> int | None:
        """SIGTERM, wait up to TIMEOUT s, then SIGKILL. Returns the exit status (negative:
        killed by that signal), also kept in .returncode."""
        _LIVE.discard(self)
        if self.proc is None:
            return self.returncode
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                print(f"harness: {self!r} ignored SIGTERM for {timeout}s, killing",
                      file=sys.stderr)
                self.proc.kill()
                self.proc.wait(timeout)
        self.returncode = self.proc.returncode
        self.proc = None
        return self.returncode

    def diagnostics(self, lines: int = 40) -> str:
        state = "running" if self.running else f"stopped, exit status {self.returncode}"
        return f"--- {self!r} ({state}) log tail:\n{_tail(self.log(), lines)}"


def fake_milter_command(port: int, routes: dict[str, str] | None = None,
                        header: str = ROUTING_HEADER) -> list[str]:
    """argv for Milter(command=...) running this module's minimal Python milter: it adds
    "HEADER: VALUE" at end of message for clients whose address is a key of ROUTES."""
    argv = [sys.executable, os.path.abspath(__file__), "fake-milter", "--port", str(port),
            "--header", header]
    for addr, value in (routes or {}).items():
        argv += ["--route", f"{addr}={value}"]
    return argv


# --------------------------------------------------------------------------------------------
# SMTP clients
# --------------------------------------------------------------------------------------------

_SWAKS_REPLY_RE = re.compile(r"^(<-|<~|<\*\*|<~\*)\s+(\d{3})([ -])(.*)$")
_SWAKS_SEND_RE = re.compile(r"^\s*(->|~>|\*\*>|~\*>)\s?(.*)$")


@dataclasses.dataclass
class SwaksResult:
    returncode: int
    transcript: str
    argv: list[str]
    replies: list[tuple[str, int, str]]  # (command it answered, code, full text), in order
    data_code: int | None                # reply to the end of DATA (".")
    data_reply: str | None
    queue_id: str | None                 # from "250 2.0.0 Ok: queued as XXXX"
    first_error: tuple[int, str] | None  # first 4xx/5xx reply

    def __iter__(self):                  # rc, transcript = swaks(...)
        return iter((self.returncode, self.transcript))

    def reply_to(self, command: str) -> tuple[int, str] | None:
        """Last reply to COMMAND ("MAIL", "RCPT", "DATA", ".", "EHLO", "STARTTLS", ...)."""
        for cmd, code, text in reversed(self.replies):
            if cmd == command.upper():
                return code, text
        return None


def parse_swaks_transcript(text: str) -> tuple[list[tuple[str, int, str]], int | None,
                                               str | None, str | None, tuple[int, str] | None]:
    replies: list[tuple[str, int, str]] = []
    last_cmd = "CONNECT"
    pending: list[str] = []
    in_data = False
    for line in text.splitlines():
        m = _SWAKS_REPLY_RE.match(line)
        if m:
            pending.append(f"{m.group(2)}{m.group(3)}{m.group(4)}")
            if m.group(3) == " ":
                replies.append((last_cmd, int(m.group(2)), "\n".join(pending)))
                pending = []
                if last_cmd == "DATA" and int(m.group(2)) == 354:
                    in_data = True
            continue
        s = _SWAKS_SEND_RE.match(line)
        if s and not line.startswith("==="):
            payload = s.group(2)
            if in_data:
                if payload == ".":
                    last_cmd, in_data = ".", False
                continue
            word = payload.split(" ", 1)[0].split(":", 1)[0].upper()
            if word:
                last_cmd = word
    data = next(((c, t) for cmd, c, t in reversed(replies) if cmd == "."), None)
    data_code, data_reply = (data if data else (None, None))
    qid = None
    if data_reply:
        q = QUEUED_AS_RE.search(data_reply)
        qid = q.group(1) if q else None
    first_error = next(((c, t) for _, c, t in replies if c >= 400), None)
    return replies, data_code, data_reply, qid, first_error


def swaks(port: int, *, server: str = "127.0.0.1", from_: str = "sender@example.com",
          to: str | Sequence[str] = ("rcpt@example.net",), headers: Sequence[str] = (),
          body: str | None = None, data: str | bytes | None = None,
          local_interface: str | None = None, helo: str | None = "client.test",
          tls: bool = False, tls_cert: str | Cert | None = None, tls_key: str | None = None,
          xclient: dict[str, str] | None = None, timeout: float = 15,
          extra_args: Sequence[str] = ()) -> SwaksResult:
    """Run swaks against SERVER:PORT. HEADERS are "Name: value" strings (replacing swaks'
    default header of that name, else added); DATA is a whole message (headers+body) instead
    of swaks' template; TLS_CERT may be a Cert (its key is used). XCLIENT: {"ADDR": "192.0.2.7",
    "NAME": "..."} sends XCLIENT (the instance authorizes 127/8). Never raises on SMTP errors."""
    if isinstance(to, str):
        to = [to]
    if isinstance(tls_cert, Cert):
        tls_key = tls_key or tls_cert.key
        tls_cert = tls_cert.cert
    argv = [SWAKS, "--server", server, "--port", str(port), "--from", from_,
            "--to", ",".join(to), "--timeout", str(int(timeout))]
    if ":" in server:
        argv.append("-6")
    if helo:
        argv += ["--helo", helo]
    if local_interface:
        argv += ["--local-interface", local_interface]
    for h in headers:
        argv += ["--header", h]
    tmpfiles = []
    try:
        if body is not None:
            tf = tempfile.NamedTemporaryFile("wb", delete=False, suffix=".body")
            tf.write(body.encode() if isinstance(body, str) else body)
            tf.close()
            tmpfiles.append(tf.name)
            argv += ["--body", "@" + tf.name]
        if data is not None:
            tf = tempfile.NamedTemporaryFile("wb", delete=False, suffix=".eml")
            tf.write(data.encode() if isinstance(data, str) else data)
            tf.close()
            tmpfiles.append(tf.name)
            argv += ["--data", "@" + tf.name]
        if tls or tls_cert:
            argv.append("--tls")
        if tls_cert:
            argv += ["--tls-cert", str(tls_cert), "--tls-key", str(tls_key)]
        if xclient:
            argv += ["--xclient", " ".join(f"{k}={v}" for k, v in xclient.items())]
        argv += list(extra_args)
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, timeout=timeout * 4 + 10)
    finally:
        for p in tmpfiles:
            os.unlink(p)
    text = proc.stdout.decode("utf-8", "replace")
    replies, data_code, data_reply, qid, first_error = parse_swaks_transcript(text)
    return SwaksResult(proc.returncode, text, argv, replies, data_code, data_reply, qid,
                       first_error)


@dataclasses.dataclass
class Transaction:
    """Result of one MAIL..DATA transaction of smtp_session()."""
    mail: tuple[int, str]
    rcpt: list[tuple[int, str]]
    data: tuple[int, str] | None   # None when no recipient was accepted
    queue_id: str | None


def make_message(from_: str, to: Sequence[str], subject: str = "test", body: str = "test\n",
                 headers: Sequence[str] = ()) -> bytes:
    msg = email.message.EmailMessage(policy=email.policy.SMTP)
    msg["From"] = from_
    msg["To"] = ", ".join(to)
    msg["Subject"] = subject
    msg["Message-ID"] = email.utils.make_msgid(domain="client.test")
    msg["Date"] = email.utils.formatdate(localtime=False)
    for h in headers:
        name, _, value = h.partition(":")
        msg[name.strip()] = value.strip()
    msg.set_content(body)
    return msg.as_bytes()


def smtp_session(port: int, transactions: Sequence[tuple[str, Sequence[str], bytes]], *,
                 host: str = "127.0.0.1", source_addr: str | None = None,
                 helo: str = "client.test", starttls: bool = False, cert: Cert | None = None,
                 rset_between: bool = True, timeout: float = 30) -> list[Transaction]:
    """Send several transactions (sender, recipients, message bytes) in ONE SMTP session
    from SOURCE_ADDR, with RSET between them. Errors are recorded, not raised."""
    import ssl
    results = []
    src = (source_addr, 0) if source_addr else None
    with smtplib.SMTP(host, port, local_hostname=helo, timeout=timeout,
                      source_address=src) as s:
        s.ehlo()
        if starttls or cert:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            if cert:
                ctx.load_cert_chain(cert.cert, cert.key)
            s.starttls(context=ctx)
            s.ehlo()
        for n, (sender, rcpts, data) in enumerate(transactions):
            if n and rset_between:
                s.rset()
            mail = s.mail(sender)
            rcpt_replies: list[tuple[int, str]] = []
            data_reply = None
            if mail[0] == 250:
                for r in rcpts:
                    code, text = s.rcpt(r)
                    rcpt_replies.append((code, text.decode("utf-8", "replace")))
                if any(c in (250, 251) for c, _ in rcpt_replies):
                    code, text = s.data(data)
                    data_reply = (code, text.decode("utf-8", "replace"))
            qid = None
            if data_reply and data_reply[0] == 250:
                q = QUEUED_AS_RE.search(data_reply[1])
                qid = q.group(1) if q else None
            results.append(Transaction((mail[0], mail[1].decode("utf-8", "replace")),
                                       rcpt_replies, data_reply, qid))
            if mail[0] != 250 or data_reply is None:
                s.rset()
    return results


def send_two_messages(port: int, source_addr: str = "127.0.0.1", *,
                      first: tuple[str, Sequence[str], bytes] | None = None,
                      second: tuple[str, Sequence[str], bytes] | None = None,
                      **kw: Any) -> tuple[str | None, str | None]:
    """Two messages in one SMTP session (RSET between); returns both queue ids."""
    first = first or ("one@example.com", ["rcpt1@example.net"],
                      make_message("one@example.com", ["rcpt1@example.net"], "first"))
    second = second or ("two@example.com", ["rcpt2@example.net"],
                        make_message("two@example.com", ["rcpt2@example.net"], "second"))
    r = smtp_session(port, [first, second], source_addr=source_addr, **kw)
    return r[0].queue_id, r[1].queue_id


# --------------------------------------------------------------------------------------------
# unittest integration
# --------------------------------------------------------------------------------------------

def require_root() -> None:
    if os.geteuid() != 0:
        raise unittest.SkipTest("integration tests need root (postfix start, smtp-sink -u)")
    for tool in (POSTFIX, SMTP_SINK, SWAKS, OPENSSL):
        if not os.access(tool, os.X_OK):
            raise unittest.SkipTest(f"{tool} missing: run contrib/scripts/install-deps.sh")


class IntegrationTestCase(unittest.TestCase):
    """Owns a temp dir per test; everything started through start_* is stopped by cleanups
    (also on failure), and on failure the diagnostics are appended to the report."""

    @classmethod
    def setUpClass(cls) -> None:
        require_root()

    def workdir(self) -> str:
        wd = getattr(self, "_workdir", None)
        if wd is None:
            wd = tempfile.mkdtemp(prefix="paas-it-")
            os.chmod(wd, 0o755)  # the postfix user must traverse it
            self._workdir = wd
            self._resources: list[Any] = []
            if os.environ.get("PAAS_IT_KEEP"):
                print(f"\nharness: keeping {wd}", file=sys.stderr)
            else:
                self.addCleanup(shutil.rmtree, wd, True)
            self.addCleanup(self._snapshot_diagnostics)  # runs after the stops, before rmtree
            self.addCleanup(self._check_logs_for_secrets)  # after the stops, too
        return wd

    def _check_logs_for_secrets(self) -> None:
        """No log line of the milter or of Postfix may show a secret a double made or was
        given (mock_common.SECRETS_IN_PLAY: keys, client secrets, issued tokens)."""
        mocks = sys.modules.get("mock_common")
        secrets_in_play = getattr(mocks, "SECRETS_IN_PLAY", set()) if mocks else set()
        if not secrets_in_play:
            return
        for obj in self._resources:
            if isinstance(obj, Milter):
                name, text = obj.log_path, obj.log()
            elif isinstance(obj, PrivatePostfix):
                name, text = "the Postfix mail log", obj.maillog()
            else:
                continue
            leaked = sum(1 for secret in secrets_in_play if secret in text)
            if leaked:
                self.fail(f"{name} shows {leaked} secret(s) of the test doubles")

    def _track(self, obj: Any) -> Any:
        self.workdir()
        self._resources.append(obj)
        self.addCleanup(obj.stop)
        return obj

    def start_sink(self, name: str = "sink", **kw: Any) -> Sink:
        sink = Sink(self.workdir(), name, **kw)
        self._track(sink)
        return sink.start()

    def make_ca(self) -> TestCA:
        ca = getattr(self, "_ca", None)
        if ca is None:
            ca = self._ca = make_test_ca(os.path.join(self.workdir(), "ca"))
        return ca

    def start_postfix(self, *, default_sink: Sink, paas_sink: Sink | None = None,
                      tls: bool = False, start: bool = True, **kw: Any) -> PrivatePostfix:
        pf = PrivatePostfix(self.workdir(), default_sink_port=default_sink.port,
                            paas_sink_port=paas_sink.port if paas_sink else None,
                            tls_ca=self.make_ca() if tls else None, **kw)
        self._track(pf)
        return pf.start() if start else pf

    def write_config(self, name: str, text: str) -> str:
        path = os.path.join(self.workdir(), name)
        with open(path, "w") as f:
            f.write(text)
        return path

    def start_milter(self, port: int, config_text: str | None = None, *,
                     command: Sequence[str] | None = None, start: bool = True,
                     **kw: Any) -> Milter:
        """Start $PAAS_MILTER_BIN with CONFIG_TEXT (skips the test when unset/missing), or
        COMMAND (e.g. fake_milter_command(port, ...))."""
        if command is None and not milter_binary():
            self.skipTest("PAAS_MILTER_BIN unset or not an executable")
        cfg = self.write_config("paas-milter.toml", config_text or milter_config(port))
        m = Milter(cfg, port, command=command, **kw)
        self._track(m)
        return m.start() if start else m

    def diagnostics(self) -> str:
        parts = []
        for obj in getattr(self, "_resources", []):
            try:
                parts.append(obj.describe() if isinstance(obj, Sink) else obj.diagnostics())
            except Exception as exc:
                parts.append(f"--- {obj!r}: no diagnostics ({exc})")
        return "\n".join(parts)

    def _snapshot_diagnostics(self) -> None:
        self._diag_text = self.diagnostics()

    def run(self, result: unittest.TestResult | None = None):
        if result is None:
            result = self.defaultTestResult()
        before = {name: len(getattr(result, name, None) or [])
                  for name in ("failures", "errors")}
        super().run(result)
        diag = getattr(self, "_diag_text", "")
        if diag:
            for name, n in before.items():
                lst = getattr(result, name, None)
                if isinstance(lst, list):
                    for i in range(n, len(lst)):
                        test, text = lst[i]
                        if test is self:
                            lst[i] = (test, f"{text}\n==== harness diagnostics ====\n{diag}\n")
        return result


# --------------------------------------------------------------------------------------------
# a minimal milter (protocol 6) to test the harness and Postfix's milter path without the
# C++ daemon:  python3 harness.py fake-milter --port P [--route 127.0.0.2=acs-smtp ...]
# --------------------------------------------------------------------------------------------

def _fake_milter_main(argv: list[str]) -> int:
    import argparse
    import socketserver
    import struct

    ap = argparse.ArgumentParser(prog="fake-milter")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--header", default=ROUTING_HEADER)
    ap.add_argument("--route", action="append", default=[], help="CLIENT_ADDR=HEADER_VALUE")
    args = ap.parse_args(argv)
    routes = dict(r.split("=", 1) for r in args.route)
    lock = threading.Lock()

    def log(msg: str) -> None:
        with lock:
            print(f"fake-milter: {msg}", file=sys.stderr, flush=True)

    def recv_exact(sock: socket.socket, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                raise EOFError
            buf += chunk
        return buf

    def send(sock: socket.socket, cmd: bytes, data: bytes = b"") -> None:
        sock.sendall(struct.pack(">I", len(data) + 1) + cmd + data)

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            sock = self.request
            client = None
            try:
                while True:
                    (length,) = struct.unpack(">I", recv_exact(sock, 4))
                    packet = recv_exact(sock, length)
                    cmd, data = packet[:1], packet[1:]
                    if cmd == b"O":
                        version, actions, proto = struct.unpack(">III", data[:12])
                        send(sock, b"O", struct.pack(">III", 6, 0x01, 0))  # SMFIF_ADDHDRS
                    elif cmd == b"D":
                        fields = data[1:].split(b"\0")
                        macros = {fields[i].decode(): fields[i + 1].decode("utf-8", "replace")
                                  for i in range(0, len(fields) - 1, 2)}
                        log(f"macros {data[:1].decode()} {macros}")
                    elif cmd == b"C":
                        host, _, rest = data.partition(b"\0")
                        family = rest[:1]
                        client = rest[3:].rstrip(b"\0").decode() if family in (b"4", b"6") else None
                        log(f"connect {host.decode()} [{client}]")
                        send(sock, b"c")
                    elif cmd == b"E":
                        value = routes.get(client or "")
                        if value:
                            send(sock, b"h", args.header.encode() + b"\0" + value.encode() + b"\0")
                            log(f"route {client} {args.header}: {value}")
                        send(sock, b"c")
                    elif cmd in (b"A", b"K"):
                        pass  # abort / quit-new-connection: no reply
                    elif cmd == b"Q":
                        return
                    else:  # H M R T L N B U
                        send(sock, b"c")
            except (EOFError, ConnectionError):
                return

    class Server(socketserver.ThreadingTCPServer):
        allow_reuse_address = True
        daemon_threads = True

    server = Server(("127.0.0.1", args.port), Handler)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, lambda *_: log("SIGHUP: reloaded"))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    log(f"listening on inet:{args.port}@127.0.0.1 routes={routes}")
    while not stop.wait(0.2):
        pass
    server.shutdown()
    log("SIGTERM: exiting")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "fake-milter":
        sys.exit(_fake_milter_main(sys.argv[2:]))
    print("usage: harness.py fake-milter --port P [--route ADDR=VALUE]...", file=sys.stderr)
    sys.exit(2)
