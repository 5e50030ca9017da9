"""Budget that moves, in ``fogpay demo`` (docs/protocol.md 18): early return, peer transfers
and device-to-device payments, driven through the real components and read back from where
they live.

- **Device to device** (18.3): once the planned payments are done, the drone
  ``D2D_PAYER`` obtains a voucher from its fog (``edge.voucher.Payer.obtain``: an intent to
  the reserved payee ``voucher``, counted with the payments), then pays two payee devices
  that are not on any broker (a SkyLink relay mast, an AlpToll gate; state in
  ``DIR/d2d/NAME/``) with bundles only; each payee checks the bundle with the issuer key
  alone (``Payee.accept``). After the voucher intent is booked the payees hand their
  payments in (``Device.upload_held``) and the cloud books them (``voucher_payments``).
- **Early return** (18.1): after the last payment, every live lease of every fog is given
  back by the operator's path (``fog.returns.retire`` on the fog's database, what ``fogpay
  fog return-leases`` does, while the fog runs); the fog reports them, the cloud closes them,
  and the unused part returns to the owners' credit. The demo waits until every returned
  lease is closed.
- **Peer transfers** (18.2) happen inside the fogs (``lease.peer_transfers``); here they are
  only counted: the cloud's ``peer_transfers``, the givers' ``transfers_out``, the receivers'
  ``transfers_in``.
"""

import asyncio
import contextlib
import json
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import aiomqtt
import structlog

from cloud.store import Store, Tx, fetch_in
from edge.device import Device, PaymentDeclined, PaymentTimeout
from edge.voucher import D2D_IN_FILE, Payee, Payer
from fog import returns
from fog.schema import StoreOpenError, connect
from fogpay.demo_pay import Outcomes, Paid
from fogpay.demo_run import mqtt_client
from fogpay.provision import BrokerAddress
from protocol.errors import FogpayError

log = structlog.get_logger()

D2D_DIR: Final = "d2d"
D2D_PAYER: Final = "nordfleet-drone-01"  # no pay list in its binding: may buy a voucher
VOUCHER_MICROS: Final = 400_000  # 0.40 EUR, under the drones' 0.50 per-payment limit
D2D_PAYEES: Final = {"skylink-mast-01": "skylink", "alptoll-gate-01": "alptoll"}
D2D_PAYMENTS: Final = (  # (payee device, micros): 0.33 EUR of the voucher's 0.40
    ("skylink-mast-01", 50_000),
    ("alptoll-gate-01", 250_000),
    ("skylink-mast-01", 30_000),
)
OBTAIN_TIMEOUT_S: Final = 3.0
OBTAIN_RETRIES: Final = 3
UPLOAD_TIMEOUT_S: Final = 2.0
HAND_IN_WAIT_S: Final = 20.0


@dataclass(slots=True)
class D2D:
    """What the device-to-device part did, as the devices saw it."""

    payer: str = D2D_PAYER
    voucher_id: bytes | None = None
    voucher_micros: int = 0
    payees: dict[str, Device] = field(default_factory=dict)
    accepted: list[bytes] = field(default_factory=list)  # payment ids the payees kept
    handed_in: bool = False  # every payee's held records answered by the cloud


def open_payees(out: Path, payer: Device) -> dict[str, Device]:
    """The payee devices: never on a broker during the payment; they only need the fog id and
    key to open a device state (a payee checks bundles with the issuer key alone)."""
    return {
        name: Device.open(out / D2D_DIR / name, fog_id=payer.fog_id, fog_key=payer.fog_key)
        for name in D2D_PAYEES
    }


async def obtain_and_pay(
    out: Path,
    address: BrokerAddress,
    payer_device: Device,
    issuer_key: bytes,
    currency: str,
    outcomes: Outcomes,
) -> D2D:
    """The payer obtains a voucher through its fog (an ok payment in ``outcomes``), then pays
    the payee devices offline; each payee checks and keeps its bundles."""
    d2d = D2D(payees=open_payees(out, payer_device))
    payer = Payer(payer_device)
    start = 0
    try:
        async with mqtt_client(address, "d2d-payer") as client:
            start = time.perf_counter_ns()  # like a payment: from sealing, not connecting
            held = await payer.obtain(
                client,
                VOUCHER_MICROS,
                currency,
                timeout_s=OBTAIN_TIMEOUT_S,
                retries_max=OBTAIN_RETRIES,
            )
    except PaymentDeclined as exc:
        outcomes.by_status["declined"] += 1
        outcomes.by_reason[str(exc.reason)] += 1
        log.warning("demo_voucher_failed", outcome="declined", reason=str(exc.reason))
        return d2d
    except PaymentTimeout:
        outcomes.by_status["timeout"] += 1
        log.warning("demo_voucher_failed", outcome="timeout", reason="-")
        return d2d
    except aiomqtt.MqttError as exc:
        outcomes.by_status["error"] += 1
        log.warning("demo_voucher_failed", outcome="error", reason=str(exc))
        return d2d
    latency_us = (time.perf_counter_ns() - start) // 1000
    outcomes.by_status["ok"] += 1
    outcomes.latency.record(latency_us)
    outcomes.drawn[D2D_PAYER] += VOUCHER_MICROS
    outcomes.paid.append(Paid(time.time_ns() // 1_000_000, D2D_PAYER, VOUCHER_MICROS, latency_us))
    d2d.voucher_id, d2d.voucher_micros = held.voucher.msg.voucher_id, VOUCHER_MICROS
    payees = {
        name: Payee(dev, payee_id=D2D_PAYEES[name], issuer_key=issuer_key)
        for name, dev in d2d.payees.items()
    }
    for name, micros in D2D_PAYMENTS:  # no network: bundles from the payer to each payee
        bundle = payer.pay(D2D_PAYEES[name], micros, voucher_id=d2d.voucher_id)
        d2d.accepted.append(payees[name].accept(bundle).payment.id)
    log.info("demo_d2d_paid", payments=len(d2d.accepted), voucher=d2d.voucher_id.hex()[:16])
    return d2d


async def hand_in(d2d: D2D, address: BrokerAddress, issuer_key: bytes) -> bool:
    """Each payee device hands its held payments in until the cloud answered them all (a
    payment whose voucher intent is not booked yet is answered by neither list: again)."""
    deadline = time.monotonic() + HAND_IN_WAIT_S
    while time.monotonic() < deadline:
        pending = [d for d in d2d.payees.values() if d.held_records()]
        if not pending:
            d2d.handed_in = True
            return True
        for device in pending:
            with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
                async with mqtt_client(address, "d2d-payee") as client:
                    await device.upload_held(
                        client, issuer_key=issuer_key, timeout_s=UPLOAD_TIMEOUT_S, retries_max=0
                    )
        await asyncio.sleep(0.2)
    log.error(
        "demo_d2d_not_handed_in", held=sum(len(d.held_records()) for d in d2d.payees.values())
    )
    return False


def _retire(path: Path) -> list[returns.Returned]:
    conn = connect(path)
    try:
        returns.init(conn)
        return returns.retire(conn, now_ms=time.time_ns() // 1_000_000, reason="operator")
    finally:
        conn.close()


async def return_leases(dbs: Iterable[Path]) -> list[bytes]:
    """The operator gives every live lease of every fog back (18.1), each fog's database on a
    connection of its own while the fog runs; returns the lease ids retired."""
    out = []
    for path in dbs:
        try:
            retired = await asyncio.to_thread(_retire, path)
        except (sqlite3.Error, StoreOpenError) as exc:
            log.error("demo_return_failed", db=str(path), error=str(exc))
            raise FogpayError(f"{path}: cannot return leases: {exc}") from None
        out += [r.lease_id for r in retired]
        log.info(
            "demo_leases_returned",
            db=str(path),
            leases=len(retired),
            micros=sum(r.room_micros for r in retired),
        )
    return out


async def closed_count(store: Store, lease_ids: Sequence[bytes]) -> int:
    async def fn(tx: Tx) -> int:
        rows = await fetch_in(
            tx,
            "SELECT lease_id FROM leases WHERE state = 'closed' AND lease_id IN ({in})",
            lease_ids,
        )
        return len(rows)

    n: int = await store.transact(fn)
    return n


# ---- facts, read back ------------------------------------------------------------------


def _rows(path: Path, sql: str) -> list[tuple[Any, ...]]:
    """Rows of ``sql`` in a fog's database (read only); none if the table is missing."""
    if not path.exists():
        return []
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        try:
            return list(db.execute(sql))
        except sqlite3.OperationalError:  # no such table: the fog never made one
            return []


def fog_facts(dbs: Iterable[Path]) -> dict[str, Any]:
    """From the fogs' databases: the leases returned early (``lease_returns``) and the
    transfers given (``transfers_out``) and received (``transfers_in``)."""
    returned: list[tuple[bytes, str, int, int]] = []  # (lease, currency, amount, drawn then)
    given: list[bytes] = []
    got: list[bytes] = []
    for path in dbs:
        sql = "SELECT lease_id, currency, amount_micros, drawn_micros FROM lease_returns"
        for r in _rows(path, sql):
            returned.append((bytes(r[0]), str(r[1]), int(r[2]), int(r[3])))
        given += [bytes(r[0]) for r in _rows(path, "SELECT transfer_id FROM transfers_out")]
        got += [bytes(r[0]) for r in _rows(path, "SELECT transfer_id FROM transfers_in")]
    return {"returned": returned, "given": given, "received": got}


def d2d_accepted(payees: Iterable[Device]) -> list[bytes]:
    """Payment ids the payee devices accepted (their ``d2d-in.jsonl``)."""
    out = []
    for d in payees:
        path = d.state_dir / D2D_IN_FILE
        if path.exists():
            out += [bytes.fromhex(json.loads(x)["id"]) for x in path.read_text().splitlines()]
    return out


async def read_cloud(store: Store, returned: Sequence[bytes]) -> dict[str, Any]:
    """From the cloud's database: the returned leases' state and report, the peer transfers
    and their sub-leases, the vouchers and the payments booked against them."""

    async def fn(tx: Tx) -> dict[str, Any]:
        leases = await fetch_in(
            tx,
            "SELECT lease_id, state, amount_micros, reported_micros FROM leases "
            "WHERE lease_id IN ({in})",
            list(returned),
        )
        transfers = await tx.fetchall(
            "SELECT t.transfer_id, t.amount_micros, l.state, l.drawn_micros, l.amount_micros, "
            "l.currency "
            "FROM peer_transfers t LEFT JOIN leases l ON l.lease_id = t.transfer_id"
        )
        vouchers = await tx.fetchall(
            "SELECT v.voucher_id, v.amount_micros, v.spent_micros, v.currency, "
            "(SELECT CAST(COALESCE(SUM(p.amount_micros), 0) AS BIGINT) FROM voucher_payments p "
            "WHERE p.voucher_id = v.voucher_id) FROM vouchers v"
        )
        payments = await tx.fetchall("SELECT payment_id FROM voucher_payments")
        return {
            "returned_leases": {
                bytes(r[0]): (str(r[1]), int(r[2]), None if r[3] is None else int(r[3]))
                for r in leases
            },
            "transfers": [
                (bytes(r[0]), int(r[1]), r[2], None if r[3] is None else int(r[3]), r[4], r[5])
                for r in transfers
            ],
            "vouchers": [
                (bytes(r[0]), int(r[1]), int(r[2]), str(r[3]), int(r[4])) for r in vouchers
            ],
            "payments": [bytes(r[0]) for r in payments],
        }

    result: dict[str, Any] = await store.transact(fn)
    return result


def _per_currency(pairs: Iterable[tuple[str, int]]) -> dict[str, int]:
    """Micros per currency (amounts of different currencies are never added)."""
    out: dict[str, int] = {}
    for currency, micros in pairs:
        out[currency] = out.get(currency, 0) + micros
    return dict(sorted(out.items()))


def summarize(fogs: dict[str, Any], cloud: dict[str, Any], accepted: list[bytes]) -> dict[str, Any]:
    """The summary's keys for this part and their invariants (docs/demo.md)."""
    returned = fogs["returned"]
    closed = cloud["returned_leases"]
    # every lease given back is closed at the cloud with the fog's final draw as its report
    returns_closed = all(
        lid in closed and closed[lid][0] == "closed" and closed[lid][2] == drawn
        for lid, _, _, drawn in returned
    )
    transfers = cloud["transfers"]
    ids = sorted(t[0] for t in transfers)
    # each transfer the cloud knows is one the giver made and the receiver got, its sub-lease
    # is of the amount moved, and nothing was drawn on it past that amount
    transfers_reconciled = ids == sorted(fogs["given"]) == sorted(fogs["received"]) and all(
        state is not None and drawn <= amount == sub
        for _, amount, state, drawn, sub, _ in transfers
    )
    vouchers = cloud["vouchers"]
    payments = cloud["payments"]
    return {
        "facts": {
            "transfers": len(transfers),
            "transfers_micros": _per_currency((t[5], t[1]) for t in transfers),
            "vouchers": len(vouchers),
            "d2d_accepted": len(accepted),
            "d2d_payments": len(payments),
            "d2d_micros": _per_currency((v[3], v[4]) for v in vouchers),
            "leases_returned": len(returned),
            "budget_returned_micros": _per_currency((c, a - d) for _, c, a, d in returned),
        },
        "invariants": {
            "returned_leases_closed": returns_closed,
            "transfers_reconciled": transfers_reconciled,
            "vouchers_within_amount": all(
                spent == paid <= amount for _, amount, spent, _, paid in vouchers
            ),
            "d2d_booked_once": sorted(accepted) == sorted(payments)
            and len(set(payments)) == len(payments),
        },
    }
