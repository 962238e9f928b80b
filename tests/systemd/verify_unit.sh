#!/bin/bash
# The unit meson generates from systemd/paas-milter.service.in and the sysusers entry, as
# systemd reads them: `systemd-analyze verify` accepts the unit (with its installed binary
# path pointing at the built binary), its hardening keeps `systemd-analyze security` at "OK"
# or better, and systemd-sysusers accepts the user entry. The man pages its Documentation=
# names are looked up among the built MAN_PAGEs (none given: not checked).
# Usage: verify_unit.sh UNIT SYSUSERS BINARY INSTALLED_BINARY [MAN_PAGE]...
set -euo pipefail
unit=$1
sysusers=$2
binary=$3
installed_binary=$4
shift 4
if ! command -v systemd-analyze >/dev/null; then
    echo "SKIP: systemd-analyze is not installed"
    exit 77
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if grep -n '@[a-z]*@' "$unit"; then
    echo "FAIL: $unit still has a placeholder"
    exit 1
fi
grep -q "^ExecStart=$installed_binary run " "$unit" || {
    echo "FAIL: $unit does not start $installed_binary"
    exit 1
}
sed "s|$installed_binary|$binary|g" "$unit" >"$work/paas-milter.service"
man_check=--man=no
if [ $# -gt 0 ]; then
    man_check=--man=yes
    for page in "$@"; do
        mkdir -p "$work/man/man${page##*.}"
        cp "$page" "$work/man/man${page##*.}/"
    done
fi
MANPATH=$work/man systemd-analyze verify "$man_check" "$work/paas-milter.service"
exposure=$(systemd-analyze security --offline=true "$work/paas-milter.service" | tail -1)
echo "$exposure"
# "→ Overall exposure level for paas-milter.service: 1.3 OK 🙂"
score=$(sed -E 's/.*: ([0-9.]+) .*/\1/' <<<"$exposure")
awk -v s="$score" 'BEGIN { exit !(s <= 2.0) }' || {
    echo "FAIL: exposure $score is above 2.0"
    exit 1
}
systemd-sysusers --dry-run "$sysusers" >/dev/null 2>&1
echo "OK"
