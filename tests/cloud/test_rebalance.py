"""Rebalancing by the cloud while it is reachable (docs/protocol.md 18.5), with two real
FogCores on SQLite files and the real cloud core (SQLite and PostgreSQL): a fog whose lease
request finds no credit makes the cloud ask the fog holding the owner's idle lease to give it
back (``rbal``, not retained); that fog gives it back only if the owner is idle there, its
report closes the lease, and the asking fog's next request is granted from the freed credit.
A busy fog keeps its lease; a forged ``rbal`` changes nothing; the cloud asks at most once per
lease per ``recall_every_ms``."""

from pathlib import Path

from cloud.core import CloudCore
from cloud.events import LeaseAnswered, LeaseRequestArrived, Publish
from cloud.leases import LeasePolicy, exposure
from fog.core import FogCore, LeaseReport, LeaseRequest, LeaseReturned, Tick, TrustLoaded
from protocol.leasing import LeaseRecall
from protocol.messages import Lease
from protocol.reasons import Reason
from protocol.signing import open_envelope, public_key, seal
from tests.cloud.test_peer_transfers import LEASE, Fogs, of
from tests.cloud.world import T0, World

IDLE_MS = 10_000  # lease.recall_idle_ms, the default


async def setup(world: World, tmp_path: Path) -> tuple[CloudCore, Fogs, object]:
    """acme's whole credit is leased to fog-a; fog-b holds nothing."""
    await world.owner("acme", limit=LEASE)
    await world.fog("fog-a")
    await world.fog("fog-b")
    device = await world.device("acme")
    cloud = CloudCore(
        store=world.store,
        issuer=world.issuer,
        clock=world.clock,
        policy=LeasePolicy(initial_micros=LEASE, recall_every_ms=30_000),
    )
    fogs = Fogs(world, tmp_path)
    fogs.open("fog-a", "fog-b")
    fogs.open("fog-b", "fog-a")
    trust = await cloud.retained()
    for fog_id in ("fog-a", "fog-b"):
        fogs.give(fog_id, trust, T0)
    granted = await world.lease("acme", "fog-a", amount=LEASE)
    fogs.give("fog-a", [(granted.topic, granted.envelope)], T0)
    return cloud, fogs, device


async def ask(world: World, cloud: CloudCore, b: FogCore, now: int) -> list[object]:
    """fog-b's lease request (its first Tick after a decline) through the cloud core."""
    world.now = now
    [lreq] = of(b.handle(Tick(now_ms=now)), LeaseRequest)
    return list(await cloud.handle(LeaseRequestArrived(wire=lreq.payload, now_ms=now)))


async def test_an_idle_fog_gives_its_lease_back_and_the_busy_fog_is_granted(
    world: World, tmp_path: Path
) -> None:
    cloud, fogs, device = await setup(world, tmp_path)
    b = fogs.cores["fog-b"]
    t1 = T0 + IDLE_MS + 1_000
    payload = fogs.intent(device, "fog-b", 2_000)
    assert fogs.pay("fog-b", device, payload, t1).outcome.reason is Reason.INSUFFICIENT_BUDGET
    out = await ask(world, cloud, b, t1)
    assert [o.result for o in out if isinstance(o, LeaseAnswered)] == ["no_credit"]
    [recall] = [o for o in out if isinstance(o, Publish)]
    assert recall.retain is False  # never replaces the lease retained on that topic
    msg = open_envelope(recall.payload, LeaseRecall, signer=public_key(world.issuer)).msg
    lease_id = msg.lease_id
    assert (msg.fog_id, msg.owner_id, msg.requester) == ("fog-a", "acme", "fog-b")
    assert recall.topic == f"fogpay/1/fog-a/lease/{lease_id.hex()}"
    # fog-a has not drawn for acme since the lease arrived at T0: it gives it back
    given = fogs.give("fog-a", [(recall.topic, recall.payload)], t1 + 1)
    assert [t.status for t in of(given, TrustLoaded)] == ["accepted"]
    assert [(r.lease_id, r.cause) for r in of(given, LeaseReturned)] == [(lease_id, "cloud")]
    [report] = of(given, LeaseReport)
    assert (report.lease_id, report.drawn_micros) == (lease_id, 0)
    assert await cloud.lease_report(report.payload)  # closed: its retained topic is cleared
    assert await world.tx(lambda tx: exposure(tx, "acme")) == 0
    # fog-a never draws on it again
    r = fogs.pay("fog-a", device, fogs.intent(device, "fog-a", 1_000), t1 + 2)
    assert r.outcome.reason is Reason.INSUFFICIENT_BUDGET
    # fog-b's request again (the resent copy, tried again by the cloud) is granted now
    for now in range(t1 + 1_000, t1 + 60_000, 1_000):
        world.now = now
        asked = of(b.handle(Tick(now_ms=now)), LeaseRequest)
        if asked:
            break
    [lreq] = asked
    out = list(await cloud.handle(LeaseRequestArrived(wire=lreq.payload, now_ms=world.now)))
    assert [o.result for o in out if isinstance(o, LeaseAnswered)] == ["granted"]
    [lease] = [o for o in out if isinstance(o, Publish)]
    assert lease.retain and open_envelope(lease.payload, Lease).msg.fog_id == "fog-b"
    fogs.give("fog-b", [(lease.topic, lease.payload)], world.now)
    assert fogs.pay("fog-b", device, payload, world.now + 1).outcome.status == "ok"


async def test_a_busy_fog_keeps_its_lease_and_the_cloud_does_not_ask_again_at_once(
    world: World, tmp_path: Path
) -> None:
    cloud, fogs, device = await setup(world, tmp_path)
    b = fogs.cores["fog-b"]
    t1 = T0 + IDLE_MS + 1_000
    assert (
        fogs.pay("fog-a", device, fogs.intent(device, "fog-a", 1_000), t1 - 5_000).outcome.status
        == "ok"
    )
    fogs.pay("fog-b", device, fogs.intent(device, "fog-b", 2_000), t1)
    [recall] = [o for o in await ask(world, cloud, b, t1) if isinstance(o, Publish)]
    kept = fogs.give("fog-a", [(recall.topic, recall.payload)], t1 + 1)
    assert [t.status for t in of(kept, TrustLoaded)] == ["kept"]
    assert not of(kept, LeaseReturned) and not of(kept, LeaseReport)
    assert (
        fogs.pay("fog-a", device, fogs.intent(device, "fog-a", 1_000), t1 + 2).outcome.status
        == "ok"
    )
    # a forged rbal (not the issuer's) is refused and changes nothing
    forged = seal(open_envelope(recall.payload, LeaseRecall).msg, fogs.world.fogs["fog-b"].key)
    refused = fogs.give("fog-a", [(recall.topic, forged)], t1 + IDLE_MS * 10)
    assert [(t.status, t.reason) for t in of(refused, TrustLoaded)] == [
        ("refused", Reason.BAD_SIGNATURE)
    ]
    assert not of(refused, LeaseReturned)
    # fog-b asks again (a new request) within recall_every_ms: no second rbal for that lease
    b.handle(Tick(now_ms=t1 + 9_000))
    again = []
    for now in range(t1 + 10_000, t1 + 29_000, 1_000):
        world.now = now
        for lreq in of(b.handle(Tick(now_ms=now)), LeaseRequest):
            again += await cloud.handle(LeaseRequestArrived(wire=lreq.payload, now_ms=now))
    assert not [o for o in again if isinstance(o, Publish)]
