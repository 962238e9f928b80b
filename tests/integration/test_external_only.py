"""External-only routing and rewrite maps through a real private Postfix, wired with the output
of `paas-milter postfix-config` (main.cf lines, master.cf transports, milter_header_checks, the
transport map and the generic maps), changed only where the private instance differs from a
Debian system (no chroot).

- A message with internal and external recipients on an external_only relay route: the
  external ones arrive at the route's sink, with their own addresses (and ORCPT) in the
  envelope, the internal ones at the normal path's sink; each exactly once, one queue id.
- A recipient the route's next hop refuses: the DSN names the original address.
- A client cannot name a route's pseudo-domain itself.
- sender_rewrite / recipient_rewrite on a relay route: envelope and headers at the sink.
- An API route's relay fallback to an external_only route (the ACS double failing with
  503s): only the external recipients take the fallback; local_domains and internal ones stay.
- sender_rewrite / recipient_rewrite on an API route: in the request the ACS double recorded.
"""

from __future__ import annotations

import email
import email.policy
import os
import re
import subprocess
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from mock_acs import MockAcs  # noqa: E402

BLOCK_RE = re.compile(r"^# ==== (.+) ====$", re.M)


def postfix_config_blocks(output: str) -> dict[str, str]:
    """{"main.cf": text, "master.cf": text, "/path/of/table": text} from postfix-config."""
    blocks: dict[str, str] = {}
    marks = list(BLOCK_RE.finditer(output))
    for i, mark in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(output)
        blocks[mark.group(1)] = output[mark.end() + 1:end]
    return blocks


def wire_postfix(pf: harness.PrivatePostfix, config_path: str) -> str:
    """Configures PF (not started) with `paas-milter postfix-config` for CONFIG_PATH, its
    tables in PF's configuration directory. Returns the output."""
    out = subprocess.run([harness.milter_binary(), "postfix-config", "-c", config_path,
                          "--table-dir", pf.config_dir],
                         capture_output=True, text=True, check=True).stdout
    blocks = postfix_config_blocks(out)
    params = {}
    for line in blocks["main.cf"].splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, value = line.partition(" = ")
            params[name.strip()] = value.strip()
    pf.postconf(**params)
    entries = []
    for line in blocks.get("master.cf", "").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split()
        if not line[0].isspace() and len(fields) >= 8:
            fields[4] = "n"  # the private instance runs nothing chrooted
            line = " ".join(fields)
        entries.append(line)
    with open(pf.master_cf, "a") as f:
        f.write("# paas-milter postfix-config\n" + "\n".join(entries) + "\n")
    harness._backdate(pf.master_cf)
    for path, content in blocks.items():
        if path.startswith("/"):
            with open(path, "w") as f:
                f.write(content)
    return out


def dsn_fields(message: email.message.Message) -> list[dict[str, str]]:
    """The per-recipient groups of a message/delivery-status part."""
    for part in message.walk():
        if part.get_content_type() == "message/delivery-status":
            groups = []
            for sub in part.get_payload():
                groups.append({k.lower(): str(v) for k, v in sub.items()})
            return groups[1:]  # the first group is per message
    return []


class WiredTestCase(harness.IntegrationTestCase):
    internal_domains = ["contoso.test"]

    def setUp(self) -> None:
        if not harness.milter_binary():
            self.skipTest("PAAS_MILTER_BIN unset or not an executable")
        self.default_sink = self.start_sink("default")

    def start(self, body: str, **postfix_kw) -> None:
        self.milter_port = harness.free_port()
        config = harness.milter_config(self.milter_port, body,
                                       internal_domains=self.internal_domains)
        self.milter = self.start_milter(self.milter_port, config)
        self.postfix = self.start_postfix(default_sink=self.default_sink,
                                          milter_port=self.milter_port, routes={}, start=False,
                                          **postfix_kw)
        self.generated = wire_postfix(self.postfix, self.milter.config_path)
        self.postfix.check()
        self.postfix.start()

    def decision(self, queue_id: str) -> str:
        return self.milter.wait_for_log(rf"{queue_id}: (rule=.*)", timeout=30).group(1)

    def delivered(self, queue_id: str, count: int) -> list[str]:
        """The `to=<...>` of QUEUE_ID's `status=sent` lines, once COUNT were logged."""
        deadline = time.monotonic() + 20
        while True:
            lines = [line for line in self.postfix.log_for(queue_id) if "status=sent" in line]
            if len(lines) >= count or time.monotonic() > deadline:
                return [re.search(r" to=<(.*?)>,", line).group(1) for line in lines]
            time.sleep(0.1)


class RelayRoutes(WiredTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.acs_sink = self.start_sink("acs")
        self.refusing_sink = self.start_sink(
            "refusing", extra_args=["-f", "RCPT", "-B", "550 5.1.1 Mailbox unknown"])
        self.rewrite_sink = self.start_sink("rewrite")
        self.start(f"""
[routes.acs-smtp]
action = "relay"
transport = "acs-relay:[127.0.0.1]:{self.acs_sink.port}"
external_only = true
recipient_rewrite = {{ "fabrikam.local" = "fabrikam.com" }}

[routes.refusing]
action = "relay"
transport = "refusing-relay:[127.0.0.1]:{self.refusing_sink.port}"
external_only = true

[routes.rewriting]
action = "relay"
transport = "rewrite-relay:[127.0.0.1]:{self.rewrite_sink.port}"
sender_rewrite = {{ "contoso.local" = "contoso.com" }}
recipient_rewrite = {{ "fabrikam.local" = "fabrikam.com" }}

[[rules]]
name = "printers"
client_addr = ["127.0.0.2"]
route = "acs-smtp"

[[rules]]
name = "refused"
client_addr = ["127.0.0.3"]
route = "refusing"

[[rules]]
name = "rewritten"
client_addr = ["127.0.0.4"]
route = "rewriting"
""")

    def test_generated_configuration(self) -> None:
        self.assertIn(f"transport_maps = pcre:{self.postfix.config_dir}/paas_route_transport",
                      self.generated)
        self.assertIn("-o smtp_generic_maps=pcre:", self.generated)
        self.assertEqual(self.postfix.postconf("milter_default_action")["milter_default_action"],
                         "tempfail")
        # `check` finds Postfix wired as the configuration wants: no warning.
        check = subprocess.run([harness.milter_binary(), "check", "-c", self.milter.config_path,
                                "--postfix-config", self.postfix.config_dir],
                               capture_output=True, text=True)
        self.assertEqual(check.returncode, 0, check.stderr)
        self.assertNotIn("warning:", check.stdout + check.stderr)
        # ... and says what is missing when transport_maps is gone.
        self.postfix.postconf(transport_maps=None)
        check = subprocess.run([harness.milter_binary(), "check", "-c", self.milter.config_path,
                                "--postfix-config", self.postfix.config_dir],
                               capture_output=True, text=True)
        self.assertIn('warning: route "acs-smtp"', check.stderr)
        self.assertIn("transport_maps is empty", check.stderr)

    def test_external_recipients_take_the_route_internal_ones_the_normal_path(self) -> None:
        external = ["bob@example.net", '"john doe"@example.org', "carol@[192.0.2.9]",
                    "dan@fabrikam.local"]
        res = harness.swaks(self.postfix.smtpd_port, local_interface="127.0.0.2",
                            from_="scanner@contoso.test", to=["alice@contoso.test"] + external,
                            headers=["To: alice@contoso.test, dan@fabrikam.local"])
        self.assertEqual(res.data_code, 250, res.transcript)
        line = self.decision(res.queue_id)
        self.assertIn("route=acs-smtp, action=relay", line)
        self.assertIn("external_only=acs-smtp, rerouted=4, staying=1", line)
        self.assertNotIn("header=", line)

        [normal] = self.default_sink.wait_for(1)
        [routed] = self.acs_sink.wait_for(1)
        self.assertEqual(normal.rcpt_to, ["alice@contoso.test"])
        self.assertEqual(normal.get_all(harness.ROUTING_HEADER), [])
        # Their own addresses on the wire (recipient_rewrite applied to dan), ORCPT the
        # address the client gave.
        self.assertEqual(sorted(routed.rcpt_to),
                         sorted(['"john doe"@example.org', "bob@example.net",
                                 "carol@[192.0.2.9]", "dan@fabrikam.com"]))
        args = {harness._envelope_address(a): a for a in routed.rcpt_args}
        self.assertIn("ORCPT=rfc822;bob@example.net", args["bob@example.net"])
        self.assertIn('ORCPT=rfc822;"john+20doe"@example.org', args['"john doe"@example.org'])
        self.assertIn("ORCPT=rfc822;carol@[192.0.2.9]", args["carol@[192.0.2.9]"])
        self.assertIn("ORCPT=rfc822;dan@fabrikam.local", args["dan@fabrikam.com"])
        self.assertEqual(routed["To"], "alice@contoso.test, dan@fabrikam.com")
        self.assertEqual(routed.get_all(harness.ROUTING_HEADER), [])
        # One queue file, five deliveries: each recipient once.
        sent = self.delivered(res.queue_id, 5)
        self.assertEqual(len(sent), 5, sent)
        self.assertIn("bob@example.net.acs-smtp.paas-route.invalid", sent)
        time.sleep(0.5)
        self.assertEqual(len(self.default_sink.messages()) + len(self.acs_sink.messages()), 2)
        self.postfix.wait_for_empty_queue()

    def test_only_internal_recipients_keep_the_normal_path(self) -> None:
        res = harness.swaks(self.postfix.smtpd_port, local_interface="127.0.0.2",
                            to=["alice@contoso.test", "bo@contoso.test"])
        self.assertEqual(res.data_code, 250, res.transcript)
        self.assertIn("rerouted=0, staying=2", self.decision(res.queue_id))
        [normal] = self.default_sink.wait_for(1)
        self.assertEqual(sorted(normal.rcpt_to), ["alice@contoso.test", "bo@contoso.test"])
        self.acs_sink.assert_stays_empty(0.5)

    def test_dsn_names_the_original_recipient(self) -> None:
        res = harness.swaks(self.postfix.smtpd_port, local_interface="127.0.0.3",
                            from_="scanner@contoso.test",
                            to=["alice@contoso.test", "bob@example.net"])
        self.assertEqual(res.data_code, 250, res.transcript)
        messages = self.default_sink.wait_for(2)
        [copy] = [m for m in messages if m.mail_from]
        [bounce] = [m for m in messages if not m.mail_from]
        self.assertEqual(copy.rcpt_to, ["alice@contoso.test"])
        self.assertEqual(bounce.rcpt_to, ["scanner@contoso.test"])
        [group] = dsn_fields(bounce.message)
        self.assertEqual(group["original-recipient"], "rfc822;bob@example.net")
        self.assertEqual(group["final-recipient"],
                         "rfc822; bob@example.net.refusing.paas-route.invalid")
        self.assertEqual(group["status"], "5.1.1")
        self.assertIn("550 5.1.1 Mailbox unknown", group["diagnostic-code"])
        text = bounce.raw.decode()
        self.assertIn(f"X-Postfix-Queue-ID: {res.queue_id}", text)
        self.assertIn("<bob@example.net.refusing.paas-route.invalid>: host", text)
        self.refusing_sink.assert_stays_empty(0.2)
        self.postfix.wait_for_empty_queue()

    def test_a_client_cannot_name_a_pseudo_domain(self) -> None:
        res = harness.swaks(self.postfix.smtpd_port, local_interface="127.0.0.5",
                            to=["bob@example.net.acs-smtp.paas-route.invalid"])
        self.assertEqual(res.reply_to("RCPT")[0], 550, res.transcript)
        self.assertIn("reserved for routing", res.reply_to("RCPT")[1])
        self.milter.wait_for_log(r"refused: a route's pseudo-domain")
        self.acs_sink.assert_stays_empty(0.5)

    def test_rewrite_maps_on_a_relay_route(self) -> None:
        data = ("From: Scanner <scanner@contoso.local>\r\n"
                "Reply-To: desk@contoso.local\r\n"
                "To: Bob <bob@fabrikam.local>\r\nCc: carol@example.net\r\n"
                "Subject: rewritten\r\n\r\nscan from scanner@contoso.local\r\n")
        res = harness.swaks(self.postfix.smtpd_port, local_interface="127.0.0.4",
                            from_="scanner@contoso.local",
                            to=["bob@fabrikam.local", "carol@example.net"], data=data)
        self.assertEqual(res.data_code, 250, res.transcript)
        [msg] = self.rewrite_sink.wait_for(1)
        self.assertEqual(msg.mail_from, "scanner@contoso.com")
        self.assertEqual(sorted(msg.rcpt_to), ["bob@fabrikam.com", "carol@example.net"])
        self.assertEqual(msg["From"], "Scanner <scanner@contoso.com>")
        self.assertEqual(msg["Reply-To"], "desk@contoso.com")
        self.assertEqual(msg["To"], "Bob <bob@fabrikam.com>")
        self.assertEqual(msg["Cc"], "carol@example.net")
        self.assertIn(b"scan from scanner@contoso.local", msg.raw)  # never the body
        self.default_sink.assert_stays_empty(0.3)


API_ROUTES = """
[routes.acs-smtp]
action = "relay"
transport = "acs-relay:[127.0.0.1]:{acs_port}"
external_only = true

[routes.acs-api]
action = "api"
connection_string_file = "acs.conn"
ca_file = "{ca_file}"
sender = "DoNotReply@contoso.azurecomm.test"
verified_domains = ["contoso.test", "contoso.com"]
local_domains = ["local.test"]
spool_directory = "{spool}"
time_budget = 20
request_timeout = 5
max_attempts = 1
on_failure = "relay:acs-smtp"
sender_rewrite = {{ "contoso.local" = "contoso.com" }}
recipient_rewrite = {{ "fabrikam.local" = "fabrikam.com" }}

[[rules]]
name = "devices"
client_addr = ["127.0.0.2"]
route = "acs-api"
"""


class ApiRoute(WiredTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.mock = MockAcs(verified_domains=("contoso.test", "contoso.com",
                                              "contoso.azurecomm.test"))
        self.mock.start()
        self.addCleanup(self.mock.stop)
        self.acs_sink = self.start_sink("acs")
        self.write_config("acs.conn", self.mock.connection_string + "\n")
        spool = os.path.join(self.workdir(), "spool")
        os.makedirs(spool)
        self.start(API_ROUTES.format(acs_port=self.acs_sink.port, ca_file=self.mock.ca_file,
                                     spool=spool))

    def send(self, **kw) -> harness.SwaksResult:
        return harness.swaks(self.postfix.smtpd_port, local_interface="127.0.0.2", timeout=60,
                             **kw)

    def test_relay_fallback_takes_only_the_external_recipients(self) -> None:
        self.mock.always(503)
        res = self.send(from_="scanner@contoso.test",
                        to=["customer@example.net", "partner@example.org",
                            "alice@contoso.test", "bob@local.test"])
        self.assertEqual(res.data_code, 250, res.transcript)
        line = self.decision(res.queue_id)
        self.assertIn("policy=relay:acs-smtp", line)
        self.assertIn("external_only=acs-smtp, rerouted=2, staying=2", line)
        [routed] = self.acs_sink.wait_for(1)
        [normal] = self.default_sink.wait_for(1)
        self.assertEqual(sorted(routed.rcpt_to), ["customer@example.net", "partner@example.org"])
        self.assertTrue(all("ORCPT=rfc822;" + harness._envelope_address(a) in a
                            for a in routed.rcpt_args), routed.rcpt_args)
        self.assertEqual(sorted(normal.rcpt_to), ["alice@contoso.test", "bob@local.test"])
        self.assertEqual(self.mock.accepted_messages(), [])
        self.assertEqual(len(self.delivered(res.queue_id, 4)), 4)
        time.sleep(0.5)
        self.assertEqual(len(self.default_sink.messages()) + len(self.acs_sink.messages()), 2)
        self.postfix.wait_for_empty_queue()

    def test_rewrite_maps_in_the_request(self) -> None:
        data = ("From: Scanner <scanner@contoso.local>\r\n"
                "To: Bob <bob@fabrikam.local>, carol@example.net\r\n"
                "Subject: rewritten\r\n\r\npage 1\r\n")
        res = self.send(from_="scanner@contoso.local",
                        to=["bob@fabrikam.local", "carol@example.net", "eve@fabrikam.local"],
                        data=data)
        self.assertEqual(res.data_code, 250, res.transcript)
        [accepted] = self.mock.wait_for_accepted(1)
        # The rewritten sender is in a verified domain: it sends as itself.
        self.assertEqual(accepted.sender, "scanner@contoso.com")
        self.assertEqual(accepted.addresses("to"), ["bob@fabrikam.com", "carol@example.net"])
        self.assertEqual(accepted.addresses("bcc"), ["eve@fabrikam.com"])
        self.assertEqual(accepted.message["recipients"]["to"][0].get("displayName"), "Bob")
        self.assertIn("local_copy=discarded", self.decision(res.queue_id))
        self.default_sink.assert_stays_empty(0.5)
        self.assertEqual(self.acs_sink.messages(), [])


if __name__ == "__main__":
    unittest.main()
