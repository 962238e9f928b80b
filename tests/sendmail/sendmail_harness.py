"""A real Sendmail 8.17 (Debian 12's sendmail-bin) in a podman container, in front of which the
tests of this directory put paas-milter.

The pieces, all on the loopback interface:

* the image localhost/paas-milter-test-sendmail:8.17, built from contrib/docker/Dockerfile.sendmail
  on the project's base image (contrib/scripts/container-image.sh --base-only), once per test
  run (podman's layer cache makes a rebuild a no-op);
* per test a temporary directory (harness.IntegrationTestCase.workdir()/sendmail) bind-mounted
  into the container at /srv/sendmail (not at its own path: Sendmail's file-safety checks
  refuse files below a world-writable directory such as /tmp): the .mc written here,
  sendmail.cf generated from it with the image's m4 when the container starts, the queue
  directory (read by the tests), the hosts and service-switch files, and a unix datagram
  socket mounted at the container's /dev/log, through which Sendmail's syslog lines reach
  the test (there is no syslogd in the container); the test CA's directory at /srv/ca;
* `sendmail -bD` (foreground daemon) with --network=host, listening on 127.0.0.1:<free port>,
  with paas-milter (started on the host by harness.IntegrationTestCase.start_milter) as its
  INPUT_MAIL_FILTER and smtp-sinks on the host as its next hops (SMART_HOST, and one mailer
  per extra sink for mailertable routes).

No DNS: FEATURE(`nocanonify'), a fixed confDOMAIN_NAME, a service switch with "hosts files",
the container's /etc/hosts, /etc/nsswitch.conf ("hosts: files") and /etc/resolv.conf
(nameserver 127.0.0.1, which nobody answers) replaced by the test's, IP-literal next hops,
no interface probing, no ident. Nothing under /etc/mail of the host or of the image is used.

Findings this harness relies on are in tests/sendmail/README.md.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
import unittest
from collections.abc import Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, os.path.join(REPO, "tests", "integration"))
sys.path.insert(0, os.path.join(REPO, "tests", "container"))
import harness  # noqa: E402
# podman helpers of the container suite (same CONTAINERS_CONF, --network=host, --init,
# fully qualified localhost/ names, removal whatever the container's state)
from test_container import Container, podman, podman_env, why_podman_cannot_run  # noqa: E402

IMAGE = os.environ.get("PAAS_MILTER_SENDMAIL_IMAGE", "localhost/paas-milter-test-sendmail:8.17")
BASE_IMAGE = os.environ.get("BASE_IMAGE", "localhost/debian:bookworm-slim")
CONTAINERFILE = os.path.join(REPO, "contrib", "docker", "Dockerfile.sendmail")
BASE_SCRIPT = os.path.join(REPO, "contrib", "scripts", "container-image.sh")

# $j of the Sendmail under test (its greeting, Received: headers, queue ids' host)
SENDMAIL_HOSTNAME = "sendmail.paas-test.localdomain"

# "250 2.0.0 64NFxAbc012345 Message accepted for delivery"
ACCEPTED_RE = re.compile(r"\b2\.0\.0 ([0-9A-Za-z]{8,20}) Message accepted for delivery")


def queue_id(result: harness.SwaksResult) -> str | None:
    """Sendmail's queue id from the reply to the end of DATA (Postfix's "queued as" is
    harness.SwaksResult.queue_id)."""
    m = ACCEPTED_RE.search(result.data_reply or "")
    return m.group(1) if m else None


# --------------------------------------------------------------------------------------------
# the image
# --------------------------------------------------------------------------------------------

_image_ready: str | None = None  # the build's summary, once built in this process


def build_image() -> str:
    """Builds (or, thanks to the layer cache, just confirms) the base image and the Sendmail
    image; returns a one-line summary with the time it took. Raises AssertionError when a
    build fails (a failure, not a skip)."""
    global _image_ready
    if _image_ready is not None:
        return _image_ready
    started = time.monotonic()
    proc = subprocess.run(["bash", BASE_SCRIPT, "--base-only"], env=podman_env(),
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, timeout=900)
    if proc.returncode != 0:
        raise AssertionError(f"{BASE_SCRIPT} --base-only exited {proc.returncode}:\n"
                             f"{harness._tail(proc.stdout.decode('utf-8', 'replace'), 60)}")
    base_done = time.monotonic()
    proc = subprocess.run(
        ["podman", "build", "--network=host", "--pull=never", "--format", "docker",
         "--build-arg", f"BASE_IMAGE={BASE_IMAGE}", "--file", CONTAINERFILE, "--tag", IMAGE,
         os.path.dirname(CONTAINERFILE)],
        env=podman_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, timeout=900)
    text = proc.stdout.decode("utf-8", "replace")
    if proc.returncode != 0:
        raise AssertionError(f"podman build of {IMAGE} exited {proc.returncode}:\n"
                             f"{harness._tail(text, 80)}")
    cached = text.count("Using cache")
    _image_ready = (f"{BASE_IMAGE} in {base_done - started:.1f} s, {IMAGE} in "
                    f"{time.monotonic() - base_done:.1f} s ({cached} cached step(s))")
    return _image_ready


# --------------------------------------------------------------------------------------------
# syslog through a socket mounted at the container's /dev/log
# --------------------------------------------------------------------------------------------

class SyslogSocket:
    """A unix datagram socket that collects syslog(3) lines into a file (and memory)."""

    def __init__(self, directory: str):
        self.path = os.path.join(directory, "log.sock")
        self.log_path = os.path.join(directory, "syslog.log")
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(self.path)
        os.chmod(self.path, 0o666)
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="syslog")
        self._thread.start()

    def _run(self) -> None:
        with open(self.log_path, "a", encoding="utf-8") as out:
            while not self._stop.is_set():
                try:
                    data = self._sock.recv(65536)
                except socket.timeout:
                    continue
                except OSError:
                    return
                # "<22>May  1 12:00:00 sm-mta[42]: text" -> "sm-mta[42]: text"
                text = data.decode("utf-8", "replace").rstrip("\0\n")
                text = re.sub(r"^<\d+>(\w{3} [ \d]\d \d\d:\d\d:\d\d )?", "", text)
                with self._lock:
                    self._lines.append(text)
                out.write(text + "\n")
                out.flush()

    def text(self, since: int = 0) -> str:
        with self._lock:
            return "\n".join(self._lines[since:])

    def mark(self) -> int:
        with self._lock:
            return len(self._lines)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._sock.close()


# --------------------------------------------------------------------------------------------
# Sendmail
# --------------------------------------------------------------------------------------------

# Where the test's directory and its CA are in the container
CONTAINER_DIR = "/srv/sendmail"
CONTAINER_CA_DIR = "/srv/ca"

# An esmtp mailer whose connections go to one fixed loopback port ($h is [127.0.0.1]).
_MAILER = ("M{name}, P=[IPC], F=mDFMuXa, S=EnvFromSMTP/HdrFromSMTP, R=EnvToSMTP, E=\\r\\n, "
           "L=990, T=DNS/RFC822/SMTP, A=TCP $h {port}\n")


class Sendmail:
    """`sendmail -bD` in a container (see the module doc), configured by a .mc of its own.

    milter_port:     paas-milter's port on 127.0.0.1 (INPUT_MAIL_FILTER); None: no milter
    smart_host_port: the sink everything goes to unless the mailertable says otherwise
    mailers:         {name: port}: extra esmtp mailers to 127.0.0.1:port, for MAILERTABLE
                     entries such as "route.invalid  name:[127.0.0.1]"
    mailertable:     {domain: "mailer:host"}: FEATURE(`mailertable') when not empty
    ca:              a harness.TestCA: STARTTLS with its server certificate, client
                     certificates asked and verified against "Test CA"
    milter_macros:   {stage: "macro, macro"} added to confMILTER_MACROS_<STAGE> (the milter
                     asks for its macros itself; this is for experiments)
    mc_extra:        more .mc lines, before the MAILER() lines
    """

    def __init__(self, workdir: str, *, milter_port: int | None, smart_host_port: int,
                 mailers: dict[str, int] | None = None,
                 mailertable: dict[str, str] | None = None,
                 ca: harness.TestCA | None = None,
                 milter_macros: dict[str, str] | None = None,
                 milter_timeouts: str = "C:10s;S:30s;R:60s;E:5m",
                 mc_extra: str = ""):
        self.dir = os.path.join(workdir, "sendmail")        # on the host
        self.queue_dir = os.path.join(self.dir, "mqueue")
        self.cf = f"{CONTAINER_DIR}/sendmail.cf"                # in the container
        self.port = harness.free_port()
        self.milter_port = milter_port
        self.smart_host_port = smart_host_port
        self.mailers = dict(mailers or {})
        self.mailertable = dict(mailertable or {})
        self.ca = ca
        self.milter_macros = dict(milter_macros or {})
        self.milter_timeouts = milter_timeouts
        self.mc_extra = mc_extra
        os.makedirs(self.queue_dir, exist_ok=True)
        os.chmod(self.dir, 0o755)
        os.chmod(self.queue_dir, 0o700)
        self.syslog: SyslogSocket | None = None
        self.container: Container | None = None
        self._write_files()

    def __repr__(self) -> str:
        return f"<Sendmail 127.0.0.1:{self.port} in {self.container!r}>"

    # -- configuration ---------------------------------------------------------------------------
    def ca_path(self, host_path: str) -> str:
        """Where a file of the test CA's directory is in the container."""
        assert self.ca is not None
        return f"{CONTAINER_CA_DIR}/{os.path.relpath(host_path, self.ca.dir)}"

    def mc_text(self) -> str:
        d = CONTAINER_DIR
        lines = [
            "divert(-1)dnl",
            "# written by tests/sendmail/sendmail_harness.py",
            "include(`/usr/share/sendmail/cf/m4/cf.m4')dnl",
            "divert(0)dnl",
            "VERSIONID(`paas-milter tests/sendmail')dnl",
            "OSTYPE(`linux')dnl",
            "define(`confEBINDIR', `/usr/libexec/sendmail')dnl",
            # who am I, without asking anybody
            f"define(`confDOMAIN_NAME', `{SENDMAIL_HOSTNAME}')dnl",
            "define(`confDONT_PROBE_INTERFACES', `True')dnl",
            f"define(`confSERVICE_SWITCH_FILE', `{d}/service.switch')dnl",
            f"define(`confHOSTS_FILE', `{d}/hosts')dnl",
            "define(`confBIND_OPTS', `-DNSRCH -DEFNAMES')dnl",
            "define(`confTO_IDENT', `0s')dnl",
            "define(`confTO_RESOLVER_RETRANS', `1s')dnl",
            "define(`confTO_RESOLVER_RETRY', `1')dnl",
            # files of its own, all in the test's directory
            f"define(`QUEUE_DIR', `{d}/mqueue')dnl",
            f"define(`STATUS_FILE', `{d}/sendmail.st')dnl",
            f"define(`confPID_FILE', `{d}/sendmail.pid')dnl",
            f"define(`ALIAS_FILE', `{d}/aliases')dnl",
            f"define(`confCW_FILE', `{d}/local-host-names')dnl",
            f"define(`confCT_FILE', `{d}/trusted-users')dnl",
            f"define(`confDEAD_LETTER_DROP', `{d}/dead.letter')dnl",
            f"define(`confHOST_STATUS_DIRECTORY', `{d}/hoststat')dnl",
            # a busy 2-core build machine must not make it refuse or queue mail
            "define(`confQUEUE_LA', `200')dnl",
            "define(`confREFUSE_LA', `250')dnl",
            "define(`confDELAY_LA', `0')dnl",
            "define(`confMIN_QUEUE_AGE', `0')dnl",
            "define(`confLOG_LEVEL', `14')dnl",
            "define(`confMILTER_LOG_LEVEL', `14')dnl",
            "define(`confDELIVERY_MODE', `background')dnl",
            # next hops: the sinks on the host (IP literals: no MX lookup)
            "define(`SMART_HOST', `esmtp:[127.0.0.1]')dnl",
            f"define(`ESMTP_MAILER_ARGS', `TCP $h {self.smart_host_port}')dnl",
            "FEATURE(`nocanonify')dnl",
            "FEATURE(`no_default_msa')dnl",
            # loopback clients only (127.0.0.x), who send anywhere: a test MTA
            "FEATURE(`promiscuous_relay')dnl",
            "FEATURE(`accept_unresolvable_domains')dnl",
            "FEATURE(`accept_unqualified_senders')dnl",
            f"DAEMON_OPTIONS(`Family=inet, Name=MTA-paas, Port={self.port}, Addr=127.0.0.1')dnl",
        ]
        if self.mailertable:
            lines.append(f"FEATURE(`mailertable', `hash -o {d}/mailertable')dnl")
        if self.ca:
            lines += [
                f"define(`confCACERT_PATH', `{CONTAINER_CA_DIR}')dnl",
                f"define(`confCACERT', `{self.ca_path(self.ca.ca_cert)}')dnl",
                f"define(`confSERVER_CERT', `{self.ca_path(self.ca.server_cert)}')dnl",
                f"define(`confSERVER_KEY', `{self.ca_path(self.ca.server_key)}')dnl",
                # without it Sendmail defines no {cert_fp} at all
                "define(`confCERT_FINGERPRINT_ALGORITHM', `sha256')dnl",
            ]
        if self.milter_port is not None:
            lines.append(f"INPUT_MAIL_FILTER(`paas-milter', `S=inet:{self.milter_port}@127.0.0.1, "
                         f"F=T, T={self.milter_timeouts}')dnl")
        for stage, macros in self.milter_macros.items():
            name = f"confMILTER_MACROS_{stage.upper()}"
            lines.append(f"define(`{name}', defn(`{name}')`, {macros}')dnl")
        if self.mc_extra:
            lines.append(self.mc_extra.rstrip("\n"))
        lines += ["MAILER(`local')dnl", "MAILER(`smtp')dnl"]
        if self.mailers:
            lines.append("MAILER_DEFINITIONS")
            for name, port in self.mailers.items():
                lines.append(_MAILER.format(name=name, port=port).rstrip("\n"))
        return "\n".join(lines) + "\n"

    def _write(self, name: str, text: str, mode: int = 0o644) -> str:
        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, mode)
        return path

    def _write_files(self) -> None:
        self._write("sendmail.mc", self.mc_text())
        self._write("service.switch", "hosts files\naliases files\n")
        hosts = (f"127.0.0.1\tlocalhost {SENDMAIL_HOSTNAME} sendmail\n"
                 f"::1\tlocalhost ip6-localhost\n")
        self._write("hosts", hosts)
        # the container's own resolver: files only, and a "name server" nobody answers on
        # loopback, so that nothing (sendmail, libc, openssl) can ask a real one
        self._write("etc-hosts", hosts)
        self._write("nsswitch.conf", "hosts: files\nnetworks: files\npasswd: files\n"
                                     "group: files\nshadow: files\nservices: files\n")
        self._write("resolv.conf", "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
        self._write("aliases", "postmaster: root\nMAILER-DAEMON: postmaster\n")
        self._write("local-host-names", f"{SENDMAIL_HOSTNAME}\n")
        self._write("trusted-users", "")
        os.makedirs(os.path.join(self.dir, "hoststat"), exist_ok=True)
        if self.mailertable:
            self._write("mailertable", "".join(f"{k}\t{v}\n" for k, v in self.mailertable.items()))
        if self.ca:
            # Sendmail refuses a private key others may read, and a CA directory others may
            # write to
            for path in (self.ca.server_key, self.ca.ca_key, self.ca.untrusted_ca_key):
                os.chmod(path, 0o600)

    def start_script(self) -> str:
        d = CONTAINER_DIR
        steps = [
            "set -e",
            f"cd {d}",
            "m4 sendmail.mc > sendmail.cf",
        ]
        if self.mailertable:
            steps.append("makemap hash mailertable < mailertable")
        steps += [
            ": > sendmail.st",                   # the statistics file (else "poststats" errors)
            f"/usr/sbin/sendmail -C {self.cf} -bi",   # newaliases
            "echo paas-milter-test: sendmail.cf ready",
            # -bD: the daemon in the foreground; -q1m: a queue run a minute (deferred mail)
            # (a full path: "daemon invoked without full pathname" otherwise)
            f"exec /usr/sbin/sendmail -C {self.cf} -bD -q1m",
        ]
        return "\n".join(steps)

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, timeout: float = 30) -> "Sendmail":
        self.syslog = SyslogSocket(self.dir)
        self.container = Container("sendmail")
        d = self.dir
        self.container.start(IMAGE, options=[
            "--no-hosts",
            "--volume", f"{d}:{CONTAINER_DIR}",
            "--volume", f"{self.syslog.path}:/dev/log",
            "--volume", f"{d}/etc-hosts:/etc/hosts:ro",
            "--volume", f"{d}/nsswitch.conf:/etc/nsswitch.conf:ro",
            "--volume", f"{d}/resolv.conf:/etc/resolv.conf:ro",
            *(["--volume", f"{self.ca.dir}:{CONTAINER_CA_DIR}:ro"] if self.ca else []),
        ], command=["sh", "-c", self.start_script()])
        try:
            harness.wait_listening(self.port, timeout=timeout,
                                   alive=lambda: self.container.running, what=repr(self))
        except harness.HarnessError as exc:
            raise harness.HarnessError(f"{exc}\n{self.diagnostics()}") from None
        return self

    def stop(self) -> None:
        if self.container is not None:
            self.container.stop()
        if self.syslog is not None:
            self.syslog.stop()

    @property
    def running(self) -> bool:
        return self.container is not None and self.container.running

    # -- inspection ----------------------------------------------------------------------------
    def log(self, since: int = 0) -> str:
        return self.syslog.text(since) if self.syslog else ""

    def log_mark(self) -> int:
        return self.syslog.mark() if self.syslog else 0

    def wait_for_log(self, pattern: str | re.Pattern, timeout: float = harness.DEFAULT_TIMEOUT,
                     since: int = 0) -> re.Match:
        return harness._wait_for_regex(lambda: self.log(since), pattern, timeout,
                                       lambda: self.diagnostics())

    def log_for(self, qid: str) -> list[str]:
        return [line for line in self.log().splitlines() if f"{qid}:" in line]

    def exec(self, *argv: str) -> subprocess.CompletedProcess:
        assert self.container is not None
        return self.container.exec(*argv)

    def mailq(self, quarantined: bool = False) -> str:
        """`mailq` (sendmail -bp) in the container; with QUARANTINED, `mailq -qQ` (only the
        quarantined jobs)."""
        argv = ["sendmail", "-C", self.cf, "-bp"] + (["-qQ"] if quarantined else [])
        proc = self.exec(*argv)
        return proc.out + proc.err

    def queue_files(self) -> list[str]:
        """Names in the queue directory: qf* (a queued message's control file), hf* (the
        control file of a quarantined one), df* (its body), ..."""
        try:
            return sorted(os.listdir(self.queue_dir))
        except FileNotFoundError:
            return []

    def control_file(self, qid: str) -> str:
        """The text of QID's control file (qf or hf)."""
        for prefix in ("qf", "hf", "Qf"):
            path = os.path.join(self.queue_dir, prefix + qid)
            if os.path.exists(path):
                return harness._read_text(path)
        raise AssertionError(f"no control file for {qid} in {self.queue_dir}: "
                             f"{self.queue_files()}")

    def wait_for_empty_queue(self, timeout: float = harness.DEFAULT_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while True:
            left = [n for n in self.queue_files() if n[:2] in ("qf", "hf", "df", "Qf")]
            if not left:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"queue not empty after {timeout}s: {left}\n"
                                     f"{self.diagnostics()}")
            time.sleep(0.2)

    def diagnostics(self, lines: int = 60) -> str:
        parts = [f"--- {self!r} ({'running' if self.running else 'stopped'})"]
        if self.container is not None:
            parts.append("container output:\n" + harness._tail(self.container.logs(), 20))
        parts.append("syslog tail:\n" + harness._tail(self.log(), lines))
        parts.append(f"queue directory: {self.queue_files()}")
        if self.running:
            parts.append("mailq:\n" + harness._tail(self.mailq(), 20))
        return "\n".join(parts)


# --------------------------------------------------------------------------------------------
# unittest
# --------------------------------------------------------------------------------------------

class SendmailTestCase(harness.IntegrationTestCase):
    """harness.IntegrationTestCase (root, smtp-sink, swaks, openssl; temp dir and cleanups)
    plus the Sendmail image: skipped only where podman cannot run at all."""

    @classmethod
    def setUpClass(cls) -> None:
        super().setUpClass()
        reason = why_podman_cannot_run()
        if reason:
            raise unittest.SkipTest(reason)
        if not harness.milter_binary():
            raise unittest.SkipTest("PAAS_MILTER_BIN unset or not an executable "
                                    "(run through meson test)")
        first = _image_ready is None
        summary = build_image()
        if first:
            print(f"\nsendmail image: {summary}", file=sys.stderr)

    def start_sendmail(self, *, default_sink: harness.Sink, milter_port: int | None,
                       start: bool = True, **kw) -> Sendmail:
        sm = Sendmail(self.workdir(), milter_port=milter_port,
                      smart_host_port=default_sink.port, **kw)
        self.addCleanup(self._check_sendmail_log_for_secrets, sm)  # runs after sm.stop
        self._track(sm)
        return sm.start() if start else sm

    def _check_sendmail_log_for_secrets(self, sendmail: Sendmail) -> None:
        """Sendmail logs the milter's replies: no secret of the doubles may be among them."""
        mocks = sys.modules.get("mock_common")
        for secret in getattr(mocks, "SECRETS_IN_PLAY", set()) if mocks else set():
            if secret in sendmail.log():
                self.fail("Sendmail's log shows a secret of the test doubles")

    def send(self, sendmail: Sendmail, **kw) -> harness.SwaksResult:
        kw.setdefault("helo", "client.test")
        return harness.swaks(sendmail.port, **kw)


def wait_any(sinks: Sequence[harness.Sink], count: int = 1,
             timeout: float = harness.DEFAULT_TIMEOUT) -> list[tuple[str, harness.SinkMessage]]:
    """(sink name, message) of what arrived at any of SINKS, once COUNT messages have."""
    deadline = time.monotonic() + timeout
    while True:
        found = [(s.name, m) for s in sinks for m in s.messages()]
        if len(found) >= count:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(found)} message(s) at {sinks} after {timeout}s, "
                                 f"expected {count}\n" + "\n".join(s.describe() for s in sinks))
        time.sleep(0.1)
