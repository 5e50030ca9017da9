"""The partition bound B(o) (docs/protocol.md 17.9): the most the fogs can authorize for owner
``o`` that the cloud has not booked, while the cloud cannot see them.

    B(o) = min( lease term: sum over open leases l of o of max(0, a_l - given_l - booked_l),
                day term:   sum over fogs f holding an open lease of o,
                            over devices d bound to o, of day_d * D )

    D = floor(L / 86,400,000) + 2

``L`` is the longest open lease's life (``na`` - grant time), or the lease policy's life when
``o`` holds no open lease: a lease of life ``L`` touches at most ``D`` UTC days, and a fog
lets a device spend at most its binding's ``day`` per UTC day (the spec's day limit is per
fog). A fog never draws on a lease after its ``na`` nor beyond its amount (it declines
``insufficient_budget``), so the lease term bounds what it can authorize on budget it holds;
the day term bounds it by the devices' limits whatever the budget.

``lease_term``, ``day_term`` and ``partition_bound`` are pure (the simulator calls them on its
own state); ``owner_bound`` reads the cloud's store.
"""

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from cloud.leases import STATE_OPEN
from cloud.store import Tx, clamp_ms
from protocol import limits
from protocol.messages import Binding, decode_body
from protocol.signing import split_envelope

DAY_MS: Final = 86_400_000


@dataclass(frozen=True, slots=True)
class OpenLease:
    """An open lease as the bound sees it."""

    fog_id: str
    amount_micros: int  # a_l
    booked_micros: int  # booked_l: the draws the cloud has booked on it
    life_ms: int  # na - grant time
    # given_l: what peer transfers carved out of it (docs/protocol.md 18.2, 18.4); the
    # sub-leases are open leases of their receivers, counted on their own
    given_micros: int = 0


@dataclass(frozen=True, slots=True)
class Bound:
    micros: int  # B(o) = min(lease_term, day_term)
    lease_term_micros: int
    day_term_micros: int
    days: int  # D
    fogs: int  # fogs holding an open lease of o
    devices: int  # devices bound to o, counted in the day term
    life_ms: int  # L

    def as_json(self) -> dict[str, int]:
        return {
            "micros": self.micros,
            "lease_term_micros": self.lease_term_micros,
            "day_term_micros": self.day_term_micros,
            "days": self.days,
            "fogs": self.fogs,
            "devices": self.devices,
            "lease_life_ms": self.life_ms,
        }


def lease_term(leases: Iterable[OpenLease]) -> int:
    """Sum over the open leases of max(0, amount - given - booked): budget the fogs hold and
    the cloud has not seen spent. A peer transfer of g moves g from its parent's term to its
    sub-lease's (an open lease of the receiver): the sum does not change (18.4)."""
    return sum(
        max(0, lease.amount_micros - lease.given_micros - lease.booked_micros) for lease in leases
    )


def days_touched(life_ms: int) -> int:
    """D: the most UTC days a lease of life ``life_ms`` can touch (a lease granted just
    before midnight and living a whole number of days touches that many days plus two
    partial ones at most: floor(L / day) + 2)."""
    assert life_ms >= 0
    return life_ms // DAY_MS + 2


def day_term(fogs: int, day_limits: Sequence[int], life_ms: int) -> int:
    """Sum over ``fogs`` fogs and the devices' day limits of day_d * D."""
    return fogs * sum(day_limits) * days_touched(life_ms)


def partition_bound(
    leases: Sequence[OpenLease], day_limits: Sequence[int], *, policy_life_ms: int
) -> Bound:
    """B(o) from the open leases of ``o`` and the day limits of its bound devices (one per
    device); ``policy_life_ms``: L when ``o`` holds no open lease."""
    life = max((lease.life_ms for lease in leases), default=policy_life_ms)
    fogs = len({lease.fog_id for lease in leases})
    by_lease = lease_term(leases)
    by_day = day_term(fogs, day_limits, life)
    return Bound(
        micros=min(by_lease, by_day),
        lease_term_micros=by_lease,
        day_term_micros=by_day,
        days=days_touched(life),
        fogs=fogs,
        devices=len(day_limits),
        life_ms=life,
    )


async def owner_bound(tx: Tx, owner_id: str, *, now_ms: int, policy_life_ms: int) -> Bound:
    """B(o) from the store: the owner's open leases, and its devices with a binding not
    expired at ``now_ms`` (revoked ones too: a fog cut off may not know of the revocation),
    each at the largest ``day`` of its bindings."""
    rows = await tx.fetchall(
        "SELECT l.fog_id, l.amount_micros, l.drawn_micros, l.not_after_ms - l.granted_ms, "
        "CAST(COALESCE((SELECT SUM(p.amount_micros) FROM peer_transfers p "
        "WHERE p.parent_id = l.lease_id), 0) AS BIGINT) FROM leases l "
        "WHERE l.owner_id = ? AND l.state = ?",
        (owner_id, STATE_OPEN),
    )
    leases = [OpenLease(r[0], int(r[1]), int(r[2]), max(0, int(r[3])), int(r[4])) for r in rows]
    bindings = await tx.fetchall(
        "SELECT device, envelope FROM bindings WHERE owner_id = ? AND na >= ?",
        (owner_id, clamp_ms(now_ms)),
    )
    days: dict[bytes, int] = {}
    for device, envelope in bindings:
        raw = split_envelope(bytes(envelope), bytes_max=limits.IDENTITY_ENVELOPE_BYTES_MAX)
        day = decode_body(Binding, raw.body).day_max_micros
        days[bytes(device)] = max(day, days.get(bytes(device), 0))
    return partition_bound(leases, [days[d] for d in sorted(days)], policy_life_ms=policy_life_ms)
