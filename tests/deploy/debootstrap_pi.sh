#!/usr/bin/env bash
# deploy/README.md sections 2 and 3, run literally in a clean Debian 12 root (not part of
# `make test`: it needs root, debootstrap and the network to deb.debian.org and PyPI; ~5 min).
#
#   sudo bash tests/deploy/debootstrap_pi.sh [ROOT_DIR]
#
# Makes ROOT_DIR with `debootstrap --variant=minbase bookworm` unless it exists, puts this
# checkout's HEAD (git archive) in ROOT_DIR/root/fogpay, and runs there, in a chroot, the
# README's ```sh blocks of section 2 (the standalone line) and section 3 as written, with
# only these changes (a chroot has no systemd and no sudo):
#   - `sudo ` is dropped;
#   - `bash deploy/install-pi.sh` gets `--no-systemctl` and installs offline, the README's
#     wheel and offline-Pi way (section 1, section 2 step 4): `--source` the wheel of this
#     checkout, `--pip-args "--no-index --find-links /root/wheels"` with its dependencies'
#     wheels, built here by the host's pip (the chroot gets no pip configuration);
#   - `systemctl reload mosquitto` becomes `kill -HUP` of the mosquitto the script starts;
#   - what `systemctl restart mosquitto` / `restart fogpay-fog` would do is done by hand:
#     mosquitto -c /etc/mosquitto/mosquitto.conf -d (Debian's stock main config), and the fog
#     as the fogpay user (runuser) in the background.
# It passes when the README's `fogpay edge pay` prints "status": "ok".
set -euo pipefail
[ "$(id -u)" -eq 0 ] || { echo "run as root" >&2; exit 2; }
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CHECKOUT="$(cd "$HERE/../.." && pwd)"
TARGET="${1:-/tmp/fogpay-debootstrap}"
README="$CHECKOUT/deploy/README.md"

if [ ! -x "$TARGET/usr/bin/apt-get" ]; then
    command -v debootstrap >/dev/null || apt-get install -y -qq debootstrap
    timeout 1200 debootstrap --variant=minbase bookworm "$TARGET" http://deb.debian.org/debian
fi
rm -rf "$TARGET/root/fogpay" "$TARGET/root/fog.pid" && mkdir -p "$TARGET/root/fogpay"
git -C "$CHECKOUT" archive HEAD | tar -x -C "$TARGET/root/fogpay"
cp /etc/resolv.conf "$TARGET/etc/resolv.conf"
rm -rf "$TARGET/root/wheels"
python3 -m pip wheel -q -w "$TARGET/root/wheels" "$CHECKOUT"

# the README's shell blocks: section 2's standalone install line, then section 3's two blocks
blocks() {  # $1: section heading; prints the ```sh blocks under it, one after the other
    awk -v head="$1" '
        /^## / { inside = index($0, head) == 1 }
        inside && /^```sh/ { code = 1; next }
        inside && /^```/ { code = 0; print "#--block--"; next }
        inside && code { print }
    ' "$README"
}
adapt() {
    # shellcheck disable=SC2016  # the $(...) is for the chroot's shell
    sed -e 's/sudo //g' \
        -e 's|bash deploy/install-pi.sh|bash deploy/install-pi.sh --no-systemctl --source /root/wheels/fogpay-0.1.0-py3-none-any.whl --pip-args "--no-index --find-links /root/wheels"|' \
        -e 's|systemctl reload mosquitto|kill -HUP "$(cat /run/mosquitto/mosquitto.pid)"|'
}
{
    echo 'set -euxo pipefail'
    echo 'export DEBIAN_FRONTEND=noninteractive PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'
    echo 'cd /root/fogpay'
    echo 'apt-get update -qq'
    blocks "## 2. Install" | grep -v -e '(section 4)' -e '^#--block--' | adapt
    # systemctl restart mosquitto, as Debian's unit does it
    echo 'mkdir -m 740 -p /var/log/mosquitto /run/mosquitto'
    echo 'chown mosquitto /var/log/mosquitto /run/mosquitto'
    echo 'mosquitto -c /etc/mosquitto/mosquitto.conf -d'
    # shellcheck disable=SC2016
    echo 'for _ in $(seq 100); do [ -s /run/mosquitto/mosquitto.pid ] && break; sleep 0.1; done'
    blocks "## 3. A standalone fog" | adapt | awk '
        /^#--block--/ && !started {
            # systemctl restart fogpay-fog (install-pi.sh step 8)
            print "runuser -u fogpay -- /opt/fogpay/.venv/bin/fogpay fog run --config /etc/fogpay/fog.toml >/root/fog.log 2>&1 &"
            print "echo $! >/root/fog.pid"
            print "for _ in $(seq 300); do grep -q broker_connected /root/fog.log && break; sleep 0.1; done"
            started = 1; next
        }
        /^#--block--/ { next }
        { print }
    '
} >"$TARGET/root/readme.sh"

cleanup() {  # only the two processes the script started, by their pid
    for pidfile in "$TARGET/root/fog.pid" "$TARGET/run/mosquitto/mosquitto.pid"; do
        if [ -s "$pidfile" ]; then kill -TERM "$(cat "$pidfile")" 2>/dev/null || true; fi
    done
    sleep 2
    umount "$TARGET/dev" "$TARGET/proc" 2>/dev/null || true
}
trap cleanup EXIT
mount -t proc proc "$TARGET/proc"
mount --bind /dev "$TARGET/dev"
chroot "$TARGET" /usr/bin/env -i HOME=/root bash /root/readme.sh 2>&1 | tee "$TARGET/root/readme.log"
grep -q '"status": "ok"' "$TARGET/root/readme.log"
echo "debootstrap_pi: the README's standalone fog answered a payment in a clean Debian 12 root"
