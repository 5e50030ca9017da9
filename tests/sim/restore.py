"""Disk loss and restore in the simulation, and the hooks the cloud side fills in.

``fetch_all`` plays the restoring fog's half of ``fogpay fog restore`` against one peer: it
sends signed ``fetch`` messages (from batch 1, then from after the last batch answered, 64
at a time) straight into the peer's core and keeps what the peer answers on
``gossip/{me}/batch``. The operator runs a restore when the peers are reachable, so the
simulation delivers these directly (no loss); ``FogNode.restore`` then imports them with
``fog.restore`` and the fog continues its chain.

Two hooks stand for the cloud side of issue 11 (helper "cloud"), which this branch does not
have yet; the lead wires them when merging:

- ``close_lost_fog_leases(sim, fog_id)``: the operator's ``fogpay cloud fog close-leases
  FOG_ID`` for a fog that could not be restored (its chain head is lost);
- ``upload_held(sim, device, held)``: a device uploads the records (intent, ok receipt) it
  holds to the cloud (``held`` records, docs/protocol.md 17.7); returns how many the cloud
  answered as booked. Until wired it uploads nothing and returns 0: receipts whose records a
  fog lost with its disk are counted (``receipts_lost_with_disk``), not yet booked.
"""

from collections.abc import Sequence
from typing import TYPE_CHECKING

import nacl.signing

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


def close_lost_fog_leases(sim: "Simulation", fog_id: str) -> None:
    """Hook: the cloud closes the leases of a fog that cannot be restored (helper cloud's
    ``fogpay cloud fog close-leases``). Not wired on this branch: its leases stay open at
    the cloud (counted as ``leases_of_dead_fogs``)."""
    sim.count("close_leases_pending")


def upload_held(sim: "Simulation", device: SimDevice, held: Sequence[Held]) -> int:
    """Hook: ``device`` uploads the records it holds (helper cloud's held uploads); returns
    how many are booked afterwards. Not wired on this branch: 0."""
    return 0
