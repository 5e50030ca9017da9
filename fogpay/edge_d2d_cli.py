"""``fogpay edge voucher``, ``fogpay edge d2d-pay`` and ``fogpay edge d2d-accept``:
device-to-device payments (docs/protocol.md 18.3, docs/edge.md).

- ``voucher`` (payer, needs the fog): pays ``--amount`` to the reserved payee ``voucher`` and
  keeps the fog's voucher in the device's state (``vouchers.json``);
- ``d2d-pay`` (payer, no network): signs a payment against a voucher with room and writes the
  bundle for the payee to ``--out`` (``-``: hex on stdout);
- ``d2d-accept`` (payee, no network): checks a bundle with the issuer's key alone and keeps it
  held for upload; ``fogpay edge upload`` later hands it in with the device's receipts.

Each prints one JSON object. Exit 0 on success; 1 when the fog declined, the voucher has no
room or the payee refuses the bundle (the JSON says why); 2 for a usage error.
"""

import argparse
import asyncio
import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt

from edge.device import Device, PaymentDeclined, PaymentError
from edge.voucher import NoRoom, Payee, Payer
from protocol.errors import FogpayError
from protocol.signing import is_valid_public_key, public_key
from protocol.voucher import VoucherError
from runtime.cli import UsageError, json_option
from runtime.keyfile import KeyFileError
from runtime.logs import configure


@dataclass(frozen=True, slots=True)
class Helpers:
    """What these commands share with ``fogpay/edge_cli.py``, handed in by its ``register``
    (this module does not import it: no import circle)."""

    target_args: Callable[[argparse.ArgumentParser], None]  # --sandbox, --broker, --payee...
    target: Callable[[argparse.Namespace], Any]  # -> edge_cli.Target
    connected: Callable[[Any, str], Any]  # async context manager -> aiomqtt.Client
    error: Callable[[str, BaseException], int]


def register(cmds: "argparse._SubParsersAction[argparse.ArgumentParser]", h: Helpers) -> None:
    _target_args = h.target_args
    p = cmds.add_parser(
        "voucher",
        help="obtain an offline allowance from the fog for --state's device (prints JSON)",
        parents=[json_option()],
    )
    _target_args(p)
    p.add_argument("--state", required=True, type=Path, help="device state dir")
    p.add_argument("--payees", help="comma-separated payee ids the voucher is limited to")
    p.set_defaults(func=functools.partial(cmd_voucher, h=h))
    p = cmds.add_parser(
        "d2d-pay",
        help="sign a device-to-device payment against a voucher; no network (prints JSON)",
        parents=[json_option()],
    )
    _target_args(p)
    p.add_argument("--state", required=True, type=Path, help="device state dir")
    p.add_argument("--out", required=True, help="file for the bundle, or - for hex on stdout")
    p.add_argument("--voucher", help="voucher id (hex); default: the one with room expiring first")
    p.set_defaults(func=functools.partial(cmd_d2d_pay, h=h))
    p = cmds.add_parser(
        "d2d-accept",
        help="check and keep a bundle a payer handed over; no network (prints JSON)",
        parents=[json_option()],
    )
    _target_args(p)
    p.add_argument("--state", required=True, type=Path, help="the payee device's state dir")
    p.add_argument("--bundle", required=True, type=Path, help="the bundle file")
    p.add_argument("--issuer", help="the issuer's public key (hex); --sandbox gives it")
    p.set_defaults(func=functools.partial(cmd_d2d_accept, h=h))


def _device(args: argparse.Namespace, h: Helpers) -> tuple[Device, Any]:
    target = h.target(args)
    return Device.open(args.state, fog_id=target.fog_id, fog_key=target.fog_key), target


async def _voucher(args: argparse.Namespace, h: Helpers) -> dict[str, Any]:
    device, target = _device(args, h)
    payer = Payer(device)
    payees = [p for p in args.payees.split(",") if p] if args.payees else None
    async with h.connected(target.broker, "voucher") as client:
        try:
            held = await payer.obtain(
                client,
                args.amount,
                args.currency,
                payees=payees,
                timeout_s=args.timeout,
                retries_max=args.retries,
            )
        except PaymentDeclined as exc:
            return {"status": "declined", "reason": str(exc.reason), "device": device.key_hex}
    return {"status": "ok", "device": device.key_hex} | held.as_json()


def cmd_voucher(args: argparse.Namespace, *, h: Helpers) -> int:
    _error = h.error
    configure(json=False, level=args.log_level, stream=sys.stderr, component="edge")
    try:
        result = asyncio.run(_voucher(args, h))
    except (PaymentError, FogpayError, KeyFileError, aiomqtt.MqttError, OSError) as exc:
        return _error("voucher", exc)
    print(_dumps(result))
    return 0 if result["status"] == "ok" else 1


def cmd_d2d_pay(args: argparse.Namespace, *, h: Helpers) -> int:
    _error = h.error
    configure(json=False, level=args.log_level, stream=sys.stderr, component="edge")
    try:
        device, _ = _device(args, h)
        voucher_id = bytes.fromhex(args.voucher) if args.voucher else None
        payer = Payer(device)
        try:
            bundle = payer.pay(args.payee, args.amount, voucher_id=voucher_id)
        except NoRoom as exc:
            print(_dumps({"status": "no_room", "detail": str(exc), "device": device.key_hex}))
            return 1
        if args.out == "-":
            print(bundle.hex())
        else:
            Path(args.out).write_bytes(bundle)
    except ValueError as exc:
        return _error("d2d-pay", UsageError(f"--voucher: {exc}"))
    except (FogpayError, KeyFileError, OSError) as exc:
        return _error("d2d-pay", exc)
    left = {h.voucher.msg.voucher_id.hex(): h.left_micros for h in payer.vouchers()}
    if args.out != "-":
        print(
            _dumps(
                {
                    "status": "ok",
                    "device": device.key_hex,
                    "bytes": len(bundle),
                    "left_micros": left,
                }
            )
        )
    return 0


def cmd_d2d_accept(args: argparse.Namespace, *, h: Helpers) -> int:
    _error = h.error
    configure(json=False, level=args.log_level, stream=sys.stderr, component="edge")
    try:
        device, target = _device(args, h)
        if args.issuer is not None:
            issuer_key = bytes.fromhex(args.issuer)
        elif target.issuer is not None:
            issuer_key = public_key(target.issuer)
        else:
            raise UsageError("--issuer: the issuer's public key is needed to check a voucher")
        if not is_valid_public_key(issuer_key):
            raise UsageError("--issuer: not a valid Ed25519 public key")
        payee = Payee(device, payee_id=args.payee, issuer_key=issuer_key)
        try:
            checked = payee.accept(args.bundle.read_bytes())
        except VoucherError as exc:
            print(_dumps({"status": "refused", "fault": exc.code, "detail": str(exc)}))
            return 1
    except ValueError as exc:
        return _error("d2d-accept", UsageError(f"--issuer: {exc}"))
    except (FogpayError, KeyFileError, OSError) as exc:
        return _error("d2d-accept", exc)
    p = checked.payment.msg
    print(
        _dumps(
            {
                "status": "ok",
                "payment": checked.payment.id.hex(),
                "voucher": p.voucher_id.hex(),
                "payer": checked.voucher.msg.device.hex(),
                "payee": p.payee_id,
                "amount_micros": p.amount_micros,
                "seq": p.seq,
                "held": len(device.held_records()),
            }
        )
    )
    return 0


def _dumps(obj: dict[str, Any]) -> str:
    import json

    return json.dumps(obj, sort_keys=True)
