#!/usr/bin/env bash
# Installs what the project needs (Debian 12, as root), builds, and runs every test:
# unit tests and the integration tests against a private Postfix on loopback.
set -euo pipefail
cd "$(dirname "$0")/../.."

bash contrib/scripts/install-deps.sh

if [ -f build/build.ninja ]; then
    meson setup --reconfigure build >/dev/null
else
    meson setup build
fi
meson compile -C build
meson test -C build --print-errorlogs "$@"
