"""A loopback double of the Azure Communication Services (ACS) Email REST API and of the
Microsoft Entra ID client-credentials token endpoint, for the paas-milter "api" route tests.

Python 3.11 standard library plus the `openssl` CLI. It listens on 127.0.0.1 only, over HTTPS
with a throw-away CA it generates (clients verify against `ca_file`; never disable checks),
HTTP/1.1 with keep-alive, and records every request with the id of the TCP connection that
carried it, so connection reuse is observable.

Library use:

    with MockAcs(verified_domains=["contoso.test"]) as mock:
        ... point the client at mock.endpoint / mock.connection_string, trust mock.ca_file ...
        msg = mock.wait_for_accepted(1)[0]
        assert msg.message["content"]["subject"] == "hello"

Process use (demo, benchmark):

    python3 mock_acs.py --port 8443 --access-key KEY --state-dir DIR [--verified-domain D]...
        [--reexecute-repeated-operation-id] [--repeatability-window SECONDS]

prints `endpoint=...`, `ca_file=...`, `token_url=...` and then `ready` on stdout; every accepted
message is also written to DIR/accepted/NNNNNN-<operation id>.json and the whole setup (with
the secrets) to DIR/mock-acs.json (mode 0600). SIGTERM/SIGINT stop it.

Endpoints
---------
POST /emails:send?api-version=2023-03-31|2025-09-01
    -> 202 {"id": <operation id>, "status": "Running"} with Operation-Location
       (<endpoint>/emails/operations/<id>?api-version=<same>), retry-after (self.retry_after,
       20 as in the spec's example) and x-ms-request-id; x-ms-client-request-id is echoed.
GET  /emails/operations/<id>?api-version=...
    -> 200 {"id", "status": "Succeeded"} ("Running" + retry-after for the first
       `polls_before_success` polls; set_operation_status() scripts others); 404 if unknown.
POST /<tenant>/oauth2/v2.0/token   (form: grant_type=client_credentials, client_id, scope,
    client_secret | client_assertion_type + client_assertion)
    -> 200 {"token_type": "Bearer", "expires_in": N, "ext_expires_in": N, "access_token": ...}

Contract, from Azure/azure-rest-api-specs specification/communication/data-plane/Email/
stable/2023-03-31/CommunicationServicesEmail.json and stable/2025-09-01/... (+ examples/):
EmailMessage requires senderAddress, content, recipients; content requires subject;
recipients' to/cc/bcc are arrays of EmailAddress {address (required), displayName};
attachments[] {name, contentType, contentInBase64 (all required, format byte)} and, in
2025-09-01 only, contentId; headers is a string->string map; userEngagementTrackingDisabled
boolean. Errors use common-types ErrorResponse {"error": {"code", "message", "target",
"details"}} plus an `x-ms-error-code` header. Operation-Id is an optional uuid header
("if not provided, the service will generate one"). The spec has no maxItems: the 50-recipient
and 10 MB limits are from the service-limits page (MicrosoftDocs/azure-docs articles/
communication-services/concepts/service-limits.md: "Number of recipients in Email 50",
"Total email request size (including attachments) 10 MB").

What the service does that the spec does NOT say, and the choice made here (all settable):
* Too-large request: 413, code "RequestEntityTooLarge" (status/code not documented).
* Unverified sender domain: 404 "DomainNotLinked", "The specified sender domain has not
  been linked." (the message is the one users report; the status seen in client code is 404,
  sometimes 403: `unlinked_domain_status`). A local part not among `sender_usernames` of its
  domain: 400 "InvalidSenderUserName".
* Schema violations: 400 code "BadRequest" with `target` = the JSON path at fault. These
  codes are the mock's own: a client should decide on the HTTP status, not on the code.
  The mock is deliberately stricter than the service may be (unknown properties at any
  level, contentId with 2023-03-31, missing plainText AND html are all 400), to catch
  client mistakes.
* Bad credentials: 401 {"error": {"code": "Denied", "message": "Denied by the resource
  provider."}}; the precise reason is in the request record (`auth_error`) and in an
  `x-mock-auth-error` response header.
* A repeated Operation-Id that was already accepted: the spec is silent (it only says the
  header names the operation; NOTHING documents that a repeat is dropped). Three modes:
  default 202 with the same id and status, nothing recorded twice (`duplicate_status = 202`);
  `duplicate_status = 409` answers 409 "Conflict" instead; and the worst legal case,
  `reexecute_repeated_operation_id = True` (CLI --reexecute-repeated-operation-id): the POST
  is executed AGAIN and a second AcceptedMessage is recorded (`execution` 2, 3, ...,
  `duplicate` True), as a service that does not deduplicate would. A client's correctness
  must hold in that mode: ask GET /emails/operations/{id} before posting an id again.
  GET /emails/operations/{id} is 200 for an id accepted at least once (also by an
  `accept=True` fault), 404 for one that never was (only 4xx/5xx/401/scripted faults).
* Scripted faults (fail_next()/always()) apply after the body was read and BEFORE
  authentication and validation - except for a request with valid repeatability headers,
  which is authenticated first (see below).

Repeatable requests (OASIS Repeatable Requests 1.0 as documented for ACS at
learn.microsoft.com/rest/api/communication/repeatable-requests, "Applies to: ACS Email (Email
Send API)"), on POST /emails:send only, exactly per the documented table:
* `Repeatability-Request-Id` (a GUID; compared case-insensitively as a GUID) and
  `Repeatability-First-Sent` (IMF-fixdate, "Fri, 04 Dec 2026 12:00:00 GMT", weekday checked).
  Both absent: an ordinary, non-repeatable request. Either malformed, only one of the two, or
  one sent twice: 400, `Repeatability-Result: rejected`.
* First-Sent older than `repeatability_window` (300 s: "the tracked duration is 5 minutes")
  -> 412 "PreconditionFailed", rejected. First-Sent more than `max_clock_skew` in the FUTURE
  is also outside the tracked duration: 412 as well (the mock's choice; the page names no
  other status for a valid date outside the window).
* Time for all of this is `self.clock()` (default time.time; HMAC dates keep real time), so
  tests move past the window by setting `mock.clock = lambda: time.time() + 301`.
* Authentication comes BEFORE the repeatability lookup: a 401 is never remembered and a repeat
  must authenticate itself (else anybody could read a stored answer). Inferred, not documented.
* New id within the window: executed normally (`accepted`), the id registered as IN PROGRESS
  from before any scripted fault/delay until the final answer, whose status, body and headers
  are then remembered. "Same request" = same SHA-256 of the body bytes (auth headers, x-ms-date
  and the signature change per attempt and are ignored). A repeat of a tracked id:
  different body -> 400 rejected; original still in progress -> 409 "Conflict" (accepted);
  original answered 2xx or 4xx -> that same answer again (same status, body, Operation-Location,
  Retry-After, x-ms-error-code; a new x-ms-request-id), nothing executed or recorded
  (`RecordedRequest.replayed`) - note this includes a 429 or a 409: a client that got a 4xx
  must use a NEW id to try again; original answered 5xx -> executed AGAIN (`reexecuted`):
  with an `accept=True` 5xx fault that sends the message twice unless Operation-Id dedup
  catches it. Only requests that are executed (new, re-executed) take a scripted fault.
* Worst legal tracking: an entry is forgotten `repeatability_window` seconds after the
  ORIGINAL's First-Sent. A repeat that carries a newer First-Sent than its original (a client
  bug) can therefore arrive after the entry is gone and be executed as new: a duplicate.
* A request whose connection was reset or dropped BEFORE it was processed (`reset=True`
  without accept, a delay cut by stop()) leaves no entry: the service never saw it.
* `Repeatability-Result: accepted|rejected` is set as OASIS specifies (column "Repeatability
  Result" of the table); 401s and requests without the headers carry none.

Ambiguous outcomes and how to script them (fail_next()/always() keywords; `count`, `endpoint`):
    status=S                    not processed; answer S (429 with/without retry_after=N;
                                409; 5xx ...). Remembered for repeatability like any answer.
    reset=True                  not processed; TCP RST, no answer. Not remembered.
    delay=N                     in progress N s BEFORE processing, then normal processing:
                                the message is accepted only after N s (after a short client
                                timeout: "timed out, yet accepted later"). With status S: S.
    accept=True, status=S       (b)/(c) processed and ACCEPTED, then answer S instead of the
                                202 (504 from a gateway, 500/503: "5xx after it went out");
                                S is what is remembered, so a repeat is RE-EXECUTED.
    accept=True, reset=True     (b) accepted, then TCP RST; the 202 is remembered (a repeat
                                gets the 202 again).
    hold=N                      accepted, then in progress N s, then the (202) answer; with
                                status S / reset=True: S / RST after the hold.
    stall=N                     (a) accepted, then NOTHING sent for N s (the client times out),
                                then the connection is closed without an answer; in progress
                                for the N s, then the 202 is remembered.
hold and stall imply accept=True.

HMAC (Azure SDK for Python azure-communication-email `_shared/policy.py`, HMACCredentialsPolicy):
    string_to_sign = VERB "\\n" path_and_query "\\n" x_ms_date ";" host ";" content_hash
    content_hash   = base64(sha256(body))            (also sent as x-ms-content-sha256)
    signature      = base64(HMAC-SHA256(base64decode(access_key), utf8(string_to_sign)))
    Authorization: HMAC-SHA256 SignedHeaders=x-ms-date;host;x-ms-content-sha256&Signature=<sig>
`path_and_query` is the request-target exactly as sent ("/emails:send?api-version=2023-03-31"),
`host` the Host header (here always with the port: "127.0.0.1:PORT"), x-ms-date RFC 1123 GMT
within +-max_clock_skew seconds. Worked examples: see test_mock_acs.py's docstring.

Entra client assertion (JWT): header alg RS256 with x5t = base64url(SHA-1 of the certificate's
DER) (x5t#S256 also accepted); claims aud = the token URL, iss = sub = client_id, exp in the
future, nbf (if any) not in the future, jti present; RS256 verified with `openssl dgst -sha256
-verify` against the configured certificate's public key. Errors are AADSTS-shaped
{"error", "error_description": "AADSTSnnn: ...", "error_codes", "timestamp", "trace_id",
"correlation_id"}; the AADSTS numbers are illustrative.
"""

from __future__ import annotations

import argparse
import atexit
import base64
import binascii
import collections
import dataclasses
import datetime
import email.utils
import hashlib
import hmac
import http.server
import json
import os
import re
import secrets
import shutil
import signal
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
from collections.abc import Callable, Iterable, Mapping
from typing import Any

OPENSSL = shutil.which("openssl") or "/usr/bin/openssl"

API_VERSIONS = ("2023-03-31", "2025-09-01")
ACS_SCOPE = "https://communication.azure.com//.default"
ACS_RESOURCE = "https://communication.azure.com"
CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
SIGNED_HEADERS = "x-ms-date;host;x-ms-content-sha256"
TERMINAL_STATUSES = ("Succeeded", "Failed", "Canceled")
OPERATION_STATUSES = ("NotStarted", "Running") + TERMINAL_STATUSES

_ADDRESS_RE = re.compile(r"^[^@\s<>\",;]+@[^@\s<>\",;]+\.[^@\s<>\",;.]+$")
_RFC1123_RE = re.compile(r"^(Mon|Tue|Wed|Thu|Fri|Sat|Sun), (\d{2}) "
                         r"(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) (\d{4}) "
                         r"(\d{2}):(\d{2}):(\d{2}) GMT$")
_WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_GUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-"
                      r"[0-9a-fA-F]{12}$")
_OPERATION_PATH_RE = re.compile(r"^/emails/operations/([^/?]+)$")
_TOKEN_PATH_RE = re.compile(r"^/([^/?]+)/oauth2/v2\.0/token$")
_CERT_RE = re.compile(rb"-----BEGIN CERTIFICATE-----(.+?)-----END CERTIFICATE-----", re.S)

_DEFAULT_CODES = {
    400: ("BadRequest", "The request is invalid."),
    401: ("Denied", "Denied by the resource provider."),
    403: ("Forbidden", "The request is forbidden."),
    404: ("NotFound", "The requested resource was not found."),
    408: ("RequestTimeout", "The request timed out."),
    409: ("Conflict", "The request conflicts with the current state."),
    412: ("PreconditionFailed", "A precondition of the request was not met."),
    413: ("RequestEntityTooLarge", "The request body is too large."),
    429: ("TooManyRequests", "Too many requests. Retry after the time given in Retry-After."),
    500: ("InternalServerError", "An internal server error occurred."),
    502: ("BadGateway", "Bad gateway."),
    503: ("ServiceUnavailable", "The service is temporarily unavailable."),
    504: ("GatewayTimeout", "Gateway timeout."),
}

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


# --------------------------------------------------------------------------------------------
# helpers (also usable by tests that want the mock's own view, e.g. for a cross-check)
# --------------------------------------------------------------------------------------------

def generate_access_key() -> str:
    """A random 32-byte access key, base64 (like the portal's)."""
    return base64.b64encode(secrets.token_bytes(32)).decode()


def content_hash(body: bytes) -> str:
    return base64.b64encode(hashlib.sha256(body).digest()).decode()


def string_to_sign(method: str, path_and_query: str, x_ms_date: str, host: str,
                   content_hash_b64: str) -> str:
    return f"{method.upper()}\n{path_and_query}\n{x_ms_date};{host};{content_hash_b64}"


def hmac_signature(access_key_b64: str, method: str, path_and_query: str, x_ms_date: str,
                   host: str, content_hash_b64: str) -> str:
    """The mock's verifier's expected signature (base64)."""
    key = base64.b64decode(access_key_b64)
    sts = string_to_sign(method, path_and_query, x_ms_date, host, content_hash_b64)
    return base64.b64encode(hmac.new(key, sts.encode("utf-8"), hashlib.sha256).digest()).decode()


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64url_decode(text: str) -> bytes:
    if not re.fullmatch(r"[A-Za-z0-9_-]*", text):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _utcnow_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def _parse_rfc1123(text: str) -> float | None:
    m = _RFC1123_RE.match(text)
    if not m:
        return None
    try:
        dt = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if _WEEKDAYS[dt.weekday()] != m.group(1):
        return None
    return dt.timestamp()


def _run_openssl(*args: str, input: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([OPENSSL, *args], input=input, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, timeout=60)


# --------------------------------------------------------------------------------------------
# records
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Fault:
    """A scripted answer (the table "Ambiguous outcomes" in the module doc). status: answer
    with this error; delay: sleep first (then the fault, or normal processing when there is
    neither status nor reset); reset: close the TCP connection (RST) without answering;
    accept: process the request normally first (so the message IS accepted) and only then
    apply status/reset - the "accepted but the client never heard" case; hold: after
    processing, wait this long before answering; stall: after processing, send nothing for
    this long and then close the connection without answering (hold/stall imply accept)."""
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
class RecordedRequest:
    seq: int
    time: float
    method: str
    target: str                 # request-target exactly as received (path + "?" + query)
    path: str
    query: dict[str, list[str]]
    route: str                  # "send" | "status" | "token" | "unknown"
    headers: dict[str, str]     # lower-case names (last value wins)
    body: bytes
    connection_id: int
    client_port: int
    json: Any = None            # parsed JSON body (send), None otherwise / when unparsable
    auth: str = "none"          # "hmac" | "bearer" | "none" | "other"; token: "secret"/"assertion"
    auth_ok: bool | None = None
    auth_error: str | None = None
    status: int | None = None   # None: no answer (connection reset / dropped)
    error_code: str | None = None
    accepted: bool = False      # this request created a new accepted message
    duplicate: bool = False     # a repeat of an already accepted Operation-Id (re-executed
                                # too when reexecute_repeated_operation_id: then accepted)
    operation_id: str | None = None
    api_version: str | None = None
    fault: Fault | None = None
    repeatability_id: str | None = None  # Repeatability-Request-Id as a lower-case GUID
    # what the repeatability layer made of it: None (no headers, or 401 before the lookup),
    # "new", "reexecuted" (original got 5xx), "replayed" (stored 2xx/4xx sent again),
    # "in-progress" (409), "mismatch" (400, other body), "malformed" (400),
    # "expired" / "future" (412)
    repeatability: str | None = None
    replayed: bool = False      # answered from a stored response, nothing executed

    def summary(self) -> str:
        bits = [f"#{self.seq} conn={self.connection_id}:{self.client_port}",
                f"{self.method} {self.target}", f"-> {self.status}"]
        if self.error_code:
            bits.append(self.error_code)
        if self.auth_error:
            bits.append(f"auth={self.auth}:{self.auth_error}")
        if self.accepted:
            bits.append(f"accepted op={self.operation_id}")
        if self.duplicate:
            bits.append(f"duplicate op={self.operation_id}")
        if self.repeatability:
            bits.append(f"repeatability={self.repeatability}:{self.repeatability_id}")
        if self.fault:
            bits.append(f"fault={self.fault}")
        return " ".join(bits)


@dataclasses.dataclass
class AcceptedMessage:
    operation_id: str
    api_version: str
    message: dict
    auth: str                   # "hmac" | "bearer"
    request: RecordedRequest
    execution: int = 1          # 1st, 2nd, ... execution of this operation id (>1 only with
                                # reexecute_repeated_operation_id)

    @property
    def duplicate(self) -> bool:
        """This message repeats an operation id that had already been accepted."""
        return self.execution > 1

    @property
    def sender(self) -> str:
        return self.message.get("senderAddress", "")

    @property
    def subject(self) -> str:
        return (self.message.get("content") or {}).get("subject", "")

    def addresses(self, kind: str = "to") -> list[str]:
        return [r["address"] for r in (self.message.get("recipients") or {}).get(kind) or []]

    def recipients(self) -> list[str]:
        """to + cc + bcc addresses, in that order."""
        return [a for kind in ("to", "cc", "bcc") for a in self.addresses(kind)]


@dataclasses.dataclass
class TrackedRequest:
    """One Repeatability-Request-Id the mock remembers (see repeatability_entry())."""
    request_id: str             # lower-case GUID
    first_sent: float           # the ORIGINAL's Repeatability-First-Sent (epoch seconds)
    body_sha256: str            # hex
    state: str                  # "in-progress" | "done"
    owner: int                  # seq of the request executing it now / last
    executions: int = 1         # 1 + re-executions after a 5xx
    status: int | None = None   # the remembered final status (None while never completed)
    reply: "_Reply | None" = dataclasses.field(default=None, repr=False)
    requests: list[int] = dataclasses.field(default_factory=list)  # seqs that carried the id


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


class _ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, target: str | None = None):
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message, self.target = status, code, message, target


class _Reply:
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

    def __init__(self, mock: "MockAcs", address: tuple[str, int]):
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
    server_version = "mock-acs/1.0"
    sys_version = ""
    server: _Server

    def setup(self) -> None:
        mock = self.server.mock
        raw = self.request
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
        return self.server_version

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
# the mock
# --------------------------------------------------------------------------------------------

_LIVE: set["MockAcs"] = set()


@atexit.register
def _stop_leftovers() -> None:
    for mock in list(_LIVE):
        try:
            mock.stop()
        except Exception:  # pragma: no cover - best effort at exit
            pass


class MockAcs:
    """ACS Email + Entra token endpoint double on https://127.0.0.1:PORT (see module doc).

    Settings that may be changed while it runs (plain attributes): max_clock_skew,
    max_request_bytes, max_recipients, retry_after, polls_before_success, duplicate_status,
    reexecute_repeated_operation_id, repeatability_window, clock (a () -> epoch seconds
    callable for the repeatability window), unlinked_domain_status, token_lifetime,
    verified_domains (a set), sender_usernames."""

    def __init__(self, access_key: str | None = None,
                 verified_domains: Iterable[str] = ("contoso.test",), *,
                 port: int = 0,
                 state_dir: str | None = None,
                 sender_usernames: Mapping[str, Iterable[str]] | None = None,
                 max_clock_skew: float = 300.0,
                 max_request_bytes: int = 10 * 1024 * 1024,
                 max_recipients: int = 50,
                 retry_after: int = 20,
                 polls_before_success: int = 0,
                 duplicate_status: int = 202,
                 reexecute_repeated_operation_id: bool = False,
                 repeatability_window: float = 300.0,
                 clock: Callable[[], float] | None = None,
                 unlinked_domain_status: int = 404,
                 tenant_id: str | None = None,
                 client_id: str | None = None,
                 client_secret: str | None = None,
                 client_certificate: str | None = None,
                 token_lifetime: int = 3600,
                 idle_timeout: float = 120.0,
                 handshake_timeout: float = 10.0,
                 keep: bool | None = None,
                 echo_log: bool = False):
        self.access_key = access_key or generate_access_key()
        try:
            if len(base64.b64decode(self.access_key, validate=True)) == 0:
                raise ValueError
        except (binascii.Error, ValueError):
            raise ValueError("access_key must be non-empty base64") from None
        self.verified_domains = {d.lower() for d in verified_domains}
        self.sender_usernames = {d.lower(): {u.lower() for u in us}
                                 for d, us in (sender_usernames or {}).items()}
        self.requested_port = port
        self.state_dir = os.path.abspath(state_dir) if state_dir else None
        self.max_clock_skew = max_clock_skew
        self.max_request_bytes = max_request_bytes
        self.max_recipients = max_recipients
        self.retry_after = retry_after
        self.polls_before_success = polls_before_success
        self.duplicate_status = duplicate_status
        self.reexecute_repeated_operation_id = reexecute_repeated_operation_id
        self.repeatability_window = repeatability_window
        self.clock: Callable[[], float] = clock or time.time
        self.unlinked_domain_status = unlinked_domain_status
        self.tenant_id = tenant_id or str(uuid.uuid4())
        self.client_id = client_id or str(uuid.uuid4())
        self.client_secret = client_secret if client_secret is not None else \
            "mock~" + secrets.token_urlsafe(30)
        self.token_lifetime = token_lifetime
        self.idle_timeout = idle_timeout
        self.handshake_timeout = handshake_timeout
        self.keep = bool(os.environ.get("PAAS_IT_KEEP")) if keep is None else keep
        self.echo_log = echo_log

        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._stopping = threading.Event()
        self._requests: list[RecordedRequest] = []
        self._accepted: list[AcceptedMessage] = []
        self._operations: dict[str, dict[str, Any]] = {}
        self._tracked: dict[str, TrackedRequest] = {}
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
        return f"<MockAcs {self.endpoint if self.port else 'stopped'}>"

    def __enter__(self) -> "MockAcs":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> "MockAcs":
        if self._server is not None:
            return self
        if self.state_dir:
            os.makedirs(self.state_dir, exist_ok=True)
            self._dir = self.state_dir
        else:
            self._dir = tempfile.mkdtemp(prefix="mock-acs-")
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
                                            name=f"mock-acs-{self.port}", daemon=True)
            self._thread.start()
        except BaseException:
            self.stop()
            raise
        _LIVE.add(self)
        if self.state_dir:
            self._write_state()
        if self.keep and self._own_dir:
            print(f"mock-acs: keeping {self._dir}", file=sys.stderr)
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

    # ---- addresses --------------------------------------------------------------------------

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def endpoint(self) -> str:
        """"https://127.0.0.1:PORT" (no trailing slash)."""
        return f"https://{self.host}"

    @property
    def connection_string(self) -> str:
        """In the portal's format, trailing slash included:
        "endpoint=https://127.0.0.1:PORT/;accesskey=<base64>"."""
        return f"endpoint={self.endpoint}/;accesskey={self.access_key}"

    @property
    def authority(self) -> str:
        """What EntraCredentials.authority should be (instead of login.microsoftonline.com)."""
        return self.endpoint

    @property
    def token_url(self) -> str:
        return f"{self.endpoint}/{self.tenant_id}/oauth2/v2.0/token"

    def send_url(self, api_version: str = API_VERSIONS[0]) -> str:
        return f"{self.endpoint}/emails:send?api-version={api_version}"

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
             "-out", ca_cert, "-days", "30", "-subj", "/O=paas-milter tests/CN=mock-acs test CA"),
            ("req", "-new", "-config", cnf, "-newkey", "ec", "-pkeyopt",
             "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", srv_key, "-out", srv_csr,
             "-subj", "/CN=127.0.0.1"),
            ("x509", "-req", "-in", srv_csr, "-CA", ca_cert, "-CAkey", ca_key,
             "-set_serial", "0x" + secrets.token_hex(8), "-days", "30", "-extfile", cnf,
             "-extensions", "v3_server", "-out", srv_cert),
        ]
        for args in steps:
            proc = _run_openssl(*args)
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
        proc = _run_openssl("x509", "-inform", "DER", "-pubkey", "-noout", input=der)
        if proc.returncode != 0:
            raise ValueError(f"{pem_path}: {proc.stdout.decode(errors='replace')}")
        with open(pub, "wb") as f:
            f.write(proc.stdout)
        with self._lock:
            self.client_certificate = pem_path
            self._pubkey_file = pub
            self._cert_x5t = _b64url(hashlib.sha1(der).digest())
            self._cert_x5t_s256 = _b64url(hashlib.sha256(der).digest())

    # ---- fault injection --------------------------------------------------------------------

    def fail_next(self, status: int | None = None, *, code: str | None = None,
                  message: str | None = None, retry_after: float | None = None,
                  delay: float = 0.0, reset: bool = False, accept: bool = False,
                  headers: Mapping[str, str] | None = None, hold: float = 0.0,
                  stall: float = 0.0, count: int = 1, endpoint: str = "send") -> None:
        """Script the answer to the next COUNT executed requests to ENDPOINT ("send",
        "status", "token"); see "Ambiguous outcomes" in the module doc. Examples:
        fail_next(429, retry_after=2); fail_next(429) (no Retry-After); fail_next(409);
        fail_next(503); fail_next(delay=5); fail_next(reset=True);
        fail_next(400, code="InvalidSenderUserName");
        fail_next(reset=True, accept=True) (accepted, then RST);
        fail_next(504, accept=True) (accepted, then 504);
        fail_next(hold=2) (accepted, in progress for 2 s, then 202);
        fail_next(stall=30) (accepted, then silence until the client gives up)."""
        fault = self._make_fault(status, code=code, message=message, retry_after=retry_after,
                                 delay=delay, reset=reset, accept=accept, headers=headers,
                                 hold=hold, stall=stall, endpoint=endpoint)
        with self._lock:
            for _ in range(count):
                self._faults[endpoint].append(dataclasses.replace(fault))

    def always(self, status: int | None = None, *, code: str | None = None,
               message: str | None = None, retry_after: float | None = None,
               delay: float = 0.0, reset: bool = False, accept: bool = False,
               headers: Mapping[str, str] | None = None, hold: float = 0.0,
               stall: float = 0.0, endpoint: str = "send") -> None:
        """A permanent fault for an endpoint (after the queued ones), until clear_faults().
        Same keywords as fail_next() (no count); e.g. always(hold=0.5) delays every answer."""
        fault = self._make_fault(status, code=code, message=message, retry_after=retry_after,
                                 delay=delay, reset=reset, accept=accept, headers=headers,
                                 hold=hold, stall=stall, endpoint=endpoint)
        with self._lock:
            self._permanent[endpoint] = fault

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()
            self._permanent.clear()

    def pending_faults(self, endpoint: str = "send") -> int:
        with self._lock:
            return len(self._faults[endpoint])

    @staticmethod
    def _make_fault(status: int | None, code: str | None = None, message: str | None = None,
                    retry_after: float | None = None, delay: float = 0.0, reset: bool = False,
                    accept: bool = False, headers: Mapping[str, str] | None = None,
                    endpoint: str = "send", *, hold: float = 0.0, stall: float = 0.0) -> Fault:
        # (the positional order is kept as it was: tests/integration/soak_api.py calls it so)
        if endpoint not in ("send", "status", "token"):
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

    # ---- scripted operation status ----------------------------------------------------------

    def set_operation_status(self, operation_id: str, status: str, *,
                             error_code: str | None = None, error_message: str | None = None) -> None:
        if status not in OPERATION_STATUSES:
            raise ValueError(f"status must be one of {OPERATION_STATUSES}")
        with self._lock:
            op = self._operations[self._op_key(operation_id)]
            op["status"] = status
            op["scripted"] = True
            op["error"] = ({"code": error_code or "EmailDropped",
                            "message": error_message or "Email was dropped."}
                           if status == "Failed" else None)

    def expire_tokens(self) -> None:
        """Make every bearer token issued so far expired."""
        with self._lock:
            for t in self._tokens.values():
                t["expires_at"] = time.time() - 1

    # ---- inspection ---------------------------------------------------------------------------

    def requests(self, route: str | None = None) -> list[RecordedRequest]:
        with self._lock:
            return [r for r in self._requests if route is None or r.route == route]

    def accepted_messages(self) -> list[AcceptedMessage]:
        with self._lock:
            return list(self._accepted)

    def recipient_counts(self, *, fold_case: bool = False) -> dict[str, int]:
        """address -> how many accepted messages (re-executions and duplicates included)
        named it in to + cc + bcc (twice in one message counts twice). For reconciliation:
        "every recipient exactly once" is set(counts.values()) == {1}. FOLD_CASE lower-cases
        the addresses first."""
        counts: collections.Counter[str] = collections.Counter()
        for acc in self.accepted_messages():
            for address in acc.recipients():
                counts[address.lower() if fold_case else address] += 1
        return dict(counts)

    def duplicate_recipients(self, *, fold_case: bool = False) -> dict[str, int]:
        """The entries of recipient_counts() above 1."""
        return {a: n for a, n in self.recipient_counts(fold_case=fold_case).items() if n > 1}

    def repeatability_entry(self, request_id: str) -> TrackedRequest | None:
        """A snapshot of what is tracked for a Repeatability-Request-Id (None: nothing, or
        forgotten because the window passed by self.clock())."""
        key = request_id.strip().lower()
        with self._lock:
            self._purge_tracked(self.clock())
            entry = self._tracked.get(key)
            return dataclasses.replace(entry, requests=list(entry.requests)) if entry else None

    def token_requests(self) -> list[TokenRequest]:
        with self._lock:
            return list(self._token_requests)

    def tls_failures(self) -> list[str]:
        with self._lock:
            return list(self._tls_failures)

    def wait_for_accepted(self, n: int, timeout: float = 10.0) -> list[AcceptedMessage]:
        """The first N accepted messages, waiting up to TIMEOUT s; AssertionError otherwise."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._accepted) >= n, timeout):
                raise AssertionError(f"{len(self._accepted)} of {n} messages accepted within "
                                     f"{timeout}s\n{self.diagnostics()}")
            return list(self._accepted[:n])

    def wait_for_requests(self, n: int, route: str | None = "send",
                          timeout: float = 10.0) -> list[RecordedRequest]:
        """The first N completed requests to ROUTE (answered, reset or dropped)."""
        def done() -> list[RecordedRequest]:
            return [r for r in self._requests
                    if (route is None or r.route == route) and getattr(r, "_done", False)]
        with self._cond:
            if not self._cond.wait_for(lambda: len(done()) >= n, timeout):
                raise AssertionError(f"{len(done())} of {n} {route} requests within {timeout}s\n"
                                     f"{self.diagnostics()}")
            return done()[:n]

    def reset(self) -> None:
        """Forget requests, messages, operations, tokens and faults (not the configuration)."""
        with self._lock:
            self._requests.clear()
            self._accepted.clear()
            self._operations.clear()
            self._tracked.clear()
            self._tokens.clear()
            self._token_requests.clear()
            self._tls_failures.clear()
            self._faults.clear()
            self._permanent.clear()

    def diagnostics(self, last: int = 30) -> str:
        with self._lock:
            lines = [f"--- {self!r}: {len(self._requests)} requests, {len(self._accepted)} "
                     f"accepted, {len(self._token_requests)} token requests, "
                     f"{len(self._tls_failures)} TLS failures"]
            lines += ["  " + r.summary() for r in self._requests[-last:]]
            lines += ["  TLS: " + t for t in self._tls_failures[-5:]]
        return "\n".join(lines)

    describe = diagnostics

    # ---- internals: connections / logging ------------------------------------------------------

    def _log(self, line: str, echo: bool = True) -> None:
        self._log_lines.append(line)
        if self.echo_log and echo:
            print(f"mock-acs: {line}", file=sys.stderr, flush=True)

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

    @staticmethod
    def _route(method: str, path: str) -> tuple[str, list[str], tuple[str, ...]]:
        """(route, path params, allowed methods)."""
        if path == "/emails:send":
            return "send", [], ("POST",)
        m = _OPERATION_PATH_RE.match(path)
        if m:
            return "status", [urllib.parse.unquote(m.group(1))], ("GET",)
        m = _TOKEN_PATH_RE.match(path)
        if m:
            return "token", [urllib.parse.unquote(m.group(1))], ("POST",)
        return "unknown", [], ()

    def _new_record(self, h: _Handler, route: str, body: bytes) -> RecordedRequest:
        path, _, query = h.path.partition("?")
        with self._lock:
            rec = RecordedRequest(
                seq=len(self._requests) + 1, time=time.time(), method=h.command, target=h.path,
                path=path, query=urllib.parse.parse_qs(query, keep_blank_values=True),
                route=route, headers={k.lower(): v for k, v in h.headers.items()}, body=body,
                connection_id=getattr(h, "conn_id", 0), client_port=h.client_address[1])
            self._requests.append(rec)
        return rec

    def _finish_record(self, rec: RecordedRequest) -> None:
        with self._cond:
            rec._done = True  # type: ignore[attr-defined]
            self._cond.notify_all()
        self._log(rec.summary())

    def _reject_early(self, h: _Handler) -> bool:
        """On `Expect: 100-continue`: refuse a too-large send body before it is sent."""
        path = h.path.partition("?")[0]
        route, _, _ = self._route(h.command, path)
        cl = h.headers.get("Content-Length", "")
        if route == "send" and h.command == "POST" and cl.isdigit() \
                and int(cl) > self.max_request_bytes:
            rec = self._new_record(h, route, b"")
            h.close_connection = True
            self._send(h, rec, self._error_reply(413, "RequestEntityTooLarge",
                       f"The request body ({cl} bytes) exceeds the limit of "
                       f"{self.max_request_bytes} bytes."), close=True)
            return True
        return False

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

    def _dispatch(self, h: _Handler) -> None:
        path = h.path.partition("?")[0]
        route, params, methods = self._route(h.command, path)
        limit = self.max_request_bytes if route == "send" else 1 << 20
        body, bad = self._read_body(h, limit)
        rec = self._new_record(h, route, body or b"")
        if bad is not None:
            if route == "token":
                self._send(h, rec, self._entra_error(400, "invalid_request", 900144,
                                                     "The request body could not be read."))
            elif bad == 413:
                self._send(h, rec, self._error_reply(
                    413, "RequestEntityTooLarge",
                    f"The request body exceeds the limit of {limit} bytes."))
            else:
                self._send(h, rec, self._error_reply(bad, _DEFAULT_CODES.get(bad, ("BadRequest",))[0]
                                                     if bad != 411 else "LengthRequired",
                                                     "The request body could not be read."))
            return
        if route == "unknown":
            self._send(h, rec, self._error_reply(404, "NotFound",
                                                 f"No such resource: {path}."))
            return
        if h.command not in methods:
            reply = self._error_reply(405, "MethodNotAllowed",
                                      f"{h.command} is not allowed on {path}.")
            reply.headers["Allow"] = ", ".join(methods)
            self._send(h, rec, reply)
            return

        entry: TrackedRequest | None = None
        if route == "send":
            early, entry = self._repeatability_begin(h, rec, body)
            if early is not None:
                self._send(h, rec, early)
                return
        try:
            self._execute(h, rec, route, params, body, entry)
        finally:
            if entry is not None:
                self._repeatability_release(entry, rec)

    def _execute(self, h: _Handler, rec: RecordedRequest, route: str, params: list[str],
                 body: bytes, entry: TrackedRequest | None) -> None:
        """Faults, then the endpoint's handler; ENTRY (a tracked repeatable request) gets the
        final answer before it is written, so a repeat right after it finds it done."""
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
                self._repeatability_complete(entry, reply)
                self._send(h, rec, reply)
                return

        try:
            if route == "send":
                reply = self._handle_send(h, rec, body)
            elif route == "status":
                reply = self._handle_status(h, rec, params[0])
            else:
                reply = self._handle_token(h, rec, params[0], body)
        except _ApiError as err:
            reply = self._error_reply(err.status, err.code, err.message, err.target)

        if fault is not None and fault.accept:
            wait = fault.stall or fault.hold
            if wait and self._stopping.wait(wait):
                self._repeatability_complete(entry, reply)
                self._drop(h, rec)
                return
            if fault.stall:
                # processed, then silence: the connection closes without an answer
                self._repeatability_complete(entry, reply)
                self._drop(h, rec)
                return
            if fault.reset:
                # the service's answer is what it remembers; the transport lost it
                self._repeatability_complete(entry, reply)
                self._drop(h, rec, reset=True)
                return
            if fault.status is not None:
                reply = self._fault_reply(route, fault)
        self._repeatability_complete(entry, reply)
        self._send(h, rec, reply)

    # ---- repeatable requests (OASIS; see the module doc) ----------------------------------------

    def _purge_tracked(self, now: float) -> None:
        """Forget ids whose ORIGINAL First-Sent left the window (under self._lock)."""
        for key in [k for k, e in self._tracked.items()
                    if now - e.first_sent > self.repeatability_window]:
            del self._tracked[key]

    def _repeatability_begin(self, h: _Handler, rec: RecordedRequest,
                             body: bytes) -> tuple[_Reply | None, TrackedRequest | None]:
        """(an answer to send now, None) or (None, the entry this request executes for);
        (None, None) for a request without repeatability headers."""
        ids = h.headers.get_all("Repeatability-Request-Id") or []
        sents = h.headers.get_all("Repeatability-First-Sent") or []
        if not ids and not sents:
            return None, None

        def rejected(status: int, code: str, message: str, outcome: str,
                     target: str) -> tuple[_Reply, None]:
            rec.repeatability = outcome
            return self._error_reply(status, code, message, target), None

        if len(ids) != 1 or len(sents) != 1:
            missing = "Repeatability-Request-Id" if len(ids) != 1 else "Repeatability-First-Sent"
            return rejected(400, "BadRequest", f"Exactly one {missing} header is required with "
                            f"the other repeatability header.", "malformed", missing)
        rid, sent = ids[0].strip(), sents[0].strip()
        if not _GUID_RE.match(rid):
            return rejected(400, "BadRequest", "Repeatability-Request-Id must be a GUID.",
                            "malformed", "Repeatability-Request-Id")
        rec.repeatability_id = rid = rid.lower()
        first_sent = _parse_rfc1123(sent)
        if first_sent is None:
            return rejected(400, "BadRequest", "Repeatability-First-Sent must be an IMF-fixdate "
                            "(e.g. \"Fri, 04 Dec 2026 12:00:00 GMT\").", "malformed",
                            "Repeatability-First-Sent")
        now = self.clock()
        if now - first_sent > self.repeatability_window:
            return rejected(412, "PreconditionFailed", f"Repeatability-First-Sent header is not "
                            f"within the {self.repeatability_window:g} seconds window.",
                            "expired", "Repeatability-First-Sent")
        if first_sent - now > self.max_clock_skew:
            return rejected(412, "PreconditionFailed", "Repeatability-First-Sent is in the "
                            "future, outside the tracked duration.", "future",
                            "Repeatability-First-Sent")

        # Only an authenticated request may see or create tracked state.
        self._authenticate_into(rec, h, body)
        if not rec.auth_ok:
            return self._error_reply(401, "Denied", "Denied by the resource provider."), None

        digest = hashlib.sha256(body).hexdigest()
        with self._lock:
            self._purge_tracked(now)
            entry = self._tracked.get(rid)
            if entry is None:
                entry = TrackedRequest(request_id=rid, first_sent=first_sent, body_sha256=digest,
                                       state="in-progress", owner=rec.seq, requests=[rec.seq])
                self._tracked[rid] = entry
                rec.repeatability = "new"
                return None, entry
            entry.requests.append(rec.seq)
            if not hmac.compare_digest(entry.body_sha256, digest):
                return rejected(400, "BadRequest", "Repeatability-Request-Id was already used "
                                "for a different request.", "mismatch", "Repeatability-Request-Id")
            if entry.state == "in-progress":
                rec.repeatability = "in-progress"
                return self._error_reply(409, "Conflict", "The original request with this "
                                         "Repeatability-Request-Id is still in progress."), None
            assert entry.reply is not None and entry.status is not None
            if entry.status < 500:
                rec.repeatability = "replayed"
                rec.replayed = True
                stored = entry.reply
                if isinstance(stored.obj, dict) and isinstance(stored.obj.get("id"), str):
                    rec.operation_id = stored.obj["id"]
                return _Reply(stored.status, json.loads(json.dumps(stored.obj)), stored.headers,
                              stored.error_code), None
            entry.state = "in-progress"
            entry.owner = rec.seq
            entry.executions += 1
            rec.repeatability = "reexecuted"
            return None, entry

    def _repeatability_complete(self, entry: TrackedRequest | None, reply: _Reply) -> None:
        """Remember REPLY as the final answer of ENTRY's execution."""
        if entry is None:
            return
        with self._lock:
            entry.reply = _Reply(reply.status, json.loads(json.dumps(reply.obj)),
                                 reply.headers, reply.error_code)
            entry.status = reply.status
            entry.state = "done"

    def _repeatability_release(self, entry: TrackedRequest, rec: RecordedRequest) -> None:
        """After the execution: an entry still in progress was never processed (reset before
        processing, stop()): forget it - or go back to the 5xx it had before."""
        with self._lock:
            if entry.state != "in-progress" or entry.owner != rec.seq:
                return
            if entry.reply is not None:
                entry.state = "done"
            elif self._tracked.get(entry.request_id) is entry:
                del self._tracked[entry.request_id]

    def _drop(self, h: _Handler, rec: RecordedRequest, reset: bool = False) -> None:
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

    def _send(self, h: _Handler, rec: RecordedRequest, reply: _Reply, close: bool = False) -> None:
        if rec.route == "token":
            payload = json.dumps(reply.obj).encode() if reply.obj is not None else b""
            headers = {"Content-Type": "application/json; charset=utf-8",
                       "Cache-Control": "no-store, no-cache", "Pragma": "no-cache",
                       "x-ms-request-id": str(uuid.uuid4())}
        else:
            payload = json.dumps(reply.obj, separators=(",", ":")).encode() \
                if reply.obj is not None else b""
            headers = {"x-ms-request-id": str(uuid.uuid4())}
            if payload:
                headers["Content-Type"] = "application/json; charset=utf-8"
            crid = h.headers.get("x-ms-client-request-id")
            if crid:
                headers["x-ms-client-request-id"] = crid
            if reply.error_code:
                headers["x-ms-error-code"] = reply.error_code
            if rec.auth_error and reply.status == 401:
                headers["x-mock-auth-error"] = rec.auth_error
            if rec.repeatability in ("malformed", "expired", "future", "mismatch"):
                headers["Repeatability-Result"] = "rejected"
            elif rec.repeatability is not None:
                headers["Repeatability-Result"] = "accepted"
        headers.update(reply.headers)
        if close or h.close_connection:
            headers["Connection"] = "close"
            h.close_connection = True
        rec.status = reply.status
        rec.error_code = reply.error_code
        try:
            h.send_response(reply.status)
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

    def _error_reply(self, status: int, code: str, message: str,
                     target: str | None = None) -> _Reply:
        err: dict[str, Any] = {"code": code, "message": message}
        if target:
            err["target"] = target
        return _Reply(status, {"error": err}, error_code=code)

    def _fault_reply(self, route: str, fault: Fault) -> _Reply:
        status = fault.status or 500
        default_code, default_msg = _DEFAULT_CODES.get(status, ("Error", "Scripted failure."))
        if route == "token":
            reply = self._entra_error(status, fault.code or "temporarily_unavailable", 50000 + status,
                                      fault.message or default_msg)
        else:
            reply = self._error_reply(status, fault.code or default_code, fault.message or default_msg)
        if fault.retry_after is not None:
            ra = fault.retry_after
            reply.headers["Retry-After"] = str(int(ra)) if float(ra).is_integer() else str(ra)
        reply.headers.update(fault.headers)
        return reply

    # ---- authentication --------------------------------------------------------------------------

    def _authenticate(self, h: _Handler, rec: RecordedRequest, body: bytes) -> None:
        if rec.auth_ok is None:
            self._authenticate_into(rec, h, body)
        if not rec.auth_ok:
            raise _ApiError(401, "Denied", "Denied by the resource provider.")

    def _authenticate_into(self, rec: RecordedRequest, h: _Handler, body: bytes) -> None:
        kind, error = self._check_auth(h, body)
        rec.auth, rec.auth_ok, rec.auth_error = kind, error is None, error

    def _check_auth(self, h: _Handler, body: bytes) -> tuple[str, str | None]:
        auth = h.headers.get("Authorization")
        if not auth:
            return "none", "no Authorization header"
        if auth.startswith("Bearer "):
            token = auth[len("Bearer "):].strip()
            with self._lock:
                info = self._tokens.get(token)
            if info is None:
                return "bearer", "bearer token not issued by this mock"
            if time.time() >= info["expires_at"]:
                return "bearer", "bearer token expired"
            return "bearer", None
        if not auth.startswith("HMAC-SHA256 "):
            return "other", f"unsupported Authorization scheme {auth.split(' ', 1)[0]!r}"
        m = re.fullmatch(r"SignedHeaders=([^&]*)&Signature=(.*)", auth[len("HMAC-SHA256 "):].strip())
        if not m:
            return "hmac", "malformed HMAC-SHA256 Authorization header"
        if m.group(1).lower() != SIGNED_HEADERS:
            return "hmac", f"SignedHeaders must be {SIGNED_HEADERS}, not {m.group(1)!r}"
        signature = m.group(2)
        date = h.headers.get("x-ms-date")
        if not date:
            return "hmac", "no x-ms-date header"
        when = _parse_rfc1123(date)
        if when is None:
            return "hmac", f"x-ms-date {date!r} is not an RFC 1123 GMT date"
        skew = time.time() - when
        if abs(skew) > self.max_clock_skew:
            return "hmac", f"x-ms-date is {skew:+.0f}s off (allowed +-{self.max_clock_skew:.0f}s)"
        sent_hash = h.headers.get("x-ms-content-sha256")
        if not sent_hash:
            return "hmac", "no x-ms-content-sha256 header"
        real_hash = content_hash(body)
        if not hmac.compare_digest(sent_hash.encode(), real_hash.encode()):
            return "hmac", "x-ms-content-sha256 does not match the body"
        host = h.headers.get("Host")
        if not host:
            return "hmac", "no Host header"
        if host.lower() not in (f"127.0.0.1:{self.port}", f"localhost:{self.port}"):
            return "hmac", f"Host {host!r} is not this endpoint"
        expected = hmac_signature(self.access_key, h.command, h.path, date, host, real_hash)
        if not hmac.compare_digest(expected.encode(), signature.encode()):
            return "hmac", "signature mismatch"
        return "hmac", None

    # ---- POST /emails:send ----------------------------------------------------------------------

    def _api_version(self, rec: RecordedRequest) -> str:
        versions = rec.query.get("api-version")
        if not versions or not versions[0]:
            raise _ApiError(400, "MissingApiVersionParameter",
                            "The api-version query parameter (?api-version=) is required.")
        if len(versions) > 1 or versions[0] not in API_VERSIONS:
            raise _ApiError(400, "UnsupportedApiVersion",
                            f"The api-version '{','.join(versions)}' is not supported; "
                            f"supported: {', '.join(API_VERSIONS)}.")
        rec.api_version = versions[0]
        return versions[0]

    @staticmethod
    def _op_key(operation_id: str) -> str:
        try:
            return str(uuid.UUID(operation_id))
        except ValueError:
            return operation_id

    def _handle_send(self, h: _Handler, rec: RecordedRequest, body: bytes) -> _Reply:
        self._authenticate(h, rec, body)
        api_version = self._api_version(rec)
        ctype = h.headers.get("Content-Type", "")
        if ctype.split(";")[0].strip().lower() != "application/json":
            raise _ApiError(415, "UnsupportedMediaType",
                            f"Content-Type must be application/json, not {ctype!r}.")
        op_header = h.headers.get("Operation-Id")
        if op_header is not None:
            if not _GUID_RE.match(op_header.strip()):
                raise _ApiError(400, "BadRequest", "Operation-Id must be a UUID.", "Operation-Id")
            operation_id = op_header.strip()
        else:
            operation_id = str(uuid.uuid4())
        rec.operation_id = operation_id
        try:
            msg = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise _ApiError(400, "BadRequest", f"The request body is not valid JSON: {exc}.",
                            "emailMessage") from None
        rec.json = msg
        self._validate(msg, api_version)

        key = self._op_key(operation_id)
        location = f"{self.endpoint}/emails/operations/{operation_id}?api-version={api_version}"
        with self._cond:
            op = self._operations.get(key)
            if op is not None:
                rec.duplicate = True
                if not self.reexecute_repeated_operation_id:
                    if self.duplicate_status == 409:
                        return self._error_reply(409, "Conflict", f"An operation with id "
                                                 f"'{operation_id}' already exists.")
                    return _Reply(202, {"id": op["id"], "status": "Running"},
                                  {"Operation-Location": location,
                                   "retry-after": str(self.retry_after)})
                # a service that does not deduplicate: executed again, same operation
                operation_id = op["id"]
                location = (f"{self.endpoint}/emails/operations/{operation_id}"
                            f"?api-version={api_version}")
            else:
                op = self._operations[key] = {"id": operation_id, "status": "Running",
                                              "polls": 0, "error": None, "scripted": False,
                                              "executions": 0}
            op["executions"] += 1
            acc = AcceptedMessage(operation_id=operation_id, api_version=api_version,
                                  message=msg, auth=rec.auth, request=rec,
                                  execution=op["executions"])
            self._accepted.append(acc)
            rec.accepted = True
            seq = len(self._accepted)
            self._cond.notify_all()
        if self.state_dir:
            self._persist(seq, acc)
        return _Reply(202, {"id": operation_id, "status": "Running"},
                      {"Operation-Location": location, "retry-after": str(self.retry_after)})

    def _validate(self, msg: Any, api_version: str) -> None:
        def bad(target: str, text: str) -> _ApiError:
            return _ApiError(400, "BadRequest", text, target)

        def check_keys(obj: dict, allowed: Iterable[str], where: str) -> None:
            for k in obj:
                if k not in allowed:
                    raise bad(f"{where}.{k}" if where else k, f"Unknown property '{k}'.")

        def opt(obj: dict, k: str) -> Any:
            return obj.get(k)

        def check_string(v: Any, target: str, required: bool, non_empty: bool = False) -> None:
            if v is None:
                if required:
                    raise bad(target, f"The {target} field is required.")
                return
            if not isinstance(v, str):
                raise bad(target, f"The {target} field must be a string.")
            if non_empty and not v.strip():
                raise bad(target, f"The {target} field must not be empty.")

        def check_addresses(v: Any, target: str) -> int:
            if v is None:
                return 0
            if not isinstance(v, list):
                raise bad(target, f"The {target} field must be an array.")
            for i, item in enumerate(v):
                t = f"{target}[{i}]"
                if not isinstance(item, dict):
                    raise bad(t, f"{t} must be an object.")
                check_keys(item, ("address", "displayName"), t)
                check_string(item.get("address"), f"{t}.address", True)
                if not _ADDRESS_RE.match(item["address"]):
                    raise bad(f"{t}.address", f"Invalid email address '{item['address']}'.")
                check_string(opt(item, "displayName"), f"{t}.displayName", False)
            return len(v)

        if not isinstance(msg, dict):
            raise bad("emailMessage", "The request body must be a JSON object.")
        check_keys(msg, ("headers", "senderAddress", "content", "recipients", "attachments",
                         "replyTo", "userEngagementTrackingDisabled"), "")

        sender = msg.get("senderAddress")
        check_string(sender, "senderAddress", True)
        if not _ADDRESS_RE.match(sender):
            raise bad("senderAddress", f"Invalid sender address '{sender}'.")

        content = msg.get("content")
        if content is None:
            raise bad("content", "The content field is required.")
        if not isinstance(content, dict):
            raise bad("content", "The content field must be an object.")
        check_keys(content, ("subject", "plainText", "html"), "content")
        check_string(content.get("subject"), "content.subject", True)
        check_string(opt(content, "plainText"), "content.plainText", False)
        check_string(opt(content, "html"), "content.html", False)
        if content.get("plainText") is None and content.get("html") is None:
            raise bad("content", "Either content.plainText or content.html is required.")

        recipients = msg.get("recipients")
        if recipients is None:
            raise bad("recipients", "The recipients field is required.")
        if not isinstance(recipients, dict):
            raise bad("recipients", "The recipients field must be an object.")
        check_keys(recipients, ("to", "cc", "bcc"), "recipients")
        total = sum(check_addresses(recipients.get(k), f"recipients.{k}") for k in ("to", "cc", "bcc"))
        if total == 0:
            raise bad("recipients", "At least one recipient (to, cc or bcc) is required.")
        if total > self.max_recipients:
            raise bad("recipients", f"The total number of recipients ({total}) exceeds the "
                                    f"maximum of {self.max_recipients}.")

        check_addresses(opt(msg, "replyTo"), "replyTo")

        attachments = opt(msg, "attachments")
        if attachments is not None:
            if not isinstance(attachments, list):
                raise bad("attachments", "The attachments field must be an array.")
            allowed = ["name", "contentType", "contentInBase64"]
            if api_version >= "2025-09-01":
                allowed.append("contentId")
            for i, att in enumerate(attachments):
                t = f"attachments[{i}]"
                if not isinstance(att, dict):
                    raise bad(t, f"{t} must be an object.")
                if "contentId" in att and "contentId" not in allowed:
                    raise bad(f"{t}.contentId", f"contentId is not supported in api-version "
                                                f"{api_version} (use 2025-09-01).")
                check_keys(att, allowed, t)
                check_string(att.get("name"), f"{t}.name", True, non_empty=True)
                check_string(att.get("contentType"), f"{t}.contentType", True, non_empty=True)
                check_string(att.get("contentInBase64"), f"{t}.contentInBase64", True)
                try:
                    base64.b64decode(att["contentInBase64"], validate=True)
                except (binascii.Error, ValueError):
                    raise bad(f"{t}.contentInBase64", "contentInBase64 is not valid base64.") from None
                check_string(opt(att, "contentId"), f"{t}.contentId", False, non_empty=True)

        headers = opt(msg, "headers")
        if headers is not None:
            if not isinstance(headers, dict):
                raise bad("headers", "The headers field must be an object.")
            for k, v in headers.items():
                if not k.strip():
                    raise bad("headers", "Header names must not be empty.")
                if not isinstance(v, str):
                    raise bad(f"headers.{k}", f"The value of header '{k}' must be a string.")

        uetd = opt(msg, "userEngagementTrackingDisabled")
        if uetd is not None and not isinstance(uetd, bool):
            raise bad("userEngagementTrackingDisabled",
                      "The userEngagementTrackingDisabled field must be a boolean.")

        local, _, domain = sender.rpartition("@")
        if domain.lower() not in self.verified_domains:
            raise _ApiError(self.unlinked_domain_status, "DomainNotLinked",
                            "The specified sender domain has not been linked.", "senderAddress")
        allowed_users = self.sender_usernames.get(domain.lower())
        if allowed_users is not None and local.lower() not in allowed_users:
            raise _ApiError(400, "InvalidSenderUserName", "Invalid email sender username.",
                            "senderAddress")

    def _persist(self, seq: int, acc: AcceptedMessage) -> None:
        d = os.path.join(self.state_dir, "accepted")
        os.makedirs(d, exist_ok=True)
        path = os.path.join(d, f"{seq:06d}-{acc.operation_id}.json")
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"operation_id": acc.operation_id, "api_version": acc.api_version,
                       "execution": acc.execution,
                       "repeatability_id": acc.request.repeatability_id, "auth": acc.auth, "connection_id": acc.request.connection_id,
                       "received": acc.request.time, "message": acc.message}, f, indent=1)
        os.replace(tmp, path)

    def _write_state(self) -> None:
        path = os.path.join(self.state_dir, "mock-acs.json")
        fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"endpoint": self.endpoint, "ca_file": self.ca_file, "pid": os.getpid(),
                       "connection_string": self.connection_string,
                       "access_key": self.access_key, "token_url": self.token_url,
                       "authority": self.authority, "tenant_id": self.tenant_id,
                       "client_id": self.client_id, "client_secret": self.client_secret,
                       "scope": ACS_SCOPE, "verified_domains": sorted(self.verified_domains)},
                      f, indent=1)
        os.replace(path + ".tmp", path)

    # ---- GET /emails/operations/{id} -------------------------------------------------------------

    def _handle_status(self, h: _Handler, rec: RecordedRequest, operation_id: str) -> _Reply:
        self._authenticate(h, rec, b"")
        self._api_version(rec)
        rec.operation_id = operation_id
        with self._lock:
            op = self._operations.get(self._op_key(operation_id))
            if op is None:
                raise _ApiError(404, "NotFound", f"Operation '{operation_id}' was not found.")
            op["polls"] += 1
            if not op["scripted"] and op["status"] not in TERMINAL_STATUSES \
                    and op["polls"] > self.polls_before_success:
                op["status"] = "Succeeded"
            obj: dict[str, Any] = {"id": op["id"], "status": op["status"]}
            if op["error"]:
                obj["error"] = op["error"]
            headers = {} if op["status"] in TERMINAL_STATUSES else \
                {"retry-after": str(self.retry_after)}
        return _Reply(200, obj, headers)

    # ---- POST /{tenant}/oauth2/v2.0/token ------------------------------------------------------------

    def _entra_error(self, status: int, error: str, code: int, description: str) -> _Reply:
        trace, corr, ts = str(uuid.uuid4()), str(uuid.uuid4()), _utcnow_iso()
        return _Reply(status, {
            "error": error,
            "error_description": f"AADSTS{code}: {description} Trace ID: {trace} "
                                 f"Correlation ID: {corr} Timestamp: {ts}",
            "error_codes": [code], "timestamp": ts, "trace_id": trace, "correlation_id": corr,
            "error_uri": f"{self.endpoint}/error?code={code}"}, error_code=f"{error} AADSTS{code}")

    def _handle_token(self, h: _Handler, rec: RecordedRequest, tenant: str, body: bytes) -> _Reply:
        form: dict[str, str] = {}
        kind: str | None = None
        reply: _Reply | None = None
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
                      kind: str | None) -> _Reply:
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
        if form["scope"] != ACS_SCOPE:
            return self._entra_error(400, "invalid_scope", 70011,
                                     f"The provided request must include a 'scope' input "
                                     f"parameter. The provided value for the input parameter "
                                     f"'scope' is not valid: '{form['scope']}' (expected "
                                     f"'{ACS_SCOPE}').")
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
        claims = {"aud": ACS_RESOURCE, "iss": f"https://sts.windows.net/{tenant}/", "iat": now,
                  "nbf": now, "exp": now + lifetime, "appid": self.client_id, "tid": tenant,
                  "oid": str(uuid.uuid5(uuid.NAMESPACE_URL, self.client_id)),
                  "uti": secrets.token_urlsafe(16)}
        signing_input = _b64url(json.dumps({"typ": "JWT", "alg": "HS256"}).encode()) + "." + \
            _b64url(json.dumps(claims).encode())
        sig = hmac.new(self._token_signing_key, signing_input.encode(), hashlib.sha256).digest()
        token = signing_input + "." + _b64url(sig)
        with self._lock:
            self._tokens[token] = {"expires_at": time.time() + lifetime, "kind": kind}
        return _Reply(200, {"token_type": "Bearer", "expires_in": lifetime,
                            "ext_expires_in": lifetime, "access_token": token})

    def _verify_assertion(self, assertion: str, tenant: str, host: str) -> tuple[int, str] | None:
        parts = assertion.split(".")
        if len(parts) != 3:
            return 50027, "Invalid JWT token. The token is malformed."
        try:
            header = json.loads(_b64url_decode(parts[0]))
            claims = json.loads(_b64url_decode(parts[1]))
            signature = _b64url_decode(parts[2])
        except (ValueError, UnicodeDecodeError):
            return 50027, "Invalid JWT token. The token is not valid base64url JSON."
        if not isinstance(header, dict) or not isinstance(claims, dict):
            return 50027, "Invalid JWT token. Header and claims must be JSON objects."
        if header.get("alg") != "RS256":
            return 5002738, f"Invalid JWT token. Unsupported alg {header.get('alg')!r} (need RS256)."
        with self._lock:
            x5t, x5t_s256, pub = self._cert_x5t, self._cert_x5t_s256, self._pubkey_file
        if x5t is None or pub is None:
            return 700027, "Client assertion contains an invalid signature: no certificate is " \
                           "registered for this application."
        if not (header.get("x5t") == x5t or header.get("x5t#S256") == x5t_s256):
            return 700027, (f"The certificate with identifier used to sign the client assertion "
                            f"is not registered on application. [Reason - The key was not found., "
                            f"Thumbprint of key used by client: '{header.get('x5t')}']")
        if not self._rs256_ok((parts[0] + "." + parts[1]).encode(), signature, pub):
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

    def _rs256_ok(self, data: bytes, signature: bytes, pubkey_file: str) -> bool:
        with tempfile.TemporaryDirectory(prefix="jwt-", dir=self._dir) as d:
            data_path, sig_path = os.path.join(d, "data"), os.path.join(d, "sig")
            with open(data_path, "wb") as f:
                f.write(data)
            with open(sig_path, "wb") as f:
                f.write(signature)
            proc = _run_openssl("dgst", "-sha256", "-verify", pubkey_file, "-signature",
                                sig_path, data_path)
        return proc.returncode == 0 and b"Verified OK" in proc.stdout


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mock_acs.py",
                                 description="Loopback ACS Email + Entra token endpoint double.")
    ap.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0: any free one)")
    ap.add_argument("--access-key", help="base64 access key (default: a random 32-byte key)")
    ap.add_argument("--state-dir", required=True,
                    help="TLS material, mock-acs.json and accepted/*.json go here")
    ap.add_argument("--verified-domain", action="append", default=[],
                    help="sender domain linked to the resource (repeatable; default contoso.test)")
    ap.add_argument("--tenant-id")
    ap.add_argument("--client-id")
    ap.add_argument("--client-secret")
    ap.add_argument("--client-certificate", help="PEM certificate for JWT client assertions")
    ap.add_argument("--token-lifetime", type=int, default=3600)
    ap.add_argument("--max-request-bytes", type=int, default=10 * 1024 * 1024)
    ap.add_argument("--max-clock-skew", type=float, default=300.0)
    ap.add_argument("--retry-after", type=int, default=20)
    ap.add_argument("--reexecute-repeated-operation-id", action="store_true",
                    help="execute a POST whose Operation-Id was already accepted AGAIN (a "
                         "second accepted message), as a service that does not deduplicate")
    ap.add_argument("--repeatability-window", type=float, default=300.0,
                    help="seconds a Repeatability-Request-Id is tracked (documented: 5 minutes)")
    ap.add_argument("--quiet", action="store_true", help="no per-request log on stderr")
    args = ap.parse_args(argv)

    mock = MockAcs(args.access_key, args.verified_domain or ["contoso.test"], port=args.port,
                   state_dir=args.state_dir, tenant_id=args.tenant_id, client_id=args.client_id,
                   client_secret=args.client_secret, client_certificate=args.client_certificate,
                   token_lifetime=args.token_lifetime, max_request_bytes=args.max_request_bytes,
                   max_clock_skew=args.max_clock_skew, retry_after=args.retry_after,
                   reexecute_repeated_operation_id=args.reexecute_repeated_operation_id,
                   repeatability_window=args.repeatability_window, keep=True, echo_log=not args.quiet)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    mock.start()
    print(f"endpoint={mock.endpoint}", flush=True)
    print(f"ca_file={mock.ca_file}", flush=True)
    print(f"token_url={mock.token_url}", flush=True)
    print("ready", flush=True)
    try:
        while not stop.wait(0.2):
            pass
    finally:
        mock.stop()
        print(f"mock-acs: stopped; {len(mock.accepted_messages())} messages accepted",
              file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
