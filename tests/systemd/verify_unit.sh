#!/bin/bash
# The shipped unit and sysusers entry as systemd reads them: `systemd-analyze verify` accepts
# the unit (with ExecStart pointing at the built binary), its hardening keeps
# `systemd-analyze security` at "OK" or better, and systemd-sysusers accepts the user entry.
# Usage: verify_unit.sh SOURCE_DIR BINARY
set -euo pipefail
source_dir=$1
binary=$2
if ! command -v systemd-analyze >/dev/null; then
    echo "SKIP: systemd-analyze is not installed"
    exit 77
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
sed "s|/usr/local/sbin/paas-milter|$binary|g" "$source_dir/systemd/paas-milter.service" \
    >"$work/paas-milter.service"
systemd-analyze verify "$work/paas-milter.service"
exposure=$(systemd-analyze security --offline=true "$work/paas-milter.service" | tail -1)
echo "$exposure"
# "→ Overall exposure level for paas-milter.service: 1.3 OK 🙂"
score=$(sed -E 's/.*: ([0-9.]+) .*/\1/' <<<"$exposure")
awk -v s="$score" 'BEGIN { exit !(s <= 2.0) }' || {
    echo "FAIL: exposure $score is above 2.0"
    exit 1
}
systemd-sysusers --dry-run "$source_dir/systemd/paas-milter.sysusers" >/dev/null 2>&1
echo "OK"
