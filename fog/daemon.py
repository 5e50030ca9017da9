"""The fog daemon: a thin asyncio shell around ``FogStore`` (all decisions live there).

Flow. MQTT messages arrive on one aiomqtt client. Intents go into a bounded queue
(``INTENT_QUEUE_MAX``; when full, an intent is dropped and counted: the device retransmits).
The processor takes whatever is queued (up to ``GROUP_MAX``), makes one executor hop that runs
``store.process(group)`` as one durable SQLite transaction, and only then publishes the
receipts (QoS 1): a receipt never leaves before its transaction committed. There is no
artificial waiting: under low load a group is one intent (latency), under load groups grow
by themselves (throughput). Trust material (owner, fog, bind, revoke, lease, ack) goes through
its own bounded queue to ``store.put_trust`` / ``store.apply_ack``.

Threads. Every store call runs in ONE worker thread (``ThreadPoolExecutor(max_workers=1)``):
SQLite never blocks the event loop and never sees two threads on its connection.

Uplink (``[uplink] enabled``, the default). Sealed batches go up to the cloud through the same
client (``fog.uplink``: ``Window`` says which, at most ``uplink.window`` unacked in flight, all
again after a reconnect or ``uplink.ack_timeout_ms`` without an ack moving). Leases
(``fog.leases``): after each group the owners it touched and its ``insufficient_budget``
declines are noted; the lease task asks the cloud for budget (``fog/leasing.py``), reports
expired leases once their draws are sealed, and closes them when the cloud clears their
retained topic. All of it through the one store thread, none of it in the intent path.

Stop. ``stop()`` (SIGTERM) stops taking intents, lets the group in flight commit and publish
its receipts, then closes the client, the store and the embedded broker. Cancelling ``run()``
is abrupt but safe: a transaction in the worker thread still commits or rolls back whole, and
a device that lost its receipt retransmits and gets the stored one.
"""

import asyncio
import contextlib
import os
import secrets
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final, TypeVar, cast

import aiomqtt
import nacl.signing
import structlog

from fog.authorize import Policy
from fog.broker import TCP_NODELAY_OPTION, BrokerLostError, BrokerProcess, EmbeddedBroker
from fog.config import FogConfig, parse_broker_url
from fog.latency import Histogram
from fog.leasing import LeaseKeeper
from fog.store import PRUNE_ROWS_MAX, AckOutcome, Arrival, FogStore, Outcome, TrustOutcome
from fog.storeproc import RemoteMethod, StoreProcess, StoreProcessError
from fog.trust import TRUST_PAYLOAD_BYTES_MAX, TrustArrival, classify, republish_topic
from fog.uplink import Link, Uplink
from protocol import topics
from protocol.errors import FogpayError, TopicError
from protocol.topics import Kind
from runtime.keyfile import load_key_file
from runtime.logs import short
from runtime.mqttloop import read_until_stopped, reconnect_delay_s, sleep_or_stop

log = structlog.get_logger()
T = TypeVar("T")

INTENT_QUEUE_MAX: Final = 10_000
TRUST_QUEUE_MAX: Final = 10_000
GROUP_MAX: Final = 256
PUBLISHING_GROUPS_MAX: Final = 8  # groups whose receipts are being published while the next commits
PUBLISH_TIMEOUT_S: Final = 5.0
CONNECT_TIMEOUT_S: Final = 5.0
SUBSCRIBE_TIMEOUT_S: Final = 5.0
STOP_DRAIN_TIMEOUT_S: Final = 10.0
RECONNECT_ATTEMPTS_MAX: Final = 1000  # consecutive; then exit and let systemd restart us
SEAL_INTERVAL_S_MIN: Final = 0.01
SEAL_INTERVAL_S_MAX: Final = 1.0
PRUNE_IDLE_S: Final = 10.0  # between pruning steps that found less than a full step to do
INFLIGHT_MESSAGES_MAX: Final = 1000
KEEPALIVE_S: Final = 30
LEASE_CLEARED: Final = "lease_cleared"  # trust-queue type: an empty retained lease payload


class FogStartError(FogpayError):
    """The daemon cannot start (the message is one line naming the config key at fault)."""


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


class FogDaemon:
    """One fog: embedded broker (or a connection to Mosquitto), store, processor, sealer.

    ``run()`` until ``stop()`` or cancellation; ``ready`` is set once the broker is up and the
    subscriptions are active. ``broker_port`` is the port actually bound (config port 0 picks
    a free one) or the port connected to.
    """

    def __init__(
        self,
        config: FogConfig,
        *,
        clock: Callable[[], int] = wall_ms,
        fog_key: nacl.signing.SigningKey | None = None,
    ) -> None:
        """``fog_key`` overrides ``config.key_file`` (an embedder that holds the key already)."""
        self.config = config
        self._clock = clock
        self._fog_key = fog_key
        self._started = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fog-store")
        self._store: FogStore | None = None
        self._broker: EmbeddedBroker | BrokerProcess | None = None
        if config.broker.embedded:
            kind = BrokerProcess if config.broker.process else EmbeddedBroker
            self._broker = kind(config.broker)
        self._client: aiomqtt.Client | None = None
        # None is stop()'s wake-up for a processor waiting on an empty queue
        self._intents: asyncio.Queue[Arrival | None] = asyncio.Queue(INTENT_QUEUE_MAX)
        self._trust: asyncio.Queue[TrustArrival] = asyncio.Queue(TRUST_QUEUE_MAX)
        self._stopping = asyncio.Event()
        self._drained = asyncio.Event()
        self._counters: dict[str, int] = {}
        self._store_counters: dict[str, int] = {}
        self._republished = False
        self._publishing: set[asyncio.Task[None]] = set()
        # fog_stats: per intent, read -> receipt handed to the client; per group, the store call
        self._answer_time = Histogram()
        self._store_time = Histogram()
        self._log = log.bind(fog_id=config.fog_id)
        self._debug = config.log_level == "debug"
        self._prune_at = 0.0  # monotonic time of the next pruning step
        # a child process died (store or embedded broker): run() raises it
        self._fatal: StoreProcessError | BrokerLostError | None = None
        self._link = Link(
            fog_id=config.fog_id,
            call=self._call,
            client=lambda: self._client,
            count=self._count,
            log=self._log,
            stopping=self._stopping,
        )
        self._uplink = Uplink(self._link, config.uplink) if config.uplink.enabled else None
        self._leases: LeaseKeeper | None = None  # needs the key: made when the store opens

    # ---- public API -------------------------------------------------------------------

    @property
    def broker_port(self) -> int:
        if self._broker is not None:
            return self._broker.port
        assert self.config.broker.url is not None
        return parse_broker_url(self.config.broker.url).port

    @property
    def counters(self) -> dict[str, int]:
        """Daemon counters merged with the store's as of the last stats tick or stop."""
        leases = self._leases.abandoned if self._leases is not None else {}
        return {**self._store_counters, **leases, **self._counters}

    async def stop(self) -> None:
        """Graceful stop: no new intents; the group in flight commits and is answered."""
        self._stopping.set()
        with contextlib.suppress(asyncio.QueueFull):  # full: the processor is not waiting
            self._intents.put_nowait(None)

    async def run(self, *, ready: asyncio.Event | None = None) -> None:
        assert not self._started, "a FogDaemon runs once"
        self._started = True
        self._log.info("fog_starting", db=str(self.config.db), embedded=self._broker is not None)
        try:
            self._store = await self._call(self._open_store)
            await self._call(self._store.uplink_init)
            if self._broker is not None:
                await self._start_broker(self._broker)
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._mqtt_loop(ready), name="fog.mqtt")
                tg.create_task(self._processor(), name="fog.processor")
                tg.create_task(self._trust_worker(), name="fog.trust")
                tg.create_task(self._sealer(), name="fog.sealer")
                tg.create_task(self._stats(), name="fog.stats")
                if isinstance(self._broker, BrokerProcess):
                    tg.create_task(self._watch_broker(self._broker), name="fog.broker")
                if self._uplink is not None and self._leases is not None:
                    tg.create_task(self._uplink.run(self._store), name="fog.uplink")
                    tg.create_task(self._leases.run(self._store), name="fog.leases")
        finally:
            await self._shutdown()
        if self._fatal is not None:
            raise self._fatal

    async def _start_broker(self, broker: EmbeddedBroker | BrokerProcess) -> None:
        b = self.config.broker
        try:
            await broker.start()
        except Exception as exc:  # amqtt wraps OSError (address in use...) in BrokerError
            cause = exc.__cause__ or exc
            raise FogStartError(
                f"broker.port: cannot listen on {b.host}:{b.port}: {cause}"
            ) from exc

    # ---- store calls, one thread ----------------------------------------------------------

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a store method: on the store thread, or (``store_process``) as a message to the
        store process straight from the loop, with no thread hop."""
        if isinstance(fn, RemoteMethod):
            try:
                result: T = await fn.proxy.acall(fn.name, *args, **kwargs)
            except StoreProcessError as exc:
                self._store_lost(exc)
                raise
            return result
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))

    def _open_store(self) -> FogStore:
        c = self.config
        policy = Policy(
            clock_skew_ms=c.policy.clock_skew_ms,
            rate_per_s=c.policy.rate_per_s,
            rate_burst=c.policy.rate_burst,
        )
        key = self._fog_key or load_key_file(c.key_file)
        if c.uplink.enabled:
            self._leases = LeaseKeeper(self._link, c.lease, clock=self._clock, key=key)
        opener = StoreProcess.start if c.store_process else FogStore.open
        try:
            store = opener(
                c.db, fog_id=c.fog_id, fog_key=key, issuer_key=c.issuer_key, policy=policy
            )
        except sqlite3.Error as exc:  # read-only, missing directory, not a database: one line
            raise FogStartError(f"db: cannot open {c.db}: {exc}") from exc
        pid = store.pid if isinstance(store, StoreProcess) else os.getpid()
        self._log.info("store_opened", process=c.store_process, pid=pid)
        return cast(FogStore, store)  # StoreProcess answers FogStore's methods (by name)

    async def _shutdown(self) -> None:
        store, self._store = self._store, None
        if store is not None:
            with contextlib.suppress(Exception):
                self._store_counters = await self._call(store.counters)
            if not isinstance(store, StoreProcess):
                await asyncio.shield(self._call(store.close))
            elif isinstance(self._fatal, StoreProcessError):
                store.close()  # the process is gone: reap it
            else:  # the store closes its database (checkpoint), then the process exits
                await asyncio.shield(store.acall("close"))
        self._executor.shutdown(wait=True)
        if self._broker is not None:
            await self._broker.stop()
        self._log.info("fog_stopped", **self.counters)

    def _store_lost(self, exc: StoreProcessError) -> None:
        """The store process is gone (killed, crashed): nothing can be authorized or sealed.
        Stop, and let ``run`` raise it: systemd restarts the fog, which reopens the store
        from its file (every group either committed or not)."""
        self._lost(exc, "store_process_lost")

    async def _watch_broker(self, broker: BrokerProcess) -> None:
        """The embedded broker's process exiting while we run leaves devices nowhere to
        connect: stop the fog (run() raises; systemd restarts both) rather than retry."""
        exited = asyncio.ensure_future(broker.exited())
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({exited, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
        if exited.done() and not self._stopping.is_set():
            self._lost(
                BrokerLostError(f"broker process exited ({exited.result()})"), "broker_process_lost"
            )
        exited.cancel()

    def _lost(self, exc: StoreProcessError | BrokerLostError, event: str) -> None:
        if self._fatal is None and not self._stopping.is_set():
            self._fatal = exc
            self._count(event)
            self._log.error(event, error=str(exc))
        self._stopping.set()
        with contextlib.suppress(asyncio.QueueFull):
            self._intents.put_nowait(None)

    def _count(self, name: str, n: int = 1) -> None:
        self._counters[name] = self._counters.get(name, 0) + n

    # ---- MQTT ---------------------------------------------------------------------------

    def _client_args(self) -> dict[str, Any]:
        b = self.config.broker
        if b.url is None:
            host = "127.0.0.1" if b.host in ("0.0.0.0", "localhost") else b.host
            host = "::1" if host == "::" else host
            return {
                "hostname": host,
                "port": self.broker_port,
                "username": b.username,
                "password": b.password,
            }
        addr = parse_broker_url(b.url)
        return {
            "hostname": addr.host,
            "port": addr.port,
            "username": addr.username,
            "password": addr.password,
        }

    async def _mqtt_loop(self, ready: asyncio.Event | None) -> None:
        failures = 0
        while not self._stopping.is_set():
            client = aiomqtt.Client(
                **self._client_args(),
                # unguessable: on amqtt a client reusing our id could take our session over
                identifier=f"fogpay-fog-{self.config.fog_id}-{secrets.token_hex(8)}",
                clean_session=True,  # amqtt persistence is not trusted; devices retransmit
                keepalive=KEEPALIVE_S,
                timeout=CONNECT_TIMEOUT_S,
                max_inflight_messages=INFLIGHT_MESSAGES_MAX,
                max_queued_incoming_messages=INTENT_QUEUE_MAX,
                socket_options=(TCP_NODELAY_OPTION,),
            )
            # we publish a whole group's receipts at once by design; warn only past that
            client.pending_calls_threshold = GROUP_MAX * 2
            try:
                async with client:
                    failures = 0
                    await self._session(client, ready)
                    return
            except aiomqtt.MqttError as exc:
                self._client = None
                self._count("broker_disconnected")
                failures += 1
                if failures > RECONNECT_ATTEMPTS_MAX:
                    raise
                delay = reconnect_delay_s(failures)
                self._log.warning("broker_disconnected", error=str(exc), retry_s=round(delay, 3))
                await sleep_or_stop(self._stopping, delay)

    async def _session(self, client: aiomqtt.Client, ready: asyncio.Event | None) -> None:
        fog_id = self.config.fog_id
        filters = [
            topics.intent_filter(fog_id),
            topics.TRUST_FILTER,
            topics.lease_filter(fog_id),
            topics.ack_topic(fog_id),
        ]
        async with asyncio.timeout(SUBSCRIBE_TIMEOUT_S):
            await client.subscribe([(f, 1) for f in filters])
        self._client = client
        self._count("broker_connected")
        self._log.info("broker_connected", port=self.broker_port, filters=len(filters))
        if self._uplink is not None and self._leases is not None:
            self._uplink.reconnected()
            self._leases.reconnected()
        if self._broker is not None and not self._republished:
            await self._republish_trust(client)
        if ready is not None:
            ready.set()
        await read_until_stopped(self._read(client), self._stopping, name="fog.mqtt")
        # stopping: the reader is gone; let the group in flight commit and publish
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(STOP_DRAIN_TIMEOUT_S):
                await self._drained.wait()
        self._client = None

    async def _republish_trust(self, client: aiomqtt.Client) -> None:
        """amqtt keeps nothing across restarts: put back what the fog holds, retained."""
        assert self._store is not None
        envelopes = await self._call(self._store.trust_envelopes)
        closed = await self._call(self._store.closed_lease_ids)
        count = 0
        for msg_type, envelope in envelopes:
            topic = republish_topic(msg_type, envelope)
            if topic is None or _closed_lease(topic, closed):
                continue
            await client.publish(topic, envelope, qos=1, retain=True, timeout=PUBLISH_TIMEOUT_S)
            count += 1
        self._republished = True
        self._log.info("trust_republished", count=count)

    async def _read(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            payload = message.payload
            if not isinstance(payload, bytes | bytearray):
                payload = b""
            try:
                self._dispatch(str(message.topic), bytes(payload))
            except Exception as exc:  # the seam: no payload or topic may stop the reader
                self._count("message_dropped")
                self._log.error("message_dropped", cause=type(exc).__name__)

    def _dispatch(self, topic: str, payload: bytes) -> None:
        """Route one message; never raises (bad input is logged and counted)."""
        try:
            parsed = topics.parse(topic)
        except TopicError:
            self._count("topic_dropped")
            self._log.warning("message_dropped", cause="bad_topic", topic=topic[:120])
            return
        if parsed.kind is Kind.INTENT:
            self._enqueue_intent(parsed, topic, payload)
            return
        arrival = classify(parsed, payload, fog_id=self.config.fog_id)
        if arrival is None and _is_cleared_lease(parsed, payload, self.config.fog_id):
            assert parsed.lease_id is not None
            arrival = TrustArrival(LEASE_CLEARED, parsed.lease_id)
        if arrival is None:
            return
        if len(payload) > TRUST_PAYLOAD_BYTES_MAX:
            self._count("trust_dropped")
            self._log.warning("trust_dropped", cause="too_large", size=len(payload))
            return
        try:
            self._trust.put_nowait(arrival)
        except asyncio.QueueFull:
            self._count("trust_dropped")
            self._log.warning("trust_dropped", cause="queue_full", type=arrival.msg_type)

    def _enqueue_intent(self, parsed: topics.Topic, topic: str, payload: bytes) -> None:
        if parsed.fog_id != self.config.fog_id or self._stopping.is_set():
            self._count("intent_dropped")
            return
        assert parsed.key is not None
        self._count("intent_received")
        try:
            self._intents.put_nowait(Arrival(parsed.key, payload, time.perf_counter()))
        except asyncio.QueueFull:
            self._count("intent_dropped")
            self._log.warning("intent_dropped", cause="queue_full", device=short(parsed.key))

    # ---- processing ---------------------------------------------------------------------

    async def _processor(self) -> None:
        while True:
            group = await self._next_group()
            if not group:
                break
            await self._process_group(group)
        if self._publishing:
            await asyncio.wait(self._publishing)
        self._drained.set()

    async def _next_group(self) -> list[Arrival]:
        """What is queued, up to GROUP_MAX; waits for the first one; [] when stopping.

        One plain ``Queue.get`` per group (no helper tasks): at a few intents per group the
        waiting itself was a measurable share of the event loop's time."""
        if self._stopping.is_set():
            return []
        first = await self._intents.get()
        if first is None:
            return []
        group = [first]
        while len(group) < GROUP_MAX and not self._intents.empty():
            arrival = self._intents.get_nowait()
            if arrival is None:  # stop() came: this group still commits and is answered
                break
            group.append(arrival)
        return group

    async def _process_group(self, group: list[Arrival]) -> None:
        store = self._store
        assert store is not None
        started = time.perf_counter()
        try:
            outcomes = await self._call(store.process, group, now_ms=self._clock())
        except Exception as exc:  # the seam: a bug or a disk error must not kill the fog
            self._count("group_failed")
            self._log.error(
                "group_failed", size=len(group), error=type(exc).__name__, detail=str(exc)[:200]
            )
            if isinstance(exc, StoreProcessError):
                return  # the store is gone: the fog stops
            try:  # nothing recorded: declined (transient), signed, never ok
                outcomes = await self._call(store.decline_unrecorded, group, now_ms=self._clock())
            except Exception:
                return  # the devices retransmit
            self._count("group_declined", len(group))
            for outcome in outcomes:
                self._log_outcome(outcome)
            await self._publish_receipts(group, outcomes)
            return
        self._store_time.add(time.perf_counter() - started)
        for outcome in outcomes:
            self._log_outcome(outcome)
        if self._leases is not None:
            self._leases.note(group, outcomes)
        # The group is durable: its receipts may leave. The next group commits while they do
        # (bounded: past PUBLISHING_GROUPS_MAX we wait, which is the backpressure).
        if len(self._publishing) >= PUBLISHING_GROUPS_MAX:
            await asyncio.wait(self._publishing, return_when=asyncio.FIRST_COMPLETED)
        task = asyncio.create_task(self._publish_receipts(group, outcomes), name="fog.publish")
        self._publishing.add(task)
        task.add_done_callback(self._published)

    def _published(self, task: "asyncio.Task[None]") -> None:
        self._publishing.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._count("publish_failed")
            self._log.error("publish_failed", error=type(task.exception()).__name__)

    def _log_outcome(self, o: Outcome) -> None:
        """Declines: one warning each. Authorizations: counted, and a debug line each: at
        thousands per second an info line per payment would trip journald's rate limit
        (10,000 lines per 30 s by default), which then drops the service's other lines too.
        The log table holds every payment; ``fog_stats`` carries the counts at info."""
        if o.status == "ok":
            name = "intent_replayed" if o.replay else "intent_authorized"
            self._count(name)
            if self._debug:
                self._log.debug(
                    name,
                    owner=o.owner_id,
                    amount_micros=o.amount_micros,
                    log_index=o.log_index,
                    device=short(o.device),
                    intent=short(o.intent_id),
                    seq=o.seq,
                )
            return
        self._count(f"declined_{o.reason}")
        self._log.warning(
            "intent_declined",
            reason=str(o.reason),
            device=short(o.device),
            intent=short(o.intent_id),
            seq=o.seq,
        )

    async def _publish_receipts(self, group: list[Arrival], outcomes: list[Outcome]) -> None:
        client = self._client
        if client is None:
            self._count("receipt_unsent", len(outcomes))
            return
        sends = [self._publish_one(client, a, o) for a, o in zip(group, outcomes, strict=True)]
        await asyncio.gather(*sends)

    async def _publish_one(self, client: aiomqtt.Client, a: Arrival, o: Outcome) -> None:
        topic = topics.receipt_topic(self.config.fog_id, a.topic_device)
        self._answer_time.add(time.perf_counter() - a.received_s)
        try:
            await client.publish(topic, o.receipt, qos=1, timeout=PUBLISH_TIMEOUT_S)
            self._count("receipt_published")
        except aiomqtt.MqttError as exc:
            self._count("receipt_unsent")
            self._log.warning("receipt_unsent", device=short(o.device), error=str(exc))

    # ---- trust, sealing, stats ------------------------------------------------------------

    async def _trust_worker(self) -> None:
        while True:
            getter = asyncio.create_task(self._trust.get())
            stopping = asyncio.create_task(self._stopping.wait())
            done, _ = await asyncio.wait({getter, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                return
            stopping.cancel()
            await self._load_trust(getter.result())

    async def _load_trust(self, arrival: TrustArrival) -> None:
        store = self._store
        assert store is not None
        if arrival.msg_type == LEASE_CLEARED:
            if self._leases is not None:
                await self._leases.cleared(store, arrival.payload)
            self._prune_at = 0.0  # a closed lease may free records: prune at the next tick
            return
        try:
            if arrival.msg_type == "ack":
                result: TrustOutcome | AckOutcome = await self._call(
                    store.apply_ack, arrival.payload
                )
            else:
                result = await self._call(
                    store.put_trust, arrival.msg_type, arrival.payload, now_ms=self._clock()
                )
        except Exception as exc:  # the seam: bad material is the store's to refuse
            self._count("trust_failed")
            self._log.error("trust_failed", type=arrival.msg_type, error=type(exc).__name__)
            return
        self._count(f"{arrival.msg_type}_{result.status}")
        if result.status == "refused":
            self._log.warning(
                "trust_refused",
                type=arrival.msg_type,
                reason=str(result.reason),
                detail=result.detail,
            )
            return
        event = {"lease": "lease_loaded", "ack": "ack_applied"}.get(arrival.msg_type)
        self._log.info(
            event or "trust_loaded",
            type=arrival.msg_type,
            status=result.status,
            detail=result.detail,
        )
        if result.status != "accepted":
            return
        if isinstance(result, AckOutcome):
            self._count("batch_acked")
            self._log.info("batch_acked", batch=result.number)
            self._prune_at = 0.0  # acked records may go: prune at the next tick
            if self._uplink is not None:
                self._uplink.wake()
        elif arrival.msg_type == "lease" and self._leases is not None:
            self._leases.arrived(arrival.payload)

    async def _sealer(self) -> None:
        batch = self.config.batch
        interval = min(SEAL_INTERVAL_S_MAX, max(SEAL_INTERVAL_S_MIN, batch.age_ms / 4000))
        while not await self._sleep_or_stop(interval):
            store = self._store
            assert store is not None
            try:
                sealed = await self._call(
                    store.seal_due,
                    now_ms=self._clock(),
                    records_max=batch.records_max,
                    age_ms=batch.age_ms,
                )
            except Exception as exc:  # keep authorizing; sealing retries next tick
                self._count("seal_failed")
                self._log.error("seal_failed", error=type(exc).__name__)
                continue
            if batch.keep_acked_ms and time.monotonic() >= self._prune_at:
                await self._prune(store, batch.keep_acked_ms)
            for b in sealed:
                self._count("batch_sealed")
                self._log.info(
                    "batch_sealed",
                    batch=b.number,
                    first_index=b.first_index,
                    records=len(b.records),
                )
            if sealed and self._uplink is not None and self._leases is not None:
                for b in sealed:
                    self._uplink.sealed(b.number, b.wire)
                self._leases.wake()

    async def _prune(self, store: FogStore, keep_ms: int) -> None:
        """Delete a few hundred log records nothing needs any more (FogStore.prune), at each
        sealer tick: small steps, so a store call never holds intents back for long."""
        try:
            pruned = await self._call(store.prune, now_ms=self._clock(), keep_ms=keep_ms)
        except Exception as exc:  # keep authorizing; pruning retries next tick
            self._count("prune_failed")
            self._log.error("prune_failed", error=type(exc).__name__)
            return
        if pruned:
            self._count("records_pruned", pruned)
            if self._debug:
                self._log.debug("log_pruned", records=pruned)
        # a full step: more is waiting, go on next tick; else look again in a while
        full = pruned >= PRUNE_ROWS_MAX
        self._prune_at = time.monotonic() + (0.0 if full else PRUNE_IDLE_S)

    async def _stats(self) -> None:
        while not await self._sleep_or_stop(self.config.stats_interval_s):
            store = self._store
            assert store is not None
            self._store_counters = await self._call(store.counters)
            self._log.info(
                "fog_stats",
                queued=self._intents.qsize(),
                **self.counters,
                **self._answer_time.take("answer_ms"),
                **self._store_time.take("store_ms"),
            )

    async def _sleep_or_stop(self, seconds: float) -> bool:
        """Sleep ``seconds``; True at once when stopping."""
        return await sleep_or_stop(self._stopping, seconds)


def _is_cleared_lease(parsed: topics.Topic, payload: bytes, fog_id: str) -> bool:
    """An empty retained payload on one of our lease topics: the cloud closed the lease."""
    return not payload and parsed.kind is Kind.LEASE and parsed.fog_id == fog_id


def _closed_lease(topic: str, closed: set[bytes]) -> bool:
    parsed = topics.parse(topic)
    return parsed.kind is Kind.LEASE and parsed.lease_id in closed
