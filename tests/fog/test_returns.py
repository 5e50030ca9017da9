"""Early return of leases (docs/protocol.md 18.1, fog/returns.py): FogCore on a real SQLite
file. A lease given back is never drawn on again, durably (a restart changes nothing), and is
reported before its ``na`` with what was drawn; the report is resent until the cloud clears it."""

import sqlite3
from pathlib import Path
from typing import TypeVar

from fog import returns
from fog.config import BatchConfig, LeaseConfig, UplinkConfig
from fog.core import (
    BatchSend,
    Close,
    Connected,
    CoreConfig,
    FogCore,
    FogOutput,
    Intents,
    LeaseClosed,
    LeaseReport,
    LeaseRequest,
    LeaseReturned,
    Receipt,
    ReturnLeases,
    Sealed,
    Tick,
    TrustMessage,
)
from fog.schema import connect
from fog.store import Arrival
from protocol import topics
from protocol.leasing import LeaseReport as LeaseReportMsg
from protocol.leasing import LeaseRequest as LeaseRequestMsg
from protocol.messages import Lease
from protocol.reasons import Reason
from protocol.signing import open_envelope, public_key
from tests.fog.world import DAY_MS, NOW, World

AGE_MS = 1_000
IDLE_MS = 60_000
# idle owners are looked for every max(check_interval_ms, IDLE_MS / 10): a return may come
# that much after the owner became idle
PAST_IDLE_MS = IDLE_MS + IDLE_MS // 10 + 1_000
T = TypeVar("T")


def core_of(world: World, **lease: object) -> FogCore:
    config = CoreConfig(
        fog_id=world.fog_id,
        issuer_key=public_key(world.issuer),
        policy=world.policy,
        batch=BatchConfig(records_max=256, age_ms=AGE_MS, keep_acked_ms=0),
        uplink=UplinkConfig(window=4, ack_timeout_ms=10_000),
        lease=LeaseConfig(
            request_below_micros=1_000,
            request_micros=50_000_000,
            check_interval_ms=1_000,
            **lease,  # type: ignore[arg-type]
        ),
    )
    return FogCore.open(world.path, config=config, fog_key=world.fog_key)


def of(outputs: list[FogOutput], kind: type[T]) -> list[T]:
    return [o for o in outputs if isinstance(o, kind)]


def pay(core: FogCore, world: World, dev: object, seq: int, amount: int, now: int) -> Receipt:
    [receipt] = of(
        core.handle(
            Intents(
                arrivals=(Arrival(public_key(dev), world.intent(dev, seq, amount, t=now)),),  # type: ignore[arg-type]
                now_ms=now,
            )
        ),
        Receipt,
    )
    return receipt


def opened(report: LeaseReport, world: World) -> LeaseReportMsg:
    return open_envelope(report.payload, LeaseReportMsg, signer=public_key(world.fog_key)).msg


def not_after(world: World, lease_id: bytes) -> int:
    conn = sqlite3.connect(world.path)
    try:
        row = conn.execute("SELECT not_after_ms FROM leases WHERE lease_id = ?", (lease_id,))
        return int(row.fetchone()[0])
    finally:
        conn.close()


def test_an_idle_owner_s_lease_is_given_back_long_before_its_na(world: World) -> None:
    owner = world.owner()
    lease_id = world.lease(amount=10_000_000, na=NOW + DAY_MS)
    dev = world.device(owner)
    core = core_of(world, return_idle_ms=IDLE_MS)
    core.handle(Connected(now_ms=NOW))
    assert pay(core, world, dev, 1, 3_000, NOW).outcome.status == "ok"
    out = core.handle(Tick(now_ms=NOW + 2_000))  # sealed; the owner drew 2 s ago: kept
    assert of(out, LeaseReturned) == [] and of(out, LeaseReport) == []
    out = core.handle(Tick(now_ms=NOW + IDLE_MS - 1_000))  # idle, but not long enough
    assert of(out, LeaseReturned) == []
    out = core.handle(Tick(now_ms=NOW + PAST_IDLE_MS))
    [returned] = of(out, LeaseReturned)
    assert (returned.lease_id, returned.owner_id, returned.cause) == (lease_id, "acme", "idle")
    assert (returned.amount_micros, returned.drawn_micros) == (10_000_000, 3_000)
    [report] = of(out, LeaseReport)  # its one draw is sealed: reported in the same round
    msg = opened(report, world)
    assert (msg.lease_id, msg.drawn_micros, msg.last_batch) == (lease_id, 3_000, 1)
    assert msg.time_ms < NOW + DAY_MS  # long before the lease's na
    # never drawn on again: the owner's next payment finds no live lease and asks anew
    receipt = pay(core, world, dev, 2, 1_000, NOW + PAST_IDLE_MS + 1_000)
    assert receipt.outcome.reason is Reason.INSUFFICIENT_BUDGET
    [request] = of(core.handle(Tick(now_ms=NOW + PAST_IDLE_MS + 1_000)), LeaseRequest)
    assert open_envelope(request.payload, LeaseRequestMsg).msg.amount_micros is None  # first seen
    assert world.drawn()[lease_id] == (10_000_000, 3_000)
    # once the cloud cleared it, the lease is closed here too, and no report goes again
    cleared = TrustMessage(
        topic=topics.lease_topic(world.fog_id, lease_id),
        payload=b"",
        now_ms=NOW + PAST_IDLE_MS + 2_000,
    )
    assert of(core.handle(cleared), LeaseClosed) == [LeaseClosed(lease_id=lease_id)]
    assert of(core.handle(Tick(now_ms=NOW + 10 * IDLE_MS)), LeaseReport) == []


def test_activity_keeps_leases_and_idle_return_is_off_by_default(world: World) -> None:
    owner = world.owner()
    world.lease(amount=10_000_000, na=NOW + DAY_MS)
    dev = world.device(owner)
    core = core_of(world, return_idle_ms=IDLE_MS)
    core.handle(Connected(now_ms=NOW))
    core.handle(Tick(now_ms=NOW))  # the first round: idleness counts from here
    for k in range(1, 5):  # a draw every half idle period: never idle
        now = NOW + k * IDLE_MS // 2
        assert pay(core, world, dev, k, 1_000, now).outcome.status == "ok"
        assert of(core.handle(Tick(now_ms=now + AGE_MS)), LeaseReturned) == []
    core.handle(Close(now_ms=NOW))
    core = core_of(world)  # return_idle_ms = 0: off
    core.handle(Connected(now_ms=NOW))
    for k in range(1, 4):
        out = core.handle(Tick(now_ms=NOW + k * 10 * IDLE_MS))
        assert of(out, LeaseReturned) == [] and of(out, LeaseReport) == []


def test_an_operator_return_through_the_database_is_durable_and_reported(
    world: World,
) -> None:
    """``fogpay fog return-leases`` writes through its own connection while the core runs: the
    core's next group sees it (no cached lease survives another connection's commit), the next
    lease round reports it, and a restart changes nothing."""
    owner = world.owner()
    lease_id = world.lease(amount=10_000_000, na=NOW + DAY_MS)
    dev = world.device(owner)
    core = core_of(world)
    core.handle(Connected(now_ms=NOW))
    assert pay(core, world, dev, 1, 3_000, NOW).outcome.status == "ok"  # the lease is cached
    conn = connect(world.path)
    try:
        [r] = returns.retire(conn, now_ms=NOW + 1, reason="operator")
        assert returns.retire(conn, now_ms=NOW + 2, reason="operator") == []  # once
        assert [x.lease_id for x in returns.returned(conn)] == [lease_id]
    finally:
        conn.close()
    assert (r.lease_id, r.drawn_micros, r.room_micros, r.reason) == (
        lease_id,
        3_000,
        9_997_000,
        "operator",
    )
    receipt = pay(core, world, dev, 2, 1_000, NOW + 10)
    assert receipt.outcome.reason is Reason.INSUFFICIENT_BUDGET
    out = core.handle(Tick(now_ms=NOW + 2 * AGE_MS))
    [report] = of(out, LeaseReport)
    assert (opened(report, world).drawn_micros, opened(report, world).last_batch) == (3_000, 1)
    assert not_after(world, lease_id) == returns.RETIRED_NOT_AFTER_MS
    core.handle(Close(now_ms=NOW + 3 * AGE_MS))
    # a restart: still undrawable, and the same report goes again until cleared
    core = core_of(world)
    core.handle(Connected(now_ms=NOW + 4 * AGE_MS))
    assert [p.payload for p in of(core.handle(Tick(now_ms=NOW + 4 * AGE_MS)), LeaseReport)] == [
        report.payload
    ]
    receipt = pay(core, world, dev, 3, 1_000, NOW + 5 * AGE_MS)
    assert receipt.outcome.reason is Reason.INSUFFICIENT_BUDGET
    assert world.drawn()[lease_id] == (10_000_000, 3_000)


def test_a_return_at_shutdown_seals_at_once_and_reports_before_the_fog_stops(
    world: World,
) -> None:
    owner = world.owner()
    lease_id = world.lease(amount=10_000_000, na=NOW + DAY_MS)
    other = world.owner("bob")
    kept = world.lease("bob", amount=5_000_000, na=NOW + DAY_MS)
    dev = world.device(owner)
    core = core_of(world, return_on_stop=True)
    core.handle(Connected(now_ms=NOW))
    assert pay(core, world, dev, 1, 3_000, NOW).outcome.status == "ok"
    # one owner only: bob's lease stays live
    out = core.handle(ReturnLeases(now_ms=NOW + 5, owner_id="acme", cause="shutdown"))
    assert [r.lease_id for r in of(out, LeaseReturned)] == [lease_id]
    assert [s.records for s in of(out, Sealed)] == [1]  # sealed now, not after age_ms
    [report] = of(out, LeaseReport)
    assert (opened(report, world).drawn_micros, opened(report, world).last_batch) == (3_000, 1)
    assert [b.number for b in of(out, BatchSend)] == [1]  # the batch the report names goes too
    assert not_after(world, kept) == NOW + DAY_MS
    bob_dev = world.device(other, owner_id="bob")
    assert pay(core, world, bob_dev, 1, 1_000, NOW + 10).outcome.status == "ok"
    # an unknown cause is refused without changing anything
    out = core.handle(ReturnLeases(now_ms=NOW + 11, cause="whim"))
    assert of(out, LeaseReturned) == [] and not_after(world, kept) == NOW + DAY_MS


def test_a_lease_that_just_arrived_or_an_owner_asking_is_not_idle(world: World) -> None:
    owner = world.owner()
    dev = world.device(owner)
    core = core_of(world, return_idle_ms=IDLE_MS)
    core.handle(Connected(now_ms=NOW))
    core.handle(Tick(now_ms=NOW))
    late = NOW + 2 * IDLE_MS  # the fog has seen nothing of acme for two idle periods
    receipt = pay(core, world, dev, 1, 1_000, late)  # declined: no lease; acme is active
    assert receipt.outcome.reason is Reason.INSUFFICIENT_BUDGET
    env = world.lease_envelope(amount=10_000_000, na=NOW + DAY_MS)
    lease_id = open_envelope(env, Lease).msg.lease_id
    core.handle(
        TrustMessage(topic=topics.lease_topic(world.fog_id, lease_id), payload=env, now_ms=late)
    )
    out = core.handle(Tick(now_ms=late + IDLE_MS - 1_000))
    assert of(out, LeaseReturned) == []
    out = core.handle(Tick(now_ms=late + PAST_IDLE_MS))  # nobody used it: given back
    assert [(r.lease_id, r.drawn_micros) for r in of(out, LeaseReturned)] == [(lease_id, 0)]
    [report] = of(out, LeaseReport)
    assert (opened(report, world).drawn_micros, opened(report, world).last_batch) == (0, 0)


def test_retire_is_one_transaction_and_never_takes_a_reported_or_expired_lease(
    tmp_path: Path, world: World
) -> None:
    owner = world.owner()
    live = world.lease(amount=1_000_000, na=NOW + DAY_MS)
    expired = world.lease(amount=1_000_000, na=NOW + 1_000)
    world.device(owner)
    conn = connect(world.path)
    try:
        assert returns.has_tables(conn)
        assert returns.live_owners(conn, now_ms=NOW + 2_000) == ["acme"]
        retired = returns.retire(conn, now_ms=NOW + 2_000, reason="idle", owner_ids=["nobody"])
        assert retired == []
        [r] = returns.retire(conn, now_ms=NOW + 2_000, reason="idle")
        assert r.lease_id == live  # the expired one is the ordinary report's
        assert returns.live_owners(conn, now_ms=NOW + 2_000) == []
    finally:
        conn.close()
    assert not_after(world, expired) == NOW + 1_000
    empty = connect(tmp_path / "empty.db")
    try:
        assert not returns.has_tables(empty)
    finally:
        empty.close()
