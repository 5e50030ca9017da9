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
  ``fetch`` (tests/sim/simulation.py ``_fetched_all``);
- ``held_dedup``: the cloud books a record a device handed in under another key than its
  intent id (``cloud.ledger.write_held`` writes the transfer keyed by a hash of the intent
  id), so the dedup of 17.8 cannot see it: when the fog's batch (or a relay) brings the same
  record, it is booked a second time. Caught as two intents booked at one (device, q), with
  the cloud's ``cloned_key`` alarm on an honest device (or the store's primary key refusing
  a second upload of the record).
- ``transfer_twice``: the receiver of a peer transfer credits a duplicated ``xfer`` again
  (``fog.transfers.receive`` adds its amount to the sub-lease when the transfer id is known;
  the cloud's retained copy is such a duplicate): caught as a sub-lease credited more than its
  ``xfer`` moved (docs/protocol.md 18.2), or drawn above it;
- ``return_drawable``: a lease given back early stays drawable (``fog.returns.retire`` records
  the return but puts the lease's expiry back): caught as a draw after its return (18.1);
- ``double_spend_unseen``: the cloud books device-to-device payments but never sees a
  voucher spent twice (``cloud.vouchers._double``, the alarm and the suspension, does
  nothing): caught as two payments booked at one (voucher, s) without the alarm, or a double
  spend handed in with no ``voucher_double_spent`` and the payer not revoked (18.3).
"""

import contextlib
import dataclasses
import hashlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Final

from cloud import leases, ledger, vouchers
from cloud.store import Tx
from fog import authorize, returns, store, transfers
from fog.authorize import LeaseView
from fog.replicas import Gossip, Replication
from fog.uplink import Window
from protocol.messages import Intent
from protocol.signing import open_envelope
from protocol.transfer import Transfer

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


_real_write_held: Final = ledger.write_held


async def _write_held_under_another_key(
    tx: Tx, fog_id: str, plan: Any, records: dict[bytes, bytes], *, now_ms: int
) -> None:
    renamed = {t.intent_id: hashlib.sha256(b"held" + t.intent_id).digest() for t in plan.transfers}
    transfers = [t._replace(intent_id=renamed[t.intent_id]) for t in plan.transfers]
    keyed = {renamed.get(i, i): r for i, r in records.items()}
    await _real_write_held(
        tx, fog_id, dataclasses.replace(plan, transfers=transfers), keyed, now_ms=now_ms
    )


async def _exposure_open_only(tx: Tx, owner_id: str) -> int:
    row = await tx.fetchone(
        "SELECT CAST(COALESCE(SUM(CASE WHEN drawn_micros > amount_micros THEN drawn_micros "
        "ELSE amount_micros END), 0) AS BIGINT) FROM leases WHERE owner_id = ? AND state = ?",
        (owner_id, leases.STATE_OPEN),
    )
    assert row is not None
    return int(row[0])


_real_receive: Final = transfers.receive


def _receive_crediting_twice(conn: Any, envelope: bytes, **kw: Any) -> Any:
    got = _real_receive(conn, envelope, **kw)
    if got.status == "duplicate":
        x = open_envelope(envelope, Transfer).msg
        conn.execute(
            "UPDATE leases SET amount_micros = amount_micros + ? WHERE lease_id = ?",
            (x.amount_micros, x.transfer_id),
        )
    return got


_real_retire: Final = returns.retire


def _retire_leaving_drawable(conn: Any, **kw: Any) -> Any:
    expiry = dict(conn.execute("SELECT lease_id, not_after_ms FROM leases").fetchall())
    out = _real_retire(conn, **kw)
    for r in out:
        conn.execute(
            "UPDATE leases SET not_after_ms = ? WHERE lease_id = ?",
            (expiry[r.lease_id], r.lease_id),
        )
    return out


def _double_unseen(*args: Any) -> None:
    return None


BUGS: Final[dict[str, tuple[Any, str, Callable[..., Any]]]] = {
    "lease_expiry": (authorize, "pick_lease", _pick_ignoring_expiry),
    "lease_room": (authorize, "pick_lease", _pick_ignoring_room),
    "revocation": (store, "authorize", _authorize_ignoring_revocation),
    "uplink_resend": (Window, "plan", _plan_never_resending),
    "cloud_escrow": (leases, "exposure", _exposure_open_only),
    "racc_without_store": (Replication, "batch", _batch_acked_not_stored),
    "held_dedup": (ledger, "write_held", _write_held_under_another_key),
    "transfer_twice": (transfers, "receive", _receive_crediting_twice),
    "return_drawable": (returns, "retire", _retire_leaving_drawable),
    "double_spend_unseen": (vouchers, "_double", _double_unseen),
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
