"""Replication between two real fog cores on real SQLite files (docs/protocol.md 17.2, 17.3):
an origin's sealed batch goes to its peer, which verifies and stores it and answers racc;
resends, forks, a full store, relay, fetch, and a restore that continues the chain."""

import sqlite3
from pathlib import Path

import nacl.signing
import pytest

from fog import restore
from fog.config import BatchConfig, FederationConfig, LeaseConfig, UplinkConfig
from fog.core import (
    CoreConfig,
    Counters,
    FogCore,
    FogOutput,
    Intents,
    Publish,
    Receipt,
    Stats,
    Tick,
    TrustLoaded,
    TrustMessage,
)
from fog.replicas import ReplicaEvent
from fog.store import Arrival, FogStore
from protocol import topics
from protocol.batch import decode_batch
from protocol.messages import Ack, BatchHeader, FogCredential, Lease
from protocol.replica import Fetch
from protocol.signing import open_envelope, public_key, seal
from tests.fog.world import DAY_MS, NOW, World

AGE_MS = 1_000
TIMEOUT_MS = 4_000


def worlds(tmp_path: Path) -> tuple[World, World]:
    a = World(tmp_path / "a.db", fog_id="fog-1")
    b = World(tmp_path / "b.db", fog_id="fog-2", issuer=a.issuer)
    for w in (a, b):
        for other in (a, b):
            cred = FogCredential(
                fog_id=other.fog_id,
                key=public_key(other.fog_key),
                not_before_ms=NOW - DAY_MS,
                not_after_ms=NOW + 365 * DAY_MS,
            )
            w.trust("fog", seal(cred, a.issuer))
    return a, b


def core_of(w: World, peers: tuple[str, ...], path: Path | None = None, **fed: int) -> FogCore:
    config = CoreConfig(
        fog_id=w.fog_id,
        issuer_key=public_key(w.issuer),
        policy=w.policy,
        batch=BatchConfig(records_max=256, age_ms=AGE_MS, keep_acked_ms=0),
        uplink=UplinkConfig(window=4, ack_timeout_ms=TIMEOUT_MS),
        lease=LeaseConfig(),
        federation=FederationConfig(peers=peers, replicas=1, relay_after_ms=5_000, **fed),
    )
    return FogCore.open(path or w.path, config=config, fog_key=w.fog_key)


def publishes(out: list[FogOutput], kind: str) -> list[Publish]:
    return [o for o in out if isinstance(o, Publish) and o.topic.endswith("/" + kind)]


def events(out: list[FogOutput]) -> list[str]:
    return [o.event for o in out if isinstance(o, ReplicaEvent)]


def pay(a: World, core: FogCore, n: int, now: int) -> list[Receipt]:
    owner = a.owner()
    a.lease(amount=10_000_000)
    devs = [a.device(owner) for _ in range(n)]
    arrivals = tuple(Arrival(public_key(d), a.intent(d, 1, 1_000)) for d in devs)
    out = core.handle(Intents(arrivals=arrivals, now_ms=now))
    return [o for o in out if isinstance(o, Receipt)]


def counters(core: FogCore) -> dict[str, int]:
    return next(o for o in core.handle(Stats(now_ms=NOW)) if isinstance(o, Counters)).as_dict()


def test_a_sealed_batch_is_replicated_verified_stored_and_acked(tmp_path: Path) -> None:
    a, b = worlds(tmp_path)
    origin, holder = core_of(a, ("fog-2",)), core_of(b, ("fog-1",))
    pay(a, origin, 3, NOW)
    assert counters(origin)["records_at_risk"] == 3  # unsealed
    out = origin.handle(Tick(now_ms=NOW + AGE_MS))
    sent = publishes(out, "batch")
    gossip = [p for p in sent if p.topic == topics.gossip_topic("fog-2", "batch")]
    assert len(gossip) == 1 and counters(origin)["records_at_risk"] == 3  # sealed, unsafe
    answer = holder.handle(TrustMessage(topic=gossip[0].topic, payload=gossip[0].payload,
                                        now_ms=NOW + AGE_MS))  # fmt: skip
    assert events(answer) == ["replica_stored"]
    racc = publishes(answer, "racc")[0]
    assert racc.topic == topics.gossip_topic("fog-1", "racc")
    conn = sqlite3.connect(b.path)
    assert conn.execute("SELECT origin, number FROM replicas").fetchall() == [("fog-1", 1)]
    acked = origin.handle(TrustMessage(topic=racc.topic, payload=racc.payload, now_ms=NOW))
    assert events(acked) == ["replica_acked"]
    assert counters(origin)["records_at_risk"] == 0  # held by k = 1 peer: safe
    # the same batch again (a resend): answered again, stored once
    again = holder.handle(TrustMessage(topic=gossip[0].topic, payload=gossip[0].payload,
                                       now_ms=NOW + 2 * AGE_MS))  # fmt: skip
    assert events(again) == ["replica_duplicate"] and publishes(again, "racc")
    assert conn.execute("SELECT count(*) FROM replicas").fetchone() == (1,)
    # its own batch is no replica
    own = origin.handle(TrustMessage(topic=topics.gossip_topic("fog-1", "batch"),
                                     payload=gossip[0].payload, now_ms=NOW))  # fmt: skip
    assert events(own) == ["replica_refused"] and not publishes(own, "racc")


def test_unacked_batches_go_again_and_to_the_next_peer(tmp_path: Path) -> None:
    a, _ = worlds(tmp_path)
    origin = core_of(a, ("fog-2", "fog-3"))
    pay(a, origin, 1, NOW)
    first = publishes(origin.handle(Tick(now_ms=NOW + AGE_MS)), "batch")
    assert [p.topic for p in first if "gossip" in p.topic] == [
        topics.gossip_topic("fog-2", "batch")
    ]
    later = origin.handle(Tick(now_ms=NOW + AGE_MS + TIMEOUT_MS))
    assert sorted(p.topic for p in publishes(later, "batch") if "gossip" in p.topic) == [
        topics.gossip_topic("fog-2", "batch"),
        topics.gossip_topic("fog-3", "batch"),
    ]


def test_a_fork_is_kept_as_evidence_and_tampered_bytes_are_refused(tmp_path: Path) -> None:
    a, b = worlds(tmp_path)
    origin = core_of(a, ("fog-2",))
    pay(a, origin, 2, NOW)
    wire = publishes(origin.handle(Tick(now_ms=NOW + AGE_MS)), "batch")[0].payload
    # another chain under the same fog key: batch 1 with other records
    other = World(tmp_path / "other.db", fog_id="fog-1", issuer=a.issuer, fog_key=a.fog_key)
    other_core = core_of(other, ("fog-2",))
    pay(other, other_core, 1, NOW)
    fork = publishes(other_core.handle(Tick(now_ms=NOW + AGE_MS)), "batch")[0].payload
    holder = core_of(b, ("fog-1",))
    topic = topics.gossip_topic("fog-2", "batch")
    assert events(holder.handle(TrustMessage(topic=topic, payload=wire, now_ms=NOW))) == [
        "replica_stored"
    ]
    out = holder.handle(TrustMessage(topic=topic, payload=fork, now_ms=NOW))
    assert events(out) == ["replica_fork"] and not publishes(out, "racc")
    conn = sqlite3.connect(b.path)
    assert conn.execute("SELECT count(*) FROM replica_forks").fetchone() == (1,)
    assert conn.execute("SELECT wire FROM replicas").fetchone() == (wire,)  # not replaced
    # tampered bytes are never stored
    bad = wire[:-3] + bytes([wire[-3] ^ 1]) + wire[-2:]
    out = core_of(b, ("fog-1",), path=b.path).handle(
        TrustMessage(topic=topic, payload=bad, now_ms=NOW)
    )
    assert events(out) == ["replica_refused"]


def test_replica_full(tmp_path: Path) -> None:
    a, b = worlds(tmp_path)
    origin = core_of(a, ("fog-2",))
    pay(a, origin, 1, NOW)
    wire = publishes(origin.handle(Tick(now_ms=NOW + AGE_MS)), "batch")[0].payload
    b.store.close()
    holder = core_of(b, ("fog-1",), replica_bytes_max=len(wire) - 1)
    out = holder.handle(
        TrustMessage(topic=topics.gossip_topic("fog-2", "batch"), payload=wire, now_ms=NOW)
    )
    assert events(out) == ["replica_full"] and not publishes(out, "racc")


def test_a_holder_relays_what_the_cloud_lacks_and_answers_a_fetch(tmp_path: Path) -> None:
    a, b = worlds(tmp_path)
    origin, holder = core_of(a, ("fog-2",)), core_of(b, ("fog-1",))
    pay(a, origin, 2, NOW)
    wire = publishes(origin.handle(Tick(now_ms=NOW + AGE_MS)), "batch")[0].payload
    holder.handle(TrustMessage(topic=topics.gossip_topic("fog-2", "batch"), payload=wire,
                               now_ms=NOW))  # fmt: skip
    assert not publishes(holder.handle(Tick(now_ms=NOW + 1_000)), "relay")  # too early
    relayed = publishes(holder.handle(Tick(now_ms=NOW + 6_000)), "relay")
    assert [(p.topic, p.payload) for p in relayed] == [(topics.relay_topic("fog-2"), wire)]
    # the cloud acks batch 1 of fog-1: nothing more to relay
    (header_id,) = sqlite3.connect(a.path).execute("SELECT header_id FROM batches").fetchone()
    ack = seal(Ack(fog_id="fog-1", number=1, header_id=header_id), a.issuer)
    holder.handle(TrustMessage(topic=topics.ack_topic("fog-1"), payload=ack, now_ms=NOW))
    assert not publishes(holder.handle(Tick(now_ms=NOW + 60_000)), "relay")
    # a fetch signed by fog-1 gets its batches; one signed by another key gets nothing
    fetch = seal(Fetch(fog_id="fog-1", from_number=1, time_ms=NOW), a.fog_key)
    got = holder.handle(
        TrustMessage(topic=topics.gossip_topic("fog-2", "fetch"), payload=fetch, now_ms=NOW)
    )
    assert [(p.topic, p.payload) for p in publishes(got, "batch")] == [
        (topics.gossip_topic("fog-1", "batch"), wire)
    ]
    replayed = holder.handle(
        TrustMessage(topic=topics.gossip_topic("fog-2", "fetch"), payload=fetch, now_ms=NOW)
    )
    assert events(replayed) == ["replica_refused"] and not publishes(replayed, "batch")
    old = seal(Fetch(fog_id="fog-1", from_number=1, time_ms=NOW - 600_000), a.fog_key)
    stale = holder.handle(
        TrustMessage(topic=topics.gossip_topic("fog-2", "fetch"), payload=old, now_ms=NOW)
    )
    assert events(stale) == ["replica_refused"] and not publishes(stale, "batch")
    forged = seal(Fetch(fog_id="fog-1", from_number=1, time_ms=NOW), b.fog_key)
    out = holder.handle(
        TrustMessage(topic=topics.gossip_topic("fog-2", "fetch"), payload=forged, now_ms=NOW)
    )
    assert events(out) == ["replica_refused"] and not publishes(out, "batch")


def test_a_restored_fog_continues_its_chain_and_replays_stored_receipts(tmp_path: Path) -> None:
    a, b = worlds(tmp_path)
    origin, holder = core_of(a, ("fog-2",)), core_of(b, ("fog-1",))
    owner = a.owner()
    lease = a.lease_envelope(amount=10_000_000)
    a.trust("lease", lease)
    dev = a.device(owner)
    old = a.intent(dev, 1, 1_000)
    first = origin.handle(Intents(arrivals=(Arrival(public_key(dev), old),), now_ms=NOW))
    receipt = next(o for o in first if isinstance(o, Receipt)).payload
    wire = publishes(origin.handle(Tick(now_ms=NOW + AGE_MS)), "batch")[0].payload
    holder.handle(TrustMessage(topic=topics.gossip_topic("fog-2", "batch"), payload=wire,
                               now_ms=NOW))  # fmt: skip
    origin.store.close()
    a.store.close()
    for suffix in ("", "-wal", "-shm"):  # the disk dies
        Path(f"{a.path}{suffix}").unlink(missing_ok=True)
    fetch = seal(Fetch(fog_id="fog-1", from_number=1, time_ms=NOW), a.fog_key)
    got = holder.handle(
        TrustMessage(topic=topics.gossip_topic("fog-2", "fetch"), payload=fetch, now_ms=NOW)
    )
    wires = [p.payload for p in publishes(got, "batch")]
    plan = restore.plan(wires, fog_id="fog-1", fog_public=public_key(a.fog_key), cloud_acked=0)
    assert plan.head == 1 and plan.records == 1
    store = FogStore.open(a.path, fog_id="fog-1", fog_key=a.fog_key,
                          issuer_key=public_key(a.issuer), policy=a.policy)  # fmt: skip
    lease_id = open_envelope(lease, Lease).msg.lease_id
    assert restore.import_into(store.connection, plan, retired_leases=[], now_ms=NOW) == 1
    store.close()
    a.store = a.open()  # trust for a new payment, loaded before the core reads it
    owner2 = a.owner("beta")
    a.lease("beta", amount=10_000_000)
    dev2 = a.device(owner2, "beta")
    restored = core_of(a, ("fog-2",))
    # a retransmission of the old intent gets its stored receipt, byte for byte
    replay = restored.handle(Intents(arrivals=(Arrival(public_key(dev), old),), now_ms=NOW + 5))
    r = next(o for o in replay if isinstance(o, Receipt))
    assert r.outcome.replay and r.payload == receipt
    # the lease the old records drew on is retired: refused, never drawn or reported
    out = restored.handle(TrustMessage(topic=topics.lease_topic("fog-1", lease_id),
                                       payload=lease, now_ms=NOW))  # fmt: skip
    assert [o.status for o in out if isinstance(o, TrustLoaded)] == ["refused"]
    # the chain continues after batch 1
    new = restored.handle(Intents(arrivals=(Arrival(public_key(dev2), a.intent(dev2, 1, 500)),),
                                  now_ms=NOW + 10))  # fmt: skip
    assert [(o.outcome.status, o.outcome.reason) for o in new if isinstance(o, Receipt)] == [
        ("ok", None)
    ]
    sealed = publishes(restored.handle(Tick(now_ms=NOW + 10 + AGE_MS)), "batch")
    headers = {open_envelope(decode_batch(p.payload)[0], BatchHeader).msg for p in sealed}
    header = max(headers, key=lambda h: h.number)  # (batch 1 goes to the peer again too)
    assert (header.number, header.first_index) == (2, 2)
    assert header.prev_id == open_envelope(decode_batch(wire)[0], BatchHeader).id


def test_a_restore_refuses_when_the_cloud_holds_more_than_the_peers(tmp_path: Path) -> None:
    a, _ = worlds(tmp_path)
    with pytest.raises(restore.RestoreError, match="new fog_id"):
        restore.plan([], fog_id="fog-1", fog_public=public_key(a.fog_key), cloud_acked=3)


def test_a_restore_takes_the_run_ending_at_the_highest_and_refuses_a_gap(tmp_path: Path) -> None:
    a, _ = worlds(tmp_path)
    origin = core_of(a, ("fog-2",))
    wires = []
    for i in range(3):
        pay(a, origin, 1, NOW + i * 10 * AGE_MS)
        out = origin.handle(Tick(now_ms=NOW + i * 10 * AGE_MS + AGE_MS))
        wires.append(publishes(out, "batch")[-1].payload)
    numbers = [restore.batch_number(w) for w in wires]
    assert numbers == [1, 2, 3]
    me = public_key(a.fog_key)
    whole = restore.plan(wires, fog_id="fog-1", fog_public=me, cloud_acked=0)
    assert [b.number for b in whole.batches] == [1, 2, 3]
    # the cloud holds 1: batches 2 and 3 are enough (the newest acked one may be pruned)
    tail = restore.plan(wires[1:], fog_id="fog-1", fog_public=me, cloud_acked=1)
    assert [b.number for b in tail.batches] == [2, 3]
    with pytest.raises(restore.RestoreError, match="on no peer"):  # batch 2 is nowhere
        restore.plan([wires[0], wires[2]], fog_id="fog-1", fog_public=me, cloud_acked=1)
    other = nacl.signing.SigningKey.generate()
    refused = restore.plan(wires, fog_id="fog-1", fog_public=public_key(other), cloud_acked=0)
    assert refused.batches == [] and refused.refused == 3  # not signed by this fog's key
