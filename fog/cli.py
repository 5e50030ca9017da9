"""``fogpay fog ...``: run the fog daemon (``fogpay fog run --config FILE``), check a config
(``fogpay fog check-config --config FILE [--json]``), rebuild a fog that lost its disk from
its peers (``fogpay fog restore --config FILE [--wait-s 10]``, fog/restorecli.py), or give
leases back early (``fogpay fog return-leases --config FILE [--owner O] [--json]``,
docs/protocol.md 18.1).
``--config`` goes before or after the subcommand. Exit codes and the one error line follow
``runtime.cli``: 2 for a configuration the fog cannot start with (the file, a key or password
file, a database it cannot open), 1 for a failure while running (the broker lost, a store
process died).
"""

import argparse
import asyncio
import gc
import os
import signal
import socket
import sqlite3
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import aiomqtt
import structlog

from fog import returns
from fog.config import ConfigError, FogConfig, broker_tls, load_config, parse_broker_url
from fog.schema import MIGRATIONS, StoreOpenError, connect, schema_version
from protocol.errors import FogpayError
from runtime.cli import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    config_option,
    fail,
    json_option,
    print_json,
    report,
)
from runtime.keyfile import KeyFileError, load_key_file
from runtime.logs import configure, route_stdlib_logging
from runtime.mqttshell import BrokerTlsError, ClientSettings, client_for, connect_client

log = structlog.get_logger()

USAGE_ERRORS: Final = (ConfigError, StoreOpenError)
BROKER_CHECK_TIMEOUT_S: Final = 5.0
RESTORE_WAIT_S: Final = 10.0


def register(subparsers: Any) -> None:
    config = config_option("fog config TOML (docs/fog.md)")
    parser = subparsers.add_parser("fog", help="the fog daemon", parents=[config])
    sub = parser.add_subparsers(dest="fog_command", required=True, metavar="FOG_COMMAND")
    run = sub.add_parser("run", help="run the fog daemon until SIGTERM", parents=[config])
    run.add_argument("--console", action="store_true", help="human log lines instead of JSON")
    run.set_defaults(func=cmd_run)
    check = sub.add_parser(
        "check-config",
        help="check a config, its key, database and broker, then exit",
        parents=[config, json_option()],
    )
    check.add_argument(
        "--skip-broker",
        action="store_true",
        help="do not check the broker (e.g. before a broker that starts alongside)",
    )
    check.set_defaults(func=cmd_check)
    give = sub.add_parser(
        "return-leases",
        help="give the live leases back to the cloud now (of one owner, or all); works "
        "while the fog runs",
        parents=[config, json_option()],
    )
    give.add_argument("--owner", metavar="OWNER_ID", help="only this owner's leases")
    give.set_defaults(func=cmd_return_leases)
    restore = sub.add_parser(
        "restore",
        help="rebuild a lost database from the peers' replicas (docs/fog.md), then exit",
        parents=[config, json_option()],
    )
    restore.add_argument(
        "--wait-s",
        type=float,
        default=RESTORE_WAIT_S,
        help="how long to gather the peers' answers, at most (default 10)",
    )
    restore.set_defaults(func=cmd_restore)


def _config_path(args: argparse.Namespace) -> str | None:
    """``--config``, given before or after the subcommand; None when given nowhere."""
    path: str | None = getattr(args, "config", None)
    return path


def _config_problem(path: str, exc: Exception) -> str:
    """A config or key file error as ``<file>: <why>`` (naming the file once)."""
    text = str(exc).removeprefix("config: ")
    return text if path in text else f"{path}: {text}"


def _load(path: str) -> FogConfig:
    """The config and its key file; raises ConfigError or KeyFileError."""
    config = load_config(path)
    load_key_file(config.key_file)
    return config


@dataclass(frozen=True, slots=True)
class Check:
    name: str  # config, database, broker
    ok: bool | None  # None: not checked (the config did not load)
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "detail": self.detail}

    def line(self) -> str:
        state = {True: "ok", False: "fail", None: "skip"}[self.ok]
        return f"{state:<5}{self.name:<10}{self.detail}"


def check_database(path: Path) -> Check:
    """Open the database read-write and read its schema version; a missing one is not
    created: its directory must take a new file (probed with a temporary file, removed)."""
    try:
        if not path.exists():
            with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".fogpay-check-"):
                pass
            return Check(
                "database", True, f"{path}: new, created at start (schema v{len(MIGRATIONS)})"
            )
        if not os.access(path, os.R_OK | os.W_OK):
            return Check("database", False, f"{path}: not readable and writable by this user")
        conn = connect(path)
        try:
            version = schema_version(conn)
        finally:
            conn.close()
    except StoreOpenError as exc:
        return Check("database", False, str(exc).removeprefix("database "))
    except OSError as exc:  # the probe: no such directory, not writable
        return Check("database", False, f"{path}: directory {path.parent}: {exc.strerror}")
    except sqlite3.Error as exc:
        return Check("database", False, f"{path}: {exc}")
    if version > len(MIGRATIONS):
        return Check("database", False, f"{path}: schema v{version} is newer than this fogpay")
    todo = "" if version == len(MIGRATIONS) else f", migrated to v{len(MIGRATIONS)} at start"
    return Check("database", True, f"{path}: schema v{version}{todo}")


def check_broker(config: FogConfig) -> Check:
    """Embedded: bind its address and release it. External: an MQTT connect with the
    configured credentials, within BROKER_CHECK_TIMEOUT_S."""
    b = config.broker
    if b.url is None:
        where = f"embedded {b.host}:{b.port}"
        try:
            family, kind, proto, _, address = socket.getaddrinfo(
                b.host, b.port, type=socket.SOCK_STREAM
            )[0]
            with socket.socket(family, kind, proto) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio does
                sock.bind(address)
        except OSError as exc:
            return Check("broker", False, f"{where}: cannot listen: {exc.strerror or exc}")
        return Check("broker", True, f"{where}: can listen")
    addr = parse_broker_url(b.url)
    settings = ClientSettings(
        hostname=addr.host,
        port=addr.port,
        username=addr.username,
        password=addr.password,
        identifier_prefix=f"fogpay-check-{os.getpid()}",
        connect_timeout_s=BROKER_CHECK_TIMEOUT_S,
        tls=broker_tls(b) if addr.tls else None,
    )
    where = settings.url
    try:
        asyncio.run(_connect_once(settings))
    except BrokerTlsError as exc:
        return Check("broker", False, str(exc))
    except (aiomqtt.MqttError, OSError) as exc:
        why = "no answer" if isinstance(exc, TimeoutError) else (str(exc) or type(exc).__name__)
        return Check("broker", False, f"{where}: cannot connect: {why}")
    return Check("broker", True, f"{where}: connected as {addr.username or '(anonymous)'}")


async def _connect_once(settings: ClientSettings) -> None:
    async with asyncio.timeout(BROKER_CHECK_TIMEOUT_S):
        client = client_for(settings)
        await connect_client(client, settings)
        await client.__aexit__(None, None, None)


def run_checks(path: str, *, broker: bool = True) -> list[Check]:
    try:
        config = _load(path)
    except (ConfigError, KeyFileError) as exc:
        skipped = [Check(name, None, "config did not load") for name in ("database", "broker")]
        return [Check("config", False, _config_problem(path, exc)), *skipped]
    where = "external broker" if config.broker.url else "embedded broker"
    return [
        Check("config", True, f"{path}: fog {config.fog_id}, key {config.key_file}, {where}"),
        check_database(config.db),
        check_broker(config) if broker else Check("broker", None, "skipped (--skip-broker)"),
    ]


def cmd_check(args: argparse.Namespace) -> int:
    """0 when every check passes; 2 when the config, its key or the database fails (fix the
    configuration); 1 when only the broker check fails (the broker may just be down)."""
    path = _config_path(args)
    if path is None:
        return fail("fog check-config", "--config FILE is required", code=EXIT_USAGE)
    checks = run_checks(path, broker=not args.skip_broker)
    failed = {c.name for c in checks if c.ok is False}
    code = EXIT_USAGE if failed - {"broker"} else EXIT_FAILURE if failed else EXIT_OK
    if args.json:
        print_json({"ok": code == EXIT_OK, "checks": [c.to_json() for c in checks]})
    else:
        for c in checks:
            print(c.line())
    failing = [c for c in checks if c.ok is False]
    if failing:  # the report is data on stdout; the verdict is the usual one line on stderr
        fail("fog check-config", f"{failing[0].name}: {failing[0].detail}", code=code)
    return code


def cmd_return_leases(args: argparse.Namespace) -> int:
    """Retire the live leases (of ``--owner``) in the fog's database, for good (fog/returns.py):
    a running fog stops drawing on them at its next group and reports them at its next lease
    round; a stopped fog reports them when it starts. Exit 0 (also when nothing was live), 2
    for a config or database that cannot be used, 1 when the database is busy or fails."""
    what = "fog return-leases"
    path = _config_path(args)
    if path is None:
        return fail(what, "--config FILE is required", code=EXIT_USAGE)
    try:
        config = load_config(path)
    except ConfigError as exc:
        return fail(what, _config_problem(path, exc), code=EXIT_USAGE)
    if not config.db.exists():
        return fail(what, f"{config.db}: no such database (the fog never ran)", code=EXIT_USAGE)
    try:
        conn = connect(config.db)
    except StoreOpenError as exc:
        return fail(what, str(exc), code=EXIT_USAGE)
    try:
        if not returns.has_tables(conn):
            return fail(what, f"{config.db}: not a fog database with leases", code=EXIT_USAGE)
        returns.init(conn)
        owners = None if args.owner is None else [args.owner]
        now_ms = time.time_ns() // 1_000_000
        retired = returns.retire(conn, now_ms=now_ms, reason="operator", owner_ids=owners)
    except sqlite3.Error as exc:
        return fail(what, f"{config.db}: {exc}", code=EXIT_FAILURE)
    finally:
        conn.close()
    total = sum(r.room_micros for r in retired)
    rows = [
        {
            "lease": r.lease_id.hex(),
            "owner": r.owner_id,
            "currency": r.currency,
            "amount_micros": r.amount_micros,
            "drawn_micros": r.drawn_micros,
            "returned_micros": r.room_micros,
        }
        for r in retired
    ]
    if args.json:
        print_json({"fog_id": config.fog_id, "leases": rows, "returned_micros": total})
        return EXIT_OK
    for row in rows:
        print(
            f"{row['lease']}  {row['owner']}  {row['currency']}  drawn {row['drawn_micros']}"
            f"  returned {row['returned_micros']}"
        )
    print(f"{len(rows)} lease(s) retired, {total} micros to return once the cloud closes them")
    return EXIT_OK


def cmd_restore(args: argparse.Namespace) -> int:
    """0: restored (start the fog as usual); 2: no config, no peers, or the database exists;
    1: the chain head is lost (the fog needs a new fog_id) or the broker failed."""
    path = _config_path(args)
    if path is None:
        return fail("fog restore", "--config FILE is required", code=EXIT_USAGE)
    try:
        config = _load(path)
        key = load_key_file(config.key_file)
    except (ConfigError, KeyFileError) as exc:
        return fail("fog restore", _config_problem(path, exc), code=EXIT_USAGE)
    if not config.federation.peers:
        return fail("fog restore", f"{path}: federation.peers is empty", code=EXIT_USAGE)
    if config.db.exists():
        why = f"database {config.db} exists: restore only creates a lost one (move it away)"
        return fail("fog restore", why, code=EXIT_USAGE)
    if not 0 < args.wait_s <= 3_600:
        return fail("fog restore", "--wait-s must be in (0, 3600]", code=EXIT_USAGE)
    # log lines to stderr: stdout carries the summary (--json: one JSON document)
    configure(json=True, level=config.log_level, component="fog", stream=sys.stderr)
    from fog import restore, restorecli  # the store and amqtt: only when restoring

    try:
        done = asyncio.run(restorecli.restore_fog(config, key, wait_s=args.wait_s))
    except restore.RestoreError as exc:
        log.error("fog_restore_refused", error=str(exc))
        return fail("fog restore", str(exc), code=EXIT_FAILURE)
    except (aiomqtt.MqttError, OSError, FogpayError) as exc:
        log.error("fog_restore_failed", error=str(exc))
        return report("fog restore", exc, USAGE_ERRORS)
    log.info(
        "fog_restored",
        batches=done.batches,
        head=done.head,
        records=done.records,
        cloud_acked=done.cloud_acked,
        leases_retired=done.leases_retired,
    )
    summary = {
        "fog_id": config.fog_id,
        "batches": done.batches,
        "head": done.head,
        "records": done.records,
        "cloud_acked": done.cloud_acked,
        "leases_retired": done.leases_retired,
        "refused": done.refused,
    }
    if done.batches == 0:  # a new fog, or no peer reachable: the operator must know which
        print(
            "fogpay: fog restore: no peer sent a batch: if this fog ever sealed one, check "
            "that its peers run and reach its broker, move the new database away and restore "
            "again",
            file=sys.stderr,
        )
    if args.json:
        print_json(summary)
    else:
        print(
            f"restored {config.fog_id}: {done.records} records in {done.batches} batches "
            f"(head {done.head}, cloud ack {done.cloud_acked}); {done.leases_retired} leases "
            f"retired; start the fog: it continues after batch {done.head}"
        )
    return EXIT_OK


# The event loop (MQTT) and the store thread (verify, SQLite, sign) share the GIL. At the
# default 5 ms switch interval a thread that wants the GIL back can wait a whole interval, and
# that wait was most of a receipt's latency (bench/fog.py: p50 7 ms at 1,000 intents/s).
GIL_SWITCH_INTERVAL_S: Final = 0.00005


def cmd_run(args: argparse.Namespace) -> int:
    path = _config_path(args)
    if path is None:
        return fail("fog run", "--config FILE is required", code=EXIT_USAGE)
    try:
        config = _load(path)
    except (ConfigError, KeyFileError) as exc:
        return fail("fog run", _config_problem(path, exc), code=EXIT_USAGE)
    configure(json=not args.console, level=config.log_level, component="fog")
    route_stdlib_logging(json=not args.console, component="fog")
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    try:
        asyncio.run(run_until_signal(config))
    except BaseException as exc:  # operating errors: one line, no traceback; bugs re-raise
        error = operating_error(exc)
        if error is None:
            raise
        log.error("fog_failed", error=str(error))
        return report("fog run", error, USAGE_ERRORS)
    return EXIT_OK


OPERATING_ERRORS: Final = (FogpayError, KeyFileError, aiomqtt.MqttError, OSError)


def operating_error(exc: BaseException) -> BaseException | None:
    """The operating error behind ``exc`` (looking into a TaskGroup's exception group, whose
    leaves must all be operating errors or cancellations), or None for a bug."""
    if isinstance(exc, OPERATING_ERRORS):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        leaves = [operating_error(e) for e in exc.exceptions]
        if leaves and all(leaf is not None for leaf in leaves):
            return leaves[0]
    return None


async def run_until_signal(config: FogConfig) -> None:
    """Run the daemon; SIGTERM or SIGINT stop it gracefully (the group in flight finishes)."""
    from fog.daemon import FogDaemon  # imports the store and amqtt: only when running

    daemon = FogDaemon(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _on_signal, daemon, sig)
    ready = asyncio.Event()
    freezer = loop.create_task(_freeze_when(ready), name="fog.gc_freeze")
    try:
        await daemon.run(ready=ready)
    finally:
        freezer.cancel()


async def _freeze_when(ready: asyncio.Event) -> None:
    """Once serving, move everything alive (modules, code, config, trust) out of the garbage
    collector's reach: a full collection then walks only what was made since, instead of
    stalling the process for 30-50 ms (seen under load: gc_gen2 p50 33 ms, which alone put the
    p99 latency at 1,000 intents/s far above 10 ms)."""
    await ready.wait()
    gc.collect()
    gc.freeze()
    log.info("gc_frozen", objects=gc.get_freeze_count())
    _trim_heap()


def _trim_heap() -> None:
    """Give the C heap's free pages back to the system (glibc's ``malloc_trim``): start-up
    leaves megabytes freed but resident (with 10,000 devices the trust republished is 12,000
    messages, 3 MB of wire through this process; bench/memory.py). Elsewhere: nothing."""
    import ctypes

    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return
    trim(0)


def _on_signal(daemon: Any, sig: signal.Signals) -> None:
    log.info("signal_received", signal=sig.name)
    asyncio.get_running_loop().create_task(daemon.stop(), name="fog.stop")
