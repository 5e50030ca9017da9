"""Batches: cut by count, size and age; chained by h; Merkle roots; kept until acked."""

import nacl.signing
import pytest

from fog.batcher import SealedBatch, records_that_fit
from protocol import limits, merkle
from protocol.batch import decode_batch, decode_record, encode_batch
from protocol.codec import pack
from protocol.messages import ZERO_HASH, Ack, BatchHeader, Intent, Receipt
from protocol.reasons import Reason
from protocol.signing import open_envelope, public_key, seal
from tests.fog.world import NOW, World


def authorize_many(world: World, count: int, *, now_ms: int = NOW) -> list[bytes]:
    """``count`` authorized intents from fresh devices; returns the intent envelopes."""
    owner = world.owner()
    world.lease(amount=10**12)
    devs = [world.device(owner) for _ in range(count)]
    payloads = [world.intent(d, 1, 1000, t=now_ms) for d in devs]
    out = world.send(*zip(devs, payloads, strict=True), now_ms=now_ms)
    assert all(o.status == "ok" for o in out)
    return payloads


def check_chain(world: World, batches: list[SealedBatch], *, prev: bytes = ZERO_HASH) -> None:
    """Headers verify with the fog key, chain by h, cover the log in order, roots match."""
    fog = public_key(world.fog_key)
    expected_first = batches[0].first_index if batches else 1
    for b in batches:
        header = open_envelope(b.header, BatchHeader, signer=fog)
        h = header.msg
        assert (h.fog_id, h.number, h.prev_id) == (world.fog_id, b.number, prev)
        assert h.first_index == b.first_index == expected_first and h.count == len(b.records)
        assert h.root == merkle.root_of_records(b.records)
        hashes = [merkle.leaf_hash(r) for r in b.records]
        for k in range(len(hashes)):
            proof = merkle.inclusion_proof(hashes, k)
            assert merkle.verify_inclusion(hashes[k], k, len(hashes), proof, h.root)
        wire_header, wire_records = decode_batch(b.wire)
        assert (wire_header, wire_records) == (b.header, b.records)
        # the uplink sends b.wire first and world.store.batch_wire on a resend: same bytes
        assert world.store.batch_wire(b.number) == b.wire
        for k, record in enumerate(b.records):
            intent_env, receipt_env = decode_record(record)
            receipt = open_envelope(receipt_env, Receipt, signer=fog).msg
            intent = open_envelope(intent_env, Intent)
            assert receipt.intent_id == intent.id and receipt.log_index == h.first_index + k
        prev, expected_first = header.id, h.first_index + h.count


def test_seal_by_count(world: World) -> None:
    authorize_many(world, 10)
    sealed = world.store.seal_due(now_ms=NOW, records_max=4, age_ms=60_000)
    assert [(b.number, b.first_index, len(b.records)) for b in sealed] == [(1, 1, 4), (2, 5, 4)]
    check_chain(world, sealed)
    assert world.store.seal_due(now_ms=NOW, records_max=4, age_ms=60_000) == []
    assert world.store.counters()["batches_sealed"] == 2


def test_seal_by_age(world: World) -> None:
    authorize_many(world, 3)
    assert world.store.seal_due(now_ms=NOW + 999, records_max=256, age_ms=1000) == []
    [b] = world.store.seal_due(now_ms=NOW + 1000, records_max=256, age_ms=1000)
    assert (b.number, b.first_index, len(b.records)) == (1, 1, 3)
    check_chain(world, [b])


def test_nothing_to_seal(world: World) -> None:
    assert world.store.seal_due(now_ms=NOW + 10**9, records_max=1, age_ms=0) == []


def test_chain_continues_across_reopen_and_unacked_kept(world: World) -> None:
    authorize_many(world, 5)
    first = world.store.seal_due(now_ms=NOW, records_max=2, age_ms=0)
    assert [len(b.records) for b in first] == [2, 2, 1]
    world.reopen()
    assert world.store.unacked_batches() == first
    # more intents, more batches: the chain carries on from the stored last header
    owner = world.owner("second")
    world.lease("second", amount=10**9)
    dev = world.device(owner, "second")
    assert world.pay(dev, 1).log_index == 6
    more = world.store.seal_due(now_ms=NOW, records_max=2, age_ms=0)
    check_chain(world, first + more)
    assert [b.number for b in world.store.unacked_batches()] == [1, 2, 3, 4]


def ack(
    world: World,
    batch: SealedBatch,
    *,
    key: nacl.signing.SigningKey | None = None,
    fog_id: str | None = None,
    header_id: bytes | None = None,
) -> bytes:
    hid = header_id or open_envelope(batch.header, BatchHeader).id
    msg = Ack(fog_id=fog_id or world.fog_id, number=batch.number, header_id=hid)
    return seal(msg, key or world.issuer)


def test_ack_applied_up_to_b(world: World) -> None:
    authorize_many(world, 6)
    batches = world.store.seal_due(now_ms=NOW, records_max=2, age_ms=0)
    out = world.store.apply_ack(ack(world, batches[1]))
    assert (out.status, out.number) == ("accepted", 2)
    assert world.store.unacked_batches() == batches[2:]
    assert world.store.apply_ack(ack(world, batches[1])).status == "duplicate"
    assert world.store.apply_ack(ack(world, batches[0])).status == "duplicate"
    world.reopen()
    assert world.store.unacked_batches() == batches[2:]
    assert world.store.apply_ack(ack(world, batches[2])).status == "accepted"
    assert world.store.unacked_batches() == []
    # replays of authorized intents are still answered after their batch is acked
    before = world.money_dump()
    assert world.store.seal_due(now_ms=NOW + 10**6, records_max=2, age_ms=0) == []
    assert world.money_dump() == before


def test_bad_acks_refused(world: World) -> None:
    authorize_many(world, 4)
    batches = world.store.seal_due(now_ms=NOW, records_max=2, age_ms=0)
    other = nacl.signing.SigningKey.generate()
    cases = [
        (ack(world, batches[0], key=other), Reason.BAD_SIGNATURE),
        (ack(world, batches[0], fog_id="fog-2"), Reason.WRONG_FOG),
        (ack(world, batches[0], header_id=bytes(32)), Reason.MALFORMED),
        (b"\x00", Reason.MALFORMED),
    ]
    for env, reason in cases:
        out = world.store.apply_ack(env)
        assert (out.status, out.reason) == ("refused", reason)
    unsealed = SealedBatch(3, batches[1].header, [], 5, b"")
    out = world.store.apply_ack(ack(world, unsealed))
    assert (out.status, out.reason) == ("refused", Reason.MALFORMED)
    assert world.store.unacked_batches() == batches
    assert world.store.counters()["acks_refused"] == 5


def test_records_that_fit_keeps_the_wire_under_one_mib() -> None:
    record = bytes(1040)
    n = records_that_fit([record] * limits.BATCH_RECORDS_MAX)
    assert 900 < n < limits.BATCH_RECORDS_MAX
    header = bytes(limits.IDENTITY_ENVELOPE_BYTES_MAX)
    assert len(encode_batch(header, [record] * n)) <= limits.BATCH_WIRE_BYTES_MAX
    assert len(pack([header, [record] * (n + 1)])) > limits.BATCH_WIRE_BYTES_MAX - 16
    assert records_that_fit([bytes(300)] * 10) == 10


@pytest.mark.parametrize("records_max", [1, 3, 7])
def test_batches_partition_the_log(world: World, records_max: int) -> None:
    authorize_many(world, 10)
    sealed = world.store.seal_due(now_ms=NOW + 1, records_max=records_max, age_ms=1)
    assert sum(len(b.records) for b in sealed) == 10
    check_chain(world, sealed)
