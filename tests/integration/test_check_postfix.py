"""`paas-milter check --postfix-config DIR` against real postconf output: a private Postfix
configuration (harness.PrivatePostfix writes main.cf, master.cf and milter_header_checks; it
is never started: postconf -c DIR reads the files as they are) wired correctly gives no
warning, and each miswiring gives the one warning that names the setting and the value to
write. The exit status stays 0 throughout: warnings never fail `check`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

ROUTES = """
[routes.acs-smtp]
action = "relay"
transport = "acs-relay:[127.0.0.1]:{relay_port}"

[routes.block]
action = "reject"

[[rules]]
name = "printers"
client_addr = ["192.0.2.0/24"]
route = "acs-smtp"

[[rules]]
name = "blocked"
sender = ["spam@example.com"]
route = "block"
"""


class CheckAgainstPostfix(harness.IntegrationTestCase):
    def setUp(self) -> None:
        if not os.access(harness.POSTCONF, os.X_OK):
            self.skipTest(f"{harness.POSTCONF} missing")
        self.binary = harness.milter_binary()
        if not self.binary:
            self.skipTest("PAAS_MILTER_BIN unset or not an executable")
        self.milter_port = harness.free_port()
        self.relay_port = harness.free_port()
        self.postfix = harness.PrivatePostfix(
            self.workdir(), default_sink_port=harness.free_port(),
            routes={"acs-smtp": ("acs-relay", self.relay_port)}, milter_port=self.milter_port)
        self.routes = ROUTES.format(relay_port=self.relay_port)
        self.write_milter_config()

    # -- helpers ----------------------------------------------------------------------------
    def write_milter_config(self, body: str | None = None, **milter_keys: str) -> None:
        self.config = self.write_config(
            "paas-milter.toml",
            harness.milter_config(self.milter_port, self.routes if body is None else body,
                                  **milter_keys))

    def check(self, *extra: str) -> tuple[list[str], str]:
        """Runs check; returns its warnings (without "warning: ") and its stdout."""
        proc = subprocess.run(
            [self.binary, "check", "-c", self.config, "--postfix-config",
             self.postfix.config_dir, *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
            timeout=60, text=True)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertIn(": OK (", proc.stdout)
        warnings = []
        for line in proc.stderr.splitlines():
            self.assertTrue(line.startswith("warning: "), f"unexpected stderr line: {line!r}")
            warnings.append(line[len("warning: "):])
        return warnings, proc.stdout

    def assert_one_warning(self, *fragments: str) -> str:
        warnings, _ = self.check()
        self.assertEqual(len(warnings), 1, "\n".join(warnings))
        for fragment in fragments:
            self.assertIn(fragment, warnings[0])
        return warnings[0]

    def smtpd_service(self) -> str:
        return f"127.0.0.1:{self.postfix.smtpd_port}/inet"

    def smtpd_services(self) -> list[str]:
        """Every smtpd service of the private master.cf (an IPv6 one where ::1 exists)."""
        services = [self.smtpd_service()]
        if self.postfix.smtpd6_port:
            services.append(f"[::1]:{self.postfix.smtpd6_port}/inet")
        return services

    def chroot(self, services: list[str]) -> None:
        """Sets the chroot column of these services to y (postconf -F)."""
        harness._run([harness.POSTCONF, "-c", self.postfix.config_dir, "-F",
                      *(f"{service}/chroot=y" for service in services)])

    def postfix_milter(self) -> str:
        return f"inet:127.0.0.1:{self.milter_port}"

    # -- well wired -------------------------------------------------------------------------
    def test_wired_postfix_gives_no_warning(self) -> None:
        warnings, stdout = self.check()
        self.assertEqual(warnings, [])
        self.assertNotIn("info:", stdout)

    def test_per_milter_settings_and_a_second_milter_are_understood(self) -> None:
        self.postfix.postconf(smtpd_milters=f"inet:127.0.0.1:8891, "
                                            f"{{ {self.postfix_milter()}, default_action=tempfail,"
                                            f" connect_timeout=10s }}")
        self.assertEqual(self.check()[0], [])

    def test_chrooted_smtpd_with_a_socket_in_the_queue_directory(self) -> None:
        socket = os.path.join(self.postfix.queue_dir, "paas-milter", "milter.sock")
        self.write_milter_config(socket=f"unix:{socket}")
        self.chroot(self.smtpd_services())
        self.postfix.postconf(smtpd_milters="unix:/paas-milter/milter.sock")
        self.assertEqual(self.check()[0], [])

    # -- miswired ---------------------------------------------------------------------------
    def test_milter_missing_from_smtpd_milters(self) -> None:
        self.postfix.postconf(smtpd_milters=None)
        self.assert_one_warning("main.cf smtpd_milters (empty) does not name milter.socket",
                                f"write smtpd_milters = {self.postfix_milter()} in main.cf")

    def test_libmilter_syntax_in_smtpd_milters(self) -> None:
        self.postfix.postconf(smtpd_milters=f"inet:{self.milter_port}@127.0.0.1")
        self.assert_one_warning("libmilter's syntax",
                                f"write smtpd_milters = {self.postfix_milter()} in main.cf")

    def test_default_action_accept(self) -> None:
        self.postfix.postconf(milter_default_action="accept")
        self.assert_one_warning("milter_default_action = accept",
                                "write milter_default_action = tempfail")

    def test_default_action_accept_for_one_smtpd_service(self) -> None:
        self.postfix.postconf_master(f"{self.smtpd_service()}/milter_default_action=accept")
        self.assert_one_warning(f"master.cf service {self.smtpd_service()}",
                                "-o milter_default_action=tempfail")

    def test_relay_route_without_header_checks_line(self) -> None:
        self.postfix.write_header_checks([])
        self.assert_one_warning(
            'route "acs-smtp"', "no line of milter_header_checks",
            f"add the line /^X-PaaS-Route:\\s*acs-smtp$/ FILTER acs-relay:[127.0.0.1]:"
            f"{self.relay_port} to {self.postfix.header_checks_file}")

    def test_milter_header_checks_unset(self) -> None:
        self.postfix.postconf(milter_header_checks=None)
        self.assert_one_warning("milter_header_checks is empty")

    def test_header_checks_line_to_another_transport(self) -> None:
        self.postfix.write_header_checks(
            [f"/^X-PaaS-Route:\\s*acs-smtp$/ FILTER smtp:[127.0.0.1]:{self.relay_port}"])
        warning = self.assert_one_warning(
            f"{self.postfix.header_checks_file}:2", "not FILTER acs-relay:[127.0.0.1]:")
        self.assertIn(f"goes to smtp:[127.0.0.1]:{self.relay_port}", warning)

    def test_unix_socket_outside_a_chrooted_smtpd(self) -> None:
        socket = os.path.join(self.workdir(), "run", "milter.sock")
        self.write_milter_config(socket=f"unix:{socket}")
        self.chroot(self.smtpd_services())
        self.postfix.postconf(smtpd_milters=f"unix:{socket}")
        self.assert_one_warning(f"is outside queue_directory {self.postfix.queue_dir}",
                                f"smtpd service {self.smtpd_service()} chrooted")

    def test_full_path_given_to_a_chrooted_smtpd(self) -> None:
        socket = os.path.join(self.postfix.queue_dir, "paas-milter", "milter.sock")
        self.write_milter_config(socket=f"unix:{socket}")
        self.chroot(self.smtpd_services())
        self.postfix.postconf(smtpd_milters=f"unix:{socket}")
        self.assert_one_warning("chrooted in",
                                "write smtpd_milters = unix:/paas-milter/milter.sock")

    def test_path_inside_the_chroot_given_to_a_plain_smtpd_too(self) -> None:
        if not self.postfix.smtpd6_port:
            self.skipTest("needs a second smtpd service (::1)")
        socket = os.path.join(self.postfix.queue_dir, "paas-milter", "milter.sock")
        self.write_milter_config(socket=f"unix:{socket}")
        self.chroot([self.smtpd_service()])  # the [::1] service stays without chroot
        self.postfix.postconf(smtpd_milters="unix:/paas-milter/milter.sock")
        self.assert_one_warning(f"smtpd service [::1]:{self.postfix.smtpd6_port}/inet without "
                                "chroot", "write smtpd_milters = unix:paas-milter/milter.sock")

    def test_route_no_rule_uses(self) -> None:
        self.routes += '\n[routes.spare]\naction = "tempfail"\n'
        self.write_milter_config()
        self.assert_one_warning("routes.spare: no rule")

    # -- when Postfix cannot be asked -------------------------------------------------------
    def test_postconf_failing_is_a_warning_not_a_failure(self) -> None:
        os.remove(self.postfix.main_cf)
        self.assert_one_warning("postconf", "Postfix wiring not checked")

    def test_missing_postconf_program(self) -> None:
        self.routes += '\n[routes.spare]\naction = "tempfail"\n'
        self.write_milter_config()
        warnings, _ = self.check("--postconf", os.path.join(self.workdir(), "no-postconf"))
        self.assertEqual(len(warnings), 2, "\n".join(warnings))
        self.assertIn("routes.spare: no rule", warnings[0])  # needs no Postfix
        self.assertIn("Postfix wiring not checked", warnings[1])

    def test_postconf_that_hangs_is_killed(self) -> None:
        hanging = self.write_config("hanging-postconf", "#!/bin/sh\nexec sleep 600\n")
        os.chmod(hanging, 0o755)
        warnings, _ = self.check("--postconf", hanging)
        self.assertEqual(len(warnings), 1, "\n".join(warnings))
        self.assertIn("no answer within 10 s: Postfix wiring not checked", warnings[0])

    def test_other_table_types_are_noted_not_judged(self) -> None:
        self.postfix.postconf(milter_header_checks=f"texthash:{self.postfix.header_checks_file}")
        warnings, stdout = self.check()
        self.assertEqual(warnings, [])
        self.assertRegex(stdout, re.compile(r"^info: milter_header_checks: texthash:.* is not a "
                                            r"regexp: or pcre: table", re.M))


if __name__ == "__main__":
    unittest.main()
