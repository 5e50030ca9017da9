"""The simulator's pure statistics: histogram buckets, percentiles, summaries, pacing."""

import itertools
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from edge.simulate import (
    SUB_BUCKETS,
    LatencyHistogram,
    Summary,
    _bucket,
    _bucket_high,
    arrival_offsets_s,
)


def test_small_values_are_exact() -> None:
    h = LatencyHistogram()
    for us in range(1, 101):
        h.record(us)
    assert h.percentile(50) == 50
    assert h.percentile(90) == 90
    assert h.percentile(99) == 99
    assert h.percentile(100) == 100
    assert h.max_us == 100


def test_empty_histogram_reports_zero() -> None:
    assert LatencyHistogram().percentile(99) == 0


def test_percentile_is_nearest_rank_not_interpolated() -> None:
    h = LatencyHistogram()
    for us in (10, 20, 30, 40):
        h.record(us)
    assert h.percentile(50) == 20  # rank ceil(0.5 * 4) = 2
    assert h.percentile(51) == 30


def test_tail_is_seen() -> None:
    h = LatencyHistogram()
    for _ in range(990):
        h.record(1_000)
    for _ in range(10):
        h.record(500_000)
    assert h.percentile(99) <= 1_000 * (1 + 1 / SUB_BUCKETS)
    assert h.percentile(99.5) >= 500_000
    assert h.max_us == 500_000


@settings(deadline=None)  # no timing: the machine is shared
@given(st.integers(min_value=0, max_value=2**40))
def test_bucket_holds_value_within_relative_error(us: int) -> None:
    high = _bucket_high(_bucket(us))
    assert us <= high
    assert high - us <= us / SUB_BUCKETS


@settings(deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=10**9), min_size=1, max_size=200))
def test_percentiles_bound_the_exact_ones(values: list[int]) -> None:
    h = LatencyHistogram()
    for v in values:
        h.record(v)
    ordered = sorted(values)
    for p in (50, 90, 99, 100):
        exact = ordered[max(1, -(-p * len(values) // 100)) - 1]
        got = h.percentile(p)
        assert exact <= got <= exact + exact / SUB_BUCKETS
    assert h.percentile(100) == max(values)


def test_merge_adds_counts() -> None:
    a, b = LatencyHistogram(), LatencyHistogram()
    a.record(5)
    b.record(7)
    b.record(9)
    a.merge(b)
    assert (a.total, a.max_us, a.percentile(50)) == (3, 9, 7)


def test_summary_counts_status_and_reason() -> None:
    s = Summary()
    s.record("ok", 1000)
    s.record("ok", 3000)
    s.record("declined", 2000, "insufficient_budget")
    s.record("timeout", 9_000_000)
    s.elapsed_s = 2.0
    d = s.to_dict()
    assert d["sent"] == 4
    assert d["status"] == {"declined": 1, "ok": 2, "timeout": 1}
    assert d["reasons"] == {"insufficient_budget": 1}
    assert d["latency"]["max_ms"] == 3.0  # timeouts carry no latency
    assert 2.0 <= d["latency"]["p50_ms"] <= 2.0 * (1 + 1 / SUB_BUCKETS)
    assert d["rate_per_s"] == 2.0
    table = s.table()
    assert "p99" in table and "insufficient_budget 1" in table


def test_even_spacing_by_count_and_duration() -> None:
    assert list(arrival_offsets_s(4, count=3)) == [0.0, 0.25, 0.5]
    assert list(arrival_offsets_s(4, duration_s=1.0)) == [0.0, 0.25, 0.5, 0.75]
    assert len(list(arrival_offsets_s(10, duration_s=1.0, count=3))) == 3


def test_poisson_is_seeded_increasing_and_near_the_rate() -> None:
    a = list(arrival_offsets_s(100, duration_s=50, poisson=True, rng=random.Random(7)))
    b = list(arrival_offsets_s(100, duration_s=50, poisson=True, rng=random.Random(7)))
    assert a == b
    assert all(x < y for x, y in itertools.pairwise(a))
    assert 4_500 < len(a) < 5_500  # 5000 expected; sd ~71
