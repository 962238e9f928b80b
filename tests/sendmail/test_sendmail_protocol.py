"""The milter protocol between a real Sendmail 8.17 and paas-milter:

* the no-reply steps (SMFIP_NR_*) paas-milter asks for are granted by Sendmail, Sendmail then
  waits for answers only at RCPT, DATA, the body and the end of message, and the header
  changes still work (a relay route's header added, a client's forged one removed);
* the decision lines carry Sendmail's queue id ({i}, which Sendmail sends from MAIL FROM on:
  its default macros for MAIL, and the end-of-message list paas-milter asks for): the id of
  the reply to the end of DATA, and a new one for each message of a session.
"""

from __future__ import annotations

import os
import re
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sendmail_harness as sh  # noqa: E402
from sendmail_harness import harness  # noqa: E402

# libmilter/mfapi.h
SMFIP_NR_HDR = 0x80
SMFIP_SKIP = 0x400
SMFIP_NR_CONN = 0x1000
SMFIP_NR_HELO = 0x2000
SMFIP_NR_MAIL = 0x4000
SMFIP_NR_RCPT = 0x8000
SMFIP_NR_DATA = 0x10000
SMFIP_NR_EOH = 0x40000
SMFIP_NR_BODY = 0x80000
# Sendmail's name for each step in "milter=NAME, action=STEP, continue" (milter.c)
STEP_NAMES = {SMFIP_NR_CONN: "connect", SMFIP_NR_HELO: "helo", SMFIP_NR_MAIL: "mail",
              SMFIP_NR_RCPT: "rcpt", SMFIP_NR_DATA: "data", SMFIP_NR_HDR: "header",
              SMFIP_NR_EOH: "eoh", SMFIP_NR_BODY: "body"}

CONFIG = """
[routes.acs-smtp]
action = "relay"

[[rules]]
name = "devices"
client_addr = ["127.0.0.2"]
route = "acs-smtp"
"""


class Protocol(sh.SendmailTestCase):
    def setUp(self) -> None:
        self.sink = self.start_sink("default")
        port = harness.free_port()
        path = os.path.join(self.workdir(), "paas-milter.toml")
        # --verbose: one line per milter stage, with the negotiated steps and the queue id
        self.milter = self.start_milter(port, harness.milter_config(port, CONFIG), command=[
            harness.milter_binary(), "run", "--foreground", "--verbose", "-c", path])
        self.sendmail = self.start_sendmail(default_sink=self.sink, milter_port=port)

    def test_no_reply_steps(self) -> None:
        result = harness.swaks(self.sendmail.port, local_interface="127.0.0.2",
                               from_="printer@contoso.test", to=["a@example.net", "b@example.net"],
                               headers=[f"{harness.ROUTING_HEADER}: chosen-by-the-client",
                                        "Subject: no-reply steps"])
        self.assertEqual(result.data_code, 250, result.transcript)
        qid = sh.queue_id(result)
        decision = self.milter.wait_for_log(rf"{qid}: (rule=.*)").group(1)
        self.assertIn("rule=devices, route=acs-smtp, action=relay", decision)
        message = self.sink.wait_for(1)[0]
        # the client's routing header is gone (smfi_chgheader), the route's is there
        self.assertEqual(message.get_all(harness.ROUTING_HEADER), ["acs-smtp"])
        self.assertEqual(sorted(message.rcpt_to), ["a@example.net", "b@example.net"])

        steps = int(self.milter.wait_for_log(r"stage=negotiate session=1 actions=0x[0-9a-f]+ "
                                             r"steps=(0x[0-9a-f]+)").group(1), 16)
        requested = SMFIP_NR_CONN | SMFIP_NR_HELO | SMFIP_NR_MAIL | SMFIP_NR_HDR | SMFIP_NR_EOH
        # what the milter asked for, Sendmail offered: steps = offered & wanted
        self.assertEqual(steps & requested, requested, hex(steps))
        self.assertTrue(steps & SMFIP_SKIP, hex(steps))
        no_reply = {name for bit, name in STEP_NAMES.items() if steps & bit}
        answered = set(re.findall(rf"{qid}: milter=paas-milter, action=(\w+), (?:continue|skip)",
                                  self.sendmail.log()))
        self.assertEqual(answered & no_reply, set(), self.sendmail.log())
        self.assertEqual(answered, {"rcpt", "data", "body"} - no_reply)
        # the body was cut short (SMFIS_SKIP): a relay route does not need it
        self.sendmail.wait_for_log(rf"{qid}: milter=paas-milter, action=body, skip")
        # and every stage still reached the milter
        for stage in ("connect", "helo", "mail", "rcpt", "data", "header", "eoh", "body", "eom"):
            self.assertRegex(self.milter.log(), rf"stage={stage} session=1\b")

    def test_decision_lines_carry_sendmails_queue_ids(self) -> None:
        messages = [("one@contoso.test", ["r1@example.net"],
                     harness.make_message("one@contoso.test", ["r1@example.net"], "first")),
                    ("two@contoso.test", ["r2@example.net"],
                     harness.make_message("two@contoso.test", ["r2@example.net"], "second"))]
        results = harness.smtp_session(self.sendmail.port, messages, source_addr="127.0.0.2")
        qids = []
        for tx in results:
            self.assertEqual(tx.data[0], 250, tx)
            m = sh.ACCEPTED_RE.search("2.0.0 " + tx.data[1])
            self.assertIsNotNone(m, tx.data)
            qids.append(m.group(1))
        self.assertEqual(len(set(qids)), 2, qids)
        for qid, (sender, rcpts, _) in zip(qids, messages):
            decision = self.milter.wait_for_log(rf"(?m)^\S+ paas-milter info: {qid}: (rule=.*)$")
            self.assertIn(f"from=<{sender}>", decision.group(1))
            # {i} already at MAIL FROM (Sendmail's default macros for that stage)
            self.assertRegex(self.milter.log(), rf"{qid}: stage=mail session=1 from=<{sender}>")
            self.assertRegex(self.milter.log(), rf"{qid}: stage=rcpt session=1 to=<{rcpts[0]}>")
            self.sendmail.wait_for_log(rf"{qid}: to=<{re.escape(rcpts[0])}>, .*stat=Sent")
        # before MAIL FROM there is none
        self.assertRegex(self.milter.log(), r"NOQUEUE: stage=helo session=1\b")
        self.sink.wait_for(2)


if __name__ == "__main__":
    unittest.main(verbosity=2)
