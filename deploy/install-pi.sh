#!/usr/bin/env bash
# Install a fogpay fog on a Raspberry Pi (Raspberry Pi OS / Debian 12, arm64; any Debian 12).
#
#   sudo bash deploy/install-pi.sh --issuer-key HEX [--fog-id fog-a] [--standalone]
#
# What it does (every step skips what is already there; it never overwrites a key, a config or
# a password):
#   1. apt-get install mosquitto mosquitto-clients python3-venv       (not with --no-apt/--prefix)
#   2. the system user "fogpay" (home /var/lib/fogpay, no login)      (not with --prefix: must exist)
#   3. /etc/fogpay root:fogpay 0750, /var/lib/fogpay fogpay:fogpay 0700, /opt/fogpay root 0755
#   4. the venv /opt/fogpay/.venv with fogpay from --source (checkout, sdist or wheel)
#   5. the fog key /etc/fogpay/fog.key (made by root with umask 077, then owned by fogpay, 0600:
#      the service reads it, nobody else does); its public key is printed
#   6. a random Mosquitto password for the fog's account (username = fog id) in
#      /etc/mosquitto/fogpay.passwd, /etc/mosquitto/fogpay.acl, and
#      /etc/mosquitto/conf.d/fogpay.conf (fogpay-pi.conf: adds to Debian's stock mosquitto.conf,
#      repeats none of its keys)
#   7. /etc/fogpay/fog.toml from fog.example.toml (fog id, broker URL with the password),
#      root:fogpay 0640, with verify_workers for this machine's cores; then --issuer-key,
#      --standalone ([uplink] enabled = false) and --verify-workers are set in it (also in an
#      existing one: run the script again to set them)
#   8. the systemd units in /etc/systemd/system, then `fogpay fog check-config` as the fogpay
#      user (it must be able to read its config and key), then restart mosquitto, enable and
#      (re)start fogpay-fog                                          (not with --no-systemctl/--prefix)
#
# Options:
#   --source PATH       fogpay to install: a checkout, an sdist (.tar.gz) or a wheel (.whl);
#                       default: the checkout this script is in
#   --fog-id ID         this fog's id (default fog-a)
#   --issuer-key HEX    the issuer's public key (64 hex): `fogpay issuer init` or `fogpay cloud
#                       init` printed it. Without it fog.toml keeps the example key: replace it.
#   --standalone        a fog without a cloud: [uplink] enabled = false
#   --verify-workers N  verify_workers in fog.toml (0..64: processes checking the intents'
#                       signatures on other cores, docs/fog.md); default when fog.toml is
#                       written: the cores less 2 on a machine with 4 or more (a Pi 4: 2),
#                       else 0. Given, it is also set in an existing fog.toml
#   --user NAME         the service user (default fogpay)
#   --prefix DIR        install under DIR instead of / (a scratch root: no apt-get, no useradd,
#                       no systemctl; the user must exist; paths in configs and units point
#                       into DIR, so the result is self-consistent)
#   --python PY         the Python 3.11+ that makes the venv (default /usr/bin/python3)
#   --pip-args "ARGS"   extra pip install arguments (an offline Pi: "--no-index --find-links DIR")
#   --no-apt            do not apt-get install
#   --no-systemctl      install everything, start nothing
#   --dry-run           print what would be done, change nothing
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SOURCE=""
FOG_ID="fog-a"
ISSUER_KEY=""
STANDALONE=0
VERIFY_WORKERS=""  # unset: from the cores, when fog.toml is written
SVC_USER="fogpay"
PREFIX=""
PY="/usr/bin/python3"  # Debian's: the service user can run it (not a pyenv under /root)
PIP_ARGS=""
APT=1
SYSTEMCTL=1
DRY=0

die() { echo "install-pi: $*" >&2; exit 1; }
usage() { echo "install-pi: $*" >&2; exit 2; }  # a bad option or value: nothing was done
say() { echo "install-pi: $*"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --source) SOURCE="${2:?--source needs a path}"; shift 2 ;;
        --fog-id) FOG_ID="${2:?--fog-id needs an id}"; shift 2 ;;
        --issuer-key) ISSUER_KEY="${2:?--issuer-key needs 64 hex}"; shift 2 ;;
        --standalone) STANDALONE=1; shift ;;
        --verify-workers) VERIFY_WORKERS="${2:?--verify-workers needs a number}"; shift 2 ;;
        --user) SVC_USER="${2:?--user needs a name}"; shift 2 ;;
        --prefix) PREFIX="${2:?--prefix needs a directory}"; shift 2 ;;
        --python) PY="${2:?--python needs an interpreter}"; shift 2 ;;
        --pip-args) PIP_ARGS="${2?--pip-args needs a string}"; shift 2 ;;
        --no-apt) APT=0; shift ;;
        --no-systemctl) SYSTEMCTL=0; shift ;;
        --dry-run) DRY=1; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) usage "unknown option $1 (--help lists them)" ;;
    esac
done

if ! [[ "$FOG_ID" =~ ^[a-z0-9][a-z0-9._-]{0,62}$ ]] || [[ "$FOG_ID" =~ ^(trust|up|gossip)$ ]]; then
    usage "--fog-id $FOG_ID: must match ^[a-z0-9][a-z0-9._-]{0,62}$ and not be trust, up or gossip"
fi
if [ -n "$ISSUER_KEY" ]; then
    [[ "$ISSUER_KEY" =~ ^[0-9a-f]{64}$ ]] || usage "--issuer-key: 64 lowercase hex characters"
fi
if [ -n "$VERIFY_WORKERS" ]; then
    if ! [[ "$VERIFY_WORKERS" =~ ^[0-9]{1,2}$ ]] || [ "$VERIFY_WORKERS" -gt 64 ]; then
        usage "--verify-workers: a number from 0 to 64"
    fi
fi
if [ -n "$PREFIX" ]; then
    PREFIX="$(cd "$PREFIX" 2>/dev/null && pwd)" || usage "--prefix $PREFIX: not a directory"
    [ "$PREFIX" = / ] && PREFIX=""
fi
if [ -n "$PREFIX" ]; then
    APT=0
    SYSTEMCTL=0
fi
if [ -z "$SOURCE" ]; then
    [ -f "$HERE/../pyproject.toml" ] || usage "--source: give a fogpay checkout, sdist or wheel"
    SOURCE="$(cd "$HERE/.." && pwd)"
fi
[ -e "$SOURCE" ] || usage "--source $SOURCE: not found"
SOURCE="$(cd "$(dirname "$SOURCE")" && pwd)/$(basename "$SOURCE")"

ETC="$PREFIX/etc/fogpay"
STATE="$PREFIX/var/lib/fogpay"
OPT="$PREFIX/opt/fogpay"
VENV="$OPT/.venv"
MOSQ="$PREFIX/etc/mosquitto"
UNITS="$PREFIX/etc/systemd/system"
ROOT=0
[ "$(id -u)" -eq 0 ] && ROOT=1

run() {  # a command that changes the machine: printed under --dry-run, run otherwise
    if [ "$DRY" -eq 1 ]; then
        echo "+ $*"
    else
        "$@"
    fi
}

own() {  # own OWNER:GROUP MODE PATH: ownership needs root (a scratch --prefix may lack it)
    run chmod "$2" "$3"
    if [ "$ROOT" -eq 1 ]; then
        run chown "$1" "$3"
    else
        say "not root: $3 keeps its owner (wanted $1)"
    fi
}

if [ "$ROOT" -eq 0 ] && [ -z "$PREFIX" ] && [ "$DRY" -eq 0 ]; then
    die "run as root (sudo), or give --prefix DIR or --dry-run"
fi

# 1. packages
if [ "$APT" -eq 1 ]; then
    export DEBIAN_FRONTEND=noninteractive
    run apt-get update -qq
    run apt-get install -y -qq mosquitto mosquitto-clients python3-venv
fi

# 2. the service user
if ! id -u "$SVC_USER" >/dev/null 2>&1; then
    if [ -n "$PREFIX" ]; then
        [ "$DRY" -eq 1 ] || die "--user $SVC_USER does not exist (with --prefix no user is created)"
    fi
    run useradd --system --home-dir /var/lib/fogpay --no-create-home \
        --shell /usr/sbin/nologin "$SVC_USER"
fi
SVC_GROUP="$(id -gn "$SVC_USER" 2>/dev/null || echo "$SVC_USER")"

# 3. directories
run install -d -m 0755 "$OPT"
run install -d -m 0750 "$ETC"
own "root:$SVC_GROUP" 0750 "$ETC"
run install -d -m 0700 "$STATE"
own "$SVC_USER:$SVC_GROUP" 0700 "$STATE"

# 4. the venv
if [ ! -x "$VENV/bin/python" ]; then
    run "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC2086  # PIP_ARGS is a list of arguments
run "$VENV/bin/python" -m pip install --quiet $PIP_ARGS "$SOURCE"
FOGPAY="$VENV/bin/fogpay"

# 5. the fog key: never overwritten
if [ -e "$ETC/fog.key" ]; then
    say "$ETC/fog.key exists: kept"
else
    run bash -c 'umask 077 && "$1" keys new "$2" >/dev/null' _ "$FOGPAY" "$ETC/fog.key"
fi
own "$SVC_USER:$SVC_GROUP" 0600 "$ETC/fog.key"
if [ "$DRY" -eq 0 ]; then
    say "fog $FOG_ID public key: $("$FOGPAY" keys show "$ETC/fog.key" | "$VENV/bin/python" -c 'import json, sys; print(json.load(sys.stdin)["public_key"])')"
fi

# 6. Mosquitto: the fog's account, the ACL, the conf.d file
MOSQ_GROUP="root"
getent group mosquitto >/dev/null 2>&1 && MOSQ_GROUP="mosquitto"
run install -d -m 0755 "$MOSQ/conf.d"
FOG_PW=""
if [ -e "$ETC/fog.toml" ]; then
    say "$ETC/fog.toml exists: kept (and the fog's broker password in it)"
else
    FOG_PW="$("$PY" -c 'import secrets; print(secrets.token_hex(16))')"
    if [ "$DRY" -eq 0 ]; then
        command -v mosquitto_passwd >/dev/null 2>&1 || die "mosquitto_passwd not found: apt-get install mosquitto"
        [ -e "$MOSQ/fogpay.passwd" ] || install -m 0640 /dev/null "$MOSQ/fogpay.passwd"
        mosquitto_passwd -b "$MOSQ/fogpay.passwd" "$FOG_ID" "$FOG_PW"
    else
        echo "+ mosquitto_passwd -b $MOSQ/fogpay.passwd $FOG_ID (random password)"
    fi
fi
if [ -e "$MOSQ/fogpay.passwd" ] || [ "$DRY" -eq 1 ]; then
    own "root:$MOSQ_GROUP" 0640 "$MOSQ/fogpay.passwd"
fi
run install -m 0640 "$HERE/mosquitto/fogpay.acl" "$MOSQ/fogpay.acl"
own "root:$MOSQ_GROUP" 0640 "$MOSQ/fogpay.acl"
if [ "$DRY" -eq 1 ]; then
    echo "+ write $MOSQ/conf.d/fogpay.conf (from mosquitto/fogpay-pi.conf)"
else
    sed -e "s|/etc/mosquitto/|$MOSQ/|g" "$HERE/mosquitto/fogpay-pi.conf" >"$MOSQ/conf.d/fogpay.conf"
    chmod 0644 "$MOSQ/conf.d/fogpay.conf"
fi

# 7. fog.toml: never overwritten; --issuer-key, --standalone and --verify-workers also update
#    an existing one
if [ -n "$FOG_PW" ]; then
    if [ "$DRY" -eq 1 ]; then
        echo "+ write $ETC/fog.toml (from fog.example.toml: fog_id $FOG_ID, broker URL and password)"
    else
        workers="$VERIFY_WORKERS"
        if [ -z "$workers" ]; then  # a Pi 4: 2 workers, a core for the loop, one for the core
            cores="$(nproc 2>/dev/null || echo 1)"
            workers=0
            if [ "$cores" -ge 4 ]; then workers=$((cores - 2)); fi
            if [ "$workers" -gt 64 ]; then workers=64; fi
        fi
        sed -e "s|^fog_id = \"fog-a\"|fog_id = \"$FOG_ID\"|" \
            -e "s|^# verify_workers = 0\$|verify_workers = $workers|" \
            -e "s|/etc/fogpay/|$ETC/|g" -e "s|/var/lib/fogpay/|$STATE/|g" \
            -e "s|^# url = \"mqtt://fog-a:PASSWORD@|url = \"mqtt://$FOG_ID:$FOG_PW@|" \
            "$HERE/fog.example.toml" >"$ETC/fog.toml.new"
        mv "$ETC/fog.toml.new" "$ETC/fog.toml"
    fi
    own "root:$SVC_GROUP" 0640 "$ETC/fog.toml"
fi
settings=()
[ -n "$ISSUER_KEY" ] && settings+=(-e "s|^issuer_key = \"[0-9a-f]*\"|issuer_key = \"$ISSUER_KEY\"|")
[ "$STANDALONE" -eq 1 ] && settings+=(-e 's|^enabled = true |enabled = false|')
if [ -n "$VERIFY_WORKERS" ]; then
    settings+=(-e "s|^#\{0,1\} \{0,1\}verify_workers = [0-9]*\$|verify_workers = $VERIFY_WORKERS|")
fi
if [ ${#settings[@]} -gt 0 ]; then
    run sed -i "${settings[@]}" "$ETC/fog.toml"
fi
if [ "$DRY" -eq 0 ] && grep -q '^issuer_key = "03a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b8"' "$ETC/fog.toml"; then
    say "fog.toml has the EXAMPLE issuer_key: run again with --issuer-key HEX (deploy/README.md)"
fi

# 8. units, check, start
run install -d -m 0755 "$UNITS"
for unit in fogpay-fog.service fogpay-cloud.service; do
    if [ "$DRY" -eq 1 ]; then
        echo "+ write $UNITS/$unit"
    else
        sed -e "s|/opt/fogpay/|$OPT/|g" -e "s|/etc/fogpay/|$ETC/|g" "$HERE/$unit" >"$UNITS/$unit"
        chmod 0644 "$UNITS/$unit"
    fi
done

as_user=()
[ "$ROOT" -eq 1 ] && [ "$(id -un)" != "$SVC_USER" ] && as_user=(runuser -u "$SVC_USER" --)
# the broker is checked by the fog itself at start (it reconnects); Mosquitto may not be
# running yet while this script sets it up
run "${as_user[@]}" "$FOGPAY" fog check-config --skip-broker --config "$ETC/fog.toml"

if [ "$SYSTEMCTL" -eq 1 ]; then
    run systemctl daemon-reload
    run systemctl restart mosquitto
    run systemctl enable fogpay-fog
    run systemctl restart fogpay-fog
    say "running: journalctl -u fogpay-fog -o cat"
else
    say "installed under ${PREFIX:-/}; not started (--no-systemctl or --prefix)"
fi
