"""Records devices hand in (cloud/held.py, docs/protocol.md 17.7-17.8) and batches relayed by
another fog, against a real store (SQLite and PostgreSQL): booked once whatever path brings
them, the batch that later brings them still books the rest and moves the chain, leases close
at what was booked, refusals change nothing."""

import json

import pytest

from cloud import leases
from cloud.core import CloudCore
from cloud.events import HeldJudged, Publish
from cloud.ingest import ALARM_RECORD_REJECTED, Status
from cloud.leases import LeasePolicy
from cloud.proof import build_proof, verify_proof
from cloud.settle import close_period
from cloud.store import Tx
from protocol import topics
from protocol.batch import encode_record
from protocol.held import HeldAck, encode_held
from protocol.leasing import LeaseReport
from protocol.messages import Ack, Intent, Receipt
from protocol.signing import open_envelope, public_key, seal, seal_signed
from tests.cloud.world import World, count, new_key, snapshot


def core_of(w: World) -> CloudCore:
    return CloudCore(store=w.store, issuer=w.issuer, clock=w.clock, policy=LeasePolicy())


async def setup(w: World) -> bytes:
    await w.owner("alice")
    await w.owner("shop", limit=0)
    await w.fog("fog-a")
    return (await w.lease("alice", "fog-a", 1_000_000)).lease.lease_id


def hack_of(w: World, published: list[Publish], device: bytes) -> HeldAck:
    [hack] = [p for p in published if p.topic == topics.held_ack_topic(device)]
    assert hack.retain is False
    return open_envelope(hack.payload, HeldAck, signer=public_key(w.issuer)).msg


def intent_id(record: bytes) -> bytes:
    from protocol.batch import decode_record

    intent_env, _ = decode_record(record)
    return open_envelope(intent_env, Intent).id


async def drawn(w: World, lease_id: bytes) -> int:
    async def q(tx: Tx) -> int:
        row = await tx.fetchone("SELECT drawn_micros FROM leases WHERE lease_id = ?", (lease_id,))
        assert row is not None
        return int(row[0])

    n: int = await w.tx(q)
    return n


async def test_upload_books_then_the_batch_books_only_the_rest(world: World) -> None:
    w = world
    lease_id = await setup(w)
    device = await w.device("alice")
    d = public_key(device)
    fog = w.fogs["fog-a"]
    r1, r2, r3 = (
        fog.authorize(device, seq=q, lease_id=lease_id, amount=100_000, payee="shop")
        for q in (1, 2, 3)
    )
    core = core_of(w)
    judged, published = await core.held_upload(encode_held([r1, r2]), d)
    assert (judged.booked, judged.already, judged.rejected) == (2, 0, 0)
    ack = hack_of(w, published, d)
    assert (ack.device, list(ack.booked), ack.faults) == (d, [intent_id(r1), intent_id(r2)], [])
    assert await drawn(w, lease_id) == 200_000
    assert await count(w.store, "transfers") == 2
    # a proof without a batch: the receipt, its fog, its owner and binding
    proof = await w.tx(lambda tx: build_proof(tx, intent_id(r1)))
    assert proof is not None and "header" not in proof and proof["binding"]
    ok = verify_proof(json.dumps(proof), public_key(w.issuer))  # checks offline
    assert (ok.batch, ok.owner_id, ok.fog_id) == (None, "alice", "fog-a")

    # the same upload again: both listed booked, nothing changes
    before = await snapshot(w.store)
    judged, published = await core.held_upload(encode_held([r1, r2]), d)
    assert (judged.booked, judged.already) == (0, 2)
    assert list(hack_of(w, published, d).booked) == [intent_id(r1), intent_id(r2)]
    assert await snapshot(w.store) == before

    # the fog's batch brings all three: r1, r2 duplicates, r3 booked, the chain moves
    out = await core.ingest_batch(fog.cut([r1, r2, r3]))
    assert (out.status, out.booked, out.duplicates) == (Status.BOOKED, 1, 2)
    assert out.ack is not None and open_envelope(out.ack, Ack).msg.number == 1
    assert await count(w.store, "transfers") == 3
    assert await drawn(w, lease_id) == 300_000

    async def numbers(tx: Tx) -> list[tuple[int, int]]:
        rows = await tx.fetchall("SELECT number, position FROM transfers ORDER BY position")
        return [(int(a), int(b)) for a, b in rows]

    assert await w.tx(numbers) == [(1, 0), (1, 1), (1, 2)]  # pointed at the batch now
    proof = await w.tx(lambda tx: build_proof(tx, intent_id(r1)))
    assert proof is not None and proof["index"] == 0 and proof["size"] == 3

    # the fog reports the three draws: the lease closes at what was booked
    report = seal(
        LeaseReport(
            lease_id=lease_id, fog_id="fog-a", drawn_micros=300_000, last_batch=1, time_ms=1
        ),
        fog.key,
    )
    assert await core.lease_report(report) == [(topics.lease_topic("fog-a", lease_id), b"")]
    assert await w.tx(lambda tx: leases.exposure(tx, "alice")) == 300_000


async def test_a_reported_lease_closes_when_the_upload_brings_its_lost_draw(world: World) -> None:
    """The fog's batch lost a record (its disk); its report counts it; the device hands it in:
    the booked draws now equal the report and the lease closes."""
    w = world
    lease_id = await setup(w)
    device = await w.device("alice")
    fog = w.fogs["fog-a"]
    core = core_of(w)
    r1 = fog.authorize(device, seq=1, lease_id=lease_id, amount=70_000, payee="shop")
    await core.ingest_batch(fog.cut([r1]))
    r2 = fog.authorize(device, seq=2, lease_id=lease_id, amount=30_000, payee="shop")
    report = seal(
        LeaseReport(
            lease_id=lease_id, fog_id="fog-a", drawn_micros=100_000, last_batch=1, time_ms=1
        ),
        fog.key,
    )
    assert await core.lease_report(report) == []  # booked 70k: stays in escrow
    judged, published = await core.held_upload(encode_held([r2]), public_key(device))
    assert judged.booked == 1
    assert Publish(topic=topics.lease_topic("fog-a", lease_id), payload=b"") in published
    # settlement reads the uploaded record as the receipts' side and balances
    closed = await w.tx(lambda tx: close_period(tx, period_id="P1", until_ms=w.now, now_ms=w.now))
    assert closed.report["balanced"] is True, closed.report["mismatches"]


async def test_refused_records_change_nothing_and_are_named(world: World) -> None:
    w = world
    lease_id = await setup(w)
    device = await w.device("alice")
    other = await w.device("alice")
    d = public_key(device)
    fog = w.fogs["fog-a"]
    stranger = await w.fog("fog-x")
    stranger.key = new_key()  # signs receipts with a key the registry does not know
    core = core_of(w)
    good = fog.authorize(device, seq=1, lease_id=lease_id, payee="shop")
    not_mine = fog.authorize(other, seq=1, lease_id=lease_id, payee="shop")
    forged = stranger.authorize(device, seq=2, lease_id=lease_id, payee="shop")
    no_lease = fog.authorize(device, seq=3, lease_id=bytes(16), payee="shop")
    # a declined receipt is no payment
    intent = seal_signed(
        Intent(
            device=d,
            fog_id="fog-a",
            seq=4,
            payee_id="shop",
            amount_micros=5,
            currency="EUR",
            time_ms=w.now,
        ),
        device,
    )
    declined = seal(
        Receipt(
            intent_id=intent.id,
            device=d,
            seq=4,
            status="declined",
            reason="insufficient_budget",  # type: ignore[arg-type]
            time_ms=w.now,
        ),
        fog.key,
    )
    records = [good, not_mine, forged, no_lease, encode_record(intent.raw, declined)]
    judged, published = await core.held_upload(encode_held(records), d)
    assert (judged.booked, judged.rejected) == (1, 4)
    ack = hack_of(w, published, d)
    assert list(ack.booked) == [intent_id(good)]
    assert ack.faults == [
        (intent_id(not_mine), "malformed"),
        (intent_id(forged), "receipt_signer"),
        (intent_id(no_lease), "unknown_lease"),
        (intent.id, "receipt_not_ok"),
    ]
    assert await count(w.store, "transfers") == 1

    async def alarms(tx: Tx) -> list[tuple[str, str]]:
        return [(r[0], r[1]) for r in await tx.fetchall("SELECT kind, subject FROM alarms")]

    # only the fog-signed ok receipt nobody is charged for is an alarm; it names the upload
    [(kind, subject)] = await w.tx(alarms)
    assert kind == ALARM_RECORD_REJECTED
    assert subject.startswith(f"held:{d.hex()}:") and subject.endswith(":3")

    # a payload that does not decode: refused whole, unanswered, nothing changes
    before = await snapshot(w.store)
    judged, published = await core.held_upload(b"\x91\xa3abc", d)
    assert judged == HeldJudged(device=d, refused=True) and published == []
    assert await snapshot(w.store) == before
    assert core.metrics.get("held_refused") == 1


async def test_a_clone_caught_by_an_upload_is_suspended(world: World) -> None:
    w = world
    lease_id = await setup(w)
    device = await w.device("alice")
    d = public_key(device)
    fog = w.fogs["fog-a"]
    core = core_of(w)
    await core.ingest_batch(fog.cut([fog.authorize(device, seq=1, lease_id=lease_id)]))
    clone = fog.authorize(device, seq=1, lease_id=lease_id, amount=7, payee="elsewhere")
    judged, published = await core.held_upload(encode_held([clone]), d)
    assert judged.booked == 1  # booked, as a batch would
    assert any(p.topic == topics.revoke_topic(d) for p in published)
    assert core.metrics.get("alarm_cloned_key") == 1


async def test_a_relayed_batch_is_the_origins_batch(world: World) -> None:
    w = world
    lease_id = await setup(w)
    await w.fog("fog-b")
    device = await w.device("alice")
    fog = w.fogs["fog-a"]
    core = core_of(w)
    b1 = fog.cut([fog.authorize(device, seq=1, lease_id=lease_id)])
    b2 = fog.cut([fog.authorize(device, seq=2, lease_id=lease_id)])
    # on the carrier's relay topic: ingested as fog-a's batch, acked on fog-a's ack topic
    out = await core.ingest_batch(b1, topic=topics.relay_topic("fog-b"), relayed_by="fog-b")
    assert (out.status, out.fog_id, out.booked) == (Status.BOOKED, "fog-a", 1)
    assert [t for t, _ in out.publish] == [topics.ack_topic("fog-a")]
    # the origin's own copy later: a duplicate; the next one links on the same chain
    assert (
        await core.ingest_batch(b1, topic=topics.batch_topic("fog-a"))
    ).status is Status.DUPLICATE
    out = await core.ingest_batch(b2, topic=topics.relay_topic("fog-b"), relayed_by="fog-b")
    assert (out.status, out.number) == (Status.BOOKED, 2)
    assert core.metrics.get("batch_relayed") == 2
    # without relayed_by, another fog's topic is still dropped
    b3 = fog.cut([fog.authorize(device, seq=3, lease_id=lease_id)])
    assert (await core.ingest_batch(b3, topic=topics.batch_topic("fog-b"))).status is Status.DROPPED


@pytest.mark.parametrize("seed", [3, 11, 23])
async def test_any_interleaving_of_uploads_and_batches_books_each_intent_once(
    world: World, seed: int
) -> None:
    """Random uploads (subsets, repeats, any order) between a fog's batches: every record
    booked exactly once, the lease drawn exactly the sum, the chain at the last batch."""
    import random

    w = world
    lease_id = await setup(w)
    device = await w.device("alice")
    d = public_key(device)
    fog = w.fogs["fog-a"]
    core = core_of(w)
    rng = random.Random(seed)
    batches: list[list[bytes]] = []
    wires: list[bytes] = []
    seq = 0
    for _ in range(6):
        records = []
        for q in range(1, rng.randint(1, 5) + 1):
            seq += 1
            records.append(
                fog.authorize(device, seq=seq, lease_id=lease_id, amount=q, payee="shop")
            )
        batches.append(records)
        wires.append(fog.cut(records))  # each batch sealed after its records, as a fog does
    everything = [r for records in batches for r in records]
    pending = list(range(len(wires)))
    while pending:
        if rng.random() < 0.5:
            upload = rng.sample(everything, rng.randint(1, min(16, len(everything))))
            judged, _ = await core.held_upload(encode_held(upload), d)
            assert judged.booked + judged.already == len(set(upload))
        else:
            b = pending.pop(rng.randrange(len(pending)))  # out of order: some are held
            await core.ingest_batch(wires[b])
    for wire in wires:  # the fog resends what is not acked: all linked now
        await core.ingest_batch(wire)
    assert await count(w.store, "transfers") == len(everything)
    assert await drawn(w, lease_id) == sum(sum(range(1, len(r) + 1)) for r in batches)

    async def chain(tx: Tx) -> int:
        row = await tx.fetchone("SELECT number FROM chains WHERE fog_id = 'fog-a'")
        assert row is not None
        return int(row[0])

    assert await w.tx(chain) == len(wires)
