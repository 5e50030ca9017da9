"""``fogpay cloud settle``: close the period in the store and write its files.

Files (in ``--out``, per period): ``<period>.csv`` (every line), ``<period>-pain.008.xml``
(SEPA direct debits of the charges, when any), ``<period>-pain.001.xml`` (SEPA credit
transfers of the payouts, when any), ``<period>-report.json`` (reconciliation). They are
written to a temporary name and renamed, inside the period's transaction: if writing fails
the period is not closed.

Before anything is written, every pain file is checked against the official ISO 20022 XSD
shipped in ``cloud/schemas/`` (xmlschema) and against the SEPA rules the XSD leaves out
(``cloud.sepa.check_document``). The builders in ``cloud.iso20022`` already check every
value, so this is the last line of defence: a file a bank would reject is never handed over.
A failure raises ``SettlementFileError`` naming the file and the first error, and writes
nothing at all (not the CSV either), so the period is not closed.
"""

import argparse
import asyncio
import functools
import importlib.resources
import json
import os
import re
import xml.etree.ElementTree as ET
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import xmlschema

from cloud.config import CloudConfig
from cloud.iso20022 import PAIN001_NS, PAIN008_NS, pain001, pain008, settlement_csv
from cloud.sepa import SepaError, check_document
from cloud.settle import close_period
from cloud.store import Tx
from protocol.errors import FogpayError

# The root namespace of a pain document -> its XSD in cloud/schemas/ (package data)
SCHEMA_FILES: Final = {
    PAIN008_NS: "pain.008.001.02.xsd",
    PAIN001_NS: "pain.001.001.03.xsd",
}
_NS_PREFIX: Final = re.compile(r"\{[^}]*\}")


class SettlementFileError(FogpayError):
    """A settlement file failed its schema or the SEPA rules; nothing was written."""


@functools.cache
def schema(namespace: str) -> xmlschema.XMLSchema:
    """The shipped XSD of a pain namespace, parsed once per process (~0.5-1 s each)."""
    name = SCHEMA_FILES[namespace]
    with importlib.resources.as_file(importlib.resources.files("cloud") / "schemas" / name) as p:
        # local files only: the XSDs import nothing, and nothing may be fetched
        return xmlschema.XMLSchema(str(p), allow="local")


def check_file(name: str, data: bytes) -> None:
    """Raise SettlementFileError if ``name`` is a pain file that fails its XSD or the SEPA
    rules; other files (CSV, report) pass."""
    if not name.endswith(".xml"):
        return
    try:
        root = ET.fromstring(data)
    except ET.ParseError as exc:
        raise SettlementFileError(f"{name}: not XML: {exc}") from None
    namespace = root.tag[1:].split("}", 1)[0] if root.tag.startswith("{") else ""
    if namespace not in SCHEMA_FILES:
        raise SettlementFileError(f"{name}: no shipped schema for namespace {namespace!r}")
    error = next(schema(namespace).iter_errors(root), None)
    if error is not None:
        where = _NS_PREFIX.sub("", error.path or "")
        reason = _NS_PREFIX.sub("", error.reason or error.message)
        raise SettlementFileError(f"{name}: fails {SCHEMA_FILES[namespace]} at {where}: {reason}")
    try:
        check_document(data)
    except SepaError as exc:
        raise SettlementFileError(f"{name}: fails the SEPA rules: {exc}") from None


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
    """Check every file (``check_file``), then write each; a check failing writes nothing."""
    for name, data in files.items():
        check_file(name, data)
    out.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        _write(out / name, data)
