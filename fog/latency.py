"""Latency figures for the ``fog_stats`` line: how long the fog took to answer, and how much of
that was the store.

An operator told "payments are slow at this box" needs to know where the time goes: in the
store (decode, verify, authorize, the durable commit, sign: ``store_ms``, one sample per group
of intents, so a disk whose fsync stalls shows here) or elsewhere in the fog (waiting for the
group in front, the event loop, publishing: the rest of ``answer_ms``, one sample per intent,
from the moment the fog read it from the broker to the moment it handed the receipt back).
Neither counts the broker or the network.

``Histogram`` keeps counts in buckets 10% wide (from 0.05 ms up; everything over a minute in the
last one), so p50 and p99 are reported to within 10% (as the bucket's upper edge, never above
the maximum) and the maximum exactly, in constant memory and a microsecond per sample. Each
``fog_stats`` line reports the interval since the previous one and starts a new interval.
"""

import math
from typing import Final

BASE_MS: Final = 0.05
RATIO: Final = 1.1
LOG_RATIO: Final = math.log(RATIO)
TOP_MS: Final = 60_000.0
BUCKETS: Final = math.ceil(math.log(TOP_MS / BASE_MS) / LOG_RATIO) + 1
PERCENTILES: Final = ((50, "p50"), (99, "p99"))


def upper_edge_ms(bucket: int) -> float:
    """The largest value (ms) counted in ``bucket`` (but the last one takes everything above)."""
    return BASE_MS * RATIO**bucket


def bucket_of(ms: float) -> int:
    if ms <= BASE_MS:
        return 0
    b = math.ceil(math.log(ms / BASE_MS) / LOG_RATIO)
    if b > 0 and ms <= upper_edge_ms(b - 1):  # the logarithm rounded up past an edge
        b -= 1
    return min(b, BUCKETS - 1)


class Histogram:
    """Durations of one kind since the last ``take``."""

    __slots__ = ("_counts", "_max_ms", "_n")

    def __init__(self) -> None:
        self._counts = [0] * BUCKETS
        self._n = 0
        self._max_ms = 0.0

    def add(self, seconds: float) -> None:
        ms = max(0.0, seconds * 1000.0)  # a clock cannot go back, but never index with it
        self._counts[bucket_of(ms)] += 1
        self._n += 1
        if ms > self._max_ms:
            self._max_ms = ms

    @property
    def count(self) -> int:
        return self._n

    def percentile_ms(self, p: float) -> float:
        """The upper edge of the bucket holding the ``p``-th percentile (nearest rank),
        capped at the maximum; 0.0 when empty."""
        assert 0 < p <= 100
        if self._n == 0:
            return 0.0
        rank = max(1, math.ceil(p / 100 * self._n))
        seen = 0
        for bucket, count in enumerate(self._counts):
            seen += count
            if seen >= rank:  # the last bucket has no upper edge: all beyond a minute
                last = bucket == BUCKETS - 1
                return self._max_ms if last else min(upper_edge_ms(bucket), self._max_ms)
        raise AssertionError("counts do not add up to n")

    def take(self, name: str) -> dict[str, int | float]:
        """``{name}_n``, and with samples ``{name}_p50``, ``{name}_p99``, ``{name}_max`` (ms,
        two decimals); then empty for the next interval."""
        out: dict[str, int | float] = {f"{name}_n": self._n}
        if self._n:
            for p, label in PERCENTILES:
                out[f"{name}_{label}"] = round(self.percentile_ms(p), 2)
            out[f"{name}_max"] = round(self._max_ms, 2)
        self._counts = [0] * BUCKETS
        self._n = 0
        self._max_ms = 0.0
        return out
