"""``fogpay keys``: create and inspect Ed25519 key files (hex seed, 0600; see runtime.keyfile).

``keys new`` never overwrites a key; both commands print only the public key.
``keys prove`` is the device side of a remote binding: it prints the device's proof of
possession over the binding body built from the given fields, for ``fogpay device bind
--device-pub ... --proof ...``.
"""

import argparse
import json
from pathlib import Path

from fogpay.provision import ProvisionError, Validity, binding_body, make_binding
from protocol.errors import FogpayError
from protocol.signing import possession_proof, public_key
from runtime.cli import EXIT_USAGE, describe, fail, json_option
from runtime.keyfile import KeyFileError, load_key_file, new_key_file


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    keys = sub.add_parser("keys", help="Ed25519 key files")
    cmds = keys.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")
    data = [json_option()]  # the output is JSON already; --json is accepted everywhere
    p = cmds.add_parser(
        "new", help="generate a key file (0600); print its public key", parents=data
    )
    p.add_argument("path", type=Path)
    p.set_defaults(func=cmd_new)
    p = cmds.add_parser("show", help="print the public key of a key file", parents=data)
    p.add_argument("path", type=Path)
    p.set_defaults(func=cmd_show)
    p = cmds.add_parser(
        "prove", help="device: proof of possession for a binding's fields", parents=data
    )
    p.add_argument("--device-key", required=True, type=Path)
    p.add_argument("--owner-id", required=True)
    p.add_argument("--currency", required=True)
    p.add_argument("--tx-max", required=True, type=int)
    p.add_argument("--day-max", required=True, type=int)
    p.add_argument("--payee", action="append")
    p.add_argument("--not-before", required=True, type=int)
    p.add_argument("--not-after", required=True, type=int)
    p.set_defaults(func=cmd_prove)


def _error(what: str, exc: Exception) -> int:
    """Every refusal here is about the arguments (a key file that exists, is loose or is not a
    key, a bad field): exit 2 with one line (runtime.cli)."""
    return fail(f"keys {what}", describe(exc), code=EXIT_USAGE)


def cmd_new(args: argparse.Namespace) -> int:
    try:
        key = new_key_file(args.path)
    except (KeyFileError, OSError) as exc:
        return _error("new", exc)
    print(json.dumps({"public_key": public_key(key).hex(), "file": str(args.path)}))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    try:
        key = load_key_file(args.path)
    except KeyFileError as exc:
        return _error("show", exc)
    print(json.dumps({"public_key": public_key(key).hex(), "file": str(args.path)}))
    return 0


def cmd_prove(args: argparse.Namespace) -> int:
    try:
        device = load_key_file(args.device_key)
        binding = make_binding(
            public_key(device),
            owner_id=args.owner_id,
            currency=args.currency,
            tx_max_micros=args.tx_max,
            day_max_micros=args.day_max,
            validity=Validity(args.not_before, args.not_after),
            payees=args.payee,
        )
        proof = possession_proof(device, binding_body(binding))
    except (KeyFileError, ProvisionError, FogpayError) as exc:
        return _error("prove", exc)
    print(json.dumps({"device": public_key(device).hex(), "proof": proof.hex()}))
    return 0
