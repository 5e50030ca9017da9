"""``fogpay cloud settle``: close the period in the store and write its files.

Files (in ``--out``, per period): ``<period>.csv`` (every line), ``<period>-pain.008.xml``
(SEPA direct debits of the charges, when any), ``<period>-pain.001.xml`` (SEPA credit
transfers of the payouts, when any), ``<period>-report.json`` (reconciliation). They are
written to a temporary name and renamed, inside the period's transaction: if writing fails
the period is not closed.
"""

import argparse
import asyncio
import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cloud.config import CloudConfig
from cloud.iso20022 import pain001, pain008, settlement_csv
from cloud.settle import close_period
from cloud.store import Tx
from protocol.errors import FogpayError


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)


def period_id_for(until_ms: int) -> str:
    return "P" + datetime.fromtimestamp(until_ms / 1000, UTC).strftime("%Y%m%d%H%M%S")


async def settle_and_write(
    tx: Tx, cfg: CloudConfig, args: argparse.Namespace, until_ms: int, now_ms: int
) -> dict[str, Any]:
    period_id = args.period or period_id_for(until_ms)
    closed = await close_period(tx, period_id=period_id, until_ms=until_ms, now_ms=now_ms)
    created = datetime.fromtimestamp(now_ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    files = {f"{period_id}.csv": settlement_csv(closed.plan).encode()}
    if closed.plan.lines(kind="charge", rail="sepa"):
        if cfg.creditor is None:
            raise FogpayError("rails.creditor: needed for SEPA direct debits (config)")
        files[f"{period_id}-pain.008.xml"] = (
            pain008(closed.plan, creditor=cfg.creditor, created_at=created) or b""
        )
    if closed.plan.lines(kind="payout", rail="sepa"):
        if cfg.debtor is None:
            raise FogpayError("rails.debtor: needed for SEPA credit transfers (config)")
        files[f"{period_id}-pain.001.xml"] = (
            pain001(closed.plan, debtor=cfg.debtor, created_at=created) or b""
        )
    report = dict(closed.report) | {"files": [*sorted(files), f"{period_id}-report.json"]}
    files[f"{period_id}-report.json"] = json.dumps(report, indent=2, sort_keys=True).encode()
    await asyncio.to_thread(write_files, Path(args.out), files)
    return report


def write_files(out: Path, files: dict[str, bytes]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        _write(out / name, data)
