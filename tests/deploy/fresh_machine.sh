#!/usr/bin/env bash
# `make test` on a fresh Debian 12 with only Python (no Mosquitto, no PostgreSQL), as a user
# who is not root: it must pass, the broker and database tests skipped with one line each
# saying how to enable them. Not part of `make test` (root, debootstrap, ~10-15 min).
#
#   sudo bash tests/deploy/fresh_machine.sh ROOT_DIR WHEELHOUSE
#
# ROOT_DIR: made with `debootstrap --variant=minbase bookworm` unless it exists (it must not
# have mosquitto or postgresql). WHEELHOUSE: wheels of '.[test,dev,postgres]', setuptools>=77
# and pip (`pip wheel -w DIR '.[test,dev,postgres]' 'setuptools>=77' pip`): the chroot gets no
# pip configuration, so pip installs from it alone (PIP_NO_INDEX, PIP_FIND_LINKS).
set -euo pipefail
[ "$(id -u)" -eq 0 ] || { echo "run as root" >&2; exit 2; }
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CHECKOUT="$(cd "$HERE/../.." && pwd)"
TARGET="${1:?ROOT_DIR}"
WHEELS="${2:?WHEELHOUSE}"

if [ ! -x "$TARGET/usr/bin/apt-get" ]; then
    timeout 1200 debootstrap --variant=minbase bookworm "$TARGET" http://deb.debian.org/debian
fi
cp /etc/resolv.conf "$TARGET/etc/resolv.conf"
rm -rf "$TARGET/wheels" && cp -r "$WHEELS" "$TARGET/wheels"

# shellcheck disable=SC2317  # called by the trap
cleanup() {
    umount -R "$TARGET/dev" 2>/dev/null || true
    umount "$TARGET/proc" 2>/dev/null || true
}
trap cleanup EXIT
mount -t proc proc "$TARGET/proc"
mount --rbind /dev "$TARGET/dev"
mount --make-rslave "$TARGET/dev"

chroot "$TARGET" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive bash -euxc '
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends python3 python3-venv make >/dev/null
    ! command -v mosquitto && ! ls /usr/lib/postgresql 2>/dev/null
    id -u tester >/dev/null 2>&1 || useradd -m tester
    rm -rf /home/tester/fogpay && mkdir /home/tester/fogpay
'
git -C "$CHECKOUT" archive HEAD | tar -x -C "$TARGET/home/tester/fogpay"
chroot "$TARGET" chown -R tester:tester /home/tester/fogpay
chroot "$TARGET" /usr/bin/env -i HOME=/home/tester PATH=/usr/local/bin:/usr/bin:/bin \
    PIP_NO_INDEX=1 PIP_FIND_LINKS=/wheels \
    /usr/sbin/runuser -u tester -- bash -c 'cd /home/tester/fogpay && make test' 2>&1 | tee "$TARGET/make-test.log"
rc=${PIPESTATUS[0]}
echo "fresh_machine: make test exited $rc"
exit "$rc"
