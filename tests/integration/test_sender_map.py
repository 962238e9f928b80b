"""sender_map end to end: which mailbox sends is chosen by who the client is (its address
here), an unknown client is refused when the map says so, and `paas-milter query` shows the
choice. Through a real Postfix to the loopback Graph double."""

from __future__ import annotations

import os
import subprocess
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from mock_graph import MockGraph  # noqa: E402

CONFIG = """
[routes.graph]
action = "api"
provider = "graph"
authority = "{endpoint}"
graph_endpoint = "{endpoint}"
token_scope = "https://graph.microsoft.com/.default"
tenant_id = "{tenant}"
client_id = "{client}"
client_secret_file = "graph.secret"
ca_file = "{ca_file}"
mailbox = "noreply@contoso.test"
spool_directory = "{spool}"
time_budget = 20

[routes.graph.sender_map]
client_addr = "cidr:senders.cidr"
unmapped = "refuse"

[[rules]]
name = "devices"
client_addr = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
route = "graph"
"""


class SenderMap(harness.IntegrationTestCase):
    def setUp(self) -> None:
        if not harness.milter_binary():
            self.skipTest("PAAS_MILTER_BIN unset or not an executable")
        self.mock = MockGraph(mailboxes=["noreply@contoso.test", "printer@contoso.test",
                                         "scanner@contoso.test"])
        self.mock.start()
        self.addCleanup(self.mock.stop)
        self.sink = self.start_sink("default")
        port = harness.free_port()
        os.chmod(self.write_config("graph.secret", self.mock.client_secret + "\n"), 0o600)
        self.write_config("senders.cidr", "127.0.0.2/32 printer@contoso.test\n"
                                          "127.0.0.3/32 scanner@contoso.test\n")
        spool = os.path.join(self.workdir(), "spool")
        os.makedirs(spool)
        body = CONFIG.format(endpoint=self.mock.endpoint, tenant=self.mock.tenant_id,
                             client=self.mock.client_id, ca_file=self.mock.ca_file, spool=spool)
        self.milter = self.start_milter(port, harness.milter_config(port, body))
        self.postfix = self.start_postfix(default_sink=self.sink, milter_port=port)

    def send(self, client: str) -> harness.SwaksResult:
        return harness.swaks(self.postfix.smtpd_port, local_interface=client,
                             from_="device@contoso.test", to=["customer@example.net"], timeout=60)

    def test_each_client_sends_as_its_own_mailbox(self) -> None:
        for client, mailbox in (("127.0.0.2", "printer@contoso.test"),
                                ("127.0.0.3", "scanner@contoso.test")):
            result = self.send(client)
            self.assertEqual(result.data_code, 250, result.transcript)
            line = self.milter.wait_for_log(rf"{result.queue_id}: (.*)").group(1)
            self.assertIn(f"sender={mailbox} (client_addr={client}@", line)
            self.assertIn("api=accepted", line)
        self.assertEqual([m.mailbox for m in self.mock.wait_for_sent(2)],
                         ["printer@contoso.test", "scanner@contoso.test"])

    def test_a_client_the_map_does_not_know_is_refused(self) -> None:
        result = self.send("127.0.0.4")
        self.assertEqual(result.data_code, 550, result.transcript)
        self.assertIn("5.7.1", result.transcript)
        line = self.milter.wait_for_log(r"route=graph, action=api.*").group(0)
        self.assertIn("sender=refused (no sender_map entry knows this client)", line)
        self.assertEqual(self.mock.sent(), [])
        self.assertEqual(self.sink.messages(), [])

    def test_query_shows_the_sender_a_client_would_get(self) -> None:
        def query(client: str) -> str:
            return subprocess.run([harness.milter_binary(), "query", "-c",
                                   self.milter.config_path, "--client-addr", client],
                                  capture_output=True, text=True, check=True).stdout
        self.assertIn('mailbox: printer@contoso.test (sender_map: client_addr "127.0.0.2" by '
                      'cidr:', query("127.0.0.2"))
        self.assertIn("mailbox: (refused: no sender_map entry knows this client; 550 5.7.1)",
                      query("127.0.0.4"))


if __name__ == "__main__":
    unittest.main()
