#!/bin/bash
# The man pages build and render cleanly: scdoc accepts each source (exit 0, nothing on
# stderr), and each built page renders with man(1) and groff(1) without a warning, with the
# project's version in its footer.
# Usage: check_man_pages.sh SCDOC VERSION SOURCE PAGE [SOURCE PAGE]...
set -euo pipefail
scdoc=$1
version=$2
shift 2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
status=0
fail() {
    echo "FAIL: $*"
    status=1
}
while [ $# -ge 2 ]; do
    source=$1
    page=$2
    shift 2
    name=$(basename "$page")
    if ! "$scdoc" <"$source" >"$work/$name" 2>"$work/scdoc.err" || [ -s "$work/scdoc.err" ]; then
        fail "scdoc $source: $(cat "$work/scdoc.err")"
    fi
    if ! command -v groff >/dev/null; then
        echo "SKIP: groff (Debian's groff-base) is not installed: $page not rendered"
        [ $status -eq 0 ] && status=77
        continue
    fi
    groff -man -ww -z -Tutf8 "$page" 2>"$work/groff.err" || fail "groff $page exited $?"
    [ ! -s "$work/groff.err" ] || fail "groff warnings for $page: $(cat "$work/groff.err")"
    if command -v man >/dev/null; then
        MANWIDTH=80 man --warnings -l "$page" >"$work/rendered" 2>"$work/man.err" \
            || fail "man -l $page exited $?"
        [ ! -s "$work/man.err" ] || fail "man warnings for $page: $(cat "$work/man.err")"
    else
        echo "man(1) is not installed: groff only"
        groff -man -Tutf8 "$page" >"$work/rendered" 2>/dev/null
    fi
    grep -q "paas-milter $version" "$work/rendered" \
        || fail "$page: the footer does not name paas-milter $version"
    grep -q "@VERSION@" "$work/rendered" && fail "$page: @VERSION@ was not replaced"
    echo "$page: $(wc -l <"$work/rendered") lines at 80 columns"
done
[ $status -eq 0 ] && echo "OK"
exit $status
