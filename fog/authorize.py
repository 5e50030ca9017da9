"""The fog's decision on one payment intent: the reason precedence of spec section 6, here.

Pure: no I/O, no clock, no randomness. Hold this module against the spec's reason table: each
row is one numbered check below, in the table's order, and the first that applies is the
answer (``ORDER`` is the table; a test per row holds it).

| #  | code                  | where                                                        |
| -- | --------------------- | ------------------------------------------------------------ |
| 1  | `malformed`           | ``screen``: ``open_envelope`` (size, envelope, type, body)   |
| 2  | `bad_signature`       | ``screen``: ``open_envelope`` (signature; signer is ``d``)   |
| 3  | `topic_mismatch`      | ``screen``                                                   |
| -- | retransmission        | ``FogStore._one``: an authorized intent sent again gets its  |
|    |                       | stored receipt "right after the first three checks"          |
| 4  | `wrong_fog`           | ``authorize``                                                |
| 5  | `unknown_device`      | ``authorize``                                                |
| 6  | `revoked`             | ``authorize`` (also a device suspended here as a clone)      |
| 7  | `expired`             | ``authorize``                                                |
| 8  | `seq_conflict`        | ``authorize``                                                |
| 9  | `stale`               | ``authorize`` (sequence: own and peers' marks; clock window) |
| 10 | `rate_limited`        | ``authorize`` (the bucket is charged from here on)           |
| 11 | `currency`            | ``authorize``                                                |
| 12 | `payee_not_allowed`   | ``authorize``                                                |
| 13 | `limit_tx`            | ``authorize``                                                |
| 14 | `limit_day`           | ``authorize``                                                |
| 15 | `insufficient_budget` | ``authorize`` (``pick_lease``)                                |

Within rows 1 and 2 the order of section 6 of docs/protocol.md holds (``protocol/signing.py``
verifies first and still decodes the body, so a payload both malformed and badly signed is
``malformed``). The store gathers what rows 4 to 15 need (``DeviceView``, the owner's
``LeaseView``s, the device's rate bucket) inside the group's transaction.

Rules the spec leaves open (docs/protocol.md, section 13):

- validity windows are inclusive: a binding or credential is valid for ``nb <= now <= na``
  (fog time); a lease may be drawn on while ``now <= na``.
- the day of ``day`` limits is the UTC day of the fog's clock (``now_ms // 86_400_000``),
  not the device's ``t``: a device cannot reset its day total by lying about its clock.
- a whole amount is drawn from one lease: among the owner's live leases in the intent's
  currency with room for the whole amount, the one that expires soonest (ties: lowest lease
  id). Expiring budget is used first; amounts are never split across leases.
- the rate limiter is a per-device token bucket held in memory. It is charged for every
  intent that reaches the rate check (after ``stale``), whatever the final decision: it is
  the one piece of state a declined intent changes, and it is lost on restart (a restart
  refills every bucket, which at worst lets a device burst once more).
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from fog.ratelimit import Bucket
from protocol.errors import Declined
from protocol.messages import Binding, Intent, OwnerCredential
from protocol.reasons import Reason
from protocol.signing import Signed, open_envelope

DAY_MS: Final = 86_400_000
ORDER: Final = (  # spec section 6: when several apply, the first is given
    Reason.MALFORMED,
    Reason.BAD_SIGNATURE,
    Reason.TOPIC_MISMATCH,
    Reason.WRONG_FOG,
    Reason.UNKNOWN_DEVICE,
    Reason.REVOKED,
    Reason.EXPIRED,
    Reason.SEQ_CONFLICT,
    Reason.STALE,
    Reason.RATE_LIMITED,
    Reason.CURRENCY,
    Reason.PAYEE_NOT_ALLOWED,
    Reason.LIMIT_TX,
    Reason.LIMIT_DAY,
    Reason.INSUFFICIENT_BUDGET,
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Policy:
    """The fog's local policy (spec section 6 defaults)."""

    clock_skew_ms: int = 300_000
    rate_per_s: float = 20.0  # per-device token bucket refill
    rate_burst: int = 40

    def __post_init__(self) -> None:
        assert self.clock_skew_ms >= 0
        assert self.rate_per_s > 0
        assert self.rate_burst >= 1


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceView:
    """What the fog knows about a device, gathered by the store inside the transaction.

    ``binding`` is the binding in force (None: unknown device); ``owner`` is the owner
    credential that vouches for it (same owner_id, and its key signed the binding; None:
    unknown). ``seq_taken``: an authorized intent with this device and ``q`` exists (it has a
    different intent id, since retransmissions were answered before). ``peer_seq_last``: the
    highest ``q`` a peer fog reported authorizing (``fog/peers.py``, docs/protocol.md 17.4);
    ``suspended``: the device's key signed two intents with one ``q`` (a clone), so it is
    declined ``revoked`` here until the issuer decides.
    """

    binding: Binding | None
    owner: OwnerCredential | None
    device_revoked: bool = False
    owner_revoked: bool = False
    seq_last: int = 0  # highest q authorized for the device (0: none)
    seq_taken: bool = False
    peer_seq_last: int = 0  # highest q peers reported authorizing (0: none)
    suspended: bool = False
    day: int = 0  # UTC day number of day_micros
    day_micros: int = 0  # authorized on that day


@dataclass(frozen=True, slots=True, kw_only=True)
class LeaseView:
    lease_id: bytes
    currency: str
    amount_micros: int
    drawn_micros: int
    not_after_ms: int

    @property
    def left_micros(self) -> int:
        left = self.amount_micros - self.drawn_micros
        assert left >= 0
        return left


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    """``reason`` None means authorized: ``lease_id`` is drawn ``amount_micros`` and the
    device's day total becomes ``day_micros`` on ``day``. ``bucket`` is the device's rate
    bucket after this intent, whatever the decision."""

    reason: Reason | None
    bucket: Bucket
    lease_id: bytes | None = None
    day: int = 0
    day_micros: int = 0

    @property
    def ok(self) -> bool:
        return self.reason is None


def utc_day(now_ms: int) -> int:
    return now_ms // DAY_MS


def within(not_before_ms: int, not_after_ms: int, now_ms: int) -> bool:
    return not_before_ms <= now_ms <= not_after_ms


def pick_lease(leases: Sequence[LeaseView], intent: Intent, *, now_ms: int) -> LeaseView | None:
    """The live lease in the intent's currency with room for the whole amount that expires
    soonest (ties: lowest lease id); None if there is none."""
    fits = [
        lease
        for lease in leases
        if lease.currency == intent.currency
        and now_ms <= lease.not_after_ms
        and lease.left_micros >= intent.amount_micros
    ]
    if not fits:
        return None
    return min(fits, key=lambda lease: (lease.not_after_ms, lease.lease_id))


def screen(
    payload: bytes, topic_device: bytes, *, verified: bool = False
) -> tuple[Signed[Intent], None] | tuple[Signed[Intent] | None, Declined]:
    """Rows 1 to 3: ``(intent, None)`` when it passed; else the decline with its detail, and
    the verified intent for ``topic_mismatch`` (the receipt names its d and q). ``verified``:
    a verify worker of this fog found the signature good for these bytes (row 2's Ed25519
    check is not repeated; everything else is)."""
    try:
        signed = open_envelope(payload, Intent, verified=verified)  # rows 1 and 2
    except Declined as exc:
        return None, exc
    if signed.msg.device != topic_device:  # row 3
        return signed, Declined(Reason.TOPIC_MISMATCH, "d is not the topic's device")
    return signed, None


def authorize(
    intent: Intent,
    view: DeviceView,
    leases: Sequence[LeaseView],
    bucket: Bucket | None,
    *,
    fog_id: str,
    policy: Policy,
    now_ms: int,
) -> Decision:
    """Rows 4 to 15, for an intent that passed ``screen`` and is not a retransmission of an
    authorized one. ``leases`` are the owner's leases at this fog (any currency, any expiry:
    row 15 filters them); ``bucket`` is the device's rate bucket (None: full)."""
    before = bucket if bucket is not None else Bucket.full(policy.rate_burst, now_ms)
    binding, owner = view.binding, view.owner
    reason: Reason | None = None
    if intent.fog_id != fog_id:
        reason = Reason.WRONG_FOG  # 4
    elif binding is None or owner is None:
        reason = Reason.UNKNOWN_DEVICE  # 5
    elif view.device_revoked or view.owner_revoked or view.suspended:
        reason = Reason.REVOKED  # 6
    elif not within(binding.not_before_ms, binding.not_after_ms, now_ms) or not within(
        owner.not_before_ms, owner.not_after_ms, now_ms
    ):
        reason = Reason.EXPIRED  # 7
    elif view.seq_taken:
        reason = Reason.SEQ_CONFLICT  # 8
    elif (
        intent.seq <= max(view.seq_last, view.peer_seq_last)
        or abs(intent.time_ms - now_ms) > policy.clock_skew_ms
    ):
        reason = Reason.STALE  # 9
    if reason is not None:
        return Decision(reason=reason, bucket=before)
    assert binding is not None and owner is not None
    assert binding.device == intent.device and binding.owner_id == owner.owner_id
    after = before.refilled(rate_per_s=policy.rate_per_s, burst=policy.rate_burst, now_ms=now_ms)
    if after.tokens < 1.0:
        return Decision(reason=Reason.RATE_LIMITED, bucket=after)  # 10
    after = Bucket(after.tokens - 1.0, after.at_ms)
    day = utc_day(now_ms)
    day_total = view.day_micros if view.day == day else 0
    if intent.currency != binding.currency:
        reason = Reason.CURRENCY  # 11
    elif binding.payees is not None and intent.payee_id not in binding.payees:
        reason = Reason.PAYEE_NOT_ALLOWED  # 12
    elif intent.amount_micros > binding.tx_max_micros:
        reason = Reason.LIMIT_TX  # 13
    elif day_total + intent.amount_micros > binding.day_max_micros:
        reason = Reason.LIMIT_DAY  # 14
    if reason is not None:
        return Decision(reason=reason, bucket=after)
    lease = pick_lease(leases, intent, now_ms=now_ms)
    if lease is None:
        return Decision(reason=Reason.INSUFFICIENT_BUDGET, bucket=after)  # 15
    return Decision(
        reason=None,
        bucket=after,
        lease_id=lease.lease_id,
        day=day,
        day_micros=day_total + intent.amount_micros,
    )
