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

The HTTPS server, the Entra token endpoint and the fault machinery are shared with
mock_graph.MockGraph: they live in mock_common.py (class LoopbackMock).

Entra client assertion (JWT): header alg PS256 or RS256 with x5t#S256 = base64url(SHA-256 of
the certificate's DER) or x5t = base64url(SHA-1 of it); claims aud = the token URL, iss = sub =
client_id, exp in the future, nbf (if any) not in the future, jti present; the signature
(RSASSA-PSS with MGF1-SHA-256 and a 32-byte salt, or PKCS#1 v1.5) verified with `openssl dgst
-sha256 -verify` against the configured certificate's public key. Errors are AADSTS-shaped
{"error", "error_description": "AADSTSnnn: ...", "error_codes", "timestamp", "trace_id",
"correlation_id"}; the AADSTS numbers are illustrative.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import collections
import dataclasses
import email.utils
import hashlib
import hmac
import json
import os
import re
import secrets
import signal
import sys
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from mock_common import (  # noqa: F401 (re-exported: `from mock_acs import Fault` still works)
    CLIENT_ASSERTION_TYPE, OPENSSL, ApiError as _ApiError, Fault, LoopbackMock,
    Reply as _Reply, TokenRequest, _Handler, keep_secret)

API_VERSIONS = ("2023-03-31", "2025-09-01")
ACS_SCOPE = "https://communication.azure.com//.default"
ACS_RESOURCE = "https://communication.azure.com"
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


# --------------------------------------------------------------------------------------------
# records
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# the mock
# --------------------------------------------------------------------------------------------

class MockAcs(LoopbackMock):
    """ACS Email + Entra token endpoint double on https://127.0.0.1:PORT (see module doc).

    Settings that may be changed while it runs (plain attributes): max_clock_skew,
    max_request_bytes, max_recipients, retry_after, polls_before_success, duplicate_status,
    reexecute_repeated_operation_id, repeatability_window, clock (a () -> epoch seconds
    callable for the repeatability window), unlinked_domain_status, token_lifetime,
    verified_domains (a set), sender_usernames."""

    name = "mock-acs"
    token_scope = ACS_SCOPE
    token_audience = ACS_RESOURCE
    # PS256 with x5t#S256 is what Microsoft's certificate-credentials page now says;
    # RS256 with x5t is what it said before (both are still accepted by Entra ID).
    assertion_algs = ("PS256", "RS256")
    fault_endpoints = ("send", "status", "token")
    default_fault_endpoint = "send"

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
        keep_secret(self.access_key)
        try:
            if len(base64.b64decode(self.access_key, validate=True)) == 0:
                raise ValueError
        except (binascii.Error, ValueError):
            raise ValueError("access_key must be non-empty base64") from None
        super().__init__(port=port, state_dir=state_dir, max_clock_skew=max_clock_skew,
                         tenant_id=tenant_id, client_id=client_id, client_secret=client_secret,
                         client_certificate=client_certificate, token_lifetime=token_lifetime,
                         idle_timeout=idle_timeout, handshake_timeout=handshake_timeout,
                         keep=keep, echo_log=echo_log)
        self.verified_domains = {d.lower() for d in verified_domains}
        self.sender_usernames = {d.lower(): {u.lower() for u in us}
                                 for d, us in (sender_usernames or {}).items()}
        self.max_request_bytes = max_request_bytes
        self.max_recipients = max_recipients
        self.retry_after = retry_after
        self.polls_before_success = polls_before_success
        self.duplicate_status = duplicate_status
        self.reexecute_repeated_operation_id = reexecute_repeated_operation_id
        self.repeatability_window = repeatability_window
        self.clock: Callable[[], float] = clock or time.time
        self.unlinked_domain_status = unlinked_domain_status

        self._requests: list[RecordedRequest] = []
        self._accepted: list[AcceptedMessage] = []
        self._operations: dict[str, dict[str, Any]] = {}
        self._tracked: dict[str, TrackedRequest] = {}

    # ---- addresses --------------------------------------------------------------------------

    @property
    def connection_string(self) -> str:
        """In the portal's format, trailing slash included:
        "endpoint=https://127.0.0.1:PORT/;accesskey=<base64>"."""
        return f"endpoint={self.endpoint}/;accesskey={self.access_key}"

    def send_url(self, api_version: str = API_VERSIONS[0]) -> str:
        return f"{self.endpoint}/emails:send?api-version={api_version}"

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
        return self._wait_for_done(n, route, timeout)

    def reset(self) -> None:
        """Forget requests, messages, operations, tokens and faults (not the configuration)."""
        with self._lock:
            super().reset()
            self._accepted.clear()
            self._operations.clear()
            self._tracked.clear()

    def diagnostics(self, last: int = 30) -> str:
        with self._lock:
            lines = [f"--- {self!r}: {len(self._requests)} requests, {len(self._accepted)} "
                     f"accepted, {len(self._token_requests)} token requests, "
                     f"{len(self._tls_failures)} TLS failures"]
            lines += ["  " + r.summary() for r in self._requests[-last:]]
            lines += ["  TLS: " + t for t in self._tls_failures[-5:]]
        return "\n".join(lines)

    describe = diagnostics

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
        def process() -> _Reply:
            if route == "send":
                return self._handle_send(h, rec, body)
            if route == "status":
                return self._handle_status(h, rec, params[0])
            return self._handle_token(h, rec, params[0], body)

        self._run_with_fault(h, rec, route, process,
                             remember=lambda reply: self._repeatability_complete(entry, reply))

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
        rec.error_code = reply.error_code
        self._write_response(h, rec, reply.status, headers, payload, close=close)

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
            return "bearer", self._bearer_error(auth[len("Bearer "):].strip())
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
