"""The container images (contrib/docker/), built with contrib/scripts/container-image.sh and
run with podman on the host's network (loopback addresses only):

* the milter image next to a private Postfix on the host: a message from a "printer" is
  routed to its relay (the routing header reaches the route's smtp-sink) and the
  container's log has the decision line with Postfix's queue id;
* the all-in-one image: Postfix inside the container, wired to the milter over a unix
  socket, relays to smtp-sinks on the host;
* the compose topology: a milter container and a Postfix-only container sharing the
  milter's unix socket through a volume (fixed uid/gid in both images), a secret under
  /run/secrets, the state directory;
* each: the health check reports healthy, the milter runs as paas-milter (not root), and
  `podman stop` ends the container cleanly (exit status 0);
* contrib/docker/compose.yaml parses (podman-compose) and wires the same topology.

Skipped only when podman is missing or cannot run at all; a failing image build is a
failure. Every container (and volume, and secret) is removed afterwards, also on failure.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import time
import unittest
from collections.abc import Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, os.path.join(REPO, "tests", "integration"))
import harness  # noqa: E402

IMAGE = os.environ.get("PAAS_MILTER_IMAGE", "localhost/paas-milter")
MILTER_IMAGE = f"{IMAGE}:latest"
ALL_IN_ONE_IMAGE = f"{IMAGE}:all-in-one"
BUILD_SCRIPT = os.path.join(REPO, "contrib", "scripts", "container-image.sh")


def podman_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("CONTAINERS_CONF", os.path.join(REPO, "contrib", "docker", "containers.conf"))
    return env


def podman(*args: str, check: bool = True, timeout: float = 120,
           input: bytes | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(["podman", *args], env=podman_env(), input=input,
                          stdin=None if input is not None else subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)
    proc.out = proc.stdout.decode("utf-8", "replace")  # type: ignore[attr-defined]
    proc.err = proc.stderr.decode("utf-8", "replace")  # type: ignore[attr-defined]
    if check and proc.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} exited {proc.returncode}:\n"
                             f"{proc.out}{proc.err}")
    return proc


def why_podman_cannot_run() -> str | None:
    """Why no container can run here at all, or None."""
    if not shutil.which("podman"):
        return "podman is not installed (apt-get install podman runc buildah catatonit mmdebstrap)"
    try:
        info = podman("info", check=False, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"podman cannot run: {exc}"
    if info.returncode != 0:
        return f"podman cannot run: podman info exited {info.returncode}: {info.err.strip()}"
    return None


_counter = itertools.count(1)


def unique(name: str) -> str:
    return f"paas-milter-test-{os.getpid()}-{next(_counter)}-{name}"


class Container:
    """One `podman run -d` container; stop() removes it whatever state it is in."""

    def __init__(self, name: str):
        self.name = unique(name)
        self.started = False
        self.last_logs = ""  # kept when the container is removed, for diagnostics()

    def __repr__(self) -> str:
        return f"<Container {self.name}>"

    def start(self, image: str, *, options: Sequence[str] = (),
              command: Sequence[str] = ()) -> "Container":
        # --network=host: no bridge, iptables chains or ip_forward on the machine; every
        # listener of these tests is on a loopback address. --init: catatonit as PID 1.
        # --health-interval=disable: no systemd timer (the build machines run no systemd);
        # `podman healthcheck run` still runs the image's check on demand.
        self.started = True
        podman("run", "--detach", "--name", self.name, "--network=host", "--init",
               "--health-interval=disable", *options, image, *command)
        return self

    @property
    def running(self) -> bool:
        proc = podman("inspect", "--format", "{{.State.Running}}", self.name, check=False)
        return proc.returncode == 0 and proc.out.strip() == "true"

    def logs(self) -> str:
        if not self.started:
            return self.last_logs
        proc = podman("logs", self.name, check=False)
        return proc.out + proc.err

    def wait_for_log(self, pattern: str, timeout: float = harness.DEFAULT_TIMEOUT) -> re.Match:
        rx = re.compile(pattern, re.M)
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.logs())
            if m:
                return m
            if time.monotonic() > deadline:
                raise AssertionError(f"{pattern!r} not in the log of {self!r} within {timeout}s\n"
                                     f"{self.diagnostics()}")
            time.sleep(0.2)

    def exec(self, *argv: str, check: bool = False) -> subprocess.CompletedProcess:
        return podman("exec", self.name, *argv, check=check)

    def processes(self) -> list[tuple[str, str, str]]:
        """(user in the container, user on the host, command line) of each process."""
        proc = podman("top", self.name, "user", "huser", "args")
        rows = []
        for line in proc.out.splitlines()[1:]:
            fields = line.split(None, 2)
            if len(fields) == 3:
                rows.append((fields[0], fields[1], fields[2]))
        return rows

    def health(self) -> str:
        podman("healthcheck", "run", self.name, check=False, timeout=60)
        return podman("inspect", "--format", "{{.State.Health.Status}}", self.name).out.strip()

    def stop_gracefully(self, timeout: int = 30) -> int:
        """`podman stop` (SIGTERM), then the exit status."""
        podman("stop", "--time", str(timeout), self.name, timeout=timeout + 30)
        return int(podman("inspect", "--format", "{{.State.ExitCode}}", self.name).out.strip())

    def stop(self) -> None:
        if self.started:
            self.last_logs = self.logs()
            podman("rm", "--force", "--time", "2", self.name, check=False, timeout=60)
            self.started = False

    def diagnostics(self) -> str:
        return f"--- {self!r} log tail:\n{harness._tail(self.logs(), 60)}"


class ContainerImages(harness.IntegrationTestCase):
    @classmethod
    def setUpClass(cls) -> None:
        super().setUpClass()  # root, postfix, smtp-sink, swaks
        reason = why_podman_cannot_run()
        if reason:
            raise unittest.SkipTest(reason)
        started = time.monotonic()
        proc = subprocess.run(["bash", BUILD_SCRIPT], env=podman_env(), stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=1500)
        text = proc.stdout.decode("utf-8", "replace")
        if proc.returncode != 0:
            raise AssertionError(f"{BUILD_SCRIPT} exited {proc.returncode}:\n"
                                 f"{harness._tail(text, 80)}")
        timing = [line for line in text.splitlines() if line.startswith("container-image.sh:")]
        print(f"\n{BUILD_SCRIPT} took {time.monotonic() - started:.1f} s:\n  "
              + "\n  ".join(timing), file=sys.stderr)

    def container(self, name: str) -> Container:
        return self._track(Container(name))

    def volume(self) -> str:
        name = unique("socket")
        self.addCleanup(podman, "volume", "rm", "--force", name, check=False)
        podman("volume", "create", name)
        return name

    def secret(self, data: bytes) -> str:
        name = unique("secret")
        self.addCleanup(podman, "secret", "rm", name, check=False)
        podman("secret", "create", name, "-", input=data)
        return name

    def config_dir(self, name: str, config: str, tables: dict[str, str] | None = None) -> str:
        """A directory to mount at /etc/paas-milter (read-only): the configuration and its
        tables, readable by the container's uid 990."""
        directory = os.path.join(self.workdir(), name)
        os.makedirs(os.path.join(directory, "tables"), exist_ok=True)
        for path, text in {"paas-milter.toml": config, **(tables or {})}.items():
            with open(os.path.join(directory, path), "w") as f:
                f.write(text)
        for root, dirs, files in os.walk(directory):
            os.chmod(root, 0o755)
            for f in files:
                os.chmod(os.path.join(root, f), 0o644)
        return directory

    def assert_runs_as_paas_milter(self, container: Container) -> None:
        milter = [p for p in container.processes() if "paas-milter run" in p[2]]
        self.assertEqual(len(milter), 1, container.processes())
        user, host_user, _ = milter[0]
        self.assertEqual(user, "paas-milter")
        self.assertNotIn(host_user, ("root", "0"))

    def assert_healthy(self, container: Container, spec: str) -> None:
        self.assertEqual(container.health(), "healthy", container.diagnostics())
        result = container.exec("paas-milter-entrypoint", "health")
        self.assertEqual(result.returncode, 0, result.out + result.err)
        self.assertRegex(result.out, rf"^paas-milter: OK: milter on {re.escape(spec)} answered "
                                     r"option negotiation \(version 6\) in [0-9.]+ ms$")

    def assert_stops_cleanly(self, container: Container, *patterns: str) -> None:
        self.assertEqual(container.stop_gracefully(), 0, container.diagnostics())
        logs = container.logs()
        for pattern in patterns:
            self.assertRegex(logs, pattern)

    # ------------------------------------------------------------------------------------------
    def test_milter_image_next_to_a_postfix_on_the_host(self) -> None:
        default_sink = self.start_sink("default")
        acs_sink = self.start_sink("acs")
        port = harness.free_port()
        spec = f"inet:{port}@127.0.0.1"
        config = harness.milter_config(port, """
[routes.acs-smtp]
action = "relay"
transport = "acs-relay:[smtp.azurecomm.net]:587"

[[rules]]
name = "printers"
client_addr = ["cidr:tables/devices.cidr"]
route = "acs-smtp"
""")
        directory = self.config_dir("milter-config", config, {
            "tables/devices.cidr": "127.0.0.2/32    acs-smtp\n192.0.2.0/24    acs-smtp\n"})
        milter = self.container("milter").start(
            MILTER_IMAGE, options=["--volume", f"{directory}:/etc/paas-milter:ro"])
        harness.wait_listening(port, alive=lambda: milter.running, what=repr(milter))
        milter.wait_for_log(rf"listening on {re.escape(spec)}")

        postfix = self.start_postfix(default_sink=default_sink, paas_sink=acs_sink,
                                     milter_port=port)
        routed = harness.swaks(postfix.smtpd_port, local_interface="127.0.0.2",
                               from_="printer@contoso.test", to="someone@example.net")
        self.assertEqual(routed.data_code, 250, routed.transcript)
        other = harness.swaks(postfix.smtpd_port, local_interface="127.0.0.1",
                              from_="app@contoso.test", to="other@example.net")
        self.assertEqual(other.data_code, 250, other.transcript)

        message = acs_sink.wait_for(1)[0]
        self.assertEqual(message.get_all("X-PaaS-Route"), ["acs-smtp"])
        self.assertEqual(message.rcpt_to, ["someone@example.net"])
        unrouted = default_sink.wait_for(1)[0]
        self.assertEqual(unrouted.get_all("X-PaaS-Route"), [])
        self.assertEqual(unrouted.rcpt_to, ["other@example.net"])
        milter.wait_for_log(rf"\b{routed.queue_id}: rule=printers, route=acs-smtp, action=relay\b")
        milter.wait_for_log(rf"\b{other.queue_id}: rule=\(none\)")
        postfix.wait_for_status(routed.queue_id)

        self.assert_healthy(milter, spec)
        self.assert_runs_as_paas_milter(milter)
        self.assert_stops_cleanly(milter, r"SIGTERM: shutting down", r"paas-milter info: stopped")

    def test_all_in_one_image(self) -> None:
        default_sink = self.start_sink("default")
        acs_sink = self.start_sink("acs")
        smtpd_port = harness.free_port()
        spec = "unix:/run/paas-milter/milter.sock"
        config = harness.milter_config(0, f"""
[routes.acs-smtp]
action = "relay"
transport = "smtp:[127.0.0.1]:{acs_sink.port}"

[[rules]]
name = "printers"
client_addr = ["127.0.0.2"]
route = "acs-smtp"
""", socket=spec)
        directory = self.config_dir("aio-config", config)
        aio = self.container("all-in-one").start(ALL_IN_ONE_IMAGE, options=[
            "--volume", f"{directory}:/etc/paas-milter:ro",
            "--env", f"POSTFIX_SMTPD_LISTEN=127.0.0.1:{smtpd_port}",
            "--env", "POSTFIX_inet_interfaces=127.0.0.1",
            "--env", "POSTFIX_inet_protocols=ipv4",
            "--env", f"POSTFIX_myhostname={harness.TEST_HOSTNAME}",
            "--env", f"POSTFIX_relayhost=[127.0.0.1]:{default_sink.port}",
            "--env", "POSTFIX_smtp_dns_support_level=disabled",
        ])
        harness.wait_listening(smtpd_port, alive=lambda: aio.running, what=repr(aio))
        aio.wait_for_log(r"postfix/master\[\d+\]: daemon started")
        self.assertIn(f"smtpd_milters = {spec}", aio.logs())

        routed = harness.swaks(smtpd_port, local_interface="127.0.0.2",
                               from_="printer@contoso.test", to="someone@example.net")
        self.assertEqual(routed.data_code, 250, routed.transcript)
        other = harness.swaks(smtpd_port, local_interface="127.0.0.1",
                              from_="app@contoso.test", to="other@example.net")
        self.assertEqual(other.data_code, 250, other.transcript)
        message = acs_sink.wait_for(1)[0]
        self.assertEqual(message.get_all("X-PaaS-Route"), ["acs-smtp"])
        self.assertEqual(default_sink.wait_for(1)[0].rcpt_to, ["other@example.net"])
        aio.wait_for_log(rf"\b{routed.queue_id}: rule=printers, route=acs-smtp, action=relay\b")
        aio.wait_for_log(rf"\b{routed.queue_id}: to=<someone@example.net>, "
                         rf"relay=127\.0\.0\.1\[127\.0\.0\.1\]:{acs_sink.port}, .*status=sent")

        self.assert_healthy(aio, spec)
        result = aio.exec("paas-milter-entrypoint", "healthcheck")
        self.assertEqual(result.returncode, 0, result.out + result.err)
        self.assertIn("Postfix is running", result.out)
        self.assert_runs_as_paas_milter(aio)
        users = {p[0] for p in aio.processes() if re.search(r"\bsmtpd\b", p[2])}
        self.assertEqual(users, {"postfix"})
        self.assert_stops_cleanly(aio, r"SIGTERM: stopping",
                                  r"stopping the Postfix mail system", r"paas-milter info: stopped")

    def test_compose_topology_milter_and_postfix_containers_share_a_unix_socket(self) -> None:
        default_sink = self.start_sink("default")
        acs_sink = self.start_sink("acs")
        smtpd_port = harness.free_port()
        spec = "unix:/run/paas-milter/milter.sock"
        secret = self.secret(b"endpoint=https://contoso.communication.azure.com/;"
                             b"accesskey=UkVQTEFDRS1NRS1XSVRILVRIRS1SRVNPVVJDRS1LRVk=\n")
        config = harness.milter_config(0, f"""
[routes.acs-smtp]
action = "relay"
transport = "smtp:[127.0.0.1]:{acs_sink.port}"

# an API route, so that the secret and the state directory are used (no rule sends mail
# there from these tests' clients)
[routes.acs-api]
action = "api"
connection_string_file = "/run/secrets/acs-connection-string"
sender = "DoNotReply@contoso.azurecomm.net"

[[rules]]
name = "printers"
client_addr = ["127.0.0.2"]
route = "acs-smtp"

[[rules]]
name = "erp"
client_addr = ["192.0.2.77"]
route = "acs-api"
""", socket=spec)
        directory = self.config_dir("compose-config", config)
        volume = self.volume()
        milter = self.container("milter").start(MILTER_IMAGE, options=[
            "--volume", f"{directory}:/etc/paas-milter:ro",
            "--volume", f"{volume}:/run/paas-milter",
            "--secret", f"{secret},target=acs-connection-string,uid=990,gid=991,mode=0400",
        ])
        milter.wait_for_log(rf"listening on {re.escape(spec)}")
        check = milter.exec("paas-milter-entrypoint", "check")
        self.assertEqual(check.returncode, 0, check.out + check.err)
        self.assertNotIn("secret", check.err)  # no warning about the secret file's mode
        # Postfix's milter_header_checks, as compose.yaml says: from the milter container
        # (`header-checks` reads the secrets, which only the milter container has)
        header_checks = milter.exec("paas-milter-entrypoint", "header-checks")
        self.assertEqual(header_checks.returncode, 0, header_checks.out + header_checks.err)
        self.assertIn(f"FILTER smtp:[127.0.0.1]:{acs_sink.port}", header_checks.out)
        header_checks_file = os.path.join(self.workdir(), "milter_header_checks")
        with open(header_checks_file, "w") as f:
            f.write(header_checks.out)

        postfix = self.container("postfix").start(ALL_IN_ONE_IMAGE, options=[
            "--volume", f"{volume}:/run/paas-milter",
            "--volume", f"{header_checks_file}:/etc/postfix/milter_header_checks:ro",
            "--env", f"POSTFIX_SMTPD_LISTEN=127.0.0.1:{smtpd_port}",
            "--env", "POSTFIX_inet_interfaces=127.0.0.1",
            "--env", "POSTFIX_inet_protocols=ipv4",
            "--env", f"POSTFIX_relayhost=[127.0.0.1]:{default_sink.port}",
            "--env", "POSTFIX_smtp_dns_support_level=disabled",
        ], command=["postfix"])
        harness.wait_listening(smtpd_port, alive=lambda: postfix.running, what=repr(postfix))
        routed = harness.swaks(smtpd_port, local_interface="127.0.0.2",
                               from_="printer@contoso.test", to="someone@example.net")
        self.assertEqual(routed.data_code, 250, routed.transcript)
        self.assertEqual(acs_sink.wait_for(1)[0].get_all("X-PaaS-Route"), ["acs-smtp"])
        milter.wait_for_log(rf"\b{routed.queue_id}: rule=printers, route=acs-smtp, action=relay\b")

        self.assert_healthy(milter, spec)
        self.assertEqual(postfix.health(), "healthy", postfix.diagnostics())
        # the Postfix-only container runs no milter
        self.assertFalse([p for p in postfix.processes() if "paas-milter run" in p[2]])
        self.assert_runs_as_paas_milter(milter)
        self.assert_stops_cleanly(postfix, r"stopping the Postfix mail system")
        self.assert_stops_cleanly(milter, r"paas-milter info: stopped")

    def test_compose_file(self) -> None:
        """contrib/docker/compose.yaml parses (podman-compose) and wires what the topology test
        above proves: the images built here, the socket volume at /run/paas-milter in both
        services, the configuration and the secret where the milter expects them."""
        compose = os.path.join(REPO, "contrib", "docker", "compose.yaml")
        podman_compose = shutil.which("podman-compose")
        self.assertIsNotNone(podman_compose,
                             "podman-compose is missing: run contrib/scripts/install-deps.sh")
        # `ps` parses and normalizes the file and only lists containers (no side effects,
        # unlike `--dry-run up`, which creates volumes and networks)
        proc = subprocess.run([podman_compose, "-f", compose, "ps"], env=podman_env(),
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=120)
        self.assertEqual(proc.returncode, 0, proc.stdout + proc.stderr)
        # the YAML as podman-compose reads it, with its interpreter (which has PyYAML)
        with open(podman_compose) as f:
            interpreter = f.readline()[2:].strip().split()
        proc = subprocess.run(
            [*interpreter, "-c", "import json, sys, yaml; "
             "json.dump(yaml.safe_load(open(sys.argv[1])), sys.stdout)", compose],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        services = json.loads(proc.stdout)["services"]
        self.assertEqual(set(services), {"paas-milter", "postfix"})
        milter, postfix = services["paas-milter"], services["postfix"]
        self.assertEqual(milter["image"], MILTER_IMAGE)
        self.assertEqual(postfix["image"], ALL_IN_ONE_IMAGE)
        self.assertEqual(postfix["command"], ["postfix"])
        self.assertIn("milter-socket:/run/paas-milter", milter["volumes"])
        self.assertIn("milter-socket:/run/paas-milter", postfix["volumes"])
        self.assertIn("./config:/etc/paas-milter:ro", milter["volumes"])
        self.assertIn("milter-state:/var/lib/paas-milter", milter["volumes"])
        self.assertTrue(any(v.endswith(":/etc/postfix/milter_header_checks:ro")
                            for v in postfix["volumes"]), postfix["volumes"])
        self.assertEqual([(s["target"], s["uid"]) for s in milter["secrets"]],
                         [("acs-connection-string", "990")])
        self.assertIn("health", milter["healthcheck"]["test"])
        self.assertTrue(milter["init"] and postfix["init"])


if __name__ == "__main__":
    unittest.main()
