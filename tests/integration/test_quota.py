"""Route quotas end to end: swaks -> a real private Postfix -> paas-milter -> the loopback ACS
double, with on_quota = "relay:acs-smtp" sending what the bucket does not allow to the relay
sink (Postfix's FILTER transport), and the fleet's buckets in a real redis-server that the
test starts on a free loopback port in its own directory (Debian's package; never the system
instance on 6379).

* a burst of 8 messages to a route with quota_messages_per_hour = 3: exactly 3 at the
  service, 5 at the relay sink, none lost or doubled;
* two milters (two Postfix instances, two gateways) sharing one Redis: together exactly the
  bucket's 5 at the service, the rest relayed; `paas-milter query` reads the shared level;
* Redis SIGKILLed mid-burst: both milters carry on with their local share (1/2 of the bucket,
  minus what they had taken through Redis), say so in their logs and in the metric
  paas_milter_quota_store_up, and every message is at the service or the relay sink once;
* a 429 from the service drains the route's bucket: the next message takes on_quota without
  a request to the service;
* a client's retry of a message the service accepted, once the bucket is empty, is
  discarded as a duplicate: the quota is charged only for a request about to be posted new.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from mock_acs import MockAcs  # noqa: E402

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"

ROUTES = """
[routes.acs-smtp]
action = "relay"

[routes.acs-api]
action = "api"
connection_string_file = "acs.conn"
ca_file = "{ca_file}"
sender = "DoNotReply@contoso.azurecomm.test"
verified_domains = ["contoso.test"]
spool_directory = "{spool}"
time_budget = 30
request_timeout = 5
{quota}
on_quota = "relay:acs-smtp"

[[rules]]
name = "devices"
client_addr = ["127.0.0.2"]
route = "acs-api"
{extra}
"""


class RedisServer:
    """redis-server on 127.0.0.1:PORT, nothing persisted, in DIRECTORY."""

    def __init__(self, directory: str) -> None:
        self.dir = directory
        os.makedirs(directory, exist_ok=True)
        self.port = harness.free_port()
        self.proc: subprocess.Popen | None = None

    def __repr__(self) -> str:
        return f"<RedisServer 127.0.0.1:{self.port}>"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> "RedisServer":
        log = open(os.path.join(self.dir, "redis.log"), "ab")
        try:
            self.proc = subprocess.Popen(
                [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", self.dir, "--protected-mode", "yes"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        finally:
            log.close()
        harness.wait_listening(self.port, alive=lambda: self.proc.poll() is None,
                               what="redis-server")
        return self

    def kill(self) -> None:
        """SIGKILL: the store vanishes mid-conversation, as in a crash."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    stop = kill

    def diagnostics(self) -> str:
        running = self.proc is not None and self.proc.poll() is None
        return f"--- {self!r} ({'running' if running else 'stopped'})"


class QuotaTestCase(harness.IntegrationTestCase):
    def setUp(self) -> None:
        if not harness.milter_binary():
            self.skipTest("PAAS_MILTER_BIN unset or not an executable")
        self.mock = MockAcs(verified_domains=("contoso.test", "contoso.azurecomm.test"))
        self.mock.start()
        self.addCleanup(self.mock.stop)
        self.default_sink = self.start_sink("default")
        self.relay_sink = self.start_sink("relay")
        self.spool = os.path.join(self.workdir(), "spool")
        os.makedirs(self.spool)

    def start_redis(self) -> RedisServer:
        if not os.access(REDIS_SERVER, os.X_OK):
            self.skipTest("redis-server is not installed (Debian package redis-server)")
        redis = RedisServer(os.path.join(self.workdir(), "redis"))
        self._track(redis)
        return redis.start()

    def start_gateway(self, name: str, quota: str, extra: str = "",
                      metrics_port: int | None = None) -> tuple[harness.Milter,
                                                                harness.PrivatePostfix]:
        """A milter with its own directory (configuration, state, log) and a Postfix wired
        to it: one gateway of the fleet. Both relay to the same sinks."""
        directory = os.path.join(self.workdir(), name)
        os.makedirs(directory)
        with open(os.path.join(directory, "acs.conn"), "w") as f:
            f.write(self.mock.connection_string + "\n")
        os.chmod(os.path.join(directory, "acs.conn"), 0o600)
        if metrics_port:
            extra += f'\n[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n'
        port = harness.free_port()
        config = os.path.join(directory, "paas-milter.toml")
        with open(config, "w") as f:
            f.write(harness.milter_config(port, ROUTES.format(
                ca_file=self.mock.ca_file, spool=self.spool, quota=quota, extra=extra)))
        milter = self._track(harness.Milter(config, port)).start()
        postfix = harness.PrivatePostfix(
            directory, default_sink_port=self.default_sink.port, milter_port=port,
            routes={"acs-smtp": ("acs-relay", self.relay_sink.port)})
        self._track(postfix)
        return milter, postfix.start()

    def send(self, postfix: harness.PrivatePostfix, subject: str) -> harness.SwaksResult:
        return harness.swaks(postfix.smtpd_port, local_interface="127.0.0.2",
                             from_="scanner@contoso.test", to=["customer@example.net"],
                             headers=[f"Subject: {subject}"], timeout=60)

    def send_all(self, postfix: harness.PrivatePostfix, subjects: list[str],
                 results: dict[str, harness.SwaksResult]) -> None:
        for subject in subjects:
            results[subject] = self.send(postfix, subject)

    def decisions(self, milter: harness.Milter, results: dict[str, harness.SwaksResult],
                  subjects: list[str]) -> dict[str, str]:
        return {s: milter.wait_for_log(rf"{results[s].queue_id}: (rule=.*)", timeout=30).group(1)
                for s in subjects}

    def assert_each_once(self, subjects: list[str], at_service: int) -> None:
        """Every message exactly once: AT_SERVICE of them accepted by the double, the rest
        at the relay sink; nothing at the default relayhost."""
        relayed = len(subjects) - at_service
        accepted = self.mock.wait_for_accepted(at_service, timeout=30)
        sunk = self.relay_sink.wait_for(relayed, timeout=60) if relayed else []
        time.sleep(1.0)  # anything more would show up now
        accepted = self.mock.accepted_messages()
        sunk = self.relay_sink.messages()
        self.assertEqual(len(accepted), at_service, self.mock.diagnostics())
        self.assertEqual(len(sunk), relayed, self.relay_sink.describe())
        seen = sorted([m.subject for m in accepted] + [str(m["Subject"]) for m in sunk])
        self.assertEqual(seen, sorted(subjects))
        self.assertEqual(self.default_sink.messages(), [])


class Burst(QuotaTestCase):
    def test_a_burst_sends_exactly_the_bucket_and_relays_the_rest(self) -> None:
        milter, postfix = self.start_gateway("gw", "quota_messages_per_hour = 3")
        subjects = [f"burst {n}" for n in range(8)]
        results: dict[str, harness.SwaksResult] = {}
        clients = [threading.Thread(target=self.send_all, args=(postfix, [s], results))
                   for s in subjects]
        for client in clients:
            client.start()
        for client in clients:
            client.join(120)
        self.assertEqual({s: r.data_code for s, r in results.items()},
                         {s: 250 for s in subjects})
        self.assert_each_once(subjects, at_service=3)
        decisions = self.decisions(milter, results, subjects)
        quota = [d for d in decisions.values() if "api=quota" in d]
        self.assertEqual(len(quota), 5, decisions)
        for line in quota:
            self.assertRegex(line, r"quota=refused \(messages_per_hour empty: 0(\.\d+)? of 3 left, "
                                   r"needs 1; store=local\)")
            self.assertIn("policy=relay:acs-smtp, header=X-PaaS-Route: acs-smtp", line)
        accepted = [d for d in decisions.values() if "api=accepted" in d]
        self.assertEqual(len(accepted), 3, decisions)
        self.assertEqual(sorted(re.search(r"quota=messages_per_hour:(\d)(\.\d+)?/3", d).group(1)
                                for d in accepted), ["0", "1", "2"])
        # No request of the five reached the service.
        self.assertEqual(len(self.mock.requests("send")), 3)


class Throttled(QuotaTestCase):
    def test_a_429_drains_the_bucket_so_the_next_message_takes_on_quota(self) -> None:
        milter, postfix = self.start_gateway("gw", "quota_messages_per_hour = 100")
        self.mock.fail_next(429, retry_after=1)
        results: dict[str, harness.SwaksResult] = {}
        self.send_all(postfix, ["throttled", "after the 429"], results)
        self.assertEqual([r.data_code for r in results.values()], [250, 250])
        self.assert_each_once(["throttled", "after the 429"], at_service=1)
        self.assertEqual(self.mock.accepted_messages()[0].subject, "throttled")
        # The throttled message was retried after Retry-After (two POSTs); the next one
        # never reached the service.
        self.assertEqual([r.status for r in self.mock.requests("send")], [429, 202])
        first, second = self.decisions(milter, results, ["throttled", "after the 429"]).values()
        self.assertIn("api=accepted", first)
        self.assertRegex(first, r"quota=messages_per_hour:99(\.\d+)?/100")
        self.assertRegex(second, r"quota=refused \(messages_per_hour empty: 0(\.\d+)? of 100 left, "
                                 r"needs 1; store=local\)")
        self.assertIn("policy=relay:acs-smtp", second)


class RetryOfAcceptedMessage(QuotaTestCase):
    def test_a_retry_with_the_bucket_empty_is_discarded_not_sent_again(self) -> None:
        # The client never saw the 250 for a message the service accepted (a lost reply, a
        # timeout) and sends the very same message again; by then the bucket is empty. The
        # service has it: the retry is discarded, not relayed (a second copy) or held.
        milter, postfix = self.start_gateway("gw", "quota_messages_per_hour = 1")
        data = ("From: scanner@contoso.test\r\nTo: customer@example.net\r\n"
                "Subject: sent once\r\nDate: Fri, 04 Dec 2026 12:00:00 +0000\r\n"
                "Message-ID: <retry-1@contoso.test>\r\n\r\npage 1\r\n")

        def send_same() -> harness.SwaksResult:
            return harness.swaks(postfix.smtpd_port, local_interface="127.0.0.2",
                                 from_="scanner@contoso.test", to=["customer@example.net"],
                                 data=data, timeout=60)

        results = {"first": send_same(), "retry": send_same()}
        results["other"] = self.send(postfix, "a new message")
        self.assertEqual([r.data_code for r in results.values()], [250, 250, 250])
        # Once at the service, the new message at the relay sink: the bucket was empty.
        self.assert_each_once(["sent once", "a new message"], at_service=1)
        self.assertEqual([r.status for r in self.mock.requests("send")], [202])
        first, retry, other = self.decisions(milter, results, list(results)).values()
        self.assertIn("api=accepted", first)
        self.assertRegex(first, r"quota=messages_per_hour:0(\.\d+)?/1")
        self.assertIn("api=accepted, requests=0", retry)
        self.assertIn("local_copy=discarded", retry)
        self.assertNotIn("quota=", retry)
        self.assertIn("quota=refused (messages_per_hour empty", other)
        self.assertIn("policy=relay:acs-smtp", other)


class Fleet(QuotaTestCase):
    def fleet(self, quota: str, metrics: bool = False):
        self.redis = self.start_redis()
        shared = f'\n[quota]\nstore = "{self.redis.url}"\nfleet_size = 2\n'
        self.metrics_ports = [harness.free_port(), harness.free_port()] if metrics else [None, None]
        return [self.start_gateway(name, quota, shared, metrics_port=port)
                for name, port in zip(("gw-a", "gw-b"), self.metrics_ports)]

    def test_two_gateways_sharing_redis_send_exactly_the_bucket_together(self) -> None:
        (milter_a, postfix_a), (milter_b, postfix_b) = self.fleet("quota_messages_per_hour = 5")
        for milter in (milter_a, milter_b):
            milter.wait_for_log(rf"quota store {re.escape(self.redis.url)}/0 reachable: buckets "
                                r"shared by the fleet \(fleet_size 2\)")
        subjects_a = [f"gateway a {n}" for n in range(6)]
        subjects_b = [f"gateway b {n}" for n in range(6)]
        results: dict[str, harness.SwaksResult] = {}
        clients = [threading.Thread(target=self.send_all, args=(pf, [s], results))
                   for pf, subjects in ((postfix_a, subjects_a), (postfix_b, subjects_b))
                   for s in subjects]
        for client in clients:
            client.start()
        for client in clients:
            client.join(120)
        self.assertEqual(sorted(r.data_code for r in results.values()), [250] * 12)
        self.assert_each_once(subjects_a + subjects_b, at_service=5)
        lines = list(self.decisions(milter_a, results, subjects_a).values()) + \
            list(self.decisions(milter_b, results, subjects_b).values())
        refused = [line for line in lines if "api=quota" in line]
        self.assertEqual(len(refused), 7)
        for line in refused:
            self.assertIn(f"store={self.redis.url}/0)", line)
        # `query` reads the shared level, and takes nothing.
        for _ in range(2):
            out = subprocess.run([harness.milter_binary(), "query", "-c", milter_a.config_path,
                                  "--client-addr", "127.0.0.2", "--rcpt", "x@example.net"],
                                 capture_output=True, text=True, timeout=30)
            self.assertEqual(out.returncode, 0, out.stderr)
            self.assertIn("quota: messages_per_hour 5 (on_quota: relay:acs-smtp)", out.stdout)
            self.assertRegex(out.stdout, rf"quota levels: messages_per_hour 0(\.\d+)?/5 in "
                                         rf"{re.escape(self.redis.url)}/0")

    def test_redis_killed_mid_burst_both_continue_on_their_local_share(self) -> None:
        # 10 an hour for the fleet, 5 per gateway without Redis. Each gateway sends 6 messages,
        # one after the other, both at once; Redis dies once 4 are at the service. Whatever
        # each took through Redis also left its local share, so each gateway sends 5 in all
        # and relays 1: exactly 10 at the service, 2 relayed, none twice, none lost. (That
        # holds while neither gateway got all 6 through Redis before the kill: when the 4th
        # is accepted, each has at most one more message in flight.)
        (milter_a, postfix_a), (milter_b, postfix_b) = self.fleet(
            "quota_messages_per_hour = 10", metrics=True)
        for port in self.metrics_ports:
            self.assertIn("paas_milter_quota_store_up 1", harness.scrape_metrics(port))
        subjects_a = [f"gateway a {n}" for n in range(6)]
        subjects_b = [f"gateway b {n}" for n in range(6)]
        results: dict[str, harness.SwaksResult] = {}
        clients = [threading.Thread(target=self.send_all, args=(postfix_a, subjects_a, results)),
                   threading.Thread(target=self.send_all, args=(postfix_b, subjects_b, results))]
        for client in clients:
            client.start()
        self.mock.wait_for_accepted(4, timeout=60)
        self.redis.kill()
        for client in clients:
            client.join(180)
        self.assertEqual(sorted(r.data_code for r in results.values()), [250] * 12)
        self.assert_each_once(subjects_a + subjects_b, at_service=10)
        for milter, subjects in ((milter_a, subjects_a), (milter_b, subjects_b)):
            milter.wait_for_log(rf"quota store {re.escape(self.redis.url)}/0 unreachable "
                                r"\(.*\): using the local share \(1/2\) of each bucket")
            lines = list(self.decisions(milter, results, subjects).values())
            self.assertEqual(sum("api=accepted" in line for line in lines), 5, lines)
            self.assertEqual(sum("api=quota" in line for line in lines), 1, lines)
            self.assertTrue(any("(store=local share 1/2" in line for line in lines), lines)
        for port in self.metrics_ports:
            self.assertIn("paas_milter_quota_store_up 0", harness.scrape_metrics(port))
            self.assertRegex(harness.scrape_metrics(port),
                             r'paas_milter_quota_exhausted_total\{bucket="messages_per_hour",'
                             r'route="acs-api"\} 1')


if __name__ == "__main__":
    unittest.main()
