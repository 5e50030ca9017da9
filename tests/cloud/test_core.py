"""CloudCore: the handlers the MQTT shell calls; bad input is counted, never raised."""

from cloud.core import CloudCore
from cloud.leases import LeasePolicy
from protocol.leasing import LeaseReport, LeaseRequest
from protocol.messages import Lease
from protocol.signing import open_envelope, public_key, seal
from tests.cloud.world import World, new_key, snapshot


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
