"""The fog's operational view: Prometheus ``/metrics``, ``/healthz`` and ``/readyz``.

Nothing here is on the intent path. The daemon already counts what happens (its ``counters``
dict: one increment per intent) and times every answer (``fog/latency.py``'s histogram, which
``RunningHistogram`` below extends so that ``fog_stats`` still reports one interval at a time
while ``/metrics`` sees the totals since start). A scrape reads those as they are, on the event
loop (no lock: the loop is the only writer), and reads the rest from the fog's database, on a
short-lived read-only SQLite connection in a worker thread: WAL lets it read while the store
writes, and the store's own thread and process never see it.

What the database answers at each scrape (``read_store``):

- the budget left per owner and currency: the room (amount - drawn) of the owner's live
  leases, those not expired and not reported to the cloud, as ``FogStore.lease_room`` counts
  it; an owner whose leases are all spent, expired or reported shows 0, not nothing;
- the unacked backlog: how many sealed batches the cloud has not acked and when the oldest of
  them was sealed. Acks move a prefix (``UPDATE ... WHERE number <= b``), so the first unacked
  batch is found by bisection over the batch numbers (consecutive from 1): a few primary-key
  lookups, however long the history;
- the records authorized but not sealed into a batch yet, and all the records the cloud
  has not acked (sealed or not: the uplink's backlog, alarm ``uplink_backlog``);
- the devices suspended here as clones and the devices with a peer's sequence mark
  (``fog/peers.py``, docs/protocol.md 17.4).

"Uplink up" is judged from the same: uplink enabled, the broker connected, and no unacked
batch older than ``uplink.ack_timeout_ms`` (the age at which the fog itself decides that no
ack is coming and sends again). A fog whose cloud is away shows 0 within that time.

``/readyz`` is 200 when the store is open and the MQTT client is connected and subscribed,
503 with the reasons otherwise; ``/healthz`` is 200 while the event loop answers.
"""

import asyncio
import sqlite3
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import structlog
from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from fog.config import FogConfig
from fog.latency import BUCKETS, Histogram, bucket_of, upper_edge_ms
from runtime.http import HttpServer, Response, healthz, readyz_response
from runtime.listen import ListenError

log = structlog.get_logger()

PREFIX: Final = "fogpay_fog_"
STORE_READ_TIMEOUT_S: Final = 5.0
SQLITE_BUSY_TIMEOUT_S: Final = 2.0
OWNERS_LISTED_MAX: Final = 10_000  # budget series per scrape (owner x currency)
# le edges of the exported histogram: the 10% buckets' upper edges nearest below these
# (seconds), so every exported count is exact; fog_stats keeps the fine buckets
EXPORT_LE_S: Final = tuple(
    m * 10.0**e for e in range(-4, 2) for m in (1.0, 1.5, 2.0, 3.0, 5.0, 7.0) if m * 10.0**e <= 60
)
# counters that mean something failed and someone should look (the rest are events)
ALARM_SUFFIXES: Final = (
    "_failed",
    "_lost",
    "cloned_key",
    "uplink_backlog",
    "replica_fork",
    "replica_full",
)
# core counters that are levels, not counts (exported as gauges, not as events)
GAUGE_COUNTERS: Final = ("records_at_risk",)


class RunningHistogram(Histogram):
    """``Histogram`` whose ``take`` (the ``fog_stats`` interval) also folds the interval into
    totals since start, which ``totals()`` returns with the current interval added; ``add``
    also sums the seconds (Prometheus' ``_sum``)."""

    __slots__ = ("_sum_s", "_total_counts", "_total_n")

    def __init__(self) -> None:
        super().__init__()
        self._total_counts = [0] * BUCKETS
        self._total_n = 0
        self._sum_s = 0.0

    def add(self, seconds: float) -> None:
        # Histogram.add's body again plus the sum: it runs once per intent, and a call to
        # super() would cost more than the sum itself
        ms = max(0.0, seconds * 1000.0)
        self._counts[bucket_of(ms)] += 1
        self._n += 1
        self._sum_s += ms / 1000.0
        if ms > self._max_ms:
            self._max_ms = ms

    def take(self, name: str) -> dict[str, int | float]:
        for b, c in enumerate(self._counts):
            self._total_counts[b] += c
        self._total_n += self._n
        return super().take(name)

    def totals(self) -> tuple[list[int], int, float]:
        """(counts per 10% bucket, samples, sum of seconds) since start."""
        counts = [t + c for t, c in zip(self._total_counts, self._counts, strict=True)]
        return counts, self._total_n + self._n, self._sum_s


def export_buckets(counts: list[int], total: int) -> list[tuple[str, float]]:
    """Cumulative (le, count) pairs at ``EXPORT_LE_S`` (snapped down to a 10% bucket edge,
    the last bucket, "over a minute", only in +Inf), then +Inf."""
    edges: list[int] = []
    for le_s in EXPORT_LE_S:
        b = min(bucket_of(le_s * 1000.0), BUCKETS - 2)
        if upper_edge_ms(b) > le_s * 1000.0:
            b -= 1
        if b >= 0 and (not edges or b > edges[-1]):
            edges.append(b)
    out: list[tuple[str, float]] = []
    seen, b0 = 0, 0
    for b in edges:
        seen += sum(counts[b0 : b + 1])
        b0 = b + 1
        out.append((f"{upper_edge_ms(b) / 1000.0:.6g}", float(seen)))
    out.append(("+Inf", float(total)))
    return out


@dataclass(frozen=True, slots=True)
class StoreView:
    """What a scrape read from the database."""

    budget: dict[tuple[str, str], tuple[int, int]]  # (owner, currency) -> (micros left, leases)
    batches_sealed: int  # the last batch number (0: none)
    unacked: int
    oldest_unacked_sealed_ms: int | None
    unsealed_records: int
    unacked_records: int = 0  # sealed in unacked batches, or not sealed yet
    suspended_devices: int = 0
    peer_marked_devices: int = 0


def read_store(db: Path, *, now_ms: int) -> StoreView:
    """Read the fog's database (read-only, WAL: never blocks the store's writes)."""
    conn = sqlite3.connect(
        f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=SQLITE_BUSY_TIMEOUT_S
    )
    try:
        conn.execute("BEGIN")  # one snapshot for every query below
        budget = _budget(conn, now_ms)
        # two queries: SQLite answers a lone min() or max() from the index, both in one by a scan
        first = conn.execute("SELECT min(number) FROM batches").fetchone()[0]
        last = conn.execute("SELECT max(number) FROM batches").fetchone()[0]
        unacked, oldest = 0, None
        unsealed = _unsealed(conn, last)
        unacked_records = unsealed
        if last is not None:
            head = _first_unacked(conn, int(first), int(last))
            if head is not None:
                unacked = int(last) - head + 1
                row = conn.execute(
                    "SELECT sealed_ms, first_index FROM batches WHERE number = ?", (head,)
                ).fetchone()
                oldest = int(row[0])
                newest = conn.execute("SELECT max(n) FROM log").fetchone()[0]
                unacked_records = max(0, int(newest or 0) - int(row[1]) + 1)
        suspended, marked = _peer_counts(conn)
        return StoreView(
            budget=budget,
            batches_sealed=0 if last is None else int(last),
            unacked=unacked,
            oldest_unacked_sealed_ms=oldest,
            unsealed_records=unsealed,
            unacked_records=unacked_records,
            suspended_devices=suspended,
            peer_marked_devices=marked,
        )
    finally:
        conn.close()


def _budget(conn: sqlite3.Connection, now_ms: int) -> dict[tuple[str, str], tuple[int, int]]:
    reported = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'lease_reports'"
    ).fetchone()
    live = "not_after_ms >= ?"
    if reported is not None:
        live += " AND lease_id NOT IN (SELECT lease_id FROM lease_reports)"
    rows = conn.execute(
        f"SELECT owner_id, currency, SUM(CASE WHEN {live} THEN amount_micros - drawn_micros "
        f"ELSE 0 END), SUM(CASE WHEN {live} THEN 1 ELSE 0 END) FROM leases "
        "GROUP BY owner_id, currency ORDER BY owner_id, currency LIMIT ?",
        (now_ms, now_ms, OWNERS_LISTED_MAX),
    ).fetchall()
    return {(str(o), str(c)): (int(left), int(n)) for o, c, left, n in rows}


def _peer_counts(conn: sqlite3.Connection) -> tuple[int, int]:
    """(devices suspended as clones, devices with a peer's mark); 0, 0 before the tables."""
    known = conn.execute(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name IN "
        "('suspended', 'peer_seq')"
    ).fetchone()[0]
    if known < 2:
        return 0, 0
    suspended = conn.execute("SELECT count(*) FROM suspended").fetchone()[0]
    marked = conn.execute("SELECT count(*) FROM peer_seq").fetchone()[0]
    return int(suspended), int(marked)


def _first_unacked(conn: sqlite3.Connection, first: int, last: int) -> int | None:
    def acked(number: int) -> bool:
        row = conn.execute("SELECT acked FROM batches WHERE number = ?", (number,)).fetchone()
        return row is not None and bool(row[0])

    if acked(last):
        return None
    lo, hi = first, last  # acked(n) for every n < answer; not acked(hi)
    while lo < hi:
        mid = (lo + hi) // 2
        if acked(mid):
            lo = mid + 1
        else:
            hi = mid
    return lo


def _unsealed(conn: sqlite3.Connection, last_batch: int | None) -> int:
    newest = conn.execute("SELECT max(n) FROM log").fetchone()[0]
    if newest is None:
        return 0
    sealed_end = 1
    if last_batch is not None:
        row = conn.execute(
            "SELECT first_index + count FROM batches WHERE number = ?", (last_batch,)
        ).fetchone()
        sealed_end = int(row[0])
    return max(0, int(newest) - sealed_end + 1)


@dataclass(frozen=True, slots=True, kw_only=True)
class FogState:
    """How the observer reads the daemon (all called on the event loop, cheap)."""

    counters: Callable[[], Mapping[str, int]]
    answer_time: RunningHistogram
    broker_up: Callable[[], bool]  # connected and subscribed
    store_open: Callable[[], bool]
    stopping: Callable[[], bool]
    queued: Callable[[], int]  # intents waiting for the processor
    clock: Callable[[], int]  # the daemon's wall clock, ms


class FogObserver:
    """The daemon's ``[metrics]`` endpoint. ``start()`` binds (when enabled), ``stop()``
    closes; ``url`` is ``http://host:port`` once started (None when disabled)."""

    def __init__(self, config: FogConfig, state: FogState) -> None:
        self._config = config
        self._state = state
        self._view: StoreView | None = None  # what the scrape in progress read
        self.registry = CollectorRegistry(auto_describe=False)  # one per daemon
        self.registry.register(_Collector(self))
        self._server: HttpServer | None = None
        self._log = log.bind(fog_id=config.fog_id)

    @property
    def url(self) -> str | None:
        return None if self._server is None else self._server.url

    async def start(self) -> None:
        m = self._config.metrics
        if not m.enabled:
            return
        routes = {"/metrics": self._metrics, "/healthz": healthz, "/readyz": self._readyz}
        server = HttpServer(routes, host=m.host, port=m.port)
        try:
            await server.start()
        except ListenError as exc:
            raise ListenError(f"metrics.listen: {exc}") from exc
        self._server = server
        self._log.info("metrics_listening", url=server.url)

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            await server.close()

    def ready(self) -> list[str]:
        """Why the fog is not ready ([] when it is)."""
        s, why = self._state, []
        if s.stopping():
            why.append("stopping")
        if not s.store_open():
            why.append("store not open")
        if not s.broker_up():
            why.append("broker not connected")
        return why

    async def scrape(self) -> bytes:
        """The exposition text (reads the database first; without it, the store's metrics
        are left out and ``fogpay_fog_store_read_ok`` is 0)."""
        self._view = await self._read_store()
        try:
            return generate_latest(self.registry)
        finally:
            self._view = None

    async def _read_store(self) -> StoreView | None:
        now_ms = self._state.clock()
        try:
            async with asyncio.timeout(STORE_READ_TIMEOUT_S):
                return await asyncio.to_thread(read_store, self._config.db, now_ms=now_ms)
        except (sqlite3.Error, OSError, TimeoutError) as exc:
            self._log.warning("metrics_store_unread", error=f"{type(exc).__name__}: {exc}")
            return None

    async def _metrics(self) -> Response:
        return Response(200, await self.scrape(), CONTENT_TYPE_LATEST)

    async def _readyz(self) -> Response:
        return readyz_response(self.ready())

    def families(self) -> Iterator[Metric]:
        s, c = self._state, self._config
        counters = s.counters()
        yield _info(c.fog_id)
        yield from _intents(counters)
        yield _counter(
            "intents_received", "intents read from the broker", counters, "intent_received"
        )
        yield _counter(
            "intents_dropped",
            "intents dropped (queue full, wrong fog, stopping)",
            counters,
            "intent_dropped",
        )
        yield _answer_histogram(s.answer_time)
        events = CounterMetricFamily(
            PREFIX + "events", "every daemon counter by name (docs/fog.md)", labels=["event"]
        )
        alarms = CounterMetricFamily(
            PREFIX + "alarms", "failures someone should look at, by kind", labels=["kind"]
        )
        for name in sorted(counters):
            if name in GAUGE_COUNTERS:
                continue
            events.add_metric([name], counters[name])
            if name.endswith(ALARM_SUFFIXES):
                alarms.add_metric([name], counters[name])
        yield events
        yield alarms
        broker_up = s.broker_up()
        yield _gauge("broker_up", "1: connected to the broker and subscribed", int(broker_up))
        yield _gauge("ready", "1: /readyz answers 200", int(not self.ready()))
        yield _gauge("intent_queue", "intents waiting for the processor", s.queued())
        if c.federation.peers:
            yield _gauge(
                "records_at_risk",
                "records in no safe batch (not acked by the cloud, held by fewer than k peers): "
                "what this fog can lose with its disk; as of the last stats interval",
                counters.get("records_at_risk", 0),
            )
        yield from self._store_families(broker_up)

    def _store_families(self, broker_up: bool) -> Iterator[Metric]:
        view, c = self._view, self._config
        yield _gauge("store_read_ok", "1: this scrape read the database", int(view is not None))
        if view is None:
            return
        budget = GaugeMetricFamily(
            PREFIX + "budget_left_micros",
            "room on the owner's live leases (amount - drawn), micros",
            labels=["owner", "currency"],
        )
        leases = GaugeMetricFamily(
            PREFIX + "leases_live", "live leases per owner", labels=["owner", "currency"]
        )
        for (owner, currency), (left, n) in sorted(view.budget.items()):
            budget.add_metric([owner, currency], left)
            leases.add_metric([owner, currency], n)
        yield budget
        yield leases
        yield _gauge("batches_sealed", "the last batch number sealed", view.batches_sealed)
        yield _gauge("unacked_batches", "sealed batches the cloud has not acked", view.unacked)
        age_s = 0.0
        if view.oldest_unacked_sealed_ms is not None:
            age_s = max(0, self._state.clock() - view.oldest_unacked_sealed_ms) / 1000.0
        yield _gauge(
            "unacked_oldest_age_seconds", "age of the oldest unacked batch (0: none)", age_s
        )
        yield _gauge(
            "unsealed_records", "authorized records not in a batch yet", view.unsealed_records
        )
        yield _gauge(
            "unacked_records",
            "records the cloud has not acked (sealed or not): the uplink's backlog",
            view.unacked_records,
        )
        limit = c.uplink.backlog_alarm_records
        yield _gauge(
            "uplink_backlog",
            "1: unacked records over uplink.backlog_alarm_records (0 when off)",
            int(c.uplink.enabled and limit > 0 and view.unacked_records > limit),
        )
        yield _gauge(
            "suspended_devices",
            "devices suspended here as cloned keys (docs/protocol.md 17.4)",
            view.suspended_devices,
        )
        yield _gauge(
            "peer_marked_devices",
            "devices with a sequence mark reported by a peer fog",
            view.peer_marked_devices,
        )
        if c.uplink.enabled:
            up = broker_up and age_s * 1000.0 < c.uplink.ack_timeout_ms
            yield _gauge(
                "uplink_up", "1: connected and every batch acked within ack_timeout_ms", int(up)
            )


class _Collector:
    def __init__(self, observer: FogObserver) -> None:
        self._observer = observer

    def collect(self) -> Iterator[Metric]:
        return self._observer.families()


def _info(fog_id: str) -> Metric:
    info = GaugeMetricFamily(PREFIX + "info", "this fog (always 1)", labels=["fog_id"])
    info.add_metric([fog_id], 1)
    return info


def _intents(counters: Mapping[str, int]) -> Iterator[Metric]:
    family = CounterMetricFamily(
        PREFIX + "intents",
        "intents answered: ok, replayed (a retransmission answered again) or declined by reason",
        labels=["status", "reason"],
    )
    family.add_metric(["ok", ""], counters.get("intent_authorized", 0))
    family.add_metric(["replayed", ""], counters.get("intent_replayed", 0))
    for name in sorted(counters):
        if name.startswith("declined_"):
            family.add_metric(["declined", name.removeprefix("declined_")], counters[name])
    yield family


def _answer_histogram(h: RunningHistogram) -> Metric:
    counts, n, sum_s = h.totals()
    family = HistogramMetricFamily(
        PREFIX + "answer_seconds",
        "intent read from the broker to receipt handed back, seconds (le: 10% bucket edges)",
        labels=[],
    )
    family.add_metric([], export_buckets(counts, n), sum_s)
    return family


def _counter(name: str, doc: str, counters: Mapping[str, int], key: str) -> Metric:
    return CounterMetricFamily(PREFIX + name, doc, value=counters.get(key, 0))


def _gauge(name: str, doc: str, value: float) -> Metric:
    return GaugeMetricFamily(PREFIX + name, doc, value=value)
