"""Reason codes of spec section 6: stable strings, in precedence order, and which are
transient."""

from protocol.reasons import Reason

# Spec section 6, in its order (the order is the precedence).
SPEC_TABLE = [
    "malformed",
    "bad_signature",
    "topic_mismatch",
    "wrong_fog",
    "unknown_device",
    "revoked",
    "expired",
    "seq_conflict",
    "stale",
    "rate_limited",
    "currency",
    "payee_not_allowed",
    "limit_tx",
    "limit_day",
    "insufficient_budget",
]


def test_codes_and_precedence_order() -> None:
    assert [str(r) for r in Reason] == SPEC_TABLE
    assert Reason("stale") is Reason.STALE
    assert str(Reason.MALFORMED) == "malformed" and f"{Reason.STALE}" == "stale"


def test_first_applicable_reason_is_the_earliest_in_the_table() -> None:
    members = list(Reason)
    applicable = {Reason.INSUFFICIENT_BUDGET, Reason.CURRENCY, Reason.EXPIRED}
    assert min(applicable, key=members.index) is Reason.EXPIRED


def test_transient() -> None:
    transient = {r for r in Reason if r.transient}
    assert transient == {
        Reason.RATE_LIMITED,
        Reason.INSUFFICIENT_BUDGET,
        Reason.UNKNOWN_DEVICE,
        Reason.LIMIT_DAY,
    }
    # the same bytes can never succeed after these
    for r in (Reason.MALFORMED, Reason.BAD_SIGNATURE, Reason.SEQ_CONFLICT, Reason.REVOKED):
        assert not r.transient
