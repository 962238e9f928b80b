#!/bin/sh
# `meson install` step (meson.add_install_script in meson.build): copies the example
# configuration into SYSCONFDIR/paas-milter, but only the files that do not exist there yet,
# so that installing a new version never overwrites the configuration and tables an operator
# edited (what dpkg does for a changed conffile). The shipped versions are always installed
# to DATADIR/doc/paas-milter/examples/ too, to compare with.
# Usage: install-config.sh SOURCE_DIR TARGET_DIR FILE...   (FILE relative to both)
# Honours DESTDIR, MESON_INSTALL_QUIET and MESON_INSTALL_DRY_RUN.
set -eu
source_dir=$1
target_dir=${DESTDIR:-}$2
shift 2
say() {
    [ -n "${MESON_INSTALL_QUIET:-}" ] || echo "$@"
}
for file in "$@"; do
    target=$target_dir/$file
    if [ -e "$target" ]; then
        say "Keeping $target (the shipped version is in the examples of the documentation)"
        continue
    fi
    say "Installing $source_dir/$file to $(dirname "$target")"
    [ -z "${MESON_INSTALL_DRY_RUN:-}" ] || continue
    install -D -m 644 "$source_dir/$file" "$target"
done
