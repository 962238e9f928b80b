#!/bin/sh
# Install everything needed to build paas-milter and run its unit and integration tests
# on Debian 12 (bookworm). Run as root. Idempotent and non-interactive (works with no stdin):
# when every package is already installed it does nothing and does not even run
# `apt-get update`.
#
# Postfix is installed only for its binaries: the integration tests run a private instance
# (`postfix -c DIR start`) and never use /etc/postfix, so debconf is preseeded with
# "No configuration" and the system Postfix is NOT started (a temporary policy-rc.d forbids
# service starts while packages are installed).
#
# Besides the build dependencies:
#   swaks + libnet-ssleay-perl      swaks only Recommends Net::SSLeay, without which
#                                   --tls/--tls-cert do not work ("TLS not available")
#   libio-socket-inet6-perl         swaks' IPv6 support (tests against [::1])
#   postfix-pcre                    pcre: tables (milter_header_checks)
#   redis-server                    the quota tests' shared store: each test starts its own on
#                                   a free loopback port, never the system's (not started here)
#   libsasl2-modules                PLAIN/LOGIN for the Postfix SMTP client (SASL to relays)
#   groff-base + man-db             the man page test renders paas-milter(8) with `man -l`
#   podman runc buildah catatonit   the container images and their test suite
#   mmdebstrap podman-compose       (contrib/scripts/container-image.sh, tests/container/);
#                                   also the Sendmail suite (tests/sendmail/): Sendmail
#                                   (sendmail-bin conflicts with postfix) runs only in its
#                                   container image, built from Debian's packages by the
#                                   tests, so nothing Sendmail is installed on the host
set -eu

PACKAGES="
build-essential g++ meson ninja-build pkg-config scdoc
libmilter-dev libsystemd-dev libcurl4-openssl-dev libssl-dev libtomlplusplus-dev libfmt-dev doctest-dev
libgmime-3.0-dev nlohmann-json3-dev libpcre2-dev prometheus-cpp-dev libhiredis-dev
postfix postfix-pcre libsasl2-modules redis-server
swaks libnet-ssleay-perl libio-socket-inet6-perl
openssl python3 procps ca-certificates clang-format groff-base man-db
podman runc buildah catatonit mmdebstrap podman-compose
"

if [ "$(id -u)" -ne 0 ]; then
    echo "install-deps.sh: must run as root" >&2
    exit 1
fi

missing=""
for p in $PACKAGES; do
    status=$(dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null || true)
    case "$status" in
        ii*) ;;
        *) missing="$missing $p" ;;
    esac
done

if [ -z "$missing" ]; then
    echo "install-deps.sh: all packages already installed"
    exit 0
fi
echo "install-deps.sh: installing:$missing"

export DEBIAN_FRONTEND=noninteractive
export DEBCONF_NONINTERACTIVE_SEEN=true

# Never prompt for Postfix's configuration, never write /etc/postfix/main.cf for us.
debconf-set-selections <<'SEL'
postfix postfix/main_mailer_type select No configuration
postfix postfix/mailname string paas-test.localdomain
SEL

# Forbid starting services (Postfix) while installing; restore whatever was there before.
POLICY=/usr/sbin/policy-rc.d
BACKUP=""
if [ -e "$POLICY" ]; then
    BACKUP=$(mktemp /usr/sbin/policy-rc.d.paas-milter.XXXXXX)
    cp -p "$POLICY" "$BACKUP"
fi
restore_policy() {
    if [ -n "$BACKUP" ]; then
        mv -f "$BACKUP" "$POLICY"
    else
        rm -f "$POLICY"
    fi
}
trap restore_policy EXIT
trap 'exit 130' INT TERM HUP
printf '#!/bin/sh\n# written by paas-milter install-deps.sh\nexit 101\n' > "$POLICY"
chmod 0755 "$POLICY"

apt-get update </dev/null
# shellcheck disable=SC2086
apt-get install -y --no-install-recommends \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
    $PACKAGES </dev/null

echo "install-deps.sh: done"
