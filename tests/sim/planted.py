"""Known bugs to plant, to show the simulator can fail (``--plant NAME``, ``test_sim.py``).

Each replaces one real function for the duration of a run and puts it back after:

- ``lease_expiry``: the fog draws on a lease whatever its expiry (``fog.authorize.pick_lease``
  without its ``now <= na`` test): caught as a draw after expiry;
- ``lease_room``: the fog draws on a lease whatever room is left (``pick_lease`` without the
  room test): caught when the fog's file refuses the overdraft (a CHECK constraint: the store
  raises) or as a draw above the amount;
- ``revocation``: the fog ignores revocations (the store calls ``authorize`` with a view whose
  ``device_revoked`` and ``owner_revoked`` are false): caught as an authorization after the
  fog stored the device's revocation;
- ``uplink_resend``: the fog's uplink never sends a batch again once sent
  (``fog.uplink.Window.plan`` without its go-back-N; only a reconnect still resends): a lost
  batch stays lost, caught by the heal phase's liveness check (records never booked). Run
  without federation (``--replicas 0``): with peers, a holder relays the lost batch;
- ``cloud_escrow``: the cloud's credit check forgets what was drawn on closed leases and not
  settled (``cloud.leases.exposure`` counts open leases only), so an owner's returned leases
  free credit that was spent: caught as outstanding + drawn above the owner's limit;
- ``racc_without_store``: a replica holder answers ``racc`` for a verified batch but never
  stores it (``fog.replicas.Replication.batch`` acks before, and instead of, its COMMIT):
  caught when the origin loses its disk and a batch its peers acked is not returned to its
  ``fetch`` (tests/sim/simulation.py ``_fetched_all``).
"""

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Final

from cloud import leases
from cloud.store import Tx
from fog import authorize, store
from fog.authorize import LeaseView
from fog.replicas import Gossip, Replication
from fog.uplink import Window
from protocol.messages import Intent

_real_pick: Final = authorize.pick_lease
_real_authorize: Final = authorize.authorize  # what fog.store imported


def _pick_ignoring_expiry(
    leases: Sequence[LeaseView], intent: Intent, *, now_ms: int
) -> LeaseView | None:
    fits = [
        x for x in leases if x.currency == intent.currency and x.left_micros >= intent.amount_micros
    ]
    return min(fits, key=lambda x: (x.not_after_ms, x.lease_id)) if fits else None


def _pick_ignoring_room(
    leases: Sequence[LeaseView], intent: Intent, *, now_ms: int
) -> LeaseView | None:
    fits = [x for x in leases if x.currency == intent.currency and now_ms <= x.not_after_ms]
    return min(fits, key=lambda x: (x.not_after_ms, x.lease_id)) if fits else None


def _authorize_ignoring_revocation(
    intent: Intent, view: authorize.DeviceView, *args: Any, **kw: Any
) -> Any:
    view = dataclasses.replace(view, device_revoked=False, owner_revoked=False)
    return _real_authorize(intent, view, *args, **kw)


def _plan_never_resending(self: Window, unacked: list[int], *, now_ms: int) -> list[int]:
    out = [n for n in unacked if n not in self.sent]
    for n in out:
        self.sent[n] = now_ms
    return out


_real_batch: Final = Replication.batch


def _batch_acked_not_stored(self: Replication, wire: bytes, now: int) -> Any:
    out = _real_batch(self, wire, now)  # its verdict and its racc; then the replica is gone
    if any(isinstance(o, Gossip) for o in out):
        self.conn.execute("DELETE FROM replicas WHERE wire = ?", (wire,))
    return out


async def _exposure_open_only(tx: Tx, owner_id: str) -> int:
    row = await tx.fetchone(
        "SELECT CAST(COALESCE(SUM(CASE WHEN drawn_micros > amount_micros THEN drawn_micros "
        "ELSE amount_micros END), 0) AS BIGINT) FROM leases WHERE owner_id = ? AND state = ?",
        (owner_id, leases.STATE_OPEN),
    )
    assert row is not None
    return int(row[0])


BUGS: Final[dict[str, tuple[Any, str, Callable[..., Any]]]] = {
    "lease_expiry": (authorize, "pick_lease", _pick_ignoring_expiry),
    "lease_room": (authorize, "pick_lease", _pick_ignoring_room),
    "revocation": (store, "authorize", _authorize_ignoring_revocation),
    "uplink_resend": (Window, "plan", _plan_never_resending),
    "cloud_escrow": (leases, "exposure", _exposure_open_only),
    "racc_without_store": (Replication, "batch", _batch_acked_not_stored),
}


# a bug the federation repairs is planted in runs without it: with peers, the holders relay
# a batch its fog never sends again (that is what relaying is for)
CONFIGS: Final[dict[str, dict[str, Any]]] = {"uplink_resend": {"replicas": 0}}


def config_for(name: str | None, config: Any) -> Any:
    """``config`` (a ``SimConfig``) as the planted bug ``name`` runs with."""
    return dataclasses.replace(config, **CONFIGS.get(name or "", {}))


@contextlib.contextmanager
def planted(name: str | None) -> Iterator[None]:
    if name is None:
        yield
        return
    module, attr, fn = BUGS[name]
    real = getattr(module, attr)
    setattr(module, attr, fn)
    try:
        yield
    finally:
        setattr(module, attr, real)
