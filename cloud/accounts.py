"""Per-device broker accounts, made from the registry (docs/security.md, "Broker accounts").

The account list lives in the cloud's registry: a device has a broker account exactly while
``registry.login_devices`` lists it (a binding valid now, an active owner, the key not
revoked). Its login is ``protocol.login``'s (username = key hex, password derived from the
login secret). ``AccountSync`` keeps broker account files equal to that list:

- the embedded amqtt broker's accounts file (``fog.brokerauth``, JSON, SHA-256 of each
  password; the broker re-reads it when it changes);
- a Mosquitto ``password_file`` (PBKDF2-SHA512 ``$7$`` lines as ``mosquitto_passwd`` writes
  them): the static accounts of a base file (issuer, fogs, ops) then one line per device;
  Mosquitto is sent SIGHUP to reload it. ``deploy/mosquitto/fogpay.acl`` gives every device
  account its rights by pattern (``%u``), so only the password file changes.

Each file is rewritten atomically, only when its content changes (salts are derived, so the
same list gives the same bytes). The sync polls a cheap fingerprint of the registry
(``registry.login_fingerprint``) every ``POLL_S`` and recomputes everything every
``FULL_S`` (bindings expire).
"""

import asyncio
import base64
import hashlib
import hmac
import json
import os
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import structlog

from cloud import registry
from cloud.store import Store, Tx
from protocol.login import account_digest, device_password, device_username
from runtime.files import write_atomic

log = structlog.get_logger()

POLL_S: Final = 0.5
FULL_S: Final = 60.0
MOSQUITTO_ITERATIONS: Final = 101  # mosquitto_passwd 2.0's default
MOSQUITTO_SALT_BYTES: Final = 12
ROLE_DEVICE: Final = "device"  # fog.brokerauth.ROLE_DEVICE (cloud may not import fog)


@dataclass(frozen=True, slots=True, kw_only=True)
class AccountTargets:
    """Where the accounts go (any of them)."""

    amqtt_file: Path | None = None
    # fixed accounts added to the amqtt file: username -> {"role": ..., "sha256": ...}
    amqtt_fixed: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    mosquitto_passwd: Path | None = None
    mosquitto_base: Path | None = None  # static password lines, copied first
    mosquitto_pid_file: Path | None = None  # Mosquitto's pid file: SIGHUP after a change


def mosquitto_hash(password: str, salt: bytes) -> str:
    """A Mosquitto 2.0 password file hash: ``$7$ITER$SALT$HASH`` (PBKDF2-HMAC-SHA512)."""
    dk = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, MOSQUITTO_ITERATIONS, 64)
    b64 = base64.b64encode
    return f"$7${MOSQUITTO_ITERATIONS}${b64(salt).decode()}${b64(dk).decode()}"


def render_amqtt(
    devices: list[bytes], secret: bytes, fixed: Mapping[str, Mapping[str, str]]
) -> bytes:
    accounts: dict[str, dict[str, str]] = {k: dict(v) for k, v in fixed.items()}
    for d in devices:
        accounts[device_username(d)] = {
            "role": ROLE_DEVICE,
            "sha256": account_digest(device_password(secret, d)),
        }
    return (json.dumps({"accounts": accounts}, indent=1, sort_keys=True) + "\n").encode()


def render_mosquitto(devices: list[bytes], secret: bytes, base: str) -> bytes:
    lines = [line for line in base.splitlines() if line.strip()]
    for d in devices:
        salt = hmac.new(secret, b"mosquitto salt" + d, hashlib.sha256).digest()
        lines.append(
            f"{device_username(d)}:"
            f"{mosquitto_hash(device_password(secret, d), salt[:MOSQUITTO_SALT_BYTES])}"
        )
    return ("\n".join(lines) + "\n").encode()


def _write_if_changed(path: Path, data: bytes) -> bool:
    try:
        if path.read_bytes() == data:
            return False
    except FileNotFoundError:
        pass
    write_atomic(path, data, mode=0o640)
    return True


def _reload_mosquitto(pid_file: Path) -> None:
    pid = int(pid_file.read_text().split()[0])
    os.kill(pid, signal.SIGHUP)


async def sync_once(
    store: Store, secret: bytes, targets: AccountTargets, *, now_ms: int, reload: bool = False
) -> int:
    """Write the targets from the registry; returns the number of device accounts. Mosquitto
    is sent SIGHUP when its file changed, or always with ``reload`` (a failed SIGHUP is
    retried so)."""

    async def fn(tx: Tx) -> list[bytes]:
        return await registry.login_devices(tx, now_ms=now_ms)

    devices = await store.transact(fn)
    if targets.amqtt_file is not None:
        data = render_amqtt(devices, secret, targets.amqtt_fixed)
        if _write_if_changed(targets.amqtt_file, data):
            log.info("accounts_written", target="amqtt", devices=len(devices))
    if targets.mosquitto_passwd is not None:
        base = targets.mosquitto_base.read_text() if targets.mosquitto_base else ""
        data = render_mosquitto(devices, secret, base)
        changed = _write_if_changed(targets.mosquitto_passwd, data)
        if changed:
            log.info("accounts_written", target="mosquitto", devices=len(devices))
        if (changed or reload) and targets.mosquitto_pid_file is not None:
            _reload_mosquitto(targets.mosquitto_pid_file)
    return len(devices)


class AccountSync:
    """Keeps ``targets`` equal to the registry's account list until ``stop``."""

    def __init__(
        self,
        *,
        store: Store,
        secret: bytes,
        targets: AccountTargets,
        clock: Callable[[], int],
        poll_s: float = POLL_S,
    ) -> None:
        self._store = store
        self._secret = secret
        self._targets = targets
        self._clock = clock
        self._poll_s = poll_s
        self._stopping = asyncio.Event()

    async def stop(self) -> None:
        self._stopping.set()

    async def run(self, *, ready: asyncio.Event | None = None) -> None:
        loop = asyncio.get_running_loop()
        seen: tuple[int, int, int] | None = None
        full_at = 0.0
        first, failed, failures = True, False, 0
        while not self._stopping.is_set():
            try:
                fingerprint = await self._store.transact(registry.login_fingerprint)
                if failed or fingerprint != seen or loop.time() >= full_at:
                    now_ms = self._clock()
                    await sync_once(
                        self._store, self._secret, self._targets, now_ms=now_ms, reload=failed
                    )
                    seen, full_at, failed, failures = fingerprint, loop.time() + FULL_S, False, 0
            except (OSError, ValueError) as exc:  # a file or the pid file: retried
                failed, failures = True, failures + 1
                if failures & (failures - 1) == 0:  # 1st, 2nd, 4th, 8th... in a row
                    error = f"{type(exc).__name__}: {exc}"[:200]
                    log.error("accounts_sync_failed", error=error, failures=failures)
            if first and ready is not None:
                ready.set()
            first = False
            try:
                async with asyncio.timeout(self._poll_s):
                    await self._stopping.wait()
            except TimeoutError:
                pass
