"""What the end-to-end benchmarks share (throughput.py, api_route.py): their error types,
how a signal unwinds them, the warning about a loaded machine, and the frame of main() that
reports a failure and always cleans up. Python 3.11 standard library only."""

from __future__ import annotations

import os
import signal
import sys
from typing import Callable, TypeVar

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "integration"))

import harness  # noqa: E402  (tests/integration/harness.py)

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class BenchError(RuntimeError):
    pass


class Interrupted(BaseException):
    """SIGTERM/SIGINT/SIGHUP: unwind through every finally block, then exit."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _on_signal(signum, _frame):
    raise Interrupted(signum)


def load_average_warned(prog: str) -> tuple[float, float, float]:
    """The load average now, with a warning on stderr when it says the figures will be noisy."""
    load = os.getloadavg()
    if load[0] > 0.5 * os.cpu_count():
        print(f"{prog}: warning: load average {load[0]:.2f} on {os.cpu_count()} CPUs "
              f"before the start: the figures will be noisy", file=sys.stderr)
    return load


B = TypeVar("B")


def run_bench(prog: str, make: Callable[[], B], body: Callable[[B], int]) -> int:
    """BODY(MAKE()) with the signals turned into Interrupted; a failure is one line on stderr
    and exit status 1 (128 + the signal when interrupted); the bench's teardown() always runs,
    and no second signal can cut it short."""
    for s in SIGNALS:
        signal.signal(s, _on_signal)
    bench = None
    try:
        bench = make()
        return body(bench)
    except BenchError as exc:
        print(f"{prog}: FAILED: {exc}", file=sys.stderr)
        return 1
    except harness.HarnessError as exc:
        print(f"{prog}: FAILED (setup): {exc}", file=sys.stderr)
        return 1
    except Interrupted as exc:
        print(f"{prog}: interrupted ({exc}), cleaning up", file=sys.stderr)
        return 128 + exc.signum
    finally:
        for s in SIGNALS:
            signal.signal(s, signal.SIG_IGN)
        if bench is not None:
            bench.teardown()
