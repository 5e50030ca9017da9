"""``fogpay edge simulate`` (load simulator), ``fogpay edge pay`` (one payment) and ``fogpay
edge upload`` (hand the receipts a device holds to the cloud, docs/protocol.md 17.7; and the
device-to-device payments a payee holds, 18.3). ``voucher``, ``d2d-pay`` and ``d2d-accept``
are in ``fogpay/edge_d2d_cli.py``.

Both talk to a fog given either as ``--sandbox DIR`` (reads DIR/sandbox.json; the simulator
then registers its devices in the sandbox's cloud registry, DIR/cloud.sqlite: an owner, one
binding per device with its proof of possession, a lease within the owner's credit; the
sandbox's cloud service publishes them, the simulator publishes no trust itself) or as
``--broker URL --fog-id ID --fog-key HEX`` (devices registered by someone else, e.g. with
``fogpay cloud device bind``, or by hand for a standalone fog with ``fogpay device bind``).
"""

import argparse
import asyncio
import contextlib
import json
import random
import secrets
import sys
import tempfile
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import aiomqtt
import nacl.signing

from edge.device import (
    PAY_TIMEOUT_S_DEFAULT,
    RETRIES_MAX_DEFAULT,
    Device,
    DeviceSession,
    PaymentDeclined,
    PaymentError,
)
from edge.simulate import Payment, Summary, arrival_offsets_s, run_load
from fogpay import edge_d2d_cli
from fogpay.provision import (
    BrokerAddress,
    ProvisionError,
    Publication,
    Validity,
    binding_body,
    device_binding,
    lease,
    load_or_create_key,
    make_binding,
    now_ms,
    owner_credential,
    parse_broker_url,
    publish_retained,
)
from protocol.errors import Declined, FogpayError
from protocol.signing import is_valid_public_key, public_key, seal
from runtime.cli import EXIT_USAGE, UsageError, fail, json_option, report
from runtime.keyfile import KeyFileError, load_key_file
from runtime.logs import configure

CONNECT_TIMEOUT_S: Final = 10.0
READY_TIMEOUT_S: Final = 30.0
READY_PROBE_TIMEOUT_S: Final = 2.0
READY_PROBES_MAX: Final = 60
READY_PROBE_PAUSE_S: Final = 0.1
DEVICES_MAX: Final = 100_000
CONNECTIONS_MAX: Final = 64
OWNER_ID_DEFAULT: Final = "sim-owner"
VALIDITY_DAYS: Final = 30.0


@dataclass(frozen=True, slots=True)
class Target:
    broker: BrokerAddress
    fog_id: str
    fog_key: bytes
    issuer: nacl.signing.SigningKey | None  # sandbox mode: we may provision
    cloud_db: Path | None = None  # sandbox mode: its cloud's registry (SQLite), the one writer


def target_from_args(args: argparse.Namespace) -> Target:
    if args.sandbox is not None:
        from fogpay.sandbox import SANDBOX_JSON, SandboxInfo

        path = Path(args.sandbox)
        directory = path if path.is_dir() else path.parent
        file = directory / SANDBOX_JSON if path.is_dir() else path
        if not file.is_file():
            why = f"no {file.name} in it" if path.is_dir() else "no such file or directory"
            raise UsageError(
                f"--sandbox {args.sandbox}: {why} (is `fogpay sandbox --dir DIR` running?)"
            )
        try:
            info = SandboxInfo.load(file)
        except OSError as exc:
            raise UsageError(f"--sandbox {file}: {exc.strerror}") from None
        except FogpayError as exc:
            raise UsageError(f"--sandbox {exc}") from None
        issuer = load_key_file(directory / info.issuer_seed_file)
        cloud_db = None if info.cloud_db is None else directory / info.cloud_db
        return Target(info.broker, info.fog_id, info.fog_key, issuer, cloud_db)
    if args.broker is None or args.fog_id is None or args.fog_key is None:
        raise UsageError("target: give --sandbox DIR, or --broker, --fog-id and --fog-key")
    try:
        fog_key = bytes.fromhex(args.fog_key)
    except ValueError:
        raise UsageError("--fog-key: not hex") from None
    if not is_valid_public_key(fog_key):
        raise UsageError("--fog-key: not a valid Ed25519 public key")
    seed = getattr(args, "issuer_key", None)
    signer = load_key_file(seed) if seed else None
    return Target(parse_broker_url(args.broker), args.fog_id, fog_key, signer)


@contextlib.asynccontextmanager
async def connected(broker: BrokerAddress, name: str) -> AsyncIterator[aiomqtt.Client]:
    client = broker.client(identifier=f"fogpay-{name}-{secrets.token_hex(4)}")
    async with asyncio.timeout(CONNECT_TIMEOUT_S):
        await broker.connect(client)
    try:
        yield client
    finally:
        await client.__aexit__(None, None, None)


def provision_publications(
    issuer: nacl.signing.SigningKey,
    owner: nacl.signing.SigningKey,
    devices: Sequence[Device],
    *,
    owner_id: str,
    fog_id: str,
    currency: str,
    lease_micros: int,
    tx_max_micros: int,
) -> list[Publication]:
    """Owner credential, one binding per device (each proving possession), and one lease,
    in that order: a fog that has the lease has everything before it."""
    validity = Validity.days(VALIDITY_DAYS, now=now_ms())
    pubs = [
        owner_credential(
            issuer, owner_id=owner_id, owner_key=owner.verify_key.encode(), validity=validity
        )
    ]
    for d in devices:
        b = make_binding(
            d.public_key,
            owner_id=owner_id,
            currency=currency,
            tx_max_micros=tx_max_micros,
            day_max_micros=lease_micros,
            validity=validity,
        )
        pubs.append(device_binding(owner, b, proof=d.prove_possession(binding_body(b))))
    pubs.append(
        lease(
            issuer,
            owner_id=owner_id,
            fog_id=fog_id,
            amount_micros=lease_micros,
            currency=currency,
            not_after_ms=validity.not_after_ms,
        )
    )
    return pubs


async def wait_until_payable(session: DeviceSession, device: Device, payment: Payment) -> None:
    """Pay with ``device`` until the fog knows its binding and lease (transient declines)."""
    for _ in range(READY_PROBES_MAX):
        try:
            await session.pay(
                device,
                payment.payee_id,
                payment.amount_micros,
                payment.currency,
                timeout_s=READY_PROBE_TIMEOUT_S,
                retries_max=0,
            )
            return
        except PaymentDeclined as exc:
            if not exc.reason.transient:
                raise
        await asyncio.sleep(READY_PROBE_PAUSE_S)
    raise FogpayError("the fog never accepted the provisioned devices")


def open_devices(directory: Path, n: int, target: Target) -> list[Device]:
    assert 1 <= n <= DEVICES_MAX
    return [
        Device.open(directory / f"dev-{i:05d}", fog_id=target.fog_id, fog_key=target.fog_key)
        for i in range(n)
    ]


async def simulate(args: argparse.Namespace, devices_dir: Path) -> Summary:
    target = target_from_args(args)
    devices = open_devices(devices_dir, args.devices, target)
    payment = Payment(
        payee_id=args.payee,
        amount_micros=args.amount,
        currency=args.currency,
        timeout_s=args.timeout,
        retries_max=args.retries,
    )
    async with contextlib.AsyncExitStack() as stack:
        sessions = []
        for k in range(args.connections):
            client = await stack.enter_async_context(connected(target.broker, f"sim{k}"))
            session = DeviceSession(
                client, fog_id=target.fog_id, fog_key=target.fog_key, wildcard=True
            )
            sessions.append(await stack.enter_async_context(session))
        if target.issuer is not None and not args.no_provision:
            await _provision(args, target, devices, devices_dir, sessions[0], payment)
        offsets = arrival_offsets_s(
            args.rate,
            duration_s=args.duration,
            count=args.count,
            poisson=args.poisson,
            rng=random.Random(args.seed),
        )
        progress = None if args.json else _print_progress
        return await run_load(sessions, devices, payment, offsets, progress=progress)
    raise AssertionError("unreachable")


async def _provision(
    args: argparse.Namespace,
    target: Target,
    devices: Sequence[Device],
    devices_dir: Path,
    session: DeviceSession,
    payment: Payment,
) -> None:
    assert target.issuer is not None
    owner = load_or_create_key(devices_dir / "owner.key")
    lease_micros = (
        args.lease or args.amount * (args.count or int(args.rate * args.duration) + 1) * 2
    )
    pubs = (
        []
        if target.cloud_db is not None
        else provision_publications(
            target.issuer,
            owner,
            devices,
            owner_id=args.owner_id,
            fog_id=target.fog_id,
            currency=args.currency,
            lease_micros=lease_micros + args.amount,
            tx_max_micros=args.amount,
        )
    )
    if target.cloud_db is not None:  # the sandbox's cloud registers and publishes them
        await register_in_cloud(
            target.cloud_db,
            target.issuer,
            owner,
            devices,
            owner_id=args.owner_id,
            fog_id=target.fog_id,
            currency=args.currency,
            lease_micros=lease_micros + args.amount,
            tx_max_micros=args.amount,
        )
    else:  # --broker with --issuer-key: a standalone fog, no cloud to register with
        await publish_retained(target.broker, pubs)
    async with asyncio.timeout(READY_TIMEOUT_S):
        await wait_until_payable(session, devices[-1], payment)


async def register_in_cloud(
    cloud_db: Path,
    issuer: nacl.signing.SigningKey,
    owner: nacl.signing.SigningKey,
    devices: Sequence[Device],
    *,
    owner_id: str,
    fog_id: str,
    currency: str,
    lease_micros: int,
    tx_max_micros: int,
) -> None:
    """Register the simulator's owner, its devices' bindings (each with its proof of
    possession) and one lease in the sandbox's cloud registry, in one transaction, with the
    registry's checks; the sandbox's cloud service then publishes them retained (within
    about a second). An owner id registered under another key is refused: its devices
    would pay at the fog under trust the cloud never registered. The simulator stands in for
    its owner's credit officer: the owner's credit limit is raised to cover the run."""
    from cloud import leases, registry
    from cloud.errors import RegistryError
    from cloud.sqlitestore import SqliteStore
    from cloud.store import Tx

    owner_key = public_key(owner)
    now = now_ms()
    validity = Validity.days(VALIDITY_DAYS, now=now)

    async def fn(tx: Tx) -> None:
        known = await registry.get_owner(tx, owner_id)
        if known is None:
            await registry.add_owner(
                tx,
                issuer,
                owner_id=owner_id,
                key=owner_key,
                limit_micros=lease_micros,
                currency=currency,
                funding_ref="",
                now_ms=now,
            )
        elif known.key != owner_key:
            raise ProvisionError(
                f"owner {owner_id!r} is registered in the sandbox's cloud with another key "
                "(give its first run's --devices-dir, or another --owner-id)"
            )
        else:
            short = lease_micros - await leases.available(tx, owner_id)
            if short > 0:
                await registry.set_limit(tx, owner_id, known.limit_micros + short)
        for d in devices:
            b = make_binding(
                d.public_key,
                owner_id=owner_id,
                currency=currency,
                tx_max_micros=tx_max_micros,
                day_max_micros=lease_micros,
                validity=validity,
            )
            proof = d.prove_possession(binding_body(b))
            await registry.bind_device(tx, seal(b, owner), proof, now_ms=now)
        policy = leases.LeasePolicy(
            initial_micros=min(lease_micros, leases.LeasePolicy().initial_micros),
            request_micros_max=lease_micros,
        )
        await leases.grant(
            tx,
            issuer,
            owner_id=owner_id,
            fog_id=fog_id,
            amount_micros=lease_micros,
            now_ms=now,
            policy=policy,
        )

    store = await SqliteStore.open(str(cloud_db))
    try:
        await store.transact(fn)
    except (RegistryError, Declined) as exc:
        raise ProvisionError(f"the sandbox's cloud registry refused: {exc}") from exc
    finally:
        await store.close()


def _print_progress(summary: Summary) -> None:
    print(summary.progress_line(), file=sys.stderr, flush=True)


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    edge = sub.add_parser("edge", help="device side: load simulator, single payments")
    cmds = edge.add_subparsers(dest="edge_command", required=True, metavar="COMMAND")
    p = cmds.add_parser("simulate", help="many simulated devices paying through one fog")
    _target_args(p)
    p.add_argument("--devices", type=int, default=10)
    p.add_argument("--rate", type=float, default=10.0, help="intents per second, all devices")
    p.add_argument("--duration", type=float, help="seconds")
    p.add_argument("--count", type=int, help="total intents")
    p.add_argument("--poisson", action="store_true", help="Poisson arrivals (default: even)")
    p.add_argument("--seed", type=int)
    p.add_argument("--devices-dir", type=Path, help="device state dirs (default: a temp dir)")
    p.add_argument("--connections", type=int, default=1)
    p.add_argument("--lease", type=int, help="when provisioning: lease micros (default: enough)")
    p.add_argument("--owner-id", default=OWNER_ID_DEFAULT)
    p.add_argument("--issuer-key", type=Path, help="with --broker: provision with this issuer")
    p.add_argument("--no-provision", action="store_true", help="devices are already bound")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    p.set_defaults(func=cmd_simulate)
    p = cmds.add_parser(
        "pay",
        help="one payment from the device whose state is in --state (prints JSON)",
        parents=[json_option()],
    )
    _target_args(p)
    p.add_argument("--state", required=True, type=Path, help="device state dir")
    p.add_argument("--memo", help="memo (text, <= 64 bytes)")
    p.set_defaults(func=cmd_pay)
    p = cmds.add_parser(
        "upload",
        help="hand the receipts the device in --state holds to the cloud (prints JSON)",
        parents=[json_option()],
    )
    _target_args(p)
    p.add_argument("--state", required=True, type=Path, help="device state dir")
    p.add_argument("--issuer", help="the issuer's public key (hex); --sandbox gives it")
    p.set_defaults(func=cmd_upload)
    # voucher, d2d-pay, d2d-accept (docs/protocol.md 18.3)
    edge_d2d_cli.register(
        cmds, edge_d2d_cli.Helpers(_target_args, target_from_args, connected, _error)
    )


def _target_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sandbox", help="sandbox DIR (or its sandbox.json)")
    p.add_argument(
        "--broker", help="mqtt://[user:pass@]127.0.0.1:PORT or mqtts://HOST:PORT?ca_file=CA.pem"
    )
    p.add_argument("--fog-id")
    p.add_argument("--fog-key", help="fog public key (hex)")
    p.add_argument("--payee", default="shop-1")
    p.add_argument("--amount", type=int, default=1_000, help="micros per intent")
    p.add_argument("--currency", default="EUR")
    p.add_argument("--timeout", type=float, default=PAY_TIMEOUT_S_DEFAULT, help="seconds")
    p.add_argument("--retries", type=int, default=RETRIES_MAX_DEFAULT)
    p.add_argument("--log-level", default="warning", choices=("debug", "info", "warning"))


# A bad --broker URL (ProvisionError from parse_broker_url) is a usage error too.
USAGE_ERRORS: Final = (ProvisionError, ValueError)


def _error(what: str, exc: BaseException) -> int:
    """One line; 2 for a usage or configuration error, 1 for a failure (runtime.cli)."""
    return report(f"edge {what}", exc, USAGE_ERRORS)


def cmd_simulate(args: argparse.Namespace) -> int:
    configure(json=False, level=args.log_level, stream=sys.stderr, component="edge")
    if args.duration is None and args.count is None:
        return fail("edge simulate", "give --duration or --count", code=EXIT_USAGE)
    if not 1 <= args.connections <= CONNECTIONS_MAX or not 1 <= args.devices <= DEVICES_MAX:
        why = f"--connections in [1, {CONNECTIONS_MAX}], --devices in [1, {DEVICES_MAX}]"
        return fail("edge simulate", why, code=EXIT_USAGE)
    try:
        with contextlib.ExitStack() as stack:
            devices_dir = args.devices_dir or Path(
                stack.enter_context(tempfile.TemporaryDirectory())
            )
            summary = asyncio.run(simulate(args, devices_dir))
    except (FogpayError, KeyFileError, aiomqtt.MqttError, TimeoutError, OSError) as exc:
        return _error("simulate", exc)
    print(json.dumps(summary.to_dict(), sort_keys=True) if args.json else summary.table())
    return 0


async def pay_once(args: argparse.Namespace) -> dict[str, Any]:
    target = target_from_args(args)
    device = Device.open(args.state, fog_id=target.fog_id, fog_key=target.fog_key)
    memo = args.memo.encode() if args.memo else None
    async with connected(target.broker, "pay") as client:
        try:
            receipt = await device.pay(
                client,
                args.payee,
                args.amount,
                args.currency,
                memo=memo,
                timeout_s=args.timeout,
                retries_max=args.retries,
            )
        except PaymentDeclined as exc:
            return {"status": "declined", "reason": str(exc.reason), "device": device.key_hex}
    r = receipt.msg
    return {
        "status": "ok",
        "device": device.key_hex,
        "intent": r.intent_id.hex(),
        "seq": r.seq,
        "log_index": r.log_index,
        "lease": r.lease_id.hex() if r.lease_id else None,
    }


async def upload_once(args: argparse.Namespace) -> dict[str, Any]:
    target = target_from_args(args)
    if args.issuer is not None:
        try:
            issuer_key = bytes.fromhex(args.issuer)
        except ValueError:
            raise UsageError("--issuer: not hex") from None
    elif target.issuer is not None:
        issuer_key = public_key(target.issuer)
    else:
        raise UsageError("--issuer: the issuer's public key is needed to check its answers")
    if not is_valid_public_key(issuer_key):
        raise UsageError("--issuer: not a valid Ed25519 public key")
    device = Device.open(args.state, fog_id=target.fog_id, fog_key=target.fog_key)
    held = len(device.held_records())
    if held == 0:
        return {"device": device.key_hex, "sent": 0, "booked": 0, "refused": [], "held": 0}
    async with connected(target.broker, "upload") as client:
        result = await device.upload_held(
            client, issuer_key=issuer_key, timeout_s=args.timeout, retries_max=args.retries
        )
    return {
        "device": device.key_hex,
        "sent": held,
        "booked": len(result.booked),
        "refused": [{"intent": i.hex(), "fault": f} for i, f in result.refused],
        "unanswered": result.unanswered,
        "held": result.held,
    }


def cmd_upload(args: argparse.Namespace) -> int:
    """Exit 0 when the cloud answered every record held, 1 otherwise (no answer: the cloud
    or the bridge to it is unreachable; the records stay held for the next upload)."""
    configure(json=False, level=args.log_level, stream=sys.stderr, component="edge")
    try:
        result = asyncio.run(upload_once(args))
    except (FogpayError, KeyFileError, aiomqtt.MqttError, OSError) as exc:
        return _error("upload", exc)
    print(json.dumps(result, sort_keys=True))
    return 0 if result.get("unanswered", 0) == 0 else 1


def cmd_pay(args: argparse.Namespace) -> int:
    configure(json=False, level=args.log_level, stream=sys.stderr, component="edge")
    try:
        result = asyncio.run(pay_once(args))
    except (PaymentError, FogpayError, KeyFileError, aiomqtt.MqttError, OSError) as exc:
        return _error("pay", exc)
    print(json.dumps(result, sort_keys=True))
    return 0 if result["status"] == "ok" else 1
