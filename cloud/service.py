"""The cloud's MQTT shell: a thin asyncio loop around ``CloudCore``.

One aiomqtt client (reconnecting with capped, jittered backoff) subscribes, QoS 1, to

| filter | handler |
| --- | --- |
| ``fogpay/1/up/+/batch`` | ``core.ingest_batch`` (verified in a process pool: ``open_service``) |
| ``fogpay/1/up/+/lreq`` | ``core.lease_request`` |
| ``fogpay/1/up/+/lrep`` | ``core.lease_report`` |
| ``fogpay/1/up/+/xfer`` | ``core.transfer`` (peer transfers, docs/protocol.md 18.2) |
| ``fogpay/1/up/+/relay`` | ``core.ingest_batch(relayed_by=carrier)`` (17.8) |
| ``fogpay/1/held/+/records`` | ``core.held_upload``, answered by a ``hack`` (17.7) |

and publishes, retained, every ``(topic, payload)`` a handler returns (an empty payload
clears a retained topic), except the ``hack``, which is not retained. The reader only sorts
messages into three bounded queues (payload sizes are checked there, before anything is
decoded); ONE worker takes lease messages first, then held uploads, then batches, and runs
each handler and its publications under one lock, so what the broker retains always follows
the store's order. A full queue drops (counted): fogs and devices resend.

Retained state. At start and after every reconnect the service publishes everything
``core.retained()`` returns (credentials, bindings, revocations, leases, acks). Every
``REFRESH_S`` it runs a cheap fingerprint query of the ``retained`` table (row count and total
bytes; needs the store) and, when it moved, publishes the difference against what it last
published (new or changed topics; cleared ones as empty payloads); every ``FULL_REFRESH_S``
it diffs regardless. So a binding or owner added with ``fogpay cloud ...`` in another process
reaches the fogs within about a second. ``publish_retained()`` forces it.

Partitions (``cloud/partition.py``). With ``claims`` (``[service] partitions``/``partition``,
PostgreSQL only) the service books only the fogs of the partitions it holds: the reader
skips other fogs' batches before queueing them (``batch_skipped``), the worker checks again
before booking (a partition may have changed hands meanwhile), and a relayed batch of another
partition's fog is dropped after verification (the relay topic names the carrier). Only the
holder of partition 0 (the control) takes lease messages, transfers and held uploads
(``message_skipped`` elsewhere) and publishes the retained state other than acks; each
process publishes the acks of its own partitions' fogs. A task checks the locks every
``partition_check_s``: a partition gained brings a full retained refresh (its fogs' acks);
one handed back, or lost with the lock connection, is dropped between two messages, under
the lock.

Stop. ``stop()`` (SIGTERM) stops reading; the message in flight is handled and its
publications sent, then the client closes. Bad input never raises: the core counts and logs
it; the shell counts what it drops (``message_dropped``, ``batch_dropped``...).
"""

import asyncio
import contextlib
import hashlib
import multiprocessing
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Executor, ProcessPoolExecutor
from typing import Any, Final
from urllib.parse import unquote, urlsplit

import aiomqtt
import nacl.signing
import structlog

from cloud.backends import open_store, store_kind
from cloud.config import CloudConfig, ConfigError, MetricsConfig
from cloud.core import CloudCore, Publish
from cloud.ingest import IngestOutcome, Status, Verifier, verify_inline
from cloud.metrics import CloudObserver, CloudState  # observability hook
from cloud.partition import CONTROL, Claims, partition_of
from cloud.store import Store, Tx
from cloud.verify import CheckedBatch, check_batch
from protocol import limits, topics
from protocol.errors import FogpayError
from protocol.held import HELD_BYTES_MAX
from protocol.topics import Kind
from runtime.keyfile import load_key_file
from runtime.logs import bind_component, unbind_component
from runtime.mqttloop import read_until_stopped, sleep_or_stop
from runtime.mqttshell import (
    MQTTS_PORT_DEFAULT,
    BrokerTlsError,
    ClientSettings,
    Publisher,
    serve,
)
from runtime.tlsconf import TlsSettings

log = structlog.get_logger()

BATCH_QUEUE_MAX: Final = 64  # batches (<= 1 MiB each) waiting: 64 MiB at most
LEASE_QUEUE_MAX: Final = 1_000
HELD_QUEUE_MAX: Final = 256  # held payloads (<= 20 KiB each) waiting: 5 MiB at most
PUBLISH_TIMEOUT_S: Final = 10.0
CONNECT_TIMEOUT_S: Final = 10.0
SUBSCRIBE_TIMEOUT_S: Final = 10.0
PUBLISH_CONCURRENT_MAX: Final = 64
RECONNECT_ATTEMPTS_MAX: Final = 10_000  # consecutive; then exit and let systemd restart us
REFRESH_S: Final = 1.0
FULL_REFRESH_S: Final = 60.0
STATS_S_DEFAULT: Final = 60.0
STOP_DRAIN_TIMEOUT_S: Final = 30.0
INFLIGHT_MESSAGES_MAX: Final = 100
INCOMING_MESSAGES_MAX: Final = 2_000
KEEPALIVE_S: Final = 30
BROKER_PORT_DEFAULT: Final = 1883
FILTERS: Final = (
    topics.BATCH_FILTER,
    topics.LEASE_REQUEST_FILTER,
    topics.LEASE_REPORT_FILTER,
    topics.RELAY_FILTER,
    topics.HELD_FILTER,
    topics.TRANSFER_FILTER,
)
# what the service handles, with each payload's size limit (checked before decoding)
_HANDLED: Final = {
    Kind.BATCH: limits.BATCH_WIRE_BYTES_MAX,
    Kind.RELAY: limits.BATCH_WIRE_BYTES_MAX,
    Kind.HELD_RECORDS: HELD_BYTES_MAX,
    Kind.LEASE_REQUEST: limits.IDENTITY_ENVELOPE_BYTES_MAX,
    Kind.LEASE_REPORT: limits.IDENTITY_ENVELOPE_BYTES_MAX,
    Kind.TRANSFER: limits.IDENTITY_ENVELOPE_BYTES_MAX,
}
Clock = Callable[[], int]


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


def _digest(payload: bytes) -> bytes:
    return hashlib.sha256(payload).digest()


async def _fingerprint(tx: Tx) -> tuple[int, int]:
    row = await tx.fetchone(
        "SELECT COUNT(*), CAST(COALESCE(SUM(LENGTH(payload)), 0) AS BIGINT) FROM retained"
    )
    assert row is not None
    return int(row[0]), int(row[1])


class CloudService:
    """The cloud on MQTT. ``run()`` until ``stop()`` or cancellation; ``ready`` is set once
    subscribed and the retained state is published."""

    def __init__(
        self,
        *,
        core: CloudCore,
        broker_host: str,
        broker_port: int,
        username: str | None = None,
        password: str | None = None,
        clock: Clock = wall_ms,
        store: Store | None = None,
        stats_s: float = STATS_S_DEFAULT,
        prefetch: "PrefetchVerifier | None" = None,
        metrics: MetricsConfig | None = None,
        tls: TlsSettings | None = None,
        claims: Claims | None = None,
        partition_check_s: float = 1.0,
    ) -> None:
        """``claims``: the partition locks (None: this process books every fog and is the
        control). ``store`` (the core's) enables the cheap change check; without it the service
        diffs ``core.retained()`` every ``FULL_REFRESH_S`` only. ``prefetch``: the core's
        verifier, told of each batch as it is queued. ``metrics``: the HTTP endpoint
        (cloud/metrics.py; None or disabled: none)."""
        self.core = core
        self._client_args: dict[str, Any] = {
            "hostname": broker_host,
            "port": broker_port,
            "username": username,
            "password": password,
            "tls": tls,
        }
        self._clock, self._store, self._stats_s = clock, store, stats_s
        self._prefetch = prefetch
        # (fog_id of the topic, wire, relayed: the topic's fog is the carrier)
        self._batches: asyncio.Queue[tuple[str, bytes, bool]] = asyncio.Queue(BATCH_QUEUE_MAX)
        self._held: asyncio.Queue[tuple[bytes, bytes]] = asyncio.Queue(HELD_QUEUE_MAX)
        self._leases: asyncio.Queue[tuple[Kind, bytes]] = asyncio.Queue(LEASE_QUEUE_MAX)
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._lock = asyncio.Lock()  # a handler and its publications; retained refreshes
        self._client: aiomqtt.Client | None = None
        self._published: dict[str, bytes] = {}  # topic -> sha256 of the retained payload
        self._fingerprint: tuple[int, int] | None = None
        self._last_full = 0.0
        self._counters: dict[str, int] = {}
        self._started = False
        self._claims, self._check_s = claims, partition_check_s
        self._mine: frozenset[int] = frozenset()  # the partitions held (with claims)
        self._partitions = 1 if claims is None else claims.partitions
        if claims is not None:
            core.owns = self.owns_fog  # a relayed batch: the header's fog decides
        # ---- observability hook (cloud/metrics.py): what /metrics and /readyz read
        self.observer = CloudObserver(
            metrics or MetricsConfig(),
            CloudState(
                counters=lambda: self.counters,
                broker_up=lambda: self._client is not None,
                stopping=self._stopping.is_set,
                queued=lambda: {
                    "batches": self._batches.qsize(),
                    "leases": self._leases.qsize(),
                    "held": self._held.qsize(),
                },
                store=store,
            ),
        )

    # ---- public API -------------------------------------------------------------------

    @property
    def counters(self) -> dict[str, int]:
        """The shell's counters merged over the core's (``batch_booked``, ``lease_granted``,
        ``batch_refused_<reason>``...): batches_booked, batches_duplicate, batches_held,
        batches_fork, batches_refused, batches_deferred, leases_granted, leases_refused,
        leases_closed, batch_dropped, lease_dropped, message_dropped, published,
        publish_failed, broker_connected, broker_disconnected."""
        return {**dict(self.core.metrics.counters), **self._counters}

    def owns_fog(self, fog_id: str) -> bool:
        """Whether this process books ``fog_id``'s batches now."""
        if self._claims is None:
            return True
        return partition_of(fog_id, self._partitions) in self._mine

    @property
    def is_control(self) -> bool:
        """Whether this process takes lease messages, transfers and held uploads now."""
        return self._claims is None or CONTROL in self._mine

    @property
    def partitions_held(self) -> frozenset[int]:
        return frozenset({0}) if self._claims is None else self._mine

    async def stop(self) -> None:
        self._stopping.set()
        self._wake.set()

    async def publish_retained(self) -> None:
        """Publish what ``core.retained()`` returns that differs from what was last
        published (and clear what is gone); call after registry changes."""
        await self._refresh(full=True)

    async def run(self, *, ready: asyncio.Event | None = None) -> None:
        assert not self._started, "a CloudService runs once"
        self._started = True
        component = bind_component("cloud")  # observability hook: every line of the cloud
        log.info("cloud_starting", broker=f"{self._client_args['hostname']}:{self._port}")
        try:
            await self.observer.start()  # observability hook: /metrics, /healthz, /readyz
            try:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(self._mqtt_loop(ready), name="cloud.mqtt")
                    tg.create_task(self._worker(), name="cloud.worker")
                    tg.create_task(self._refresher(), name="cloud.refresh")
                    tg.create_task(self._stats(), name="cloud.stats")
                    if self._claims is not None:
                        tg.create_task(self._partition_loop(), name="cloud.partitions")
            except* BrokerTlsError as refused:  # a wrong CA or name: one line, not a group
                raise refused.exceptions[0] from None
            finally:
                await self.observer.stop()  # observability hook
            log.info("cloud_stopped", **self.counters)
        finally:
            unbind_component(component)  # observability hook

    @property
    def _port(self) -> int:
        port: int = self._client_args["port"]
        return port

    def _count(self, name: str, n: int = 1) -> None:
        self._counters[name] = self._counters.get(name, 0) + n

    # ---- MQTT ---------------------------------------------------------------------------

    async def _mqtt_loop(self, ready: asyncio.Event | None) -> None:
        """The MQTT shell (runtime/mqttshell.py): clean sessions, fogs resend what was not
        acked; subscribed before ``_session`` runs."""
        settings = ClientSettings(
            **self._client_args,
            identifier_prefix="fogpay-cloud",
            keepalive_s=KEEPALIVE_S,
            connect_timeout_s=CONNECT_TIMEOUT_S,
            subscribe_timeout_s=SUBSCRIBE_TIMEOUT_S,
            inflight_max=INFLIGHT_MESSAGES_MAX,
            incoming_max=INCOMING_MESSAGES_MAX,
            pending_calls_threshold=PUBLISH_CONCURRENT_MAX * 2,
            failures_max=RECONNECT_ATTEMPTS_MAX,
        )

        async def lost(exc: aiomqtt.MqttError, delay: float) -> None:
            self._client = None
            self._count("broker_disconnected")
            log.warning("broker_disconnected", error=str(exc), retry_s=round(delay, 3))

        await serve(
            settings,
            FILTERS,
            stopping=self._stopping,
            session=lambda client: self._session(client, ready),
            lost=lost,
        )

    async def _session(self, client: aiomqtt.Client, ready: asyncio.Event | None) -> None:
        self._count("broker_connected")
        log.info("broker_connected", port=self._port, filters=len(FILTERS))
        async with self._lock:
            self._client = client
            self._published.clear()  # the broker may have lost everything: publish it all
            await self._refresh_locked(full=True)
        if ready is not None:
            ready.set()
        await read_until_stopped(self._read(client), self._stopping, name="cloud.mqtt")
        async with asyncio.timeout(STOP_DRAIN_TIMEOUT_S):
            async with self._lock:  # the message in flight is handled and published
                self._client = None

    async def _read(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            payload = message.payload
            if not isinstance(payload, bytes | bytearray):
                payload = b""
            try:
                self._dispatch(str(message.topic), bytes(payload))
            except Exception as exc:  # the seam: no topic or payload may stop the reader
                self._count("message_dropped")
                log.error("message_dropped", cause=type(exc).__name__)

    def _dispatch(self, topic: str, payload: bytes) -> None:
        try:
            parsed = topics.parse(topic)
        except FogpayError:
            parsed = None
        if parsed is None:
            self._count("message_dropped")
            log.warning("message_dropped", cause="bad_topic", topic=topic[:120])
            return
        if parsed.kind not in _HANDLED:
            self._count("message_ignored")  # amqtt sends every retained message on CONNECT
            return
        bytes_max = _HANDLED[parsed.kind]
        if parsed.kind is Kind.HELD_RECORDS:
            assert parsed.key is not None
            if not payload or len(payload) > bytes_max:
                self._count("held_dropped")
                log.warning("held_dropped", cause="size", size=len(payload))
                return
            if not self.is_control:
                self._count("message_skipped")  # the control's (partition 0)
                return
            self._put(self._held, (parsed.key, payload), "held_dropped")
            return
        assert parsed.fog_id is not None
        lease_kinds = (Kind.LEASE_REQUEST, Kind.LEASE_REPORT, Kind.TRANSFER)
        kind = "lease" if parsed.kind in lease_kinds else "batch"
        if not payload or len(payload) > bytes_max:
            self._count(f"{kind}_dropped")
            log.warning(f"{kind}_dropped", cause="size", fog_id=parsed.fog_id, size=len(payload))
            return
        if kind == "batch":
            relayed = parsed.kind is Kind.RELAY
            if not relayed and not self.owns_fog(parsed.fog_id):
                self._count("batch_skipped")  # another partition's fog
                return
            if self._put(self._batches, (parsed.fog_id, payload, relayed), "batch_dropped"):
                if self._prefetch is not None:
                    self._prefetch.prefetch(payload)
        elif not self.is_control:
            self._count("message_skipped")  # the control's (partition 0)
        else:
            self._put(self._leases, (parsed.kind, payload), "lease_dropped")

    def _put(self, queue: "asyncio.Queue[Any]", item: Any, counter: str) -> bool:
        try:
            queue.put_nowait(item)
        except asyncio.QueueFull:
            self._count(counter)
            log.warning(counter, cause="queue_full")
            return False
        self._wake.set()
        return True

    # ---- the worker: one message at a time ---------------------------------------------

    async def _worker(self) -> None:
        while True:
            if self._leases.empty() and self._held.empty() and self._batches.empty():
                if self._stopping.is_set():
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            if not self._leases.empty():
                kind, payload = self._leases.get_nowait()
                if self.is_control:
                    await self._guarded(self._handle_lease(kind, payload), str(kind))
                else:
                    self._count("message_skipped")  # control handed over since queued
            elif not self._held.empty():
                device, payload = self._held.get_nowait()
                if self.is_control:
                    await self._guarded(self._handle_held(device, payload), "held")
                else:
                    self._count("message_skipped")
            elif not self._stopping.is_set():
                fog_id, wire, relayed = self._batches.get_nowait()
                if relayed or self.owns_fog(fog_id):
                    await self._guarded(self._handle_batch(fog_id, wire, relayed), "batch")
                else:  # its partition changed hands since it was queued
                    self._count("batch_skipped")
                    if self._prefetch is not None:
                        self._prefetch.discard(wire)
            else:
                while not self._batches.empty():  # stopping: left to the fogs' resend
                    _, wire, _ = self._batches.get_nowait()
                    if self._prefetch is not None:
                        self._prefetch.discard(wire)
                return

    async def _guarded(self, handler: Awaitable[None], kind: str) -> None:
        """The seam: the core turns bad input into counters, so what reaches here is a bug
        or a store failure; the message is dropped (the fog resends it), the service lives."""
        try:
            await handler
        except Exception as exc:
            self._count("handler_failed")
            log.error("handler_failed", kind=kind, error=type(exc).__name__)

    async def _handle_lease(self, kind: Kind, payload: bytes) -> None:
        async with self._lock:
            if kind is Kind.LEASE_REQUEST:
                self._count("lreq_received")
                before = self.core.metrics.get("lease_granted")
                out, recalls = await self.core.lease_request_both(payload)
                if recalls:  # rebalancing (docs/protocol.md 18.5): not retained
                    self._count("lease_recalls", len(recalls))
                    await self._publish_locked(recalls, retain=False)
                if self.core.metrics.get("lease_granted") > before:
                    self._count("leases_granted")
                elif not out:
                    self._count("leases_refused")
            elif kind is Kind.TRANSFER:  # a peer transfer (docs/protocol.md 18.2)
                self._count("xfer_received")
                out = await self.core.transfer(payload)
                self._count("leases_closed", sum(1 for _, p in out if not p))
            else:
                self._count("lrep_received")
                out = await self.core.lease_report(payload)
                self._count("leases_closed", len(out))
            await self._publish_locked(out)

    async def _handle_batch(self, fog_id: str, wire: bytes, relayed: bool = False) -> None:
        async with self._lock:
            # the core checks the topic against the header it verified (decoded once); a
            # relayed batch is the header's fog's, whoever carried it
            if relayed:
                outcome = await self.core.ingest_batch(
                    wire, topic=topics.relay_topic(fog_id), relayed_by=fog_id
                )
            else:
                outcome = await self.core.ingest_batch(wire, topic=topics.batch_topic(fog_id))
            if outcome.status is Status.DROPPED:
                # no reason: a relayed batch of another partition's fog (cloud/partition.py)
                self._count("batch_dropped" if outcome.reason is not None else "batch_skipped")
                return  # logged by the core (batch_dropped, cause=topic_mismatch)
            self._count(f"batches_{outcome.status}")
            if relayed:
                self._count("batches_relayed")
            self._log_outcome(outcome)
            self._count("leases_closed", sum(1 for _, p in outcome.publish if not p))
            await self._publish_locked(outcome.publish)

    async def _handle_held(self, device: bytes, payload: bytes) -> None:
        async with self._lock:
            judged, published = await self.core.held_upload(payload, device)
            if judged.refused:
                self._count("held_refused")  # logged by the core (held_refused)
                return
            if judged.deferred:
                self._count("held_deferred")  # no hack: the device uploads again
                return
            self._count("held_answered")
            retained = [(p.topic, p.payload) for p in published if p.retain]
            self._count("leases_closed", sum(1 for _, p in retained if not p))
            await self._publish_locked(retained)
            hacks = [(p.topic, p.payload) for p in published if not p.retain]
            await self._publish_locked(hacks, retain=False)

    def _log_outcome(self, out: IngestOutcome) -> None:
        ctx = {"fog_id": out.fog_id, "batch": out.number}
        if out.status is Status.BOOKED:
            log.info("batch_booked", booked=out.booked, duplicates=out.duplicates, **ctx)
        elif out.status is Status.DUPLICATE:
            log.info("batch_duplicate", **ctx)
        elif out.status is Status.HELD:
            log.info("batch_held", **ctx)
        elif out.status is Status.FORK:
            log.error("fork_detected", **ctx)
        # refused and deferred are logged by the core (batch_refused, batch_deferred)

    # ---- publishing -------------------------------------------------------------------

    async def _publish_locked(self, items: Publish, *, retain: bool = True) -> None:
        """Publish ``items`` retained (caller holds the lock); a failure is counted and
        repaired by the full publish after the reconnect. ``retain=False``: an answer (the
        ``hack``), not state: a lost one is answered again when the device resends."""
        client = self._client
        if client is None:
            self._count("publish_failed", len(items))
            return
        publisher = Publisher(
            client, in_flight_max=PUBLISH_CONCURRENT_MAX, timeout_s=PUBLISH_TIMEOUT_S
        )
        results = await publisher.publish_all(items, retain=retain)
        for (topic, payload), result in zip(items, results, strict=True):
            if result is not None:
                self._published.pop(topic, None)
                self._count("publish_failed")
                log.warning("publish_failed", topic=topic[:120], error=type(result).__name__)
                continue
            self._count("published")
            if not retain:
                continue
            if payload:
                self._published[topic] = _digest(payload)
            else:
                self._published.pop(topic, None)

    async def _refresher(self) -> None:
        while not await self._sleep_or_stop(REFRESH_S):
            full = time.monotonic() - self._last_full >= FULL_REFRESH_S
            try:
                await self._refresh(full=full)
            except Exception as exc:  # the seam: a store hiccup must not stop the service
                self._count("refresh_failed")
                log.error("retained_refresh_failed", error=type(exc).__name__)

    async def _refresh(self, *, full: bool) -> None:
        async with self._lock:
            await self._refresh_locked(full=full)

    async def _refresh_locked(self, *, full: bool) -> None:
        if self._client is None:
            return
        fingerprint = None
        if self._store is not None:
            fingerprint = await self._store.transact(_fingerprint)
            if not full and fingerprint == self._fingerprint:
                return
        elif not full:
            return
        current = await self.core.retained()
        now = {topic: payload for topic, payload in current if self._owns_topic(topic)}
        changed = [(t, p) for t, p in now.items() if self._published.get(t) != _digest(p)]
        gone = [(t, b"") for t in self._published if t not in now]
        await self._publish_locked(changed + gone)
        self._fingerprint = fingerprint
        if full:
            self._last_full = time.monotonic()
        if changed or gone:
            self._count("retained_published", len(changed) + len(gone))
            log.info("retained_published", changed=len(changed), cleared=len(gone))

    def _owns_topic(self, topic: str) -> bool:
        """Which retained topics this process publishes: a fog's ack if it holds the fog's
        partition, everything else if it is the control."""
        if self._claims is None:
            return True
        parts = topic.split("/")
        if len(parts) == 5 and parts[2] == "up" and parts[4] == "ack":
            return self.owns_fog(parts[3])
        return self.is_control

    # ---- partitions (cloud/partition.py) -------------------------------------------------

    async def _partition_loop(self) -> None:
        assert self._claims is not None
        claims = self._claims
        try:
            while True:
                changes = await claims.poll()
                if changes.lost:
                    log.error("partition_lost", partitions=sorted(self._mine))
                    self._count("partition_lost")
                for partition in sorted(changes.release):
                    async with self._lock:  # between two messages
                        await claims.release(partition)
                        self._set_mine(claims.held)
                    self._count("partition_released")
                    log.info("partition_released", partition=partition, cause="home_back")
                if changes.lost or changes.gained:
                    async with self._lock:
                        self._set_mine(claims.held)
                        if changes.gained:
                            await self._refresh_gained()
                for partition in sorted(changes.gained):
                    self._count("partition_acquired")
                    log.info(
                        "partition_acquired",
                        partition=partition,
                        partitions=self._partitions,
                        takeover=partition != claims.home,
                    )
                if await self._sleep_or_stop(self._check_s):
                    return
        finally:
            async with self._lock:  # the message in flight is done (stop drains first)
                self._set_mine(set())
                await claims.close()

    async def _refresh_gained(self) -> None:
        """Publish what a gained partition brings (its fogs' acks; the retained state for
        the control); a store hiccup is repaired by the next refresh."""
        try:
            await self._refresh_locked(full=True)
        except Exception as exc:  # the seam: the refresher retries every REFRESH_S
            self._fingerprint = None
            self._count("refresh_failed")
            log.error("retained_refresh_failed", error=type(exc).__name__)

    def _set_mine(self, held: set[int]) -> None:
        """Hold ``held`` now: forget what was published of topics no longer ours (the new
        holder publishes them; ours must never be cleared as "gone")."""
        self._mine = frozenset(held)
        for topic in [t for t in self._published if not self._owns_topic(t)]:
            del self._published[topic]

    # ---- stats ------------------------------------------------------------------------

    async def _stats(self) -> None:
        while not await self._sleep_or_stop(self._stats_s):
            log.info(
                "cloud_stats",
                at_ms=self._clock(),
                batches_queued=self._batches.qsize(),
                leases_queued=self._leases.qsize(),
                held_queued=self._held.qsize(),
                **self.counters,
            )

    async def _sleep_or_stop(self, seconds: float) -> bool:
        return await sleep_or_stop(self._stopping, seconds)


def pool_verifier(pool: Executor) -> Verifier:
    """A ``Verifier`` that runs ``check_batch`` (pure, CPU-bound) in ``pool``."""

    async def verify(wire: bytes) -> CheckedBatch:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(pool, check_batch, wire)

    return verify


class PrefetchVerifier:
    """A ``Verifier`` over a process pool that starts verifying a batch as soon as it is
    queued (``prefetch``), so the pool's workers verify the next batches while the current
    one is booked; batches are still booked one at a time, in arrival order. At most
    ``BATCH_QUEUE_MAX`` verifications are kept (the queue's bound)."""

    def __init__(self, pool: Executor) -> None:
        self._pool = pool
        self._started: dict[int, tuple[bytes, asyncio.Future[CheckedBatch]]] = {}

    def prefetch(self, wire: bytes) -> None:
        if len(self._started) >= BATCH_QUEUE_MAX or id(wire) in self._started:
            return
        future = asyncio.get_running_loop().run_in_executor(self._pool, check_batch, wire)
        self._started[id(wire)] = (wire, future)

    async def __call__(self, wire: bytes) -> CheckedBatch:
        started = self._started.pop(id(wire), None)
        if started is not None and started[0] is wire:
            return await started[1]
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, check_batch, wire)

    def discard(self, wire: bytes) -> None:
        """A queued batch that will not be ingested (the service stops)."""
        started = self._started.pop(id(wire), None)
        if started is not None:
            started[1].cancel()


def broker_address(url: str, tls: TlsSettings | None = None) -> dict[str, Any]:
    """``mqtt[s]://[user:password@]host[:port]`` as CloudService keyword arguments (``tls``
    for mqtts://: ``ServiceConfig.tls()``)."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise ConfigError("service.broker_url: must be mqtt[s]://[user:password@]host[:port]")
    secure = parts.scheme == "mqtts"
    try:
        port = parts.port or (MQTTS_PORT_DEFAULT if secure else BROKER_PORT_DEFAULT)
    except ValueError:
        raise ConfigError("service.broker_url: invalid port") from None
    extra = {"tls": tls or TlsSettings()} if secure else {}
    return {
        **extra,
        "broker_host": parts.hostname,
        "broker_port": port,
        "username": unquote(parts.username) if parts.username is not None else None,
        "password": unquote(parts.password) if parts.password is not None else None,
    }


def build_service(
    config: CloudConfig,
    *,
    store: Store,
    issuer: nacl.signing.SigningKey,
    verifier: Verifier = verify_inline,
    clock: Clock = wall_ms,
    claims: Claims | None = None,
) -> CloudService:
    """A CloudService (and its CloudCore) over an open ``store``, as ``config`` says; a
    ``PrefetchVerifier`` also gets each batch as it is queued."""
    core = CloudCore(
        store=store, issuer=issuer, clock=clock, policy=config.lease, verifier=verifier
    )
    return CloudService(
        core=core,
        **broker_address(config.service.broker_url, config.service.tls()),
        clock=clock,
        store=store,
        stats_s=config.service.stats_interval_s,
        prefetch=verifier if isinstance(verifier, PrefetchVerifier) else None,
        metrics=config.metrics,
        claims=claims,
        partition_check_s=config.service.partition_check_s,
    )


@contextlib.asynccontextmanager
async def open_service(
    config: CloudConfig, *, clock: Clock = wall_ms
) -> AsyncIterator[CloudService]:
    """Open the configured store, the issuer key and the verification pool; yield the
    service; close them all on exit (``async with open_service(cfg) as svc: await
    svc.run()``)."""
    issuer = load_key_file(config.issuer_key)
    address = broker_address(config.service.broker_url)  # fail before opening anything
    assert address
    claims = None
    if config.service.partitioned:
        if store_kind(config.store) != "postgresql":
            raise ConfigError("service.partitions: partitions need a postgresql:// store")
        claims = Claims(
            config.store,
            partitions=config.service.partitions,
            home=config.service.partition if config.service.partition >= 0 else None,
            takeover=config.service.takeover,
        )
    workers = config.service.verify_workers
    # forkserver: a forked worker would inherit this process's sockets (the PostgreSQL
    # sessions: a SIGKILLed service's partition lock and open transaction would live on in
    # its orphaned workers); these workers start clean and hold only their pipes
    context = multiprocessing.get_context("forkserver")
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=context) if workers > 0 else None
    try:
        store = await open_store(config.store)
        try:
            verifier = verify_inline if pool is None else PrefetchVerifier(pool)
            yield build_service(
                config, store=store, issuer=issuer, verifier=verifier, clock=clock, claims=claims
            )
        finally:
            await store.close()
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
