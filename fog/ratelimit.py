"""Per-device token buckets, held in memory only (docs/protocol.md, section 13).

A bucket is pure data (``Bucket``); ``authorize`` takes one and returns the next. ``Buckets``
is the bounded table the store keeps between groups: at most ``BUCKETS_MAX`` devices, the
least recently seen forgotten first (a forgotten device starts again with a full bucket, the
same as after a restart: lenient, never wrong about money).
"""

from dataclasses import dataclass
from typing import Final

MS_PER_S: Final = 1_000
BUCKETS_MAX: Final = 100_000


@dataclass(frozen=True, slots=True)
class Bucket:
    """A device's token bucket: ``tokens`` left at fog time ``at_ms``."""

    tokens: float
    at_ms: int

    @staticmethod
    def full(burst: int, now_ms: int) -> "Bucket":
        return Bucket(float(burst), now_ms)

    def refilled(self, *, rate_per_s: float, burst: int, now_ms: int) -> "Bucket":
        """The bucket at ``now_ms``; a clock that went back refills nothing."""
        elapsed_ms = max(0, now_ms - self.at_ms)
        tokens = min(float(burst), self.tokens + elapsed_ms * rate_per_s / MS_PER_S)
        return Bucket(tokens, max(now_ms, self.at_ms))


class Buckets:
    """device key -> Bucket, bounded, least recently set evicted first."""

    def __init__(self, *, buckets_max: int = BUCKETS_MAX) -> None:
        assert buckets_max >= 1
        self._max = buckets_max
        self._table: dict[bytes, Bucket] = {}

    def get(self, device: bytes) -> Bucket | None:
        return self._table.get(device)

    def set(self, device: bytes, bucket: Bucket) -> None:
        self._table.pop(device, None)
        self._table[device] = bucket
        if len(self._table) > self._max:
            del self._table[next(iter(self._table))]
        assert len(self._table) <= self._max

    def __len__(self) -> int:
        return len(self._table)
