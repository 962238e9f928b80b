"""A loopback double of the Microsoft Graph mail API (sending MIME as a mailbox) and of the
Microsoft Entra ID client-credentials token endpoint, for a paas-milter Graph route.

Python 3.11 standard library plus the `openssl` CLI. The HTTPS server on 127.0.0.1 (a
throw-away CA: clients verify against `ca_file`), the token endpoint and the scripted faults
are mock_common.LoopbackMock, shared with mock_acs.MockAcs; this module adds the Graph side.

Library use:

    with MockGraph(mailboxes=["printer@contoso.test"]) as mock:
        ... client: token from mock.token_url (scope https://graph.microsoft.com/.default),
            Graph base URL mock.graph_url ("https://127.0.0.1:PORT/v1.0"), trust mock.ca_file ...
        sent = mock.wait_for_sent(1)[0]
        assert sent.mailbox == "printer@contoso.test" and sent.mime == the_message_bytes

Process use (demo, benchmark):

    python3 mock_graph.py --state-dir DIR [--port N] [--mailbox UPN]... [--permission P]...
        [--latency SECONDS] [--sent-items-delay SECONDS]

prints `endpoint=`, `graph_url=`, `ca_file=`, `token_url=` and then `ready` on stdout; every
sent message is written to DIR/sent/NNNNNN.eml (+ .json with its metadata, + .attK files
for attachments uploaded to a draft) and the setup with the secrets to DIR/mock-graph.json
(mode 0600). SIGTERM/SIGINT stop it.

Endpoints (documentation: microsoftgraph/microsoft-graph-docs-contrib, paths below)
---------------------------------------------------------------------------------------
POST /{tenant}/oauth2/v2.0/token
    Entra client credentials (client_secret, or a JWT client assertion with alg RS256 + x5t
    or PS256 + x5t#S256); scope must be exactly https://graph.microsoft.com/.default. The
    access token carries the app's application permissions in "roles" (`permissions`).
    Every Graph call below needs `Authorization: Bearer <token>`, else 401
    InvalidAuthenticationToken (the upload URL excepted).
POST /v1.0/users/{id | userPrincipalName}/sendMail          (api/user-sendmail.md)
    Content-Type text/plain, body = the whole MIME message base64-encoded (line breaks
    allowed). -> 202, empty body. Needs Mail.Send. Invalid base64 -> 400
    ErrorMimeContentInvalidBase64String "Invalid base64 string for MIME content.".
POST /v1.0/users/{m}/messages                                (api/user-post-messages.md)
    Same MIME body: creates a draft -> 201 with a message resource {id, internetMessageId,
    subject, toRecipients, ..., isDraft: true}. Needs Mail.ReadWrite.
POST /v1.0/users/{m}/messages/{id}/attachments               (api/message-post-attachments.md)
    JSON fileAttachment {"@odata.type": "#microsoft.graph.fileAttachment", name,
    contentBytes, contentType?, isInline?, contentId?} -> 201. For files under 3 MB (the
    request itself is limited to 4 MB). Needs Mail.ReadWrite.
POST /v1.0/users/{m}/messages/{id}/attachments/createUploadSession
    (api/attachment-createuploadsession.md, concepts/outlook-large-attachments.md)
    {"AttachmentItem": {"attachmentType": "file", "name", "size", "contentType"?,
    "isInline"?, "contentId"?}} -> 201 {"@odata.context", "uploadUrl",
    "expirationDateTime", "nextExpectedRanges": ["0-"]}. Needs Mail.ReadWrite. A file
    smaller than 3 MB -> 400 ErrorAttachmentSizeShouldNotBeLessThanMinimumSize.
PUT  <uploadUrl>   (exactly as returned: it is pre-authenticated, "Do not customize this URL")
    NO Authorization header ("Do not specify an Authorization request header"): the mock
    answers one with 401. Content-Type application/octet-stream, Content-Length, and
    Content-Range `bytes {start}-{end}/{total}`, in order, at most 4 MB a chunk ("up to
    4 MB each time"). -> 200 {"@odata.context", "ExpirationDateTime", "nextExpectedRanges":
    ["<next byte>"]} (the capital E is the walkthrough's own example) while incomplete;
    201 with a `Location` header (the attachment's URL) and no body on the last byte.
DELETE <uploadUrl> -> 204 (cancels the session).
POST /v1.0/users/{m}/messages/{id}/send                      (api/message-send.md)
    Empty body (Content-Length: 0) -> 202; the draft, with its attachments, is sent and
    saved to Sent Items; the draft id is gone afterwards (404 ErrorItemNotFound).
    Needs Mail.Send.
DELETE /v1.0/users/{m}/messages/{id} -> 204 for a draft.     (api/message-delete.md)
GET  /v1.0/users/{m}/mailFolders/SentItems/messages?$filter=internetMessageId eq '<id@host>'
        &$select=id,internetMessageId                       (api/mailfolder-list-messages.md)
    -> 200 {"@odata.context", "value": [{"@odata.etag", "id", "internetMessageId"}, ...]}:
    every sent message of the mailbox with that Internet Message-ID (a duplicate shows up
    twice) that is already visible (`sent_items_delay`). Needs Mail.ReadBasic.All,
    Mail.Read or Mail.ReadWrite. A quote in the id is doubled (OData: 'it''s'). The mock
    supports only this $filter form (and no $filter: all visible sent messages, no paging).
    The query is decoded like a form: percent-encode a "+" in the id as %2B (else it is a
    blank, and nothing is found).

Contract details and the choices the mock makes (all settable; the worst legal behaviour
where the documentation leaves room):
* Request size: "S/MIME message payloads are currently limited to 4 MB. Submission attempts
  that exceed this limit will result in an HTTP 413 Request Entity Too Large error
  response" (api/user-post-messages.md; the 4 MB request limit applies to sendMail too).
  `max_request_bytes` = 4 MiB of request body (i.e. about 3 MiB of MIME after base64).
  The documentation names no error code for the 413: the mock answers
  "RequestEntityTooLarge" (its own name, as in mock_acs); decide on the status.
* "MIME content malformed, missing ... 400" (concepts/outlook-send-mime-message.md): an
  empty MIME message is 400 ErrorMimeContentInvalid (mock's code name). A message without
  any To/Cc/Bcc recipient cannot be sent: 400 ErrorInvalidRecipients (sendMail; send).
* Mailboxes: `mailboxes` (None: any id or UPN exists) and `allowed_mailboxes` (None: the
  app may use all; else RBAC for Applications / an application access policy scopes it).
  Unknown mailbox -> 404 ErrorInvalidUser; one the app may not use -> 403 ErrorAccessDenied
  "Access is denied. Check credentials and try again." (codes as Graph clients see them;
  the pages above do not list them). `/v1.0/me/...` -> 400 (app-only tokens have no "me").
  A configured mailbox is also reachable by its object id, `mailbox_id(upn)`.
* Permissions come from the token's "roles" (fixed when the token is issued, as in Entra:
  change `permissions`, then `expire_tokens()`); a missing one -> 403 ErrorAccessDenied.
* Internet Message-ID: the MIME's Message-ID header is kept; without one the mock makes
  one up (`<...@MOCK....prod.outlook.com>`), as Exchange does.
* No idempotency key: sending the same MIME again sends it again. The mock records the
  second copy with `duplicate=True` (same mailbox and same Message-ID, or same MIME bytes
  when there is no Message-ID); both copies appear in Sent Items.
* Sent Items: a sent message becomes visible `sent_items_delay` seconds after the 202
  (default 0; float("inf"): never - "202 ... does not indicate that the request processing
  has completed").
* Upload sessions: 3 MB minimum ("ErrorAttachmentSizeShouldNotBeLessThanMinimumSize ...
  smaller than 3 MB", concepts/outlook-large-attachments.md; the status is not documented,
  the mock says 400) read as 3,000,000 bytes (`upload_session_min_bytes`): with 3 MiB a
  file of just under 3 MiB would fit no route, as its POST with contentBytes exceeds 4 MB.
  Chunks: at most `max_chunk_bytes` (4 MiB) -> else 413; bytes strictly in order ("You must
  upload bytes in a file in order"): a chunk that does not start at the next expected byte
  (also a resend of one already received) -> 416 invalidRange. The "multiple of 320 KiB"
  rule is documented for OneDrive/SharePoint upload sessions (driveitem-createuploadsession),
  NOT for Outlook attachments: off by default, `chunk_multiple = 320 * 1024` enforces it
  for every chunk but the last (400 invalidRange). Sessions expire after
  `upload_session_lifetime` s (404 afterwards; `expire_upload_sessions()`).
* send of a draft with an upload session that is not complete: the message goes out
  WITHOUT that attachment (recorded in `SentMessage.incomplete_uploads`): a client must wait
  for every 201 before it sends. The total size (MIME + base64 of the attachments) above
  `max_message_bytes` (Exchange's default 35 MB) -> 400 ErrorMessageSizeExceeded.
* Throttling (concepts/throttling-limits.md, Outlook service limits, per app ID and mailbox
  combination): at most `mailbox_concurrency` = 4 concurrent requests, 10,000 requests per
  10 minutes, 150 MB uploaded (POST, PUT, PATCH bodies) per 5 minutes. Beyond: 429
  {"error": {"code": "ApplicationThrottled", "message": "Application is over its
  MailboxConcurrency limit."}} (not on the page; what Graph clients report, e.g.
  github.com/magodo/terraform-provider-outlook/issues/21), with Retry-After only when
  `throttle_retry_after` is set (worst case, default: none - back off exponentially); the
  rate and upload budgets give the seconds until the window frees. `max_concurrency(m)` is
  the most concurrent requests the mock saw for a mailbox, the refused ones included. Upload
  PUTs count for the draft's mailbox; token requests for none.
* Order of checks: body size (413) -> route (404/405) -> scripted fault -> bearer token
  (401) -> permission (403) -> mailbox (404/403) -> throttling (429) -> `latency` -> the
  endpoint. A throttled request is not processed.

Scripted faults: fail_next()/always() exactly as in mock_acs (see its table "Ambiguous
outcomes"), by endpoint: "sendMail" (default), "createMessage", "addAttachment",
"createUploadSession", "upload", "send", "deleteMessage", "sentItems", "token". E.g.
fail_next(429) (no Retry-After), fail_next(429, retry_after=2), fail_next(503,
retry_after=5), fail_next(500), fail_next(reset=True), fail_next(delay=3),
fail_next(stall=30) (sent, then silence), fail_next(504, accept=True) (sent, then 504: a
resend sends it twice), fail_next(reset=True, accept=True). A fault is applied before
authentication; with accept=True the request is processed normally first (all checks).
After `send` was accepted, a resend of the same draft gets 404 ErrorItemNotFound (it is in
Sent Items now): look it up there.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import collections
import dataclasses
import datetime
import email
import email.errors
import email.header
import email.message
import email.policy
import email.utils
import hashlib
import json
import math
import os
import re
import secrets
import signal
import sys
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterable
from typing import Any

from mock_common import ApiError, Fault, LoopbackMock, Reply, _Handler

GRAPH_SCOPE = "https://graph.microsoft.com/.default"
GRAPH_RESOURCE = "https://graph.microsoft.com"
GRAPH_APP_ID = "00000003-0000-0000-c000-000000000000"   # Microsoft Graph's own app id

DEFAULT_PERMISSIONS = ("Mail.Send", "Mail.ReadWrite")
# application permissions of api/mailfolder-list-messages.md
READ_PERMISSIONS = frozenset({"Mail.ReadBasic.All", "Mail.Read", "Mail.ReadWrite"})
# the application permissions each route needs (any one of them)
REQUIRED_PERMISSIONS = {
    "sendMail": frozenset({"Mail.Send"}),
    "send": frozenset({"Mail.Send"}),
    "createMessage": frozenset({"Mail.ReadWrite"}),
    "addAttachment": frozenset({"Mail.ReadWrite"}),
    "createUploadSession": frozenset({"Mail.ReadWrite"}),
    "deleteMessage": frozenset({"Mail.ReadWrite"}),
    "sentItems": READ_PERMISSIONS,
}
ROUTES = ("sendMail", "createMessage", "addAttachment", "createUploadSession", "upload",
          "send", "deleteMessage", "sentItems", "token")
MAILBOX_ROUTES = frozenset(REQUIRED_PERMISSIONS)

MiB = 1024 * 1024

# /v1.0/users/{m}/<rest>: rest -> (route, allowed methods); {id} segments are captured
_USER_ROUTES = [
    (re.compile(r"^sendMail$"), "sendMail", ("POST",)),
    (re.compile(r"^messages$"), "createMessage", ("POST",)),
    (re.compile(r"^messages/([^/]+)$"), "deleteMessage", ("DELETE",)),
    (re.compile(r"^messages/([^/]+)/attachments$"), "addAttachment", ("POST",)),
    (re.compile(r"^messages/([^/]+)/attachments/createUploadSession$"), "createUploadSession",
     ("POST",)),
    (re.compile(r"^messages/([^/]+)/send$"), "send", ("POST",)),
    (re.compile(r"^mailFolders/([^/]+)/messages$"), "sentItems", ("GET",)),
]
_USERS_RE = re.compile(r"^/v1\.0/users/([^/]+)/(.+)$")
_TOKEN_PATH_RE = re.compile(r"^/([^/?]+)/oauth2/v2\.0/token$")
_UPLOAD_PATH_RE = re.compile(r"^/api/v2\.0/Users\('([^']*)'\)/Messages\('([^']*)'\)/"
                             r"AttachmentSessions\('([^']*)'\)$")
_CONTENT_RANGE_RE = re.compile(r"^bytes (\d+)-(\d+)/(\d+)$")
_FILTER_RE = re.compile(r"^\s*internetMessageId\s+eq\s+'((?:[^']|'')*)'\s*$", re.I)
_SELECTABLE = ("id", "internetMessageId", "subject", "sentDateTime", "createdDateTime",
               "hasAttachments", "isDraft", "from", "toRecipients", "ccRecipients",
               "bccRecipients")

# default error codes of scripted faults (illustrative: decide on the status)
_FAULT_CODES = {
    400: ("BadRequest", "Invalid request."),
    401: ("InvalidAuthenticationToken", "Access token validation failure."),
    403: ("ErrorAccessDenied", "Access is denied. Check credentials and try again."),
    404: ("ErrorItemNotFound", "The specified object was not found in the store."),
    409: ("ErrorIrresolvableConflict", "The send or update operation could not be performed "
                                       "because the change key passed in the request does "
                                       "not match the current change key for the item."),
    413: ("RequestEntityTooLarge", "The request body is too large."),
    429: ("ApplicationThrottled", "Application is over its MailboxConcurrency limit."),
    500: ("UnknownError", ""),
    502: ("BadGateway", "Bad gateway."),
    503: ("ServiceUnavailable", "The service is temporarily unavailable."),
    504: ("GatewayTimeout", "Gateway timeout."),
}
_INVALID_BASE64 = ("ErrorMimeContentInvalidBase64String", "Invalid base64 string for MIME content.")
_THROTTLED = "ApplicationThrottled"


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

def _new_id() -> str:
    """An opaque id in the style of Exchange item ids ("AAMk...="): base64url, 56 chars,
    ending in "=" - so a client that re-encodes ids in URLs is noticed."""
    return base64.urlsafe_b64encode(b"\x00\x03" + secrets.token_bytes(39)).decode()


def _iso(t: float, fraction: bool = False) -> str:
    dt = datetime.datetime.fromtimestamp(t, datetime.timezone.utc)
    if fraction:   # "2019-09-25T01:09:30.7671707Z", as in the uploadSession examples
        return dt.strftime("%Y-%m-%dT%H:%M:%S.%f") + "0Z"
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


def decode_mime_body(body: bytes) -> bytes:
    """The MIME message in a text/plain request body: base64 with any line breaks/blanks,
    strictly padded (like .NET's Convert.FromBase64String). ValueError if it is not."""
    text = re.sub(rb"[ \t\r\n]", b"", body)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("invalid base64") from None


@dataclasses.dataclass
class ParsedMime:
    """What the mock reads from a MIME message (email package, compat32 policy)."""
    subject: str
    sender: tuple[str, str] | None          # From: (display name, address)
    to: list[tuple[str, str]]
    cc: list[tuple[str, str]]
    bcc: list[tuple[str, str]]
    message_id: str | None                  # the Message-ID header, stripped

    @classmethod
    def parse(cls, mime: bytes) -> "ParsedMime":
        msg = email.message_from_bytes(mime, policy=email.policy.compat32)

        def raw(name: str) -> list[str]:
            # the values unfolded, raw 8-bit bytes (surrogate escapes) read as UTF-8
            return [re.sub(r"\r?\n(?=[ \t])", "", str(v)).encode(
                        "utf-8", "surrogateescape").decode("utf-8", "replace")
                    for k, v in msg.raw_items() if k.lower() == name.lower()]

        def addresses(name: str) -> list[tuple[str, str]]:
            return [(n, a) for n, a in email.utils.getaddresses(raw(name)) if a]

        def text(name: str) -> str:
            values = raw(name)
            if not values:
                return ""
            try:
                return str(email.header.make_header(email.header.decode_header(values[0])))
            except (ValueError, LookupError, email.errors.HeaderParseError):
                return values[0]

        senders = addresses("From")
        message_id = next(iter(raw("Message-ID")), "").strip() or None
        return cls(subject=text("Subject"), sender=senders[0] if senders else None,
                   to=addresses("To"), cc=addresses("Cc"), bcc=addresses("Bcc"),
                   message_id=message_id)

    @property
    def recipients(self) -> list[str]:
        return [a for _, a in self.to + self.cc + self.bcc]


# --------------------------------------------------------------------------------------------
# records
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class GraphRequest:
    seq: int
    time: float
    method: str
    target: str                 # request-target exactly as received (path + "?" + query)
    path: str
    query: dict[str, list[str]]
    route: str                  # one of ROUTES, "me" or "unknown"
    headers: dict[str, str]     # lower-case names (last value wins)
    body: bytes
    connection_id: int
    client_port: int
    mailbox: str | None = None  # canonical (lower-case UPN, or the id as given)
    message_id: str | None = None   # the draft's id in the path
    auth: str = "none"          # "bearer" | "none" | "other" | "upload-url"; token: "secret"/"assertion"
    auth_ok: bool | None = None
    auth_error: str | None = None
    token_kind: str | None = None   # the credential behind the bearer token: "secret"/"assertion"
    status: int | None = None   # None: no answer (connection reset / dropped)
    error_code: str | None = None
    fault: Fault | None = None
    concurrency: int = 0        # requests in flight for the mailbox when it arrived (itself included)
    throttled: bool = False     # refused by the mock's own throttling (429)
    sent: bool = False          # this request sent a message
    duplicate: bool = False     # ... that had been sent before
    slot: str | None = dataclasses.field(default=None, repr=False)  # mailbox whose
                                # concurrency slot it holds until its answer is written

    def summary(self) -> str:
        bits = [f"#{self.seq} conn={self.connection_id}:{self.client_port}",
                f"{self.method} {self.target[:120]}", f"-> {self.status}"]
        if self.error_code:
            bits.append(self.error_code)
        if self.auth_error:
            bits.append(f"auth={self.auth}:{self.auth_error}")
        if self.mailbox:
            bits.append(f"mailbox={self.mailbox}(x{self.concurrency})")
        if self.sent:
            bits.append("SENT" + (" duplicate" if self.duplicate else ""))
        if self.fault:
            bits.append(f"fault={self.fault}")
        return " ".join(bits)


@dataclasses.dataclass
class Attachment:
    """A file attached to a draft (upload session or POST .../attachments)."""
    id: str
    name: str
    content_type: str
    size: int
    data: bytes
    is_inline: bool = False
    content_id: str | None = None
    via: str = "uploadSession"  # "uploadSession" | "post"


@dataclasses.dataclass
class UploadSession:
    id: str
    mailbox: str
    message_id: str
    authtoken: str
    url: str                    # the uploadUrl handed out
    name: str
    size: int
    content_type: str
    is_inline: bool
    content_id: str | None
    expires_at: float
    received: bytearray = dataclasses.field(default_factory=bytearray, repr=False)
    state: str = "open"         # "open" | "complete" | "cancelled"
    chunks: int = 0

    @property
    def next_expected(self) -> int:
        return len(self.received)


@dataclasses.dataclass
class Draft:
    id: str
    mailbox: str
    mime: bytes = dataclasses.field(repr=False)
    parsed: ParsedMime
    internet_message_id: str
    created: float
    attachments: list[Attachment] = dataclasses.field(default_factory=list)
    sessions: list[UploadSession] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class SentMessage:
    seq: int                    # 1, 2, ... in the order the mock sent them
    mailbox: str
    mime: bytes = dataclasses.field(repr=False)   # the decoded MIME bytes, exactly as received
    via: str                    # "sendMail" | "draft"
    internet_message_id: str
    subject: str
    to: list[str]
    cc: list[str]
    bcc: list[str]
    auth: str | None            # credential behind the bearer token: "secret" | "assertion"
    request: GraphRequest = dataclasses.field(repr=False)
    time: float
    visible_at: float           # when it shows up in Sent Items
    item_id: str                # its id in Sent Items
    draft_id: str | None = None
    attachments: list[Attachment] = dataclasses.field(default_factory=list)
    incomplete_uploads: list[str] = dataclasses.field(default_factory=list)  # names left out
    duplicate: bool = False     # this mailbox had sent this message (same id/bytes) before

    @property
    def recipients(self) -> list[str]:
        """to + cc + bcc addresses, in that order."""
        return self.to + self.cc + self.bcc

    def message(self) -> email.message.Message:
        return email.message_from_bytes(self.mime, policy=email.policy.default)


class GraphError(ApiError):
    """An error answer of a Graph endpoint: {"error": {"code", "message", "innerError"}}."""

    def __init__(self, status: int, code: str, message: str,
                 headers: dict[str, str] | None = None):
        super().__init__(status, code, message)
        self.headers = dict(headers or {})


# --------------------------------------------------------------------------------------------
# the mock
# --------------------------------------------------------------------------------------------

class MockGraph(LoopbackMock):
    """Microsoft Graph mail + Entra token endpoint double on https://127.0.0.1:PORT (see
    module doc). Settings that may be changed while it runs (plain attributes): mailboxes,
    allowed_mailboxes (sets of lower-case UPNs, or None), permissions (for tokens issued
    afterwards), max_request_bytes, max_chunk_bytes, chunk_multiple,
    upload_session_min_bytes, max_message_bytes, upload_session_lifetime,
    reject_upload_authorization, mailbox_concurrency, throttle_retry_after,
    mailbox_request_limit, request_window, mailbox_upload_limit, upload_window, latency,
    sent_items_delay, token_lifetime, max_clock_skew."""

    name = "mock-graph"
    token_scope = GRAPH_SCOPE
    token_audience = GRAPH_RESOURCE
    assertion_algs = ("RS256", "PS256")
    fault_endpoints = ROUTES
    default_fault_endpoint = "sendMail"

    def __init__(self, mailboxes: Iterable[str] | None = None, *,
                 allowed_mailboxes: Iterable[str] | None = None,
                 permissions: Iterable[str] = DEFAULT_PERMISSIONS,
                 port: int = 0,
                 state_dir: str | None = None,
                 max_request_bytes: int = 4 * MiB,
                 max_chunk_bytes: int = 4 * MiB,
                 chunk_multiple: int | None = None,
                 upload_session_min_bytes: int = 3_000_000,
                 max_message_bytes: int = 35 * MiB,
                 upload_session_lifetime: float = 900.0,
                 reject_upload_authorization: bool = True,
                 mailbox_concurrency: int = 4,
                 throttle_retry_after: float | None = None,
                 mailbox_request_limit: int = 10_000,
                 request_window: float = 600.0,
                 mailbox_upload_limit: int = 150 * MiB,
                 upload_window: float = 300.0,
                 latency: float = 0.0,
                 sent_items_delay: float = 0.0,
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
        super().__init__(port=port, state_dir=state_dir, max_clock_skew=max_clock_skew,
                         tenant_id=tenant_id, client_id=client_id, client_secret=client_secret,
                         client_certificate=client_certificate, token_lifetime=token_lifetime,
                         idle_timeout=idle_timeout, handshake_timeout=handshake_timeout,
                         keep=keep, echo_log=echo_log)
        self.mailboxes = {m.lower() for m in mailboxes} if mailboxes is not None else None
        self.allowed_mailboxes = ({m.lower() for m in allowed_mailboxes}
                                  if allowed_mailboxes is not None else None)
        self.permissions = set(permissions)
        self.max_request_bytes = max_request_bytes
        self.max_chunk_bytes = max_chunk_bytes
        self.chunk_multiple = chunk_multiple
        self.upload_session_min_bytes = upload_session_min_bytes
        self.max_message_bytes = max_message_bytes
        self.upload_session_lifetime = upload_session_lifetime
        self.reject_upload_authorization = reject_upload_authorization
        self.mailbox_concurrency = mailbox_concurrency
        self.throttle_retry_after = throttle_retry_after
        self.mailbox_request_limit = mailbox_request_limit
        self.request_window = request_window
        self.mailbox_upload_limit = mailbox_upload_limit
        self.upload_window = upload_window
        self.latency = latency
        self.sent_items_delay = sent_items_delay

        self._requests: list[GraphRequest] = []
        self._sent: list[SentMessage] = []
        self._drafts: dict[str, Draft] = {}
        self._sessions: dict[str, UploadSession] = {}
        self._in_flight: collections.Counter[str] = collections.Counter()
        self._peak: dict[str, int] = {}
        self._request_times: dict[str, collections.deque[float]] = collections.defaultdict(
            collections.deque)
        self._upload_bytes: dict[str, collections.deque[tuple[float, int]]] = \
            collections.defaultdict(collections.deque)

    # ---- addresses --------------------------------------------------------------------------

    @property
    def graph_url(self) -> str:
        """The Graph base URL, "https://127.0.0.1:PORT/v1.0" (no trailing slash)."""
        return f"{self.endpoint}/v1.0"

    def send_mail_url(self, mailbox: str) -> str:
        return f"{self.graph_url}/users/{urllib.parse.quote(mailbox, safe='@')}/sendMail"

    @staticmethod
    def mailbox_id(upn: str) -> str:
        """The (made-up, stable) object id under which a configured mailbox is also known."""
        return str(uuid.uuid5(uuid.NAMESPACE_URL, "mock-graph:" + upn.lower()))

    # ---- inspection ---------------------------------------------------------------------------

    def requests(self, route: str | None = None) -> list[GraphRequest]:
        with self._lock:
            return [r for r in self._requests if route is None or r.route == route]

    def wait_for_requests(self, n: int, route: str | None = "sendMail",
                          timeout: float = 10.0) -> list[GraphRequest]:
        """The first N completed requests to ROUTE (answered, reset or dropped)."""
        return self._wait_for_done(n, route, timeout)

    def sent(self) -> list[SentMessage]:
        """Every message sent, in order (duplicates included)."""
        with self._lock:
            return list(self._sent)

    def wait_for_sent(self, n: int, timeout: float = 10.0) -> list[SentMessage]:
        """The first N sent messages, waiting up to TIMEOUT s; AssertionError otherwise."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._sent) >= n, timeout):
                raise AssertionError(f"{len(self._sent)} of {n} messages sent within "
                                     f"{timeout}s\n{self.diagnostics()}")
            return list(self._sent[:n])

    def duplicates(self) -> list[SentMessage]:
        """The sent messages that repeat one sent before from the same mailbox."""
        return [s for s in self.sent() if s.duplicate]

    def recipient_counts(self, *, fold_case: bool = False) -> dict[str, int]:
        """address -> how many sent messages (duplicates included) named it in to + cc +
        bcc. "Every recipient exactly once" is set(counts.values()) == {1}."""
        counts: collections.Counter[str] = collections.Counter()
        for s in self.sent():
            for address in s.recipients:
                counts[address.lower() if fold_case else address] += 1
        return dict(counts)

    def duplicate_recipients(self, *, fold_case: bool = False) -> dict[str, int]:
        return {a: n for a, n in self.recipient_counts(fold_case=fold_case).items() if n > 1}

    def drafts(self) -> list[Draft]:
        """Drafts that exist now (created, not yet sent or deleted)."""
        with self._lock:
            return list(self._drafts.values())

    def max_concurrency(self, mailbox: str | None = None) -> int:
        """The most requests the mock saw in flight at once for MAILBOX (refused ones
        included; None: the highest over all mailboxes)."""
        with self._lock:
            if mailbox is None:
                return max(self._peak.values(), default=0)
            return self._peak.get(self._canonical(mailbox), 0)

    def concurrency_peaks(self) -> dict[str, int]:
        with self._lock:
            return dict(self._peak)

    def expire_upload_sessions(self) -> None:
        with self._lock:
            for s in self._sessions.values():
                s.expires_at = time.time() - 1

    def reset(self) -> None:
        """Forget requests, sent messages, drafts, sessions, throttling state, tokens and
        faults (not the configuration)."""
        with self._lock:
            super().reset()
            self._sent.clear()
            self._drafts.clear()
            self._sessions.clear()
            self._peak.clear()
            self._request_times.clear()
            self._upload_bytes.clear()
            # requests still in flight release their slots themselves

    def diagnostics(self, last: int = 30) -> str:
        with self._lock:
            lines = [f"--- {self!r}: {len(self._requests)} requests, {len(self._sent)} sent "
                     f"({sum(s.duplicate for s in self._sent)} duplicates), "
                     f"{len(self._drafts)} drafts, {len(self._token_requests)} token requests, "
                     f"{len(self._tls_failures)} TLS failures, peak concurrency {self._peak}"]
            lines += ["  " + r.summary() for r in self._requests[-last:]]
            lines += ["  TLS: " + t for t in self._tls_failures[-5:]]
        return "\n".join(lines)

    describe = diagnostics

    # ---- routing and the request life cycle ----------------------------------------------------

    def _route(self, method: str, path: str) -> tuple[str, list[str], tuple[str, ...]]:
        """(route, path params - mailbox and ids percent-decoded, allowed methods)."""
        m = _TOKEN_PATH_RE.match(path)
        if m:
            return "token", [urllib.parse.unquote(m.group(1))], ("POST",)
        m = _UPLOAD_PATH_RE.match(path)
        if m:
            return "upload", list(m.groups()), ("PUT", "DELETE")
        if path == "/v1.0/me" or path.startswith("/v1.0/me/"):
            return "me", [], ("GET", "POST", "PUT", "PATCH", "DELETE")
        m = _USERS_RE.match(path)
        if m:
            for regex, route, methods in _USER_ROUTES:
                r = regex.match(m.group(2))
                if r:
                    params = [m.group(1), *r.groups()]
                    return route, [urllib.parse.unquote(p) for p in params], methods
        return "unknown", [], ()

    def _body_limit(self, route: str) -> int:
        if route == "upload":
            return self.max_chunk_bytes
        return self.max_request_bytes if route != "token" else 1 << 20

    def _new_record(self, h: _Handler, route: str, body: bytes) -> GraphRequest:
        path, _, query = h.path.partition("?")
        with self._lock:
            rec = GraphRequest(
                seq=len(self._requests) + 1, time=time.time(), method=h.command, target=h.path,
                path=path, query=urllib.parse.parse_qs(query, keep_blank_values=True),
                route=route, headers={k.lower(): v for k, v in h.headers.items()}, body=body,
                connection_id=getattr(h, "conn_id", 0), client_port=h.client_address[1])
            self._requests.append(rec)
        return rec

    def _reject_early(self, h: _Handler) -> bool:
        """On `Expect: 100-continue`: refuse a too-large body before it is sent."""
        route, _, _ = self._route(h.command, h.path.partition("?")[0])
        cl = h.headers.get("Content-Length", "")
        if route in ("token", "me", "unknown") or not cl.isdigit() \
                or int(cl) <= self._body_limit(route):
            return False
        rec = self._new_record(h, route, b"")
        h.close_connection = True
        self._send(h, rec, self._too_large(int(cl), self._body_limit(route)), close=True)
        return True

    def _too_large(self, size: int | None, limit: int) -> Reply:
        what = f"({size} bytes) " if size is not None else ""
        return self._error_reply(413, "RequestEntityTooLarge",
                                 f"The request body {what}exceeds the limit of {limit} bytes.")

    def _dispatch(self, h: _Handler) -> None:
        path = h.path.partition("?")[0]
        route, params, methods = self._route(h.command, path)
        body, bad = self._read_body(h, self._body_limit(route))
        rec = self._new_record(h, route, body or b"")
        if bad is not None:
            if route == "token":
                reply = self._entra_error(400, "invalid_request", 900144,
                                          "The request body could not be read.")
            elif bad == 413:
                reply = self._too_large(None, self._body_limit(route))
            elif bad == 411:
                reply = self._error_reply(411, "LengthRequired",
                                          "A Content-Length header is required.")
            else:
                reply = self._error_reply(400, "BadRequest", "The request body could not be read.")
            self._send(h, rec, reply)
            return
        if route == "unknown":
            status = 400 if path.startswith("/v1.0/") else 404
            self._send(h, rec, self._error_reply(status, "BadRequest" if status == 400 else
                                                 "NotFound", f"Resource not found for the "
                                                 f"segment '{path.rsplit('/', 1)[-1]}'."))
            return
        if h.command not in methods:
            reply = self._error_reply(405, "MethodNotAllowed",
                                      f"{h.command} is not allowed on {path}.")
            reply.headers["Allow"] = ", ".join(methods)
            self._send(h, rec, reply)
            return
        try:
            self._run_with_fault(h, rec, route,
                                 lambda: self._process(h, rec, route, params, body))
        finally:
            self._release(rec)

    def _process(self, h: _Handler, rec: GraphRequest, route: str, params: list[str],
                 body: bytes) -> Reply:
        """The checks in the documented order, then the endpoint (see "Order of checks")."""
        try:
            if route == "token":
                return self._handle_token(h, rec, params[0], body)
            if route == "me":
                raise GraphError(400, "BadRequest", "/me request is only valid with delegated "
                                                    "authentication flow.")
            if route == "upload":
                return self._handle_upload(h, rec, params, body)
            roles = self._authenticate(h, rec)
            if not roles & REQUIRED_PERMISSIONS[route]:
                raise GraphError(403, "ErrorAccessDenied", "Access is denied. Check credentials "
                                 f"and try again. (mock: {route} needs one of "
                                 f"{sorted(REQUIRED_PERMISSIONS[route])})")
            mailbox = self._resolve_mailbox(params[0])
            rec.mailbox = mailbox
            rec.message_id = params[1] if len(params) > 1 else None
            self._admit(rec, mailbox, body)
            if self.latency > 0:
                self._stopping.wait(self.latency)
            handler = {"sendMail": self._handle_send_mail,
                       "createMessage": self._handle_create_message,
                       "addAttachment": self._handle_add_attachment,
                       "createUploadSession": self._handle_create_upload_session,
                       "send": self._handle_send,
                       "deleteMessage": self._handle_delete_message,
                       "sentItems": self._handle_sent_items}[route]
            return handler(h, rec, mailbox, params[1:], body)
        except GraphError as err:
            reply = self._error_reply(err.status, err.code, err.message)
            reply.headers.update(err.headers)
            return reply

    # ---- authentication, mailboxes, throttling ---------------------------------------------------

    def _authenticate(self, h: _Handler, rec: GraphRequest) -> set[str]:
        """The roles of a valid bearer token; GraphError 401 otherwise."""
        auth = h.headers.get("Authorization")
        if not auth:
            rec.auth, error, message = "none", "no Authorization header", "Access token is empty."
        elif not auth.startswith("Bearer "):
            rec.auth = "other"
            error = f"unsupported Authorization scheme {auth.split(' ', 1)[0]!r}"
            message = "Access token validation failure."
        else:
            rec.auth = "bearer"
            token = auth[len("Bearer "):].strip()
            error = self._bearer_error(token)
            if error is None:
                info = self._token_info(token) or {}
                rec.auth_ok, rec.token_kind = True, info.get("kind")
                return set(info.get("roles") or ())
            message = ("Lifetime validation failed, the token is expired." if "expired" in error
                       else "Access token validation failure. Invalid audience.")
        rec.auth_ok, rec.auth_error = False, error
        raise GraphError(401, "InvalidAuthenticationToken", message, {
            "WWW-Authenticate": 'Bearer realm="", authorization_uri="https://login.'
                                'microsoftonline.com/common/oauth2/authorize", '
                                f'client_id="{GRAPH_APP_ID}"'})

    def _extra_token_claims(self) -> dict[str, Any]:
        return {"roles": sorted(self.permissions)}

    def _canonical(self, mailbox: str) -> str:
        """A configured mailbox's lower-case UPN for its UPN or object id; else as given."""
        key = mailbox.strip().lower()
        if self.mailboxes is not None and key not in self.mailboxes:
            for upn in self.mailboxes:
                if self.mailbox_id(upn) == key:
                    return upn
        return key

    def _resolve_mailbox(self, mailbox: str) -> str:
        canonical = self._canonical(mailbox)
        if not canonical or (self.mailboxes is not None and canonical not in self.mailboxes):
            raise GraphError(404, "ErrorInvalidUser", f"The requested user '{mailbox}' is invalid.")
        if self.allowed_mailboxes is not None and canonical not in self.allowed_mailboxes:
            raise GraphError(403, "ErrorAccessDenied",
                             "Access is denied. Check credentials and try again.")
        return canonical

    def _admit(self, rec: GraphRequest, mailbox: str, body: bytes) -> None:
        """Per app and mailbox: 4 concurrent requests, 10,000 requests per 10 minutes, 150 MB
        of upload per 5 minutes (concepts/throttling-limits.md). GraphError 429 beyond; an
        admitted request holds its concurrency slot until its answer is written."""
        now = time.monotonic()
        uploaded = len(body) if rec.method in ("POST", "PUT", "PATCH") else 0
        with self._lock:
            concurrent = self._in_flight[mailbox] + 1
            rec.concurrency = concurrent
            self._peak[mailbox] = max(self._peak.get(mailbox, 0), concurrent)
            times, uploads = self._request_times[mailbox], self._upload_bytes[mailbox]
            while times and times[0] <= now - self.request_window:
                times.popleft()
            while uploads and uploads[0][0] <= now - self.upload_window:
                uploads.popleft()
            if concurrent > self.mailbox_concurrency:
                self._throttle(rec, "MailboxConcurrency", self.throttle_retry_after)
            if len(times) >= self.mailbox_request_limit:
                self._throttle(rec, "requests per 10 minutes",
                               times[0] + self.request_window - now)
            if uploads and sum(n for _, n in uploads) + uploaded > self.mailbox_upload_limit:
                self._throttle(rec, "IncomingBytes", uploads[0][0] + self.upload_window - now)
            self._in_flight[mailbox] += 1
            rec.slot = mailbox
            times.append(now)
            if uploaded:
                uploads.append((now, uploaded))

    def _throttle(self, rec: GraphRequest, limit: str, retry_after: float | None) -> None:
        rec.throttled = True
        headers = {} if retry_after is None else {"Retry-After": str(max(1, math.ceil(retry_after)))}
        raise GraphError(429, _THROTTLED, f"Application is over its {limit} limit.", headers)

    def _release(self, rec: GraphRequest) -> None:
        with self._lock:
            if rec.slot is not None:
                self._in_flight[rec.slot] -= 1
                if self._in_flight[rec.slot] <= 0:
                    del self._in_flight[rec.slot]
                rec.slot = None

    # ---- MIME -------------------------------------------------------------------------------------

    def _mime_from_body(self, h: _Handler, body: bytes) -> tuple[bytes, ParsedMime]:
        ctype = h.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if ctype != "text/plain":
            raise GraphError(415, "UnsupportedMediaType",
                             f"Content-Type {ctype!r}: mock-graph implements only the MIME form "
                             f"(text/plain, base64), not the JSON one.")
        try:
            mime = decode_mime_body(body)
        except ValueError:
            raise GraphError(400, *_INVALID_BASE64) from None
        if not mime.strip():
            raise GraphError(400, "ErrorMimeContentInvalid", "MIME content does not contain all "
                             "required information, malformed formatting, or empty.")
        return mime, ParsedMime.parse(mime)

    def _new_internet_message_id(self) -> str:
        return f"<{secrets.token_hex(12).upper()}@MOCK{self.port:05d}.namprd00.prod.outlook.com>"

    def _record_sent(self, rec: GraphRequest, mailbox: str, mime: bytes, parsed: ParsedMime,
                     via: str, draft: Draft | None = None,
                     incomplete: list[str] | None = None) -> SentMessage:
        """Send: the message is out (and, after sent_items_delay, in Sent Items)."""
        now = time.time()
        internet_id = (draft.internet_message_id if draft else
                       parsed.message_id or self._new_internet_message_id())
        with self._cond:
            duplicate = any(s.mailbox == mailbox and (
                (parsed.message_id is not None and s.internet_message_id == internet_id)
                or s.mime == mime) for s in self._sent)
            sent = SentMessage(
                seq=len(self._sent) + 1, mailbox=mailbox, mime=mime, via=via,
                internet_message_id=internet_id, subject=parsed.subject,
                to=[a for _, a in parsed.to], cc=[a for _, a in parsed.cc],
                bcc=[a for _, a in parsed.bcc], auth=rec.token_kind, request=rec, time=now,
                visible_at=now + self.sent_items_delay, item_id=_new_id(),
                draft_id=draft.id if draft else None,
                attachments=list(draft.attachments) if draft else [],
                incomplete_uploads=list(incomplete or []), duplicate=duplicate)
            self._sent.append(sent)
            rec.sent, rec.duplicate = True, duplicate
            self._cond.notify_all()
        if self.state_dir:
            self._persist(sent)
        return sent

    # ---- POST /users/{m}/sendMail ------------------------------------------------------------------

    def _handle_send_mail(self, h: _Handler, rec: GraphRequest, mailbox: str, ids: list[str],
                          body: bytes) -> Reply:
        mime, parsed = self._mime_from_body(h, body)
        if not parsed.recipients:
            raise GraphError(400, "ErrorInvalidRecipients",
                             "At least one recipient is required, but none were found.")
        self._record_sent(rec, mailbox, mime, parsed, "sendMail")
        return Reply(202)

    # ---- drafts: POST /users/{m}/messages, .../attachments, DELETE, .../send ----------------------

    def _draft(self, mailbox: str, message_id: str) -> Draft:
        with self._lock:
            draft = self._drafts.get(message_id)
        if draft is None or draft.mailbox != mailbox:
            raise GraphError(404, "ErrorItemNotFound",
                             "The specified object was not found in the store.")
        return draft

    def _message_json(self, mailbox: str, item_id: str, internet_id: str, parsed: ParsedMime,
                      created: float, draft: bool, has_attachments: bool) -> dict[str, Any]:
        def address(pair: tuple[str, str] | None) -> dict[str, Any] | None:
            return {"emailAddress": {"name": pair[0] or pair[1], "address": pair[1]}} \
                if pair else None
        sender = address(parsed.sender or ("", mailbox))
        return {
            "@odata.etag": f'W/"{base64.b64encode(hashlib.sha1(item_id.encode()).digest()).decode()}"',
            "id": item_id, "createdDateTime": _iso(created), "lastModifiedDateTime": _iso(created),
            "sentDateTime": _iso(created), "hasAttachments": has_attachments,
            "internetMessageId": internet_id, "subject": parsed.subject, "isDraft": draft,
            "from": sender, "sender": sender,
            "toRecipients": [address(p) for p in parsed.to],
            "ccRecipients": [address(p) for p in parsed.cc],
            "bccRecipients": [address(p) for p in parsed.bcc]}

    def _handle_create_message(self, h: _Handler, rec: GraphRequest, mailbox: str,
                               ids: list[str], body: bytes) -> Reply:
        mime, parsed = self._mime_from_body(h, body)
        draft = Draft(id=_new_id(), mailbox=mailbox, mime=mime, parsed=parsed,
                      internet_message_id=parsed.message_id or self._new_internet_message_id(),
                      created=time.time())
        with self._lock:
            self._drafts[draft.id] = draft
        rec.message_id = draft.id
        obj = {"@odata.context": f"{self.graph_url}/$metadata#users('{mailbox}')/messages/$entity",
               **self._message_json(mailbox, draft.id, draft.internet_message_id, parsed,
                                    draft.created, True, False)}
        return Reply(201, obj)

    def _json_body(self, h: _Handler, body: bytes) -> dict[str, Any]:
        ctype = h.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise GraphError(415, "UnsupportedMediaType",
                             f"Content-Type must be application/json, not {ctype!r}.")
        try:
            obj = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise GraphError(400, "BadRequest", f"Invalid JSON: {exc}.") from None
        if not isinstance(obj, dict):
            raise GraphError(400, "BadRequest", "The request body must be a JSON object.")
        return obj

    def _handle_add_attachment(self, h: _Handler, rec: GraphRequest, mailbox: str,
                               ids: list[str], body: bytes) -> Reply:
        draft = self._draft(mailbox, ids[0])
        obj = self._json_body(h, body)
        if obj.get("@odata.type") != "#microsoft.graph.fileAttachment":
            raise GraphError(400, "BadRequest", "mock-graph supports only "
                             "\"@odata.type\": \"#microsoft.graph.fileAttachment\".")
        name, content = obj.get("name"), obj.get("contentBytes")
        if not isinstance(name, str) or not name or not isinstance(content, str):
            raise GraphError(400, "BadRequest", "name and contentBytes are required.")
        try:
            data = base64.b64decode(content, validate=True)
        except (binascii.Error, ValueError):
            raise GraphError(400, "BadRequest", "contentBytes is not valid base64.") from None
        att = Attachment(id=_new_id(), name=name,
                         content_type=str(obj.get("contentType") or "application/octet-stream"),
                         size=len(data), data=data, is_inline=bool(obj.get("isInline")),
                         content_id=obj.get("contentId"), via="post")
        with self._lock:
            draft.attachments.append(att)
        return Reply(201, {
            "@odata.context": f"{self.graph_url}/$metadata#users('{mailbox}')/messages("
                              f"'{draft.id}')/attachments/$entity",
            "@odata.type": "#microsoft.graph.fileAttachment", "id": att.id, "name": att.name,
            "contentType": att.content_type, "size": att.size, "isInline": att.is_inline,
            "lastModifiedDateTime": _iso(time.time())})

    def _handle_delete_message(self, h: _Handler, rec: GraphRequest, mailbox: str,
                               ids: list[str], body: bytes) -> Reply:
        draft = self._draft(mailbox, ids[0])
        with self._lock:
            self._drafts.pop(draft.id, None)
            for s in draft.sessions:
                if s.state == "open":
                    s.state = "cancelled"
        return Reply(204)

    def _handle_send(self, h: _Handler, rec: GraphRequest, mailbox: str, ids: list[str],
                     body: bytes) -> Reply:
        draft = self._draft(mailbox, ids[0])
        if not draft.parsed.recipients:
            raise GraphError(400, "ErrorInvalidRecipients",
                             "At least one recipient is required, but none were found.")
        with self._lock:
            incomplete = [s.name for s in draft.sessions if s.state == "open"]
            size = len(draft.mime) + sum(4 * math.ceil(a.size / 3) for a in draft.attachments)
            if size > self.max_message_bytes:
                raise GraphError(400, "ErrorMessageSizeExceeded",
                                 f"The message exceeds the maximum supported size "
                                 f"({size} > {self.max_message_bytes} bytes).")
            if self._drafts.pop(draft.id, None) is None:   # sent by a concurrent request
                raise GraphError(404, "ErrorItemNotFound",
                                 "The specified object was not found in the store.")
            for s in draft.sessions:
                if s.state == "open":
                    s.state = "cancelled"
        self._record_sent(rec, mailbox, draft.mime, draft.parsed, "draft", draft, incomplete)
        return Reply(202)

    # ---- upload sessions ----------------------------------------------------------------------------

    def _handle_create_upload_session(self, h: _Handler, rec: GraphRequest, mailbox: str,
                                      ids: list[str], body: bytes) -> Reply:
        draft = self._draft(mailbox, ids[0])
        obj = self._json_body(h, body)
        item = next((v for k, v in obj.items() if k.lower() == "attachmentitem"), None)
        if not isinstance(item, dict):
            raise GraphError(400, "BadRequest", "The AttachmentItem parameter is required.")
        if item.get("attachmentType") != "file":
            raise GraphError(400, "BadRequest", "AttachmentItem.attachmentType must be 'file' "
                                                "(the mock supports only files).")
        name, size = item.get("name"), item.get("size")
        if not isinstance(name, str) or not name:
            raise GraphError(400, "BadRequest", "AttachmentItem.name is required.")
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            raise GraphError(400, "BadRequest", "AttachmentItem.size must be a positive integer.")
        if size < self.upload_session_min_bytes:
            raise GraphError(400, "ErrorAttachmentSizeShouldNotBeLessThanMinimumSize",
                             f"Attachment size {size} is smaller than the minimum size "
                             f"{self.upload_session_min_bytes} for an upload session: POST it "
                             f"to the attachments of the message.")
        if size > self.max_message_bytes:
            raise GraphError(400, "ErrorMessageSizeExceeded",
                             "The message exceeds the maximum supported size.")
        session_id, authtoken = _new_id(), secrets.token_urlsafe(32)
        owner = f"{self.mailbox_id(mailbox)}@{self.tenant_id}"
        path = (f"/api/v2.0/Users('{owner}')/Messages('{draft.id}')/"
                f"AttachmentSessions('{session_id}')")
        session = UploadSession(
            id=session_id, mailbox=mailbox, message_id=draft.id, authtoken=authtoken,
            url=f"{self.endpoint}{path}?authtoken={authtoken}", name=name, size=size,
            content_type=str(item.get("contentType") or "application/octet-stream"),
            is_inline=bool(item.get("isInline")), content_id=item.get("contentId"),
            expires_at=time.time() + self.upload_session_lifetime)
        with self._lock:
            self._sessions[session_id] = session
            draft.sessions.append(session)
        return Reply(201, {"@odata.context": f"{self.graph_url}/$metadata#microsoft.graph."
                                             f"uploadSession",
                           "uploadUrl": session.url,
                           "expirationDateTime": _iso(session.expires_at, fraction=True),
                           "nextExpectedRanges": ["0-"]})

    def _handle_upload(self, h: _Handler, rec: GraphRequest, params: list[str],
                       body: bytes) -> Reply:
        """PUT/DELETE <uploadUrl> (concepts/outlook-large-attachments.md)."""
        with self._lock:
            session = self._sessions.get(params[2])
        if session is None or session.state == "cancelled" or time.time() > session.expires_at:
            raise GraphError(404, "ErrorItemNotFound", "The upload session was not found "
                                                       "(unknown, cancelled or expired).")
        rec.mailbox, rec.message_id, rec.auth = session.mailbox, session.message_id, "upload-url"
        if self.reject_upload_authorization and h.headers.get("Authorization"):
            rec.auth_ok, rec.auth_error = False, "Authorization header on the upload URL"
            raise GraphError(401, "InvalidAuthenticationToken", "Do not specify an Authorization "
                             "request header: the upload URL is pre-authenticated.")
        tokens = rec.query.get("authtoken") or []
        if len(tokens) != 1 or not secrets.compare_digest(tokens[0], session.authtoken):
            rec.auth_ok, rec.auth_error = False, "authtoken missing or wrong"
            raise GraphError(401, "InvalidAuthenticationToken", "Access token validation failure.")
        if f"{self.endpoint}{h.path}" != session.url:
            raise GraphError(404, "ErrorItemNotFound", "Use the uploadUrl exactly as returned.")
        rec.auth_ok = True
        self._admit(rec, session.mailbox, body)
        if self.latency > 0:
            self._stopping.wait(self.latency)
        if h.command == "DELETE":
            with self._lock:
                session.state = "cancelled"
            return Reply(204)
        return self._upload_chunk(h, session, body)

    def _upload_chunk(self, h: _Handler, session: UploadSession, body: bytes) -> Reply:
        ctype = h.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if ctype != "application/octet-stream":
            raise GraphError(415, "UnsupportedMediaType",
                             f"Content-Type must be application/octet-stream, not {ctype!r}.")
        m = _CONTENT_RANGE_RE.match(h.headers.get("Content-Range", "").strip())
        if not m:
            raise GraphError(400, "invalidRange",
                             "Content-Range must be 'bytes {start}-{end}/{total}'.")
        start, end, total = (int(g) for g in m.groups())
        if total != session.size:
            raise GraphError(400, "invalidRange", f"Declared total size {total} is different "
                             f"from that of the upload session ({session.size}) "
                             f"(fragmentLengthMismatch).")
        if end < start or end >= total or end - start + 1 != len(body):
            raise GraphError(400, "invalidRange", f"Content-Range {start}-{end} does not match "
                                                  f"the {len(body)} bytes sent.")
        with self._lock:
            if session.state == "cancelled":
                raise GraphError(404, "ErrorItemNotFound", "The upload session was cancelled.")
            if session.state == "complete":
                raise GraphError(416, "invalidRange", "The upload session is already complete "
                                                      "(fragmentOverlap).")
            expected = session.next_expected
            if start != expected:
                why = "fragmentOverlap" if start < expected else "fragmentOutOfOrder"
                raise GraphError(416, "invalidRange", f"Expected the fragment starting at byte "
                                                      f"{expected}, not {start} ({why}).")
            last = end + 1 == total
            if self.chunk_multiple and not last and len(body) % self.chunk_multiple:
                raise GraphError(400, "invalidRange", f"Fragment length {len(body)} is not a "
                                                      f"multiple of {self.chunk_multiple} bytes.")
            session.received += body
            session.chunks += 1
            if not last:
                return Reply(200, {
                    "@odata.context": f"{self.endpoint}/api/v2.0/$metadata#Users('"
                                      f"{self.mailbox_id(session.mailbox)}')/Messages('"
                                      f"{session.message_id}')/AttachmentSessions/$entity",
                    "ExpirationDateTime": _iso(session.expires_at, fraction=True),
                    "nextExpectedRanges": [str(session.next_expected)]})
            session.state = "complete"
            att = Attachment(id=_new_id(), name=session.name, content_type=session.content_type,
                             size=session.size, data=bytes(session.received),
                             is_inline=session.is_inline, content_id=session.content_id)
            draft = self._drafts.get(session.message_id)
            if draft is not None:
                draft.attachments.append(att)
        owner = f"{self.mailbox_id(session.mailbox)}@{self.tenant_id}"
        return Reply(201, None, {"Location": f"{self.endpoint}/api/v2.0/Users('{owner}')/Messages("
                                             f"'{session.message_id}')/Attachments('{att.id}')"})

    # ---- GET /users/{m}/mailFolders/SentItems/messages ---------------------------------------------

    def _handle_sent_items(self, h: _Handler, rec: GraphRequest, mailbox: str, ids: list[str],
                           body: bytes) -> Reply:
        folder = ids[0]
        if folder.lower() != "sentitems":
            raise GraphError(400, "BadRequest", f"mock-graph knows only the SentItems folder, "
                                                f"not {folder!r}.")
        wanted: str | None = None
        filters = rec.query.get("$filter") or []
        if filters:
            m = _FILTER_RE.match(filters[0])
            if len(filters) != 1 or not m:
                raise GraphError(400, "BadRequest", "mock-graph supports only "
                                 "$filter=internetMessageId eq '<id>'.")
            wanted = m.group(1).replace("''", "'")
        selects = rec.query.get("$select") or []
        fields = [f.strip() for f in ",".join(selects).split(",") if f.strip()] if selects \
            else list(_SELECTABLE)
        for f in fields:
            if f not in _SELECTABLE:
                raise GraphError(400, "RequestBroker--ParseUri", f"Could not find a property "
                                 f"named '{f}' on type 'Microsoft.OutlookServices.Message'.")
        now = time.time()
        with self._lock:
            found = [s for s in self._sent if s.mailbox == mailbox and s.visible_at <= now
                     and (wanted is None or s.internet_message_id == wanted)]
        value = []
        for s in found:
            full = self._message_json(mailbox, s.item_id, s.internet_message_id,
                                      ParsedMime.parse(s.mime), s.time, False,
                                      bool(s.attachments))
            value.append({"@odata.etag": full["@odata.etag"],
                          **{f: full[f] for f in fields}})
        select = f"({','.join(fields)})" if selects else ""
        return Reply(200, {"@odata.context": f"{self.graph_url}/$metadata#users('{mailbox}')/"
                                             f"mailFolders('{folder}')/messages{select}",
                           "value": value})

    # ---- answers ------------------------------------------------------------------------------------

    def _error_reply(self, status: int, code: str, message: str,
                     target: str | None = None) -> Reply:
        return Reply(status, {"error": {"code": code, "message": message,
                                        "innerError": {"date": _iso(time.time())}}},
                     error_code=code)

    def _fault_reply(self, route: str, fault: Fault) -> Reply:
        status = fault.status or 500
        default_code, default_msg = _FAULT_CODES.get(status, ("UnknownError", "Scripted failure."))
        if route == "token":
            reply = self._entra_error(status, fault.code or "temporarily_unavailable",
                                      50000 + status, fault.message or default_msg)
        else:
            reply = self._error_reply(status, fault.code or default_code,
                                      fault.message if fault.message is not None else default_msg)
        if fault.retry_after is not None:
            ra = fault.retry_after
            reply.headers["Retry-After"] = str(int(ra)) if float(ra).is_integer() else str(ra)
        reply.headers.update(fault.headers)
        return reply

    def _send(self, h: _Handler, rec: GraphRequest, reply: Reply, close: bool = False) -> None:
        if rec.route == "token":
            payload = json.dumps(reply.obj).encode() if reply.obj is not None else b""
            headers = {"Content-Type": "application/json; charset=utf-8",
                       "Cache-Control": "no-store, no-cache", "Pragma": "no-cache",
                       "x-ms-request-id": str(uuid.uuid4())}
        else:
            request_id = str(uuid.uuid4())
            client_request_id = h.headers.get("client-request-id") or request_id
            obj = reply.obj
            if isinstance(obj, dict) and isinstance(obj.get("error"), dict):
                obj = json.loads(json.dumps(obj))
                obj["error"].setdefault("innerError", {}).update(
                    {"request-id": request_id, "client-request-id": client_request_id})
            payload = json.dumps(obj, separators=(",", ":")).encode() if obj is not None else b""
            headers = {"Cache-Control": "private", "request-id": request_id,
                       "client-request-id": client_request_id,
                       "x-ms-ags-diagnostic": '{"ServerInfo":{"DataCenter":"Loopback",'
                                              '"Slice":"E","Ring":"0","ScaleUnit":"000",'
                                              '"RoleInstance":"mock-graph"}}',
                       "Strict-Transport-Security": "max-age=31536000"}
            if payload:
                headers["Content-Type"] = ("application/json;odata.metadata=minimal;"
                                           "odata.streaming=true;IEEE754Compatible=false;"
                                           "charset=utf-8")
            if rec.auth_error and reply.status == 401:
                headers["x-mock-auth-error"] = rec.auth_error
        headers.update(reply.headers)
        rec.error_code = reply.error_code
        self._write_response(h, rec, reply.status, headers, payload, close=close)

    # ---- state files ----------------------------------------------------------------------------------

    def _persist(self, sent: SentMessage) -> None:
        d = os.path.join(self.state_dir, "sent")
        os.makedirs(d, exist_ok=True)
        base = os.path.join(d, f"{sent.seq:06d}")
        with open(base + ".eml.tmp", "wb") as f:
            f.write(sent.mime)
        os.replace(base + ".eml.tmp", base + ".eml")
        for k, att in enumerate(sent.attachments, 1):
            with open(f"{base}.att{k}", "wb") as f:
                f.write(att.data)
        meta = {"mailbox": sent.mailbox, "via": sent.via, "auth": sent.auth,
                "internet_message_id": sent.internet_message_id, "subject": sent.subject,
                "to": sent.to, "cc": sent.cc, "bcc": sent.bcc, "duplicate": sent.duplicate,
                "time": sent.time, "connection_id": sent.request.connection_id,
                "attachments": [{"file": f"{sent.seq:06d}.att{k}", "name": a.name,
                                 "content_type": a.content_type, "size": a.size,
                                 "sha256": hashlib.sha256(a.data).hexdigest()}
                                for k, a in enumerate(sent.attachments, 1)],
                "incomplete_uploads": sent.incomplete_uploads}
        with open(base + ".json.tmp", "w") as f:
            json.dump(meta, f, indent=1)
        os.replace(base + ".json.tmp", base + ".json")

    def _write_state(self) -> None:
        path = os.path.join(self.state_dir, "mock-graph.json")
        fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"endpoint": self.endpoint, "graph_url": self.graph_url,
                       "ca_file": self.ca_file, "pid": os.getpid(), "token_url": self.token_url,
                       "authority": self.authority, "tenant_id": self.tenant_id,
                       "client_id": self.client_id, "client_secret": self.client_secret,
                       "scope": GRAPH_SCOPE, "permissions": sorted(self.permissions),
                       "mailboxes": sorted(self.mailboxes) if self.mailboxes is not None else None,
                       "allowed_mailboxes": sorted(self.allowed_mailboxes)
                       if self.allowed_mailboxes is not None else None}, f, indent=1)
        os.replace(path + ".tmp", path)


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mock_graph.py",
                                 description="Loopback Microsoft Graph mail + Entra token "
                                             "endpoint double.")
    ap.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0: any free one)")
    ap.add_argument("--state-dir", required=True,
                    help="TLS material, mock-graph.json and sent/* go here")
    ap.add_argument("--mailbox", action="append", default=None,
                    help="a mailbox (UPN) that exists (repeatable; default: any)")
    ap.add_argument("--allowed-mailbox", action="append", default=None,
                    help="a mailbox the app may use (repeatable; default: all)")
    ap.add_argument("--permission", action="append", default=None,
                    help=f"an application permission of the app (repeatable; default: "
                         f"{' '.join(DEFAULT_PERMISSIONS)})")
    ap.add_argument("--tenant-id")
    ap.add_argument("--client-id")
    ap.add_argument("--client-secret")
    ap.add_argument("--client-certificate", help="PEM certificate for JWT client assertions")
    ap.add_argument("--token-lifetime", type=int, default=3600)
    ap.add_argument("--max-request-bytes", type=int, default=4 * MiB)
    ap.add_argument("--mailbox-concurrency", type=int, default=4)
    ap.add_argument("--latency", type=float, default=0.0,
                    help="seconds every Graph request takes (benchmarks)")
    ap.add_argument("--sent-items-delay", type=float, default=0.0,
                    help="seconds before a sent message shows up in Sent Items")
    ap.add_argument("--quiet", action="store_true", help="no per-request log on stderr")
    args = ap.parse_args(argv)

    mock = MockGraph(args.mailbox, allowed_mailboxes=args.allowed_mailbox,
                     permissions=args.permission or DEFAULT_PERMISSIONS, port=args.port,
                     state_dir=args.state_dir, tenant_id=args.tenant_id,
                     client_id=args.client_id, client_secret=args.client_secret,
                     client_certificate=args.client_certificate,
                     token_lifetime=args.token_lifetime,
                     max_request_bytes=args.max_request_bytes,
                     mailbox_concurrency=args.mailbox_concurrency, latency=args.latency,
                     sent_items_delay=args.sent_items_delay, keep=True,
                     echo_log=not args.quiet)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    mock.start()
    print(f"endpoint={mock.endpoint}", flush=True)
    print(f"graph_url={mock.graph_url}", flush=True)
    print(f"ca_file={mock.ca_file}", flush=True)
    print(f"token_url={mock.token_url}", flush=True)
    print("ready", flush=True)
    try:
        while not stop.wait(0.2):
            pass
    finally:
        mock.stop()
        print(f"mock-graph: stopped; {len(mock.sent())} messages sent",
              file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
