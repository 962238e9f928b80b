#!/bin/sh
# Runs every benchmark of issue 10 and prints one table: each figure, its baseline measured
# in the same run, their ratio, and the target. Benchmarks, not tests: nothing here fails on
# a figure; a benchmark that cannot run (or whose own correctness checks fail) shows as a
# missing figure and makes the exit status 1.
#
#   bench-classify-scale  the classifier with 100k cidr entries, 10k certificate subjects and
#                         1k header regexes: latency percentiles, load/reload, reload under
#                         traffic (baseline: a naive scan of the same tables)
#   throughput.py         the relay route vs. Postfix alone (smtp-source -> private Postfix ->
#                         smtp-sink), unix and TCP socket, 20 sessions and 1; and vs. its
#                         floor, a libmilter filter that only adds the routing header
#                         (floor_milter.cpp): what paas-milter's own work costs
#   api_route.py          the API route against the ACS double with a fixed latency, at 1, 20
#                         and 100 SMTP sessions (baseline: a naive client, a fresh TLS
#                         connection per request)
#   memory.py             RSS with 1,000 idle milter connections; peak RSS during 20
#                         concurrent 25 MB messages on the API route
#
# BUILD_DIR selects the build directory (default: build-bench, a release build set up if
# missing). QUICK=1 runs smaller rounds. Needs root, loopback only, an otherwise idle machine
# (the figures are ratios measured side by side, but two cores are easily disturbed).
set -eu
cd "$(dirname "$0")/../.."
build="${BUILD_DIR:-build-bench}"
# A benchmark build: optimised; a newer compiler's false warnings at -O3 must not stop it.
[ -f "$build/build.ninja" ] || meson setup "$build" -Dbuildtype=release -Dwerror=false >/dev/null
meson compile -C "$build" tests/bench/bench-classify-scale tests/bench/bench-floor-milter \
    milter/paas-milter >/dev/null
binary="$build/milter/paas-milter"
log=$(mktemp /tmp/paas-bench.XXXXXX)
trap 'rm -f "$log"' EXIT

rounds=3
api_rounds=3
messages=2000
if [ "${QUICK:-0}" = 1 ]; then
    rounds=1
    api_rounds=1
    messages=1000
fi

run() {
    echo "== $*" >&2
    # A failing benchmark leaves its figures out of the table; the others still run.
    { "$@" 2>&1 || echo "== FAILED: $*"; } | tee -a "$log" >&2
}

run "$build/tests/bench/bench-classify-scale"
for socket in unix inet; do
    run python3 tests/bench/throughput.py --binary "$binary" --configs baseline,floor,relay \
        --socket "$socket" --sessions 20 --messages "$messages" --rounds "$rounds"
    run python3 tests/bench/throughput.py --binary "$binary" --configs baseline,floor,relay \
        --socket "$socket" --sessions 1 --messages $((messages / 4)) --rounds "$rounds"
done
run python3 tests/bench/api_route.py --binary "$binary" --rounds "$api_rounds"
run python3 tests/bench/memory.py --binary "$binary"

echo
echo "## paas-milter benchmarks, $(date -u +%Y-%m-%d), $(nproc) CPUs, $("$binary" --version)"
echo
python3 tests/bench/report.py \
    --expect "classify p50" --expect "relay, unix socket, 20" --expect "relay, unix socket, 1 " \
    --expect "relay, inet socket, 20" --expect "relay, inet socket, 1 " \
    --expect "api route, 20" --expect "RSS, 1000" --expect "peak RSS" <"$log"
