"""Tests of mock_graph.MockGraph, the loopback Microsoft Graph mail / Entra token double,
driven by an INDEPENDENT client written here with urllib (TLS verified against the mock's
CA). The client's JWT client assertions are built and signed with python3-cryptography,
not with the openssl CLI the mock verifies them with.

Run from the repository root (no root needed, loopback only, ~15 s):
    python3 -m unittest -v tests/integration/test_mock_graph.py
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import hashlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import urllib.error
import urllib.parse
import urllib.request
import ssl
import uuid
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from mock_graph import MockGraph  # noqa: E402

GRAPH_SCOPE = "https://graph.microsoft.com/.default"
ACS_SCOPE = "https://communication.azure.com//.default"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
PRINTER, SCANNER, OTHER = "printer@contoso.test", "scanner@contoso.test", "other@contoso.test"
MiB = 1024 * 1024


# --------------------------------------------------------------------------------------------
# the independent client
# --------------------------------------------------------------------------------------------

def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwt_claims(token: str) -> dict:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def mime_message(*, to: str = "a@example.net", cc: str | None = None, bcc: str | None = None,
                 subject: str = "hello", message_id: str | None = "<m1@printer.contoso.test>",
                 body: bytes = b"hi there\r\n", sender: str = PRINTER) -> bytes:
    lines = [f"From: Printer <{sender}>", f"To: {to}"]
    if cc:
        lines.append(f"Cc: {cc}")
    if bcc:
        lines.append(f"Bcc: {bcc}")
    lines.append(f"Subject: {subject}")
    if message_id:
        lines.append(f"Message-ID: {message_id}")
    lines += ["MIME-Version: 1.0", "Content-Type: text/plain; charset=iso-8859-1",
              "Content-Transfer-Encoding: 8bit"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@dataclasses.dataclass
class Resp:
    status: int
    headers: dict[str, str]
    body: bytes
    elapsed: float = 0.0

    @property
    def json(self) -> Any:
        return json.loads(self.body) if self.body else None

    @property
    def code(self) -> str | None:
        return (self.json or {}).get("error", {}).get("code")


class Client:
    """urllib-based Graph client."""

    def __init__(self, mock: MockGraph):
        self.mock = mock
        self.ctx = ssl.create_default_context(cafile=mock.ca_file)
        self.token: str | None = None

    def request(self, method: str, url: str, body: bytes | None = None, *,
                headers: dict[str, str] | None = None, timeout: float = 10) -> Resp:
        if url.startswith("/"):
            url = self.mock.endpoint + url
        req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
        started = time.monotonic()
        try:
            with urllib.request.urlopen(req, context=self.ctx, timeout=timeout) as r:
                return Resp(r.status, {k.lower(): v for k, v in r.headers.items()}, r.read(),
                            time.monotonic() - started)
        except urllib.error.HTTPError as e:
            with e:
                return Resp(e.code, {k.lower(): v for k, v in e.headers.items()}, e.read(),
                            time.monotonic() - started)

    def get_token(self, form: dict[str, str]) -> Resp:
        return self.request("POST", self.mock.token_url, urllib.parse.urlencode(form).encode(),
                            headers={"Content-Type": "application/x-www-form-urlencoded"})

    def secret_form(self, **over: str) -> dict[str, str]:
        form = {"grant_type": "client_credentials", "client_id": self.mock.client_id,
                "client_secret": self.mock.client_secret, "scope": GRAPH_SCOPE}
        form.update(over)
        return form

    def login(self) -> str:
        r = self.get_token(self.secret_form())
        assert r.status == 200, r.body
        self.token = r.json["access_token"]
        return self.token

    def auth(self, token: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token or self.token}"}

    def graph(self, method: str, path: str, body: bytes | None = None, *,
              content_type: str | None = None, token: str | None = None,
              headers: dict[str, str] | None = None, timeout: float = 10) -> Resp:
        h = self.auth(token)
        if content_type:
            h["Content-Type"] = content_type
        h.update(headers or {})
        return self.request(method, f"{self.mock.graph_url}{path}", body, headers=h,
                            timeout=timeout)

    def send_mail(self, mailbox: str, mime: bytes, *, raw: bytes | None = None,
                  timeout: float = 10, **kw: Any) -> Resp:
        body = raw if raw is not None else base64.encodebytes(mime)   # 76-column lines
        kw.setdefault("content_type", "text/plain")
        return self.graph("POST", f"/users/{mailbox}/sendMail", body, timeout=timeout, **kw)

    def create_draft(self, mailbox: str, mime: bytes, **kw: Any) -> Resp:
        return self.graph("POST", f"/users/{mailbox}/messages", base64.b64encode(mime),
                          content_type="text/plain", **kw)

    def upload_session(self, mailbox: str, draft_id: str, name: str, size: int,
                       content_type: str | None = "application/pdf", **kw: Any) -> Resp:
        item: dict[str, Any] = {"attachmentType": "file", "name": name, "size": size}
        if content_type:
            item["contentType"] = content_type
        return self.graph("POST", f"/users/{mailbox}/messages/{draft_id}/attachments/"
                                  f"createUploadSession",
                          json.dumps({"AttachmentItem": item}).encode(),
                          content_type="application/json", **kw)

    def put_chunk(self, url: str, data: bytes, start: int, total: int, *,
                  headers: dict[str, str] | None = None) -> Resp:
        h = {"Content-Type": "application/octet-stream",
             "Content-Range": f"bytes {start}-{start + len(data) - 1}/{total}"}
        h.update(headers or {})
        return self.request("PUT", url, data, headers=h)

    def send_draft(self, mailbox: str, draft_id: str, **kw: Any) -> Resp:
        return self.graph("POST", f"/users/{mailbox}/messages/{draft_id}/send", b"", **kw)

    def sent_items(self, mailbox: str, internet_message_id: str | None = None,
                   select: str | None = "id,internetMessageId", **kw: Any) -> Resp:
        query = {}
        if internet_message_id is not None:
            quoted = internet_message_id.replace("'", "''")
            query["$filter"] = f"internetMessageId eq '{quoted}'"
        if select is not None:
            query["$select"] = select
        qs = urllib.parse.urlencode(query, quote_via=urllib.parse.quote)
        return self.graph("GET", f"/users/{mailbox}/mailFolders/SentItems/messages"
                                 + (f"?{qs}" if qs else ""), **kw)


def in_parallel(calls: list) -> list:
    """Run the callables at the same moment (one thread each); their results in order."""
    barrier = threading.Barrier(len(calls))
    results: list = [None] * len(calls)

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = calls[i]()
        except Exception as exc:  # reported to the test
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


# --------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------

class MockGraphTest(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="test-mock-graph-")
        cls.addClassCleanup(shutil.rmtree, cls.tmp, True)
        # the app's certificate for client assertions, and an unrelated key
        cls.app_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        cls.other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "paas-milter test app")])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(cls.app_key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(days=1))
                .not_valid_after(now + datetime.timedelta(days=2))
                .sign(cls.app_key, hashes.SHA256()))
        der = cert.public_bytes(serialization.Encoding.DER)
        cls.x5t = b64url(hashlib.sha1(der).digest())
        cls.x5t_s256 = b64url(hashlib.sha256(der).digest())
        cls.app_cert = os.path.join(cls.tmp, "app.pem")
        with open(cls.app_cert, "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))

        cls.mock = MockGraph([PRINTER, SCANNER, OTHER], allowed_mailboxes=[PRINTER, SCANNER],
                             client_certificate=cls.app_cert).start()
        cls.addClassCleanup(cls.mock.stop)

    def setUp(self):
        self.mock.reset()
        saved = {k: getattr(self.mock, k) for k in (
            "permissions", "max_request_bytes", "max_chunk_bytes", "chunk_multiple",
            "upload_session_min_bytes", "max_message_bytes", "mailbox_concurrency",
            "throttle_retry_after", "mailbox_request_limit", "request_window",
            "mailbox_upload_limit", "upload_window", "latency", "sent_items_delay")}
        self.addCleanup(lambda: [setattr(self.mock, k, v) for k, v in saved.items()])
        self.addCleanup(self.mock.clear_faults)
        # a request a test left in flight (a stall) would still hold a concurrency slot
        self.addCleanup(lambda: self.mock.wait_for_requests(len(self.mock.requests()), None))
        self.client = Client(self.mock)
        self.client.login()

    def assertGraphError(self, resp: Resp, status: int, code: str):
        self.assertEqual(resp.status, status, resp.body)
        err = resp.json["error"]
        self.assertEqual(err["code"], code, resp.body)
        self.assertIsInstance(err["message"], str)
        self.assertEqual(err["innerError"]["request-id"], resp.headers["request-id"])

    # ---- token endpoint ------------------------------------------------------------------------

    def test_token_with_client_secret(self):
        c = self.client
        r = c.get_token(c.secret_form())
        self.assertEqual(r.status, 200, r.body)
        self.assertEqual(r.json["token_type"], "Bearer")
        claims = jwt_claims(r.json["access_token"])
        self.assertEqual(claims["aud"], "https://graph.microsoft.com")
        self.assertEqual(claims["roles"], ["Mail.ReadWrite", "Mail.Send"])
        self.assertEqual(claims["tid"], self.mock.tenant_id)

        r = c.get_token(c.secret_form(scope=ACS_SCOPE))
        self.assertEqual((r.status, r.json["error"]), (400, "invalid_scope"))
        r = c.get_token(c.secret_form(scope="https://graph.microsoft.com/Mail.Send"))
        self.assertEqual((r.status, r.json["error"]), (400, "invalid_scope"))
        r = c.get_token(c.secret_form(client_secret="wrong"))
        self.assertEqual((r.status, r.json["error"]), (401, "invalid_client"))
        self.assertTrue(r.json["error_description"].startswith("AADSTS7000215"))
        self.assertEqual([t.status for t in self.mock.token_requests()], [200, 200, 400, 400, 401])

    def make_assertion(self, alg: str = "RS256", *, header: dict | None = None,
                       claims: dict | None = None, key: Any = None,
                       pss_salt: int | None = None) -> str:
        now = int(time.time())
        h: dict[str, Any] = {"alg": alg, "typ": "JWT"}
        h.update({"x5t": self.x5t} if alg == "RS256" else {"x5t#S256": self.x5t_s256})
        h.update(header or {})
        c = {"aud": self.mock.token_url, "iss": self.mock.client_id, "sub": self.mock.client_id,
             "jti": str(uuid.uuid4()), "nbf": now, "iat": now, "exp": now + 600}
        c.update(claims or {})
        signing_input = (b64url(json.dumps(h).encode()) + "." + b64url(json.dumps(c).encode()))
        key = key or self.app_key
        if alg == "PS256" or pss_salt is not None:
            pad = padding.PSS(mgf=padding.MGF1(hashes.SHA256()),
                              salt_length=32 if pss_salt is None else pss_salt)
        else:
            pad = padding.PKCS1v15()
        return signing_input + "." + b64url(key.sign(signing_input.encode(), pad, hashes.SHA256()))

    def assertion_form(self, assertion: str) -> dict[str, str]:
        return {"grant_type": "client_credentials", "client_id": self.mock.client_id,
                "scope": GRAPH_SCOPE, "client_assertion_type": ASSERTION_TYPE,
                "client_assertion": assertion}

    def test_token_with_certificate_assertion(self):
        c = self.client
        for alg in ("RS256", "PS256"):
            with self.subTest(alg):
                r = c.get_token(self.assertion_form(self.make_assertion(alg)))
                self.assertEqual(r.status, 200, r.body)
                token = r.json["access_token"]
                self.assertEqual(c.send_mail(PRINTER, mime_message(), token=token).status, 202)
        self.assertEqual([s.auth for s in self.mock.sent()], ["assertion", "assertion"])
        now = int(time.time())
        bad = {
            "RS256 by another key": self.make_assertion(key=self.other_key),
            "PS256 by another key": self.make_assertion("PS256", key=self.other_key),
            "PS256 with PKCS#1 v1.5 padding": (lambda a: a.rsplit(".", 1)[0] + "." + b64url(
                self.app_key.sign(a.rsplit(".", 1)[0].encode(), padding.PKCS1v15(),
                                  hashes.SHA256())))(self.make_assertion("PS256")),
            "PS256 with a 64-byte salt": self.make_assertion("PS256", pss_salt=64),
            "RS256 signed with PSS": self.make_assertion("RS256", pss_salt=32),
            "wrong x5t": self.make_assertion(header={"x5t": b64url(b"\0" * 20)}),
            "wrong x5t#S256": self.make_assertion("PS256", header={"x5t#S256": b64url(b"\0" * 32)}),
            "alg HS256": self.make_assertion(header={"alg": "HS256"}),
            "wrong aud": self.make_assertion(claims={"aud": "https://login.microsoftonline.com/"
                                                            "x/oauth2/v2.0/token"}),
            "expired": self.make_assertion("PS256", claims={"exp": now - 5}),
        }
        for name, assertion in bad.items():
            with self.subTest(name):
                r = c.get_token(self.assertion_form(assertion))
                self.assertEqual((r.status, r.json["error"]), (401, "invalid_client"), r.body)

    def test_bearer_token_is_checked_on_every_call(self):
        c = self.client
        cases = {
            "no Authorization": {},
            "unknown token": {"Authorization": "Bearer eyJ.not.ours"},
            "Basic": {"Authorization": "Basic dXNlcjpwYXNz"},
        }
        for name, headers in cases.items():
            with self.subTest(name):
                r = c.request("POST", c.mock.send_mail_url(PRINTER),
                              base64.b64encode(mime_message()),
                              headers={"Content-Type": "text/plain", **headers})
                self.assertGraphError(r, 401, "InvalidAuthenticationToken")
                self.assertIn("Bearer", r.headers["www-authenticate"])
        r = c.request("GET", f"{c.mock.graph_url}/users/{PRINTER}/mailFolders/SentItems/messages")
        self.assertGraphError(r, 401, "InvalidAuthenticationToken")
        self.mock.expire_tokens()
        r = c.send_mail(PRINTER, mime_message())
        self.assertGraphError(r, 401, "InvalidAuthenticationToken")
        self.assertIn("expired", r.json["error"]["message"])
        self.assertEqual(self.mock.sent(), [])
        c.login()
        self.assertEqual(c.send_mail(PRINTER, mime_message()).status, 202)

    # ---- sendMail --------------------------------------------------------------------------------

    def test_send_mail_records_the_mime_exactly(self):
        mime = mime_message(to="A <a@example.net>, b@example.net", cc="c@example.net",
                            bcc="Hidden <d@example.net>",
                            subject="=?utf-8?q?Gr=C3=BC=C3=9Fe?=",
                            body=b"Gr\xfc\xdfe, 8-bit latin-1\r\n.\r\nlast line")
        r = self.client.send_mail(PRINTER, mime, headers={"client-request-id": "abc-123"})
        self.assertEqual(r.status, 202, r.body)
        self.assertEqual(r.body, b"")
        self.assertEqual(r.headers["client-request-id"], "abc-123")
        self.assertTrue(r.headers["request-id"])
        sent = self.mock.wait_for_sent(1)[0]
        self.assertEqual(sent.mime, mime)
        self.assertEqual((sent.mailbox, sent.via, sent.auth), (PRINTER, "sendMail", "secret"))
        self.assertEqual(sent.to, ["a@example.net", "b@example.net"])
        self.assertEqual((sent.cc, sent.bcc), (["c@example.net"], ["d@example.net"]))
        self.assertEqual(sent.recipients, ["a@example.net", "b@example.net", "c@example.net",
                                           "d@example.net"])
        self.assertEqual(sent.internet_message_id, "<m1@printer.contoso.test>")
        self.assertEqual(sent.subject, "Grüße")
        self.assertFalse(sent.duplicate)
        rec = self.mock.requests("sendMail")[0]
        self.assertEqual((rec.mailbox, rec.auth, rec.token_kind, rec.sent), (PRINTER, "bearer",
                                                                             "secret", True))

        # unwrapped base64 is fine as well; no Message-ID: Exchange makes one up
        r = self.client.send_mail(PRINTER, b"", raw=base64.b64encode(mime_message(message_id=None)))
        self.assertEqual(r.status, 202, r.body)
        generated = self.mock.sent()[1].internet_message_id
        self.assertRegex(generated, r"^<[^<>@\s]+@[^<>@\s]+>$")

    def test_send_mail_errors(self):
        c = self.client
        for name, raw in {"not base64": b"From: x\r\n\r\nhello!", "bad padding": b"QUJD\nRA",
                          "non-ASCII": "QUJD\u00e9".encode()}.items():
            with self.subTest(name):
                r = c.send_mail(PRINTER, b"", raw=raw)
                self.assertGraphError(r, 400, "ErrorMimeContentInvalidBase64String")
                self.assertEqual(r.json["error"]["message"], "Invalid base64 string for MIME content.")
        self.assertGraphError(c.send_mail(PRINTER, b"", raw=b""), 400, "ErrorMimeContentInvalid")
        r = c.send_mail(PRINTER, mime_message(), content_type="application/json")
        self.assertGraphError(r, 415, "UnsupportedMediaType")
        nobody = b"From: p@contoso.test\r\nSubject: to nobody\r\n\r\nhi\r\n"
        self.assertGraphError(c.send_mail(PRINTER, nobody), 400, "ErrorInvalidRecipients")
        r = c.graph("GET", f"/users/{PRINTER}/sendMail")
        self.assertEqual((r.status, r.headers.get("allow")), (405, "POST"))
        self.assertEqual(self.mock.sent(), [])

    def test_request_size_limit(self):
        self.assertEqual(MockGraph().max_request_bytes, 4 * 1024 * 1024)
        # exactly 4 MiB + 4 bytes of base64: 413, nothing sent
        too_big = base64.b64encode(mime_message(body=b"x" * (3 * MiB)))
        self.assertGreater(len(too_big), 4 * MiB)
        r = self.client.send_mail(PRINTER, b"", raw=too_big)
        self.assertGraphError(r, 413, "RequestEntityTooLarge")
        # the limit is on the request body, after base64 (configurable for quick tests)
        self.mock.max_request_bytes = 2000
        head = mime_message(body=b"")
        fits = head + b"y" * (1500 - len(head))          # 1500 bytes -> 2000 of base64
        self.assertEqual(len(base64.b64encode(fits)), 2000)
        self.assertEqual(self.client.send_mail(PRINTER, b"", raw=base64.b64encode(fits)).status, 202)
        r = self.client.send_mail(PRINTER, b"", raw=base64.b64encode(fits) + b"\n")
        self.assertGraphError(r, 413, "RequestEntityTooLarge")
        self.assertEqual([s.mime for s in self.mock.sent()], [fits])

    # ---- mailboxes and permissions ------------------------------------------------------------------

    def test_mailboxes(self):
        c = self.client
        self.assertGraphError(c.send_mail("nobody@contoso.test", mime_message()), 404,
                              "ErrorInvalidUser")
        self.assertGraphError(c.send_mail(OTHER, mime_message()), 403, "ErrorAccessDenied")
        self.assertGraphError(c.graph("POST", "/me/sendMail", base64.b64encode(mime_message()),
                                      content_type="text/plain"), 400, "BadRequest")
        # UPNs are case-insensitive; "@" may be percent-encoded; the object id works too
        for mailbox in ("Printer@Contoso.TEST", "printer%40contoso.test",
                        MockGraph.mailbox_id(PRINTER)):
            with self.subTest(mailbox):
                self.assertEqual(c.send_mail(mailbox, mime_message()).status, 202)
        self.assertEqual([s.mailbox for s in self.mock.sent()], [PRINTER] * 3)
        self.assertEqual(len(self.mock.duplicates()), 2)

    def test_permissions_come_from_the_token(self):
        c = self.client
        old = c.token                       # issued with Mail.Send + Mail.ReadWrite
        self.mock.permissions = {"Mail.Send"}
        c.login()
        self.assertEqual(c.send_mail(PRINTER, mime_message()).status, 202)
        self.assertGraphError(c.create_draft(PRINTER, mime_message()), 403, "ErrorAccessDenied")
        self.assertGraphError(c.upload_session(PRINTER, "AAMk=", "f", 3_500_000), 403,
                              "ErrorAccessDenied")
        self.assertGraphError(c.sent_items(PRINTER, "<m1@printer.contoso.test>"), 403,
                              "ErrorAccessDenied")
        self.assertEqual(c.create_draft(PRINTER, mime_message(), token=old).status, 201)
        self.mock.permissions = {"Mail.Send", "Mail.ReadBasic.All"}
        c.login()
        r = c.sent_items(PRINTER, "<m1@printer.contoso.test>")
        self.assertEqual((r.status, len(r.json["value"])), (200, 1))

    # ---- drafts and upload sessions -----------------------------------------------------------------

    def test_large_message_via_draft_and_upload_session(self):
        c, m = self.client, self.mock
        mime = mime_message(subject="big scan", message_id="<big@printer.contoso.test>")
        r = c.create_draft(PRINTER, mime)
        self.assertEqual(r.status, 201, r.body)
        draft = r.json
        self.assertTrue(draft["isDraft"])
        self.assertEqual(draft["internetMessageId"], "<big@printer.contoso.test>")
        self.assertEqual(draft["subject"], "big scan")
        self.assertEqual(draft["toRecipients"][0]["emailAddress"]["address"], "a@example.net")
        draft_id = draft["id"]

        small = b"small attachment\n"
        r = c.graph("POST", f"/users/{PRINTER}/messages/{draft_id}/attachments", json.dumps({
            "@odata.type": "#microsoft.graph.fileAttachment", "name": "note.txt",
            "contentType": "text/plain", "contentBytes": base64.b64encode(small).decode()}).encode(),
            content_type="application/json")
        self.assertEqual((r.status, r.json["size"]), (201, len(small)), r.body)

        data = os.urandom(3_200_000)
        r = c.upload_session(PRINTER, draft_id, "scan.pdf", len(data))
        self.assertEqual(r.status, 201, r.body)
        url = r.json["uploadUrl"]
        self.assertTrue(url.startswith(m.endpoint + "/") and "authtoken=" in url, url)
        self.assertRegex(r.json["expirationDateTime"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{7}Z$")
        self.assertEqual(r.json["nextExpectedRanges"], ["0-"])

        chunk = MiB
        # the upload URL is pre-authenticated: an Authorization header is refused
        r = c.put_chunk(url, data[:chunk], 0, len(data), headers=c.auth())
        self.assertGraphError(r, 401, "InvalidAuthenticationToken")
        r = c.put_chunk(url, data[chunk:2 * chunk], chunk, len(data))      # out of order
        self.assertGraphError(r, 416, "invalidRange")
        r = c.put_chunk(url, data[:chunk], 0, len(data) + 1)               # wrong total
        self.assertGraphError(r, 400, "invalidRange")
        r = c.put_chunk(url, data[:chunk], 0, len(data))
        self.assertEqual(r.status, 200, r.body)
        self.assertEqual(r.json["nextExpectedRanges"], [str(chunk)])
        self.assertIn("ExpirationDateTime", r.json)
        r = c.put_chunk(url, data[:chunk], 0, len(data))                   # a resend: overlap
        self.assertGraphError(r, 416, "invalidRange")
        for start in range(chunk, len(data), chunk):
            r = c.put_chunk(url, data[start:start + chunk], start, len(data))
        self.assertEqual((r.status, r.body), (201, b""))
        self.assertIn("/Attachments('", r.headers["location"])
        self.assertEqual([s.state for d in m.drafts() for s in d.sessions], ["complete"])

        r = c.send_draft(PRINTER, draft_id)
        self.assertEqual((r.status, r.body), (202, b""))
        sent = m.wait_for_sent(1)[0]
        self.assertEqual((sent.via, sent.draft_id, sent.mime), ("draft", draft_id, mime))
        self.assertEqual([(a.name, a.content_type, a.data, a.via) for a in sent.attachments],
                         [("note.txt", "text/plain", small, "post"),
                          ("scan.pdf", "application/pdf", data, "uploadSession")])
        self.assertEqual((sent.incomplete_uploads, sent.internet_message_id),
                         ([], "<big@printer.contoso.test>"))
        self.assertEqual(m.drafts(), [])
        # sent: the draft is gone, a resend is 404 (look in Sent Items instead)
        self.assertGraphError(c.send_draft(PRINTER, draft_id), 404, "ErrorItemNotFound")
        self.assertEqual(len(c.sent_items(PRINTER, "<big@printer.contoso.test>").json["value"]), 1)
        self.assertEqual(len(m.sent()), 1)

    def test_upload_session_rules(self):
        c, m = self.client, self.mock
        draft_id = c.create_draft(PRINTER, mime_message()).json["id"]
        r = c.upload_session(PRINTER, draft_id, "small.bin", 2_999_999)
        self.assertGraphError(r, 400, "ErrorAttachmentSizeShouldNotBeLessThanMinimumSize")
        self.assertEqual(c.upload_session(PRINTER, draft_id, "ok.bin", 3_000_000).status, 201)
        self.assertGraphError(c.upload_session(PRINTER, "AAMkAGnot-a-draft=", "x", 3_000_000),
                              404, "ErrorItemNotFound")
        self.assertGraphError(c.upload_session(SCANNER, draft_id, "x", 3_000_000),
                              404, "ErrorItemNotFound")          # another mailbox's draft

        m.upload_session_min_bytes, m.max_chunk_bytes, m.chunk_multiple = 1, 2048, 1024
        data = os.urandom(5000)
        url = c.upload_session(PRINTER, draft_id, "f.bin", len(data)).json["uploadUrl"]
        self.assertGraphError(c.put_chunk(url, data[:2049], 0, len(data)), 413,
                              "RequestEntityTooLarge")
        self.assertGraphError(c.put_chunk(url, data[:1000], 0, len(data)), 400, "invalidRange")
        self.assertGraphError(c.put_chunk(url, data[:1024], 0, len(data),
                                          headers={"Content-Type": "text/plain"}), 415,
                              "UnsupportedMediaType")
        self.assertGraphError(c.request("PUT", url, data[:1024],
                                        headers={"Content-Type": "application/octet-stream"}),
                              400, "invalidRange")                # no Content-Range
        self.assertGraphError(c.put_chunk(url.replace("authtoken=", "authtoken=x"), data[:1024],
                                          0, len(data)), 401, "InvalidAuthenticationToken")
        # "Do not customize this URL": an equivalent but re-encoded one is not found
        self.assertGraphError(c.put_chunk(url.replace("@", "%40"), data[:1024], 0, len(data)),
                              404, "ErrorItemNotFound")
        tampered = url.replace("('", "(%27").replace("')", "%27)")
        self.assertEqual(c.put_chunk(tampered, data[:1024], 0, len(data)).status, 404)
        self.assertEqual(c.put_chunk(url, data[:2048], 0, len(data)).status, 200)
        self.assertEqual(c.put_chunk(url, data[2048:4096], 2048, len(data)).status, 200)
        self.assertEqual(c.put_chunk(url, data[4096:], 4096, len(data)).status, 201)  # last: any size

        url2 = c.upload_session(PRINTER, draft_id, "g.bin", 3000).json["uploadUrl"]
        self.assertEqual(c.request("DELETE", url2).status, 204)
        self.assertGraphError(c.put_chunk(url2, data[:1024], 0, 3000), 404, "ErrorItemNotFound")
        url3 = c.upload_session(PRINTER, draft_id, "h.bin", 3000).json["uploadUrl"]
        m.expire_upload_sessions()
        self.assertGraphError(c.put_chunk(url3, data[:1024], 0, 3000), 404, "ErrorItemNotFound")

    def test_send_with_an_incomplete_upload_leaves_the_attachment_out(self):
        c, m = self.client, self.mock
        m.upload_session_min_bytes = 1
        draft_id = c.create_draft(PRINTER, mime_message()).json["id"]
        url = c.upload_session(PRINTER, draft_id, "half.bin", 4000).json["uploadUrl"]
        self.assertEqual(c.put_chunk(url, b"x" * 2000, 0, 4000).status, 200)
        self.assertEqual(c.send_draft(PRINTER, draft_id).status, 202)
        sent = m.wait_for_sent(1)[0]
        self.assertEqual((sent.attachments, sent.incomplete_uploads), ([], ["half.bin"]))
        self.assertGraphError(c.put_chunk(url, b"x" * 2000, 2000, 4000), 404, "ErrorItemNotFound")

    def test_draft_delete_and_size_limit(self):
        c, m = self.client, self.mock
        draft_id = c.create_draft(PRINTER, mime_message()).json["id"]
        self.assertEqual(c.graph("DELETE", f"/users/{PRINTER}/messages/{draft_id}").status, 204)
        self.assertGraphError(c.send_draft(PRINTER, draft_id), 404, "ErrorItemNotFound")
        m.max_message_bytes = 100
        draft_id = c.create_draft(PRINTER, mime_message(body=b"z" * 200)).json["id"]
        self.assertGraphError(c.send_draft(PRINTER, draft_id), 400, "ErrorMessageSizeExceeded")
        self.assertEqual(m.sent(), [])

    # ---- Sent Items ---------------------------------------------------------------------------------

    def test_sent_items_lookup(self):
        c, m = self.client, self.mock
        tricky = "<it's+1@printer.contoso.test>"
        self.assertEqual(c.send_mail(PRINTER, mime_message(message_id=tricky)).status, 202)
        self.assertEqual(c.send_mail(PRINTER, mime_message(message_id="<m2@p>")).status, 202)
        r = c.sent_items(PRINTER, tricky)
        self.assertEqual(r.status, 200, r.body)
        (item,) = r.json["value"]
        self.assertEqual(set(item), {"@odata.etag", "id", "internetMessageId"})
        self.assertEqual((item["id"], item["internetMessageId"]),
                         (m.sent()[0].item_id, tricky))
        self.assertIn("@odata.context", r.json)
        self.assertEqual(c.sent_items(SCANNER, tricky).json["value"], [])
        self.assertEqual(c.sent_items(PRINTER, "<unknown@p>").json["value"], [])
        full = c.sent_items(PRINTER, "<m2@p>", select=None).json["value"][0]
        self.assertEqual((full["subject"], full["isDraft"]), ("hello", False))
        self.assertGraphError(c.sent_items(PRINTER, "<m2@p>", select="id,nonsense"), 400,
                              "RequestBroker--ParseUri")
        r = c.graph("GET", f"/users/{PRINTER}/mailFolders/SentItems/messages?$filter="
                           + urllib.parse.quote("subject eq 'x'"))
        self.assertGraphError(r, 400, "BadRequest")
        r = c.graph("GET", f"/users/{PRINTER}/mailFolders/Drafts/messages")
        self.assertGraphError(r, 400, "BadRequest")
        # a resend is a second message: both are in Sent Items
        self.assertEqual(c.send_mail(PRINTER, mime_message(message_id="<m2@p>")).status, 202)
        self.assertEqual(len(c.sent_items(PRINTER, "<m2@p>").json["value"]), 2)
        self.assertEqual([s.duplicate for s in m.sent()], [False, False, True])

    def test_sent_items_delay(self):
        c, m = self.client, self.mock
        m.sent_items_delay = 0.8
        self.assertEqual(c.send_mail(PRINTER, mime_message()).status, 202)
        self.assertEqual(c.sent_items(PRINTER, "<m1@printer.contoso.test>").json["value"], [])
        time.sleep(1.0)
        self.assertEqual(len(c.sent_items(PRINTER, "<m1@printer.contoso.test>").json["value"]), 1)
        m.sent_items_delay = float("inf")
        self.assertEqual(c.send_mail(PRINTER, mime_message(message_id="<never@p>")).status, 202)
        self.assertEqual(c.sent_items(PRINTER, "<never@p>").json["value"], [])

    # ---- throttling and latency ---------------------------------------------------------------------

    def test_mailbox_concurrency(self):
        c, m = self.client, self.mock
        m.latency = 1.0
        results = in_parallel([lambda i=i: c.send_mail(PRINTER, mime_message(message_id=f"<c{i}@p>"))
                               for i in range(5)])
        statuses = sorted(r.status for r in results)
        self.assertEqual(statuses, [202, 202, 202, 202, 429], m.diagnostics())
        throttled = next(r for r in results if r.status == 429)
        self.assertGraphError(throttled, 429, "ApplicationThrottled")
        self.assertEqual(throttled.json["error"]["message"],
                         "Application is over its MailboxConcurrency limit.")
        self.assertNotIn("retry-after", throttled.headers)
        self.assertEqual(m.max_concurrency(PRINTER), 5)
        self.assertEqual(len(m.sent()), 4)
        self.assertEqual([r.concurrency for r in m.requests("sendMail") if r.throttled], [5])

        # four per mailbox is fine, whatever other mailboxes do
        m.reset()
        c.login()
        m.throttle_retry_after = 3
        calls = [lambda mb=mb, i=i: c.send_mail(mb, mime_message(message_id=f"<{i}@p>"))
                 for mb in (PRINTER, SCANNER) for i in range(4)]
        self.assertEqual([r.status for r in in_parallel(calls)], [202] * 8, m.diagnostics())
        self.assertEqual(m.concurrency_peaks(), {PRINTER: 4, SCANNER: 4})
        self.assertGreaterEqual(m.max_concurrency(), 4)
        # and with throttle_retry_after, the 429 carries Retry-After
        results = in_parallel([lambda: c.send_mail(SCANNER, mime_message())] * 5)
        throttled = [r for r in results if r.status == 429]
        self.assertEqual(len(throttled), 1, m.diagnostics())
        self.assertEqual(throttled[0].headers["retry-after"], "3")

    def test_rate_and_upload_budgets(self):
        c, m = self.client, self.mock
        m.mailbox_request_limit, m.request_window = 3, 60
        for _ in range(3):
            self.assertEqual(c.send_mail(PRINTER, mime_message()).status, 202)
        r = c.send_mail(PRINTER, mime_message())
        self.assertGraphError(r, 429, "ApplicationThrottled")
        self.assertTrue(1 <= int(r.headers["retry-after"]) <= 60)
        self.assertEqual(c.send_mail(SCANNER, mime_message()).status, 202)   # per mailbox
        m.mailbox_request_limit = 10_000
        m.mailbox_upload_limit, m.upload_window = 1000, 30
        r = c.send_mail(SCANNER, mime_message(body=b"u" * 800))
        self.assertGraphError(r, 429, "ApplicationThrottled")
        self.assertIn("IncomingBytes", r.json["error"]["message"])
        self.assertTrue(1 <= int(r.headers["retry-after"]) <= 30)

    def test_latency(self):
        self.mock.latency = 0.4
        r = self.client.send_mail(PRINTER, mime_message())
        self.assertEqual(r.status, 202)
        self.assertGreaterEqual(r.elapsed, 0.4)

    # ---- scripted faults ----------------------------------------------------------------------------

    def test_faults(self):
        c, m = self.client, self.mock
        with self.subTest("429 without Retry-After"):
            m.fail_next(429)
            r = c.send_mail(PRINTER, mime_message())
            self.assertGraphError(r, 429, "ApplicationThrottled")
            self.assertNotIn("retry-after", r.headers)
        with self.subTest("429 with Retry-After"):
            m.fail_next(429, retry_after=2)
            self.assertEqual(c.send_mail(PRINTER, mime_message()).headers["retry-after"], "2")
        with self.subTest("503 with Retry-After"):
            m.fail_next(503, retry_after=5)
            r = c.send_mail(PRINTER, mime_message())
            self.assertEqual((r.status, r.headers["retry-after"]), (503, "5"))
        with self.subTest("500"):
            m.fail_next(500)
            self.assertEqual(c.send_mail(PRINTER, mime_message()).status, 500)
        with self.subTest("reset"):
            m.fail_next(reset=True)
            with self.assertRaises((ConnectionError, urllib.error.URLError, OSError)):
                c.send_mail(PRINTER, mime_message())
        self.assertEqual(m.sent(), [])              # none of those sent anything

        with self.subTest("delay: sent late"):
            m.fail_next(delay=0.3)
            r = c.send_mail(PRINTER, mime_message(message_id="<d@p>"))
            self.assertEqual(r.status, 202)
            self.assertGreaterEqual(r.elapsed, 0.3)
        with self.subTest("stall: sent, the client hears nothing"):
            m.fail_next(stall=1.5)
            with self.assertRaises((TimeoutError, socket.timeout, urllib.error.URLError, OSError)):
                c.send_mail(PRINTER, mime_message(message_id="<s@p>"), timeout=0.5)
            m.wait_for_sent(2)
        with self.subTest("accepted, then 504: a resend is a duplicate"):
            m.fail_next(504, accept=True)
            self.assertEqual(c.send_mail(PRINTER, mime_message(message_id="<x@p>")).status, 504)
            self.assertEqual(c.send_mail(PRINTER, mime_message(message_id="<x@p>")).status, 202)
            self.assertEqual([s.internet_message_id for s in m.duplicates()], ["<x@p>"])
            self.assertEqual(m.duplicate_recipients(), {"a@example.net": len(m.sent())})
        with self.subTest("accepted, then reset"):
            m.fail_next(reset=True, accept=True)
            with self.assertRaises((ConnectionError, urllib.error.URLError, OSError)):
                c.send_mail(PRINTER, mime_message(message_id="<r@p>"))
            self.assertEqual(m.sent()[-1].internet_message_id, "<r@p>")
        with self.subTest("other endpoints"):
            m.fail_next(503, endpoint="sentItems")
            self.assertEqual(c.sent_items(PRINTER, "<x@p>").status, 503)
            m.fail_next(503, endpoint="token")
            r = c.get_token(c.secret_form())
            self.assertEqual((r.status, r.json["error"]), (503, "temporarily_unavailable"))
            with self.assertRaises(ValueError):
                m.fail_next(500, endpoint="nonsense")
        self.assertEqual(m.pending_faults(), 0)

    # ---- inspection -----------------------------------------------------------------------------------

    def test_reset_and_diagnostics(self):
        c, m = self.client, self.mock
        self.assertEqual(c.send_mail(PRINTER, mime_message()).status, 202)
        self.assertEqual(len(m.wait_for_requests(1)), 1)
        self.assertIn("1 sent", m.diagnostics())
        self.assertIn("sendMail", m.diagnostics())
        m.reset()
        self.assertEqual((m.sent(), m.requests(), m.max_concurrency(PRINTER)), ([], [], 0))
        with self.assertRaises(AssertionError):
            m.wait_for_sent(1, timeout=0.2)


class MockGraphProcessTest(unittest.TestCase):

    def test_command_line(self):
        tmp = tempfile.mkdtemp(prefix="test-mock-graph-cli-")
        self.addCleanup(shutil.rmtree, tmp, True)
        proc = subprocess.Popen([sys.executable, os.path.join(HERE, "mock_graph.py"),
                                 "--state-dir", tmp, "--mailbox", PRINTER, "--quiet"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

        def kill():
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
            proc.stdout.close()
            proc.stderr.close()
        self.addCleanup(kill)
        info = {}
        for line in proc.stdout:
            line = line.strip()
            if line == "ready":
                break
            key, _, value = line.partition("=")
            info[key] = value
        self.assertEqual(set(info), {"endpoint", "graph_url", "ca_file", "token_url"})
        state_file = os.path.join(tmp, "mock-graph.json")
        self.assertEqual(stat.S_IMODE(os.stat(state_file).st_mode), 0o600)
        with open(state_file) as f:
            state = json.load(f)

        mock = dataclasses.make_dataclass("M", ["endpoint", "ca_file", "token_url", "graph_url",
                                                "client_id", "client_secret"])(
            info["endpoint"], info["ca_file"], info["token_url"], info["graph_url"],
            state["client_id"], state["client_secret"])
        mock.send_mail_url = lambda mb: f"{mock.graph_url}/users/{mb}/sendMail"
        client = Client(mock)
        client.login()
        mime = mime_message(message_id="<cli@p>")
        self.assertEqual(client.send_mail(PRINTER, mime).status, 202)
        self.assertEqual(client.send_mail("nobody@contoso.test", mime).status, 404)
        with open(os.path.join(tmp, "sent", "000001.eml"), "rb") as f:
            self.assertEqual(f.read(), mime)
        with open(os.path.join(tmp, "sent", "000001.json")) as f:
            self.assertEqual(json.load(f)["internet_message_id"], "<cli@p>")
        proc.send_signal(signal.SIGTERM)
        self.assertEqual(proc.wait(10), 0)
        self.assertIn("1 messages sent", proc.stderr.read())


if __name__ == "__main__":
    unittest.main()
