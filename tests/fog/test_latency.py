"""fog.latency.Histogram: the percentiles fog_stats reports are within one bucket (10%) above
the exact ones, never above the maximum, and each line starts a new interval."""

import math
import random

import pytest

from fog.latency import BUCKETS, RATIO, Histogram, bucket_of, upper_edge_ms


def exact_ms(samples_ms: list[float], p: float) -> float:
    ordered = sorted(samples_ms)
    return ordered[max(1, math.ceil(p / 100 * len(ordered))) - 1]


def test_empty_interval_reports_its_count_only() -> None:
    assert Histogram().take("answer_ms") == {"answer_ms_n": 0}


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_percentiles_are_within_one_bucket_above_the_exact_ones(seed: int) -> None:
    rng = random.Random(seed)
    # most fast, a tail of slow ones: the shape of a disk that stalls now and then
    samples = [rng.lognormvariate(0.5, 0.6) for _ in range(5000)]
    samples += [rng.uniform(20, 300) for _ in range(60)]
    h = Histogram()
    for ms in samples:
        h.add(ms / 1000)
    for p in (50, 99):
        exact = exact_ms(samples, p)
        reported = h.percentile_ms(p)
        assert exact <= reported <= exact * RATIO * (1 + 1e-9), (p, exact, reported)
    out = h.take("store_ms")
    assert out["store_ms_n"] == len(samples)
    assert out["store_ms_max"] == round(max(samples), 2)
    assert out["store_ms_p50"] <= out["store_ms_p99"] <= out["store_ms_max"]


def test_percentile_never_exceeds_the_maximum() -> None:
    h = Histogram()
    for _ in range(10):
        h.add(0.0123)  # 12.3 ms: its bucket's upper edge is above it
    assert h.percentile_ms(50) == h.percentile_ms(99) == pytest.approx(12.3)


def test_take_starts_a_new_interval() -> None:
    h = Histogram()
    h.add(0.5)
    assert h.take("x")["x_max"] == 500.0
    h.add(0.002)
    out = h.take("x")
    assert out == {"x_n": 1, "x_p50": 2.0, "x_p99": 2.0, "x_max": 2.0}
    assert h.take("x") == {"x_n": 0}


def test_bucket_edges_and_the_ends_of_the_range() -> None:
    assert bucket_of(0.0) == bucket_of(0.01) == bucket_of(upper_edge_ms(0)) == 0
    for b in (1, 17, 80, BUCKETS - 2):
        edge = upper_edge_ms(b)
        assert bucket_of(edge) == b
        assert bucket_of(edge * (1 + 1e-9)) == b + 1
        assert bucket_of(upper_edge_ms(b - 1) * (1 + 1e-9)) == b
    h = Histogram()
    h.add(3600.0)  # an hour: the last bucket, and reported as itself
    h.add(-1.0)  # a negative duration counts as zero instead of breaking the line
    assert bucket_of(3_600_000.0) == BUCKETS - 1
    assert h.percentile_ms(99) == 3_600_000.0
    assert h.percentile_ms(50) == upper_edge_ms(0)  # the zero, to within its bucket
