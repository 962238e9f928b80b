"""What the loopback PaaS doubles have in common: mock_acs.MockAcs (ACS Email) and
mock_graph.MockGraph (Microsoft Graph mail) are both a `LoopbackMock`.

A LoopbackMock listens on 127.0.0.1 only, over HTTPS with a throw-away CA it generates
(clients verify against `ca_file`; never disable checks), HTTP/1.1 with keep-alive, and
records every request with the id of the TCP connection that carried it. It provides:

* the lifecycle (start/stop, a context manager), the TLS material, the connection registry;
* the Microsoft Entra ID client-credentials token endpoint
  POST /{tenant}/oauth2/v2.0/token (client secret or JWT client assertion), and the check
  of the bearer tokens it issued;
* scripted faults: fail_next()/always() with status/retry_after/delay/reset/accept/hold/stall
  (the table "Ambiguous outcomes" in mock_acs.py's module doc), applied by
  `_run_with_fault()` around a subclass's request handler;
* reading request bodies (Content-Length or chunked, with a size limit) and dropping a
  connection without an answer (FIN, or RST).

A subclass sets the class attributes below and implements `_dispatch()` (route a request),
`_new_record()`, `_send()`, `_error_reply()` and `_fault_reply()`.

Entra client assertion (JWT): header `alg` one of the class's `assertion_algs` with
`x5t` = base64url(SHA-1 of the certificate's DER) or `x5t#S256` = base64url(SHA-256 of it);
claims aud = the token URL, iss = sub = client_id, exp in the future, nbf (if any) not in
the future, jti present. RS256 (RSASSA-PKCS1-v1_5) and PS256 (RSASSA-PSS with MGF1-SHA-256
and a 32-byte salt, RFC 7518 section 3.5) are verified with `openssl dgst -sha256 -verify`
against the configured certificate's public key. Errors are AADSTS-shaped {"error",
"error_description": "AADSTSnnn: ...", "error_codes", "timestamp", "trace_id",
"correlation_id"}; the AADSTS numbers are illustrative.
"""

from __future__ import annotations

import atexit
import base64
import collections
import contextlib
import dataclasses
import datetime
import hashlib
import hmac
import http.server
import json
import os
import re
import secrets
import shutil
import socket
import socketserver
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Mapping
from typing import Any

# Every secret a double made or was given (access keys, client secrets, the tokens it issued
# and their signatures): the harness fails a test whose milter log or mail log shows one.
SECRETS_IN_PLAY: set[str] = set()


def keep_secret(value: str | None) -> None:
    if value and len(value) >= 8:
        SECRETS_IN_PLAY.add(value)

OPENSSL = shutil.which("openssl") or "/usr/bin/openssl"

CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"

_CERT_RE = re.compile(rb"-----BEGIN CERTIFICATE-----(.+?)-----END CERTIFICATE-----", re.S)

_TLS_CNF = """\
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
keyUsage = critical,digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1,DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""

# openssl dgst options that verify each JWS algorithm (all with SHA-256)
_JWS_VERIFY_OPTIONS = {
    "RS256": (),
    "PS256": ("-sigopt", "rsa_padding_mode:pss", "-sigopt", "rsa_pss_saltlen:32",
              "-sigopt", "rsa_mgf1_md:sha256"),
}


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    if not re.fullmatch(r"[A-Za-z0-9_-]*", text):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def utcnow_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def run_openssl(*args: str, input: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([OPENSSL, *args], input=input, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, timeout=60)


# --------------------------------------------------------------------------------------------
# records
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Fault:
    """A scripted answer (the table "Ambiguous outcomes" in mock_acs.py's module doc). status:
    answer with this error; delay: sleep first (then the fault, or normal processing when
    there is neither status nor reset); reset: close the TCP connection (RST) without
    answering; accept: process the request normally first (so the message IS accepted) and
    only then apply status/reset - the "accepted but the client never heard" case; hold:
    after processing, wait this long before answering; stall: after processing, send nothing
    for this long and then close the connection without answering (hold/stall imply accept)."""
    status: int | None = None
    code: str | None = None
    message: str | None = None
    retry_after: float | None = None
    delay: float = 0.0
    reset: bool = False
    accept: bool = False
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    hold: float = 0.0
    stall: float = 0.0


@dataclasses.dataclass
class TokenRequest:
    tenant: str
    form: dict[str, str]
    kind: str | None            # "secret" | "assertion" | None
    status: int
    error: str | None           # e.g. "invalid_client AADSTS7000215"
    access_token: str | None
    connection_id: int
    time: float


class ApiError(Exception):
    """Raised by a request handler: answered as `_error_reply(status, code, message, target)`."""

    def __init__(self, status: int, code: str, message: str, target: str | None = None):
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message, self.target = status, code, message, target


class Reply:
    """An answer to send: status, a JSON-able body (None: no body) and extra headers."""

    def __init__(self, status: int, obj: Any = None, headers: Mapping[str, str] | None = None,
                 error_code: str | None = None):
        self.status, self.obj, self.error_code = status, obj, error_code
        self.headers = dict(headers or {})


# --------------------------------------------------------------------------------------------
# HTTP plumbing
# --------------------------------------------------------------------------------------------

class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, mock: "LoopbackMock", address: tuple[str, int]):
        self.mock = mock
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)  # no getfqdn() reverse lookup
        self.server_name, self.server_port = self.server_address[:2]

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        self.mock._log(f"connection {client_address}: {type(exc).__name__}: {exc}")


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    sys_version = ""
    server: _Server

    def setup(self) -> None:
        mock = self.server.mock
        raw = self.request
        # An answer's head and body are written separately: without this, a kept-alive
        # connection stalls ~40 ms per request on Nagle against the client's delayed ACK
        # (a real service answers in one write).
        with contextlib.suppress(OSError):
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        raw.settimeout(mock.handshake_timeout)
        try:
            self.request = mock._tls_context.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            mock._note_tls_failure(self.client_address, exc)
            try:
                raw.close()
            except OSError:
                pass
            raise
        self.timeout = mock.idle_timeout
        self.conn_id = mock._register_connection(self.request)
        super().setup()

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass
        self.server.mock._unregister_connection(getattr(self, "conn_id", None))
        try:
            self.request.close()
        except OSError:
            pass

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
        self.server.mock._log(f"{self.client_address[0]}:{self.client_address[1]} "
                              + (format % args), echo=False)

    def handle_expect_100(self) -> bool:
        words = self.requestline.split()
        if len(words) == 3:
            self.path = words[1]
        if self.server.mock._reject_early(self):
            return False
        return super().handle_expect_100()

    def version_string(self) -> str:
        return self.server.mock.server_header

    def parse_request(self) -> bool:
        ok = super().parse_request()
        # http.server folds a leading "//" into "/" (open-redirect guard): keep the
        # request-target exactly as sent, it is what the client signed and what routes.
        words = self.requestline.split()
        if ok and len(words) == 3:
            self.path = words[1]
        return ok

    def _dispatch(self) -> None:
        self.server.mock._dispatch(self)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _dispatch


# --------------------------------------------------------------------------------------------
# the common base
# --------------------------------------------------------------------------------------------

_LIVE: set["LoopbackMock"] = set()


@atexit.register
def _stop_leftovers() -> None:
    for mock in list(_LIVE):
        try:
            mock.stop()
        except Exception:  # pragma: no cover - best effort at exit
            pass


class LoopbackMock:
    """HTTPS server on 127.0.0.1 + Entra token endpoint + scripted faults (see module doc).

    Subclasses set:"""
    name = "mock"                          # log prefix, temp dir, thread and CA names
    token_scope = ""                       # the only scope the token endpoint accepts
    token_audience = ""                    # "aud" of the access tokens it issues
    assertion_algs: tuple[str, ...] = ("RS256",)   # JWS algorithms of client assertions
    fault_endpoints: tuple[str, ...] = ()  # routes fail_next()/always() may name
    default_fault_endpoint = ""

    def __init__(self, *, port: int = 0,
                 state_dir: str | None = None,
                 max_clock_skew: float = 300.0,
                 tenant_id: str | None = None,
                 client_id: str | None = None,
                 client_secret: str | None = None,
                 client_certificate: str | None = None,
                 token_lifetime: int = 3600,
                 idle_timeout: float = 120.0,
                 handshake_timeout: float = 10.0,
                 keep: bool | None = None,
                 echo_log: bool = False):
        self.requested_port = port
        self.state_dir = os.path.abspath(state_dir) if state_dir else None
        self.max_clock_skew = max_clock_skew
        self.tenant_id = tenant_id or str(uuid.uuid4())
        self.client_id = client_id or str(uuid.uuid4())
        self.client_secret = client_secret if client_secret is not None else \
            "mock~" + secrets.token_urlsafe(30)
        keep_secret(self.client_secret)
        self.token_lifetime = token_lifetime
        self.idle_timeout = idle_timeout
        self.handshake_timeout = handshake_timeout
        self.keep = bool(os.environ.get("PAAS_IT_KEEP")) if keep is None else keep
        self.echo_log = echo_log

        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._stopping = threading.Event()
        self._requests: list[Any] = []
        self._tokens: dict[str, dict[str, Any]] = {}
        self._token_requests: list[TokenRequest] = []
        self._tls_failures: list[str] = []
        self._faults: dict[str, collections.deque[Fault]] = collections.defaultdict(
            collections.deque)
        self._permanent: dict[str, Fault] = {}
        self._connections: dict[int, socket.socket] = {}
        self._next_conn = 0
        self._log_lines: collections.deque[str] = collections.deque(maxlen=500)
        self._token_signing_key = secrets.token_bytes(32)

        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._dir: str | None = None
        self._own_dir = False
        self.port = 0
        self.ca_file = ""
        self._cert_x5t: str | None = None
        self._cert_x5t_s256: str | None = None
        self._pubkey_file: str | None = None
        self.client_certificate: str | None = None
        self._pending_client_cert = client_certificate

    # ---- lifecycle --------------------------------------------------------------------------

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.endpoint if self.port else 'stopped'}>"

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def server_header(self) -> str:
        return f"{self.name}/1.0"

    def start(self):
        if self._server is not None:
            return self
        if self.state_dir:
            os.makedirs(self.state_dir, exist_ok=True)
            self._dir = self.state_dir
        else:
            self._dir = tempfile.mkdtemp(prefix=f"{self.name}-")
            self._own_dir = True
        try:
            self._make_tls()
            if self._pending_client_cert:
                self.set_client_certificate(self._pending_client_cert)
            self._stopping.clear()
            self._server = _Server(self, ("127.0.0.1", self.requested_port))
            self.port = self._server.server_address[1]
            self._thread = threading.Thread(target=self._server.serve_forever,
                                            kwargs={"poll_interval": 0.1},
                                            name=f"{self.name}-{self.port}", daemon=True)
            self._thread.start()
        except BaseException:
            self.stop()
            raise
        _LIVE.add(self)
        if self.state_dir:
            self._write_state()
        if self.keep and self._own_dir:
            print(f"{self.name}: keeping {self._dir}", file=sys.stderr)
        return self

    def stop(self) -> None:
        _LIVE.discard(self)
        self._stopping.set()
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        with self._lock:
            conns = list(self._connections.values())
        for sock in conns:
            try:
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        if self._dir and self._own_dir and not self.keep:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def _write_state(self) -> None:
        """With a state_dir: write what a process using the mock needs (subclasses)."""

    # ---- addresses --------------------------------------------------------------------------

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def endpoint(self) -> str:
        """"https://127.0.0.1:PORT" (no trailing slash)."""
        return f"https://{self.host}"

    @property
    def authority(self) -> str:
        """What EntraCredentials.authority should be (instead of login.microsoftonline.com)."""
        return self.endpoint

    @property
    def token_url(self) -> str:
        return f"{self.endpoint}/{self.tenant_id}/oauth2/v2.0/token"

    @property
    def directory(self) -> str | None:
        return self._dir

    # ---- TLS ----------------------------------------------------------------------------------

    def _make_tls(self) -> None:
        tls = os.path.join(self._dir, "tls")
        os.makedirs(tls, exist_ok=True)
        cnf = os.path.join(tls, "openssl.cnf")
        with open(cnf, "w") as f:
            f.write(_TLS_CNF)
        ca_cert, ca_key = os.path.join(tls, "ca.pem"), os.path.join(tls, "ca.key")
        srv_cert, srv_key = os.path.join(tls, "server.pem"), os.path.join(tls, "server.key")
        srv_csr = os.path.join(tls, "server.csr")
        steps = [
            ("req", "-x509", "-config", cnf, "-extensions", "v3_ca", "-newkey", "ec",
             "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", ca_key,
             "-out", ca_cert, "-days", "30",
             "-subj", f"/O=paas-milter tests/CN={self.name} test CA"),
            ("req", "-new", "-config", cnf, "-newkey", "ec", "-pkeyopt",
             "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", srv_key, "-out", srv_csr,
             "-subj", "/CN=127.0.0.1"),
            ("x509", "-req", "-in", srv_csr, "-CA", ca_cert, "-CAkey", ca_key,
             "-set_serial", "0x" + secrets.token_hex(8), "-days", "30", "-extfile", cnf,
             "-extensions", "v3_server", "-out", srv_cert),
        ]
        for args in steps:
            proc = run_openssl(*args)
            if proc.returncode != 0:
                raise RuntimeError(f"openssl {args[0]} failed:\n{proc.stdout.decode(errors='replace')}")
        os.chmod(ca_key, 0o600)
        os.chmod(srv_key, 0o600)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(srv_cert, srv_key)
        ctx.set_alpn_protocols(["http/1.1"])
        self._tls_context = ctx
        self.ca_file = ca_cert

    def set_client_certificate(self, pem_path: str | None) -> None:
        """The certificate whose key signs client assertions (the PEM may also hold the key)."""
        if pem_path is None:
            self.client_certificate = self._cert_x5t = self._cert_x5t_s256 = None
            return
        with open(pem_path, "rb") as f:
            m = _CERT_RE.search(f.read())
        if not m:
            raise ValueError(f"{pem_path}: no PEM certificate")
        der = base64.b64decode(b"".join(m.group(1).split()))
        pub = os.path.join(self._dir or tempfile.gettempdir(),
                           f"client-cert-{secrets.token_hex(4)}.pub.pem")
        proc = run_openssl("x509", "-inform", "DER", "-pubkey", "-noout", input=der)
        if proc.returncode != 0:
            raise ValueError(f"{pem_path}: {proc.stdout.decode(errors='replace')}")
        with open(pub, "wb") as f:
            f.write(proc.stdout)
        with self._lock:
            self.client_certificate = pem_path
            self._pubkey_file = pub
            self._cert_x5t = b64url(hashlib.sha1(der).digest())
            self._cert_x5t_s256 = b64url(hashlib.sha256(der).digest())

    # ---- fault injection --------------------------------------------------------------------

    def fail_next(self, status: int | None = None, *, code: str | None = None,
                  message: str | None = None, retry_after: float | None = None,
                  delay: float = 0.0, reset: bool = False, accept: bool = False,
                  headers: Mapping[str, str] | None = None, hold: float = 0.0,
                  stall: float = 0.0, count: int = 1, endpoint: str | None = None) -> None:
        """Script the answer to the next COUNT executed requests to ENDPOINT (one of the
        class's `fault_endpoints`; default `default_fault_endpoint`); see "Ambiguous
        outcomes" in mock_acs.py's module doc. Examples: fail_next(429, retry_after=2);
        fail_next(429) (no Retry-After); fail_next(503); fail_next(delay=5);
        fail_next(reset=True); fail_next(reset=True, accept=True) (accepted, then RST);
        fail_next(504, accept=True) (accepted, then 504); fail_next(hold=2) (accepted, in
        progress for 2 s, then the answer); fail_next(stall=30) (accepted, then silence
        until the client gives up)."""
        fault = self._make_fault(status, code=code, message=message, retry_after=retry_after,
                                 delay=delay, reset=reset, accept=accept, headers=headers,
                                 hold=hold, stall=stall, endpoint=endpoint)
        with self._lock:
            for _ in range(count):
                self._faults[endpoint or self.default_fault_endpoint].append(
                    dataclasses.replace(fault))

    def always(self, status: int | None = None, *, code: str | None = None,
               message: str | None = None, retry_after: float | None = None,
               delay: float = 0.0, reset: bool = False, accept: bool = False,
               headers: Mapping[str, str] | None = None, hold: float = 0.0,
               stall: float = 0.0, endpoint: str | None = None) -> None:
        """A permanent fault for an endpoint (after the queued ones), until clear_faults().
        Same keywords as fail_next() (no count); e.g. always(hold=0.5) delays every answer."""
        fault = self._make_fault(status, code=code, message=message, retry_after=retry_after,
                                 delay=delay, reset=reset, accept=accept, headers=headers,
                                 hold=hold, stall=stall, endpoint=endpoint)
        with self._lock:
            self._permanent[endpoint or self.default_fault_endpoint] = fault

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()
            self._permanent.clear()

    def pending_faults(self, endpoint: str | None = None) -> int:
        with self._lock:
            return len(self._faults[endpoint or self.default_fault_endpoint])

    @classmethod
    def _make_fault(cls, status: int | None, code: str | None = None, message: str | None = None,
                    retry_after: float | None = None, delay: float = 0.0, reset: bool = False,
                    accept: bool = False, headers: Mapping[str, str] | None = None,
                    endpoint: str | None = None, *, hold: float = 0.0,
                    stall: float = 0.0) -> Fault:
        # (the positional order is kept as it was: tests/integration/soak_api.py calls it so)
        endpoint = endpoint or cls.default_fault_endpoint
        if endpoint not in cls.fault_endpoints:
            raise ValueError(f"unknown endpoint {endpoint!r}")
        if status is None and not delay and not reset and not hold and not stall:
            raise ValueError("a fault needs status, delay, reset, hold or stall")
        if status is not None and not 100 <= status <= 599:
            raise ValueError(f"bad status {status}")
        if min(delay, hold, stall) < 0:
            raise ValueError("delay, hold and stall must not be negative")
        if stall and (status is not None or reset):
            raise ValueError("stall sends no answer: it cannot have a status or reset")
        return Fault(status=status, code=code, message=message, retry_after=retry_after,
                     delay=float(delay), reset=reset, accept=accept or bool(hold or stall),
                     headers=dict(headers or {}), hold=float(hold), stall=float(stall))

    def _take_fault(self, endpoint: str) -> Fault | None:
        with self._lock:
            q = self._faults.get(endpoint)
            if q:
                return q.popleft()
            return self._permanent.get(endpoint)

    def _run_with_fault(self, h: _Handler, rec: Any, route: str, process: Callable[[], Reply],
                        remember: Callable[[Reply], None] | None = None) -> None:
        """Answer a request: the scripted fault for ROUTE if there is one (see Fault), around
        PROCESS (the route's handler; an ApiError it raises becomes an error reply).
        REMEMBER gets the service's final answer before it is written (or dropped), so
        state that depends on it is in place before the client can see it."""
        remember = remember or (lambda reply: None)
        fault = self._take_fault(route)
        rec.fault = fault
        if fault is not None:
            if fault.delay and self._stopping.wait(fault.delay):
                self._drop(h, rec)
                return
            if not fault.accept and fault.reset:
                self._drop(h, rec, reset=True)
                return
            if not fault.accept and fault.status is not None:
                reply = self._fault_reply(route, fault)
                remember(reply)
                self._send(h, rec, reply)
                return

        try:
            reply = process()
        except ApiError as err:
            reply = self._error_reply(err.status, err.code, err.message, err.target)

        if fault is not None and fault.accept:
            wait = fault.stall or fault.hold
            if wait and self._stopping.wait(wait):
                remember(reply)
                self._drop(h, rec)
                return
            if fault.stall:
                # processed, then silence: the connection closes without an answer
                remember(reply)
                self._drop(h, rec)
                return
            if fault.reset:
                # the service's answer is what it remembers; the transport lost it
                remember(reply)
                self._drop(h, rec, reset=True)
                return
            if fault.status is not None:
                reply = self._fault_reply(route, fault)
        remember(reply)
        self._send(h, rec, reply)

    # ---- inspection ---------------------------------------------------------------------------

    def expire_tokens(self) -> None:
        """Make every bearer token issued so far expired."""
        with self._lock:
            for t in self._tokens.values():
                t["expires_at"] = time.time() - 1

    def token_requests(self) -> list[TokenRequest]:
        with self._lock:
            return list(self._token_requests)

    def tls_failures(self) -> list[str]:
        with self._lock:
            return list(self._tls_failures)

    def reset(self) -> None:
        """Forget requests, tokens, TLS failures and faults (not the configuration)."""
        with self._lock:
            self._requests.clear()
            self._tokens.clear()
            self._token_requests.clear()
            self._tls_failures.clear()
            self._faults.clear()
            self._permanent.clear()

    def _wait_for_done(self, n: int, route: str | None, timeout: float) -> list[Any]:
        """The first N completed requests to ROUTE (answered, reset or dropped)."""
        def done() -> list[Any]:
            return [r for r in self._requests
                    if (route is None or r.route == route) and getattr(r, "_done", False)]
        with self._cond:
            if not self._cond.wait_for(lambda: len(done()) >= n, timeout):
                raise AssertionError(f"{len(done())} of {n} {route} requests within {timeout}s\n"
                                     f"{self.diagnostics()}")
            return done()[:n]

    def diagnostics(self, last: int = 30) -> str:  # pragma: no cover - subclasses override
        return repr(self)

    # ---- internals: connections / logging ------------------------------------------------------

    def _log(self, line: str, echo: bool = True) -> None:
        self._log_lines.append(line)
        if self.echo_log and echo:
            print(f"{self.name}: {line}", file=sys.stderr, flush=True)

    def _note_tls_failure(self, client_address: Any, exc: BaseException) -> None:
        with self._lock:
            self._tls_failures.append(f"{client_address}: {type(exc).__name__}: {exc}")
        self._log(f"TLS handshake with {client_address} failed: {exc}")

    def _register_connection(self, sock: socket.socket) -> int:
        with self._lock:
            self._next_conn += 1
            self._connections[self._next_conn] = sock
            return self._next_conn

    def _unregister_connection(self, conn_id: int | None) -> None:
        with self._lock:
            self._connections.pop(conn_id, None)

    # ---- internals: request handling -------------------------------------------------------------

    def _dispatch(self, h: _Handler) -> None:
        raise NotImplementedError

    def _reject_early(self, h: _Handler) -> bool:
        """On `Expect: 100-continue`: True after answering (e.g. 413) instead of 100."""
        return False

    def _finish_record(self, rec: Any) -> None:
        with self._cond:
            rec._done = True
            self._cond.notify_all()
        self._log(rec.summary())

    def _read_body(self, h: _Handler, limit: int) -> tuple[bytes | None, int | None]:
        """(body, None), or (None, status) for 400/411/413 (then maybe close)."""
        te = h.headers.get("Transfer-Encoding", "").lower()
        if te:
            if te != "chunked":
                h.close_connection = True
                return None, 400
            chunks, total, too_big = [], 0, False
            while True:
                line = h.rfile.readline(1026)
                try:
                    size = int(line.split(b";")[0].strip(), 16)
                except ValueError:
                    h.close_connection = True
                    return None, 400
                if size == 0:
                    while h.rfile.readline(8192) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                total += size
                if total > limit:
                    too_big = True
                if total > 4 * limit + (1 << 20):
                    h.close_connection = True
                    return None, 413
                data = h.rfile.read(size)
                h.rfile.readline(8)
                if not too_big:
                    chunks.append(data)
            return (None, 413) if too_big else (b"".join(chunks), None)
        cl = h.headers.get("Content-Length")
        if cl is None:
            if h.command in ("POST", "PUT", "PATCH"):
                h.close_connection = True
                return None, 411
            return b"", None
        if not cl.strip().isdigit():
            h.close_connection = True
            return None, 400
        n = int(cl)
        if n > limit:
            if n > 4 * limit + (1 << 20):
                h.close_connection = True
            else:
                left = n
                while left > 0:
                    got = h.rfile.read(min(left, 1 << 16))
                    if not got:
                        break
                    left -= len(got)
            return None, 413
        body = h.rfile.read(n)
        if len(body) != n:
            h.close_connection = True
            return None, 400
        return body, None

    def _drop(self, h: _Handler, rec: Any, reset: bool = False) -> None:
        """Close the connection without answering (with a TCP RST when RESET)."""
        h.close_connection = True
        sock = h.connection
        try:
            if reset:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            else:
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            sock.close()
        except OSError:
            pass
        rec.status = None
        self._finish_record(rec)

    def _write_response(self, h: _Handler, rec: Any, status: int, headers: Mapping[str, str],
                        payload: bytes, close: bool = False) -> None:
        """Write one HTTP response (Content-Length added) and complete REC."""
        headers = dict(headers)
        if close or h.close_connection:
            headers["Connection"] = "close"
            h.close_connection = True
        rec.status = status
        try:
            h.send_response(status)
            for k, v in headers.items():
                h.send_header(k, v)
            h.send_header("Content-Length", str(len(payload)))
            h.end_headers()
            if h.command != "HEAD":
                h.wfile.write(payload)
            h.wfile.flush()
        except OSError as exc:
            h.close_connection = True
            self._log(f"#{rec.seq}: could not answer: {exc}")
        finally:
            self._finish_record(rec)

    def _send(self, h: _Handler, rec: Any, reply: Reply, close: bool = False) -> None:
        raise NotImplementedError

    def _error_reply(self, status: int, code: str, message: str,
                     target: str | None = None) -> Reply:
        raise NotImplementedError

    def _fault_reply(self, route: str, fault: Fault) -> Reply:
        raise NotImplementedError

    # ---- bearer tokens --------------------------------------------------------------------------

    def _bearer_error(self, token: str) -> str | None:
        """None for a valid token this mock issued, else why not."""
        with self._lock:
            info = self._tokens.get(token)
        if info is None:
            return "bearer token not issued by this mock"
        if time.time() >= info["expires_at"]:
            return "bearer token expired"
        return None

    def _token_info(self, token: str) -> dict[str, Any] | None:
        with self._lock:
            info = self._tokens.get(token)
            return dict(info) if info is not None else None

    def _extra_token_claims(self) -> dict[str, Any]:
        """Claims a subclass adds to the access tokens it issues (e.g. Graph's "roles")."""
        return {}

    # ---- POST /{tenant}/oauth2/v2.0/token ------------------------------------------------------------

    def _entra_error(self, status: int, error: str, code: int, description: str) -> Reply:
        trace, corr, ts = str(uuid.uuid4()), str(uuid.uuid4()), utcnow_iso()
        return Reply(status, {
            "error": error,
            "error_description": f"AADSTS{code}: {description} Trace ID: {trace} "
                                 f"Correlation ID: {corr} Timestamp: {ts}",
            "error_codes": [code], "timestamp": ts, "trace_id": trace, "correlation_id": corr,
            "error_uri": f"{self.endpoint}/error?code={code}"}, error_code=f"{error} AADSTS{code}")

    def _handle_token(self, h: _Handler, rec: Any, tenant: str, body: bytes) -> Reply:
        form: dict[str, str] = {}
        kind: str | None = None
        reply: Reply | None = None
        ctype = h.headers.get("Content-Type", "").split(";")[0].strip().lower()
        try:
            parsed = urllib.parse.parse_qs(body.decode("utf-8"), keep_blank_values=True,
                                           strict_parsing=bool(body))
        except (UnicodeDecodeError, ValueError):
            parsed = None
        if ctype != "application/x-www-form-urlencoded" or parsed is None:
            reply = self._entra_error(400, "invalid_request", 900144,
                                      "The request body must contain the following parameter: "
                                      "'grant_type'.")
        else:
            form = {k: v[-1] for k, v in parsed.items()}
            dup = [k for k, v in parsed.items() if len(v) > 1]
            kind = ("secret" if "client_secret" in form else
                    "assertion" if "client_assertion" in form else None)
            rec.auth = kind or "none"
            if dup:
                reply = self._entra_error(400, "invalid_request", 90015,
                                          f"Requested query string is too long or has "
                                          f"duplicated parameters: {dup[0]}.")
            else:
                reply = self._token_checks(h, tenant, form, kind)
        rec.auth_ok = reply.status == 200
        if reply.status != 200:
            rec.auth_error = reply.error_code
        with self._lock:
            self._token_requests.append(TokenRequest(
                tenant=tenant, form=form, kind=kind, status=reply.status,
                error=reply.error_code if reply.status != 200 else None,
                access_token=(reply.obj or {}).get("access_token") if reply.status == 200 else None,
                connection_id=rec.connection_id, time=rec.time))
        return reply

    def _token_checks(self, h: _Handler, tenant: str, form: dict[str, str],
                      kind: str | None) -> Reply:
        if tenant != self.tenant_id:
            return self._entra_error(400, "invalid_request", 90002,
                                     f"Tenant '{tenant}' not found.")
        for p in ("grant_type", "client_id", "scope"):
            if not form.get(p):
                return self._entra_error(400, "invalid_request", 900144,
                                         f"The request body must contain the following "
                                         f"parameter: '{p}'.")
        if form["grant_type"] != "client_credentials":
            return self._entra_error(400, "unsupported_grant_type", 70003,
                                     f"The app requested an unsupported grant type "
                                     f"'{form['grant_type']}'.")
        if form["client_id"] != self.client_id:
            return self._entra_error(400, "unauthorized_client", 700016,
                                     f"Application with identifier '{form['client_id']}' was "
                                     f"not found in the directory '{tenant}'.")
        if form["scope"] != self.token_scope:
            return self._entra_error(400, "invalid_scope", 70011,
                                     f"The provided request must include a 'scope' input "
                                     f"parameter. The provided value for the input parameter "
                                     f"'scope' is not valid: '{form['scope']}' (expected "
                                     f"'{self.token_scope}').")
        if "client_secret" in form and "client_assertion" in form:
            return self._entra_error(400, "invalid_request", 700025,
                                     "Only one client credential type may be presented.")
        if kind == "secret":
            if not self.client_secret or not hmac.compare_digest(
                    form["client_secret"].encode(), self.client_secret.encode()):
                return self._entra_error(401, "invalid_client", 7000215,
                                         "Invalid client secret provided. Ensure the secret "
                                         "being sent in the request is the client secret "
                                         "value, not the client secret ID, for a secret added "
                                         f"to app '{self.client_id}'.")
        elif kind == "assertion":
            if form.get("client_assertion_type") != CLIENT_ASSERTION_TYPE:
                return self._entra_error(400, "invalid_request", 700023,
                                         f"client_assertion_type must be "
                                         f"'{CLIENT_ASSERTION_TYPE}'.")
            error = self._verify_assertion(form["client_assertion"], tenant, h.headers.get("Host", ""))
            if error:
                return self._entra_error(401, "invalid_client", error[0], error[1])
        else:
            return self._entra_error(401, "invalid_client", 7000218,
                                     "The request body must contain the following parameter: "
                                     "'client_assertion' or 'client_secret'.")
        now = int(time.time())
        lifetime = int(self.token_lifetime)
        claims = {"aud": self.token_audience, "iss": f"https://sts.windows.net/{tenant}/",
                  "iat": now, "nbf": now, "exp": now + lifetime, "appid": self.client_id,
                  "tid": tenant, "oid": str(uuid.uuid5(uuid.NAMESPACE_URL, self.client_id)),
                  "uti": secrets.token_urlsafe(16)}
        extra = self._extra_token_claims()
        claims.update(extra)
        signing_input = b64url(json.dumps({"typ": "JWT", "alg": "HS256"}).encode()) + "." + \
            b64url(json.dumps(claims).encode())
        sig = hmac.new(self._token_signing_key, signing_input.encode(), hashlib.sha256).digest()
        token = signing_input + "." + b64url(sig)
        keep_secret(token)
        keep_secret(b64url(sig))
        with self._lock:
            self._tokens[token] = {"expires_at": time.time() + lifetime, "kind": kind, **extra}
        return Reply(200, {"token_type": "Bearer", "expires_in": lifetime,
                           "ext_expires_in": lifetime, "access_token": token})

    def _verify_assertion(self, assertion: str, tenant: str, host: str) -> tuple[int, str] | None:
        parts = assertion.split(".")
        if len(parts) != 3:
            return 50027, "Invalid JWT token. The token is malformed."
        try:
            header = json.loads(b64url_decode(parts[0]))
            claims = json.loads(b64url_decode(parts[1]))
            signature = b64url_decode(parts[2])
        except (ValueError, UnicodeDecodeError):
            return 50027, "Invalid JWT token. The token is not valid base64url JSON."
        if not isinstance(header, dict) or not isinstance(claims, dict):
            return 50027, "Invalid JWT token. Header and claims must be JSON objects."
        alg = header.get("alg")
        if alg not in self.assertion_algs:
            return 5002738, (f"Invalid JWT token. Unsupported alg {alg!r} "
                             f"(need {' or '.join(self.assertion_algs)}).")
        with self._lock:
            x5t, x5t_s256, pub = self._cert_x5t, self._cert_x5t_s256, self._pubkey_file
        if x5t is None or pub is None:
            return 700027, "Client assertion contains an invalid signature: no certificate is " \
                           "registered for this application."
        if not (header.get("x5t") == x5t or header.get("x5t#S256") == x5t_s256):
            return 700027, (f"The certificate with identifier used to sign the client assertion "
                            f"is not registered on application. [Reason - The key was not found., "
                            f"Thumbprint of key used by client: '{header.get('x5t')}']")
        if not self._signature_ok(alg, (parts[0] + "." + parts[1]).encode(), signature, pub):
            return 700027, "Client assertion failed signature validation."
        allowed_aud = {f"https://{host_}/{tenant}/oauth2/v2.0/token"
                       for host_ in (f"127.0.0.1:{self.port}", f"localhost:{self.port}")}
        if claims.get("aud") not in allowed_aud:
            return 700212, (f"No matching federated identity record found for presented "
                            f"assertion audience '{claims.get('aud')}'. Expected "
                            f"'{self.token_url}'.")
        if claims.get("iss") != self.client_id or claims.get("sub") != self.client_id:
            return 700021, "Client assertion application identifier doesn't match 'client_id' " \
                           "parameter (iss and sub must both be the client id)."
        now = time.time()
        exp = claims.get("exp")
        if not isinstance(exp, (int, float)) or isinstance(exp, bool) or exp <= now:
            return 700024, f"Client assertion is not within its valid time range (exp={exp!r})."
        nbf = claims.get("nbf")
        if nbf is not None and (not isinstance(nbf, (int, float)) or nbf > now + self.max_clock_skew):
            return 700024, f"Client assertion is not within its valid time range (nbf={nbf!r})."
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti:
            return 700024, "Client assertion must contain a 'jti' claim."
        return None

    def _signature_ok(self, alg: str, data: bytes, signature: bytes, pubkey_file: str) -> bool:
        with tempfile.TemporaryDirectory(prefix="jwt-", dir=self._dir) as d:
            data_path, sig_path = os.path.join(d, "data"), os.path.join(d, "sig")
            with open(data_path, "wb") as f:
                f.write(data)
            with open(sig_path, "wb") as f:
                f.write(signature)
            proc = run_openssl("dgst", "-sha256", *_JWS_VERIFY_OPTIONS[alg], "-verify",
                               pubkey_file, "-signature", sig_path, data_path)
        return proc.returncode == 0 and b"Verified OK" in proc.stdout
