#!/usr/bin/env bash
# Installs the dependencies (Debian 12, as root) and builds paas-milter in build/.
# Arguments name the targets to build (default: everything).
set -euo pipefail
cd "$(dirname "$0")/../.."

bash contrib/scripts/install-deps.sh
if [ -f build/build.ninja ]; then
    meson setup --reconfigure build >/dev/null
else
    meson setup build >/dev/null
fi
meson compile -C build "$@"
