"""The reason precedence of spec section 6, row by row (fog/authorize.py: ``ORDER``, ``screen``,
``authorize``; the retransmission slot in ``FogStore``).

For every row: an intent to which that row and every later row apply gets that row's reason,
and an intent to which only that row applies gets it too (each check fires on its own)."""

import dataclasses
import re
from pathlib import Path

import msgpack
import pytest

from fog.authorize import ORDER, DeviceView, LeaseView, Policy, authorize, screen
from fog.ratelimit import Bucket
from protocol.messages import Binding, Intent, OwnerCredential
from protocol.reasons import Reason
from protocol.signing import public_key, seal
from tests.fog.world import NOW, World, key

PROTOCOL_MD = Path(__file__).parents[2] / "docs" / "protocol.md"
DEV = key()
D = public_key(DEV)
FOG = "fog-1"
POLICY = Policy(rate_burst=5, rate_per_s=1.0)
AUTHORIZE_ROWS = ORDER[3:]  # rows 4-15: what authorize decides


def test_order_is_the_documented_table() -> None:
    """The table of docs/protocol.md section 6 (the spec's, with its numbering), row for row."""
    rows = re.findall(r"^\| (\d+) \| `([a-z_]+)` \|", PROTOCOL_MD.read_text(), re.MULTILINE)
    assert [int(n) for n, _ in rows] == list(range(1, 16))
    assert tuple(Reason(code) for _, code in rows) == ORDER
    assert set(ORDER) == set(Reason)


def case(failing: set[Reason]) -> tuple[Intent, DeviceView, list[LeaseView], Bucket | None]:
    """An intent, what the fog knows of its device, the owner's leases and the device's
    bucket, such that exactly the checks of rows 4-15 in ``failing`` apply."""
    binding = Binding(
        device=D,
        owner_id="acme",
        not_before_ms=0,
        not_after_ms=NOW - 1 if Reason.EXPIRED in failing else 2 * NOW,
        currency="EUR",
        tx_max_micros=100,
        day_max_micros=250,
        payees=("elsewhere",) if Reason.PAYEE_NOT_ALLOWED in failing else None,
    )
    owner = OwnerCredential(
        owner_id="acme", key=b"\x22" * 32, not_before_ms=0, not_after_ms=2 * NOW
    )
    known = Reason.UNKNOWN_DEVICE not in failing
    view = DeviceView(
        binding=binding if known else None,
        owner=owner if known else None,
        device_revoked=Reason.REVOKED in failing,
        seq_taken=Reason.SEQ_CONFLICT in failing,
        seq_last=9 if Reason.STALE in failing else 0,
        day=NOW // 86_400_000,
        day_micros=240 if Reason.LIMIT_DAY in failing else 0,
    )
    intent = Intent(
        device=D,
        fog_id="fog-2" if Reason.WRONG_FOG in failing else FOG,
        seq=9 if Reason.STALE in failing else 10,
        payee_id="shop",
        amount_micros=200 if Reason.LIMIT_TX in failing else 20,
        currency="GBP" if Reason.CURRENCY in failing else "EUR",
        time_ms=NOW,
    )
    lease = LeaseView(
        lease_id=b"\x01" * 16,
        currency="EUR",
        amount_micros=1_000,
        drawn_micros=0,
        not_after_ms=NOW + 1,
    )
    leases = [] if Reason.INSUFFICIENT_BUDGET in failing else [lease]
    bucket = Bucket(0.0, NOW) if Reason.RATE_LIMITED in failing else None
    return intent, view, leases, bucket


def decide(failing: set[Reason]) -> Reason | None:
    intent, view, leases, bucket = case(failing)
    decision = authorize(intent, view, leases, bucket, fog_id=FOG, policy=POLICY, now_ms=NOW)
    return decision.reason


def test_with_nothing_wrong_the_intent_is_authorized() -> None:
    assert decide(set()) is None


@pytest.mark.parametrize("reason", AUTHORIZE_ROWS, ids=str)
def test_a_row_wins_over_every_later_row(reason: Reason) -> None:
    later = set(ORDER[ORDER.index(reason) :])
    assert decide(later) is reason


@pytest.mark.parametrize("reason", AUTHORIZE_ROWS, ids=str)
def test_a_row_alone_declines_with_its_reason(reason: Reason) -> None:
    assert decide({reason}) is reason


def test_stale_by_the_clock_window_sits_in_row_9() -> None:
    intent, view, leases, _ = case({Reason.RATE_LIMITED, Reason.CURRENCY})
    late = dataclasses.replace(intent, time_ms=NOW - POLICY.clock_skew_ms - 1)
    empty = Bucket(0.0, NOW)
    got = authorize(late, view, leases, empty, fog_id=FOG, policy=POLICY, now_ms=NOW)
    assert got.reason is Reason.STALE and got.bucket == empty  # not charged before row 10


# ---- rows 1-3 and the retransmission: screen and the store ----------------------------------


def good_intent(fog_id: str = FOG, seq: int = 1) -> Intent:
    return Intent(
        device=D,
        fog_id=fog_id,
        seq=seq,
        payee_id="shop",
        amount_micros=20,
        currency="EUR",
        time_ms=NOW,
    )


def envelope(body: bytes, sig: bytes) -> bytes:
    return msgpack.packb(["intent", body, D, sig], use_bin_type=True)


def test_row_1_malformed_wins_over_a_bad_signature_and_a_wrong_topic() -> None:
    body = msgpack.packb({"d": D, "unknown": 1}, use_bin_type=True)
    signed, declined = screen(envelope(body, b"\x00" * 64), b"\x33" * 32)
    assert signed is None and declined is not None and declined.reason is Reason.MALFORMED


def test_row_2_bad_signature_wins_over_a_wrong_topic() -> None:
    good = msgpack.unpackb(seal(good_intent("fog-2"), DEV))
    signed, declined = screen(envelope(good[1], bytes(64)), b"\x33" * 32)
    assert signed is None and declined is not None and declined.reason is Reason.BAD_SIGNATURE


def test_row_3_topic_mismatch_wins_over_a_wrong_fog(world: World) -> None:
    payload = seal(good_intent("fog-2"), DEV)
    signed, declined = screen(payload, b"\x33" * 32)
    assert signed is not None and declined is not None
    assert declined.reason is Reason.TOPIC_MISMATCH
    assert world.send((b"\x33" * 32, payload))[0].reason is Reason.TOPIC_MISMATCH
    assert screen(payload, D) == (signed, None)


def test_a_retransmission_is_answered_right_after_row_3(world: World) -> None:
    """Once authorized, the same bytes get the stored receipt even when rows 4-15 would now
    decline them (here: the device was revoked since)."""
    owner = world.owner()
    world.lease()
    dev = world.device(owner)
    first = world.pay(dev, 1)
    assert first.status == "ok"
    world.revoke(public_key(dev))
    again = world.send((dev, world.intent(dev, 1)))[0]
    assert again.replay and again.receipt == first.receipt
    assert world.pay(dev, 2).reason is Reason.REVOKED
