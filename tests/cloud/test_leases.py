"""Leases against a real store: the credit invariant, requests, reports, returns, settlement."""

import pytest

from cloud import leases
from cloud.booking import ALARM_LEASE_REPORT
from cloud.ingest import Status
from cloud.leases import LeasePolicy
from cloud.settle import close_period
from cloud.store import Tx
from protocol.errors import Declined
from protocol.leasing import LeaseReport, LeaseRequest
from protocol.messages import Lease
from protocol.reasons import Reason
from protocol.signing import open_envelope, public_key, seal
from tests.cloud.world import World, count, new_key

LIMIT = 1_000_000


async def exposure(w: World, owner: str = "alice") -> int:
    n: int = await w.tx(lambda tx: leases.exposure(tx, owner))
    return n


async def setup(w: World) -> None:
    await w.owner("alice", limit=LIMIT)
    await w.owner("shop", limit=0)
    await w.fog("fog-a")
    await w.fog("fog-b")


def request(w: World, fog: str, amount: int | None, t: int, **kw: object) -> bytes:
    msg = LeaseRequest(
        fog_id=fog, owner_id="alice", currency="EUR", amount_micros=amount, time_ms=t
    )
    return seal(msg, kw.get("key") or w.fogs[fog].key)  # type: ignore[arg-type]


async def ask(w: World, wire: bytes, policy: LeasePolicy | None = None) -> leases.Granted | None:
    pol = policy or LeasePolicy(initial_micros=300_000, request_micros_max=600_000)

    async def fn(tx: Tx) -> leases.Granted | None:
        return await leases.handle_request(tx, w.issuer, wire, now_ms=w.now, policy=pol)

    granted: leases.Granted | None = await w.tx(fn)
    return granted


async def test_grants_never_exceed_the_credit_limit(world: World) -> None:
    w = world
    await setup(w)
    first = await ask(w, request(w, "fog-a", None, 1))  # initial lease by policy
    assert first is not None and first.lease.amount_micros == 300_000
    second = await ask(w, request(w, "fog-b", 900_000, 2))  # capped by request_micros_max
    assert second is not None and second.lease.amount_micros == 600_000
    third = await ask(w, request(w, "fog-a", 900_000, 3))  # what is left
    assert third is not None and third.lease.amount_micros == 100_000
    assert await ask(w, request(w, "fog-b", 1, 4)) is None  # nothing left: refused
    assert await exposure(w) == LIMIT
    lease = open_envelope(third.envelope, Lease, signer=public_key(w.issuer)).msg
    assert lease.fog_id == "fog-a" and lease.not_after_ms > w.now


async def test_request_is_idempotent_and_must_be_the_fogs(world: World) -> None:
    w = world
    await setup(w)
    wire = request(w, "fog-a", 50_000, 1)
    a, b = await ask(w, wire), await ask(w, wire)
    assert a is not None and b is not None and a.envelope == b.envelope
    assert await count(w.store, "leases") == 1
    forged = request(w, "fog-a", 50_000, 2, key=new_key())
    with pytest.raises(Declined) as exc:
        await ask(w, forged)
    assert exc.value.reason is Reason.BAD_SIGNATURE
    assert await count(w.store, "leases") == 1


async def report(w: World, fog: str, lease_id: bytes, drawn: int, batch: int) -> list[str]:
    msg = LeaseReport(
        lease_id=lease_id, fog_id=fog, drawn_micros=drawn, last_batch=batch, time_ms=1
    )
    wire = seal(msg, w.fogs[fog].key)
    cleared: list[str] = await w.tx(lambda tx: leases.handle_report(tx, wire))
    return cleared


async def test_report_returns_the_unused_part_once_batches_are_held(world: World) -> None:
    w = world
    await setup(w)
    device = await w.device("alice")
    lease_id = (await w.lease("alice", "fog-a", 400_000)).lease.lease_id
    fog = w.fogs["fog-a"]
    b1 = fog.cut([fog.authorize(device, seq=1, lease_id=lease_id, amount=150_000, payee="shop")])
    b2 = fog.cut([fog.authorize(device, seq=2, lease_id=lease_id, amount=50_000, payee="shop")])
    ingestor = w.ingestor()
    await ingestor.ingest_batch(b1)
    # the fog reports 200k drawn up to batch 2; the cloud holds only batch 1: stays escrowed
    assert await report(w, "fog-a", lease_id, 200_000, 2) == []
    assert await exposure(w) == 400_000
    out = await ingestor.ingest_batch(b2)
    assert out.status is Status.BOOKED
    assert [t for t, p in out.publish if p == b""] == [f"fogpay/1/fog-a/lease/{lease_id.hex()}"]
    # closed: only the booked, unsettled draws count now
    assert await exposure(w) == 200_000
    await w.tx(lambda tx: close_period(tx, period_id="P1", until_ms=w.now, now_ms=w.now))
    assert await exposure(w) == 0  # 200_000 micros = 20 cents: no carry


async def test_expired_unreported_lease_stays_counted(world: World) -> None:
    w = world
    await setup(w)
    await w.lease("alice", "fog-a", 700_000)
    w.now += 10 * 3_600_000  # long expired
    assert await exposure(w) == 700_000
    partial = await w.lease("alice", "fog-b", 400_000)
    assert partial.lease.amount_micros == 300_000  # what the escrowed lease leaves
    with pytest.raises(Declined) as exc:
        await w.lease("alice", "fog-b", 1)
    assert exc.value.reason is Reason.INSUFFICIENT_BUDGET
    assert await exposure(w) == LIMIT


async def test_report_that_disagrees_keeps_escrow_and_alarms(world: World) -> None:
    w = world
    await setup(w)
    device = await w.device("alice")
    lease_id = (await w.lease("alice", "fog-a", 400_000)).lease.lease_id
    fog = w.fogs["fog-a"]
    await w.ingestor().ingest_batch(
        fog.cut([fog.authorize(device, seq=1, lease_id=lease_id, amount=100_000, payee="shop")])
    )
    assert await report(w, "fog-a", lease_id, 10, 1) == []
    assert await exposure(w) == 400_000

    async def kinds(tx: Tx) -> list[str]:
        return [r[0] for r in await tx.fetchall("SELECT kind FROM alarms")]

    assert await w.tx(kinds) == [ALARM_LEASE_REPORT]


async def test_a_resent_request_does_not_bring_back_a_closed_lease(world: World) -> None:
    w = world
    await setup(w)
    wire = request(w, "fog-a", 50_000, 1)
    granted = await ask(w, wire)
    assert granted is not None
    # the fog reports nothing drawn; with no batch to wait for, the lease closes at once
    cleared = await report(w, "fog-a", granted.lease.lease_id, 0, 0)
    assert cleared == [granted.topic]
    # a late copy of the same request (the fog resends until it sees a lease) must not put
    # the closed lease back on the retained topic the cloud just cleared
    assert await ask(w, wire) is None
    assert await count(w.store, "leases") == 1
