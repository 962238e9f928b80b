"""Smoke test of the integration harness against a real private Postfix.

Run as root from the repository root:
    python3 -m unittest -v tests/integration/test_harness_smoke.py
The last tests need the milter binary: PAAS_MILTER_BIN=build/milter/paas-milter.
"""

import os
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402
from harness import IntegrationTestCase, swaks  # noqa: E402


class HarnessSmokeTest(IntegrationTestCase):

    def stack(self, **kw):
        default = self.start_sink("default")
        acs = self.start_sink("acs")
        kw.setdefault("use_milter", False)
        pf = self.start_postfix(default_sink=default, paas_sink=acs, **kw)
        return pf, default, acs

    def test_relay_to_default_sink(self):
        pf, default, acs = self.stack()
        self.assertIn("configuration " + pf.config_dir, pf.maillog())
        pf.check()

        res = swaks(pf.smtpd_port, from_="printer@contoso.test",
                    to=["a@example.net", "b@example.net"], headers=["Subject: smoke one"],
                    body="line 1\n.leading dot\n", local_interface="127.0.0.2")
        self.assertEqual(res.returncode, 0, res.transcript)
        self.assertEqual(res.data_code, 250, res.transcript)
        self.assertRegex(res.queue_id or "", r"^[0-9A-F]{6,}$")

        msg = default.wait_for(1)[0]
        self.assertEqual(msg.mail_from, "printer@contoso.test")
        self.assertEqual(msg.rcpt_to, ["a@example.net", "b@example.net"])
        self.assertEqual(msg["Subject"], "smoke one")
        self.assertIn("[127.0.0.2]", msg.get_all("Received")[0])
        self.assertIn(f"id {res.queue_id}", msg.get_all("Received")[0])
        self.assertIn("\n.leading dot\n", msg.message.get_content())
        m = pf.wait_for_status(res.queue_id, "sent")
        self.assertIn(f"relay=127.0.0.1[127.0.0.1]:{default.port}", m.group(0))
        self.assertTrue(any("client=unknown[127.0.0.2]" in line
                            for line in pf.log_for(res.queue_id)))
        pf.wait_for_empty_queue()
        acs.assert_stays_empty(0.2)

        pids = pf.processes()
        self.assertTrue(pids)
        pf.stop()
        self.assertEqual(pf.processes(), [])
        self.assertFalse(pf.running)

    def test_tls_client_certificate(self):
        pf, default, _ = self.stack(tls=True)
        ca = self.make_ca()
        good = ca.make_client_cert("printer-42.contoso.test", org="Contoso")
        bad = ca.make_client_cert("rogue.contoso.test", untrusted=True)

        mark = pf.log_mark()
        res = swaks(pf.tls_port, tls_cert=good, headers=["Subject: trusted"])
        self.assertEqual(res.data_code, 250, res.transcript)
        self.assertIn("TLS started", res.transcript)
        pf.wait_for_log(r"postfix/tls/smtpd\[\d+\]: Trusted TLS connection established from",
                        since=mark)

        mark = pf.log_mark()
        res2 = swaks(pf.tls_port, tls_cert=bad, headers=["Subject: untrusted"])
        self.assertEqual(res2.data_code, 250, res2.transcript)
        pf.wait_for_log(r"Untrusted TLS connection established from", since=mark)

        msgs = {m["Subject"]: m for m in default.wait_for(2)}
        # smtpd_tls_received_header = yes records the verified client CN
        received = msgs["trusted"].get_all("Received")[0]
        self.assertRegex(received, r'Client CN "printer-42\.contoso\.test", Issuer "Test CA"'
                                   r' \(verified OK\)')
        self.assertIn("(not verified)", msgs["untrusted"].get_all("Received")[0])

        # the plain listener does not offer STARTTLS
        plain = swaks(pf.smtpd_port, tls=True)
        self.assertNotEqual(plain.returncode, 0)
        self.assertIsNone(plain.queue_id)

    def test_header_route_with_header_checks(self):
        # The milter_header_checks table only sees milter-added headers; to exercise its
        # FILTER lines without a milter, use the same table as plain header_checks.
        pf, default, acs = self.stack()
        pf.postconf(header_checks=f"pcre:{pf.header_checks_file}")
        pf.reload()
        res = swaks(pf.smtpd_port, headers=["X-PaaS-Route: acs-smtp", "Subject: routed"])
        self.assertEqual(res.data_code, 250, res.transcript)
        msg = acs.wait_for(1)[0]
        self.assertEqual(msg["Subject"], "routed")
        self.assertEqual(msg.rcpt_to, ["rcpt@example.net"])
        pf.wait_for_log(rf"postfix/acs-relay/smtp\[\d+\]: {res.queue_id}: .*"
                        rf"relay=127\.0\.0\.1\[127\.0\.0\.1\]:{acs.port}, .*status=sent")
        self.assertTrue(any("filter: header X-PaaS-Route: acs-smtp" in line
                            for line in pf.log_for(res.queue_id)), pf.log_for(res.queue_id))
        default.assert_stays_empty(0.2)

        # contrib/postfix/master.cf.snippet's optional strip of the header on the way out
        strip = os.path.join(pf.config_dir, "strip_route_header")
        with open(strip, "w") as f:
            f.write("/^X-PaaS-Route:/ IGNORE\n")
        pf.postconf_master(f"acs-relay/unix/smtp_header_checks=pcre:{strip}")
        pf.reload()
        acs.clear()
        res = swaks(pf.smtpd_port, headers=["X-PaaS-Route: acs-smtp", "Subject: stripped"])
        msg = acs.wait_for(1)[0]
        self.assertEqual(msg["Subject"], "stripped")
        self.assertIsNone(msg["X-PaaS-Route"])

    def test_deferred_mail_shows_in_queue(self):
        pf, default, _ = self.stack()
        default.stop()
        res = swaks(pf.smtpd_port, to="late@example.net")
        self.assertEqual(res.data_code, 250, res.transcript)
        pf.wait_for_status(res.queue_id, "deferred")
        q = pf.wait_for_queue(lambda q: any(e["queue_id"] == res.queue_id
                                            and e["queue_name"] == "deferred" for e in q))
        entry = next(e for e in q if e["queue_id"] == res.queue_id)
        self.assertEqual(entry["recipients"][0]["address"], "late@example.net")
        self.assertIn("Connection refused", entry["recipients"][0].get("delay_reason", ""))
        self.assertIn(res.queue_id, pf.queue_text())
        self.assertEqual(pf.held_queue_ids(), [])

        default.start()  # same port again
        pf.flush()
        msg = default.wait_for(1)[0]
        self.assertEqual(msg.rcpt_to, ["late@example.net"])
        pf.wait_for_empty_queue()

    def test_two_messages_in_one_session(self):
        pf, default, _ = self.stack()
        q1, q2 = harness.send_two_messages(pf.smtpd_port, "127.0.0.3")
        self.assertTrue(q1 and q2 and q1 != q2, (q1, q2))
        msgs = default.wait_for(2)
        self.assertEqual(sorted(m["Subject"] for m in msgs), ["first", "second"])
        pf.wait_for_log(r"disconnect from unknown\[127\.0\.0\.3\] .*mail=2 rcpt=2 data=2 rset=1")

    def test_milter_path_with_fake_milter(self):
        # Postfix -> (Python stand-in) milter -> milter_header_checks FILTER -> acs sink
        pf, default, acs = self.stack(use_milter=True)
        milter = self.start_milter(pf.milter_port, command=harness.fake_milter_command(
            pf.milter_port, {"127.0.0.2": "acs-smtp"}))

        routed = swaks(pf.smtpd_port, local_interface="127.0.0.2", headers=["Subject: routed"])
        self.assertEqual(routed.data_code, 250, routed.transcript)
        plain = swaks(pf.smtpd_port, local_interface="127.0.0.1", headers=["Subject: plain"])
        self.assertEqual(plain.data_code, 250, plain.transcript)
        msg = acs.wait_for(1)[0]
        self.assertEqual(msg["Subject"], "routed")
        self.assertEqual(msg["X-PaaS-Route"], "acs-smtp")
        other = default.wait_for(1)[0]
        self.assertEqual(other["Subject"], "plain")
        self.assertIsNone(other["X-PaaS-Route"])
        milter.wait_for_log(r"macros M .*'\{mail_addr\}': 'sender@example\.com'")

        mark = milter.log_mark()
        milter.reload()
        milter.wait_for_log("SIGHUP", since=mark)
        self.assertEqual(milter.stop(), 0)

        # milter down: milter_default_action = tempfail
        down = swaks(pf.smtpd_port)
        self.assertIsNone(down.queue_id)
        self.assertEqual(down.first_error[0], 451, down.transcript)

    def test_real_milter(self):
        if not harness.milter_binary():
            self.skipTest("PAAS_MILTER_BIN unset or not an executable")
        pf, default, acs = self.stack(use_milter=True)
        config = harness.milter_config(pf.milter_port, """
            [routes.acs-smtp]
            action = "relay"
            header_value = "acs-smtp"
            transport = "acs-relay:[127.0.0.1]:25"

            [routes.local]
            action = "pass"

            [[rules]]
            name = "printer"
            client_addr = ["127.0.0.2"]
            route = "acs-smtp"
            """.replace("\n            ", "\n"))
        self.start_milter(pf.milter_port, config)
        routed = swaks(pf.smtpd_port, local_interface="127.0.0.2", headers=["Subject: routed"])
        self.assertEqual(routed.data_code, 250, routed.transcript)
        plain = swaks(pf.smtpd_port, local_interface="127.0.0.1", headers=["Subject: plain"])
        self.assertEqual(plain.data_code, 250, plain.transcript)
        self.assertEqual(acs.wait_for(1)[0]["X-PaaS-Route"], "acs-smtp")
        self.assertEqual(default.wait_for(1)[0]["Subject"], "plain")


class SinkDumpParserTest(unittest.TestCase):
    """The smtp-sink dump format, without any server."""

    def test_parse(self):
        dump = (b"X-Client-Addr: 127.0.0.1\nX-Client-Proto: ESMTP\nX-Helo-Args: paas-test\n"
                b"X-Mail-Args: <> SIZE=12 BODY=8BITMIME\n"
                b"X-Rcpt-Args: <a@example.net> ORCPT=rfc822;a@example.net\n"
                b"X-Rcpt-Args: <b@example.net>\n"
                b"Received: from paas-test ([127.0.0.1])\n\tby s (smtp-sink) with ESMTP id 1;\n"
                b"\tMon, 23 Nov 2026 16:10:32 +0000 (UTC)\n"
                b"Received: from x by y\nSubject: s\n\nbody\n\n")
        m = harness.parse_sink_dump("/dev/null", dump)
        self.assertEqual(m.mail_from, "")
        self.assertEqual(m.rcpt_to, ["a@example.net", "b@example.net"])
        self.assertEqual(m.helo, "paas-test")
        self.assertEqual(m.get_all("Received"), ["from x by y"])
        self.assertEqual(m.raw, b"Received: from x by y\nSubject: s\n\nbody\n")

    def test_swaks_transcript(self):
        t = ("<-  220 hi\n -> EHLO x\n<-  250-a\n<-  250 b\n -> MAIL FROM:<a@b>\n"
             "<** 451 4.7.1 Service unavailable - try again later\n -> QUIT\n<-  221 bye\n")
        replies, code, reply, qid, err = harness.parse_swaks_transcript(t)
        self.assertEqual(replies[1], ("EHLO", 250, "250-a\n250 b"))
        self.assertEqual(err, (451, "451 4.7.1 Service unavailable - try again later"))
        self.assertIsNone(code)
        self.assertIsNone(qid)


if __name__ == "__main__":
    unittest.main()
