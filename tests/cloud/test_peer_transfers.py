"""Peer transfers reconciled by the real cloud core (docs/protocol.md 18.2, 18.4): two real
FogCores on SQLite files, cut off from the cloud, move budget from one to the other; once the
cloud hears from them again it books every payment once, closes the parent and the sub-lease
by both fogs' reports, and the owner's exposure and partition bound never grew."""

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from cloud import ledger
from cloud.bound import owner_bound
from cloud.cli import show_owner
from cloud.core import CloudCore
from cloud.leases import close_fog_leases, exposure
from cloud.store import Store, Tx
from fog.authorize import Policy
from fog.config import BatchConfig, FederationConfig, LeaseConfig, UplinkConfig
from fog.core import (
    BatchSend,
    Connected,
    CoreConfig,
    FogCore,
    FogOutput,
    Intents,
    LeaseReport,
    Publish,
    Receipt,
    ReturnLeases,
    Tick,
    TrustMessage,
)
from fog.store import Arrival
from protocol import topics
from protocol.messages import Intent
from protocol.reasons import Reason
from protocol.signing import open_envelope, public_key, seal
from protocol.transfer import Transfer
from tests.cloud.world import T0, World

T = TypeVar("T")
LIMIT = 100_000_000
LEASE = 10_000_000
REQUEST_TIMEOUT_MS = 1_000


def of(outputs: list[FogOutput], kind: type[T]) -> list[T]:
    return [o for o in outputs if isinstance(o, kind)]


class Fogs:
    def __init__(self, world: World, tmp: Path) -> None:
        self.world, self.tmp = world, tmp
        self.cores: dict[str, FogCore] = {}
        self.seq = 0

    def open(self, fog_id: str, peer: str) -> FogCore:
        config = CoreConfig(
            fog_id=fog_id,
            issuer_key=public_key(self.world.issuer),
            policy=Policy(rate_burst=10_000, rate_per_s=10_000.0),
            batch=BatchConfig(records_max=256, age_ms=1_000, keep_acked_ms=0),
            uplink=UplinkConfig(window=4, ack_timeout_ms=10_000),
            lease=LeaseConfig(
                request_timeout_ms=REQUEST_TIMEOUT_MS,
                check_interval_ms=100,
                renew_before_ms=0,
                peer_transfers=True,
            ),
            federation=FederationConfig(peers=(peer,)),
        )
        core = FogCore.open(
            self.tmp / f"{fog_id}.sqlite", config=config, fog_key=self.world.fogs[fog_id].key
        )
        self.cores[fog_id] = core
        core.handle(Connected(now_ms=T0))
        return core

    def give(self, fog_id: str, items: list[tuple[str, bytes]], now: int) -> list[FogOutput]:
        out: list[FogOutput] = []
        for topic, payload in items:
            out += self.cores[fog_id].handle(TrustMessage(topic=topic, payload=payload, now_ms=now))
        return out

    def pay(self, fog_id: str, device: object, payload: bytes, now: int) -> Receipt:
        arrival = Arrival(public_key(device), payload)  # type: ignore[arg-type]
        [r] = of(self.cores[fog_id].handle(Intents(arrivals=(arrival,), now_ms=now)), Receipt)
        return r

    def intent(self, device: object, fog_id: str, amount: int) -> bytes:
        self.seq += 1
        i = Intent(
            device=public_key(device),  # type: ignore[arg-type]
            fog_id=fog_id,
            seq=self.seq,
            payee_id="shop",
            amount_micros=amount,
            currency="EUR",
            time_ms=T0,
        )
        return seal(i, device)  # type: ignore[arg-type]


def runs_dry(fogs: Fogs, device: object) -> tuple[bytes, Publish]:
    """fog-b declines for want of budget, its lease request goes unanswered (resent, then
    stalled), it declines again and asks its peer fog-a: the intent and fog-b's ``xreq``."""
    b = fogs.cores["fog-b"]
    payload = fogs.intent(device, "fog-b", 2_000)
    fogs.pay("fog-b", device, payload, T0)
    b.handle(Tick(now_ms=T0))
    b.handle(Tick(now_ms=T0 + REQUEST_TIMEOUT_MS + 1))
    fogs.pay("fog-b", device, payload, T0 + 1_100)
    [xreq] = [p for p in of(b.handle(Tick(now_ms=T0 + 1_200)), Publish) if "xreq" in p.topic]
    return payload, xreq


async def q(store: Store, fn: Callable[[Tx], object]) -> object:
    return await store.transact(fn)  # type: ignore[arg-type]


@pytest.fixture
async def setup(world: World, tmp_path: Path) -> tuple[World, CloudCore, Fogs, object]:
    await world.owner("acme", limit=LIMIT)
    await world.fog("fog-a")
    await world.fog("fog-b")
    device = await world.device("acme")
    core = CloudCore(store=world.store, issuer=world.issuer, clock=world.clock, policy=world.policy)
    fogs = Fogs(world, tmp_path)
    fogs.open("fog-a", "fog-b")
    fogs.open("fog-b", "fog-a")
    trust = await core.retained()
    for fog_id in ("fog-a", "fog-b"):
        fogs.give(fog_id, trust, T0)
    granted = await world.lease("acme", "fog-a", amount=LEASE)
    fogs.give("fog-a", [(granted.topic, granted.envelope)], T0)
    return world, core, fogs, device


async def test_two_fogs_cut_off_share_a_lease_and_the_cloud_reconciles_both(
    setup: tuple[World, CloudCore, Fogs, object],
) -> None:
    world, cloud, fogs, device = setup
    store = world.store
    before = await store.transact(lambda tx: exposure(tx, "acme"))
    bound_before = await store.transact(
        lambda tx: owner_bound(tx, "acme", now_ms=T0, policy_life_ms=3_600_000)
    )
    assert before == LEASE
    b = fogs.cores["fog-b"]
    # --- cut off: fog-b runs dry, its lease request is never answered, it asks fog-a
    payload = fogs.intent(device, "fog-b", 2_000)
    assert fogs.pay("fog-b", device, payload, T0).outcome.reason is Reason.INSUFFICIENT_BUDGET
    b.handle(Tick(now_ms=T0))  # the lreq is lost
    b.handle(Tick(now_ms=T0 + REQUEST_TIMEOUT_MS + 1))  # resent, lost again: stalled
    assert fogs.pay("fog-b", device, payload, T0 + 1_100).outcome.reason is (
        Reason.INSUFFICIENT_BUDGET
    )
    [xreq] = [p for p in of(b.handle(Tick(now_ms=T0 + 1_200)), Publish) if "xreq" in p.topic]
    given = fogs.give("fog-a", [(xreq.topic, xreq.payload)], T0 + 1_300)
    [to_b] = [p for p in of(given, Publish) if p.topic == topics.gossip_topic("fog-b", "xfer")]
    xfer = open_envelope(to_b.payload, Transfer).msg
    # duplicated on the way: credited once
    fogs.give("fog-b", [(to_b.topic, to_b.payload)] * 2, T0 + 1_400)
    ids = [fogs.pay("fog-b", device, payload, T0 + 1_500).outcome.intent_id]
    for _ in range(3):
        r = fogs.pay("fog-b", device, fogs.intent(device, "fog-b", 1_000), T0 + 1_600)
        assert r.outcome.status == "ok"
        ids.append(r.outcome.intent_id)
    r = fogs.pay("fog-a", device, fogs.intent(device, "fog-a", 4_000), T0 + 1_700)
    assert r.outcome.status == "ok"
    ids.append(r.outcome.intent_id)
    # --- healed: everything the fogs send up reaches the cloud, in their order
    na = xfer.not_after_ms
    for fog_id in ("fog-b", "fog-a"):  # the receiver first: its batches need the sub-lease
        core = fogs.cores[fog_id]
        out = core.handle(Tick(now_ms=T0 + 3_000))  # sealed and sent (xfers before batches)
        out += core.handle(Tick(now_ms=na + 1))  # leases expired: reported
        for o in out:
            if isinstance(o, Publish) and o.topic.endswith("/xfer") and "/up/" in o.topic:
                await cloud.transfer(o.payload)
            elif isinstance(o, BatchSend):
                outcome = await cloud.ingest_batch(o.payload, topic=o.topic)
                assert outcome.rejected == 0, outcome
            elif isinstance(o, LeaseReport):
                await cloud.lease_report(o.payload)
    # every payment booked once; both leases closed by their fogs' reports
    booked = await store.transact(
        lambda tx: tx.fetchall("SELECT intent_id FROM transfers ORDER BY intent_id")
    )
    assert sorted(bytes(r[0]) for r in booked) == sorted(ids)
    rows = await store.transact(
        lambda tx: tx.fetchall(
            "SELECT lease_id, fog_id, state, drawn_micros, reported_micros, amount_micros "
            "FROM leases ORDER BY granted_ms, fog_id"
        )
    )
    by_id = {bytes(r[0]): tuple(r[1:]) for r in rows}
    assert by_id[xfer.transfer_id] == ("fog-b", "closed", 5_000, 5_000, 5_000_000)
    assert by_id[xfer.lease_id] == ("fog-a", "closed", 4_000, 4_000 + 5_000_000, LEASE)
    after = await store.transact(lambda tx: exposure(tx, "acme"))
    assert after == 9_000  # only what was paid stays owed: nothing created, nothing lost
    check = await store.transact(ledger.check)
    assert check.ok, check
    # the bound never grew: the same before the cloud knew, and it only shrank after
    bound_after = await store.transact(
        lambda tx: owner_bound(tx, "acme", now_ms=na + 1, policy_life_ms=3_600_000)
    )
    assert bound_after.lease_term_micros <= bound_before.lease_term_micros
    # fogpay cloud owner show lists it
    shown = await store.transact(lambda tx: show_owner(tx, "acme", policy_life_ms=3_600_000))
    moved = shown["transfers"]
    assert (moved["count"], moved["moved_micros"], moved["open"]) == (1, {"EUR": 5_000_000}, 0)
    [listed] = moved["latest"]
    assert (listed["giver"], listed["receiver"], listed["state"], listed["drawn_micros"]) == (
        "fog-a",
        "fog-b",
        "closed",
        5_000,
    )
    assert listed["transfer"] == xfer.transfer_id.hex() and listed["parent"] == xfer.lease_id.hex()


async def test_the_cloud_counts_a_transfer_once_and_moves_budget_without_adding_any(
    setup: tuple[World, CloudCore, Fogs, object],
) -> None:
    world, cloud, fogs, device = setup
    store = world.store
    payload, xreq = runs_dry(fogs, device)
    given = fogs.give("fog-a", [(xreq.topic, xreq.payload)], T0 + 1_300)
    [up] = [p for p in of(given, Publish) if p.topic == "fogpay/1/up/fog-a/xfer"]
    xfer = open_envelope(up.payload, Transfer).msg
    lease_term_before = (
        await store.transact(lambda tx: owner_bound(tx, "acme", now_ms=T0, policy_life_ms=1))
    ).lease_term_micros
    published = await cloud.transfer(up.payload)
    # the sub-lease, retained on the receiver's lease topic, so a lost xfer still arrives
    assert published == [(topics.lease_topic("fog-b", xfer.transfer_id), up.payload)]
    assert await cloud.transfer(up.payload) == []  # again (the receiver's copy): no change
    assert await store.transact(lambda tx: exposure(tx, "acme")) == LEASE  # moved, not added
    bound = await store.transact(lambda tx: owner_bound(tx, "acme", now_ms=T0, policy_life_ms=1))
    assert bound.lease_term_micros == lease_term_before == LEASE
    assert bound.fogs == 2  # the receiver holds an open lease of acme now
    # a forged or altered transfer changes nothing
    forged = seal(xfer, fogs.world.fogs["fog-b"].key)  # not the giver's key
    assert await cloud.transfer(forged) == []
    assert cloud.metrics.get("xfer_refused_bad_signature") == 1
    # the receiver that never got it from the giver gets it from the cloud's retained copy
    got = fogs.give("fog-b", published, T0 + 1_400)
    assert [p.topic for p in of(got, Publish)] == ["fogpay/1/up/fog-b/xfer"]
    assert fogs.pay("fog-b", device, payload, T0 + 1_500).outcome.status == "ok"


async def test_closing_a_lost_giver_s_leases_keeps_what_it_gave_owed(
    setup: tuple[World, CloudCore, Fogs, object],
) -> None:
    """``fogpay cloud fog close-leases`` (17.8) on a giver: its lease closes at its booked
    draws plus what it gave; the sub-lease, the receiver's, still counts until it closes."""
    world, cloud, fogs, device = setup
    _, xreq = runs_dry(fogs, device)
    given = fogs.give("fog-a", [(xreq.topic, xreq.payload)], T0 + 1_300)
    [up] = [p for p in of(given, Publish) if p.topic == "fogpay/1/up/fog-a/xfer"]
    await cloud.transfer(up.payload)
    closed = await world.store.transact(lambda tx: close_fog_leases(tx, "fog-a"))
    [lease] = closed
    assert (lease.given_micros, lease.returned_micros) == (LEASE // 2, LEASE // 2)
    assert await world.store.transact(lambda tx: exposure(tx, "acme")) == LEASE // 2


async def test_a_lost_transfer_strands_budget_until_expiry_and_creates_none(
    setup: tuple[World, CloudCore, Fogs, object],
) -> None:
    """The giver debited, the receiver never got the xfer: the cloud learns it from the
    giver, keeps the sub-lease in escrow, and hands it to the receiver (retained); arriving
    after its na it is reported unused, and the owner owes what was paid, no more, no less."""
    world, cloud, fogs, device = setup
    store = world.store
    a = fogs.cores["fog-a"]
    _, xreq = runs_dry(fogs, device)
    fogs.give("fog-a", [(xreq.topic, xreq.payload)], T0 + 1_300)  # its xfer to fog-b: lost
    paid = fogs.pay("fog-a", device, fogs.intent(device, "fog-a", 3_000), T0 + 1_400)
    assert paid.outcome.status == "ok"
    late = T0 + 3_600_000 + 1  # the parent's na passed: fog-a reports (its xfer goes first)
    retained: list[tuple[str, bytes]] = []
    out = a.handle(Tick(now_ms=T0 + 3_000)) + a.handle(Tick(now_ms=late))
    for o in out:
        if isinstance(o, Publish) and "/up/" in o.topic:
            retained += await cloud.transfer(o.payload)
        elif isinstance(o, BatchSend):
            await cloud.ingest_batch(o.payload, topic=o.topic)
        elif isinstance(o, LeaseReport):
            await cloud.lease_report(o.payload)
    # the parent closed at booked + given; the given half still in escrow as the sub-lease
    assert await store.transact(lambda tx: exposure(tx, "acme")) == 3_000 + LEASE // 2
    # the receiver gets the sub-lease from the cloud's retained copy, too late to draw on it
    got = fogs.give("fog-b", [(t, p) for t, p in retained if p], late + 1)
    for o in got:
        if isinstance(o, Publish) and "/up/" in o.topic:
            assert await cloud.transfer(o.payload) == []  # known already
        elif isinstance(o, LeaseReport):
            await cloud.lease_report(o.payload)
    assert await store.transact(lambda tx: exposure(tx, "acme")) == 3_000  # nothing created
    states = await store.transact(lambda tx: tx.fetchall("SELECT state FROM leases"))
    assert {r[0] for r in states} == {"closed"}


async def alarms(store: Store) -> list[tuple[str, str]]:
    rows = await store.transact(lambda tx: tx.fetchall("SELECT kind, subject FROM alarms"))
    return [(str(r[0]), str(r[1])) for r in rows]


async def test_a_sub_lease_the_receiver_cannot_verify_is_reported_unused_and_freed(
    world: World, tmp_path: Path
) -> None:
    """The receiver does not hold the giver's fog credential when the xfer and the cloud's
    retained copy arrive: it refuses both and reports the retained one unused, so the cloud
    closes the sub-lease and its budget returns to the owner long before the parent's expiry
    (it stayed in escrow for good before). And a giver's report that reaches the cloud before
    its xfer raises ``lease_report_mismatch`` only until the xfer explains it."""
    await world.owner("acme", limit=LIMIT)
    await world.fog("fog-a")
    await world.fog("fog-b")
    device = await world.device("acme")
    cloud = CloudCore(
        store=world.store, issuer=world.issuer, clock=world.clock, policy=world.policy
    )
    store = world.store
    fogs = Fogs(world, tmp_path)
    a = fogs.open("fog-a", "fog-b")
    fogs.open("fog-b", "fog-a")
    trust = await cloud.retained()
    fogs.give("fog-a", trust, T0)
    fogs.give("fog-b", [(t, p) for t, p in trust if t != topics.fog_topic("fog-a")], T0)
    granted = await world.lease("acme", "fog-a", amount=LEASE)
    fogs.give("fog-a", [(granted.topic, granted.envelope)], T0)
    payload, xreq = runs_dry(fogs, device)
    given = fogs.give("fog-a", [(xreq.topic, xreq.payload)], T0 + 1_300)
    [to_b] = [p for p in of(given, Publish) if p.topic == topics.gossip_topic("fog-b", "xfer")]
    [up] = [p for p in of(given, Publish) if p.topic == "fogpay/1/up/fog-a/xfer"]
    xfer = open_envelope(up.payload, Transfer).msg
    # fog-a returns its lease early (18.1): its report goes up, but its xfer is lost on the
    # way and comes only with a later resend: the report alone disagrees with the books
    [report] = of(a.handle(ReturnLeases(now_ms=T0 + 3_000, cause="operator")), LeaseReport)
    await cloud.lease_report(report.payload)
    assert await alarms(store) == [("lease_report_mismatch", xfer.lease_id.hex())]
    retained = await cloud.transfer(up.payload)  # the resend: the parent closes
    assert await alarms(store) == []  # explained: the alarm is cleared, with a log line
    # fog-b refuses the gossip copy (no credential of fog-a) and reports the retained one
    assert of(fogs.give("fog-b", [(to_b.topic, to_b.payload)], T0 + 3_100), LeaseReport) == []
    got = fogs.give("fog-b", retained, T0 + 3_200)
    [unused] = of(got, LeaseReport)
    assert unused.lease_id == xfer.transfer_id and unused.drawn_micros == 0
    await cloud.lease_report(unused.payload)
    rows = await store.transact(lambda tx: tx.fetchall("SELECT lease_id, state FROM leases"))
    assert {bytes(r[0]): r[1] for r in rows} == {
        xfer.lease_id: "closed",
        xfer.transfer_id: "closed",
    }
    # nothing stays in escrow: the owner's whole limit is free again, long before the na
    assert await store.transact(lambda tx: exposure(tx, "acme")) == 0
    assert await alarms(store) == []
    assert fogs.pay("fog-b", device, payload, T0 + 3_300).outcome.reason is (
        Reason.INSUFFICIENT_BUDGET
    )
