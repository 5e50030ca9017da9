"""Decline reason codes (spec section 6)."""

import enum


class Reason(enum.StrEnum):
    """On the wire. Never rename; retire, don't reuse. Declaration order is precedence order:
    when several apply, the fog gives the first."""

    MALFORMED = "malformed"
    BAD_SIGNATURE = "bad_signature"
    TOPIC_MISMATCH = "topic_mismatch"
    WRONG_FOG = "wrong_fog"
    UNKNOWN_DEVICE = "unknown_device"
    REVOKED = "revoked"
    EXPIRED = "expired"
    SEQ_CONFLICT = "seq_conflict"
    STALE = "stale"
    RATE_LIMITED = "rate_limited"
    CURRENCY = "currency"
    PAYEE_NOT_ALLOWED = "payee_not_allowed"
    LIMIT_TX = "limit_tx"
    LIMIT_DAY = "limit_day"
    INSUFFICIENT_BUDGET = "insufficient_budget"

    @property
    def transient(self) -> bool:
        """A later retry of the same intent may succeed (TigerBeetle's transient()).

        rate_limited: the device slowed down. insufficient_budget: a new lease arrived.
        unknown_device: the binding reached the fog. limit_day: the UTC day rolled over.
        stale by clock: the device fixed its clock (but a stale q never recovers; the device
        must send a new intent with a higher q, so stale is not transient for the same bytes).
        """
        return self in _TRANSIENT


_TRANSIENT = frozenset(
    {Reason.RATE_LIMITED, Reason.INSUFFICIENT_BUDGET, Reason.UNKNOWN_DEVICE, Reason.LIMIT_DAY}
)
