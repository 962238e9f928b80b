#!/usr/bin/env python3
"""Turns the RESULT lines the benchmarks print into one table (tests/bench/run.sh).

Each benchmark prints, for every figure, one tab-separated line
    RESULT  name  value  unit  baseline  ratio  target  met
(baseline, ratio, target and met may be "-"). This reads a log of every benchmark's output
on stdin, keeps those lines in order, and prints a Markdown table, then how many targets
were met. A benchmark that failed or printed nothing shows as missing: the exit status is 1
when a figure the caller expected (--expect NAME-PREFIX, repeatable) is absent.
"""

from __future__ import annotations

import argparse
import sys


def parse(lines: list[str]) -> list[list[str]]:
    rows = []
    for line in lines:
        if not line.startswith("RESULT\t"):
            continue
        fields = line.rstrip("\n").split("\t")[1:]
        if len(fields) != 7:
            print(f"report: malformed RESULT line: {line.rstrip()}", file=sys.stderr)
            continue
        rows.append(fields)
    return rows


def table(rows: list[list[str]]) -> str:
    head = ["figure", "value", "baseline", "ratio", "target", "met"]
    body = [[name, f"{value} {unit}", baseline, ratio, target, met]
            for name, value, unit, baseline, ratio, target, met in rows]
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(out)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--expect", action="append", default=[],
                        help="a figure name prefix that must be present")
    args = parser.parse_args(argv)
    rows = parse(sys.stdin.readlines())
    print(table(rows))
    judged = [r for r in rows if r[6] in ("yes", "no")]
    met = sum(r[6] == "yes" for r in judged)
    print(f"\n{met} of {len(judged)} targets met")
    missing = [p for p in args.expect if not any(r[0].startswith(p) for r in rows)]
    for prefix in missing:
        print(f"missing: no figure named {prefix}...", file=sys.stderr)
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
