#!/usr/bin/env bash
# Installs what the project needs (Debian 12, as root), builds, and runs every test:
# unit tests and the integration tests against a private Postfix on loopback.
set -euo pipefail
cd "$(dirname "$0")/../.."

bash contrib/scripts/build.sh
status=0
meson test -C build --print-errorlogs "$@" || status=$?

# One closing line for humans and CI, counted from meson's own test log.
python3 - build/meson-logs/testlog.json <<'PY'
import json, sys
results = [json.loads(line)["result"] for line in open(sys.argv[1]) if line.strip()]
passed = sum(r in ("OK", "EXPECTEDFAIL") for r in results)
skipped = sum(r == "SKIP" for r in results)
print(f"meson: {passed} passed, {len(results) - passed - skipped} failed, {skipped} skipped")
PY
exit $status
