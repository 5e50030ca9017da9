"""The pure decision: precedence, lease choice, the UTC day, the token bucket."""

import pytest

from fog.authorize import (
    DAY_MS,
    Decision,
    DeviceView,
    LeaseView,
    Policy,
    authorize,
    pick_lease,
    utc_day,
)
from fog.ratelimit import Bucket, Buckets
from protocol.messages import Binding, Intent, OwnerCredential
from protocol.reasons import Reason

NOW = 1_790_000_000_000
D = b"\x11" * 32
POLICY = Policy()
BINDING = Binding(
    device=D,
    owner_id="acme",
    not_before_ms=0,
    not_after_ms=2 * NOW,
    currency="EUR",
    tx_max_micros=100,
    day_max_micros=250,
)
OWNER = OwnerCredential(owner_id="acme", key=b"\x22" * 32, not_before_ms=0, not_after_ms=2 * NOW)
VIEW = DeviceView(binding=BINDING, owner=OWNER)


def intent(seq: int = 1, amount: int = 10, **kw: object) -> Intent:
    fields: dict[str, object] = dict(
        device=D,
        fog_id="fog-1",
        seq=seq,
        payee_id="shop",
        amount_micros=amount,
        currency="EUR",
        time_ms=NOW,
    )
    fields.update(kw)
    return Intent(**fields)  # type: ignore[arg-type]


def lease(
    lid: int, amount: int = 1000, drawn: int = 0, na: int = NOW + DAY_MS, cur: str = "EUR"
) -> LeaseView:
    return LeaseView(
        lease_id=bytes([lid]) * 16,
        currency=cur,
        amount_micros=amount,
        drawn_micros=drawn,
        not_after_ms=na,
    )


LEASES = (lease(1),)


def decide(
    i: Intent,
    view: DeviceView = VIEW,
    leases: tuple[LeaseView, ...] = LEASES,
    bucket: Bucket | None = None,
    now: int = NOW,
) -> Decision:
    return authorize(i, view, list(leases), bucket, fog_id="fog-1", policy=POLICY, now_ms=now)


def test_ok_draws_and_counts_the_day() -> None:
    d = decide(
        intent(amount=60),
        DeviceView(binding=BINDING, owner=OWNER, day=utc_day(NOW), day_micros=100),
    )
    assert d.ok and d.lease_id == bytes([1]) * 16
    assert (d.day, d.day_micros) == (utc_day(NOW), 160)


def test_day_total_resets_on_the_fogs_next_day() -> None:
    view = DeviceView(binding=BINDING, owner=OWNER, day=utc_day(NOW) - 1, day_micros=250)
    assert decide(intent(amount=100), view).day_micros == 100
    view = DeviceView(binding=BINDING, owner=OWNER, day=utc_day(NOW), day_micros=250)
    assert decide(intent(amount=1), view).reason is Reason.LIMIT_DAY


def test_pick_lease_soonest_expiry_with_room_ties_by_id() -> None:
    leases = [
        lease(3, na=NOW + 50),
        lease(2, na=NOW + 50),
        lease(1, na=NOW + 10, drawn=995),
        lease(4, na=NOW + 5, cur="USD"),
        lease(5, na=NOW - 1),
    ]
    picked = [pick_lease(leases, intent(amount=a), now_ms=NOW) for a in (10, 5)]
    assert [p.lease_id if p else None for p in picked] == [bytes([2]) * 16, bytes([1]) * 16]
    assert pick_lease(leases, intent(amount=1001), now_ms=NOW) is None
    # a lease is live through its na, not after
    assert pick_lease([lease(7, na=NOW)], intent(), now_ms=NOW) is not None
    assert pick_lease([lease(7, na=NOW)], intent(), now_ms=NOW + 1) is None


@pytest.mark.parametrize(
    ("view", "i", "reason"),
    [
        (VIEW, intent(fog_id="fog-2", amount=10**6), Reason.WRONG_FOG),
        (DeviceView(binding=None, owner=None), intent(currency="USD"), Reason.UNKNOWN_DEVICE),
        (DeviceView(binding=BINDING, owner=None), intent(), Reason.UNKNOWN_DEVICE),
        (
            DeviceView(binding=BINDING, owner=OWNER, owner_revoked=True),
            intent(seq=0 + 1, time_ms=0),
            Reason.REVOKED,
        ),
        (
            DeviceView(binding=BINDING, owner=OWNER, seq_taken=True, seq_last=5),
            intent(seq=5),
            Reason.SEQ_CONFLICT,
        ),
        (
            DeviceView(binding=BINDING, owner=OWNER, seq_last=5),
            intent(seq=5, currency="USD"),
            Reason.STALE,
        ),
        (VIEW, intent(currency="USD", payee_id="x", amount=10**6), Reason.CURRENCY),
        (VIEW, intent(amount=101), Reason.LIMIT_TX),
    ],
)
def test_first_reason_in_spec_order(view: DeviceView, i: Intent, reason: Reason) -> None:
    assert decide(i, view).reason is reason


def test_expired_windows_are_inclusive() -> None:
    b = Binding(
        device=D,
        owner_id="acme",
        not_before_ms=NOW,
        not_after_ms=NOW + 10,
        currency="EUR",
        tx_max_micros=100,
        day_max_micros=250,
    )
    view = DeviceView(binding=b, owner=OWNER)
    assert decide(intent(), view, now=NOW).ok
    assert decide(intent(time_ms=NOW + 10), view, now=NOW + 10).ok
    assert decide(intent(), view, now=NOW - 1).reason is Reason.EXPIRED
    assert decide(intent(time_ms=NOW + 11), view, now=NOW + 11).reason is Reason.EXPIRED


def test_bucket_charged_only_from_the_rate_check_on() -> None:
    empty = Bucket(0.0, NOW)
    stale = decide(intent(time_ms=0), bucket=Bucket(5.0, NOW))
    assert stale.reason is Reason.STALE and stale.bucket == Bucket(5.0, NOW)
    limited = decide(intent(), bucket=empty)
    assert limited.reason is Reason.RATE_LIMITED
    declined_later = decide(intent(amount=101), bucket=Bucket(5.0, NOW))
    assert declined_later.reason is Reason.LIMIT_TX and declined_later.bucket.tokens == 4.0
    refilled = decide(intent(), bucket=empty, now=NOW + 50)  # 20/s: one token in 50 ms
    assert refilled.ok and refilled.bucket.tokens == pytest.approx(0.0)


def test_bucket_refill_caps_and_ignores_a_clock_going_back() -> None:
    b = Bucket(1.0, NOW)
    assert b.refilled(rate_per_s=20.0, burst=40, now_ms=NOW + 10**6).tokens == 40.0
    back = b.refilled(rate_per_s=20.0, burst=40, now_ms=NOW - 10**6)
    assert back == Bucket(1.0, NOW)


def test_buckets_table_is_bounded() -> None:
    table = Buckets(buckets_max=3)
    for k in range(5):
        table.set(bytes([k]), Bucket(float(k), NOW))
    assert len(table) == 3 and table.get(b"\x00") is None and table.get(b"\x04") is not None
    table.set(b"\x02", Bucket(9.0, NOW))  # touched: now the most recent
    table.set(b"\x05", Bucket(0.0, NOW))
    assert table.get(b"\x03") is None and table.get(b"\x02") == Bucket(9.0, NOW)


def test_utc_day() -> None:
    assert utc_day(DAY_MS - 1) == 0 and utc_day(DAY_MS) == 1
