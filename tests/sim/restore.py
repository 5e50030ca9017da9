"""Disk loss and restore in the simulation, and the hooks the cloud side fills in.

``fetch_all`` plays the restoring fog's half of ``fogpay fog restore`` against one peer: it
sends signed ``fetch`` messages (from batch 1, then from after the last batch answered, 64
at a time) straight into the peer's core and keeps what the peer answers on
``gossip/{me}/batch``. The operator runs a restore when the peers are reachable, so the
simulation delivers these directly (no loss); ``FogNode.restore`` then imports them with
``fog.restore`` and the fog continues its chain.

The cloud side (docs/protocol.md 17.7, 17.8), wired to the cloud's real code:

- ``upload_held(sim, device, held)``: a device hands in ok receipts the cloud may lack
  (after a restore: those whose records the disk took; when a fog cannot be restored: all
  of its; after the heal: every one not booked); the cloud books them through its held path
  and answers a ``hack``, delivered back to the device;
- ``close_lost_fog_leases(sim, fog_id)``: ``fogpay cloud fog close-leases FOG_ID --yes``,
  run after the heal for every fog that was lost (restored or not).
"""

from collections.abc import Sequence
from typing import TYPE_CHECKING

import nacl.signing

from cloud import leases
from protocol import topics
from protocol.replica import FETCH_BATCHES_MAX, Fetch
from protocol.signing import seal
from tests.sim.devices import Held, SimDevice

if TYPE_CHECKING:
    from tests.sim.fognode import FogNode
    from tests.sim.simulation import Simulation

FETCH_ROUNDS_MAX = 1_000


def fetch_all(
    peer: "FogNode", fog_id: str, key: nacl.signing.SigningKey, *, now_ms: int
) -> list[bytes]:
    """Every replica of ``fog_id``'s batches ``peer`` holds, by repeated fetches."""
    wires: list[bytes] = []
    start = 1
    for _ in range(FETCH_ROUNDS_MAX):
        env = seal(Fetch(fog_id=fog_id, from_number=start, time_ms=now_ms), key)
        out = peer.message(topics.gossip_topic(peer.fog_id, "fetch"), env, now_ms=now_ms)
        got = [p for dst, t, p in out.sends if dst == fog_id and t.endswith("/batch")]
        wires.extend(got)
        if len(got) < FETCH_BATCHES_MAX:
            break
        start = peer.last_fetched + 1
    return wires


async def close_lost_fog_leases(sim: "Simulation", fog_id: str) -> list[bytes]:
    """The operator's ``fogpay cloud fog close-leases FOG_ID --yes``: the cloud's own
    ``cloud.leases.close_fog_leases`` (what the command calls) closes every open lease of
    the fog at its booked draws and clears their retained topics. Run after the heal, once
    the devices' held uploads are in: for a fog that could not be restored (all its leases)
    and for a restored one (the leases its restore retired: a restored fog that is quiet
    holds no other open lease; one it still holds unretired is a violation). Returns the
    leases closed."""
    assert sim.cloud.store is not None and sim.checker is not None
    closed: list[leases.ForceClosed] = await sim.cloud.transact(
        lambda tx: leases.close_fog_leases(tx, fog_id)
    )  # type: ignore[assignment]
    if fog_id not in sim.dead:
        sim.fail(
            [
                f"{fog_id}: close-leases closed lease {x.lease_id.hex()[:8]}, which the "
                "restored fog holds and did not retire"
                for x in closed
                if sim.checker.holds_unretired(fog_id, x.lease_id)
            ]
        )
    sim.count("leases_closed_by_operator", len(closed))
    sim.checker.force_closed.update(x.lease_id for x in closed)
    sim.net.publish_retained([(x.topic, b"") for x in closed])  # the clearings
    if closed:
        sim.note(f"close-leases {fog_id}: {len(closed)} leases closed at their booked draws")
    return [x.lease_id for x in closed]


def upload_held(sim: "Simulation", device: SimDevice, held: Sequence[Held]) -> None:
    """``device`` hands in the records (intent, ok receipt) of ``held`` on
    ``fogpay/1/held/{d}/records`` (docs/protocol.md 17.7), 16 a payload, to the cloud's
    real held path (``CloudCore`` ``HeldArrived``); again every few seconds until the
    cloud's ``hack`` lists each (booked, or refused with its fault)."""
    if not held:
        return
    device.upload({h.intent_id for h in held})
    sim._upload(device)
