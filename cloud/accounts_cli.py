"""``fogpay cloud accounts sync|login``: broker accounts from the registry (cloud.accounts).

- ``sync``: write the embedded broker's accounts file and/or Mosquitto's password file (base
  accounts first, SIGHUP to the pid in ``--mosquitto-pid-file``) once, or with ``--watch``
  keep them in sync until SIGTERM/SIGINT. Run it on the broker's host (cron after each
  registration, or ``--watch`` as a service).
- ``login DEVICE_HEX``: a device's login as JSON (``{"username", "password"}``), to hand to
  the device at registration.
"""

import argparse
import asyncio
import json
import signal
from pathlib import Path
from typing import Any

from cloud.accounts import AccountSync, AccountTargets, sync_once
from cloud.backends import open_store
from cloud.cli import from_hex, load_config, now_ms
from protocol.errors import FogpayError
from protocol.login import LOGIN_SECRET_BYTES, device_password, device_username
from protocol.signing import is_valid_public_key


def read_login_secret(path: Path) -> bytes:
    lines = path.read_text().splitlines()
    try:
        secret = bytes.fromhex(lines[0].strip()) if lines else b""
    except ValueError:
        secret = b""
    if len(secret) < LOGIN_SECRET_BYTES:
        raise FogpayError(f"{path}: not {LOGIN_SECRET_BYTES}+ bytes of hex on its first line")
    return secret


def register(cmds: Any, add: Any) -> None:
    acc = cmds.add_parser("accounts", help="broker accounts from the registry")
    sub = acc.add_subparsers(dest="accounts_cmd", required=True)
    p = add("sync", cmd_sync, "write broker account files from the registry", sub)
    p.add_argument("--login-secret-file", required=True, type=Path)
    p.add_argument("--amqtt-file", type=Path, help="the embedded broker's accounts file")
    p.add_argument("--mosquitto-passwd", type=Path, help="Mosquitto's password_file")
    p.add_argument("--mosquitto-base", type=Path, help="static password lines copied first")
    p.add_argument("--mosquitto-pid-file", type=Path, help="SIGHUP Mosquitto after a change")
    p.add_argument("--watch", action="store_true", help="keep them in sync until SIGTERM")
    p = add("login", cmd_login, "print a device's broker login as JSON", sub)
    p.add_argument("device", help="the device key, 64 hex characters")
    p.add_argument("--login-secret-file", required=True, type=Path)


def cmd_login(args: argparse.Namespace) -> int:
    device = from_hex(args.device, "device")
    if not is_valid_public_key(device):
        raise ValueError("device: not a valid Ed25519 public key")
    secret = read_login_secret(args.login_secret_file)
    login = {"username": device_username(device), "password": device_password(secret, device)}
    print(json.dumps(login))
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    if args.amqtt_file is None and args.mosquitto_passwd is None:
        raise ValueError("give --amqtt-file and/or --mosquitto-passwd")
    cfg = load_config(args)
    secret = read_login_secret(args.login_secret_file)
    targets = AccountTargets(
        amqtt_file=args.amqtt_file,
        mosquitto_passwd=args.mosquitto_passwd,
        mosquitto_base=args.mosquitto_base,
        mosquitto_pid_file=args.mosquitto_pid_file,
    )

    async def main() -> int:
        store = await open_store(cfg.store)
        try:
            if not args.watch:
                return await sync_once(store, secret, targets, now_ms=now_ms())
            sync = AccountSync(store=store, secret=secret, targets=targets, clock=now_ms)
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, lambda: asyncio.ensure_future(sync.stop()))
            await sync.run()
            return -1
        finally:
            await store.close()

    devices = asyncio.run(main())
    if devices >= 0:
        print(json.dumps({"devices": devices}))
    return 0
