#!/bin/sh
# Runs the benchmarks, each printing its figures as ratios against a baseline measured in
# the same run:
#   bench-classify   classification vs. a naive linear scan of the same 5,000 CIDR entries
#   throughput.py    Postfix alone vs. Postfix + paas-milter (smtp-source -> smtp-sink)
# BUILD_DIR selects the build directory (default: build, set up if missing). Extra
# arguments go to throughput.py (e.g. --rounds 3, --socket unix). Needs root.
set -eu
cd "$(dirname "$0")/../.."
build="${BUILD_DIR:-build}"
[ -f "$build/build.ninja" ] || meson setup "$build"
meson compile -C "$build" tests/bench/bench-classify milter/paas-milter
echo "== classification micro-benchmark"
"$build/tests/bench/bench-classify"
echo
echo "== end-to-end throughput"
exec python3 tests/bench/throughput.py --binary "$build/milter/paas-milter" "$@"
