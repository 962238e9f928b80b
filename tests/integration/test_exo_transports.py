"""The Exchange Online / ACS relay transports of contrib/postfix, loaded as shipped into a real
private Postfix, one message per route through paas-milter.

What is taken verbatim from contrib/postfix: every master.cf entry of master.cf.snippet and
exchange-online/master.cf.snippet (all -o settings: TLS level and protocols, client
certificate, HELO name, SASL options, smtp_header_checks), strip_route_header.pcre, the
routes of exchange-online/routes.toml, and the FILTER lines of milter_header_checks.pcre and
exchange-online/milter_header_checks.pcre. What the test rewrites, and nothing else:

* every FILTER nexthop (Microsoft's and ACS's hosts) becomes [localhost]:PORT of a loopback
  sink, so nothing ever leaves the machine; "localhost" matches the DNS:localhost name of the
  test server certificate, so "secure" checks the name exactly as it would the real nexthop;
* file paths: /etc/ssl/certs/ca-certificates.crt -> the test CA, the connector certificate
  and key -> a client certificate of the test CA for the snippet's smtp_helo_name,
  /etc/postfix/sasl_passwd and /etc/postfix/strip_route_header -> copies in the instance's
  config directory;
* the chroot column "y" -> "n" (the private instance runs nothing chrooted).

The downstream is TlsSmtpSink below: STARTTLS with a test-CA server certificate for
"localhost", asks for a client certificate, offers AUTH only after STARTTLS (as
smtp.office365.com does: LOGIN and XOAUTH2), and records HELO, TLS version, the client
certificate's CN, the SASL mechanism and credentials, the envelope and the message. Where
an XOAUTH2 plugin for Cyrus SASL is installed (Debian 12: libsasl2-modules-kdexoauth2),
the SASL transports are also shown to keep to LOGIN/PLAIN although XOAUTH2 is offered.
"""

from __future__ import annotations

import base64
import dataclasses
import email
import email.policy
import os
import re
import shutil
import socket
import ssl
import sys
import threading
import time
import tomllib
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CONTRIB = os.path.join(REPO, "contrib", "postfix")
EXO = os.path.join(CONTRIB, "exchange-online")

# The two routes etc/paas-milter.toml already has (exchange-online/routes.toml adds the rest).
BASE_ROUTES = """
[routes.exchange-online]
action = "relay"
transport = "exo-relay:[contoso-com.mail.protection.outlook.com]:25"

[routes.acs-smtp]
action = "relay"
transport = "acs-relay:[smtp.azurecomm.net]:587"
"""


@dataclasses.dataclass
class Route:
    name: str            # paas-milter route = header value
    transport: str       # master.cf service
    nexthop: str         # as shipped in milter_header_checks
    client: str          # loopback address the test sends from (the rule's client_addr)
    auth: tuple[str, str] | None = None   # SASL credentials the sink must see
    mechanisms: tuple[str, ...] = ()      # AUTH mechanisms the sink offers
    mechanism: str | None = None          # the one the transport must choose
    client_cert: bool = False             # must present the connector certificate


ROUTES = [
    Route("exchange-online", "exo-relay", "[contoso-com.mail.protection.outlook.com]:25",
          "127.0.0.11", client_cert=True),
    Route("exo-connector-ip", "exo-ip", "[contoso-com.mail.protection.outlook.com]:25",
          "127.0.0.12"),
    Route("exo-direct-send", "exo-direct", "[contoso-com.mail.protection.outlook.com]:25",
          "127.0.0.13"),
    Route("exo-smtp-auth", "exo-submit", "[smtp.office365.com]:587", "127.0.0.14",
          auth=("scanner@contoso.com", "mailbox:pass word"), mechanisms=("LOGIN", "XOAUTH2"),
          mechanism="LOGIN"),
    Route("exo-hve", "exo-hve", "[smtp-hve.office365.com]:587", "127.0.0.15",
          auth=("hve-scanner@contoso.com", "hve-secret"), mechanisms=("LOGIN", "XOAUTH2"),
          mechanism="LOGIN"),
    Route("acs-smtp", "acs-relay", "[smtp.azurecomm.net]:587", "127.0.0.16",
          auth=("contoso-acs|00000000-0000-0000-0000-000000000000|"
                "11111111-1111-1111-1111-111111111111", "client~secret"),
          mechanisms=("LOGIN", "PLAIN", "XOAUTH2")),
]

RULES = "".join(f"""
[[rules]]
name = "{r.transport}-devices"
client_addr = ["{r.client}"]
route = "{r.name}"
""" for r in ROUTES)


# --------------------------------------------------------------------------------------------
# a TLS-speaking SMTP downstream on loopback
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Delivery:
    helo: str | None = None            # EHLO argument after STARTTLS
    tls_version: str | None = None
    client_cert_cn: str | None = None  # verified client certificate (None: none presented)
    auth_mechanism: str | None = None
    auth_user: str | None = None
    auth_password: str | None = None
    mail_from: str | None = None
    rcpt_to: list[str] = dataclasses.field(default_factory=list)
    data: bytes = b""

    @property
    def message(self) -> email.message.Message:
        return email.message_from_bytes(self.data, policy=email.policy.default)


class TlsSmtpSink:
    """ESMTP on 127.0.0.1:PORT with STARTTLS (server certificate of the test CA, client
    certificate requested and verified against the test CA) and AUTH after STARTTLS."""

    def __init__(self, name: str, ca: harness.TestCA, mechanisms: tuple[str, ...] = ()):
        self.name = name
        self.mechanisms = mechanisms
        self.port = harness.free_port()
        self.deliveries: list[Delivery] = []
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(ca.server_cert, ca.server_key)
        ctx.load_verify_locations(ca.ca_cert)
        ctx.verify_mode = ssl.CERT_OPTIONAL
        self.ctx = ctx
        self.sock = socket.create_server(("127.0.0.1", self.port))
        self.sock.settimeout(0.2)
        self._stop = threading.Event()
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    def __repr__(self) -> str:
        return f"<TlsSmtpSink {self.name} 127.0.0.1:{self.port}>"

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            t = threading.Thread(target=self._session, args=(conn,), daemon=True)
            self._threads.append(t)
            t.start()

    def _session(self, conn: socket.socket) -> None:
        open_files: list = [conn]
        try:
            self._converse(conn, open_files)
        except Exception as exc:  # recorded for the failure report
            with self._lock:
                self.errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            for f in reversed(open_files):
                try:
                    f.close()
                except OSError:
                    pass

    def _converse(self, conn: socket.socket, open_files: list) -> None:
        conn.settimeout(30)
        rfile = conn.makefile("rb")
        open_files.append(rfile)

        def send(*lines: str) -> None:
            conn.sendall("".join(line + "\r\n" for line in lines).encode())

        def readline() -> str:
            line = rfile.readline(4096)
            if not line:
                raise EOFError("client closed the connection")
            return line.decode("utf-8", "replace").rstrip("\r\n")

        send(f"220 {self.name}.sink.test ESMTP loopback test sink")
        tls = False
        d = Delivery()
        while True:
            line = readline()
            verb = line.split(" ", 1)[0].upper()
            arg = line[len(verb):].strip()
            if verb in ("EHLO", "HELO"):
                d.helo = arg
                ext = ["SIZE 36700160", "8BITMIME"]
                ext.append("AUTH " + " ".join(self.mechanisms) if tls and self.mechanisms
                           else "STARTTLS" if not tls else "ENHANCEDSTATUSCODES")
                lines = [f"{self.name}.sink.test Hello {arg}", *ext]
                send(*[f"250-{x}" for x in lines[:-1]], f"250 {lines[-1]}")
            elif verb == "STARTTLS" and not tls:
                send("220 2.0.0 Ready to start TLS")
                conn = self.ctx.wrap_socket(conn, server_side=True)
                rfile = conn.makefile("rb")
                open_files += [conn, rfile]
                tls = True
                d = Delivery(tls_version=conn.version())
                peer = conn.getpeercert()
                if peer:
                    d.client_cert_cn = next((v for rdn in peer.get("subject", ())
                                             for k, v in rdn if k == "commonName"), None)
            elif verb == "AUTH":
                if not tls or not self.mechanisms:
                    send("503 5.5.1 AUTH not available")
                    continue
                parts = arg.split()
                mech = parts[0].upper()
                if mech not in self.mechanisms:
                    send("504 5.7.4 Unrecognized authentication type")
                    continue
                if mech == "PLAIN":
                    if len(parts) < 2:
                        send("334 ")
                        parts.append(readline())
                    _, user, password = base64.b64decode(parts[1]).split(b"\0", 2)
                elif mech == "LOGIN":
                    if len(parts) < 2:
                        send("334 VXNlcm5hbWU6")
                        parts.append(readline())
                    user = base64.b64decode(parts[1])
                    send("334 UGFzc3dvcmQ6")
                    password = base64.b64decode(readline())
                else:  # XOAUTH2: offered like Exchange Online, must never be chosen
                    send("535 5.7.3 Authentication unsuccessful")
                    d.auth_mechanism = mech
                    continue
                d.auth_mechanism, d.auth_user, d.auth_password = (
                    mech, user.decode(), password.decode())
                send("235 2.7.0 Authentication successful")
            elif verb == "MAIL":
                if not tls:
                    send("530 5.7.0 Must issue a STARTTLS command first")
                    continue
                if self.mechanisms and d.auth_user is None:
                    send("530 5.7.57 Client not authenticated")
                    continue
                m = re.match(r"FROM:\s*<([^>]*)>", arg, re.I)
                d.mail_from = m.group(1) if m else arg
                d.rcpt_to = []
                send("250 2.1.0 Sender OK")
            elif verb == "RCPT":
                m = re.match(r"TO:\s*<([^>]*)>", arg, re.I)
                d.rcpt_to.append(m.group(1) if m else arg)
                send("250 2.1.5 Recipient OK")
            elif verb == "DATA":
                send("354 Start mail input; end with <CRLF>.<CRLF>")
                body = []
                while True:
                    raw = rfile.readline(1 << 20)
                    if not raw:
                        raise EOFError("connection closed in DATA")
                    if raw in (b".\r\n", b".\n"):
                        break
                    body.append(raw[1:] if raw.startswith(b".") else raw)
                d.data = b"".join(body).replace(b"\r\n", b"\n")
                with self._lock:
                    self.deliveries.append(dataclasses.replace(d, rcpt_to=list(d.rcpt_to)))
                send(f"250 2.6.0 Queued as {self.name.upper()}{len(self.deliveries)}")
            elif verb in ("RSET", "NOOP"):
                send("250 2.0.0 OK")
            elif verb == "QUIT":
                send("221 2.0.0 Bye")
                return
            else:
                send("502 5.5.2 Command not recognized")

    def received(self) -> list[Delivery]:
        with self._lock:
            return list(self.deliveries)

    def wait_for(self, count: int, timeout: float = harness.DEFAULT_TIMEOUT) -> list[Delivery]:
        deadline = time.monotonic() + timeout
        while True:
            got = self.received()
            if len(got) >= count:
                return got
            if time.monotonic() >= deadline:
                raise AssertionError(f"{self!r}: {len(got)} message(s) after {timeout}s, "
                                     f"expected {count}\n{self.diagnostics()}")
            time.sleep(0.1)

    def stop(self) -> None:
        self._stop.set()
        try:
            self.sock.close()
        except OSError:
            pass
        self._acceptor.join(2)

    def diagnostics(self) -> str:
        lines = [f"--- {self!r}: {len(self.deliveries)} delivery(ies)"]
        for d in self.received():
            lines.append(f"  helo={d.helo} tls={d.tls_version} cert={d.client_cert_cn} "
                         f"auth={d.auth_mechanism}:{d.auth_user} from=<{d.mail_from}> "
                         f"to={d.rcpt_to}")
        lines += [f"  error: {e}" for e in self.errors]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# reading the shipped snippets
# --------------------------------------------------------------------------------------------

def master_entries(path: str) -> dict[str, list[str]]:
    """service name -> the entry's lines (first line, then its "  -o" continuation lines),
    comments dropped, in file order."""
    entries: dict[str, list[str]] = {}
    current: list[str] | None = None
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if not line.strip() or line.startswith("#"):
                current = None          # an empty or comment line ends an entry
                continue
            if line.lstrip().startswith("#"):
                continue
            if line[0] in " \t":
                assert current is not None, f"{path}: continuation without an entry: {line!r}"
                current.append(line)
            else:
                current = [line]
                entries[line.split()[0]] = current
    return entries


def filter_lines(path: str) -> list[str]:
    with open(path) as f:
        return [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]


def postfix_bin(name: str) -> str:
    return os.path.join("/usr/sbin", name)


class ExchangeOnlineTransports(harness.IntegrationTestCase):

    def setUp(self) -> None:
        if not harness.milter_binary():
            self.skipTest("PAAS_MILTER_BIN unset or not an executable")
        self.ca = self.make_ca()
        # The connector certificate: a client certificate whose CN is the snippet's HELO name.
        exo_relay = master_entries(os.path.join(CONTRIB, "master.cf.snippet"))["exo-relay"]
        self.helo_name = next(ln.split("=", 1)[1] for ln in exo_relay
                              if "smtp_helo_name=" in ln)
        self.connector_cert = self.ca.make_client_cert(self.helo_name, org="Contoso")

        self.default_sink = self.start_sink("default")
        self.sinks: dict[str, TlsSmtpSink] = {}
        for r in ROUTES:
            self.sinks[r.transport] = self._track(TlsSmtpSink(r.transport, self.ca,
                                                              r.mechanisms))

        with open(os.path.join(EXO, "routes.toml")) as f:
            self.routes_toml = f.read()
        self.milter_port = harness.free_port()
        self.milter = self.start_milter(
            self.milter_port,
            harness.milter_config(self.milter_port, BASE_ROUTES + self.routes_toml + RULES))

        self.postfix = self.start_postfix(default_sink=self.default_sink, routes={},
                                          milter_port=self.milter_port, start=False)
        self.install_snippets()

    # -- the shipped files into the private instance ------------------------------------------
    def install_snippets(self) -> None:
        pf = self.postfix
        etc = pf.config_dir
        shutil.copy(os.path.join(CONTRIB, "strip_route_header.pcre"),
                    os.path.join(etc, "strip_route_header"))
        with open(os.path.join(etc, "sasl_passwd"), "w") as f:
            for r in ROUTES:
                if r.auth:
                    f.write(f"[localhost]:{self.sinks[r.transport].port}    "
                            f"{r.auth[0]}:{r.auth[1]}\n")
        os.chmod(os.path.join(etc, "sasl_passwd"), 0o600)
        harness._run([postfix_bin("postmap"), "-c", etc, f"hash:{etc}/sasl_passwd"])

        paths = {
            "/etc/ssl/certs/ca-certificates.crt": self.ca.ca_cert,
            "/etc/postfix/tls/exo-connector.pem": self.connector_cert.cert,
            "/etc/postfix/tls/exo-connector.key": self.connector_cert.key,
            "/etc/postfix/sasl_passwd": f"{etc}/sasl_passwd",
            "/etc/postfix/strip_route_header": f"{etc}/strip_route_header",
        }

        def rewrite(line: str) -> str:
            for path in re.findall(r"/etc/[^\s,]+", line):
                self.assertIn(path, paths, f"unexpected path in a snippet: {line}")
                line = line.replace(path, paths[path])
            return line

        self.entries: dict[str, list[str]] = {}
        for path in (os.path.join(CONTRIB, "master.cf.snippet"),
                     os.path.join(EXO, "master.cf.snippet")):
            self.entries.update(master_entries(path))
        self.assertEqual(sorted(self.entries), sorted(r.transport for r in ROUTES))
        out = []
        for name, lines in self.entries.items():
            fields = lines[0].split()
            self.assertEqual(fields[1:5], ["unix", "-", "-", "y"], lines[0])
            self.assertEqual(fields[7], "smtp", lines[0])
            fields[4] = "n"
            out.append(" ".join(fields))
            out += [rewrite(ln) for ln in lines[1:]]
        with open(pf.master_cf, "a") as f:
            f.write("# --- from contrib/postfix (test_exo_transports.py rewrites paths)\n")
            f.write("\n".join(out) + "\n")

        # milter_header_checks: the shipped FILTER lines, nexthops pointed at the sinks
        shipped = (filter_lines(os.path.join(CONTRIB, "milter_header_checks.pcre"))
                   + filter_lines(os.path.join(EXO, "milter_header_checks.pcre")))
        by_transport = {r.transport: r for r in ROUTES}
        lines = []
        for line in shipped:
            m = re.fullmatch(r"(/.*/)\s+FILTER\s+([\w-]+):(\S+)", line)
            self.assertTrue(m, line)
            route = by_transport[m.group(2)]
            self.assertEqual(m.group(3), route.nexthop, line)
            lines.append(f"{m.group(1)} FILTER {route.transport}:[localhost]:"
                         f"{self.sinks[route.transport].port}")
        self.assertEqual(len(lines), len(ROUTES))
        pf.write_header_checks(lines)
        harness._backdate(pf.main_cf, pf.master_cf)

    def postconf(self, *args: str) -> str:
        proc = harness._run([harness.POSTCONF, "-c", self.postfix.config_dir, *args])
        return proc.text

    # -- tests --------------------------------------------------------------------------------
    def test_postfix_accepts_the_snippets(self) -> None:
        self.postfix.check()
        for option in ("-n", "-M", "-P"):             # no unknown or misspelt -o parameter
            self.assertNotIn("warning:", self.postconf(option), option)
        services = self.postconf("-M").splitlines()
        for r in ROUTES:
            self.assertTrue(any(s.split()[:2] == [r.transport, "unix"] and s.split()[7] == "smtp"
                                for s in services), r.transport)
        params = dict(ln.split(" = ", 1) for ln in self.postconf("-P").splitlines())
        strip = f"pcre:{self.postfix.config_dir}/strip_route_header"
        for r in ROUTES:
            p = lambda name: params.get(f"{r.transport}/unix/{name}")  # noqa: E731
            with self.subTest(transport=r.transport):
                self.assertEqual(p("smtp_header_checks"), strip)
                self.assertEqual(p("smtp_tls_security_level"), "secure")
                self.assertEqual(p("smtp_tls_mandatory_protocols"), ">=TLSv1.2")
                self.assertEqual(p("smtp_sasl_auth_enable"), "yes" if r.auth else None)
                # never XOAUTH2 (an installed XOAUTH2 plugin would be chosen, then fail)
                self.assertEqual(p("smtp_sasl_mechanism_filter"),
                                 "login,plain" if r.auth else None)
                self.assertEqual(p("smtp_tls_cert_file") is not None, r.client_cert)
                self.assertEqual(p("smtp_helo_name") is not None, r.client_cert)

    def test_shipped_tables_match_the_routes(self) -> None:
        """milter_header_checks selects each route's transport exactly as the route's
        `transport` says (as `paas-milter header-checks` would print it), and the strip
        table removes the routing header and nothing else."""
        with open(os.path.join(REPO, "etc", "paas-milter.toml"), "rb") as f:
            routes = {n: r for n, r in tomllib.load(f)["routes"].items()
                      if n in ("exchange-online", "acs-smtp")}
        routes.update(tomllib.loads(self.routes_toml)["routes"])
        self.assertEqual(sorted(routes), sorted(r.name for r in ROUTES))
        etc = self.postfix.config_dir

        def postmap(key: str, table: str) -> str:
            proc = harness._run([postfix_bin("postmap"), "-c", etc, "-q", key, f"pcre:{table}"],
                                check=False)
            return proc.text.strip()

        for r in ROUTES:
            table = os.path.join(CONTRIB if r.name in ("exchange-online", "acs-smtp") else EXO,
                                 "milter_header_checks.pcre")
            with self.subTest(route=r.name):
                self.assertEqual(routes[r.name]["action"], "relay")
                self.assertEqual(routes[r.name]["transport"], f"{r.transport}:{r.nexthop}")
                self.assertEqual(postmap(f"X-PaaS-Route: {r.name}", table),
                                 f"FILTER {r.transport}:{r.nexthop}")
        generated = harness._run([harness.milter_binary(), "header-checks", "-c",
                                  self.milter.config_path]).text
        for r in ROUTES:
            self.assertIn(f"FILTER {r.transport}:{r.nexthop}", generated)
        strip = os.path.join(CONTRIB, "strip_route_header.pcre")
        self.assertEqual(postmap("X-PaaS-Route: exo-hve", strip), "IGNORE")
        self.assertEqual(postmap("x-paas-route: acs-smtp", strip), "IGNORE")
        self.assertEqual(postmap("X-PaaS-Routed: no", strip), "")
        self.assertEqual(postmap("Subject: X-PaaS-Route: no", strip), "")

    def test_each_route_arrives_at_its_transport_without_the_routing_header(self) -> None:
        pf = self.postfix
        pf.check()
        pf.start()
        for r in ROUTES:
            with self.subTest(route=r.name):
                rcpt = f"{r.transport}-rcpt@contoso.com"
                result = harness.swaks(pf.smtpd_port, local_interface=r.client,
                                       from_="scanner@contoso.com", to=[rcpt],
                                       headers=[f"Subject: via {r.name}",
                                                "X-PaaS-Route: exo-direct-send"])  # forged
                self.assertEqual(result.data_code, 250, result.transcript)
                qid = result.queue_id
                self.milter.wait_for_log(rf"{qid}: rule={r.transport}-devices, route={r.name}, "
                                         rf"action=relay, header=X-PaaS-Route: {r.name}")
                pf.wait_for_log(rf"postfix/{r.transport}/smtp\[\d+\]: Verified TLS connection "
                                rf"established to localhost\[127\.0\.0\.1\]:"
                                rf"{self.sinks[r.transport].port}")
                pf.wait_for_log(rf"postfix/{r.transport}/smtp\[\d+\]: {qid}: to=<{rcpt}>, "
                                rf"relay=localhost\[127\.0\.0\.1\]:{self.sinks[r.transport].port}"
                                rf".*status=sent")
                got = self.sinks[r.transport].wait_for(1)
                self.assertEqual(len(got), 1, self.sinks[r.transport].diagnostics())
                d = got[0]
                self.assertEqual(d.rcpt_to, [rcpt])
                self.assertEqual(d.mail_from, "scanner@contoso.com")
                self.assertIn(qid, d.message.get_all("Received")[0])
                self.assertEqual(d.message["Subject"], f"via {r.name}")
                # stripped on the way out: neither the milter's header nor the forged one
                self.assertNotIn(b"x-paas-route", d.data.lower(), d.data.decode())
                self.assertIn(d.tls_version, ("TLSv1.2", "TLSv1.3"))
                if r.client_cert:
                    self.assertEqual(d.client_cert_cn, self.helo_name)
                    self.assertEqual(d.helo, self.helo_name)
                else:
                    self.assertIsNone(d.client_cert_cn)
                    self.assertEqual(d.helo, harness.TEST_HOSTNAME)
                if r.auth:
                    self.assertEqual((d.auth_user, d.auth_password), r.auth)
                    self.assertIn(d.auth_mechanism, ("LOGIN", "PLAIN"))
                    if r.mechanism:
                        self.assertEqual(d.auth_mechanism, r.mechanism)
                else:
                    self.assertIsNone(d.auth_mechanism)
        # each sink got exactly its own message, the default relayhost none
        for r in ROUTES:
            self.assertEqual([d.rcpt_to for d in self.sinks[r.transport].received()],
                             [[f"{r.transport}-rcpt@contoso.com"]], r.transport)
        self.default_sink.assert_stays_empty(0.5)
        self.assertEqual(pf.queue(), [])


if __name__ == "__main__":
    unittest.main(verbosity=2)
