"""The milter's log as an operator or a log collector reads it, through a real Postfix:
`--log-format json` writes one JSON object per line (the decision line with Postfix's queue id
and its rule, route, action and outcome as members), `--verbose` adds one line per milter stage,
and neither ever shows a header value or the body.
"""

from __future__ import annotations

import json
import os
import re
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

BODY = """
[routes.acs-smtp]
action = "relay"

[[rules]]
name = "printers"
client_addr = ["127.0.0.2"]
route = "acs-smtp"
"""

# Text the client sends that must never reach the log.
BODY_MARKER = "body-line-that-must-not-be-logged"
SUBJECT_MARKER = "subject-value-that-must-not-be-logged"


class LogTestCase(harness.IntegrationTestCase):
    options: list[str] = []

    def setUp(self) -> None:
        binary = harness.milter_binary()
        if not binary:
            self.skipTest("PAAS_MILTER_BIN unset or not an executable")
        self.default_sink = self.start_sink("default")
        self.relay_sink = self.start_sink("acs")
        port = harness.free_port()
        config = os.path.join(self.workdir(), "paas-milter.toml")
        self.milter = self.start_milter(
            port, harness.milter_config(port, BODY),
            command=[binary, "run", "--foreground", *self.options, "-c", config])
        self.postfix = self.start_postfix(default_sink=self.default_sink, milter_port=port,
                                          routes={"acs-smtp": ("acs-relay", self.relay_sink.port)})

    def send(self) -> harness.SwaksResult:
        result = harness.swaks(self.postfix.smtpd_port, local_interface="127.0.0.2",
                               from_="scanner@contoso.test", to=["a@example.net", "b@example.net"],
                               headers=[f"Subject: {SUBJECT_MARKER}"], body=BODY_MARKER)
        self.assertEqual(result.data_code, 250)
        self.relay_sink.wait_for(1)
        return result

    def assert_nothing_private(self) -> None:
        text = self.milter.log()
        self.assertNotIn(BODY_MARKER, text)
        self.assertNotIn(SUBJECT_MARKER, text)


class JsonVerbose(LogTestCase):
    options = ["--verbose", "--log-format", "json"]

    def test_every_line_is_json_and_every_stage_is_there(self) -> None:
        queue_id = self.send().queue_id
        self.milter.wait_for_log(rf'"queue_id":"{queue_id}","message":"rule=printers', timeout=15)
        self.milter.wait_for_log(r'"stage":"close"', timeout=15)
        lines = [json.loads(line) for line in self.milter.log().splitlines() if line.strip()]
        for line in lines:
            self.assertEqual(line["program"], "paas-milter")
            self.assertIn(line["level"], ("info", "warning", "error", "debug"))
            self.assertRegex(line["time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
            self.assertIsInstance(line["message"], str)

        decision = [l for l in lines if l.get("queue_id") == queue_id and "outcome" in l]
        self.assertEqual(len(decision), 1, decision)
        self.assertEqual({k: decision[0][k] for k in
                          ("rule", "route", "action", "outcome", "client", "from", "nrcpt")},
                         {"rule": "printers", "route": "acs-smtp", "action": "relay",
                          "outcome": "relayed", "client": "127.0.0.2",
                          "from": "scanner@contoso.test", "nrcpt": "2"})

        stages = [l for l in lines if "stage" in l]
        sessions = {l["session"] for l in stages}
        names = [l["stage"] for l in stages]
        for stage in ("negotiate", "connect", "helo", "mail", "rcpt", "data", "header", "eoh",
                      "body", "eom", "close"):
            self.assertIn(stage, names)
        self.assertEqual(names.count("rcpt"), 2)
        # Postfix names the queue file at the first accepted RCPT: every stage line from the
        # header on carries the queue id; the ones before say NOQUEUE, as Postfix's own do.
        header = names.index("header")
        self.assertTrue(all(l["queue_id"] == queue_id
                            for l in stages[header:names.index("eom") + 1]))
        self.assertEqual(stages[0]["queue_id"], "NOQUEUE")
        self.assertIn("from=<scanner@contoso.test>", stages[names.index("mail")]["message"])
        self.assertTrue(any(l["message"].endswith("name=Subject") for l in stages))
        self.assertGreaterEqual(len(sessions), 1)
        self.assert_nothing_private()


class TextDefault(LogTestCase):
    def test_one_text_line_per_message_without_stages(self) -> None:
        queue_id = self.send().queue_id
        line = self.milter.wait_for_log(rf"paas-milter info: {queue_id}: (.*)", timeout=15).group(1)
        self.assertTrue(line.startswith("rule=printers, route=acs-smtp, action=relay"), line)
        self.assertNotIn("stage=", self.milter.log())
        self.assertEqual(len(re.findall(re.escape(queue_id), self.milter.log())), 1)
        # Postfix with the default milter.mta = "postfix": no warning about the MTA (its
        # "v" macro is "Postfix 3.7...").
        self.assertNotIn("the MTA says it is", self.milter.log())
        self.assert_nothing_private()


class BadLogFormat(harness.IntegrationTestCase):
    def test_an_unknown_log_format_is_a_usage_error(self) -> None:
        binary = harness.milter_binary()
        if not binary:
            self.skipTest("PAAS_MILTER_BIN unset or not an executable")
        import subprocess
        result = subprocess.run([binary, "run", "--log-format", "xml"], capture_output=True,
                                text=True, timeout=10)
        self.assertEqual(result.returncode, 2)
        self.assertIn("--log-format wants \"text\" or \"json\", got 'xml'", result.stderr)


if __name__ == "__main__":
    unittest.main()
