"""The parser of ``fogpay cloud`` and its subcommands (the shared helpers and the first
commands are in ``cloud.cli``, which imports nothing of this module)."""

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from cloud import accounts_cli, leases, registry, vouchers
from cloud import config as cloud_config
from cloud.backends import open_store
from cloud.cli import (
    Sub,
    _key_arg,
    _out,
    cmd_check,
    cmd_init,
    cmd_prove,
    cmd_verify_receipt,
    from_hex,
    guarded,
    hex_arg,
    issuer,
    load_config,
    now_ms,
    parse_time_ms,
    run_tx,
    show_owner,
)
from cloud.ingest import Ingestor
from cloud.store import Tx
from protocol.errors import FogpayError
from runtime.cli import config_option, json_option


def store_options() -> argparse.ArgumentParser:
    """``--config``, ``--store`` and ``--issuer-key``: accepted before the subcommand
    (``fogpay cloud --store S check``) and after it (``fogpay cloud check --store S``).
    ``SUPPRESS``: an option not given leaves the other place's value (cli.load_config)."""
    parent = config_option("TOML config (docs/cloud.md)")
    parent.add_argument(
        "--store",
        default=argparse.SUPPRESS,
        help="sqlite://PATH or postgresql://... (overrides config)",
    )
    parent.add_argument(
        "--issuer-key",
        default=argparse.SUPPRESS,
        help="issuer key file, mode 0600 (overrides config)",
    )
    return parent


def register(sub: Sub) -> None:
    cloud = sub.add_parser(
        "cloud",
        help="the cloud aggregator's registry, ledger and settlement",
        parents=[store_options()],
    )
    cmds = cloud.add_subparsers(dest="cloud_command", required=True, metavar="COMMAND")
    register_commands(cmds)
    v = sub.add_parser(
        "verify-receipt", help="check a receipt or proof file offline", parents=[json_option()]
    )
    v.add_argument("file", help="proof JSON (docs/cloud.md)")
    v.add_argument("--issuer", required=True, help="issuer public key: hex or @FILE")
    v.set_defaults(func=guarded(cmd_verify_receipt, "verify-receipt"))


def register_commands(cmds: Sub) -> None:
    options = [store_options(), json_option()]

    def add(name: str, fn: Any, help_: str, parent: Any = cmds) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(name, help=help_, parents=options)
        p.set_defaults(func=guarded(fn, p.prog.split(" ", 1)[-1]))
        return p

    add("init", cmd_init, "create the issuer key (0600) if missing and the store's tables")
    add("check", cmd_check, "check the ledger: every currency sums to zero, balances derive")
    p = add("prove", cmd_prove, "print the proof of a booked intent (for verify-receipt)")
    p.add_argument("intent_id", help="64 hex characters")
    p.add_argument("--out", help="write the proof JSON to this file")
    _owner(cmds, add)
    _device(cmds, add)
    accounts_cli.register(cmds, add)
    fog = cmds.add_parser("fog", help="fogs").add_subparsers(dest="fog_command", required=True)
    p = add("add", cmd_fog_add, "register a fog and sign its credential", fog)
    p.add_argument("fog_id")
    _key_options(p)
    p = add(
        "close-leases",
        cmd_fog_close_leases,
        "close every open lease of a lost fog at its booked draws (without --yes: show them)",
        fog,
    )
    p.add_argument("fog_id")
    p.add_argument("--yes", action="store_true", help="close them (default: only show)")
    voucher = cmds.add_parser("voucher", help="vouchers: device-to-device payments (18.3)")
    vcmds = voucher.add_subparsers(dest="voucher_cmd", required=True)
    p = add(
        "return-expired",
        cmd_voucher_return_expired,
        "return the unspent escrow of vouchers past na + grace to their owners "
        "(without --yes: show them)",
        vcmds,
    )
    p.add_argument("--yes", action="store_true", help="return it (default: only show)")
    lease = cmds.add_parser("lease", help="leases").add_subparsers(dest="lease_cmd", required=True)
    p = add("grant", cmd_lease_grant, "grant a lease of an owner's credit to a fog", lease)
    p.add_argument("owner_id")
    p.add_argument("fog_id")
    p.add_argument("amount_micros", type=int)
    p = add("list", cmd_lease_list, "list an owner's leases: amount, drawn, state", lease)
    p.add_argument("owner_id")
    add("alarms", cmd_alarms, "list alarms: forks, overdrawn leases, cloned keys, reports")
    p = add("ingest", cmd_ingest, "ingest batch files (wire bytes), as from the batch topic")
    p.add_argument("files", nargs="+")
    p = add("settle", cmd_settle, "close a settlement period and write its files")
    p.add_argument("--until", required=True, help="ms since the epoch or ISO 8601 (UTC)")
    p.add_argument("--period", help="period id (default: P + the --until date and time)")
    p.add_argument("--out", default="settlement", help="directory for the period's files")
    p = add("run", cmd_run, "run the cloud service on MQTT until SIGTERM (cloud/service.py)")
    p.add_argument("--broker", help="mqtt://[user:password@]host[:port] (overrides config)")
    p.add_argument(
        "--partition",
        metavar="I/P",
        help="book partition I of P (fogs by hash; PostgreSQL only; overrides config)",
    )


def _key_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--key", help="public key, 64 hex characters")
    p.add_argument("--key-file", help="or: a key file (its public key is used)")


def _owner(cmds: Any, add: Any) -> None:
    owner = cmds.add_parser("owner", help="owners").add_subparsers(dest="owner_cmd", required=True)
    p = add("add", cmd_owner_add, "register an owner and sign its credential", owner)
    p.add_argument("owner_id")
    _key_options(p)
    p.add_argument("--limit", type=int, required=True, help="credit limit in micros")
    p.add_argument("--currency", required=True)
    p.add_argument("--funding", required=True, help="funding reference (never published)")
    p.add_argument("--name", default="", help="legal name for the rails")
    p = add("show", cmd_owner_show, "show an owner, its limit and what is outstanding", owner)
    p.add_argument("owner_id")
    p = add("limit", cmd_owner_limit, "set an owner's credit limit (micros)", owner)
    p.add_argument("owner_id")
    p.add_argument("limit_micros", type=int)


def _device(cmds: Any, add: Any) -> None:
    dev = cmds.add_parser("device", help="devices").add_subparsers(dest="dev_cmd", required=True)
    p = add("bind", cmd_device_bind, "register an owner-signed binding", dev)
    p.add_argument("--binding", required=True, help="bind envelope: hex or @FILE")
    p.add_argument("--proof", required=True, help="device's proof of possession: hex or @FILE")
    p = add("revoke", cmd_device_revoke, "revoke a device (issuer), or submit a revocation", dev)
    p.add_argument("device", nargs="?", help="device key hex (issuer revocation)")
    p.add_argument("--reason", default="revoked by the issuer")
    p.add_argument("--envelope", help="a signed revoke envelope (owner's): hex or @FILE")
    p = add("list", cmd_device_list, "list bound devices", dev)
    p.add_argument("--owner")


def cmd_owner_add(args: argparse.Namespace) -> int:
    key = _key_arg(args)

    async def fn(tx: Tx, cfg: cloud_config.CloudConfig) -> bytes:
        return await registry.add_owner(
            tx,
            issuer(cfg),
            owner_id=args.owner_id,
            key=key,
            limit_micros=args.limit,
            currency=args.currency,
            funding_ref=args.funding,
            name=args.name,
            now_ms=now_ms(),
        )

    _out({"owner_id": args.owner_id, "credential": run_tx(args, fn).hex()})
    return 0


def cmd_owner_show(args: argparse.Namespace) -> int:
    _out(
        run_tx(
            args,
            lambda tx, cfg: show_owner(tx, args.owner_id, policy_life_ms=cfg.lease.lease_ms),
        )
    )
    return 0


def cmd_owner_limit(args: argparse.Namespace) -> int:
    async def fn(tx: Tx, cfg: Any) -> dict[str, Any]:
        await registry.set_limit(tx, args.owner_id, args.limit_micros)
        return await show_owner(tx, args.owner_id, policy_life_ms=cfg.lease.lease_ms)

    _out(run_tx(args, fn))
    return 0


def cmd_fog_add(args: argparse.Namespace) -> int:
    key = _key_arg(args)

    async def fn(tx: Tx, cfg: cloud_config.CloudConfig) -> bytes:
        return await registry.add_fog(tx, issuer(cfg), fog_id=args.fog_id, key=key, now_ms=now_ms())

    _out({"fog_id": args.fog_id, "credential": run_tx(args, fn).hex()})
    return 0


def cmd_fog_close_leases(args: argparse.Namespace) -> int:
    """docs/cloud.md "A fog that lost its disk": close the fog's open leases at what the
    cloud booked on them; print each and what returned to each owner."""

    async def fn(tx: Tx, cfg: Any) -> list[leases.ForceClosed]:
        if await registry.fog_key(tx, args.fog_id) is None:
            raise FogpayError(f"no fog {args.fog_id!r}")
        if args.yes:
            return await leases.close_fog_leases(tx, args.fog_id)
        return await leases.open_fog_leases(tx, args.fog_id)

    closed = run_tx(args, fn)
    returned: dict[str, dict[str, int]] = {}
    for lease in closed:
        owner = returned.setdefault(lease.owner_id, {})
        owner[lease.currency] = owner.get(lease.currency, 0) + lease.returned_micros
    _out(
        {
            "fog_id": args.fog_id,
            "closed": args.yes,
            "leases": [
                {
                    "lease_id": lease.lease_id.hex(),
                    "owner_id": lease.owner_id,
                    "currency": lease.currency,
                    "amount_micros": lease.amount_micros,
                    "drawn_micros": lease.drawn_micros,
                    "returned_micros": lease.returned_micros,
                    "not_after_ms": lease.not_after_ms,
                }
                for lease in closed
            ],
            "returned": returned,
        }
    )
    if not args.yes and closed:
        print(
            f"fogpay: {len(closed)} open lease(s) of {args.fog_id} shown, none closed: "
            "add --yes to close them",
            file=sys.stderr,
        )
    return 0


def cmd_voucher_return_expired(args: argparse.Namespace) -> int:
    """docs/protocol.md 18.3: the unspent escrow of expired vouchers back to their owners."""

    async def fn(tx: Tx, cfg: Any) -> list[vouchers.Deposit]:
        return await vouchers.return_expired(tx, now_ms=now_ms(), apply=args.yes)

    due = run_tx(args, fn)
    returned: dict[str, dict[str, int]] = {}
    for d in due:
        owner = returned.setdefault(d.owner_id, {})
        owner[d.currency] = owner.get(d.currency, 0) + d.unspent_micros
    _out({"returned": args.yes, "vouchers": [d.as_json() for d in due], "by_owner": returned})
    if not args.yes and due:
        print(
            f"fogpay: {len(due)} expired voucher(s) shown, nothing returned: add --yes",
            file=sys.stderr,
        )
    return 0


def cmd_device_bind(args: argparse.Namespace) -> int:
    binding, proof = hex_arg(args.binding, "--binding"), hex_arg(args.proof, "--proof")

    async def fn(tx: Tx, cfg: Any) -> Any:
        return await registry.bind_device(tx, binding, proof, now_ms=now_ms())

    b = run_tx(args, fn)
    _out({"device": b.device.hex(), "owner_id": b.owner_id, "currency": b.currency})
    return 0


def cmd_device_revoke(args: argparse.Namespace) -> int:
    if (args.device is None) == (args.envelope is None):
        raise FogpayError("give a device key or --envelope, not both")

    async def fn(tx: Tx, cfg: cloud_config.CloudConfig) -> Any:
        key = issuer(cfg)
        if args.envelope is not None:
            return await registry.revoke(
                tx, bytes(key.verify_key), hex_arg(args.envelope, "--envelope")
            )
        device = from_hex(args.device, "device")
        return await registry.issuer_revoke(tx, key, device, reason=args.reason, now_ms=now_ms())

    rev = run_tx(args, fn)
    _out({"revoked": rev.key.hex(), "time_ms": rev.time_ms, "reason": rev.reason})
    return 0


def cmd_device_list(args: argparse.Namespace) -> int:
    rows = run_tx(args, lambda tx, cfg: registry.devices(tx, args.owner))
    _out(
        [
            {
                "device": d.device.hex(),
                "owner_id": d.owner_id,
                "currency": d.currency,
                "not_after_ms": d.not_after_ms,
                "revoked": d.revoked,
            }
            for d in rows
        ]
    )
    return 0


def cmd_lease_grant(args: argparse.Namespace) -> int:
    async def fn(tx: Tx, cfg: cloud_config.CloudConfig) -> leases.Granted:
        return await leases.grant(
            tx,
            issuer(cfg),
            owner_id=args.owner_id,
            fog_id=args.fog_id,
            amount_micros=args.amount_micros,
            now_ms=now_ms(),
            policy=cfg.lease,
        )

    g = run_tx(args, fn)
    _out(
        {
            "lease_id": g.lease.lease_id.hex(),
            "amount_micros": g.lease.amount_micros,
            "not_after_ms": g.lease.not_after_ms,
            "topic": g.topic,
            "envelope": g.envelope.hex(),
        }
    )
    return 0


LIST_ROWS_MAX = 10_000


def cmd_lease_list(args: argparse.Namespace) -> int:
    async def fn(tx: Tx, cfg: Any) -> list[dict[str, Any]]:
        rows = await tx.fetchall(
            "SELECT lease_id, fog_id, currency, amount_micros, drawn_micros, not_after_ms, state, "
            "reported_micros FROM leases WHERE owner_id = ? "
            f"ORDER BY granted_ms LIMIT {LIST_ROWS_MAX}",
            (args.owner_id,),
        )
        keys: tuple[str, ...] = ("lease_id", "fog_id", "currency", "amount_micros")
        keys += ("drawn_micros", "not_after_ms", "state", "reported_micros")
        return [dict(zip(keys, (bytes(r[0]).hex(), *r[1:]), strict=True)) for r in rows]

    _out(run_tx(args, fn))
    return 0


def cmd_alarms(args: argparse.Namespace) -> int:
    async def fn(tx: Tx, cfg: Any) -> list[dict[str, Any]]:
        rows = await tx.fetchall(
            "SELECT kind, subject, fog_id, detail, time_ms FROM alarms "
            f"ORDER BY time_ms, kind, subject LIMIT {LIST_ROWS_MAX}"
        )
        keys = ("kind", "subject", "fog_id", "detail", "time_ms")
        return [dict(zip(keys, r, strict=True)) for r in rows]

    _out(run_tx(args, fn))
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    key = issuer(cfg)
    wires = [Path(f).read_bytes() for f in args.files]

    async def main() -> list[dict[str, Any]]:
        store = await open_store(cfg.store)
        try:
            ing = Ingestor(store=store, issuer=key, clock=now_ms)
            outs = [await ing.ingest_batch(w) for w in wires]
        finally:
            await store.close()
        return [
            {"fog_id": o.fog_id, "batch": o.number, "status": str(o.status), "booked": o.booked}
            | {"rejected": o.rejected, "alarms": o.alarms, "reason": o.reason}
            for o in outs
        ]

    results = asyncio.run(main())
    _out(results)
    return 1 if any(r["status"] in ("refused", "fork") for r in results) else 0


def cmd_settle(args: argparse.Namespace) -> int:
    from cloud.settle_files import settle_and_write

    until = parse_time_ms(args.until)
    report = run_tx(args, lambda tx, cfg: settle_and_write(tx, cfg, args, until, now_ms()))
    print(json.dumps(report, indent=2, sort_keys=True))
    return 0 if report["balanced"] else 1


def parse_partition(text: str) -> tuple[int, int]:
    """``I/P`` (partition I of P) as ``(I, P)``; ``-/P``: a standby for any of P."""
    index, sep, partitions = text.partition("/")
    if not sep or not partitions.isdigit() or not (index.isdigit() or index == "-"):
        raise SystemExit(f"--partition: {text!r} is not I/P (for example 0/2)")
    return (-1 if index == "-" else int(index)), int(partitions)


def cmd_run(args: argparse.Namespace) -> int:
    """The MQTT service: JSON log lines on stdout (journald); SIGTERM or SIGINT stop it
    after the message in flight."""
    import dataclasses
    import signal

    from cloud.service import open_service
    from runtime import logs
    from runtime.logs import route_stdlib_logging

    cfg = load_config(args)
    if args.broker:
        service_cfg = dataclasses.replace(cfg.service, broker_url=args.broker)
        cfg = dataclasses.replace(cfg, service=service_cfg)
    if args.partition:
        index, partitions = parse_partition(args.partition)
        service_cfg = dataclasses.replace(cfg.service, partitions=partitions, partition=index)
        cfg = dataclasses.replace(cfg, service=service_cfg)
    logs.configure(json=True, component="cloud")
    route_stdlib_logging(json=True, component="cloud")

    async def main() -> None:
        async with open_service(cfg) as service:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, lambda: loop.create_task(service.stop()))
            await service.run()

    asyncio.run(main())
    return 0
