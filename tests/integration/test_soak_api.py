"""A small fault soak per failure policy (see soak_api.py): lost 0, duplicates 0, with the
service re-executing repeated Operation-Ids, the milter SIGKILLed and SIGHUPed meanwhile."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
import soak_api  # noqa: E402


class SoakApi(harness.IntegrationTestCase):
    def soak(self, policy: str) -> None:
        settings = soak_api.SoakSettings(policy=policy, messages=30, kills=1, hup_bursts=1,
                                         outages=1, seed=7, deadline=240)
        report = soak_api.run_soak(self, settings)
        table = f"{soak_api.SoakReport.header()}\n{report.row()}\n" + "\n".join(report.problems)
        print(f"\n{table}", file=sys.stderr)
        self.assertEqual(report.problems, [], table)
        self.assertEqual((report.lost, report.duplicates, report.unfinished), (0, 0, 0), table)
        self.assertEqual(report.kills, 1, table)

    def test_tempfail(self) -> None:
        self.soak("tempfail")

    def test_relay(self) -> None:
        self.soak("relay")

    def test_hold(self) -> None:
        self.soak("hold")

    def test_reject(self) -> None:
        self.soak("reject")
