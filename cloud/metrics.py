"""Counters of the cloud service (every refusal and alarm counts) and their Prometheus view.

``Metrics`` is the core's counter bag (``batch_booked``, ``batch_refused_<reason>``,
``alarm_<kind>``, ``lease_granted``...); the MQTT shell keeps its own counters beside it
(``CloudService.counters`` merges both). ``CloudObserver`` serves them over HTTP, with what the
store answers at scrape time, as ``fogpay_cloud_*``: nothing is counted twice and nothing is
added to the ingest path. Names, labels and the endpoints: ``docs/cloud.md`` ("Metrics").

``/readyz`` is 200 when the service is connected to the broker and subscribed, 503 with the
reasons otherwise; ``/healthz`` is 200 while the event loop answers.
"""

from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import structlog
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from cloud.config import MetricsConfig
from cloud.store import Store, Tx
from runtime.http import HttpServer, Response, healthz, readyz_response
from runtime.listen import ListenError

log = structlog.get_logger()

PREFIX: Final = "fogpay_cloud_"
LEASE_GROUPS_MAX: Final = 10_000  # (fog, currency) series per scrape
ALARM_KINDS_MAX: Final = 1_000
BATCH_STATUSES: Final = ("booked", "duplicate", "held", "fork", "deferred")


@dataclass(slots=True)
class Metrics:
    counters: Counter[str] = field(default_factory=Counter)

    def inc(self, name: str, n: int = 1) -> None:
        self.counters[name] += n

    def get(self, name: str) -> int:
        return self.counters[name]


@dataclass(frozen=True, slots=True)
class StoreView:
    leases: dict[tuple[str, str], tuple[int, int]]  # (fog, currency) -> (open leases, micros)
    alarms: dict[str, int]  # kind -> alarms recorded


async def read_store(tx: Tx) -> StoreView:
    rows = await tx.fetchall(
        "SELECT fog_id, currency, COUNT(*), CAST(COALESCE(SUM(amount_micros), 0) AS BIGINT) "
        "FROM leases WHERE state = 'open' GROUP BY fog_id, currency "
        f"ORDER BY fog_id, currency LIMIT {LEASE_GROUPS_MAX}"
    )
    alarms = await tx.fetchall(
        f"SELECT kind, COUNT(*) FROM alarms GROUP BY kind ORDER BY kind LIMIT {ALARM_KINDS_MAX}"
    )
    return StoreView(
        leases={(str(f), str(c)): (int(n), int(m)) for f, c, n, m in rows},
        alarms={str(k): int(n) for k, n in alarms},
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class CloudState:
    """How the observer reads the service (on the event loop, cheap)."""

    counters: Callable[[], Mapping[str, int]]
    broker_up: Callable[[], bool]  # connected and subscribed
    stopping: Callable[[], bool]
    queued: Callable[[], Mapping[str, int]]  # queue name -> length
    store: Store | None


class CloudObserver:
    """The service's ``[metrics]`` endpoint: ``start()`` binds when enabled (port 0: a free
    one), ``stop()`` closes, ``url`` once started (None when disabled)."""

    def __init__(self, config: MetricsConfig, state: CloudState) -> None:
        self._config = config
        self._state = state
        self._view: StoreView | None = None
        self.registry = CollectorRegistry(auto_describe=False)  # one per service
        self.registry.register(_Collector(self))
        self._server: HttpServer | None = None

    @property
    def url(self) -> str | None:
        return None if self._server is None else self._server.url

    async def start(self) -> None:
        if not self._config.enabled:
            return
        routes = {"/metrics": self._metrics, "/healthz": healthz, "/readyz": self._readyz}
        server = HttpServer(routes, host=self._config.host, port=self._config.port)
        try:
            await server.start()
        except ListenError as exc:
            raise ListenError(f"metrics.listen: {exc}") from exc
        self._server = server
        log.info("metrics_listening", url=server.url)

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            await server.close()

    def ready(self) -> list[str]:
        why = []
        if self._state.stopping():
            why.append("stopping")
        if not self._state.broker_up():
            why.append("broker not connected")
        return why

    async def scrape(self) -> bytes:
        self._view = await self._read_store()
        try:
            return generate_latest(self.registry)
        finally:
            self._view = None

    async def _read_store(self) -> StoreView | None:
        store = self._state.store
        if store is None:
            return None
        try:
            return await store.transact(read_store)
        except Exception as exc:  # the seam: a store hiccup leaves the store's metrics out
            log.warning("metrics_store_unread", error=type(exc).__name__)
            return None

    async def _metrics(self) -> Response:
        return Response(200, await self.scrape(), CONTENT_TYPE_LATEST)

    async def _readyz(self) -> Response:
        return readyz_response(self.ready())

    def families(self) -> Iterator[Metric]:
        counters = self._state.counters()
        yield from _ingest(counters)
        yield from _leases(counters)
        events = CounterMetricFamily(
            PREFIX + "events", "every service counter by name (docs/cloud.md)", labels=["event"]
        )
        for name in sorted(counters):
            events.add_metric([name], counters[name])
        yield events
        yield _gauge(
            "broker_up", "1: connected to the broker and subscribed", self._state.broker_up()
        )
        yield _gauge("ready", "1: /readyz answers 200", not self.ready())
        queued = GaugeMetricFamily(PREFIX + "queued", "messages waiting", labels=["queue"])
        for name, n in sorted(self._state.queued().items()):
            queued.add_metric([name], n)
        yield queued
        yield from self._store_families()

    def _store_families(self) -> Iterator[Metric]:
        view = self._view
        if self._state.store is None:
            return
        yield _gauge("store_read_ok", "1: this scrape read the store", view is not None)
        if view is None:
            return
        count = GaugeMetricFamily(
            PREFIX + "leases_outstanding",
            "open leases (granted, not closed) per fog and currency",
            labels=["fog_id", "currency"],
        )
        micros = GaugeMetricFamily(
            PREFIX + "leases_outstanding_micros",
            "amount of the open leases per fog and currency, micros",
            labels=["fog_id", "currency"],
        )
        for (fog_id, currency), (n, m) in sorted(view.leases.items()):
            count.add_metric([fog_id, currency], n)
            micros.add_metric([fog_id, currency], m)
        yield count
        yield micros
        recorded = GaugeMetricFamily(
            PREFIX + "alarms_recorded", "alarms in the store, by kind", labels=["kind"]
        )
        for kind, n in sorted(view.alarms.items()):
            recorded.add_metric([kind], n)
        yield recorded


class _Collector:
    def __init__(self, observer: CloudObserver) -> None:
        self._observer = observer

    def collect(self) -> Iterator[Metric]:
        return self._observer.families()


def _ingest(c: Mapping[str, int]) -> Iterator[Metric]:
    batches = CounterMetricFamily(
        PREFIX + "batches", "batches ingested, by outcome", labels=["status"]
    )
    for status in BATCH_STATUSES:
        batches.add_metric([status], c.get(f"batch_{status}", 0))
    batches.add_metric(["refused"], sum(_with_prefix(c, "batch_refused_").values()))
    yield batches
    refused = CounterMetricFamily(
        PREFIX + "batches_refused", "batches refused, by reason", labels=["reason"]
    )
    for reason, n in _with_prefix(c, "batch_refused_").items():
        refused.add_metric([reason], n)
    yield refused
    yield CounterMetricFamily(
        PREFIX + "records_booked", "records booked", value=c.get("records_booked", 0)
    )
    yield CounterMetricFamily(
        PREFIX + "records_rejected",
        "records of accepted batches not booked (alarms)",
        value=c.get("records_rejected", 0),
    )
    alarms = CounterMetricFamily(PREFIX + "alarms", "alarms raised, by kind", labels=["kind"])
    for kind, n in _with_prefix(c, "alarm_").items():
        alarms.add_metric([kind], n)
    yield alarms


def _leases(c: Mapping[str, int]) -> Iterator[Metric]:
    requests = CounterMetricFamily(
        PREFIX + "lease_requests",
        "lease requests answered, by outcome",
        labels=["outcome", "reason"],
    )
    requests.add_metric(["granted", ""], c.get("lease_granted", 0))
    requests.add_metric(["no_credit", ""], c.get("lreq_no_credit", 0))
    for reason, n in _with_prefix(c, "lreq_refused_").items():
        requests.add_metric(["refused", reason], n)
    yield requests
    reports = CounterMetricFamily(
        PREFIX + "lease_reports", "lease reports, by outcome", labels=["outcome", "reason"]
    )
    reports.add_metric(["accepted", ""], c.get("lrep_accepted", 0))
    for reason, n in _with_prefix(c, "lrep_refused_").items():
        reports.add_metric(["refused", reason], n)
    yield reports


def _with_prefix(c: Mapping[str, int], prefix: str) -> dict[str, int]:
    return {k.removeprefix(prefix): v for k, v in sorted(c.items()) if k.startswith(prefix)}


def _gauge(name: str, doc: str, value: Any) -> Metric:
    return GaugeMetricFamily(PREFIX + name, doc, value=float(value))
