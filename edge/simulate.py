"""Load simulator: many devices paying through one fog, with a latency histogram.

The statistics are pure (``LatencyHistogram``, ``Summary``, ``arrival_offsets_s``) and unit
tested; ``run_load`` is the thin async shell: it paces arrivals (evenly spaced or Poisson),
sends each as a payment of the next device in round-robin order through ``DeviceSession``
(one wildcard receipt subscription per connection), and records every outcome.

The histogram is log-linear (HdrHistogram's idea, simplified): values in microseconds, 64
sub-buckets per power of two, so a percentile is reported within 1/64 (1.6 %) above the true
value while memory stays bounded whatever the run length. ``max`` is exact.
"""

import asyncio
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import aiomqtt

from edge.device import (
    Device,
    DeviceSession,
    PaymentDeclined,
    PaymentTimeout,
)
from protocol.errors import Declined

SUB_BUCKETS: Final = 64  # per power of two: relative error <= 1/64
LATENCY_US_MAX: Final = 3_600_000_000  # one hour; longer is clamped
PERCENTILES: Final = (50.0, 90.0, 99.0)
INTENTS_MAX: Final = 10_000_000
RATE_PER_S_MAX: Final = 100_000.0
PROGRESS_INTERVAL_S: Final = 1.0
DRAIN_TIMEOUT_S_MAX: Final = 120.0

STATUS_OK: Final = "ok"
STATUS_DECLINED: Final = "declined"
STATUS_TIMEOUT: Final = "timeout"
STATUS_ERROR: Final = "error"


def _bucket(us: int) -> int:
    """Index of the bucket holding ``us`` (exact below SUB_BUCKETS)."""
    if us < SUB_BUCKETS:
        return us
    exp = us.bit_length() - 7  # SUB_BUCKETS = 2**6: keep the top 7 bits
    return (exp + 1) * SUB_BUCKETS + ((us >> exp) - SUB_BUCKETS)


def _bucket_high(index: int) -> int:
    """The largest value a bucket holds."""
    if index < SUB_BUCKETS:
        return index
    exp = index // SUB_BUCKETS - 1
    mantissa = index % SUB_BUCKETS + SUB_BUCKETS
    return ((mantissa + 1) << exp) - 1


@dataclass(slots=True)
class LatencyHistogram:
    """Latencies in microseconds, log-linear buckets; percentiles by nearest rank."""

    counts: Counter[int] = field(default_factory=Counter)
    total: int = 0
    max_us: int = 0
    sum_us: int = 0

    def record(self, us: int) -> None:
        assert type(us) is int and us >= 0
        us = min(us, LATENCY_US_MAX)
        self.counts[_bucket(us)] += 1
        self.total += 1
        self.sum_us += us
        self.max_us = max(self.max_us, us)

    def percentile(self, p: float) -> int:
        """The value at or below which ``p`` percent of records fall (bucket upper bound,
        never above the maximum seen); 0 when empty."""
        assert 0.0 < p <= 100.0
        if self.total == 0:
            return 0
        rank = max(1, math.ceil(p / 100.0 * self.total))
        seen = 0
        for index in sorted(self.counts):
            seen += self.counts[index]
            if seen >= rank:
                return min(_bucket_high(index), self.max_us)
        raise AssertionError("rank beyond total")

    def merge(self, other: "LatencyHistogram") -> None:
        self.counts.update(other.counts)
        self.total += other.total
        self.sum_us += other.sum_us
        self.max_us = max(self.max_us, other.max_us)


@dataclass(slots=True)
class Summary:
    """Outcomes of a run: latency of every answered payment, counts by status and reason."""

    histogram: LatencyHistogram = field(default_factory=LatencyHistogram)
    by_status: Counter[str] = field(default_factory=Counter)
    by_reason: Counter[str] = field(default_factory=Counter)
    elapsed_s: float = 0.0

    def record(self, status: str, latency_us: int, reason: str | None = None) -> None:
        self.by_status[status] += 1
        if reason is not None:
            self.by_reason[reason] += 1
        if status in (STATUS_OK, STATUS_DECLINED):
            self.histogram.record(latency_us)

    @property
    def sent(self) -> int:
        return sum(self.by_status.values())

    def to_dict(self) -> dict[str, Any]:
        h = self.histogram
        latency = {f"p{p:g}_ms": h.percentile(p) / 1000 for p in PERCENTILES}
        latency["max_ms"] = h.max_us / 1000
        latency["mean_ms"] = round(h.sum_us / h.total / 1000, 3) if h.total else 0.0
        rate = self.sent / self.elapsed_s if self.elapsed_s > 0 else 0.0
        return {
            "sent": self.sent,
            "elapsed_s": round(self.elapsed_s, 3),
            "rate_per_s": round(rate, 1),
            "status": dict(sorted(self.by_status.items())),
            "reasons": dict(sorted(self.by_reason.items())),
            "latency": latency,
        }

    def table(self) -> str:
        d = self.to_dict()
        lat = d["latency"]
        lines = [
            f"sent {d['sent']} in {d['elapsed_s']} s ({d['rate_per_s']}/s)",
            "latency ms   p50 {p50_ms:>9.3f}   p90 {p90_ms:>9.3f}   p99 {p99_ms:>9.3f}"
            "   max {max_ms:>9.3f}".format(**lat),
            "status       " + "   ".join(f"{k} {v}" for k, v in d["status"].items()),
        ]
        if d["reasons"]:
            lines.append("reasons      " + "   ".join(f"{k} {v}" for k, v in d["reasons"].items()))
        return "\n".join(lines)

    def progress_line(self) -> str:
        h = self.histogram
        return (
            f"[{self.elapsed_s:6.1f}s] done {self.sent}  ok {self.by_status[STATUS_OK]}"
            f"  declined {self.by_status[STATUS_DECLINED]}"
            f"  timeout {self.by_status[STATUS_TIMEOUT]}  p50 {h.percentile(50) / 1000:.1f} ms"
        )


def arrival_offsets_s(
    rate_per_s: float,
    *,
    duration_s: float | None = None,
    count: int | None = None,
    poisson: bool = False,
    rng: random.Random | None = None,
) -> Iterator[float]:
    """Seconds from the start at which each intent is sent: evenly spaced at ``rate_per_s``
    or a Poisson process of that rate; stops after ``duration_s`` or ``count`` (the first)."""
    assert 0 < rate_per_s <= RATE_PER_S_MAX
    assert duration_s is not None or count is not None
    limit = INTENTS_MAX if count is None else min(count, INTENTS_MAX)
    rng = rng or random.Random()
    t = 0.0
    for n in range(limit):
        t = rng.expovariate(rate_per_s) + t if poisson else n / rate_per_s
        if duration_s is not None and t >= duration_s:
            return
        yield t


@dataclass(frozen=True, slots=True, kw_only=True)
class Payment:
    payee_id: str
    amount_micros: int
    currency: str
    timeout_s: float
    retries_max: int


async def pay_one(
    session: DeviceSession, device: Device, payment: Payment, summary: Summary
) -> None:
    """One payment; its outcome and latency go into ``summary``."""
    start = time.perf_counter_ns()
    status, reason = STATUS_OK, None
    try:
        await session.pay(
            device,
            payment.payee_id,
            payment.amount_micros,
            payment.currency,
            timeout_s=payment.timeout_s,
            retries_max=payment.retries_max,
        )
    except PaymentDeclined as exc:
        status, reason = STATUS_DECLINED, str(exc.reason)
    except PaymentTimeout:
        status = STATUS_TIMEOUT
    except (aiomqtt.MqttError, Declined) as exc:
        status, reason = STATUS_ERROR, type(exc).__name__
    summary.record(status, (time.perf_counter_ns() - start) // 1000, reason)


async def run_load(
    sessions: Sequence[DeviceSession],
    devices: Sequence[Device],
    payment: Payment,
    offsets: Iterator[float],
    *,
    progress: Callable[[Summary], None] | None = None,
) -> Summary:
    """Send one payment per offset (round-robin over devices; device i uses session
    i mod len(sessions)), wait for every answer, and return the summary."""
    assert sessions and devices
    summary = Summary()
    start = time.monotonic()
    done = asyncio.Event()
    pending: set[asyncio.Task[None]] = set()
    async with asyncio.TaskGroup() as tg:
        if progress is not None:
            tg.create_task(_report(summary, start, done, progress), name="edge.progress")
        for n, offset in enumerate(offsets):
            delay = offset - (time.monotonic() - start)
            if delay > 0:
                await asyncio.sleep(delay)
            i = n % len(devices)
            session = sessions[i % len(sessions)]
            task = tg.create_task(pay_one(session, devices[i], payment, summary), name="edge.pay")
            pending.add(task)
            task.add_done_callback(pending.discard)
        await asyncio.gather(*pending)  # each payment is bounded by its timeouts
        done.set()
    summary.elapsed_s = time.monotonic() - start
    return summary


async def _report(
    summary: Summary, start: float, done: asyncio.Event, progress: Callable[[Summary], None]
) -> None:
    """Call ``progress`` every PROGRESS_INTERVAL_S until ``done``."""
    while not done.is_set():
        try:
            async with asyncio.timeout(PROGRESS_INTERVAL_S):
                await done.wait()
        except TimeoutError:
            summary.elapsed_s = time.monotonic() - start
            progress(summary)
