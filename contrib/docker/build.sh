#!/bin/sh
# The build stage of contrib/docker/Dockerfile: configure a release build with Debian's
# layout, build only what `meson install` installs (not the unit tests, fuzzers and
# benchmarks), install it into DESTDIR, and write the Debian packages that hold the shared
# libraries of the binary to PACKAGE_LIST (one per line), for the runtime stage.
#
#   build.sh SOURCE_DIR BUILD_DIR DESTDIR PACKAGE_LIST
set -eu
src=$1
build=$2
destdir=$3
package_list=$4

# Not -Werror here (a packaging build, like Debian's): a newer compiler's new warnings must
# not break an operator's image build. The release build is warning-free with GCC 12 (its
# false -Wrestrict at -O3, GCC bug 105329, is avoided in the code); development builds and
# CI keep werror=true.
meson setup "$build" "$src" --prefix=/usr --sysconfdir=/etc --localstatedir=/var \
    --buildtype=release -Dwerror=false

# The outputs of the targets meson installs (the daemon, the man pages, ...).
targets=$(meson introspect "$build" --targets | python3 -c '
import json, os, sys
build = sys.argv[1]
outputs = []
for target in json.load(sys.stdin):
    if target.get("installed"):
        outputs += [os.path.relpath(f, build) for f in target["filename"]]
print(" ".join(outputs))
' "$build")
echo "build.sh: building $targets"
# shellcheck disable=SC2086
ninja -C "$build" $targets
meson install -C "$build" --no-rebuild --destdir "$destdir"

binary=$destdir/usr/sbin/paas-milter
if [ ! -x "$binary" ]; then
    echo "build.sh: meson install did not install /usr/sbin/paas-milter; copying it"
    install -D -m 755 "$build/milter/paas-milter" "$binary"
fi
"$binary" version

# ldd's libraries -> the packages that ship them. dpkg knows a library by the path in its
# package, which with the merged /usr may differ from the one ldd prints: try both.
libraries=$(ldd "$binary" | awk '$2 == "=>" && $3 ~ /^\// { print $3 }')
: >"$package_list.tmp"
for library in $libraries; do
    found=""
    for path in "$library" "$(readlink -f "$library")" "${library#/usr}" "/usr$library"; do
        found=$(dpkg-query -S "$path" 2>/dev/null | sed -n '1s/:.*//p') || true
        [ -z "$found" ] || break
    done
    if [ -z "$found" ]; then
        echo "build.sh: no Debian package ships $library" >&2
        exit 1
    fi
    echo "$found" >>"$package_list.tmp"
done
sort -u "$package_list.tmp" >"$package_list"
rm -f "$package_list.tmp"
echo "build.sh: runtime packages: $(tr "\n" " " <"$package_list")"
