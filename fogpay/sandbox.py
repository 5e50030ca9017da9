"""``fogpay sandbox --dir DIR --port PORT``: an issuer and one fog on 127.0.0.1, for trying the
protocol from any language.

Everything lives in DIR, created on the first run and reused afterwards (restarting on the
same DIR keeps keys, trust material, leases, sequence numbers and the log)::

    issuer.seed            the issuer's 32-byte Ed25519 seed, hex (0600): sign owners, leases
    fog.key                the fog's key (0600)
    broker-fog.password    the fog's own broker account (0600)
    broker-device.password the account given to clients in sandbox.json (0600)
    fog.sqlite             the fog's store
    sandbox.json           written atomically once the fog is ready; removed at start

The fog runs in this process with its embedded broker bound to 127.0.0.1 (PORT 0 picks a
free port, so read sandbox.json after each start). It trusts what ``issuer.seed`` signs and
arrives on the spec's retained topics; the sandbox publishes the fog's own credential there.
SIGTERM or SIGINT stops it gracefully.
"""

import argparse
import asyncio
import json
import os
import secrets
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import structlog

from fog.config import ConfigError, FogConfig, config_from_dict
from fogpay.keyfile import KeyFileError, load_key_file, new_key_file
from fogpay.logs import configure
from fogpay.provision import (
    ISSUER_SEED_FILE,
    BrokerAddress,
    Validity,
    fog_credential,
    now_ms,
    publish_retained,
)
from protocol.errors import FogpayError
from protocol.signing import public_key

log = structlog.get_logger()

SANDBOX_JSON: Final = "sandbox.json"
FOG_KEY_FILE: Final = "fog.key"
FOG_DB_FILE: Final = "fog.sqlite"
FOG_PASSWORD_FILE: Final = "broker-fog.password"
DEVICE_PASSWORD_FILE: Final = "broker-device.password"
DEVICE_USERNAME: Final = "device"
FOG_ID_DEFAULT: Final = "sandbox"
HOST: Final = "127.0.0.1"
READY_TIMEOUT_S: Final = 30.0
STOP_TIMEOUT_S: Final = 30.0
FOG_CREDENTIAL_DAYS: Final = 365.0
PASSWORD_BYTES: Final = 18


@dataclass(frozen=True, slots=True, kw_only=True)
class SandboxInfo:
    """What ``sandbox.json`` tells a client."""

    broker: BrokerAddress
    fog_id: str
    fog_key: bytes
    issuer_key: bytes
    issuer_seed_file: str  # a file name inside DIR

    def to_json(self) -> dict[str, Any]:
        broker: dict[str, Any] = {"host": self.broker.host, "port": self.broker.port}
        if self.broker.username is not None:
            broker |= {"username": self.broker.username, "password": self.broker.password}
        return {
            "broker": broker,
            "fog_id": self.fog_id,
            "fog_key": self.fog_key.hex(),
            "issuer_key": self.issuer_key.hex(),
            "issuer_seed_file": self.issuer_seed_file,
        }

    @classmethod
    def load(cls, path: str | Path) -> "SandboxInfo":
        """Read a sandbox.json; raises OSError or FogpayError (unreadable content)."""
        try:
            raw = json.loads(Path(path).read_text())
            b = raw["broker"]
            return cls(
                broker=BrokerAddress(
                    b["host"], int(b["port"]), b.get("username"), b.get("password")
                ),
                fog_id=raw["fog_id"],
                fog_key=bytes.fromhex(raw["fog_key"]),
                issuer_key=bytes.fromhex(raw["issuer_key"]),
                issuer_seed_file=raw["issuer_seed_file"],
            )
        except (ValueError, KeyError, TypeError) as exc:  # JSONDecodeError is a ValueError
            raise FogpayError(f"{path}: not a sandbox.json ({type(exc).__name__}: {exc})") from exc


def write_json_atomic(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, (json.dumps(obj, indent=2) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _secret_file(path: Path) -> None:
    """Create a random password file (0600) unless it exists."""
    if path.exists():
        return
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, secrets.token_urlsafe(PASSWORD_BYTES).encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)


def prepare_dir(directory: Path, *, port: int, fog_id: str) -> FogConfig:
    """Create what is missing in ``directory`` and return the fog's config."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    (directory / SANDBOX_JSON).unlink(missing_ok=True)
    for name in (ISSUER_SEED_FILE, FOG_KEY_FILE):
        if not (directory / name).exists():
            new_key_file(directory / name)
    for name in (FOG_PASSWORD_FILE, DEVICE_PASSWORD_FILE):
        _secret_file(directory / name)
    issuer = load_key_file(directory / ISSUER_SEED_FILE)
    return config_from_dict(
        {
            "fog_id": fog_id,
            "key_file": FOG_KEY_FILE,
            "issuer_key": public_key(issuer).hex(),
            "db": FOG_DB_FILE,
            "broker": {
                "host": HOST,
                "port": port,
                "password_file": FOG_PASSWORD_FILE,
                "device_username": DEVICE_USERNAME,
                "device_password_file": DEVICE_PASSWORD_FILE,
            },
        },
        base=directory,
    )


def sandbox_info(directory: Path, config: FogConfig, port: int) -> SandboxInfo:
    return SandboxInfo(
        broker=BrokerAddress(HOST, port, DEVICE_USERNAME, config.broker.device_password),
        fog_id=config.fog_id,
        fog_key=public_key(load_key_file(config.key_file)),
        issuer_key=config.issuer_key,
        issuer_seed_file=ISSUER_SEED_FILE,
    )


async def run_sandbox(directory: Path, *, port: int, fog_id: str = FOG_ID_DEFAULT) -> None:
    """Run until SIGTERM/SIGINT (or cancellation)."""
    from fog.daemon import FogDaemon  # imports amqtt and the store: only when running

    config = prepare_dir(directory, port=port, fog_id=fog_id)
    daemon = FogDaemon(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: loop.create_task(daemon.stop(), name="sandbox.stop"))
    ready = asyncio.Event()
    fog = asyncio.create_task(daemon.run(ready=ready), name="sandbox.fog")
    try:
        await _wait_ready(fog, ready)
        info = sandbox_info(directory, config, daemon.broker_port)
        await _publish_fog_credential(directory, info)
        write_json_atomic(directory / SANDBOX_JSON, info.to_json())
        log.info("sandbox_ready", port=info.broker.port, fog_id=fog_id, dir=str(directory))
        await fog
    finally:
        if not fog.done():
            await daemon.stop()
            async with asyncio.timeout(STOP_TIMEOUT_S):
                await fog


async def _wait_ready(fog: "asyncio.Task[None]", ready: asyncio.Event) -> None:
    async with asyncio.timeout(READY_TIMEOUT_S):
        waiter = asyncio.create_task(ready.wait(), name="sandbox.ready")
        done, _ = await asyncio.wait({waiter, fog}, return_when=asyncio.FIRST_COMPLETED)
    if fog in done:
        waiter.cancel()
        fog.result()  # raises what stopped the fog
        raise AssertionError("fog exited before it was ready")


async def _publish_fog_credential(directory: Path, info: SandboxInfo) -> None:
    issuer = load_key_file(directory / ISSUER_SEED_FILE)
    validity = Validity.days(FOG_CREDENTIAL_DAYS, now=now_ms())
    pub = fog_credential(issuer, fog_id=info.fog_id, fog_key=info.fog_key, validity=validity)
    await publish_retained(info.broker, [pub])


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("sandbox", help="an issuer and a fog on 127.0.0.1, state in DIR")
    p.add_argument("--dir", required=True, type=Path)
    p.add_argument("--port", type=int, default=0, help="broker port (0: pick a free one)")
    p.add_argument("--fog-id", default=FOG_ID_DEFAULT)
    p.add_argument("--console", action="store_true", help="human log lines instead of JSON")
    p.set_defaults(func=cmd_sandbox)


def cmd_sandbox(args: argparse.Namespace) -> int:
    configure(json=not args.console)
    try:
        asyncio.run(run_sandbox(args.dir, port=args.port, fog_id=args.fog_id))
    except (ConfigError, KeyFileError, OSError) as exc:
        print(f"fogpay sandbox: {exc}", file=sys.stderr)
        return 2
    return 0
