#!/usr/bin/env bash
# Builds the paas-milter container images with podman, from Debian packages only (no
# container registry needed):
#
#   localhost/debian:bookworm-slim   the base, made with mmdebstrap + podman import, only
#                                    when absent (--rebuild-base forces it)
#   localhost/paas-milter:VERSION    the milter alone (contrib/docker/Dockerfile, target
#   localhost/paas-milter:latest     "runtime"); VERSION from meson.build
#   localhost/paas-milter:all-in-one the milter plus Debian's Postfix (target "all-in-one")
#
# Idempotent: a second run reuses the base image and podman's layer cache. Run as root on
# Debian 12 (apt-get install podman runc buildah catatonit mmdebstrap; see install-deps.sh).
#
#   contrib/scripts/container-image.sh [--base-only] [--rebuild-base] [--no-all-in-one]
#
# Environment:
#   CONTAINERS_CONF    containers.conf to use (default: contrib/docker/containers.conf,
#                      written when missing: runc, cgroupfs, file events logger, ulimits;
#                      nothing in /etc/containers is changed)
#   PAAS_MILTER_IMAGE  image name (default localhost/paas-milter)
#   BASE_IMAGE         base image (default localhost/debian:bookworm-slim)
#   DEBIAN_SOURCES     apt sources for mmdebstrap (default: this machine's
#                      /etc/apt/sources.list.d/debian.sources, else bookworm from deb.debian.org)
#
# Everything runs with --network=host: podman's default bridge network would create a
# bridge, iptables chains and turn on ip_forward on the machine.
set -euo pipefail

cd "$(dirname "$0")/../.."
repo=$(pwd)

base_only=0
rebuild_base=0
all_in_one=1
for arg in "$@"; do
    case "$arg" in
        --base-only) base_only=1 ;;
        --rebuild-base) rebuild_base=1 ;;
        --no-all-in-one) all_in_one=0 ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "container-image.sh: unknown argument '$arg' (try --help)" >&2
            exit 2
            ;;
    esac
done

say() { printf 'container-image.sh: %s\n' "$*"; }
die() {
    printf 'container-image.sh: error: %s\n' "$*" >&2
    exit 1
}
now() { printf '%s' "${EPOCHREALTIME/,/.}"; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f s", b - a }'; }

image=${PAAS_MILTER_IMAGE:-localhost/paas-milter}
base=${BASE_IMAGE:-localhost/debian:bookworm-slim}

command -v podman >/dev/null || die "podman not found (apt-get install podman runc buildah catatonit mmdebstrap)"

if [ -z "${CONTAINERS_CONF:-}" ]; then
    CONTAINERS_CONF=$repo/contrib/docker/containers.conf
    if [ ! -f "$CONTAINERS_CONF" ]; then
        say "writing $CONTAINERS_CONF"
        cat >"$CONTAINERS_CONF" <<'EOF'
# containers.conf(5) for podman on the build machines (see contrib/scripts/container-image.sh)
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
    fi
fi
export CONTAINERS_CONF
say "CONTAINERS_CONF=$CONTAINERS_CONF"

version=$(sed -n "s/^[[:space:]]*version[[:space:]]*:[[:space:]]*'\([^']*\)'.*/\1/p" meson.build | head -n 1)
[ -n "$version" ] || die "cannot read the project version from meson.build"

total_start=$(now)

# ---- base image ----------------------------------------------------------------------------
if [ "$rebuild_base" = 1 ] && podman image exists "$base"; then
    say "removing $base (--rebuild-base)"
    podman rmi "$base" >/dev/null
fi
if podman image exists "$base"; then
    say "base image $base exists; not rebuilt (--rebuild-base forces it)"
else
    command -v mmdebstrap >/dev/null || die "mmdebstrap not found (apt-get install mmdebstrap)"
    t=$(now)
    work=$(mktemp -d /var/tmp/paas-milter-base.XXXXXX)
    trap 'rm -rf "$work"' EXIT
    sources=${DEBIAN_SOURCES:-/etc/apt/sources.list.d/debian.sources}
    if [ ! -f "$sources" ]; then
        sources=$work/debian.sources
        printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm bookworm-updates\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\nTypes: deb\nURIs: http://deb.debian.org/debian-security\nSuites: bookworm-security\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' >"$sources"
    fi
    say "creating $base with mmdebstrap from $sources (about a minute)"
    # "slim" as Debian's own image: no manuals, documentation (but the copyright files),
    # translations; the dpkg excludes stay in the image for what is installed later.
    mmdebstrap --variant=apt --quiet \
        --aptopt='Acquire::Check-Valid-Until "false"' \
        --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/info/*' \
        --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-include=/usr/share/doc/*/copyright' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        --dpkgopt='path-include=/usr/share/locale/locale.alias' \
        bookworm "$work/rootfs.tar" "$sources"
    podman import --change 'CMD ["/bin/bash"]' "$work/rootfs.tar" "$base" >/dev/null
    rm -rf "$work"
    trap - EXIT
    say "base image $base created in $(elapsed "$t")"
fi
[ "$base_only" = 1 ] && exit 0

# ---- paas-milter images --------------------------------------------------------------------
build() {
    local target=$1
    shift
    local t
    t=$(now)
    say "building target $target -> $*"
    local tags=()
    for tag in "$@"; do tags+=(--tag "$tag"); done
    # --format docker: the OCI image format has no HEALTHCHECK.
    podman build --network=host --pull=never --format docker \
        --file contrib/docker/Dockerfile --ignorefile contrib/docker/Dockerfile.dockerignore \
        --build-arg "BASE_IMAGE=$base" --build-arg "VERSION=$version" \
        --target "$target" "${tags[@]}" .
    say "target $target built in $(elapsed "$t")"
}

builds_started=$(date +%s)
build runtime "$image:$version" "$image:latest"
if [ "$all_in_one" = 1 ]; then
    build all-in-one "$image:all-in-one"
fi

# Each changed source leaves the previous build's images behind, untagged (the build
# stage's alone is some 650 MB): remove those of earlier runs, never this run's (they are
# the layer cache of the next build) and nobody else's (only images with our labels).
for title in paas-milter paas-milter-build; do
    podman image prune --force --filter "label=org.opencontainers.image.title=$title" \
        --filter "until=$builds_started" >/dev/null ||
        say "warning: could not remove the untagged images of earlier builds"
done

podman images --filter "reference=$image" --filter "reference=$base" \
    --format '{{.Repository}}:{{.Tag}}  {{.Size}}'
say "done in $(elapsed "$total_start")"
