"""The demo's summary: facts read back from the cloud's store, the devices' receipt files and
the settlement files, the invariants over them, and a readable table.

Every figure is read from where it lives, never from what the demo meant to do: receipts
from each device's ``receipts.jsonl`` (re-verified under the fog's key), bookings and
balances from the cloud's tables, charges and payouts from the period's CSV.

Invariants (the demo exits 1 if one fails): payments were authorized, and every payment got
an answer (no timeout, no error); the ledger sums to zero in every currency and
every balance derives from the transfers (``cloud.ledger.check``); every ok receipt a device
holds is booked exactly once; every payment authorized is a receipt held; every sealed
batch was booked before the period closed; the reconciliation report is balanced.
"""

import csv
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cloud import ledger
from cloud.settlement import mask_funding_ref
from cloud.store import Store, Tx, fetch_in
from edge.device import Device
from fogpay import demo_cast as cast
from fogpay.demo_pay import Outcomes
from fogpay.demo_report import latency_bins, terminal_histogram
from protocol.money import format_micros, format_minor, minor_unit_micros

LINES_SHOWN_MAX: Final = 40


@dataclass(frozen=True, slots=True, kw_only=True)
class Facts:
    outcomes: Outcomes
    seconds: float
    all_batches_booked: bool
    fog_batches_sealed: int
    report: dict[str, Any]  # the period's reconciliation report (with "files")
    settlement_dir: Path
    fog_ids: tuple[str, ...] = (cast.FOG_ID,)
    offline_authorized: int = 0  # ok receipts signed by a fog while its uplink was cut
    replicated_records: int = 0  # records of the fogs' batches a peer holds
    cut: dict[str, Any] | None = None  # {"fog_id", "seconds", "start_ms", "end_ms"}
    budget: dict[str, Any] | None = None  # demo_budget.summarize: "facts", "invariants"


def held_receipt_ids(devices: Iterable[Device]) -> list[bytes]:
    """Intent ids of the ok receipts the devices hold (each file re-verified)."""
    return [r.msg.intent_id for d in devices for r in d.receipts() if r.msg.ok]


async def _count(tx: Tx, sql: str, params: tuple[object, ...] = ()) -> int:
    row = await tx.fetchone(sql, params)
    assert row is not None
    return int(row[0])


async def read_cloud(store: Store, held: list[bytes]) -> dict[str, Any]:
    async def fn(tx: Tx) -> dict[str, Any]:
        rows = await fetch_in(
            tx,
            "SELECT intent_id, COUNT(*) FROM transfers WHERE intent_id IN ({in}) "
            "GROUP BY intent_id",
            held,
        )
        # a sub-lease (a peer transfer, docs/protocol.md 18.2) is budget moved from another
        # lease of the owner: its draws count, its amount and itself do not (counted twice)
        sub = "lease_id IN (SELECT transfer_id FROM peer_transfers)"
        leases = await tx.fetchall(
            f"SELECT owner_id, currency, SUM(CASE WHEN {sub} THEN 0 ELSE 1 END), "
            f"CAST(SUM(CASE WHEN {sub} THEN 0 ELSE amount_micros END) AS BIGINT), "
            "CAST(SUM(drawn_micros) AS BIGINT), "
            f"SUM(CASE WHEN state = 'closed' AND NOT {sub} THEN 1 ELSE 0 END) FROM leases "
            "GROUP BY owner_id, currency "
            "ORDER BY owner_id"
        )
        carries = await tx.fetchall(
            "SELECT currency, CAST(SUM(charge_micros) AS BIGINT), "
            "CAST(SUM(payout_micros) AS BIGINT) FROM carries GROUP BY currency ORDER BY currency"
        )
        return {
            "booked_once": sum(1 for r in rows if int(r[1]) == 1),
            "booked_any": len(rows),
            "check": await ledger.check(tx),
            "batches": await _count(tx, "SELECT COUNT(*) FROM batches"),
            "records": await _count(tx, "SELECT COUNT(*) FROM records"),
            "rejected": await _count(tx, "SELECT COUNT(*) FROM rejected"),
            "alarms": await _count(tx, "SELECT COUNT(*) FROM alarms"),
            "leases": {
                r[0]: {
                    "currency": r[1],
                    "granted": int(r[2]),
                    "micros": int(r[3]),
                    "drawn_micros": int(r[4]),
                    "closed": int(r[5]),
                }
                for r in leases
            },
            "carried": {r[0]: {"charges": int(r[1]), "payouts": int(r[2])} for r in carries},
        }

    result: dict[str, Any] = await store.transact(fn)
    return result


def read_lines(csv_path: Path) -> list[dict[str, str]]:
    with open(csv_path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _sums(lines: list[dict[str, str]], kind: str) -> dict[str, int]:
    out: Counter[str] = Counter()
    for line in lines:
        if line["kind"] == kind:
            out[line["currency"]] += int(line["micros"])
    return dict(sorted(out.items()))


def _owners() -> list[dict[str, Any]]:
    counts = Counter(d.group.owner_id for d in cast.devices())
    return [
        {
            "owner_id": o.owner_id,
            "name": o.name,
            "currency": o.currency,
            "limit_micros": o.limit_micros,
            "funding": mask_funding_ref(o.funding_ref),
            "devices": counts[o.owner_id],
        }
        for o in cast.owners()
    ]


def build(facts: Facts, cloud: dict[str, Any], held: int) -> dict[str, Any]:
    """The summary.json object (see docs/demo.md for every key)."""
    o = facts.outcomes
    files = [str(facts.settlement_dir / name) for name in facts.report["files"]]
    csv_name = next(name for name in facts.report["files"] if name.endswith(".csv"))
    lines = read_lines(facts.settlement_dir / csv_name)
    check: ledger.LedgerCheck = cloud["check"]
    h = o.latency
    lost = held - int(cloud.get("booked_any", cloud["booked_once"]))
    summary: dict[str, Any] = {
        "fog_id": facts.fog_ids[0],
        "fogs": len(facts.fog_ids),
        "fog_ids": list(facts.fog_ids),
        "uplink_cut": facts.cut,
        "offline_authorized": facts.offline_authorized,
        "replicated_records": facts.replicated_records,
        "records_lost": lost,
        "seconds": facts.seconds,
        "owners": _owners(),
        "devices": len(cast.devices()),
        "sent": o.sent,
        "authorized": o.by_status["ok"],
        "declined": o.by_status["declined"],
        "timeouts": o.by_status["timeout"],
        "errors": o.by_status["error"],
        "skipped": o.skipped,
        "reasons": dict(sorted(o.by_reason.items())),
        "transient_resent": dict(sorted(o.resent.items())),
        "latency_ms": {
            "p50": h.percentile(50) / 1000,
            "p99": h.percentile(99) / 1000,
            "max": h.max_us / 1000,
        },
        "latency_histogram": latency_bins(p.latency_us for p in o.paid),
        "leases": cloud["leases"],
        "batches_sealed": facts.fog_batches_sealed,
        "batches": cloud["batches"],
        "records": cloud["records"],
        "booked": check.transfers,
        "rejected": cloud["rejected"],
        "alarms": cloud["alarms"],
        "ledger_sum_micros": sum(check.sums.values()),
        "ledger_sums_micros": dict(sorted(check.sums.items())),
        "receipts_held": held,
        "receipts_booked_once": cloud["booked_once"],
        "period_id": facts.report["period_id"],
        "charged_micros": _sums(lines, "charge"),
        "paid_out_micros": _sums(lines, "payout"),
        "carried_micros": cloud["carried"],
        "lines": [
            {
                k: x[k]
                for k in (
                    "line_id",
                    "kind",
                    "owner_id",
                    "currency",
                    "amount",
                    "micros",
                    "receipts",
                    "rail",
                    "note",
                )
            }
            for x in lines
        ],
        "reconciliation_balanced": bool(facts.report["balanced"]),
        "settlement_files": files,
    }
    budget = facts.budget or {"facts": {}, "invariants": {}}
    summary |= budget["facts"]
    summary["invariants"] = {
        "payments_authorized": summary["authorized"] > 0,
        "every_payment_answered": summary["timeouts"] == 0 and summary["errors"] == 0,
        "ledger_sum_zero": check.ok and summary["ledger_sum_micros"] == 0,
        "receipts_booked_once": held == cloud["booked_once"],
        "no_records_lost": lost == 0,
        "receipts_held_eq_authorized": held == summary["authorized"],
        "all_batches_booked": facts.all_batches_booked,
        "reconciliation_balanced": summary["reconciliation_balanced"],
        "settlement_files_exist": all(Path(f).is_file() for f in files),
        **budget["invariants"],
    }
    summary["ok"] = all(summary["invariants"].values())
    return summary


def _money(micros: int, currency: str) -> str:
    """In the currency's minor unit when exact ("12.30 EUR"), else to the micro."""
    unit = minor_unit_micros(currency)
    if micros % unit == 0:
        return f"{format_minor(micros // unit, currency)} {currency}"
    return format_micros(micros, currency)


def _kv(items: Mapping[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in items.items()) or "none"


def _fogs_word(s: dict[str, Any]) -> str:
    return "fog" if s.get("fogs", 1) == 1 else "fogs"


def _federation(s: dict[str, Any]) -> list[str]:
    """The fogs' line(s), with several fogs only (one fog's demo prints what it always did)."""
    if s.get("fogs", 1) == 1:
        return []
    lines = [
        f"fogs         {', '.join(s['fog_ids'])}; {s['replicated_records']} records held by "
        f"a peer; {s['records_lost']} receipts held by devices never booked"
    ]
    cut = s.get("uplink_cut")
    if cut:
        lines.append(
            f"uplink cut   {cut['fog_id']} for {cut['seconds']:g} s: {s['offline_authorized']} "
            "payments authorized meanwhile, booked after the heal"
        )
    return lines


def _moved(s: dict[str, Any]) -> list[str]:
    """Budget that moved (docs/protocol.md 18): early returns, peer transfers, vouchers."""
    if "budget_returned_micros" not in s:
        return []

    def money(per: dict[str, int]) -> str:
        return ", ".join(_money(v, k) for k, v in per.items()) or "none"

    transfers = (
        [
            f"transfers    {s['transfers']} between fogs ({money(s['transfers_micros'])}), "
            "reconciled by the cloud"
        ]
        if s.get("fogs", 1) > 1
        else []
    )
    return [
        f"returned     {s['leases_returned']} leases given back early: "
        f"{money(s['budget_returned_micros'])} back to the owners' credit",
        *transfers,
        f"d2d          {s['vouchers']} voucher(s); {s['d2d_accepted']} payments accepted "
        f"offline, {s['d2d_payments']} booked ({money(s['d2d_micros'])})",
    ]


def table(s: dict[str, Any]) -> str:
    """The summary as text for a terminal."""
    out = [
        f"fogpay demo: {s['devices']} devices at fog {s['fog_id']}, {s['seconds']:g} s of payments"
        if s.get("fogs", 1) == 1
        else f"fogpay demo: {s['devices']} devices at {s['fogs']} fogs, {s['seconds']:g} s of "
        "payments",
        "",
        f"{'owner':<12} {'name':<26} {'cur':<4} {'credit limit':>18} {'funding':<26} devices",
    ]
    for o in s["owners"]:
        limit = _money(o["limit_micros"], o["currency"]) if o["limit_micros"] else "(payee)"
        out.append(
            f"{o['owner_id']:<12} {o['name'][:26]:<26} {o['currency']:<4} {limit:>18} "
            f"{o['funding'][:26]:<26} {o['devices']}"
        )
    lat = s["latency_ms"]
    out += [
        "",
        f"payments     {s['sent']} sent: {s['authorized']} ok, {s['declined']} declined, "
        f"{s['timeouts']} timed out, {s['errors']} errors; {s['skipped']} skipped (device busy)",
        f"declined     {_kv(s['reasons'])}",
        f"resent       {_kv(s['transient_resent'])} (transient declines, same intent resent)",
        f"latency ms   p50 {lat['p50']:.1f}  p99 {lat['p99']:.1f}  max {lat['max']:.1f}",
        *(f"    {row}" for row in terminal_histogram(s["latency_histogram"]).splitlines()),
        "leases       "
        + "\n             ".join(
            f"{k} {v['granted']} ({v['closed']} closed): {_money(v['micros'], v['currency'])}"
            f", drawn {_money(v['drawn_micros'], v['currency'])}"
            for k, v in s["leases"].items()
        ),
        *_federation(s),
        *_moved(s),
        f"batches      {s['batches_sealed']} sealed by the {_fogs_word(s)}, {s['batches']} "
        f"booked by the cloud; {s['records']} records, {s['booked']} transfers, "
        f"{s['rejected']} rejected, {s['alarms']} alarms",
        f"ledger       sum {s['ledger_sum_micros']} micros ({_kv(s['ledger_sums_micros'])})",
        f"receipts     {s['receipts_held']} held by devices, {s['receipts_booked_once']} booked "
        "exactly once",
        "",
        f"settlement period {s['period_id']}",
        f"{'line':<24} {'kind':<7} {'owner':<12} {'amount':>14} {'receipts':>8}  rail",
    ]
    for x in s["lines"][:LINES_SHOWN_MAX]:
        note = f" ({x['note']})" if x["note"] else ""
        out.append(
            f"{x['line_id']:<24} {x['kind']:<7} {x['owner_id']:<12} "
            f"{x['amount'] + ' ' + x['currency']:>14} {x['receipts']:>8}  {x['rail']}{note}"
        )
    carried = "\n             ".join(
        f"{cur} charges {_money(c['charges'], cur)}, payouts {_money(c['payouts'], cur)}"
        for cur, c in s["carried_micros"].items()
    )
    out += [
        "charged      " + "; ".join(_money(v, k) for k, v in s["charged_micros"].items()),
        "paid out     " + "; ".join(_money(v, k) for k, v in s["paid_out_micros"].items()),
        "carried      (below one minor unit, owed next period)",
        f"             {carried}",
        "files        " + "\n             ".join(s["settlement_files"]),
        "",
        "invariants   "
        + "\n             ".join(
            f"{k:<28} {'ok' if v else 'FAILED'}" for k, v in s["invariants"].items()
        ),
    ]
    return "\n".join(out)
