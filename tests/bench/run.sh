#!/bin/sh
# Builds and runs the classification micro-benchmark (tests/bench/bench_classify.cpp).
# BUILD_DIR selects the build directory (default: build, set up if missing); figures
# depend on its buildtype (the project default is debugoptimized).
set -eu
cd "$(dirname "$0")/../.."
build="${BUILD_DIR:-build}"
[ -f "$build/build.ninja" ] || meson setup "$build"
meson compile -C "$build" tests/bench/bench-classify
exec "$build/tests/bench/bench-classify" "$@"
