"""``fogpay demo --out DIR [--seconds S]``: the whole path on 127.0.0.1, in one process.

1. The cloud (issuer) registers the fog, seven owners (four that pay, three payees) and 30
   devices with their proofs of possession; an owner revokes a stolen EV; the issuer grants
   each paying owner a first lease (``demo_setup``).
2. The fog daemon starts with its embedded broker on a free port; the cloud's MQTT shell
   (``cloud.service.CloudService``) connects to it and publishes the trust material
   retained; the fog loads it.
3. The devices pay for ``S`` seconds through the fog (``demo_pay``): charging, tolls,
   bandwidth, and a few payments the fog must decline; a live display shows the progress
   (``demo_live``); the fog tops leases up as they run down.
4. The fog seals batches; they reach the cloud on ``fogpay/1/up/{fog_id}/batch``, which
   verifies, books and acks them. A drone obtains a voucher and pays two payee devices
   offline (``demo_budget``). The demo waits (bounded) until every sealed batch is booked,
   gives every live lease back early and waits until the cloud closed them, has the payees
   hand their device-to-device payments in, then stops the fog and the service.
5. A settlement period closes (``cloud.settle``): CSV, pain.008, pain.001 and the
   reconciliation report in ``DIR/settlement/``; the ledger is checked; ``DIR/summary.json``
   and a table on stdout say what happened (``demo_summary``), ``DIR/report.html`` shows
   the latency histogram and each owner's lease drawdown (``demo_report``). Exit 1 if an
   invariant fails.

``DIR`` must be new or empty, or a directory an earlier demo wrote (it holds the marker
file ``.fogpay-demo``), which is then emptied; anything else is refused (exit 2). Logs go to
``DIR/demo.log`` (JSON lines), keeping stdout for the summary.
"""

import argparse
import asyncio
import contextlib
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Any, Final, TextIO

import aiomqtt
import structlog
from rich.console import Console

from cloud.config import CloudConfig
from cloud.core import CloudCore
from cloud.iso20022 import CreditorConfig, DebtorConfig
from cloud.settle_files import period_id_for, settle_and_write
from cloud.sqlitestore import SqliteStore
from cloud.store import Store, Tx
from edge.device import Device, DeviceSession
from fog.daemon import FogDaemon
from fogpay import demo_budget, demo_fed, demo_live, demo_report, demo_summary
from fogpay import demo_cast as cast
from fogpay import demo_setup as setup
from fogpay.demo_pay import Outcomes, run_payments
from fogpay.demo_run import mqtt_client, now_ms, trust_expected, wait_for
from fogpay.provision import BrokerAddress
from fogpay.running import running, with_ready
from protocol.errors import FogpayError
from protocol.signing import public_key
from runtime.cli import EXIT_USAGE, describe, fail
from runtime.logs import configure

log = structlog.get_logger()

MARKER_FILE: Final = ".fogpay-demo"
SUMMARY_FILE: Final = "summary.json"
REPORT_FILE: Final = "report.html"
LOG_FILE: Final = "demo.log"
SETTLEMENT_DIR: Final = "settlement"
SECONDS_MAX: Final = 600.0
TRUST_WAIT_S_MAX: Final = 20.0
BOOK_WAIT_S_MAX: Final = 30.0
LEASE_POLICY: Final = setup.LEASE_POLICY  # the issuer's (demo_setup explains the numbers)
CREDITOR: Final = CreditorConfig(
    name="fogpay Demo Operator",
    iban="DE89370400440532013000",
    bic="COBADEFFXXX",
    creditor_id="DE98ZZZ09999999999",
)
DEBTOR: Final = DebtorConfig(name="fogpay Demo Operator", iban="DE89370400440532013000")


class DemoError(FogpayError):
    """The demo cannot run (its output directory, a component that did not start)."""


def prepare_out(out: Path) -> None:
    """Create ``out``, or empty it if an earlier demo wrote it; refuse anything else."""
    if out.exists() and not out.is_dir():
        raise DemoError(f"{out}: exists and is not a directory")
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER_FILE).is_file():
            raise DemoError(f"{out}: not empty and not written by fogpay demo; refusing")
        for child in out.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    (out / MARKER_FILE).write_text("written by fogpay demo; emptied by the next run\n")


async def cloud_counts(store: Store) -> tuple[int, int]:
    """(batches, records) the cloud has booked for the demo's fog."""

    async def fn(tx: Tx) -> tuple[int, int]:
        b = await tx.fetchone("SELECT COUNT(*) FROM batches WHERE fog_id = ?", (cast.FOG_ID,))
        r = await tx.fetchone("SELECT COUNT(*) FROM records WHERE fog_id = ?", (cast.FOG_ID,))
        assert b is not None and r is not None
        return int(b[0]), int(r[0])

    result: tuple[int, int] = await store.transact(fn)
    return result


async def pay_and_book(
    out: Path,
    store: Store,
    keys: setup.Keys,
    devices: dict[str, Device],
    seconds: float,
    progress: Console | None = None,
) -> tuple[Outcomes, bool, int, demo_budget.D2D, list[bytes]]:
    """Fog, cloud service and devices: pay (and a voucher, device-to-device payments), then
    wait until every sealed batch is booked; give every lease back early and wait until the
    cloud closed them; the payees hand their payments in. Returns the outcomes, whether all
    of it was booked, the batches the fog sealed, the device-to-device part and the leases
    returned."""
    from cloud.service import CloudService  # the MQTT shell: only when running

    config = setup.fog_config(out, keys)
    daemon = FogDaemon(config, fog_key=keys.fog)
    core = CloudCore(store=store, issuer=keys.issuer, clock=now_ms, policy=LEASE_POLICY)
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(running("demo.fog", with_ready(daemon.run), daemon.stop))
        port = daemon.broker_port
        service = CloudService(
            core=core,
            broker_host=setup.HOST,
            broker_port=port,
            username=setup.FOG_USERNAME,
            password=config.broker.password,
            clock=now_ms,
            store=store,
        )
        await stack.enter_async_context(
            running("demo.cloud", with_ready(service.run), service.stop)
        )
        expected = trust_expected()

        async def trusted() -> bool:
            counters = daemon.counters
            return all(counters.get(k, 0) >= v for k, v in expected.items())

        if not await wait_for("fog_trust_loaded", trusted, TRUST_WAIT_S_MAX):
            raise DemoError("the fog did not load the cloud's trust material in time")
        log.info("demo_trust_loaded", **expected)
        devices_account = BrokerAddress(
            setup.HOST, port, setup.DEVICE_USERNAME, config.broker.device_password
        )
        client = await stack.enter_async_context(mqtt_client(devices_account, "devices"))
        session = DeviceSession(
            client, fog_id=cast.FOG_ID, fog_key=public_key(keys.fog), wildcard=True
        )
        plan = list(cast.plan_payments(seconds))
        outcomes = Outcomes()
        async with (
            session,
            demo_live.showing(outcomes, seconds=seconds, planned=len(plan), console=progress),
        ):
            await run_payments(session, devices, plan, outcomes)
            d2d = await demo_budget.obtain_and_pay(
                out,
                devices_account,
                devices[demo_budget.D2D_PAYER],
                public_key(keys.issuer),
                cast.EUR,
                outcomes,
            )
        log.info("demo_payments_done", sent=outcomes.sent, **dict(outcomes.by_status))

        async def booked() -> bool:
            counters = daemon.counters
            batches, records = await cloud_counts(store)
            sealed = counters.get("batch_sealed", 0)
            return records == counters.get("intent_authorized", 0) and batches == sealed

        all_booked = await wait_for("batches_booked", booked, BOOK_WAIT_S_MAX)
        returned = await demo_budget.return_leases([config.db])

        async def closed() -> bool:
            return await demo_budget.closed_count(store, returned) == len(returned)

        all_closed = await wait_for("leases_closed", closed, BOOK_WAIT_S_MAX)
        handed_in = await demo_budget.hand_in(d2d, devices_account, public_key(keys.issuer))
        sealed = daemon.counters.get("batch_sealed", 0)
    log.info("demo_budget_moved", leases_closed=all_closed, d2d_handed_in=handed_in)
    return outcomes, all_booked, sealed, d2d, returned


async def settle(store: Store, out: Path) -> dict[str, Any]:
    """Close a period over everything booked until now and write its files."""
    until = now_ms()
    cfg = CloudConfig(creditor=CREDITOR, debtor=DEBTOR, lease=LEASE_POLICY)
    args = argparse.Namespace(period=period_id_for(until), out=str(out / SETTLEMENT_DIR))

    async def fn(tx: Tx) -> dict[str, Any]:
        return await settle_and_write(tx, cfg, args, until, now_ms())

    report: dict[str, Any] = await store.transact(fn)
    return report


async def run_demo(
    out: Path,
    seconds: float,
    *,
    progress: Console | None = None,
    fogs: int = 1,
    cut_s: float = 0.0,
) -> dict[str, Any]:
    """The whole demo; returns the summary (also written to ``out/summary.json``). The
    progress display goes to ``progress`` (default: a console on stdout). ``fogs`` > 1:
    that many fogs bridged to a hub broker, fog-a's uplink cut for ``cut_s`` midway
    (``demo_fed``)."""
    keys = setup.new_keys(out)
    ids = demo_fed.fog_ids(fogs)
    fed_fogs = demo_fed.make_fogs(out, ids, keys) if fogs > 1 else []
    if fed_fogs:
        devices = demo_fed.open_devices(out, fed_fogs)
    else:
        devices = setup.open_devices(out, keys)
    store = await SqliteStore.open(str(out / setup.CLOUD_DB_FILE))
    extra: dict[str, Any] = {}
    try:
        await setup.register_world(
            store, keys, devices, now_ms=now_ms(), fog_id=ids[0], first_leases=not fed_fogs
        )
        if fed_fogs:
            await demo_fed.register_fogs(store, keys.issuer, fed_fogs)
        log.info("demo_world_registered", owners=len(cast.owners()), devices=len(devices))
        if fed_fogs:
            res = await demo_fed.pay_and_book(
                out,
                store,
                keys.issuer,
                fed_fogs,
                devices,
                seconds,
                cut_s=cut_s,
                book_wait_s=BOOK_WAIT_S_MAX + cut_s,
                progress=progress,
            )
            outcomes, all_booked, sealed = res.outcomes, res.all_booked, res.sealed
            d2d, returned = res.d2d, res.returned
            dbs = [f.config.db for f in fed_fogs]
            cut = res.cut
            extra = {
                "fog_ids": ids,
                "offline_authorized": demo_fed.offline_authorized(devices, cut),
                "replicated_records": demo_fed.replicated_records(fed_fogs),
                "cut": None
                if cut is None
                else {
                    "fog_id": cut.fog_id,
                    "seconds": cut.seconds,
                    "start_ms": cut.start_ms,
                    "end_ms": cut.end_ms,
                },
            }
        else:
            outcomes, all_booked, sealed, d2d, returned = await pay_and_book(
                out, store, keys, devices, seconds, progress
            )
            dbs = [out / setup.FOG_DB_FILE]
        report = await settle(store, out)
        held = demo_summary.held_receipt_ids(devices.values())
        cloud = await demo_summary.read_cloud(store, held)
        budget = demo_budget.summarize(
            demo_budget.fog_facts(dbs),
            await demo_budget.read_cloud(store, returned),
            demo_budget.d2d_accepted(d2d.payees.values()),
        )
        leases, transfers = await demo_report.read_ledger(store)
    finally:
        await store.close()
    facts = demo_summary.Facts(
        outcomes=outcomes,
        seconds=seconds,
        all_batches_booked=all_booked,
        fog_batches_sealed=sealed,
        report=report,
        settlement_dir=out / SETTLEMENT_DIR,
        budget=budget,
        **extra,
    )
    summary = demo_summary.build(facts, cloud, len(held))
    text = json.dumps(summary, indent=2, sort_keys=True) + "\n"
    (out / SUMMARY_FILE).write_text(text)
    draws = demo_report.draws_from(transfers, demo_report.receipt_times(devices.values()))
    end_ms = max([outcomes.started_ms + int(seconds * 1000), *(d.at_ms for d in draws)])
    charts = demo_report.drawdowns(leases, draws, end_ms=end_ms)
    page = demo_report.html_report(summary, charts, t0_ms=outcomes.started_ms, end_ms=end_ms)
    (out / REPORT_FILE).write_text(page, encoding="utf-8")
    return summary


def _route_logs(stream: TextIO) -> None:
    """structlog and the libraries' stdlib logging (warnings and up) to the demo's log."""
    configure(json=True, stream=stream, component="demo")
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("demo", help="run a cloud, a fog and simulated devices; print a summary")
    p.add_argument(
        "--out",
        default="demo-out",
        type=Path,
        help="output directory: new, empty, or written by an earlier demo (then emptied)",
    )
    p.add_argument(
        "--seconds",
        type=float,
        default=cast.PERIOD_SECONDS_DEFAULT,
        help=f"seconds of payments (at most {SECONDS_MAX:g})",
    )
    p.add_argument(
        "--fogs",
        type=int,
        default=1,
        help=f"fogs (1..{demo_fed.FOGS_MAX}); more than one: each with its broker, bridged to "
        "a hub broker where the cloud connects, peers of each other",
    )
    p.add_argument(
        "--cut-uplink",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="cut fog-a's bridge to the hub for SECONDS midway through the payments, then "
        "heal it (needs --fogs 2 or more)",
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON, not a table")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    if not 0 < args.seconds <= SECONDS_MAX:
        return fail("demo", f"--seconds must be in (0, {SECONDS_MAX:g}]", code=EXIT_USAGE)
    if not 1 <= args.fogs <= demo_fed.FOGS_MAX:
        return fail("demo", f"--fogs must be in 1..{demo_fed.FOGS_MAX}", code=EXIT_USAGE)
    if not 0 <= args.cut_uplink <= SECONDS_MAX:
        return fail("demo", f"--cut-uplink must be in [0, {SECONDS_MAX:g}]", code=EXIT_USAGE)
    if args.cut_uplink > 0 and args.fogs < 2:
        return fail("demo", "--cut-uplink needs --fogs 2 or more", code=EXIT_USAGE)
    out: Path = args.out
    try:
        prepare_out(out)
    except (DemoError, OSError) as exc:
        return fail("demo", describe(exc), code=EXIT_USAGE)
    with open(out / LOG_FILE, "a", encoding="utf-8") as stream:
        _route_logs(stream)
        try:
            # --json: stdout carries the summary alone, the progress goes to stderr
            progress = Console(file=sys.stderr) if args.json else None
            summary = asyncio.run(
                run_demo(
                    out, args.seconds, progress=progress, fogs=args.fogs, cut_s=args.cut_uplink
                )
            )
        except (FogpayError, OSError, aiomqtt.MqttError) as exc:  # OSError: TimeoutError too
            return fail("demo", f"failed: {describe(exc)} (see {out / LOG_FILE})")
        finally:
            structlog.reset_defaults()
            logging.getLogger().handlers.clear()
    if args.json:
        print(json.dumps(summary, sort_keys=True))
    else:
        print()
        print(demo_summary.table(summary))
        print(f"\nsummary      {out / SUMMARY_FILE}")
        print(f"report       {out / REPORT_FILE} (latency histogram, lease drawdown per owner)")
    return 0 if summary["ok"] else 1
