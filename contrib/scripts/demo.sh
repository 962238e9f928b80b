#!/usr/bin/env bash
# Quick start demo (Debian 12, as root): installs the dependencies, builds paas-milter, and
# runs it on the example configuration in front of a private Postfix on loopback, sending a
# sample message through every route and printing the decisions and where mail arrived.
set -euo pipefail
cd "$(dirname "$0")/../.."

bash contrib/scripts/install-deps.sh
if [ -f build/build.ninja ]; then
    meson setup --reconfigure build >/dev/null
else
    meson setup build >/dev/null
fi
meson compile -C build milter/paas-milter >/dev/null
exec python3 contrib/scripts/demo.py build/milter/paas-milter
