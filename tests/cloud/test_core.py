"""CloudCore: the handlers the MQTT shell calls; bad input is counted, never raised."""

from cloud.core import CloudCore
from cloud.events import (
    AlarmRaised,
    BatchArrived,
    BatchJudged,
    LeaseAnswered,
    LeaseReportArrived,
    LeaseRequestArrived,
    Publish,
    RetainedWanted,
    Status,
)
from cloud.leases import LeasePolicy
from cloud.store import Tx
from cloud.verify import CheckedBatch, check_batch
from protocol import topics
from protocol.batch import decode_batch
from protocol.errors import Declined
from protocol.leasing import LeaseReport, LeaseRequest
from protocol.messages import Ack, Lease
from protocol.reasons import Reason
from protocol.signing import open_envelope, public_key, seal
from tests.cloud.world import T0, World, count, new_key, snapshot


async def test_lease_request_and_report_through_the_core(world: World) -> None:
    w = world
    await w.owner("alice", limit=500)
    fog = await w.fog("fog-a")
    core = CloudCore(store=w.store, issuer=w.issuer, clock=w.clock, policy=LeasePolicy(300))
    req = seal(LeaseRequest(fog_id="fog-a", owner_id="alice", currency="EUR", time_ms=1), fog.key)
    [(topic, envelope)] = await core.lease_request(req)
    lease = open_envelope(envelope, Lease, signer=public_key(w.issuer)).msg
    assert lease.amount_micros == 300 and topic.endswith(lease.lease_id.hex())
    rep = seal(
        LeaseReport(
            lease_id=lease.lease_id, fog_id="fog-a", drawn_micros=0, last_batch=0, time_ms=2
        ),
        fog.key,
    )
    assert await core.lease_report(rep) == [(topic, b"")]
    assert topic not in dict(await core.retained())
    # the returned credit can be leased again
    req2 = seal(LeaseRequest(fog_id="fog-a", owner_id="alice", currency="EUR", time_ms=3), fog.key)
    assert len(await core.lease_request(req2)) == 1


async def test_bad_lease_messages_are_counted_not_raised(world: World) -> None:
    w = world
    await w.owner("alice", limit=500)
    await w.fog("fog-a")
    core = CloudCore(store=w.store, issuer=w.issuer, clock=w.clock, policy=LeasePolicy(300))
    before = await snapshot(w.store)
    forged = seal(
        LeaseRequest(fog_id="fog-a", owner_id="alice", currency="EUR", time_ms=1), new_key()
    )
    assert await core.lease_request(forged) == []
    assert await core.lease_request(b"\x94garbage") == []
    assert await core.lease_report(b"") == []
    assert core.metrics.get("lreq_refused_bad_signature") == 1
    assert core.metrics.get("lreq_refused_malformed") == 1
    assert core.metrics.get("lrep_refused_malformed") == 1
    assert await snapshot(w.store) == before


# ---- the typed entry point: inputs in, outputs out, time only from the input ---------------


def no_clock() -> int:
    raise AssertionError("the core read a clock: time must come with the input")


class CountingVerifier:
    """The real ``check_batch``, counting the wires it verifies."""

    def __init__(self) -> None:
        self.calls: list[bytes] = []

    async def __call__(self, wire: bytes) -> CheckedBatch:
        self.calls.append(wire)
        return check_batch(wire)


async def alice_pays(w: World, n: int = 3) -> list[bytes]:
    await w.owner("alice")
    fog = await w.fog("fog-a")
    device = await w.device("alice")
    lease_id = (await w.lease("alice", "fog-a", 10_000)).lease.lease_id
    wires = [
        fog.cut(
            [fog.authorize(device, seq=2 * b + i, lease_id=lease_id, payee="shop") for i in (1, 2)]
        )
        for b in range(n)
    ]
    return wires


async def test_a_batch_in_is_judged_booked_and_acked_at_the_inputs_time(world: World) -> None:
    w = world
    [wire] = await alice_pays(w, 1)
    verifier = CountingVerifier()
    core = CloudCore(
        store=w.store, issuer=w.issuer, clock=no_clock, policy=LeasePolicy(), verifier=verifier
    )
    now = T0 + 12_345
    out = await core.handle(BatchArrived(wire=wire, now_ms=now, topic=topics.batch_topic("fog-a")))
    [judged] = [o for o in out if isinstance(o, BatchJudged)]
    assert judged == BatchJudged(
        status=Status.BOOKED, fog_id="fog-a", number=1, booked=2, batches=1
    )
    [ack] = [o for o in out if isinstance(o, Publish)]
    assert ack.topic == topics.ack_topic("fog-a") and ack.retain
    assert open_envelope(ack.payload, Ack, signer=public_key(w.issuer)).msg.number == 1
    assert verifier.calls == [wire]  # verified once; nothing after decodes it again

    async def stored(tx: Tx) -> tuple[list[bytes], int, list[int]]:
        records = await tx.fetchall("SELECT record FROM records ORDER BY position")
        batch = await tx.fetchone("SELECT received_ms FROM batches")
        booked = await tx.fetchall("SELECT booked_ms FROM transfers")
        assert batch is not None
        return [bytes(r[0]) for r in records], batch[0], [r[0] for r in booked]

    # the records table keeps the bytes the verify step handed back: the wire's records
    assert await w.tx(stored) == (decode_batch(wire)[1], now, [now, now])


async def test_a_batch_on_another_fogs_topic_is_dropped_unchanged(world: World) -> None:
    w = world
    [wire] = await alice_pays(w, 1)
    core = CloudCore(store=w.store, issuer=w.issuer, clock=no_clock, policy=LeasePolicy())
    before = await snapshot(w.store)
    topic = topics.batch_topic("fog-b")
    out = await core.handle(BatchArrived(wire=wire, now_ms=T0, topic=topic))
    assert out == [
        BatchJudged(status=Status.DROPPED, fog_id="fog-a", number=1, reason=Reason.TOPIC_MISMATCH)
    ]
    assert await snapshot(w.store) == before
    assert core.metrics.get("batch_dropped_topic_mismatch") == 1
    # without a topic (a file, the command line) the header's fog is taken as it is
    out = await core.handle(BatchArrived(wire=wire, now_ms=T0))
    assert out[0] == BatchJudged(
        status=Status.BOOKED, fog_id="fog-a", number=1, booked=2, batches=1
    )


async def test_held_batches_released_by_the_gap_are_booked_and_acked_once(world: World) -> None:
    w = world
    wires = await alice_pays(w, 4)
    verifier = CountingVerifier()
    core = CloudCore(
        store=w.store, issuer=w.issuer, clock=no_clock, policy=LeasePolicy(), verifier=verifier
    )
    for wire in (wires[3], wires[1], wires[2]):
        [judged] = await core.handle(BatchArrived(wire=wire, now_ms=T0))
        assert isinstance(judged, BatchJudged) and judged.status is Status.HELD
    out = await core.handle(BatchArrived(wire=wires[0], now_ms=T0))
    judged, *rest = out
    assert judged == BatchJudged(
        status=Status.BOOKED, fog_id="fog-a", number=1, booked=8, batches=4
    )
    [ack] = rest  # one ack, the last: it names batch 4
    assert isinstance(ack, Publish)
    assert open_envelope(ack.payload, Ack).msg.number == 4
    assert await count(w.store, "held") == 0 and await count(w.store, "transfers") == 8
    # each held batch is verified when it arrives and again when it is booked
    assert verifier.calls == [wires[3], wires[1], wires[2], wires[0], *wires[1:]]


async def test_alarms_come_out_with_their_evidence(world: World) -> None:
    w = world
    await w.owner("alice")
    fog = await w.fog("fog-a")
    device = await w.device("alice")
    lease_id = (await w.lease("alice", "fog-a", 10_000)).lease.lease_id
    core = CloudCore(store=w.store, issuer=w.issuer, clock=no_clock, policy=LeasePolicy())
    a = fog.cut([fog.authorize(device, seq=7, lease_id=lease_id, amount=10)])
    b = fog.cut([fog.authorize(device, seq=7, lease_id=lease_id, amount=20)])
    await core.handle(BatchArrived(wire=a, now_ms=T0))
    out = await core.handle(BatchArrived(wire=b, now_ms=T0 + 5))
    [alarm] = [o for o in out if isinstance(o, AlarmRaised)]
    assert (alarm.kind, alarm.subject, alarm.fog_id) == (
        "cloned_key",
        public_key(device).hex(),
        "fog-a",
    )
    assert alarm.detail.startswith("q=7 intents ")
    assert topics.revoke_topic(public_key(device)) in {
        o.topic for o in out if isinstance(o, Publish)
    }
    stored = await w.tx(lambda tx: tx.fetchall("SELECT kind, time_ms FROM alarms"))
    assert [tuple(r) for r in stored] == [("cloned_key", T0 + 5)]


async def test_lease_inputs_are_answered_at_the_inputs_time(world: World) -> None:
    w = world
    await w.owner("alice", limit=500)
    fog = await w.fog("fog-a")
    policy = LeasePolicy(300, lease_ms=1_000)
    core = CloudCore(store=w.store, issuer=w.issuer, clock=no_clock, policy=policy)
    req = seal(LeaseRequest(fog_id="fog-a", owner_id="alice", currency="EUR", time_ms=1), fog.key)
    answered, published = await core.handle(LeaseRequestArrived(wire=req, now_ms=T0 + 7))
    assert isinstance(answered, LeaseAnswered) and isinstance(published, Publish)
    lease = open_envelope(published.payload, Lease).msg
    assert answered == LeaseAnswered(kind="lreq", result="granted", lease_id=lease.lease_id)
    assert lease.not_after_ms == T0 + 7 + 1_000
    # the second request: 200 left of the limit, the policy's initial 300 asked: 200 granted
    req2 = seal(LeaseRequest(fog_id="fog-a", owner_id="alice", currency="EUR", time_ms=2), fog.key)
    _, second = await core.handle(LeaseRequestArrived(wire=req2, now_ms=T0 + 8))
    assert isinstance(second, Publish)
    assert open_envelope(second.payload, Lease).msg.amount_micros == 200
    req3 = seal(LeaseRequest(fog_id="fog-a", owner_id="alice", currency="EUR", time_ms=3), fog.key)
    assert await core.handle(LeaseRequestArrived(wire=req3, now_ms=T0 + 9)) == [
        LeaseAnswered(kind="lreq", result="no_credit")
    ]
    assert await core.handle(LeaseReportArrived(wire=b"\x90", now_ms=T0)) == [
        LeaseAnswered(kind="lrep", result="refused", reason=Reason.MALFORMED)
    ]
    retained = await core.handle(RetainedWanted())
    assert published in retained and all(isinstance(o, Publish) for o in retained)


async def test_held_batches_left_behind_are_released_by_the_next_resend(world: World) -> None:
    """As after a crash between two release transactions: the verifier fails on the first
    held batch once (a fault injected around the real check_batch); what stays held is
    booked when the fog resends the first unacked batch."""
    w = world
    wires = await alice_pays(w, 4)
    failing: set[bytes] = set()

    async def verifier(wire: bytes) -> CheckedBatch:
        if wire in failing:
            failing.discard(wire)
            raise Declined(Reason.MALFORMED, "injected")
        return check_batch(wire)

    core = CloudCore(
        store=w.store, issuer=w.issuer, clock=no_clock, policy=LeasePolicy(), verifier=verifier
    )
    for wire in (wires[2], wires[3]):  # verified on arrival: the fault is armed after
        await core.handle(BatchArrived(wire=wire, now_ms=T0))
    failing.add(wires[2])
    await core.handle(BatchArrived(wire=wires[0], now_ms=T0))
    judged, ack = await core.handle(BatchArrived(wire=wires[1], now_ms=T0))
    assert judged == BatchJudged(
        status=Status.BOOKED, fog_id="fog-a", number=2, booked=2, batches=1
    )
    assert isinstance(ack, Publish) and open_envelope(ack.payload, Ack).msg.number == 2
    assert await count(w.store, "held") == 2
    judged, ack = await core.handle(BatchArrived(wire=wires[2], now_ms=T0))  # the resend
    assert judged == BatchJudged(
        status=Status.BOOKED, fog_id="fog-a", number=3, booked=4, batches=2
    )
    assert isinstance(ack, Publish) and open_envelope(ack.payload, Ack).msg.number == 4
    assert await count(w.store, "held") == 0 and await count(w.store, "transfers") == 8
