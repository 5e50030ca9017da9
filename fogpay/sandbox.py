"""``fogpay sandbox --dir DIR --port PORT [--broker amqtt|mosquitto]``: an issuer with its
cloud, and one fog, on 127.0.0.1, for trying the protocol from any language.

Everything lives in DIR, created on the first run and reused afterwards (restarting on the
same DIR keeps keys, trust material, leases, sequence numbers, the log and the cloud's
books)::

    issuer.seed            the issuer's 32-byte Ed25519 seed, hex (0600): the cloud's key
    fog.key                the fog's key (0600)
    broker-fog.password    the fog's own broker account (0600), also used by the cloud
    broker-operator.password  the operator account given to clients in sandbox.json (0600):
                           may publish trust and lease topics and read everything
    broker-login.secret    the login secret devices' broker passwords derive from (0600,
                           hex; ``protocol.login``): ``fogpay sandbox credentials``
    accounts.json          the embedded broker's accounts, rewritten from the registry by
                           ``cloud.accounts.AccountSync`` (a device has an account while its
                           binding is registered and not revoked)
    fog.sqlite             the fog's store
    cloud.sqlite           the cloud's store: registry, leases, booked batches, ledger
    sandbox.json           written atomically once everything is ready; removed at start

``--broker mosquitto`` runs Mosquitto from the shipped configs instead of the embedded
broker (``fogpay.sandbox_mosquitto``; ``DIR/mosquitto/``, ``DIR/broker-issuer.password``:
the cloud's account there).

``sandbox.json`` also names the fog's and the cloud's metrics endpoints (``"metrics": {"fog":
URL, "cloud": URL}``, each on a free port of 127.0.0.1: ``/metrics``, ``/healthz``,
``/readyz``; ``fogpay status --url URL`` reads either).

The fog runs in this process with its embedded broker bound to 127.0.0.1 (PORT 0 picks a
free port, so read sandbox.json after each start). The cloud runs beside it on the same
broker: its registry holds the fog (registered on the first start), its MQTT shell
(``cloud.service.CloudService``) publishes the registry retained, books the fog's batches
and acks them, and answers lease requests. Material provisioned by hand with the issuer
seed (``fogpay owner add``, ``device bind``, ``device revoke``, ``lease grant``) is imported
into the registry by ``cloud.mirror`` (sandbox only), so batches paid with it are booked
too. ``fogpay cloud --store sqlite://DIR/cloud.sqlite ...`` reads the books (ledger check,
lease list, settle). SIGTERM or SIGINT stops it gracefully.
"""

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import secrets
import signal
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import nacl.signing
import structlog

from cloud import registry
from cloud.accounts import AccountSync, AccountTargets, sync_once
from cloud.config import MetricsConfig
from cloud.core import CloudCore
from cloud.leases import LeasePolicy
from cloud.mirror import Importer, Mirror
from cloud.sqlitestore import SqliteStore
from cloud.store import Store, Tx
from fog.config import ConfigError, FogConfig, config_from_dict
from fog.schema import StoreOpenError
from fogpay import sandbox_mosquitto as mosq
from fogpay.certs import CA_CERT, issue, make_ca
from fogpay.provision import ISSUER_SEED_FILE, BrokerAddress, now_ms
from fogpay.running import ready_at_once, running, with_ready
from protocol.errors import FogpayError
from protocol.login import LOGIN_SECRET_BYTES, account_digest, device_password, device_username
from protocol.signing import is_valid_public_key, public_key
from runtime.cli import EXIT_USAGE, fail, report
from runtime.keyfile import KeyFileError, load_key_file, new_key_file
from runtime.logs import configure

log = structlog.get_logger()

SANDBOX_JSON: Final = "sandbox.json"
FOG_KEY_FILE: Final = "fog.key"
FOG_DB_FILE: Final = "fog.sqlite"
CLOUD_DB_FILE: Final = "cloud.sqlite"
FOG_USERNAME: Final = "fog"
FOG_PASSWORD_FILE: Final = "broker-fog.password"
OPERATOR_PASSWORD_FILE: Final = "broker-operator.password"
ISSUER_PASSWORD_FILE: Final = "broker-issuer.password"  # the cloud's account on Mosquitto
BROKERS: Final = ("amqtt", "mosquitto")
OPERATOR_USERNAME: Final = "operator"
LOGIN_SECRET_FILE: Final = "broker-login.secret"
ACCOUNTS_FILE: Final = "accounts.json"
FOG_ID_DEFAULT: Final = "sandbox"
HOST: Final = "127.0.0.1"
READY_TIMEOUT_S: Final = 30.0
PASSWORD_BYTES: Final = 18
TLS_DIR: Final = "tls"  # the sandbox's lab CA and its broker's certificate (fogpay certs)
TLS_SERVER_NAME: Final = "localhost"


@dataclass(frozen=True, slots=True, kw_only=True)
class SandboxInfo:
    """What ``sandbox.json`` tells a client."""

    broker: BrokerAddress
    fog_id: str
    fog_key: bytes
    issuer_key: bytes
    issuer_seed_file: str  # a file name inside DIR
    cloud_db: str | None = None  # the cloud's SQLite store, a file name inside DIR
    # component ("fog", "cloud") -> metrics endpoint URL
    metrics: dict[str, str] | None = field(default=None, hash=False)
    # the broker's TLS listener: {"host", "port", "ca_file" (a file name inside DIR)}
    tls: dict[str, Any] | None = field(default=None, hash=False)

    def to_json(self) -> dict[str, Any]:
        broker: dict[str, Any] = {"host": self.broker.host, "port": self.broker.port}
        if self.broker.username is not None:
            broker |= {"username": self.broker.username, "password": self.broker.password}
        return (
            {
                "broker": broker,
                "fog_id": self.fog_id,
                "fog_key": self.fog_key.hex(),
                "issuer_key": self.issuer_key.hex(),
                "issuer_seed_file": self.issuer_seed_file,
            }
            | ({} if self.cloud_db is None else {"cloud": {"db": self.cloud_db}})
            | ({} if self.metrics is None else {"metrics": dict(self.metrics)})
            | ({} if self.tls is None else {"tls": dict(self.tls)})
        )

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
                cloud_db=raw.get("cloud", {}).get("db"),
                metrics={str(k): str(v) for k, v in raw["metrics"].items()}
                if "metrics" in raw
                else None,
                tls=_tls_block(raw["tls"]) if "tls" in raw else None,
            )
        except (ValueError, KeyError, TypeError) as exc:  # JSONDecodeError is a ValueError
            raise FogpayError(f"{path}: not a sandbox.json ({type(exc).__name__}: {exc})") from exc


def _tls_block(raw: Any) -> dict[str, Any]:
    return {"host": str(raw["host"]), "port": int(raw["port"]), "ca_file": str(raw["ca_file"])}


def _tls_files(directory: Path) -> None:
    """The sandbox's lab CA and a server certificate for 127.0.0.1 (once; kept after)."""
    tls = directory / TLS_DIR
    if not (tls / CA_CERT).exists():
        make_ca(tls)
    if not (tls / f"{TLS_SERVER_NAME}.pem").exists():
        issue(tls, TLS_SERVER_NAME, server=True, ips=(HOST,))


def write_json_atomic(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, (json.dumps(obj, indent=2) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _secret_file(path: Path, content: str | None = None) -> None:
    """Create a random password file (0600) unless it exists."""
    if path.exists():
        return
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        text = secrets.token_urlsafe(PASSWORD_BYTES) if content is None else content
        os.write(fd, text.encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)


def prepare_dir(
    directory: Path, *, port: int, fog_id: str, mosquitto: int | None = None
) -> FogConfig:
    """Create what is missing in ``directory`` and return the fog's config (``mosquitto``:
    the port of the sandbox's Mosquitto, which the fog joins as ``fog_id``)."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    (directory / SANDBOX_JSON).unlink(missing_ok=True)
    for name in (ISSUER_SEED_FILE, FOG_KEY_FILE):
        if not (directory / name).exists():
            new_key_file(directory / name)
    for name in (FOG_PASSWORD_FILE, OPERATOR_PASSWORD_FILE):
        _secret_file(directory / name)
    _secret_file(directory / LOGIN_SECRET_FILE, secrets.token_hex(LOGIN_SECRET_BYTES))
    _tls_files(directory)
    issuer = load_key_file(directory / ISSUER_SEED_FILE)
    broker: dict[str, Any] = {}
    if mosquitto is not None:
        password = _first_line(directory, FOG_PASSWORD_FILE)
        broker = {"url": f"mqtt://{fog_id}:{password}@{HOST}:{mosquitto}"}
    return config_from_dict(
        {
            "fog_id": fog_id,
            "key_file": FOG_KEY_FILE,
            "issuer_key": public_key(issuer).hex(),
            "db": FOG_DB_FILE,
            "broker": broker
            or {
                "host": HOST,
                "port": port,
                "username": FOG_USERNAME,
                "password_file": FOG_PASSWORD_FILE,
                "accounts_file": ACCOUNTS_FILE,
                "tls_port": 0,
                "tls_cert_file": f"{TLS_DIR}/{TLS_SERVER_NAME}.pem",
                "tls_key_file": f"{TLS_DIR}/{TLS_SERVER_NAME}.key",
            },
            "metrics": {"enabled": True, "listen": f"{HOST}:0"},
        },
        base=directory,
    )


def sandbox_info(
    directory: Path,
    config: FogConfig,
    port: int,
    metrics: dict[str, str] | None = None,
    tls_port: int | None = None,
) -> SandboxInfo:
    tls = None
    if tls_port is not None:
        tls = {"host": HOST, "port": tls_port, "ca_file": f"{TLS_DIR}/{CA_CERT}"}
    return SandboxInfo(
        broker=BrokerAddress(
            HOST, port, OPERATOR_USERNAME, _first_line(directory, OPERATOR_PASSWORD_FILE)
        ),
        fog_id=config.fog_id,
        fog_key=public_key(load_key_file(config.key_file)),
        issuer_key=config.issuer_key,
        issuer_seed_file=ISSUER_SEED_FILE,
        cloud_db=CLOUD_DB_FILE,
        metrics=metrics,
        tls=tls,
    )


def _first_line(directory: Path, name: str) -> str:
    lines = (directory / name).read_text().splitlines()
    return lines[0].strip() if lines else ""


def login_secret(directory: Path) -> bytes:
    """DIR's login secret; raises FogpayError when it is not 32+ bytes of hex."""
    try:
        secret = bytes.fromhex(_first_line(directory, LOGIN_SECRET_FILE))
    except ValueError:
        secret = b""
    if len(secret) < LOGIN_SECRET_BYTES:
        raise FogpayError(f"{directory / LOGIN_SECRET_FILE}: not {LOGIN_SECRET_BYTES} bytes of hex")
    return secret


def account_targets(directory: Path) -> AccountTargets:
    """The embedded broker's accounts file, with the operator account fixed in it."""
    operator = _first_line(directory, OPERATOR_PASSWORD_FILE)
    fixed = {OPERATOR_USERNAME: {"role": "operator", "sha256": account_digest(operator)}}
    return AccountTargets(amqtt_file=directory / ACCOUNTS_FILE, amqtt_fixed=fixed)


async def run_sandbox(
    directory: Path, *, port: int, fog_id: str = FOG_ID_DEFAULT, broker: str = "amqtt"
) -> None:
    """Run until SIGTERM/SIGINT (or cancellation, or a component stopping by itself)."""
    from fog.daemon import FogDaemon  # imports amqtt and the stores: only when running

    config = prepare_dir(directory, port=port, fog_id=fog_id)
    issuer = load_key_file(directory / ISSUER_SEED_FILE)
    store = await SqliteStore.open(str(directory / CLOUD_DB_FILE))
    try:
        await register_fog(store, issuer, config)
        secret, targets = login_secret(directory), account_targets(directory)
        fog_account = (config.broker.username, config.broker.password)
        cloud_account, mirror_account = fog_account, fog_account
        ports: tuple[int, int] | None = None
        if broker == "mosquitto":
            targets = mosq.account_targets(directory)
            _secret_file(directory / ISSUER_PASSWORD_FILE)
            operator = (OPERATOR_USERNAME, _first_line(directory, OPERATOR_PASSWORD_FILE))
            cloud_account = (mosq.ISSUER_USERNAME, _first_line(directory, ISSUER_PASSWORD_FILE))
            fog_account, mirror_account = (fog_id, config.broker.password), operator
            accounts = dict((fog_account, cloud_account, operator))
            ports = mosq.prepare(
                directory,
                port=port,
                cert=f"{TLS_DIR}/{TLS_SERVER_NAME}",
                accounts=accounts,
                secret=secret,
            )
            config = prepare_dir(directory, port=port, fog_id=fog_id, mosquitto=ports[0])
        first = dataclasses.replace(targets, mosquitto_pid_file=None)  # none runs yet
        await sync_once(store, secret, first, now_ms=now_ms())  # before the broker starts
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        async with contextlib.AsyncExitStack() as stack:
            extra: list[asyncio.Task[None]] = []
            if ports is not None:
                extra.append(await stack.enter_async_context(_mosquitto(directory, *ports)))
            daemon = FogDaemon(config)
            fog = await stack.enter_async_context(
                running("sandbox.fog", with_ready(daemon.run), daemon.stop)
            )
            broker_port = daemon.broker_port if ports is None else ports[0]
            tls_port = daemon.broker_tls_port if ports is None else ports[1]
            tasks, cloud_url = await _start_cloud(
                stack, store, issuer, broker_port, cloud_account, mirror_account
            )
            tasks.extend(extra)
            sync = AccountSync(store=store, secret=secret, targets=targets, clock=now_ms)
            tasks.append(
                await stack.enter_async_context(
                    running("sandbox.accounts", with_ready(sync.run), sync.stop)
                )
            )
            metrics = {"fog": daemon.observer.url, "cloud": cloud_url}
            info = sandbox_info(
                directory,
                config,
                broker_port,
                {k: v for k, v in metrics.items() if v is not None},
                tls_port,
            )
            write_json_atomic(directory / SANDBOX_JSON, info.to_json())
            log.info(
                "sandbox_ready",
                port=info.broker.port,
                fog_id=fog_id,
                dir=str(directory),
                broker=broker,
            )
            waiter = asyncio.create_task(stopping.wait(), name="sandbox.stopping")
            await asyncio.wait({waiter, fog, *tasks}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
    finally:
        await store.close()


async def register_fog(store: Store, issuer: nacl.signing.SigningKey, config: FogConfig) -> None:
    """Register the sandbox's fog with its cloud (once; its credential is then published
    retained by the cloud service, as every registry entry)."""
    key = public_key(load_key_file(config.key_file))

    async def fn(tx: Tx) -> None:
        known = await registry.fog_key(tx, config.fog_id)
        if known == key:
            return
        if known is not None:
            raise FogpayError(f"{CLOUD_DB_FILE}: fog {config.fog_id!r} has another key")
        await registry.add_fog(tx, issuer, fog_id=config.fog_id, key=key, now_ms=now_ms())

    await store.transact(fn)


@contextlib.asynccontextmanager
async def _mosquitto(
    directory: Path, port: int, tls_port: int
) -> AsyncIterator["asyncio.Task[None]"]:
    """Mosquitto as a child process, for as long as the sandbox runs; its task ends with an
    error if Mosquitto exits by itself."""
    m = mosq.start(directory, port, tls_port)  # on this thread (its parent-death signal)
    stopped = False

    async def watch() -> None:
        code = await asyncio.to_thread(m.process.wait)
        if not stopped:
            raise FogpayError(f"mosquitto exited {code} (see {m.log})")

    async def stop() -> None:
        nonlocal stopped
        stopped = True
        await asyncio.to_thread(m.stop)

    try:
        async with running("sandbox.mosquitto", ready_at_once(watch), stop) as task:
            yield task
    finally:
        if not stopped:
            await stop()


async def _start_cloud(
    stack: contextlib.AsyncExitStack,
    store: Store,
    issuer: nacl.signing.SigningKey,
    port: int,
    cloud_account: tuple[str, str],
    mirror_account: tuple[str, str],
) -> tuple[list["asyncio.Task[None]"], str | None]:
    """The cloud service and the mirror on the sandbox's broker (amqtt: both with the fog's
    account; Mosquitto: the cloud as ``issuer``, the mirror as ``operator``); and the
    cloud's metrics endpoint."""
    from cloud.service import CloudService

    account = {
        "hostname": HOST,
        "port": port,
        "username": mirror_account[0],
        "password": mirror_account[1],
    }
    core = CloudCore(store=store, issuer=issuer, clock=now_ms, policy=LeasePolicy())
    service = CloudService(
        core=core,
        broker_host=HOST,
        broker_port=port,
        username=cloud_account[0],
        password=cloud_account[1],
        clock=now_ms,
        store=store,
        metrics=MetricsConfig(enabled=True, host=HOST, port=0),
    )
    importer = Importer(store=store, issuer_key=public_key(issuer), clock=now_ms)
    mirror = Mirror(importer=importer, client_args=account)
    tasks = [
        await stack.enter_async_context(running(name, run, stop))
        for name, run, stop in (
            ("sandbox.cloud", with_ready(service.run), service.stop),
            ("sandbox.mirror", with_ready(mirror.run), mirror.stop),
        )
    ]
    return tasks, service.observer.url


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("sandbox", help="an issuer, a fog and the cloud on 127.0.0.1, state in DIR")
    p.add_argument("--dir", type=Path, help="required")
    p.add_argument("--port", type=int, default=0, help="broker port (0: pick a free one)")
    p.add_argument("--fog-id", default=FOG_ID_DEFAULT)
    p.add_argument(
        "--broker",
        choices=BROKERS,
        default="amqtt",
        help="amqtt (embedded, the default) or mosquitto (the shipped configs, a child process)",
    )
    p.add_argument("--console", action="store_true", help="human log lines instead of JSON")
    p.set_defaults(func=cmd_sandbox)
    actions = p.add_subparsers(dest="action", metavar="{credentials}")
    c = actions.add_parser("credentials", help="a device's broker login, as JSON")
    c.add_argument("--dir", required=True, type=Path)
    c.add_argument("--device", required=True, help="the device's public key, 64 hex characters")
    c.set_defaults(func=cmd_credentials)


def credentials(directory: Path, device: bytes) -> dict[str, str]:
    """The broker login of ``device`` in the sandbox DIR (protocol.login)."""
    secret = login_secret(directory)
    return {"username": device_username(device), "password": device_password(secret, device)}


def cmd_credentials(args: argparse.Namespace) -> int:
    text: str = args.device.strip().lower()
    try:
        device = bytes.fromhex(text)
    except ValueError:
        device = b""
    if len(text) != 64 or not is_valid_public_key(device):
        return fail(
            "sandbox credentials", "--device: not a 64-hex Ed25519 public key", code=EXIT_USAGE
        )
    try:
        login = credentials(args.dir, device)
    except (OSError, FogpayError) as exc:
        return fail("sandbox credentials", str(exc), code=EXIT_USAGE)
    print(json.dumps(login))
    return 0


def cmd_sandbox(args: argparse.Namespace) -> int:
    if args.dir is None:
        return fail("sandbox", "--dir DIR is required", code=EXIT_USAGE)
    configure(json=not args.console, component="sandbox")
    directory: Path = args.dir
    try:
        asyncio.run(run_sandbox(directory, port=args.port, fog_id=args.fog_id, broker=args.broker))
    except (ConfigError, KeyFileError, OSError, FogpayError) as exc:
        # 2: DIR or a file in it is unusable; 1: a component did not start, the fog's key is
        # not the cloud's (runtime.cli)
        return report("sandbox", exc, (ConfigError, StoreOpenError))
    except sqlite3.Error as exc:  # DIR/cloud.sqlite is not a database
        return fail("sandbox", f"{directory / CLOUD_DB_FILE}: {exc}", code=EXIT_USAGE)
    return 0
