"""Prometheus metrics scraped over loopback after traffic through a real Postfix: every
transaction counted by rule, route, action and outcome, the API requests by status class with
their latency histogram, retries, the final statuses polled after a 202, the forged routing
headers removed, and the configuration's generation and last reload result.

swaks -> private Postfix -> paas-milter ([metrics] listen on a free loopback port) -> smtp-sink
or the ACS double; the test reads http://127.0.0.1:PORT/metrics as Prometheus would.
"""

from __future__ import annotations

import os
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from mock_acs import MockAcs  # noqa: E402

ROUTES = """
[metrics]
listen = "127.0.0.1:{metrics_port}"

[routes.acs-smtp]
action = "relay"

[routes.acs-api]
action = "api"
connection_string_file = "acs.conn"
ca_file = "{ca_file}"
sender = "DoNotReply@contoso.azurecomm.test"
verified_domains = ["contoso.test"]
spool_directory = "{spool}"
time_budget = 20
request_timeout = 5
on_failure = "relay:acs-smtp"

[routes.blocked]
action = "reject"

[[rules]]
name = "printers"
client_addr = ["127.0.0.2"]
route = "acs-smtp"

[[rules]]
name = "devices"
client_addr = ["127.0.0.3"]
route = "acs-api"

[[rules]]
name = "blocked"
client_addr = ["127.0.0.4"]
route = "blocked"
"""

def transactions(rule: str, route: str, action: str, outcome: str) -> str:
    return (f'paas_milter_transactions_total{{action="{action}",outcome="{outcome}",'
            f'route="{route}",rule="{rule}"}}')


class Metrics(harness.IntegrationTestCase):
    def setUp(self) -> None:
        if not harness.milter_binary():
            self.skipTest("PAAS_MILTER_BIN unset or not an executable")
        self.mock = MockAcs(verified_domains=("contoso.test", "contoso.azurecomm.test"),
                            retry_after=1)
        self.mock.start()
        self.addCleanup(self.mock.stop)
        self.default_sink = self.start_sink("default")
        self.relay_sink = self.start_sink("acs")
        self.write_config("acs.conn", self.mock.connection_string + "\n")
        spool = os.path.join(self.workdir(), "spool")
        os.makedirs(spool)
        self.metrics_port = harness.free_port()
        self.milter_port = harness.free_port()
        self.body = ROUTES.format(metrics_port=self.metrics_port, ca_file=self.mock.ca_file,
                                  spool=spool)
        self.milter = self.start_milter(self.milter_port,
                                        harness.milter_config(self.milter_port, self.body))
        self.postfix = self.start_postfix(
            default_sink=self.default_sink, milter_port=self.milter_port,
            routes={"acs-smtp": ("acs-relay", self.relay_sink.port)})

    def scrape(self) -> tuple[str, dict[str, float]]:
        text = harness.scrape_metrics(self.metrics_port)
        return text, harness.metric_samples(text)

    def send(self, client: str, **kw) -> harness.SwaksResult:
        kw.setdefault("from_", "scanner@contoso.test")
        kw.setdefault("to", ["customer@example.net"])
        return harness.swaks(self.postfix.smtpd_port, local_interface=client, timeout=60, **kw)

    def wait_for_metric(self, name: str, value: float, timeout: float = 30) -> dict[str, float]:
        deadline = time.monotonic() + timeout
        while True:
            _, samples = self.scrape()
            if samples.get(name) == value or time.monotonic() > deadline:
                self.assertEqual(samples.get(name), value, name)
                return samples
            time.sleep(0.2)

    def test_counters_after_traffic_through_postfix(self) -> None:
        _, before = self.scrape()
        self.assertEqual(before["paas_milter_config_generation"], 1)
        self.assertEqual(before["paas_milter_config_last_reload_success"], 1)
        self.assertEqual(before["paas_milter_messages_in_flight"], 0)

        # Relay route, twice, once with a forged routing header the milter removes.
        self.assertEqual(self.send("127.0.0.2").data_code, 250)
        forged = self.send("127.0.0.2", headers=[f"{harness.ROUTING_HEADER}: elsewhere"])
        self.assertEqual(forged.data_code, 250)
        # No rule: passed. Blocked: rejected.
        self.assertEqual(self.send("127.0.0.1").data_code, 250)
        self.assertEqual(self.send("127.0.0.4").data_code, 550)
        # API route: accepted; then the service throttles every try and the message falls back
        # to the relay route.
        self.assertEqual(self.send("127.0.0.3").data_code, 250)
        self.mock.fail_next(429, retry_after=1, count=20)
        fell_back = self.send("127.0.0.3", to=["other@example.net"])
        self.assertEqual(fell_back.data_code, 250)
        self.mock.clear_faults()
        self.relay_sink.wait_for(3)
        self.default_sink.wait_for(1)

        samples = self.wait_for_metric(
            'paas_milter_api_final_status_total{provider="acs",status="Succeeded"}', 1)
        self.assertEqual(samples[transactions("printers", "acs-smtp", "relay", "relayed")], 2)
        self.assertEqual(samples[transactions("", "", "", "passed")], 1)
        self.assertEqual(samples[transactions("blocked", "blocked", "reject", "rejected")], 1)
        self.assertEqual(samples[transactions("devices", "acs-api", "api", "submitted")], 1)
        self.assertEqual(samples[transactions("devices", "acs-api", "api", "fell_back")], 1)
        self.assertEqual(samples["paas_milter_forged_routing_headers_removed_total"], 1)

        posts_2xx = samples['paas_milter_api_requests_total{method="POST",provider="acs",'
                            'status_class="2xx"}']
        posts_429 = samples['paas_milter_api_requests_total{method="POST",provider="acs",'
                            'status_class="429"}']
        posts = [r for r in self.mock.requests("send")]
        self.assertEqual(posts_2xx, sum(1 for r in posts if r.status == 202))
        self.assertEqual(posts_429, sum(1 for r in posts if r.status == 429))
        self.assertGreaterEqual(posts_429, 2)
        self.assertGreaterEqual(samples['paas_milter_api_retries_total{provider="acs"}'],
                                posts_429 - 1)
        histogram = samples['paas_milter_api_request_duration_seconds_count{method="POST",'
                            'provider="acs"}']
        self.assertEqual(histogram, posts_2xx + posts_429)
        self.assertEqual(samples["paas_milter_messages_in_flight"], 0)

    def test_reload_generation_and_result(self) -> None:
        config = os.path.join(self.workdir(), "paas-milter.toml")
        self.milter.reload()
        self.milter.wait_for_log(r"configuration reloaded", timeout=15)
        samples = self.wait_for_metric("paas_milter_config_generation", 2)
        self.assertEqual(samples["paas_milter_config_last_reload_success"], 1)
        loaded_at = samples["paas_milter_config_last_reload_timestamp_seconds"]
        self.assertLessEqual(abs(loaded_at - time.time()), 30)

        with open(config, "a") as f:
            f.write("\n[routes.broken]\naction = \"nonsense\"\n")
        self.milter.reload()
        self.milter.wait_for_log(r"reload refused", timeout=15)
        samples = self.wait_for_metric("paas_milter_config_last_reload_success", 0)
        self.assertEqual(samples["paas_milter_config_generation"], 2)
        self.assertEqual(samples['paas_milter_config_loads_total{result="refused"}'], 1)

    def test_the_exposition_holds_no_secret(self) -> None:
        self.assertEqual(self.send("127.0.0.3").data_code, 250)
        self.wait_for_metric(transactions("devices", "acs-api", "api", "submitted"), 1)
        text, _ = self.scrape()
        self.assertNotIn(self.mock.access_key, text)
        self.assertNotIn(self.mock.access_key, self.milter.log())


class MetricsPortInUse(harness.IntegrationTestCase):
    def test_a_metrics_port_in_use_stops_the_start_with_a_clear_error(self) -> None:
        if not harness.milter_binary():
            self.skipTest("PAAS_MILTER_BIN unset or not an executable")
        sink = self.start_sink("busy")  # something already listening on the port
        milter_port = harness.free_port()
        body = f'[metrics]\nlisten = "127.0.0.1:{sink.port}"\n\n[routes.r]\naction = "relay"\n'
        milter = self.start_milter(milter_port, harness.milter_config(milter_port, body),
                                   start=False)
        with self.assertRaises(harness.HarnessError):
            milter.start(timeout=10)
        self.assertEqual(milter.returncode, 1)
        self.assertIn(f"cannot serve metrics on 127.0.0.1:{sink.port}", milter.log())


if __name__ == "__main__":
    unittest.main()
