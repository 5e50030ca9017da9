"""``fogpay cloud ...`` over the cloud's store, and ``fogpay verify-receipt FILE``.

Every command opens the configured store (``--store`` / ``--config``: SQLite by default,
PostgreSQL by DSN), runs one transaction, prints JSON, and exits 0 on success, 1 when the
request is refused or fails (the reason is printed on stderr as one line), 2 on a usage or
configuration error (a bad option value, the config file, the issuer key file, a store that
cannot be opened or has an unknown URL scheme); see ``runtime.cli``.
"""

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeAlias, TypeVar

import nacl.signing

from cloud import config as cloud_config
from cloud import leases, ledger, registry, transfers, vouchers
from cloud.backends import StoreOpenError, open_store
from cloud.bound import Bound, owner_bound
from cloud.proof import ProofError, build_proof, verify_proof
from cloud.schema import SchemaError
from cloud.store import Store, Tx
from protocol.errors import FogpayError
from protocol.signing import public_key
from runtime import logs
from runtime.cli import UsageError, report
from runtime.keyfile import KeyFileError, load_key_file, new_key_file

T = TypeVar("T")
Sub: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


TIME_MS_MAX = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z: what a date can name


def parse_time_ms(text: str) -> int:
    """Milliseconds since the epoch, or an ISO 8601 time (UTC when no offset is given)."""
    if text.isdigit():
        ms = int(text)
    else:
        when = datetime.fromisoformat(text)
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        ms = int(when.timestamp() * 1000)
    if not 0 <= ms <= TIME_MS_MAX:
        raise ValueError(f"time {text!r} outside 1970..9999")
    return ms


def hex_arg(text: str, name: str = "argument") -> bytes:
    """Hex, or ``@PATH`` of a file holding hex (or raw bytes if it is not hex). Raises
    UsageError naming the option when it is neither."""
    if text.startswith("@"):
        data = Path(text[1:]).read_bytes()
        try:
            return bytes.fromhex(data.decode().strip())
        except (UnicodeDecodeError, ValueError):
            return data
    return from_hex(text, name)


def from_hex(text: str, name: str) -> bytes:
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise UsageError(f"{name}: not hex") from None


def _key_arg(args: argparse.Namespace) -> bytes:
    if args.key_file:
        return public_key(load_key_file(args.key_file))
    if args.key:
        return from_hex(args.key, "--key")
    raise FogpayError("give --key HEX or --key-file PATH")


def _out(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


def load_config(args: argparse.Namespace) -> cloud_config.CloudConfig:
    """The config from ``--config``, ``--store`` and ``--issuer-key``, each given before or
    after the subcommand (absent when given nowhere: the parsers use ``SUPPRESS``)."""
    path = getattr(args, "config", None)
    if path is not None:
        try:
            Path(path).read_bytes()
        except OSError as exc:
            raise UsageError(f"config {path}: {exc.strerror}") from None
    return cloud_config.load(
        path,
        store=getattr(args, "store", None),
        issuer_key=getattr(args, "issuer_key", None),
    )


def run_tx(args: argparse.Namespace, fn: Callable[[Tx, Any], Awaitable[T]]) -> T:
    """Open the store, run ``fn(tx, ctx)`` in one transaction, close the store."""
    cfg = load_config(args)

    async def main() -> T:
        store: Store = await open_store(cfg.store)
        try:
            return await store.transact(lambda tx: fn(tx, cfg))
        finally:
            await store.close()

    return asyncio.run(main())


def issuer(cfg: cloud_config.CloudConfig) -> nacl.signing.SigningKey:
    return load_key_file(cfg.issuer_key)


# Errors that mean "fix the command line or the configuration": exit 2 (runtime.cli). A
# ValueError is an option value that does not parse (hex, a time).
USAGE_ERRORS = (cloud_config.ConfigError, StoreOpenError, SchemaError, ValueError)


def guarded(
    fn: Callable[[argparse.Namespace], int], what: str = "cloud"
) -> Callable[[argparse.Namespace], int]:
    """Run a command; an operating error becomes one ``fogpay: <what>: <why>`` line and its
    exit code (runtime.cli), never a traceback."""

    def wrapper(args: argparse.Namespace) -> int:
        logs.configure(json=True, stream=sys.stderr)  # stdout carries the command's JSON
        try:
            return fn(args)
        except (FogpayError, KeyFileError, ValueError, OSError) as exc:
            return report(what, exc, USAGE_ERRORS)

    return wrapper


def cmd_verify_receipt(args: argparse.Namespace) -> int:
    text = Path(args.file).read_bytes()
    try:
        ok = verify_proof(text, hex_arg(args.issuer, "--issuer"))
    except ProofError as exc:
        if getattr(args, "json", False):
            _out({"valid": False, "error": str(exc)})
        else:
            print(f"INVALID: {exc}")
        return 1
    scope = "receipt and inclusion" if ok.batch is not None else "receipt only"
    _out(
        {
            "valid": True,
            "checked": scope,
            "intent_device": ok.intent.device.hex(),
            "seq": ok.intent.seq,
            "payee_id": ok.intent.payee_id,
            "amount_micros": ok.intent.amount_micros,
            "currency": ok.intent.currency,
            "fog_id": ok.fog_id,
            "batch": ok.batch,
            "owner_id": ok.owner_id,
        }
    )
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    key = load_key_file(cfg.issuer_key) if cfg.issuer_key.exists() else new_key_file(cfg.issuer_key)

    async def create() -> None:
        store = await open_store(cfg.store)
        await store.close()

    asyncio.run(create())
    _out({"issuer_public_key": public_key(key).hex(), "store": cfg.store.split("@")[-1]})
    return 0


async def _ledger_check(tx: Tx, cfg: Any) -> tuple[ledger.LedgerCheck, dict[str, int]]:
    rows = await tx.fetchall("SELECT kind, COUNT(*) FROM alarms GROUP BY kind ORDER BY kind")
    return await ledger.check(tx), {str(k): int(n) for k, n in rows}


def cmd_check(args: argparse.Namespace) -> int:
    """Exit 1 when the ledger does not balance or any alarm is recorded (an alarm is money
    nobody has accounted for yet: ``fogpay cloud alarms`` lists them with their evidence)."""
    result, alarms = run_tx(args, _ledger_check)
    count = sum(alarms.values())
    _out(
        {
            "ok": result.ok and count == 0,
            "ledger_ok": result.ok,
            "alarms": count,
            "alarms_by_kind": alarms,
            "sums_micros": result.sums,
            "mismatched": result.mismatched,
            "transfers": result.transfers,
            "volume_micros": result.volume_micros,
        }
    )
    if count:
        print(
            f"fogpay: cloud check: {count} alarm(s) recorded (fogpay cloud alarms)", file=sys.stderr
        )
    return 0 if result.ok and count == 0 else 1


def cmd_prove(args: argparse.Namespace) -> int:
    intent_id = from_hex(args.intent_id, "intent_id")

    async def fn(tx: Tx, cfg: Any) -> dict[str, Any] | None:
        return await build_proof(tx, intent_id)

    proof = run_tx(args, fn)
    if proof is None:
        print(f"fogpay: no booked intent {args.intent_id}", file=sys.stderr)
        return 1
    text = json.dumps(proof, indent=2, sort_keys=True)
    if args.out:
        Path(args.out).write_text(text + "\n")
    else:
        print(text)
    return 0


def owner_json(owner: registry.Owner, exposure: int, bound: Bound | None = None) -> dict[str, Any]:
    from cloud.settlement import mask_funding_ref

    extra = {} if bound is None else {"partition_bound": bound.as_json()}
    return extra | {
        "owner_id": owner.owner_id,
        "name": owner.name,
        "key": owner.key.hex(),
        "status": owner.status,
        "currency": owner.currency,
        "limit_micros": owner.limit_micros,
        "exposure_micros": exposure,
        "available_micros": max(0, owner.limit_micros - exposure),
        "funding_ref": mask_funding_ref(owner.funding_ref),
        "not_after_ms": owner.not_after_ms,
    }


async def show_owner(tx: Tx, owner_id: str, *, policy_life_ms: int) -> dict[str, Any]:
    """The owner, its exposure and its partition bound (docs/protocol.md 17.9);
    ``policy_life_ms``: the lease policy's life (L when the owner holds no open lease)."""
    owner = await registry.get_owner(tx, owner_id)
    if owner is None:
        raise FogpayError(f"no owner {owner_id!r}")
    now = now_ms()
    bound = await owner_bound(tx, owner_id, now_ms=now, policy_life_ms=policy_life_ms)
    shown = owner_json(owner, await leases.exposure(tx, owner_id), bound)
    # the voucher escrow (18.3): voucher intents are booked transfers drawn on leases, already
    # in the exposure; shown so the owner sees what its devices may still spend offline
    shown["vouchers"] = (await vouchers.escrow(tx, owner_id, now_ms=now)).as_json()
    shown["transfers"] = await transfers.of_owner(tx, owner_id)
    return shown
