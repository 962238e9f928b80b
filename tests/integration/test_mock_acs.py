"""Tests of mock_acs.MockAcs, the loopback ACS Email / Entra token double, driven by an
INDEPENDENT client written here with urllib, hmac and hashlib (TLS verified against the
mock's CA; nothing here reuses the mock's signing code except to cross-check the vectors).

Run from the repository root (no root needed, loopback only, ~5 s):
    python3 -m unittest -v tests/integration/test_mock_acs.py

HMAC-SHA256 request signing (Azure SDK for Python, azure-communication-email
`_shared/policy.py`), worked examples for the C++ unit tests (acs_auth.hpp):

    string_to_sign = METHOD + "\\n" + path_and_query + "\\n" + x_ms_date + ";" + host + ";" + content_hash
    content_hash   = base64(sha256(body))                       -> header x-ms-content-sha256
    signature      = base64(HMAC-SHA256(base64decode(access_key), string_to_sign as UTF-8))
    Authorization: HMAC-SHA256 SignedHeaders=x-ms-date;host;x-ms-content-sha256&Signature=<signature>

Example 1 (POST, host without port):
    access_key     = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="   (bytes 0x00..0x1f)
    method         = "POST"
    path_and_query = "/emails:send?api-version=2023-03-31"
    x_ms_date      = "Mon, 23 Nov 2026 16:46:52 GMT"
    host           = "contoso.communication.azure.com"
    body (140 bytes, no trailing newline) =
        {"senderAddress":"donotreply@contoso.test","content":{"subject":"hi","plainText":"hello"},"recipients":{"to":[{"address":"a@example.net"}]}}
    content_hash   = "usssKoDokDlw0Vm/kwpoNl8J01CL4MPp7/wWdRV1NLc="
    string_to_sign = "POST\\n/emails:send?api-version=2023-03-31\\nMon, 23 Nov 2026 16:46:52 GMT;contoso.communication.azure.com;usssKoDokDlw0Vm/kwpoNl8J01CL4MPp7/wWdRV1NLc="
    signature      = "hhLo01KzkHS5l1lKGIWOcW6+HKIMMQPpW8pe6Er0g+g="

Example 2 (GET of the operation status, empty body, host WITH port as in the Host header):
    same access_key and x_ms_date, method "GET",
    path_and_query = "/emails/operations/8540c0de-899f-5cce-acb5-3ec493af3800?api-version=2023-03-31"
    host           = "127.0.0.1:8443"
    content_hash   = "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="   (sha256 of "")
    signature      = "CruMuB7s0LWePZWRpF86QtZwIUtsY9suddt44/8iito="

(Both also checked with `openssl dgst -sha256 -mac HMAC -macopt hexkey:0001...1f`.)
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import email.utils
import hashlib
import hmac
import http.client
import json
import os
import queue
import shutil
import socket
import ssl
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
import uuid
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import mock_acs  # noqa: E402
from mock_acs import MockAcs  # noqa: E402

OPENSSL = shutil.which("openssl") or "/usr/bin/openssl"

VECTOR_KEY = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
VECTOR_DATE = "Mon, 23 Nov 2026 16:46:52 GMT"
VECTOR_BODY = (b'{"senderAddress":"donotreply@contoso.test","content":{"subject":"hi",'
               b'"plainText":"hello"},"recipients":{"to":[{"address":"a@example.net"}]}}')
VECTORS = [
    # method, path_and_query, host, body, content_hash, signature
    ("POST", "/emails:send?api-version=2023-03-31", "contoso.communication.azure.com",
     VECTOR_BODY, "usssKoDokDlw0Vm/kwpoNl8J01CL4MPp7/wWdRV1NLc=",
     "hhLo01KzkHS5l1lKGIWOcW6+HKIMMQPpW8pe6Er0g+g="),
    ("GET", "/emails/operations/8540c0de-899f-5cce-acb5-3ec493af3800?api-version=2023-03-31",
     "127.0.0.1:8443", b"", "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=",
     "CruMuB7s0LWePZWRpF86QtZwIUtsY9suddt44/8iito="),
]
ACS_SCOPE = "https://communication.azure.com//.default"
DENIED = {"error": {"code": "Denied", "message": "Denied by the resource provider."}}


# --------------------------------------------------------------------------------------------
# the independent client
# --------------------------------------------------------------------------------------------

def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def rfc1123(when: float | None = None) -> str:
    return email.utils.formatdate(time.time() if when is None else when, usegmt=True)


def sign(access_key: str, method: str, path_and_query: str, host: str, body: bytes,
         date: str) -> dict[str, str]:
    content_hash = b64(hashlib.sha256(body).digest())
    to_sign = f"{method}\n{path_and_query}\n{date};{host};{content_hash}"
    signature = b64(hmac.new(base64.b64decode(access_key), to_sign.encode("utf-8"),
                             hashlib.sha256).digest())
    return {"x-ms-date": date, "x-ms-content-sha256": content_hash,
            "Authorization": "HMAC-SHA256 SignedHeaders=x-ms-date;host;x-ms-content-sha256"
                             f"&Signature={signature}"}


@dataclasses.dataclass
class Resp:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


class Client:
    """urllib-based ACS client with its own HMAC signer."""

    def __init__(self, endpoint: str, ca_file: str, access_key: str):
        self.endpoint = endpoint
        self.host = urllib.parse.urlsplit(endpoint).netloc
        self.access_key = access_key
        self.ctx = ssl.create_default_context(cafile=ca_file)

    @classmethod
    def for_mock(cls, mock: MockAcs) -> "Client":
        return cls(mock.endpoint, mock.ca_file, mock.access_key)

    def request(self, method: str, path: str, body: bytes = b"", *,
                headers: dict[str, str] | None = None, timeout: float = 5) -> Resp:
        req = urllib.request.Request(self.endpoint + path, data=body if method != "GET" else None,
                                     method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, context=self.ctx, timeout=timeout) as r:
                return Resp(r.status, {k.lower(): v for k, v in r.headers.items()}, r.read())
        except urllib.error.HTTPError as e:
            with e:
                return Resp(e.code, {k.lower(): v for k, v in e.headers.items()}, e.read())

    def send(self, message: Any = None, *, api_version: str | None = "2023-03-31",
             raw: bytes | None = None, operation_id: str | None = None,
             key: str | None = None, sign_it: bool = True, date: str | None = None,
             signed_body: bytes | None = None, signed_path: str | None = None,
             signed_host: str | None = None, content_hash: str | None = None,
             bearer: str | None = None, content_type: str = "application/json",
             extra: dict[str, str] | None = None, path: str | None = None,
             timeout: float = 5) -> Resp:
        body = raw if raw is not None else json.dumps(message).encode()
        if path is None:
            path = "/emails:send" + (f"?api-version={api_version}" if api_version else "")
        headers = {"Content-Type": content_type}
        if bearer is not None:
            headers["Authorization"] = f"Bearer {bearer}"
        elif sign_it:
            headers.update(sign(key or self.access_key, "POST", signed_path or path,
                                signed_host or self.host,
                                body if signed_body is None else signed_body,
                                date or rfc1123()))
        if content_hash is not None:
            headers["x-ms-content-sha256"] = content_hash
        if operation_id is not None:
            headers["Operation-Id"] = operation_id
        headers.update(extra or {})
        return self.request("POST", path, body, headers=headers, timeout=timeout)

    def get(self, path: str, *, bearer: str | None = None, sign_it: bool = True) -> Resp:
        headers = {}
        if bearer is not None:
            headers["Authorization"] = f"Bearer {bearer}"
        elif sign_it:
            headers = sign(self.access_key, "GET", path, self.host, b"", rfc1123())
        return self.request("GET", path, headers=headers)

    def token(self, token_url: str, form: dict[str, str]) -> Resp:
        path = urllib.parse.urlsplit(token_url).path
        return self.request("POST", path, urllib.parse.urlencode(form).encode(),
                            headers={"Content-Type": "application/x-www-form-urlencoded"})


def message(**over: Any) -> dict:
    msg = {"senderAddress": "donotreply@contoso.test",
           "content": {"subject": "hello", "plainText": "hi there"},
           "recipients": {"to": [{"address": "a@example.net", "displayName": "A"}]}}
    msg.update(over)
    return msg


def addresses(n: int, prefix: str = "r") -> list[dict]:
    return [{"address": f"{prefix}{i}@example.net"} for i in range(n)]


def repeat_headers(request_id: str, first_sent: float | str | None = None) -> dict[str, str]:
    """The OASIS repeatability headers; FIRST_SENT: epoch seconds or a literal header value."""
    if not isinstance(first_sent, str):
        first_sent = rfc1123(first_sent)
    return {"Repeatability-Request-Id": request_id, "Repeatability-First-Sent": first_sent}


TRANSPORT_ERRORS = (urllib.error.URLError, ConnectionError, http.client.HTTPException,
                    ssl.SSLError, TimeoutError, socket.timeout)


def openssl(*args: str, input: bytes | None = None) -> bytes:
    proc = subprocess.run([OPENSSL, *args], input=input, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)}: {proc.stderr.decode(errors='replace')}")
    return proc.stdout


# --------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------

class HmacVectorTest(unittest.TestCase):

    def test_worked_examples(self):
        for method, pq, host, body, want_hash, want_sig in VECTORS:
            with self.subTest(method=method):
                headers = sign(VECTOR_KEY, method, pq, host, body, VECTOR_DATE)
                self.assertEqual(headers["x-ms-content-sha256"], want_hash)
                self.assertEqual(headers["Authorization"],
                                 "HMAC-SHA256 SignedHeaders=x-ms-date;host;x-ms-content-sha256"
                                 f"&Signature={want_sig}")
                # the mock's verifier computes the same
                self.assertEqual(mock_acs.content_hash(body), want_hash)
                self.assertEqual(mock_acs.hmac_signature(VECTOR_KEY, method, pq, VECTOR_DATE,
                                                         host, want_hash), want_sig)

    def test_generated_access_key_is_32_random_bytes(self):
        a, b = mock_acs.generate_access_key(), mock_acs.generate_access_key()
        self.assertEqual(len(base64.b64decode(a, validate=True)), 32)
        self.assertNotEqual(a, b)


class MockAcsTest(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="test-mock-acs-")
        cls.addClassCleanup(shutil.rmtree, cls.tmp, True)
        # the app's certificate for JWT client assertions, and an unrelated key
        cnf = os.path.join(cls.tmp, "openssl.cnf")
        with open(cnf, "w") as f:
            f.write("[req]\ndistinguished_name = dn\nprompt = no\n[dn]\nCN = unused\n")
        cls.app_key = os.path.join(cls.tmp, "app.key")
        cls.app_cert = os.path.join(cls.tmp, "app.pem")
        openssl("req", "-x509", "-config", cnf, "-newkey", "rsa:2048", "-nodes",
                "-keyout", cls.app_key, "-out", cls.app_cert, "-days", "2",
                "-subj", "/CN=paas-milter test app")
        cls.other_key = os.path.join(cls.tmp, "other.key")
        openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048",
                "-out", cls.other_key)
        der = openssl("x509", "-in", cls.app_cert, "-outform", "DER")
        cls.x5t = b64url(hashlib.sha1(der).digest())
        cls.x5t_s256 = b64url(hashlib.sha256(der).digest())

        cls.mock = MockAcs(verified_domains=["contoso.test", "fabrikam.test"],
                           sender_usernames={"fabrikam.test": ["DoNotReply"]},
                           client_certificate=cls.app_cert).start()
        cls.addClassCleanup(cls.mock.stop)
        cls.client = Client.for_mock(cls.mock)

    def setUp(self):
        self.mock.reset()
        saved = {k: getattr(self.mock, k) for k in (
            "max_clock_skew", "max_request_bytes", "duplicate_status", "token_lifetime",
            "polls_before_success", "reexecute_repeated_operation_id", "repeatability_window",
            "clock")}
        saved["verified_domains"] = set(self.mock.verified_domains)
        self.addCleanup(lambda: [setattr(self.mock, k, v) for k, v in saved.items()])
        self.addCleanup(self.mock.clear_faults)

    def assertAcsError(self, resp: Resp, status: int, code: str, target: str | None = None):
        self.assertEqual(resp.status, status, resp.body)
        err = resp.json["error"]
        self.assertEqual(err["code"], code, resp.body)
        self.assertIsInstance(err["message"], str)
        self.assertEqual(resp.headers.get("x-ms-error-code"), code)
        if target is not None:
            self.assertEqual(err.get("target"), target, resp.body)

    # ---- basics ---------------------------------------------------------------------------

    def test_signed_request_is_accepted(self):
        self.assertTrue(self.mock.connection_string.startswith(
            f"endpoint=https://127.0.0.1:{self.mock.port}/;accesskey="))
        msg = message(headers={"X-Custom": "1"}, userEngagementTrackingDisabled=True,
                      replyTo=[{"address": "support@contoso.test", "displayName": "S"}],
                      attachments=[{"name": "a.pdf", "contentType": "application/pdf",
                                    "contentInBase64": b64(b"%PDF-1.4 test")}])
        msg["recipients"]["cc"] = [{"address": "c@example.net"}]
        msg["recipients"]["bcc"] = [{"address": "b@example.net"}]
        msg["content"]["html"] = "<p>hi</p>"
        r = self.client.send(msg, extra={"x-ms-client-request-id": "1377af77-47e8-4fb3-8e84-5a848305daea"})
        self.assertEqual(r.status, 202, r.body)
        op = r.json["id"]
        self.assertEqual(r.json, {"id": op, "status": "Running"})
        uuid.UUID(op)
        self.assertEqual(r.headers["operation-location"],
                         f"{self.mock.endpoint}/emails/operations/{op}?api-version=2023-03-31")
        self.assertEqual(r.headers["retry-after"], "20")
        uuid.UUID(r.headers["x-ms-request-id"])
        self.assertEqual(r.headers["x-ms-client-request-id"], "1377af77-47e8-4fb3-8e84-5a848305daea")
        self.assertEqual(int(r.headers["content-length"]), len(r.body))

        [acc] = self.mock.wait_for_accepted(1, timeout=2)
        self.assertEqual(acc.operation_id, op)
        self.assertEqual(acc.message, msg)
        self.assertEqual(acc.auth, "hmac")
        self.assertEqual(acc.sender, "donotreply@contoso.test")
        self.assertEqual(acc.addresses("bcc"), ["b@example.net"])
        rec = self.mock.requests("send")[0]
        self.assertTrue(rec.accepted and rec.auth_ok)
        self.assertEqual(rec.query, {"api-version": ["2023-03-31"]})

        # status polling
        loc = urllib.parse.urlsplit(r.headers["operation-location"])
        status_path = f"{loc.path}?{loc.query}"
        s = self.client.get(status_path)
        self.assertEqual((s.status, s.json), (200, {"id": op, "status": "Succeeded"}))
        self.assertNotIn("retry-after", s.headers)
        self.assertEqual(self.client.get(status_path, sign_it=False).json, DENIED)
        self.assertAcsError(self.client.get(f"/emails/operations/{uuid.uuid4()}?api-version=2023-03-31"),
                            404, "NotFound")

    def test_operation_status_progression(self):
        self.mock.polls_before_success = 1
        r = self.client.send(message())
        op = r.json["id"]
        path = f"/emails/operations/{op}?api-version=2023-03-31"
        first = self.client.get(path)
        self.assertEqual(first.json["status"], "Running")
        self.assertEqual(first.headers["retry-after"], "20")
        self.assertEqual(self.client.get(path).json["status"], "Succeeded")
        self.mock.set_operation_status(op, "Failed", error_code="EmailDropped")
        failed = self.client.get(path).json
        self.assertEqual(failed["status"], "Failed")
        self.assertEqual(failed["error"]["code"], "EmailDropped")

    def test_wrong_paths_and_methods(self):
        self.assertAcsError(self.client.send(message(), path="//emails:send?api-version=2023-03-31"),
                            404, "NotFound")
        self.assertEqual(self.client.get("/emails:send?api-version=2023-03-31").status, 405)
        self.assertEqual(self.mock.accepted_messages(), [])

    # ---- authentication ---------------------------------------------------------------------

    def test_hmac_failures_are_401(self):
        msg = message()
        body = json.dumps(msg).encode()
        other = json.dumps(message(content={"subject": "evil", "plainText": "x"})).encode()
        now = time.time()
        cases = {
            "wrong key": (dict(key=mock_acs.generate_access_key()), "signature mismatch"),
            "stale date": (dict(date=rfc1123(now - 400)), "off"),
            "future date": (dict(date=rfc1123(now + 400)), "off"),
            "non-RFC1123 date": (dict(date="2026-11-23T16:46:52Z"), "not an RFC 1123"),
            "wrong content hash": (dict(content_hash=b64(hashlib.sha256(other).digest())),
                                   "does not match the body"),
            "tampered body": (dict(raw=other, signed_body=body), "does not match the body"),
            "signed other query": (dict(signed_path="/emails:send?api-version=2025-09-01"),
                                   "signature mismatch"),
            "host without port": (dict(signed_host="127.0.0.1"), "signature mismatch"),
            "unsigned": (dict(sign_it=False), "no Authorization"),
            "unknown bearer": (dict(bearer="eyJhbGciOiJIUzI1NiJ9.e30.c2ln"), "not issued"),
        }
        for name, (kw, reason) in cases.items():
            with self.subTest(name):
                r = self.client.send(msg, **kw)
                self.assertEqual(r.status, 401, r.body)
                self.assertEqual(r.json, DENIED)
                self.assertEqual(r.headers["x-ms-error-code"], "Denied")
                self.assertIn(reason, r.headers.get("x-mock-auth-error", ""))
        with self.subTest("SignedHeaders in another order"):
            headers = sign(self.mock.access_key, "POST", "/emails:send?api-version=2023-03-31",
                           self.client.host, body, rfc1123())
            headers["Authorization"] = headers["Authorization"].replace(
                "x-ms-date;host;x-ms-content-sha256", "host;x-ms-date;x-ms-content-sha256")
            headers["Content-Type"] = "application/json"
            r = self.client.request("POST", "/emails:send?api-version=2023-03-31", body,
                                    headers=headers)
            self.assertEqual(r.status, 401)
        self.assertEqual(self.mock.accepted_messages(), [])
        self.assertTrue(all(not rec.auth_ok for rec in self.mock.requests("send")))

    def test_clock_skew_is_configurable(self):
        self.mock.max_clock_skew = 1000
        self.assertEqual(self.client.send(message(), date=rfc1123(time.time() - 400)).status, 202)

    # ---- body validation --------------------------------------------------------------------

    def test_schema_violations(self):
        def m(fn):
            msg = message()
            fn(msg)
            return msg

        def setp(path, value):
            def fn(msg):
                obj = msg
                for p in path[:-1]:
                    obj = obj[p]
                obj[path[-1]] = value
            return fn

        def delp(*path):
            def fn(msg):
                obj = msg
                for p in path[:-1]:
                    obj = obj[p]
                del obj[path[-1]]
            return fn

        att = {"name": "a.txt", "contentType": "text/plain", "contentInBase64": "aGk="}
        cases = [
            ("not JSON", dict(raw=b"{not json"), 400, "BadRequest", "emailMessage"),
            ("array body", dict(raw=b"[]"), 400, "BadRequest", "emailMessage"),
            ("no senderAddress", m(delp("senderAddress")), 400, "BadRequest", "senderAddress"),
            ("senderAddress number", m(setp(["senderAddress"], 5)), 400, "BadRequest", "senderAddress"),
            ("senderAddress malformed", m(setp(["senderAddress"], "nobody")), 400, "BadRequest",
             "senderAddress"),
            ("no content", m(delp("content")), 400, "BadRequest", "content"),
            ("no subject", m(delp("content", "subject")), 400, "BadRequest", "content.subject"),
            ("subject number", m(setp(["content", "subject"], 1)), 400, "BadRequest", "content.subject"),
            ("no plainText nor html", m(delp("content", "plainText")), 400, "BadRequest", "content"),
            ("html number", m(setp(["content", "html"], 1)), 400, "BadRequest", "content.html"),
            ("unknown content field", m(setp(["content", "text"], "x")), 400, "BadRequest",
             "content.text"),
            ("no recipients", m(delp("recipients")), 400, "BadRequest", "recipients"),
            ("empty recipients", m(setp(["recipients"], {})), 400, "BadRequest", "recipients"),
            ("empty to", m(setp(["recipients", "to"], [])), 400, "BadRequest", "recipients"),
            ("to not array", m(setp(["recipients", "to"], {"address": "a@example.net"})), 400,
             "BadRequest", "recipients.to"),
            ("unknown recipients field", m(setp(["recipients", "too"], [])), 400, "BadRequest",
             "recipients.too"),
            ("recipient without address", m(setp(["recipients", "to"], [{"displayName": "A"}])),
             400, "BadRequest", "recipients.to[0].address"),
            ("recipient bad address", m(setp(["recipients", "to"], [{"address": "a.example.net"}])),
             400, "BadRequest", "recipients.to[0].address"),
            ("recipient unknown field", m(setp(["recipients", "to"],
                                               [{"address": "a@example.net", "name": "A"}])),
             400, "BadRequest", "recipients.to[0].name"),
            ("cc displayName number", m(setp(["recipients", "cc"],
                                             [{"address": "c@example.net", "displayName": 7}])),
             400, "BadRequest", "recipients.cc[0].displayName"),
            ("replyTo not array", m(setp(["replyTo"], "r@example.net")), 400, "BadRequest", "replyTo"),
            ("attachments not array", m(setp(["attachments"], att)), 400, "BadRequest", "attachments"),
            ("attachment without contentType",
             m(setp(["attachments"], [{"name": "a.txt", "contentInBase64": "aGk="}])),
             400, "BadRequest", "attachments[0].contentType"),
            ("attachment bad base64", m(setp(["attachments"], [dict(att, contentInBase64="a*k=")])),
             400, "BadRequest", "attachments[0].contentInBase64"),
            ("attachment bad padding", m(setp(["attachments"], [dict(att, contentInBase64="aGk")])),
             400, "BadRequest", "attachments[0].contentInBase64"),
            ("headers not object", m(setp(["headers"], ["X-A: 1"])), 400, "BadRequest", "headers"),
            ("header value number", m(setp(["headers"], {"X-Custom": 1})), 400, "BadRequest",
             "headers.X-Custom"),
            ("tracking flag string", m(setp(["userEngagementTrackingDisabled"], "yes")), 400,
             "BadRequest", "userEngagementTrackingDisabled"),
            ("unknown top-level field", m(setp(["from"], "x@contoso.test")), 400, "BadRequest", "from"),
            ("51 recipients", m(setp(["recipients"], {"to": addresses(20, "t"), "cc": addresses(20, "c"),
                                                      "bcc": addresses(11, "b")})),
             400, "BadRequest", "recipients"),
            ("unlinked domain", m(setp(["senderAddress"], "donotreply@unverified.test")), 404,
             "DomainNotLinked", "senderAddress"),
            ("sender username not allowed", m(setp(["senderAddress"], "someone@fabrikam.test")), 400,
             "InvalidSenderUserName", "senderAddress"),
        ]
        for name, msg, status, code, target in cases:
            with self.subTest(name):
                kw = msg if name in ("not JSON", "array body") else {"message": msg}
                self.assertAcsError(self.client.send(**kw), status, code, target)
        with self.subTest("DomainNotLinked message"):
            r = self.client.send(message(senderAddress="x@unverified.test"))
            self.assertEqual(r.json["error"]["message"], "The specified sender domain has not been linked.")
        self.assertEqual(self.mock.accepted_messages(), [])

        # request-level violations
        self.assertAcsError(self.client.send(message(), api_version=None), 400,
                            "MissingApiVersionParameter")
        self.assertAcsError(self.client.send(message(), api_version="2024-01-01"), 400,
                            "UnsupportedApiVersion")
        self.assertAcsError(self.client.send(message(), content_type="text/plain"), 415,
                            "UnsupportedMediaType")
        self.assertAcsError(self.client.send(message(), operation_id="not-a-uuid"), 400,
                            "BadRequest", "Operation-Id")

        # the boundaries that are fine
        ok = [
            message(recipients={"to": addresses(20, "t"), "cc": addresses(20, "c"),
                                "bcc": addresses(10, "b")}),
            message(recipients={"bcc": [{"address": "only-bcc@example.net"}]}),
            message(content={"subject": "", "html": "<p>x</p>", "plainText": None}),
            message(senderAddress="DoNotReply@Fabrikam.test"),
            message(attachments=[dict(att, contentInBase64="")], headers={}, replyTo=None),
        ]
        for i, msg in enumerate(ok):
            with self.subTest(ok=i):
                self.assertEqual(self.client.send(msg).status, 202)
        self.assertEqual(len(self.mock.accepted_messages()), len(ok))

    def test_content_id_only_with_2025_09_01(self):
        msg = message(attachments=[{"name": "logo.png", "contentType": "image/png",
                                    "contentInBase64": b64(b"\x89PNG"), "contentId": "logo"}])
        msg["content"]["html"] = '<img src="cid:logo">'
        self.assertAcsError(self.client.send(msg, api_version="2023-03-31"), 400, "BadRequest",
                            "attachments[0].contentId")
        r = self.client.send(msg, api_version="2025-09-01")
        self.assertEqual(r.status, 202, r.body)
        self.assertTrue(r.headers["operation-location"].endswith("?api-version=2025-09-01"))
        [acc] = self.mock.accepted_messages()
        self.assertEqual(acc.api_version, "2025-09-01")

    def test_request_size_limit(self):
        self.mock.max_request_bytes = 4096
        big = message(content={"subject": "big", "plainText": "x" * 5000})
        self.assertAcsError(self.client.send(big), 413, "RequestEntityTooLarge")
        fits = message(content={"subject": "fits", "plainText": "x" * 3500})
        self.assertEqual(self.client.send(fits).status, 202)
        # with Expect: 100-continue the 413 comes before the body is sent
        with socket.create_connection(("127.0.0.1", self.mock.port), timeout=5) as raw:
            with self.client.ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                s.sendall(b"POST /emails:send?api-version=2023-03-31 HTTP/1.1\r\n"
                          b"Host: " + self.client.host.encode() + b"\r\n"
                          b"Content-Type: application/json\r\nContent-Length: 100000\r\n"
                          b"Expect: 100-continue\r\n\r\n")
                head = s.recv(4096)
        self.assertTrue(head.startswith(b"HTTP/1.1 413 "), head)
        self.assertEqual(len(self.mock.accepted_messages()), 1)

    # ---- idempotency ------------------------------------------------------------------------

    def test_operation_id_idempotency(self):
        op = str(uuid.uuid4())
        first = self.client.send(message(), operation_id=op)
        second = self.client.send(message(), operation_id=op)
        third = self.client.send(message(), operation_id=op.upper())
        for r in (first, second):
            self.assertEqual(r.status, 202)
            self.assertEqual(r.json, {"id": op, "status": "Running"})
            self.assertEqual(r.headers["operation-location"], first.headers["operation-location"])
        self.assertEqual((third.status, third.json["id"]), (202, op))
        self.assertEqual(len(self.mock.accepted_messages()), 1)
        self.assertEqual([r.duplicate for r in self.mock.requests("send")], [False, True, True])

        other = self.client.send(message(), operation_id=str(uuid.uuid4()))
        gen1, gen2 = self.client.send(message()), self.client.send(message())
        self.assertEqual(other.status, 202)
        self.assertNotEqual(gen1.json["id"], gen2.json["id"])
        uuid.UUID(gen1.json["id"])
        self.assertEqual(len(self.mock.accepted_messages()), 4)

        self.mock.duplicate_status = 409
        self.assertAcsError(self.client.send(message(), operation_id=op), 409, "Conflict")
        self.assertEqual(len(self.mock.accepted_messages()), 4)

    def test_operation_id_reexecution_mode(self):
        m = self.mock
        m.reexecute_repeated_operation_id = True
        m.duplicate_status = 409   # ignored in this mode
        op = str(uuid.uuid4())
        answers = [self.client.send(message(), operation_id=o) for o in (op, op, op.upper())]
        for r in answers:
            self.assertEqual(r.status, 202, r.body)
            self.assertEqual(r.json, {"id": op, "status": "Running"})
        accepted = m.accepted_messages()
        self.assertEqual([a.operation_id for a in accepted], [op] * 3)
        self.assertEqual([a.execution for a in accepted], [1, 2, 3])
        self.assertEqual([a.duplicate for a in accepted], [False, True, True])
        recs = m.requests("send")
        self.assertEqual([(r.accepted, r.duplicate) for r in recs],
                         [(True, False), (True, True), (True, True)])
        self.assertEqual(m.recipient_counts(), {"a@example.net": 3})
        self.assertEqual(m.duplicate_recipients(), {"a@example.net": 3})
        self.assertEqual(self.client.get(f"/emails/operations/{op}?api-version=2023-03-31").status,
                         200)
        # back to the default: deduplicated again, nothing more recorded
        m.reexecute_repeated_operation_id = False
        m.duplicate_status = 202
        self.assertEqual(self.client.send(message(), operation_id=op).status, 202)
        self.assertEqual(len(m.accepted_messages()), 3)

    def test_operation_status_is_404_unless_accepted_at_least_once(self):
        m = self.mock
        never: dict[str, int] = {}

        def post(expect: int, **kw: Any) -> str:
            op = str(uuid.uuid4())
            try:
                r = self.client.send(kw.pop("msg", message()), operation_id=op, **kw)
                self.assertEqual(r.status, expect, r.body)
            except TRANSPORT_ERRORS:
                self.assertIsNone(expect)
            return op

        m.fail_next(503)
        never["503 fault"] = post(503)
        m.fail_next(500)
        never["500 fault"] = post(500)
        m.fail_next(429, retry_after=1)
        never["429 fault"] = post(429)
        m.fail_next(409)
        never["409 fault"] = post(409)
        m.fail_next(reset=True)
        never["reset"] = post(None)
        never["schema 400"] = post(400, msg=message(recipients={"to": [{"address": "bad"}]}))
        never["unlinked 404"] = post(404, msg=message(senderAddress="x@unverified.test"))
        never["401"] = post(401, sign_it=False)
        never["412"] = post(412, extra=repeat_headers(str(uuid.uuid4()), time.time() - 400))
        m.fail_next(504, accept=True)
        went_out = post(504)
        plain = post(202)
        for name, op in never.items():
            with self.subTest(name):
                self.assertAcsError(self.client.get(f"/emails/operations/{op}?api-version=2023-03-31"),
                                    404, "NotFound")
        for op in (went_out, plain):
            s = self.client.get(f"/emails/operations/{op}?api-version=2023-03-31")
            self.assertEqual((s.status, s.json["id"]), (200, op))
        self.assertEqual([a.operation_id for a in m.accepted_messages()], [went_out, plain])

    def test_recipient_counts(self):
        m = self.mock
        self.assertEqual(m.recipient_counts(), {})
        first = message(recipients={"to": [{"address": "x@example.net"}, {"address": "y@example.net"}],
                                    "cc": [{"address": "z@example.net"}],
                                    "bcc": [{"address": "x@example.net"}]})
        self.assertEqual(self.client.send(first).status, 202)
        self.assertEqual(self.client.send(message(recipients={"bcc": [{"address": "Y@example.net"}]})).status,
                         202)
        self.assertEqual(m.accepted_messages()[0].recipients(),
                         ["x@example.net", "y@example.net", "z@example.net", "x@example.net"])
        self.assertEqual(m.recipient_counts(), {"x@example.net": 2, "y@example.net": 1,
                                                "z@example.net": 1, "Y@example.net": 1})
        self.assertEqual(m.recipient_counts(fold_case=True),
                         {"x@example.net": 2, "y@example.net": 2, "z@example.net": 1})
        self.assertEqual(m.duplicate_recipients(), {"x@example.net": 2})
        # rejected and faulted requests count for nothing
        m.fail_next(503)
        self.assertEqual(self.client.send(message()).status, 503)
        self.assertEqual(self.client.send(message(senderAddress="x@unverified.test")).status, 404)
        self.assertNotIn("a@example.net", m.recipient_counts())

    # ---- repeatable requests (OASIS, learn.microsoft.com/rest/api/communication/repeatable-requests)

    def rsend(self, rid: str, first_sent: float | str | None = None, msg: Any = None,
              **kw: Any) -> Resp:
        extra = dict(kw.pop("extra", None) or {})
        extra.update(repeat_headers(rid, first_sent))
        return self.client.send(message() if msg is None else msg, extra=extra, **kw)

    def wait_until(self, what, timeout: float = 3.0) -> None:
        deadline = time.monotonic() + timeout
        while not what():
            if time.monotonic() > deadline:
                self.fail(f"timed out waiting\n{self.mock.diagnostics()}")
            time.sleep(0.01)

    def test_repeatability_malformed_headers_are_400(self):
        m = self.mock
        m.fail_next(503)   # not taken: the headers are checked first
        guid, date = str(uuid.uuid4()), rfc1123()
        cases = {
            "only the id": ({"Repeatability-Request-Id": guid}, "Repeatability-First-Sent"),
            "only First-Sent": ({"Repeatability-First-Sent": date}, "Repeatability-Request-Id"),
            "id not a GUID": (repeat_headers("request-1", date), "Repeatability-Request-Id"),
            "id in braces": (repeat_headers("{" + guid + "}", date), "Repeatability-Request-Id"),
            "empty id": (repeat_headers("", date), "Repeatability-Request-Id"),
            "ISO date": (repeat_headers(guid, "2026-12-04T12:00:00Z"), "Repeatability-First-Sent"),
            "wrong weekday": (repeat_headers(guid, "Thu, 04 Dec 2026 12:00:00 GMT"),
                              "Repeatability-First-Sent"),
            "offset not GMT": (repeat_headers(guid, "Fri, 04 Dec 2026 12:00:00 +0000"),
                               "Repeatability-First-Sent"),
            "epoch seconds": (repeat_headers(guid, str(int(time.time()))), "Repeatability-First-Sent"),
        }
        for name, (headers, target) in cases.items():
            with self.subTest(name):
                r = self.client.send(message(), extra=headers)
                self.assertAcsError(r, 400, "BadRequest", target)
                self.assertEqual(r.headers.get("repeatability-result"), "rejected")
                self.assertEqual(m.requests("send")[-1].repeatability, "malformed")
        self.assertEqual(m.accepted_messages(), [])
        self.assertIsNone(m.repeatability_entry(guid))
        self.assertEqual(m.pending_faults(), 1)
        # the real date of the example is a Friday: fine (inside the window per the clock)
        m.clock = lambda: email.utils.parsedate_to_datetime(
            "Fri, 04 Dec 2026 12:00:30 GMT").timestamp()
        m.clear_faults()
        r = self.client.send(message(), extra=repeat_headers(guid, "Fri, 04 Dec 2026 12:00:00 GMT"))
        self.assertEqual(r.status, 202, r.body)
        self.assertEqual(r.headers.get("repeatability-result"), "accepted")
        # without any repeatability header: no Repeatability-Result
        self.assertNotIn("repeatability-result", self.client.send(message()).headers)

    def test_repeatability_first_sent_window(self):
        m = self.mock
        now = time.time()
        r = self.rsend(str(uuid.uuid4()), now - 301)
        self.assertAcsError(r, 412, "PreconditionFailed", "Repeatability-First-Sent")
        self.assertEqual(r.headers["repeatability-result"], "rejected")
        r = self.rsend(str(uuid.uuid4()), now + m.max_clock_skew + 100)
        self.assertAcsError(r, 412, "PreconditionFailed", "Repeatability-First-Sent")
        self.assertEqual([x.repeatability for x in m.requests("send")], ["expired", "future"])
        self.assertEqual(m.accepted_messages(), [])
        self.assertEqual(self.rsend(str(uuid.uuid4()), now - 290).status, 202)
        self.assertEqual(self.rsend(str(uuid.uuid4()), now + 10).status, 202)
        m.repeatability_window = 10
        self.assertEqual(self.rsend(str(uuid.uuid4()), now - 20).status, 412)
        m.repeatability_window = 300

        # the window, with an injected clock instead of sleeping
        rid, first = str(uuid.uuid4()), time.time()
        original = self.rsend(rid, first, msg=message(recipients={"to": [{"address": "w@example.net"}]}))
        self.assertEqual(original.status, 202)
        m.clock = lambda: time.time() + 250
        again = self.rsend(rid, first, msg=message(recipients={"to": [{"address": "w@example.net"}]}))
        self.assertEqual((again.status, again.json), (202, original.json))
        self.assertTrue(m.requests("send")[-1].replayed)
        m.clock = lambda: time.time() + 302
        late = self.rsend(rid, first, msg=message(recipients={"to": [{"address": "w@example.net"}]}))
        self.assertAcsError(late, 412, "PreconditionFailed")
        self.assertIsNone(m.repeatability_entry(rid))            # forgotten
        self.assertEqual(m.recipient_counts()["w@example.net"], 1)
        # worst legal case: a client that refreshes First-Sent on its repeat is no longer
        # recognised once the original's window is over - executed again, sent twice
        bug = self.rsend(rid, m.clock(), msg=message(recipients={"to": [{"address": "w@example.net"}]}))
        self.assertEqual(bug.status, 202)
        self.assertNotEqual(bug.json["id"], original.json["id"])
        self.assertEqual(m.requests("send")[-1].repeatability, "new")
        self.assertEqual(m.recipient_counts()["w@example.net"], 2)

    def test_repeat_of_a_2xx_is_the_same_answer(self):
        m = self.mock
        rid, first = str(uuid.uuid4()), time.time()
        r1 = self.rsend(rid, first, extra={"x-ms-client-request-id": "one"})
        self.assertEqual(r1.status, 202, r1.body)
        self.assertEqual(r1.headers["repeatability-result"], "accepted")
        m.fail_next(503)   # a replay is not executed: it takes no fault
        # a later attempt: signed anew (other x-ms-date, other signature), same body
        r2 = self.rsend(rid.upper(), first, date=rfc1123(time.time() - 60),
                        extra={"x-ms-client-request-id": "two"})
        self.assertEqual((r2.status, r2.json), (202, r1.json))
        for h in ("operation-location", "retry-after", "repeatability-result"):
            self.assertEqual(r2.headers[h], r1.headers[h], h)
        self.assertNotEqual(r2.headers["x-ms-request-id"], r1.headers["x-ms-request-id"])
        self.assertEqual(r2.headers["x-ms-client-request-id"], "two")
        self.assertEqual(m.pending_faults(), 1)
        self.assertEqual(len(m.accepted_messages()), 1)
        rec1, rec2 = m.requests("send")
        self.assertEqual((rec1.repeatability, rec1.accepted, rec1.replayed), ("new", True, False))
        self.assertEqual((rec2.repeatability, rec2.accepted, rec2.replayed), ("replayed", False, True))
        self.assertEqual(rec2.operation_id, r1.json["id"])
        self.assertEqual(rec2.repeatability_id, rid)
        entry = m.repeatability_entry(rid.upper())
        self.assertEqual((entry.state, entry.status, entry.executions, entry.requests),
                         ("done", 202, 1, [rec1.seq, rec2.seq]))
        self.assertEqual(entry.body_sha256, hashlib.sha256(rec1.body).hexdigest())

    def test_repeat_of_a_4xx_is_the_same_answer(self):
        m = self.mock
        with self.subTest("404 DomainNotLinked stays 404"):
            rid, first = str(uuid.uuid4()), time.time()
            msg = message(senderAddress="info@later.test")
            self.assertAcsError(self.rsend(rid, first, msg=msg), 404, "DomainNotLinked")
            m.verified_domains.add("later.test")     # would be accepted now...
            r = self.rsend(rid, first, msg=msg)
            self.assertAcsError(r, 404, "DomainNotLinked", "senderAddress")   # ...but is replayed
            self.assertEqual(r.headers["repeatability-result"], "accepted")
            self.assertTrue(m.requests("send")[-1].replayed)
            self.assertEqual(self.rsend(str(uuid.uuid4()), msg=msg).status, 202)  # a new id runs
        accepted = len(m.accepted_messages())
        with self.subTest("429 with Retry-After stays 429"):
            rid, first = str(uuid.uuid4()), time.time()
            m.fail_next(429, retry_after=3)
            for _ in range(2):
                r = self.rsend(rid, first)
                self.assertAcsError(r, 429, "TooManyRequests")
                self.assertEqual(r.headers["retry-after"], "3")
            self.assertEqual(m.pending_faults(), 0)
            self.assertEqual([x.repeatability for x in m.requests("send")[-2:]], ["new", "replayed"])
        with self.subTest("429 without Retry-After"):
            rid, first = str(uuid.uuid4()), time.time()
            m.fail_next(429)
            for _ in range(2):
                r = self.rsend(rid, first)
                self.assertAcsError(r, 429, "TooManyRequests")
                self.assertNotIn("retry-after", r.headers)
        with self.subTest("409 stays 409"):
            rid, first = str(uuid.uuid4()), time.time()
            m.fail_next(409, code="Conflict")
            self.assertAcsError(self.rsend(rid, first), 409, "Conflict")
            self.assertAcsError(self.rsend(rid, first), 409, "Conflict")
            self.assertTrue(m.requests("send")[-1].replayed)
        self.assertEqual(len(m.accepted_messages()), accepted)

    def test_repeat_of_a_5xx_is_executed_again(self):
        m = self.mock

        def to(addr: str) -> dict:
            return message(recipients={"to": [{"address": addr}]})

        with self.subTest("503 before processing: the repeat is the first execution"):
            rid, first = str(uuid.uuid4()), time.time()
            m.fail_next(503)
            self.assertEqual(self.rsend(rid, first, msg=to("p@example.net")).status, 503)
            r = self.rsend(rid, first, msg=to("p@example.net"))
            self.assertEqual((r.status, r.headers["repeatability-result"]), (202, "accepted"))
            self.assertEqual(m.requests("send")[-1].repeatability, "reexecuted")
            self.assertEqual(self.rsend(rid, first, msg=to("p@example.net")).json, r.json)  # now replayed
            entry = m.repeatability_entry(rid)
            self.assertEqual((entry.status, entry.executions), (202, 2))
            self.assertEqual(m.recipient_counts()["p@example.net"], 1)
        with self.subTest("503 AFTER the message went out, no Operation-Id: sent twice"):
            rid, first = str(uuid.uuid4()), time.time()
            m.fail_next(503, accept=True)
            r1 = self.rsend(rid, first, msg=to("q@example.net"))
            self.assertAcsError(r1, 503, "ServiceUnavailable")
            r2 = self.rsend(rid, first, msg=to("q@example.net"))
            self.assertEqual(r2.status, 202)
            self.assertEqual(m.recipient_counts()["q@example.net"], 2)
            ops = [a.operation_id for a in m.accepted_messages() if a.recipients() == ["q@example.net"]]
            self.assertEqual(len(set(ops)), 2)
        with self.subTest("504 after it went out, same Operation-Id, dedup mode: once"):
            rid, first, op = str(uuid.uuid4()), time.time(), str(uuid.uuid4())
            m.fail_next(504, accept=True)
            self.assertEqual(self.rsend(rid, first, msg=to("s@example.net"), operation_id=op).status, 504)
            r = self.rsend(rid, first, msg=to("s@example.net"), operation_id=op)
            self.assertEqual((r.status, r.json["id"]), (202, op))
            self.assertTrue(m.requests("send")[-1].duplicate)
            self.assertEqual(m.recipient_counts()["s@example.net"], 1)
        with self.subTest("500 after it went out, same Operation-Id, re-execute mode: twice"):
            m.reexecute_repeated_operation_id = True
            rid, first, op = str(uuid.uuid4()), time.time(), str(uuid.uuid4())
            m.fail_next(500, accept=True)
            self.assertEqual(self.rsend(rid, first, msg=to("t@example.net"), operation_id=op).status, 500)
            self.assertEqual(self.rsend(rid, first, msg=to("t@example.net"), operation_id=op).status, 202)
            mine = [a for a in m.accepted_messages() if a.operation_id == op]
            self.assertEqual([a.execution for a in mine], [1, 2])
            self.assertEqual(m.duplicate_recipients(), {"q@example.net": 2, "t@example.net": 2})

    def test_repeat_with_another_body_is_400(self):
        m = self.mock
        rid, first = str(uuid.uuid4()), time.time()
        r1 = self.rsend(rid, first)
        self.assertEqual(r1.status, 202)
        other = message(content={"subject": "hello", "plainText": "hi there!"})
        r = self.rsend(rid, first, msg=other)
        self.assertAcsError(r, 400, "BadRequest", "Repeatability-Request-Id")
        self.assertEqual(r.headers["repeatability-result"], "rejected")
        self.assertEqual(m.requests("send")[-1].repeatability, "mismatch")
        # the same JSON serialised differently is other bytes: also a mismatch
        raw = json.dumps(message(), indent=1).encode()
        self.assertEqual(self.client.send(raw=raw, extra=repeat_headers(rid, first)).status, 400)
        self.assertEqual(len(m.accepted_messages()), 1)
        self.assertEqual(self.rsend(rid, first).json, r1.json)   # the original still replays

    def test_repeat_while_the_original_is_in_progress_is_409(self):
        m = self.mock
        for kind in ("hold", "delay"):
            with self.subTest(kind):
                m.reset()
                rid, first = str(uuid.uuid4()), time.time()
                m.fail_next(**{kind: 1.0})
                out: dict[str, Any] = {}

                def original() -> None:
                    started = time.monotonic()
                    out["resp"] = self.rsend(rid, first)
                    out["took"] = time.monotonic() - started
                t = threading.Thread(target=original)
                t.start()
                self.wait_until(lambda: m.repeatability_entry(rid) is not None)
                self.assertEqual(len(m.accepted_messages()), 1 if kind == "hold" else 0)
                r = self.rsend(rid, first)
                self.assertAcsError(r, 409, "Conflict")
                self.assertEqual(r.headers["repeatability-result"], "accepted")
                self.assertEqual(m.requests("send")[-1].repeatability, "in-progress")
                self.assertEqual(m.repeatability_entry(rid).state, "in-progress")
                t.join(5)
                self.assertEqual(out["resp"].status, 202)
                self.assertGreaterEqual(out["took"], 0.9)
                after = self.rsend(rid, first)
                self.assertEqual((after.status, after.json), (202, out["resp"].json))
                self.assertEqual(len(m.accepted_messages()), 1)
                self.assertEqual([x.repeatability for x in m.requests("send")],
                                 ["new", "in-progress", "replayed"])

    def test_repeatability_needs_authentication(self):
        m = self.mock
        rid, first = str(uuid.uuid4()), time.time()
        r = self.rsend(rid, first, sign_it=False)
        self.assertEqual((r.status, r.json), (401, DENIED))
        self.assertNotIn("repeatability-result", r.headers)
        self.assertIsNone(m.repeatability_entry(rid))          # a 401 is not remembered
        ok = self.rsend(rid, first)
        self.assertEqual(ok.status, 202)
        self.assertEqual(m.requests("send")[-1].repeatability, "new")
        bad = self.rsend(rid, first, key=mock_acs.generate_access_key())
        self.assertEqual((bad.status, bad.json), (401, DENIED))  # no replay without auth
        self.assertEqual(m.repeatability_entry(rid).requests, [m.requests("send")[1].seq])
        self.assertEqual(self.rsend(rid, first).json, ok.json)

    def test_ambiguous_outcomes_with_repeats(self):
        m = self.mock
        with self.subTest("reset before processing: not remembered, the repeat runs"):
            rid, first = str(uuid.uuid4()), time.time()
            m.fail_next(reset=True)
            with self.assertRaises(TRANSPORT_ERRORS):
                self.rsend(rid, first)
            self.assertIsNone(m.repeatability_entry(rid))
            self.assertEqual(m.accepted_messages(), [])
            self.assertEqual(self.rsend(rid, first).status, 202)
            self.assertEqual(m.requests("send")[-1].repeatability, "new")
        m.reset()
        with self.subTest("(b) accepted, then reset: the repeat gets the 202"):
            rid, first = str(uuid.uuid4()), time.time()
            m.fail_next(reset=True, accept=True)
            with self.assertRaises(TRANSPORT_ERRORS):
                self.rsend(rid, first)
            [acc] = m.accepted_messages()
            self.assertIsNone(acc.request.status)
            op = acc.operation_id
            self.assertEqual(self.client.get(f"/emails/operations/{op}?api-version=2023-03-31").status,
                             200)
            r = self.rsend(rid, first)
            self.assertEqual((r.status, r.json["id"]), (202, op))
            self.assertTrue(m.requests("send")[-1].replayed)
            self.assertEqual(len(m.accepted_messages()), 1)
        m.reset()
        with self.subTest("(a) accepted, then no answer until the client gives up"):
            rid, first = str(uuid.uuid4()), time.time()
            m.fail_next(stall=1.5)
            started = time.monotonic()
            with self.assertRaises(TRANSPORT_ERRORS):
                self.rsend(rid, first, timeout=0.3)
            self.assertLess(time.monotonic() - started, 1.2)
            [acc] = m.accepted_messages()
            op = acc.operation_id
            self.assertEqual(self.client.get(f"/emails/operations/{op}?api-version=2023-03-31").status,
                             200)
            self.assertAcsError(self.rsend(rid, first), 409, "Conflict")   # still in progress
            self.wait_until(lambda: m.repeatability_entry(rid).state == "done", timeout=3)
            stalled = m.requests("send")[0]
            self.assertIsNone(stalled.status)
            r = self.rsend(rid, first)
            self.assertEqual((r.status, r.json["id"]), (202, op))
            self.assertEqual(len(m.accepted_messages()), 1)
        m.reset()
        with self.subTest("(c) accepted, then 500/503/504"):
            for status in (500, 503, 504):
                m.fail_next(status, accept=True)
                op = str(uuid.uuid4())
                self.assertEqual(self.client.send(message(), operation_id=op).status, status)
                self.assertEqual(m.accepted_messages()[-1].operation_id, op)
                self.assertEqual(
                    self.client.get(f"/emails/operations/{op}?api-version=2023-03-31").json["id"], op)
            self.assertEqual(len(m.accepted_messages()), 3)

    def test_fault_keywords(self):
        m = self.mock
        for kw in (dict(), dict(status=503, stall=1), dict(reset=True, stall=1), dict(hold=-1),
                   dict(status=200, endpoint="nope")):
            with self.subTest(kw):
                with self.assertRaises(ValueError):
                    m.fail_next(**kw)
        with self.assertRaises(TypeError):
            m.always(503, bogus=1)
        # the positional order soak_api.py relies on
        f = MockAcs._make_fault(504, None, None, None, 0.0, False, True, None, "send")
        self.assertEqual((f.status, f.accept, f.reset, f.hold, f.stall), (504, True, False, 0.0, 0.0))
        self.assertEqual(m.pending_faults(), 0)
        m.always(hold=0.3)
        started = time.monotonic()
        self.assertEqual([self.client.send(message()).status for _ in range(2)], [202, 202])
        self.assertGreaterEqual(time.monotonic() - started, 0.55)
        m.clear_faults()
        # hold with a status: accepted, in progress, then the error
        m.fail_next(503, hold=0.2)
        self.assertEqual(self.client.send(message()).status, 503)
        self.assertEqual(len(m.accepted_messages()), 3)

    # ---- Entra tokens -----------------------------------------------------------------------

    def secret_form(self, **over: str) -> dict[str, str]:
        form = {"grant_type": "client_credentials", "client_id": self.mock.client_id,
                "scope": ACS_SCOPE, "client_secret": self.mock.client_secret}
        form.update(over)
        return {k: v for k, v in form.items() if v is not None}

    def test_token_with_secret_and_bearer(self):
        r = self.client.token(self.mock.token_url, self.secret_form())
        self.assertEqual(r.status, 200, r.body)
        tok = r.json
        self.assertEqual(tok["token_type"], "Bearer")
        self.assertEqual(tok["expires_in"], 3600)
        self.assertEqual(self.client.send(message(), bearer=tok["access_token"]).status, 202)
        self.assertEqual(self.mock.accepted_messages()[0].auth, "bearer")
        op = self.mock.accepted_messages()[0].operation_id
        self.assertEqual(self.client.get(f"/emails/operations/{op}?api-version=2023-03-31",
                                         bearer=tok["access_token"]).status, 200)

        bad = {
            "wrong secret": (self.secret_form(client_secret="nope"), 401, "invalid_client", "AADSTS7000215"),
            "no credential": (self.secret_form(client_secret=None), 401, "invalid_client", "AADSTS7000218"),
            "wrong scope": (self.secret_form(scope="https://communication.azure.com/.default"), 400,
                            "invalid_scope", "AADSTS70011"),
            "unknown client": (self.secret_form(client_id=str(uuid.uuid4())), 400,
                               "unauthorized_client", "AADSTS700016"),
            "wrong grant": (self.secret_form(grant_type="password"), 400, "unsupported_grant_type",
                            "AADSTS70003"),
        }
        for name, (form, status, error, aadsts) in bad.items():
            with self.subTest(name):
                r = self.client.token(self.mock.token_url, form)
                self.assertEqual(r.status, status, r.body)
                self.assertEqual(r.json["error"], error)
                self.assertTrue(r.json["error_description"].startswith(aadsts + ":"), r.body)
        other_tenant = self.mock.token_url.replace(self.mock.tenant_id, str(uuid.uuid4()))
        self.assertEqual(self.client.token(other_tenant, self.secret_form()).status, 400)
        reqs = self.mock.token_requests()
        self.assertEqual(len(reqs), 1 + len(bad) + 1)
        self.assertEqual([t.status for t in reqs].count(200), 1)

    def test_expired_bearer_is_rejected(self):
        self.mock.token_lifetime = 1
        tok = self.client.token(self.mock.token_url, self.secret_form()).json
        self.assertEqual(tok["expires_in"], 1)
        self.assertEqual(self.client.send(message(), bearer=tok["access_token"]).status, 202)
        time.sleep(1.1)
        r = self.client.send(message(), bearer=tok["access_token"])
        self.assertEqual((r.status, r.json), (401, DENIED))
        self.assertIn("expired", r.headers["x-mock-auth-error"])
        # a fresh token works again; expire_tokens() expires it at once
        fresh = self.client.token(self.mock.token_url, self.secret_form()).json["access_token"]
        self.assertEqual(self.client.send(message(), bearer=fresh).status, 202)
        self.mock.expire_tokens()
        self.assertEqual(self.client.send(message(), bearer=fresh).status, 401)
        self.assertEqual(len(self.mock.token_requests()), 2)

    def make_assertion(self, *, header: dict | None = None, claims: dict | None = None,
                       key: str | None = None, drop: tuple[str, ...] = (),
                       pss_salt: int | None = None) -> str:
        """RS256 with x5t, or with `pss_salt` PS256 with x5t#S256 signed RSASSA-PSS
        (MGF1-SHA-256, a salt of `pss_salt` bytes: 32 is what RFC 7518 section 3.5 requires)."""
        now = int(time.time())
        if pss_salt is None:
            h = {"alg": "RS256", "typ": "JWT", "x5t": self.x5t}
            sigopts: tuple[str, ...] = ()
        else:
            h = {"alg": "PS256", "typ": "JWT", "x5t#S256": self.x5t_s256}
            sigopts = ("-sigopt", "rsa_padding_mode:pss", "-sigopt", f"rsa_pss_saltlen:{pss_salt}",
                       "-sigopt", "rsa_mgf1_md:sha256")
        h.update(header or {})
        c = {"aud": self.mock.token_url, "iss": self.mock.client_id, "sub": self.mock.client_id,
             "jti": str(uuid.uuid4()), "nbf": now, "iat": now, "exp": now + 600}
        c.update(claims or {})
        for k in drop:
            c.pop(k, None)
        signing_input = b64url(json.dumps(h).encode()) + "." + b64url(json.dumps(c).encode())
        sig = openssl("dgst", "-sha256", "-sign", key or self.app_key, *sigopts,
                      input=signing_input.encode())
        return signing_input + "." + b64url(sig)

    def assertion_form(self, assertion: str) -> dict[str, str]:
        return {"grant_type": "client_credentials", "client_id": self.mock.client_id,
                "scope": ACS_SCOPE, "client_assertion_type":
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                "client_assertion": assertion}

    def test_token_with_certificate_assertion(self):
        r = self.client.token(self.mock.token_url, self.assertion_form(self.make_assertion()))
        self.assertEqual(r.status, 200, r.body)
        self.assertEqual(self.client.send(message(), bearer=r.json["access_token"]).status, 202)
        now = int(time.time())
        bad = {
            "signed by another key": self.make_assertion(key=self.other_key),
            "wrong x5t": self.make_assertion(header={"x5t": b64url(b"\0" * 20)}),
            "alg HS256": self.make_assertion(header={"alg": "HS256"}),
            "wrong aud": self.make_assertion(claims={"aud": "https://login.microsoftonline.com/x/oauth2/v2.0/token"}),
            "iss is not client": self.make_assertion(claims={"iss": "someone-else"}),
            "expired": self.make_assertion(claims={"exp": now - 5}),
            "no jti": self.make_assertion(drop=("jti",)),
            "tampered claims": (lambda a: a.split(".")[0] + "." + b64url(json.dumps(
                {"aud": self.mock.token_url, "iss": self.mock.client_id, "sub": self.mock.client_id,
                 "jti": "x", "exp": now + 9999}).encode()) + "." + a.split(".")[2])(self.make_assertion()),
        }
        for name, assertion in bad.items():
            with self.subTest(name):
                r = self.client.token(self.mock.token_url, self.assertion_form(assertion))
                self.assertEqual(r.status, 401, r.body)
                self.assertEqual(r.json["error"], "invalid_client")
                self.assertTrue(r.json["error_description"].startswith("AADSTS"))
        kinds = [(t.kind, t.status) for t in self.mock.token_requests()]
        self.assertEqual(kinds, [("assertion", 200)] + [("assertion", 401)] * len(bad))

    def test_token_with_ps256_certificate_assertion(self):
        r = self.client.token(self.mock.token_url,
                              self.assertion_form(self.make_assertion(pss_salt=32)))
        self.assertEqual(r.status, 200, r.body)
        self.assertEqual(self.client.send(message(), bearer=r.json["access_token"]).status, 202)
        bad = {
            "signed by another key": self.make_assertion(pss_salt=32, key=self.other_key),
            "wrong x5t#S256": self.make_assertion(pss_salt=32,
                                                  header={"x5t#S256": b64url(b"\0" * 32)}),
            "PS256 header, PKCS#1 v1.5 signature": self.make_assertion(header={
                "alg": "PS256", "x5t#S256": self.x5t_s256}),
            "RS256 header, PSS signature": self.make_assertion(pss_salt=32,
                                                               header={"alg": "RS256"}),
            "20-byte salt": self.make_assertion(pss_salt=20),
            "expired": self.make_assertion(pss_salt=32, claims={"exp": int(time.time()) - 5}),
        }
        for name, assertion in bad.items():
            with self.subTest(name):
                r = self.client.token(self.mock.token_url, self.assertion_form(assertion))
                self.assertEqual(r.status, 401, r.body)
                self.assertEqual(r.json["error"], "invalid_client")
        kinds = [(t.kind, t.status) for t in self.mock.token_requests()]
        self.assertEqual(kinds, [("assertion", 200)] + [("assertion", 401)] * len(bad))

    # ---- faults -------------------------------------------------------------------------------

    def test_faults(self):
        m = self.mock
        with self.subTest("429 with Retry-After"):
            m.fail_next(429, retry_after=2)
            r = self.client.send(message())
            self.assertAcsError(r, 429, "TooManyRequests")
            self.assertEqual(r.headers["retry-after"], "2")
            self.assertEqual(self.client.send(message()).status, 202)
        with self.subTest("503 twice"):
            m.fail_next(503, count=2)
            self.assertEqual([self.client.send(message()).status for _ in range(3)], [503, 503, 202])
        with self.subTest("400 with a code"):
            m.fail_next(400, code="InvalidSenderUserName")
            self.assertAcsError(self.client.send(message()), 400, "InvalidSenderUserName")
        accepted = len(m.accepted_messages())
        with self.subTest("reset"):
            m.fail_next(reset=True)
            with self.assertRaises((urllib.error.URLError, ConnectionError, http.client.HTTPException,
                                    ssl.SSLError)):
                self.client.send(message())
            self.assertIsNone(m.requests("send")[-1].status)
            self.assertEqual(len(m.accepted_messages()), accepted)
        with self.subTest("accepted, then reset"):
            m.fail_next(reset=True, accept=True)
            op = str(uuid.uuid4())
            with self.assertRaises((urllib.error.URLError, ConnectionError, http.client.HTTPException,
                                    ssl.SSLError)):
                self.client.send(message(), operation_id=op)
            self.assertEqual(m.accepted_messages()[-1].operation_id, op)
            retry = self.client.send(message(), operation_id=op)   # the client's retry
            self.assertEqual((retry.status, retry.json["id"]), (202, op))
            self.assertTrue(m.requests("send")[-1].duplicate)
            accepted += 1
        with self.subTest("delay beyond the client timeout"):
            m.fail_next(delay=1.0)
            started = time.monotonic()
            with self.assertRaises((TimeoutError, urllib.error.URLError, socket.timeout)):
                self.client.send(message(), timeout=0.3)
            self.assertLess(time.monotonic() - started, 0.9)
            m.wait_for_accepted(accepted + 1, timeout=3)   # answered late, but accepted
            accepted += 1
        with self.subTest("always 500, then clear"):
            m.always(500)
            self.assertEqual([self.client.send(message()).status for _ in range(3)], [500] * 3)
            m.clear_faults()
            self.assertEqual(self.client.send(message()).status, 202)
            accepted += 1
        with self.subTest("token endpoint fault"):
            m.fail_next(503, endpoint="token")
            r = self.client.token(m.token_url, self.secret_form())
            self.assertEqual(r.status, 503)
            self.assertIn("error_description", r.json)
            self.assertEqual(self.client.token(m.token_url, self.secret_form()).status, 200)
        self.assertEqual(len(m.accepted_messages()), accepted)
        self.assertEqual(m.pending_faults(), 0)

    # ---- keep-alive -------------------------------------------------------------------------

    def test_keep_alive_reuse_is_recorded(self):
        def post(conn: http.client.HTTPSConnection) -> http.client.HTTPResponse:
            path = "/emails:send?api-version=2023-03-31"
            body = json.dumps(message()).encode()
            headers = sign(self.mock.access_key, "POST", path, self.client.host, body, rfc1123())
            headers["Content-Type"] = "application/json"
            conn.request("POST", path, body, headers)
            resp = conn.getresponse()
            resp.read()
            return resp

        c1 = http.client.HTTPSConnection("127.0.0.1", self.mock.port, context=self.client.ctx, timeout=5)
        try:
            statuses = [post(c1) for _ in range(3)]
            local_port = c1.sock.getsockname()[1]
        finally:
            c1.close()
        c2 = http.client.HTTPSConnection("127.0.0.1", self.mock.port, context=self.client.ctx, timeout=5)
        try:
            statuses.append(post(c2))
        finally:
            c2.close()
        self.assertEqual([r.status for r in statuses], [202] * 4)
        self.assertTrue(all(r.getheader("Connection") is None for r in statuses))
        recs = self.mock.requests("send")
        self.assertEqual(len({r.connection_id for r in recs[:3]}), 1)
        self.assertEqual({r.client_port for r in recs[:3]}, {local_port})
        self.assertNotEqual(recs[3].connection_id, recs[0].connection_id)

    def test_tls_is_verifiable_only_with_the_ca(self):
        ctx = ssl.create_default_context()   # system roots only: must fail
        with self.assertRaises(ssl.SSLCertVerificationError):
            with socket.create_connection(("127.0.0.1", self.mock.port), timeout=5) as raw:
                ctx.wrap_socket(raw, server_hostname="127.0.0.1")
        for name in ("127.0.0.1", "localhost"):
            with socket.create_connection(("127.0.0.1", self.mock.port), timeout=5) as raw:
                with self.client.ctx.wrap_socket(raw, server_hostname=name) as s:
                    self.assertIn(s.version(), ("TLSv1.2", "TLSv1.3"))
        deadline = time.monotonic() + 2
        while not self.mock.tls_failures() and time.monotonic() < deadline:
            time.sleep(0.02)
        self.assertTrue(self.mock.tls_failures())


class MockAcsProcessTest(unittest.TestCase):

    def test_command_line(self):
        state = tempfile.mkdtemp(prefix="test-mock-acs-cli-")
        self.addCleanup(shutil.rmtree, state, True)
        key = mock_acs.generate_access_key()
        proc = subprocess.Popen([sys.executable, os.path.join(HERE, "mock_acs.py"), "--port", "0",
                                 "--access-key", key, "--state-dir", state,
                                 "--verified-domain", "contoso.test", "--quiet",
                                 "--reexecute-repeated-operation-id"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

        def kill():
            if proc.poll() is None:
                proc.kill()
            proc.wait(5)
            proc.stdout.close()
            proc.stderr.close()
        self.addCleanup(kill)
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [lines.put(l.rstrip("\n")) for l in proc.stdout],
                         daemon=True).start()
        info: dict[str, str] = {}
        deadline = time.monotonic() + 15
        while "ready" not in info:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            k, _, v = line.partition("=")
            info[k] = v
        self.assertRegex(info["endpoint"], r"^https://127\.0\.0\.1:\d+$")
        self.assertTrue(os.path.isfile(info["ca_file"]))

        client = Client(info["endpoint"], info["ca_file"], key)
        for _ in range(2):   # executed twice: --reexecute-repeated-operation-id
            r = client.send(message(), operation_id="8540c0de-899f-5cce-acb5-3ec493af3800")
            self.assertEqual(r.status, 202, r.body)
        files = sorted(os.listdir(os.path.join(state, "accepted")))
        self.assertEqual(files, ["000001-8540c0de-899f-5cce-acb5-3ec493af3800.json",
                                 "000002-8540c0de-899f-5cce-acb5-3ec493af3800.json"])
        for i, name in enumerate(files):
            with open(os.path.join(state, "accepted", name)) as f:
                saved = json.load(f)
            self.assertEqual((saved["message"], saved["execution"]), (message(), i + 1))
        setup = os.path.join(state, "mock-acs.json")
        self.assertEqual(stat.S_IMODE(os.stat(setup).st_mode), 0o600)
        with open(setup) as f:
            self.assertEqual(json.load(f)["access_key"], key)

        proc.terminate()
        self.assertEqual(proc.wait(10), 0)
        self.assertIn("2 messages accepted", proc.stderr.read())


if __name__ == "__main__":
    unittest.main()
