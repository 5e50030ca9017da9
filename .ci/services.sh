#!/usr/bin/env bash
# The services the tests need, set up one way for `make test`, `make services` and `.ci/run`.
#
#   .ci/services.sh install            install Mosquitto and PostgreSQL (Debian packages) if
#                                      missing; fails when it cannot (not root, no apt-get)
#   .ci/services.sh install-if-possible  the same where it can (root and apt-get), otherwise
#                                      nothing: the tests that need a missing service skip with
#                                      one line saying how to enable them (fail under CI=true)
#   . .ci/services.sh; start_test_pg   (sourced) start a throwaway PostgreSQL cluster on a free
#                                      loopback port and export FOGPAY_TEST_PG_DSN
#
# Without FOGPAY_TEST_PG_DSN the test session starts its own throwaway cluster when initdb is
# there (cloud/pgcluster.py), so `make test` needs only the packages.

APT_TIMEOUT_S=${APT_TIMEOUT_S:-600}

# shellcheck disable=SC2012  # Debian's directory names: /usr/lib/postgresql/<major>/bin
pg_bin() {  # Debian puts PostgreSQL's server binaries under /usr/lib/postgresql/<major>/bin
    command -v "$1" 2>/dev/null || ls -d /usr/lib/postgresql/*/bin/"$1" 2>/dev/null | sort -V | tail -n 1
}

have_mosquitto() {
    { command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || [ -x /usr/local/sbin/mosquitto ]; } \
        && command -v mosquitto_passwd >/dev/null 2>&1
}

missing_packages() {
    local need=()
    have_mosquitto || need+=(mosquitto)
    [ -n "$(pg_bin initdb)" ] || need+=(postgresql)
    echo "${need[@]}"
}

install_services() {  # $1: "required" or "if-possible"
    local mode=$1 need
    need=$(missing_packages)
    [ -z "$need" ] && return 0
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        if [ "$mode" = required ]; then
            echo "services.sh: $need missing; installing needs root and apt-get" >&2
            return 1
        fi
        return 0  # the tests skip, one line each, saying how to enable them
    fi
    echo "services.sh: installing $need (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    # shellcheck disable=SC2086  # $need is a list of package names
    if timeout "$APT_TIMEOUT_S" apt-get update -qq \
        && timeout "$APT_TIMEOUT_S" apt-get install -y -qq --no-install-recommends $need; then
        return 0
    fi
    echo "services.sh: apt-get could not install $need" >&2
    [ "$mode" = required ] && return 1
    return 0
}
# The Debian package may start a system-wide mosquitto on :1883; the tests start their own
# brokers on free loopback ports and need nothing listening there.

start_test_pg() {
    # A throwaway PostgreSQL cluster: as the postgres user (the server refuses root), in a
    # temp dir, on a free loopback port, trust auth on loopback only. Stopped at exit.
    [ -n "${FOGPAY_TEST_PG_DSN:-}" ] && return 0
    local initdb pg_ctl pg_port
    initdb="$(pg_bin initdb)"
    pg_ctl="$(pg_bin pg_ctl)"
    FOGPAY_CI_PG_DIR="$(mktemp -d /tmp/fogpay-ci-pg.XXXXXX)"
    FOGPAY_CI_AS_PG=()
    if [ "$(id -u)" -eq 0 ]; then
        chown postgres "$FOGPAY_CI_PG_DIR"
        FOGPAY_CI_AS_PG=(runuser -u postgres --)
    fi
    FOGPAY_CI_PG_CTL=$pg_ctl
    pg_port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    trap stop_test_pg EXIT
    "${FOGPAY_CI_AS_PG[@]}" "$initdb" -D "$FOGPAY_CI_PG_DIR/data" -U postgres --auth=trust -E UTF8 --no-sync >/dev/null
    "${FOGPAY_CI_AS_PG[@]}" "$pg_ctl" -D "$FOGPAY_CI_PG_DIR/data" -l "$FOGPAY_CI_PG_DIR/log" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -p $pg_port -k $FOGPAY_CI_PG_DIR/data" start >/dev/null
    export FOGPAY_TEST_PG_DSN="postgresql://postgres@127.0.0.1:$pg_port/postgres"
    echo "PostgreSQL for the tests: $FOGPAY_TEST_PG_DSN"
}

stop_test_pg() {
    "${FOGPAY_CI_AS_PG[@]}" "$FOGPAY_CI_PG_CTL" -D "$FOGPAY_CI_PG_DIR/data" -m immediate -w stop >/dev/null 2>&1 || true
    rm -rf "$FOGPAY_CI_PG_DIR"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then  # run, not sourced
    set -euo pipefail
    case "${1:-}" in
        install) install_services required ;;
        install-if-possible) install_services if-possible ;;
        *) echo "usage: $0 install|install-if-possible" >&2; exit 2 ;;
    esac
fi
