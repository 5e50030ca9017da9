"""Batch ingest against a real store: chain, idempotency, faults, alarms, books balanced."""

import asyncio
from dataclasses import dataclass

import nacl.signing
import pytest

from cloud import leases, ledger, registry
from cloud.ingest import Status
from cloud.store import Store, Tx
from protocol import topics
from protocol.batch import decode_batch, decode_record, encode_batch, encode_record
from protocol.leasing import LeaseReport
from protocol.messages import Ack, Intent, Revocation
from protocol.reasons import Reason
from protocol.signing import open_envelope, public_key, seal
from tests.cloud.world import FogLog, World, count, new_key, snapshot


@dataclass
class Scene:
    world: World
    fog: FogLog
    device: nacl.signing.SigningKey
    lease_id: bytes


@pytest.fixture
async def scene(world: World) -> Scene:
    await world.owner("alice")
    await world.owner("payee")
    fog = await world.fog("fog-a")
    device = await world.device("alice")
    granted = await world.lease("alice", "fog-a", 10_000)
    return Scene(world, fog, device, granted.lease.lease_id)


async def books_balanced(store: Store) -> ledger.LedgerCheck:
    result: ledger.LedgerCheck = await store.transact(ledger.check)
    assert result.ok, result
    return result


async def balance(store: Store, account: str) -> int:
    async def q(tx: Tx) -> int:
        return await ledger.balance(tx, account, "EUR")

    n: int = await store.transact(q)
    return n


async def test_batch_booked_acked_and_balanced(scene: Scene) -> None:
    w, fog = scene.world, scene.fog
    records = [
        fog.authorize(scene.device, seq=q, lease_id=scene.lease_id, amount=100 * q)
        for q in (1, 2, 3)
    ]
    out = await w.ingestor().ingest_batch(fog.cut(records))
    assert out.status is Status.BOOKED and out.booked == 3 and out.rejected == 0
    assert out.ack is not None
    ack = open_envelope(out.ack, Ack, signer=public_key(w.issuer)).msg
    assert (ack.fog_id, ack.number, ack.header_id) == ("fog-a", 1, fog.prev_id)
    assert await balance(w.store, "alice") == -600
    assert await balance(w.store, "payee") == 600
    check = await books_balanced(w.store)
    assert check.transfers == 3 and check.volume_micros == {"EUR": 600}


async def test_same_batch_twice_changes_nothing_and_gets_the_same_ack(scene: Scene) -> None:
    w, fog = scene.world, scene.fog
    wire = fog.cut([fog.authorize(scene.device, seq=1, lease_id=scene.lease_id)])
    ingestor = w.ingestor()
    first = await ingestor.ingest_batch(wire)
    before = await snapshot(w.store)
    again = await ingestor.ingest_batch(wire)
    assert again.status is Status.DUPLICATE and again.booked == 0
    assert again.ack == first.ack
    assert await snapshot(w.store) == before


async def test_an_intent_in_two_batches_is_booked_once(scene: Scene) -> None:
    w, fog = scene.world, scene.fog
    record = fog.authorize(scene.device, seq=1, lease_id=scene.lease_id, amount=700)
    ingestor = w.ingestor()
    await ingestor.ingest_batch(fog.cut([record]))
    # the fog (wrongly) logs the same intent again, with a new receipt at a new index
    intent_env, _ = decode_record(record)
    intent = open_envelope(intent_env, Intent)
    again = fog.receipt_record(
        intent_env, intent.id, public_key(scene.device), 1, scene.lease_id, w.now
    )
    out = await ingestor.ingest_batch(fog.cut([again]))
    assert out.status is Status.BOOKED and out.booked == 0 and out.duplicates == 1
    assert await balance(w.store, "alice") == -700
    await books_balanced(w.store)


async def test_gap_is_held_until_filled(scene: Scene) -> None:
    w, fog = scene.world, scene.fog
    b1 = fog.cut([fog.authorize(scene.device, seq=1, lease_id=scene.lease_id)])
    b2 = fog.cut([fog.authorize(scene.device, seq=2, lease_id=scene.lease_id)])
    b3 = fog.cut([fog.authorize(scene.device, seq=3, lease_id=scene.lease_id)])
    ingestor = w.ingestor()
    for wire in (b3, b2):
        held = await ingestor.ingest_batch(wire)
        assert held.status is Status.HELD and held.booked == 0 and held.ack is None
    assert await count(w.store, "transfers") == 0
    out = await ingestor.ingest_batch(b1)
    assert out.status is Status.BOOKED and out.booked == 3
    assert out.ack is not None
    assert open_envelope(out.ack, Ack).msg.number == 3
    assert await count(w.store, "held") == 0
    await books_balanced(w.store)


async def test_fork_raises_alarm_and_books_nothing(scene: Scene) -> None:
    w, fog = scene.world, scene.fog
    ingestor = w.ingestor()
    await ingestor.ingest_batch(
        fog.cut([fog.authorize(scene.device, seq=1, lease_id=scene.lease_id)])
    )
    # a second history of the same fog: another batch 1
    other = FogLog("fog-a", fog.key)
    fork = other.cut([other.authorize(scene.device, seq=5, lease_id=scene.lease_id)])
    before = await count(w.store, "transfers")
    out = await ingestor.ingest_batch(fork)
    assert out.status is Status.FORK and out.alarms == ["chain_fork"]
    assert await count(w.store, "transfers") == before
    # batch 2 whose h does not name batch 1
    other.number = 1
    fork2 = other.cut([other.authorize(scene.device, seq=6, lease_id=scene.lease_id)])
    out2 = await ingestor.ingest_batch(fork2)
    assert out2.status is Status.FORK
    assert await count(w.store, "transfers") == before
    await books_balanced(w.store)


@pytest.mark.parametrize("damage", ["garbage", "header_sig", "root", "count"])
async def test_bad_batch_is_refused_without_state_change(scene: Scene, damage: str) -> None:
    w, fog = scene.world, scene.fog
    records = [fog.authorize(scene.device, seq=1, lease_id=scene.lease_id)]
    wire = fog.cut(records)
    header, recs = decode_batch(wire)
    if damage == "garbage":
        wire = b"\x92\xc4\x01x"
    elif damage == "header_sig":
        wire = encode_batch(header[:-1] + bytes([header[-1] ^ 1]), recs)
    elif damage == "root":
        wire = encode_batch(header, [encode_record(b"a", b"b")])
    elif damage == "count":
        wire = encode_batch(header, recs * 2)
    ingestor = w.ingestor()
    before = await snapshot(w.store)
    out = await ingestor.ingest_batch(wire)
    assert out.status is Status.REFUSED
    assert out.reason in (Reason.MALFORMED, Reason.BAD_SIGNATURE)
    assert ingestor.metrics.get(f"batch_refused_{out.reason}") == 1
    assert await snapshot(w.store) == before


async def alarm_rows(store: Store) -> list[tuple[str, str, str, str]]:
    async def q(tx: Tx) -> list[tuple[str, str, str, str]]:
        rows = await tx.fetchall(
            "SELECT kind, subject, fog_id, detail FROM alarms ORDER BY subject"
        )
        return [(r[0], r[1], r[2], r[3]) for r in rows]

    got: list[tuple[str, str, str, str]] = await store.transact(q)
    return got


async def test_a_batch_signed_by_an_unregistered_fog_key_is_refused_and_alarmed(
    scene: Scene,
) -> None:
    """A fog acting on a fog credential the registry never registered: its devices hold ok
    receipts, the cloud books none of them. Refused as before, and an alarm with the
    evidence (one per fog and signing key, however many batches it sends)."""
    w, fog = scene.world, scene.fog
    rogue_key = new_key()
    rogue = FogLog("fog-a", rogue_key, next_index=fog.next_index)  # a key the cloud lacks
    records = [rogue.authorize(scene.device, seq=q, lease_id=scene.lease_id) for q in (1, 2)]
    wire = rogue.cut(records)
    header_id = rogue.prev_id  # the header id of the batch just cut
    ingestor = w.ingestor()
    before = await snapshot(w.store)
    out = await ingestor.ingest_batch(wire)
    assert out.status is Status.REFUSED and out.reason is Reason.BAD_SIGNATURE
    assert out.alarms == ["unregistered_fog_key"] and out.booked == 0
    after = await snapshot(w.store)
    assert {t: rows for t, rows in after.items() if t != "alarms"} == {
        t: rows for t, rows in before.items() if t != "alarms"
    }  # nothing booked, no chain moved
    signer = public_key(rogue_key).hex()
    [(kind, subject, fog_id, detail)] = await alarm_rows(w.store)
    assert (kind, subject, fog_id) == ("unregistered_fog_key", f"fog-a:{signer[:16]}", "fog-a")
    registered = public_key(fog.key).hex()
    assert f"signer={signer} registered={registered} batch=1 " in detail
    assert f"header={header_id.hex()} records=2" in detail
    # the same batch resent, and the next one: refused, no new alarm
    assert (await ingestor.ingest_batch(wire)).alarms == []
    nxt = rogue.cut([rogue.authorize(scene.device, seq=3, lease_id=scene.lease_id)])
    assert (await ingestor.ingest_batch(nxt)).status is Status.REFUSED
    assert len(await alarm_rows(w.store)) == 1
    assert ingestor.metrics.get("alarm_unregistered_fog_key") == 1
    assert ingestor.metrics.get("batch_refused_bad_signature") == 3
    # a fog id the registry has never heard of
    stranger = FogLog("fog-x", new_key())
    out = await ingestor.ingest_batch(
        stranger.cut([stranger.authorize(scene.device, seq=9, lease_id=scene.lease_id)])
    )
    assert out.status is Status.REFUSED and out.alarms == ["unregistered_fog_key"]
    rows = await alarm_rows(w.store)
    assert [r[2] for r in rows] == ["fog-a", "fog-x"] and "registered=none" in rows[1][3]
    await books_balanced(w.store)


async def test_bad_records_are_rejected_the_rest_booked(scene: Scene) -> None:
    w, fog = scene.world, scene.fog
    stranger = new_key()  # no binding
    good = fog.authorize(scene.device, seq=1, lease_id=scene.lease_id, amount=10)
    unbound = fog.authorize(stranger, seq=1, lease_id=scene.lease_id)
    wrong_fog = fog.authorize(scene.device, seq=2, lease_id=scene.lease_id, fog_id="fog-b")
    no_lease = fog.authorize(scene.device, seq=3, lease_id=bytes(16))
    wrong_cur = fog.authorize(scene.device, seq=4, lease_id=scene.lease_id, currency="USD")
    late = fog.authorize(scene.device, seq=5, lease_id=scene.lease_id, t=w.now + 2 * 86_400_000)
    out = await w.ingestor().ingest_batch(
        fog.cut([good, unbound, wrong_fog, no_lease, wrong_cur, late])
    )
    assert out.status is Status.BOOKED and out.booked == 1 and out.rejected == 5

    async def faults(tx: Tx) -> list[str]:
        rows = await tx.fetchall("SELECT reason FROM rejected ORDER BY position")
        return [r[0] for r in rows]

    assert await w.store.transact(faults) == [
        "unknown_device",
        "wrong_fog",
        "unknown_lease",
        "currency",
        "unknown_device",  # binding expired at the receipt's time
    ]
    assert await balance(w.store, "alice") == -10
    await books_balanced(w.store)


async def test_overdrawn_lease_is_booked_and_flagged(scene: Scene) -> None:
    w, fog = scene.world, scene.fog
    records = [
        fog.authorize(scene.device, seq=q, lease_id=scene.lease_id, amount=4_000) for q in (1, 2, 3)
    ]
    out = await w.ingestor().ingest_batch(fog.cut(records))
    assert out.booked == 3 and out.alarms == ["lease_overdrawn"]
    assert await balance(w.store, "alice") == -12_000
    await books_balanced(w.store)


async def test_cloned_key_suspends_the_device(scene: Scene) -> None:
    w, fog = scene.world, scene.fog
    ingestor = w.ingestor()
    a = fog.authorize(scene.device, seq=7, lease_id=scene.lease_id, amount=10)
    await ingestor.ingest_batch(fog.cut([a]))
    b = fog.authorize(scene.device, seq=7, lease_id=scene.lease_id, amount=20)
    out = await ingestor.ingest_batch(fog.cut([b]))
    assert out.alarms == ["cloned_key"] and out.booked == 1
    device = public_key(scene.device)
    published = dict(out.publish)
    rev = open_envelope(published[topics.revoke_topic(device)], Revocation)
    assert rev.signer == public_key(w.issuer) and rev.msg.key == device
    assert await w.store.transact(lambda tx: registry.is_revoked(tx, device))
    assert ingestor.metrics.get("alarm_cloned_key") == 1
    await books_balanced(w.store)


async def test_concurrent_ingest_books_each_intent_once(scene: Scene) -> None:
    w, fog = scene.world, scene.fog
    wires = [
        fog.cut(
            [
                fog.authorize(scene.device, seq=10 * b + i, lease_id=scene.lease_id, amount=1)
                for i in range(5)
            ]
        )
        for b in range(1, 4)
    ]
    ingestors = [w.ingestor() for _ in range(3)]
    jobs = [ing.ingest_batch(wire) for ing in ingestors for wire in wires * 2]
    outs = await asyncio.gather(*jobs)
    assert sum(o.booked for o in outs) == 15
    assert await count(w.store, "transfers") == 15
    assert await balance(w.store, "alice") == -15
    await books_balanced(w.store)


async def test_every_truncation_of_a_batch_is_refused_without_state_change(scene: Scene) -> None:
    w, fog = scene.world, scene.fog
    wire = fog.cut([fog.authorize(scene.device, seq=q, lease_id=scene.lease_id) for q in (1, 2)])
    ingestor = w.ingestor()
    before = await snapshot(w.store)
    cuts = sorted({*range(0, 40), *range(40, len(wire), 23), len(wire) - 1})
    for n in cuts:
        out = await ingestor.ingest_batch(wire[:n])
        assert out.status is Status.REFUSED and out.reason is Reason.MALFORMED
    assert ingestor.metrics.get("batch_refused_malformed") == len(cuts)
    assert await snapshot(w.store) == before
    assert (await ingestor.ingest_batch(wire)).booked == 2


async def test_lease_report_with_huge_batch_number_keeps_escrow(scene: Scene) -> None:
    w = scene.world
    rep = LeaseReport(
        lease_id=scene.lease_id, fog_id="fog-a", drawn_micros=0, last_batch=2**64 - 1, time_ms=1
    )
    wire = seal(rep, scene.fog.key)
    assert await w.tx(lambda tx: leases.handle_report(tx, wire)) == []
    assert await w.tx(lambda tx: leases.exposure(tx, "alice")) == 10_000
