#!/bin/bash
# Entrypoint of the paas-milter container images (contrib/docker/Dockerfile).
#
#   (no arguments), run [OPTION...]
#             the milter: exec paas-milter run --foreground -c "$PAAS_MILTER_CONFIG" OPTION...
#             (logs to stderr: the container log). With PAAS_MILTER_WITH_POSTFIX=1 in the
#             all-in-one image: as "all-in-one".
#   all-in-one
#             the milter and Postfix in this container (image localhost/paas-milter:all-in-one):
#             the milter first (as paas-milter), Postfix once the milter answers, wired to
#             the milter's socket. SIGTERM/SIGINT stop Postfix, then the milter (which lets
#             the messages in flight finish); when either dies, the other is stopped and
#             the container exits.
#   postfix   Postfix alone, wired to a milter in another container over a unix socket in a
#             shared volume (compose.yaml).
#   check | query | header-checks | health | version | help [ARG...]
#             the paas-milter command line; -c "$PAAS_MILTER_CONFIG" is added unless given.
#   healthcheck
#             the image's HEALTHCHECK: `paas-milter health` when the milter runs in this
#             container, and whether Postfix's master runs when Postfix does.
#   anything else is executed as is (e.g. bash).
#
# Environment:
#   PAAS_MILTER_CONFIG         the configuration (default /etc/paas-milter/paas-milter.toml)
#   PAAS_MILTER_WITH_POSTFIX   1: the default command runs "all-in-one"
#   POSTFIX_SMTPD_LISTEN       Postfix's SMTP listener, as master.cf writes it: "25" (the
#                              default, every address), "127.0.0.1:2525", "[::1]:25", ...
#   POSTFIX_<parameter>        any main.cf parameter in lower case, set with postconf -e at
#                              start: POSTFIX_myhostname=mail.example.com,
#                              POSTFIX_relayhost=[smtp.example.com]:587, POSTFIX_mynetworks=...
#   Without POSTFIX_smtpd_milters, Postfix's smtpd_milters is, all-in-one, the milter.socket
#   of the configuration (in Postfix's syntax); Postfix alone: unix:/run/paas-milter/milter.sock
#   (the shared volume).
#   Postfix's milter_header_checks (pcre:/etc/postfix/milter_header_checks): all-in-one, it is
#   written at start from `paas-milter header-checks`, unless the file there is the
#   operator's (anything header-checks did not write); Postfix alone, mount it (the output
#   of `paas-milter header-checks` in the milter container, which has the secrets it reads).
#
# Secrets: with compose (or `podman secret`), a secret NAME appears as /run/secrets/NAME;
# the configuration names it there, e.g.
#   connection_string_file = "/run/secrets/acs-connection-string"
# (compose.yaml). Mode and owner come from the secret's definition: readable by uid 990.
#
# PID 1: the milter handles SIGTERM itself and starts no processes, so it may be PID 1;
# still prefer `--init` (podman: catatonit; compose: `init: true`), which also reaps what a
# `podman exec` leaves behind. In "all-in-one" and "postfix" modes this script stays in
# the foreground as the supervisor.
set -euo pipefail

PAAS_MILTER_CONFIG=${PAAS_MILTER_CONFIG:-/etc/paas-milter/paas-milter.toml}
MILTER_USER=paas-milter
MILTER_GROUP=postfix
ROLE_FILE=/run/paas-milter-entrypoint/role
DEFAULT_MILTER_SOCKET=unix:/run/paas-milter/milter.sock

log() { printf 'paas-milter-entrypoint: %s\n' "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

write_role() {
    mkdir -p "${ROLE_FILE%/*}" 2>/dev/null || true
    printf '%s\n' "$1" >"$ROLE_FILE" 2>/dev/null || true
}

has_config_option() {
    local arg
    for arg in "$@"; do
        case "$arg" in -c | --config) return 0 ;; esac
    done
    return 1
}

# As root (all-in-one image), the milter drops to its own user, in Postfix's group so that
# Postfix can connect to its unix socket; as anyone else it runs as is.
as_milter_user() {
    if [ "$(id -u)" = 0 ]; then
        exec setpriv --reuid="$MILTER_USER" --regid="$MILTER_GROUP" --init-groups -- "$@"
    fi
    exec "$@"
}

prepare_milter_dirs() {
    [ "$(id -u)" = 0 ] || return 0
    install -d -o "$MILTER_USER" -g "$MILTER_GROUP" -m 0750 /run/paas-milter
    install -d -o "$MILTER_USER" -g "$MILTER_GROUP" -m 0700 /var/lib/paas-milter
}

config_hint() {
    log "the configuration $PAAS_MILTER_CONFIG is not usable; mount yours (and its tables) at"
    log "/etc/paas-milter, secrets under /run/secrets (see contrib/docker/compose.yaml)"
}

run_milter() {
    if [ ! -r "$PAAS_MILTER_CONFIG" ]; then
        config_hint
        die "cannot read $PAAS_MILTER_CONFIG"
    fi
    if cmp -s "$PAAS_MILTER_CONFIG" /usr/share/paas-milter/default/paas-milter.toml; then
        log "$PAAS_MILTER_CONFIG is the image's example, whose secrets are not in the image"
        config_hint
    fi
    prepare_milter_dirs
    write_role milter
    as_milter_user paas-milter run --foreground -c "$PAAS_MILTER_CONFIG" "$@"
}

# milter.socket of the configuration, in libmilter's syntax ("" when unknown).
milter_socket() {
    [ -r "$PAAS_MILTER_CONFIG" ] || return 0
    awk '
        /^[[:space:]]*\[/ { in_milter = ($0 ~ /^[[:space:]]*\[milter\][[:space:]]*(#.*)?$/) }
        in_milter && /^[[:space:]]*socket[[:space:]]*=/ {
            if (match($0, /"[^"]*"/)) { print substr($0, RSTART + 1, RLENGTH - 2); exit }
        }' "$PAAS_MILTER_CONFIG"
}

# libmilter's "inet:PORT@HOST" / "inet6:PORT@HOST" / "unix:/path" in Postfix's syntax.
postfix_milter_address() {
    local spec=$1 rest port host
    case "$spec" in
        unix:* | local:*) printf 'unix:%s\n' "${spec#*:}" ;;
        inet:* | inet6:*)
            rest=${spec#*:}
            port=${rest%%@*}
            host=${rest#*@}
            [ "$host" != "$rest" ] || host=""
            case "$spec" in
                inet6:*) printf 'inet:[%s]:%s\n' "${host:-::1}" "$port" ;;
                *) printf 'inet:%s:%s\n' "${host:-127.0.0.1}" "$port" ;;
            esac
            ;;
        *) printf 'unix:%s\n' "$spec" ;;
    esac
}

# configure_postfix all-in-one|postfix
configure_postfix() {
    local mode=$1
    [ "$(id -u)" = 0 ] || die "Postfix needs root: use the all-in-one image (USER root)"
    command -v postfix >/dev/null || die "Postfix is not installed: use localhost/paas-milter:all-in-one"

    # POSTFIX_<parameter>=value (lower case) -> main.cf
    local name settings=()
    for name in $(compgen -e); do
        case "$name" in
            POSTFIX_[a-z]*) settings+=("${name#POSTFIX_}=${!name}") ;;
        esac
    done
    if [ -z "${POSTFIX_smtpd_milters:-}" ]; then
        local socket=""
        [ "$mode" != all-in-one ] || socket=$(milter_socket)
        settings+=("smtpd_milters=$(postfix_milter_address "${socket:-$DEFAULT_MILTER_SOCKET}")")
    fi
    if [ "${#settings[@]}" -gt 0 ]; then
        postconf -e "${settings[@]}"
    fi

    if [ -n "${POSTFIX_SMTPD_LISTEN:-}" ]; then
        # Replace the stock "smtp inet" listener (every address, port 25) by this one.
        postconf -M# smtp/inet 2>/dev/null || true
        postconf -Me "$POSTFIX_SMTPD_LISTEN/inet=$POSTFIX_SMTPD_LISTEN inet n - n - - smtpd"
    fi

    # All-in-one: milter_header_checks from the milter's relay routes, unless the operator's
    # own file (anything but an empty file or one header-checks wrote) or one we cannot
    # write. Postfix alone: the operator's (compose.yaml mounts it).
    local checks file generated errors
    checks=$(postconf -h milter_header_checks)
    case "$checks" in
        pcre:/* | regexp:/*)
            file=${checks#*:}
            if [ ! -s "$file" ] && [ "$mode" != all-in-one ]; then
                log "warning: $file is empty: Postfix ignores the milter's routing header;" \
                    "mount the output of \`paas-milter header-checks\` there"
            fi
            if [ "$mode" = all-in-one ] && [ -r "$PAAS_MILTER_CONFIG" ] && [ -w "$file" ] &&
                { [ ! -s "$file" ] || head -n 1 "$file" | grep -q '^# milter_header_checks for .*generated by paas-milter header-checks'; }; then
                # `header-checks` reads the whole configuration, secret files included
                if generated=$(paas-milter header-checks -c "$PAAS_MILTER_CONFIG" 2>/tmp/header-checks.err) &&
                    printf '%s\n' "$generated" >"$file"; then
                    log "wrote $file from $PAAS_MILTER_CONFIG (paas-milter header-checks)"
                else
                    errors=$(cat /tmp/header-checks.err)
                    log "warning: $file not written: paas-milter header-checks failed: $errors"
                fi
                rm -f /tmp/header-checks.err
            fi
            ;;
    esac

    log "Postfix: smtpd_milters = $(postconf -h smtpd_milters)"
    postfix check || die "postfix check failed"
}

stopping=0
milter_pid=""
postfix_pid=""
postfix_started=0

# `postfix stop` waits up to 5 s for the master to finish, then kills it.
stop_postfix() {
    [ "$postfix_started" = 1 ] || return 0
    postfix_started=0
    postfix stop >/dev/null 2>&1 || true
}

stop_milter() {
    [ -n "$milter_pid" ] || return 0
    kill -TERM "$milter_pid" 2>/dev/null || true
}

on_signal() {
    log "$1: stopping"
    stopping=1
}

# Runs the children started by the caller until a signal comes or one of them exits; then
# stops Postfix first (no new mail), the milter second, and exits.
supervise() {
    local pids=() exited="" status=0 rc
    [ -z "$milter_pid" ] || pids+=("$milter_pid")
    [ -z "$postfix_pid" ] || pids+=("$postfix_pid")
    while [ "$stopping" = 0 ]; do
        rc=0
        exited=""
        wait -n -p exited "${pids[@]}" || rc=$?
        if [ -n "${exited:-}" ]; then
            status=$rc
            if [ "$exited" = "$milter_pid" ]; then
                log "paas-milter exited with status $rc; stopping"
                milter_pid=""
            else
                log "Postfix exited with status $rc; stopping"
                postfix_pid=""
            fi
            [ "$status" != 0 ] || status=1
            break
        fi
    done
    stop_postfix
    if [ -n "$postfix_pid" ]; then
        # (postfix-script's shell says "Terminated": the master ends by its SIGTERM)
        wait "$postfix_pid" || true
    fi
    stop_milter
    if [ -n "$milter_pid" ]; then
        rc=0
        wait "$milter_pid" || rc=$?
        # interrupted by a second signal: wait again for the milter to drain
        while kill -0 "$milter_pid" 2>/dev/null; do
            wait "$milter_pid" || rc=$?
        done
        [ "$status" != 0 ] || status=$rc
    fi
    exit "$status"
}

# The children run in sessions of their own: a signal for the container's process group
# (catatonit's forwarding, a ^C) reaches only this script, which stops them in order.
start_postfix() {
    configure_postfix "$1"
    setsid postfix start-fg &
    postfix_pid=$!
    postfix_started=1
}

run_all_in_one() {
    trap 'on_signal SIGTERM' TERM
    trap 'on_signal SIGINT' INT
    [ -r "$PAAS_MILTER_CONFIG" ] || {
        config_hint
        die "cannot read $PAAS_MILTER_CONFIG"
    }
    prepare_milter_dirs
    write_role all-in-one
    (as_milter_user setsid paas-milter run --foreground -c "$PAAS_MILTER_CONFIG" "$@") &
    milter_pid=$!
    # Postfix only once the milter answers, so that no first message meets a tempfail.
    local tries=0
    until paas-milter health -c "$PAAS_MILTER_CONFIG" --timeout 2 >/dev/null 2>&1; do
        if ! kill -0 "$milter_pid" 2>/dev/null || [ "$stopping" = 1 ]; then
            supervise
        fi
        tries=$((tries + 1))
        if [ "$tries" -ge 300 ]; then
            log "the milter does not answer after 30 s; stopping"
            stopping=1
            supervise
        fi
        sleep 0.1
    done
    log "paas-milter answers; starting Postfix"
    start_postfix all-in-one
    supervise
}

run_postfix() {
    trap 'on_signal SIGTERM' TERM
    trap 'on_signal SIGINT' INT
    write_role postfix
    start_postfix postfix
    supervise
}

healthcheck() {
    local role
    role=$(cat "$ROLE_FILE" 2>/dev/null || echo milter)
    case "$role" in
        milter | all-in-one)
            paas-milter health -c "$PAAS_MILTER_CONFIG" --timeout 5 || exit 1
            ;;
    esac
    case "$role" in
        postfix | all-in-one)
            # `master -t` fails when the master runs (quieter than `postfix status`, which
            # logs a line each time)
            if "$(postconf -h daemon_directory)/master" -t 2>/dev/null; then
                echo "paas-milter-entrypoint: Postfix is not running" >&2
                exit 1
            fi
            echo "paas-milter-entrypoint: Postfix is running"
            ;;
    esac
    exit 0
}

command=${1:-run}
case "$command" in
    -*) command=run ;;
    *) [ "$#" -eq 0 ] || shift ;;
esac

case "$command" in
    run)
        if [ "${PAAS_MILTER_WITH_POSTFIX:-0}" = 1 ]; then
            run_all_in_one "$@"
        fi
        run_milter "$@"
        ;;
    all-in-one) run_all_in_one "$@" ;;
    postfix) run_postfix ;;
    healthcheck) healthcheck ;;
    check | query | header-checks | health)
        if has_config_option "$@"; then
            as_milter_user paas-milter "$command" "$@"
        fi
        as_milter_user paas-milter "$command" -c "$PAAS_MILTER_CONFIG" "$@"
        ;;
    version | --version | -V | help | --help | -h) exec paas-milter "$command" "$@" ;;
    *) exec "$command" "$@" ;;
esac
