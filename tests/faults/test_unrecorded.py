"""``FogStore.decline_unrecorded``: the answers for a group the store could not record (the
disk campaign's seam). Nothing is read or written; the first checks' declines are as usual;
everything else is ``rate_limited`` (transient); never ok, not even for a replay of an
authorized intent; every receipt is signed by the fog and names the intent it answers."""

from pathlib import Path

from fog.store import Arrival
from protocol.messages import ZERO_KEY, Receipt
from protocol.signing import open_envelope, public_key
from tests.fog.world import World
from tests.integration.devices import intent_id


def test_decline_unrecorded_never_ok_and_writes_nothing(tmp_path: Path) -> None:
    world = World(tmp_path / "fog.db")
    try:
        owner = world.owner()
        world.lease()
        dev, other = world.device(owner), world.device(owner)
        paid = world.intent(dev, 1)
        assert world.send((dev, paid))[0].status == "ok"
        before = world.money_dump()
        fresh = world.intent(dev, 2)
        bad_sig = bytearray(fresh)
        bad_sig[-1] ^= 1
        arrivals = [
            Arrival(public_key(dev), paid),  # a replay: would be ok from process()
            Arrival(public_key(dev), fresh),  # would be ok too
            Arrival(public_key(other), fresh),  # on another device's topic
            Arrival(public_key(dev), b"\x00garbage"),
            Arrival(public_key(dev), bytes(bad_sig)),
        ]
        outcomes = world.store.decline_unrecorded(arrivals, now_ms=1)
        reasons = [o.reason for o in outcomes]
        assert reasons == [
            "rate_limited",
            "rate_limited",
            "topic_mismatch",
            "malformed",
            "bad_signature",
        ]
        for a, o in zip(arrivals, outcomes, strict=True):
            r = open_envelope(o.receipt, Receipt, signer=public_key(world.fog_key)).msg
            assert not r.ok and o.status == "declined" and o.log_index is None
            if r.reason == "malformed":
                assert (r.intent_id, r.device, r.seq) == (o.intent_id, ZERO_KEY, 0)
            else:
                assert r.intent_id == intent_id(a.payload)
        assert outcomes[0].reason is not None and outcomes[0].reason.transient
        assert world.money_dump() == before
        # the replay still gets its stored ok receipt once the store can record again
        again = world.send((dev, paid))[0]
        assert again.replay and again.status == "ok"
    finally:
        world.store.close()
