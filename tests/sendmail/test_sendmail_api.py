"""The API route in front of a real Sendmail 8.17: swaks -> Sendmail (podman, host network,
loopback) -> paas-milter (on the host) -> the loopback ACS double (mock_acs.py, HTTPS,
HMAC-verified), with smtp-sinks on the host as Sendmail's next hops.

The same route configuration as the Postfix tests (tests/integration/test_api_route.py's
ROUTE_TEMPLATE: client 127.0.0.2 -> route acs-api, local_domains = ["local.test"], a relay
route acs-smtp to fall back on); per class one failure policy:

* accepted: the service got the message once, Sendmail discarded its copy (nothing at any
  sink, nothing queued); a recipient in a local domain stays with Sendmail (smfi_delrcpt of
  the others) and reaches its next hop alone;
* tempfail: the client sees 451 4.3.0, nothing is queued;
* hold: Sendmail's quarantine (smfi_quarantine): the message stays in the queue as an hf
  file, `mailq -qQ` lists it with the reason, nothing is delivered, and the operator's
  release (`sendmail -qQ -Q`, then a queue run) delivers it intact;
* reject: 550, nothing queued; a permanent service error is a 550 with the service's code;
* relay fallback with the default `mta = "postfix"`: the decision and the routing header,
  which Sendmail (no milter_header_checks) ignores: the message goes to SMART_HOST like any
  other. With `mta = "sendmail"` the fallback reroutes the recipients instead and they
  arrive at the route's own sink: test_sendmail_relay.py.
"""

from __future__ import annotations

import os
import re
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sendmail_harness as sh  # noqa: E402  (puts tests/integration on sys.path)
from sendmail_harness import harness  # noqa: E402
from mock_acs import MockAcs  # noqa: E402
from test_api_route import ROUTE_TEMPLATE  # noqa: E402  (the Postfix tests' configuration)


class SendmailApiRoute(sh.SendmailTestCase):
    policies = ""

    def setUp(self) -> None:
        self.mock = MockAcs(verified_domains=("contoso.test", "contoso.azurecomm.test"))
        self.mock.start()
        self.addCleanup(self.mock.stop)
        self.default_sink = self.start_sink("default")
        self.acs_sink = self.start_sink("acs")
        self.sinks = [self.default_sink, self.acs_sink]
        port = harness.free_port()
        self.write_config("acs.conn", self.mock.connection_string + "\n")
        spool = os.path.join(self.workdir(), "spool")
        os.makedirs(spool)
        body = ROUTE_TEMPLATE.format(ca_file=self.mock.ca_file, spool=spool,
                                     policies=self.policies,
                                     auth='connection_string_file = "acs.conn"')
        self.milter = self.start_milter(port, harness.milter_config(port, body))
        self.sendmail = self.start_sendmail(default_sink=self.default_sink, milter_port=port,
                                            mailers={"sinkacs": self.acs_sink.port})

    def send(self, **kw) -> harness.SwaksResult:  # type: ignore[override]
        kw.setdefault("local_interface", "127.0.0.2")
        kw.setdefault("from_", "scanner@contoso.test")
        kw.setdefault("to", ["customer@example.net"])
        return harness.swaks(self.sendmail.port, timeout=60, **kw)

    def decision(self, qid: str) -> str:
        """The milter's decision line for Sendmail's queue id QID."""
        return self.milter.wait_for_log(rf"{qid}: (rule=.*)", timeout=40).group(1)

    def assert_nothing_delivered(self, seconds: float = 1.0) -> None:
        for sink in self.sinks:
            sink.assert_stays_empty(seconds)
            seconds = 0

    def assert_not_queued(self, result: harness.SwaksResult) -> None:
        """Refused at the end of DATA: Sendmail keeps nothing (no qf/df/hf file)."""
        self.sendmail.wait_for_empty_queue()
        self.assertNotIn("Requests", self.sendmail.mailq())  # "Mail queue is empty"


class Accepted(SendmailApiRoute):
    def test_accepted_by_the_service_the_local_copy_is_discarded(self) -> None:
        result = self.send(headers=["Subject: Scan 42"])
        self.assertEqual(result.data_code, 250, result.transcript)
        qid = sh.queue_id(result)
        self.assertIsNotNone(qid, result.data_reply)
        accepted = self.mock.wait_for_accepted(1)
        self.assertEqual(accepted[0].recipients(), ["customer@example.net"])
        self.assertEqual(accepted[0].subject, "Scan 42")
        decision = self.decision(qid)
        for part in ("rule=devices, route=acs-api, action=api", "api=accepted, requests=1",
                     f"operation_id={accepted[0].operation_id}", "local_copy=discarded"):
            self.assertIn(part, decision)
        self.sendmail.wait_for_log(rf"{qid}: Milter: data, discard")
        self.assert_nothing_delivered()
        self.sendmail.wait_for_empty_queue()
        self.assertEqual(len(self.mock.requests("send")), 1)

    def test_recipients_in_local_domains_stay_with_sendmail(self) -> None:
        result = self.send(to=["a@example.net", "desk@local.test"])
        self.assertEqual(result.data_code, 250, result.transcript)
        qid = sh.queue_id(result)
        self.assertIn("local_copy=kept for 1 local recipient(s)", self.decision(qid))
        accepted = self.mock.wait_for_accepted(1)
        self.assertEqual(accepted[0].recipients(), ["a@example.net"])
        # smfi_delrcpt on Sendmail: only the local recipient is left, and it goes on
        self.sendmail.wait_for_log(rf"{qid}: Milter \(paas-milter\) delete: rcpt <a@example\.net>")
        arrived = self.default_sink.wait_for(1)
        self.assertEqual([m.rcpt_to for m in arrived], [["desk@local.test"]])
        self.assertEqual(arrived[0].get_all(harness.ROUTING_HEADER), [])
        self.acs_sink.assert_stays_empty(0.5)
        self.sendmail.wait_for_log(rf"{qid}: to=<desk@local\.test>, .*stat=Sent")
        self.assertEqual(len(self.mock.requests("send")), 1)


class Tempfail(SendmailApiRoute):
    policies = 'on_failure = "tempfail"\nmax_attempts = 2'

    def test_a_failing_service_tempfails_the_client(self) -> None:
        self.mock.always(503)
        result = self.send()
        self.assertEqual(result.data_code, 451, result.transcript)
        self.assertIn("4.3.0", result.data_reply)
        self.assert_not_queued(result)
        self.assert_nothing_delivered()
        self.milter.wait_for_log(r"api=transient-failure.*policy=tempfail")
        self.assertEqual(len(self.mock.requests("send")), 2)
        self.assertEqual(self.mock.accepted_messages(), [])

    def test_a_permanent_service_error_is_rejected_with_its_code(self) -> None:
        # on_permanent_failure = "reject" (the default): 550 with the service's error
        self.mock.fail_next(400, code="InvalidSenderUserName", message="bad sender")
        result = self.send()
        self.assertEqual(result.data_code, 550, result.transcript)
        self.assertIn("InvalidSenderUserName", result.data_reply)
        self.assert_not_queued(result)
        self.assert_nothing_delivered()


class Hold(SendmailApiRoute):
    policies = 'on_failure = "hold"\nmax_attempts = 1'

    def test_held_in_sendmails_quarantine(self) -> None:
        self.mock.always(503)
        result = self.send(headers=["Subject: held scan"])
        self.assertEqual(result.data_code, 250, result.transcript)
        qid = sh.queue_id(result)
        self.assertIn("policy=hold", self.decision(qid))
        self.sendmail.wait_for_log(rf"{qid}: milter=paas-milter, quarantine=paas-milter: HTTP 503")
        # The control file of a quarantined job is hf<qid> (qf<qid> otherwise), its
        # "q" line the reason
        self.assertIn(f"hf{qid}", self.sendmail.queue_files())
        self.assertIn(f"df{qid}", self.sendmail.queue_files())
        reason = re.search(r"^q(paas-milter: .*)$", self.sendmail.control_file(qid), re.M)
        self.assertIsNotNone(reason, self.sendmail.control_file(qid))
        # mailq -qQ: the quarantined jobs, each with "QUARANTINE: <reason>" (cut to fit the
        # line: "paas-milter: HTTP 503 ServiceUnavailable: The service is tem")
        held = self.sendmail.mailq(quarantined=True)
        self.assertRegex(held, rf"(?m)^{qid}\b")
        self.assertIn(f"QUARANTINE: {reason.group(1)[:40]}", held)
        self.assertRegex(held, r"(?m)^\s+<customer@example\.net>$")
        self.assertNotRegex(self.sendmail.mailq(), rf"(?m)^{qid}\b")  # not a normal job
        self.assert_nothing_delivered()

        # The operator's release: unquarantine this job (-qQ: among the quarantined ones,
        # -Q without a reason: release, -qI: this queue id), then a queue run delivers it
        # as it arrived, to its own recipient
        released = self.sendmail.exec("sendmail", "-C", self.sendmail.cf, "-qQ", "-Q",
                                      f"-qI{qid}")
        self.assertEqual(released.returncode, 0, released.out + released.err)
        self.assertIn(f"qf{qid}", self.sendmail.queue_files())
        run = self.sendmail.exec("sendmail", "-C", self.sendmail.cf, f"-qI{qid}")
        self.assertEqual(run.returncode, 0, run.out + run.err)
        message = self.default_sink.wait_for(1)[0]
        self.assertEqual(message.rcpt_to, ["customer@example.net"])
        self.assertEqual(message["Subject"], "held scan")
        self.assertEqual(message.get_all(harness.ROUTING_HEADER), [])
        self.sendmail.wait_for_empty_queue()


class Reject(SendmailApiRoute):
    policies = 'on_failure = "reject"\nmax_attempts = 1'

    def test_a_failing_service_rejects_the_message(self) -> None:
        self.mock.always(503)
        result = self.send()
        self.assertEqual(result.data_code, 550, result.transcript)
        self.assert_not_queued(result)
        self.assert_nothing_delivered()
        self.milter.wait_for_log(r"policy=reject")


class RelayFallback(SendmailApiRoute):
    policies = 'on_failure = "relay:acs-smtp"\nmax_attempts = 1'

    def test_a_failing_service_falls_back_to_the_relay_route(self) -> None:
        self.mock.always(500)
        result = self.send()
        self.assertEqual(result.data_code, 250, result.transcript)
        qid = sh.queue_id(result)
        self.assertIn("policy=relay:acs-smtp", self.decision(qid))
        self.sendmail.wait_for_log(rf"{qid}: Milter \(paas-milter\) add: header: "
                                   rf"{harness.ROUTING_HEADER}: acs-smtp")
        # Delivered once, with the routing header, which Sendmail does not act on: without
        # mta = "sendmail" it goes to SMART_HOST like any other message (with it, to the
        # route's own sink: test_sendmail_relay.py).
        arrived = sh.wait_any(self.sinks, 1)
        self.assertEqual(len(arrived), 1)
        self.assertEqual(arrived[0][1].get_all(harness.ROUTING_HEADER), ["acs-smtp"])
        self.assertEqual(arrived[0][1].rcpt_to, ["customer@example.net"])
        self.assertEqual(self.mock.accepted_messages(), [])
        # ...and the milter told the operator why, once.
        warning = (r"the MTA says it is Sendmail 8\.17[0-9.]*, but milter\.mta = \"postfix\": "
                   r"relay routes will not reach their next hop")
        self.milter.wait_for_log(warning)
        self.assertEqual(len(re.findall(warning, self.milter.log())), 1)


if __name__ == "__main__":
    unittest.main(verbosity=2)
