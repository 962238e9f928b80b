"""TLS client certificates presented to a real Sendmail 8.17 (STARTTLS with confCACERT,
confCACERT_PATH, confSERVER_CERT/KEY; Sendmail asks every client for a certificate and
verifies it against "Test CA" of harness.TestCA), classified by paas-milter on the macros
Sendmail sends: {cert_subject} and {cert_issuer} (full DNs, xtext-encoded), {verify},
{cert_fp} (only with confCERT_FINGERPRINT_ALGORITHM). The milter asks for them itself
(smfi_setsymlist); Sendmail's default milter macros have neither {verify} nor {cert_fp}.

* a rule on the full DN (a regexp anchored on "/O=Contoso Ltd/CN=..."; the space in the
  organization is "+20" in the macro), a rule on the CN alone, a rule on the issuer's CN
  ("Test CA", "Test+20CA" in the macro) and a cert_fingerprint rule each pick their route;
* a certificate from an untrusted CA ({verify} = FAIL) matches none of them, although it has
  the same DN, the same CN and a fingerprint listed in the rule; TLS without a certificate
  matches nothing either.

Each route is a relay route: the decision line (with Sendmail's queue id) names the rule, and
the message reaches Sendmail's next hop with the route's header.
"""

from __future__ import annotations

import os
import re
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sendmail_harness as sh  # noqa: E402
from sendmail_harness import harness  # noqa: E402

CONFIG = """
[routes.by-dn]
action = "relay"
[routes.by-cn]
action = "relay"
[routes.by-fingerprint]
action = "relay"
[routes.by-issuer]
action = "relay"

[[rules]]
name = "dn"
cert_subject = ['/^\\/O=Contoso Ltd\\/CN=scanner-7\\.contoso\\.test$/']
route = "by-dn"

[[rules]]
name = "cn"
cert_subject = ["printer-42.contoso.test"]
route = "by-cn"

[[rules]]
name = "fingerprint"
cert_fingerprint = [{fingerprints}]
route = "by-fingerprint"

[[rules]]
name = "issuer"
cert_issuer = ["Test CA"]
route = "by-issuer"
"""


def sha256_fingerprint(cert: harness.Cert) -> str:
    """"AB:CD:..." as `openssl x509 -fingerprint -sha256` prints it (and Sendmail sends it)."""
    out = harness._run([harness.OPENSSL, "x509", "-noout", "-fingerprint", "-sha256",
                        "-in", cert.cert]).stdout.decode()
    return out.strip().split("=", 1)[1]


class Certificates(sh.SendmailTestCase):
    def setUp(self) -> None:
        ca = self.make_ca()
        self.dn = ca.make_client_cert("scanner-7.contoso.test", org="Contoso Ltd")
        self.cn = ca.make_client_cert("printer-42.contoso.test", org="Contoso")
        self.fp = ca.make_client_cert("mfp-9.contoso.test", org="Contoso")
        self.other = ca.make_client_cert("other.contoso.test")
        # an untrusted CA's certificates with the same DN, the same CN, and one whose
        # fingerprint the fingerprint rule lists
        self.untrusted_dn = ca.make_client_cert("scanner-7.contoso.test", org="Contoso Ltd",
                                                untrusted=True, name="untrusted-dn")
        self.untrusted_cn = ca.make_client_cert("printer-42.contoso.test", org="Contoso",
                                                untrusted=True, name="untrusted-cn")
        self.untrusted_fp = ca.make_client_cert("mfp-9.contoso.test", org="Contoso",
                                                untrusted=True, name="untrusted-fp")
        fingerprints = ", ".join(f'"{sha256_fingerprint(c)}"' for c in (self.fp, self.untrusted_fp))
        self.sink = self.start_sink("default")
        port = harness.free_port()
        config = harness.milter_config(port, CONFIG.replace("{fingerprints}", fingerprints))
        path = os.path.join(self.workdir(), "paas-milter.toml")
        # --debug: the milter says why it ignored an unverified certificate
        self.milter = self.start_milter(port, config, command=[
            harness.milter_binary(), "run", "--foreground", "--debug", "-c", path])
        self.sendmail = self.start_sendmail(default_sink=self.sink, milter_port=port, ca=ca)

    def send_with(self, cert: harness.Cert | None, n: int) -> tuple[str, str]:
        """One message over STARTTLS presenting CERT; (queue id, decision line) once it
        reached the sink (the N-th message there)."""
        result = harness.swaks(self.sendmail.port, local_interface="127.0.0.3",
                               from_="device@contoso.test", to=["someone@example.net"],
                               tls=True, tls_cert=cert, headers=[f"Subject: message {n}"])
        self.assertEqual(result.data_code, 250, result.transcript)
        self.assertIsNotNone(result.reply_to("STARTTLS"), result.transcript)
        self.assertEqual(result.reply_to("STARTTLS")[0], 220, result.transcript)
        qid = sh.queue_id(result)
        self.assertIsNotNone(qid, result.data_reply)
        decision = self.milter.wait_for_log(rf"{qid}: (rule=.*)").group(1)
        self.sink.wait_for(n)
        return qid, decision

    def arrived(self, subject: str) -> harness.SinkMessage:
        found = [m for m in self.sink.messages() if m["Subject"] == subject]
        self.assertEqual(len(found), 1, self.sink.describe())
        return found[0]

    def test_rules_on_the_dn_the_cn_the_issuer_and_the_fingerprint(self) -> None:
        cases = [(self.dn, "dn", "by-dn", "/O=Contoso Ltd/CN=scanner-7.contoso.test"),
                 (self.cn, "cn", "by-cn", "/O=Contoso/CN=printer-42.contoso.test"),
                 (self.fp, "fingerprint", "by-fingerprint", "/O=Contoso/CN=mfp-9.contoso.test"),
                 (self.other, "issuer", "by-issuer", "/CN=other.contoso.test")]
        for n, (cert, rule, route, dn) in enumerate(cases, 1):
            with self.subTest(rule=rule):
                qid, decision = self.send_with(cert, n)
                self.assertIn(f"rule={rule}, route={route}, action=relay", decision)
                # the subject as the rules see it: Sendmail's DN, xtext decoded
                self.assertIn(f"cert_subject={dn}", decision)
                self.assertEqual(self.arrived(f"message {n}").get_all(harness.ROUTING_HEADER),
                                 [route])
                # Sendmail verified it, and sent the DN xtext-encoded
                self.sendmail.wait_for_log(
                    rf"STARTTLS=server, cert-subject={re.escape(dn.replace(' ', '+20'))}, "
                    r"cert-issuer=/CN=Test\+20CA, verifymsg=ok")
        fingerprint = re.search(r"match=\[cert_fingerprint=([0-9A-F:]+)@",
                                self.milter.log()).group(1)
        self.assertEqual(fingerprint, sha256_fingerprint(self.fp))

    def test_an_unverified_certificate_matches_nothing(self) -> None:
        cases = [("untrusted DN", self.untrusted_dn), ("untrusted CN", self.untrusted_cn),
                 ("untrusted fingerprint", self.untrusted_fp), ("no certificate", None)]
        for n, (what, cert) in enumerate(cases, 1):
            with self.subTest(what):
                qid, decision = self.send_with(cert, n)
                self.assertIn("rule=(none), route=(none), action=none", decision)
                self.assertNotIn("cert_subject=", decision)
                self.assertEqual(self.arrived(f"message {n}").get_all(harness.ROUTING_HEADER),
                                 [])
        self.assertEqual(len(re.findall(r"verify=FAIL", self.sendmail.log())), 3)
        self.assertEqual(len(re.findall(r"client certificate not verified \(\{verify\}=FAIL\): "
                                        r"ignored", self.milter.log())) >= 3, True)


if __name__ == "__main__":
    unittest.main(verbosity=2)
