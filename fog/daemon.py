"""The fog daemon: a thin asyncio shell around ``FogCore`` (fog/core.py: every decision).

Flow. MQTT messages arrive on one aiomqtt client. Intents go into a bounded queue
(``INTENT_QUEUE_MAX``; when full, an intent is dropped and counted: the device retransmits).
The processor takes whatever is queued (up to ``GROUP_MAX``) and hands it to the core as one
``Intents`` input, which the core decides in one SQLite transaction; the core answers once
that transaction is durable, and only then are the receipts published (QoS 1): a receipt
never leaves before its transaction is on disk. With ``store_pipeline`` (the default) the
processor does not wait for a group's answer to hand over the next (up to
``PIPELINE_GROUPS_MAX`` unanswered): the core decides it while the previous one's WAL syncs
(fog/pipeline.py), and answers in the order of the inputs. There is
no artificial waiting: under low load a group is one intent (latency), under load groups grow
by themselves (throughput). Every other message on our subscriptions (trust material, leases,
a cleared lease topic, acks) goes through its own bounded queue to the core as a
``TrustMessage``. The ticker gives the core a ``Tick`` when it asked for one (``Wake``) and at
least every ``TICK_S_MAX``: the core seals, prunes, plans the uplink and runs lease rounds,
and answers with what to publish (batches, lease requests and reports), which the ticker
publishes. The core's outputs are logged and counted here; the core itself logs nothing.

Where the core runs. ``store_process = true`` (the default): in a child process
(``fog/storeproc.py``), reached through one codec of the core's inputs and outputs
(``fog/corewire.py``), straight from the event loop with no thread hop. ``false``: in this
process, on ONE worker thread (``ThreadPoolExecutor(max_workers=1)``): SQLite never blocks the
event loop and never sees two threads on its connection. Either way inputs reach the core one
at a time, in the order they were given.

Time. Each input carries the wall clock (``clock``, for what is stored and signed) and
``time.monotonic`` (for the core's resend timers).

Stop. ``stop()`` (SIGTERM) stops taking intents, lets the group in flight commit and publish
its receipts, then closes the client, the core (``Close``) and the embedded broker. Cancelling
``run()`` is abrupt but safe: an input in the child or the worker thread still commits or
rolls back whole, and a device that lost its receipt retransmits and gets the stored one.
"""

import asyncio
import contextlib
import dataclasses
import functools
import os
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Final

import aiomqtt
import nacl.signing
import structlog

from fog.authorize import Policy
from fog.brokerproc import BrokerLostError, BrokerProcess
from fog.config import FogConfig, broker_tls, parse_broker_url
from fog.core import (
    Alarm,
    BatchSend,
    Close,
    Connected,
    CoreConfig,
    Counters,
    Disconnected,
    FogCore,
    FogInput,
    FogOutput,
    Intents,
    LeaseClosed,
    LeaseReport,
    LeaseRequest,
    LeaseReturned,
    Pruned,
    Publish,
    Receipt,
    Republish,
    ReturnLeases,
    Sealed,
    Stats,
    Tick,
    TrustLoaded,
    TrustMessage,
    Wake,
)
from fog.latency import Histogram
from fog.metrics import FogObserver, FogState, RunningHistogram  # observability hook
from fog.pipeline import Pipeline, Result
from fog.replicas import ReplicaEvent
from fog.schema import StoreError, open_problem
from fog.store import Arrival, Outcome, StoreSyncError
from fog.storeproc import CoreProcess, StoreProcessError
from fog.trust import TRUST_PAYLOAD_BYTES_MAX
from fog.verifyproc import VerifyPool, VerifyWorkerError
from fog.vouchers import VoucherIssuer
from protocol import limits, topics
from protocol.errors import FogpayError, TopicError
from protocol.gossip import SEEN_ENVELOPE_BYTES_MAX
from protocol.topics import Kind
from runtime.keyfile import load_key_file
from runtime.logs import bind_component, short, unbind_component
from runtime.mqttloop import read_until_stopped, sleep_or_stop
from runtime.mqttshell import ClientSettings, Publisher, serve
from runtime.tlsconf import TlsSettings

if TYPE_CHECKING:
    from fog.broker import EmbeddedBroker

log = structlog.get_logger()

INTENT_QUEUE_MAX: Final = 10_000
TRUST_QUEUE_MAX: Final = 10_000
# peers' batches (up to 1 MiB each) waiting in the trust queue, at most: past it they are
# dropped (the origin sends again), so a burst of replicas cannot fill the memory
GOSSIP_QUEUED_BYTES_MAX: Final = 64 * 1024 * 1024
GROUP_MAX: Final = 256
# receipts being published while the next groups commit, at most (counted in receipts, not
# groups: pipelined, groups are small and many; as many as 8 full groups)
PUBLISHING_RECEIPTS_MAX: Final = 8 * 256
# groups given to the core and not yet answered (store_pipeline: decided while others sync)
PIPELINE_GROUPS_MAX: Final = 8
PUBLISH_TIMEOUT_S: Final = 5.0
CONNECT_TIMEOUT_S: Final = 5.0
SUBSCRIBE_TIMEOUT_S: Final = 5.0
STOP_DRAIN_TIMEOUT_S: Final = 10.0
RECONNECT_ATTEMPTS_MAX: Final = 1000  # consecutive; then exit and let systemd restart us
TICK_S_MAX: Final = 1.0  # the core is given a Tick at least this often, whatever it asked
TICK_RETRY_S: Final = 1.0  # after a Tick that failed
INFLIGHT_MESSAGES_MAX: Final = 1000
KEEPALIVE_S: Final = 30


class FogStartError(FogpayError):
    """The daemon cannot start (the message is one line naming the config key at fault)."""


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


def mono_ms() -> int:
    """For the core's resend timers: elapsed time, whatever the wall clock does."""
    return time.monotonic_ns() // 1_000_000


def _close_unused_core(
    opening: "asyncio.Future[FogCore | CoreProcess]", pipeline: Pipeline | None
) -> None:
    if opening.cancelled() or opening.exception() is not None:
        return
    core = opening.result()
    args = (core, pipeline)
    threading.Thread(target=_close_core, args=args, name="fog.close-unused").start()


def _close_core(core: FogCore | CoreProcess, pipeline: Pipeline | None) -> None:
    if isinstance(core, CoreProcess):
        core.close()
    elif pipeline is not None:  # its sync threads end too
        pipeline.submit(Close(now_ms=0), lambda _: None)
    else:
        core.handle(Close(now_ms=0))


class FogDaemon:
    """One fog: embedded broker (or a connection to Mosquitto), core, processor, ticker.

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
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fog-core")
        self._core: FogCore | CoreProcess | None = None
        self._verify: VerifyPool | None = None  # verify_workers > 0 (fog/verifyproc.py)
        self._pipeline: Pipeline | None = None  # store_pipeline with store_process = false
        # tests (store_process = false): wraps the WAL's fsync (fog/pipeline.py's sync_hook)
        self.sync_hook: Callable[[Callable[[], None]], None] | None = None
        self._broker: EmbeddedBroker | BrokerProcess | None = None
        if config.broker.embedded and config.broker.process:
            self._broker = BrokerProcess(config.broker)
        elif config.broker.embedded:  # amqtt on this loop: only then are its modules imported
            from fog import broker

            self._intent_prefix = topics.intent_filter(config.fog_id).removesuffix("+")
            handoff = self._handoff if config.broker.handoff else None
            self._broker = broker.EmbeddedBroker(config.broker, handoff=handoff)
        self._client: aiomqtt.Client | None = None
        self._publisher: Publisher | None = None  # the shell's bounded queue on _client
        # None is stop()'s wake-up for a processor waiting on an empty queue
        self._intents: asyncio.Queue[Arrival | None] = asyncio.Queue(INTENT_QUEUE_MAX)
        self._trust: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue(TRUST_QUEUE_MAX)
        self._gossip_bytes = 0  # bytes of peers' batches in the trust queue
        self._stopping = asyncio.Event()
        self._drained = asyncio.Event()
        self._counters: dict[str, int] = {}
        self._core_counters: dict[str, int] = {}
        self._republished = False
        self._returned_at_stop = False  # lease.return_on_stop done (docs/protocol.md 18.1)
        self._vouchers: VoucherIssuer | None = None  # 18.3: vouchers after their receipts
        self._publishing: set[asyncio.Task[None]] = set()
        self._publishing_receipts = 0  # the receipts of those tasks
        self._wake = asyncio.Event()  # a Wake earlier than the ticker's sleep came
        self._wake_at: int | None = None  # monotonic ms of the earliest Wake since the Tick
        # fog_stats: per intent, read -> receipt handed to the client; per group, the core call
        self._answer_time = RunningHistogram()  # observability hook: totals for /metrics
        self._store_time = Histogram()
        # component bound here too (observability hook): core calls log from the core thread,
        # which the task's contextvars do not reach
        self._log = log.bind(fog_id=config.fog_id, component="fog")
        self._debug = config.log_level == "debug"
        # a child process died (core or embedded broker): run() raises it
        self._fatal: StoreError | BrokerLostError | None = None
        # ---- observability hook (fog/metrics.py): what /metrics and /readyz read, at scrape
        self.observer = FogObserver(
            config,
            FogState(
                counters=lambda: self.counters,
                answer_time=self._answer_time,
                broker_up=lambda: self._client is not None,
                store_open=lambda: self._core is not None,
                stopping=self._stopping.is_set,
                queued=self._intents.qsize,
                clock=clock,
            ),
        )

    # ---- public API -------------------------------------------------------------------

    @property
    def broker_port(self) -> int:
        if self._broker is not None:
            return self._broker.port
        assert self.config.broker.url is not None
        return parse_broker_url(self.config.broker.url).port

    @property
    def broker_tls_port(self) -> int | None:
        """The embedded broker's TLS listener port (``broker.tls_port``), once started."""
        return None if self._broker is None else self._broker.tls_port

    @property
    def counters(self) -> dict[str, int]:
        """Daemon counters merged with the core's as of the last stats tick or stop."""
        return {**self._core_counters, **self._counters}

    async def stop(self) -> None:
        """Graceful stop: no new intents; the group in flight commits and is answered."""
        self._stopping.set()
        with contextlib.suppress(asyncio.QueueFull):  # full: the processor is not waiting
            self._intents.put_nowait(None)

    async def run(self, *, ready: asyncio.Event | None = None) -> None:
        assert not self._started, "a FogDaemon runs once"
        self._started = True
        component = bind_component("fog")  # observability hook: every line of this fog
        self._log.info("fog_starting", db=str(self.config.db), embedded=self._broker is not None)
        try:
            await self.observer.start()  # observability hook: /metrics, /healthz, /readyz
            self._core = await self._open_core_async()
            if self.config.verify_workers:
                await self._start_verify_workers(self.config.verify_workers)
            if self._broker is not None:
                await self._start_broker(self._broker)
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._mqtt_loop(ready), name="fog.mqtt")
                tg.create_task(self._processor(), name="fog.processor")
                tg.create_task(self._trust_worker(), name="fog.trust")
                tg.create_task(self._ticker(), name="fog.ticker")
                tg.create_task(self._stats(), name="fog.stats")
                if isinstance(self._broker, BrokerProcess):
                    tg.create_task(self._watch_broker(self._broker), name="fog.broker")
        finally:
            await self._shutdown()
            unbind_component(component)  # observability hook
        if self._fatal is not None:
            raise self._fatal

    async def _start_verify_workers(self, n: int) -> None:
        loop = asyncio.get_running_loop()
        try:
            pool = await loop.run_in_executor(None, VerifyPool.start, n)
        except (OSError, VerifyWorkerError) as exc:
            raise FogStartError(f"verify_workers: cannot start {n} workers: {exc}") from exc
        self._verify = pool
        await pool.open()
        self._log.info("verify_workers_started", workers=n, pids=pool.pids)

    async def _start_broker(self, broker: "EmbeddedBroker | BrokerProcess") -> None:
        b = self.config.broker
        try:
            await broker.start()
        except Exception as exc:  # amqtt wraps OSError (address in use...) in BrokerError
            cause = exc.__cause__ or exc
            raise FogStartError(
                f"broker.port: cannot listen on {b.host}:{b.port}: {cause}"
            ) from exc

    # ---- the core: one input at a time --------------------------------------------------------

    async def _open_core_async(self) -> FogCore | CoreProcess:
        """Open the core on the worker thread. Cancelled meanwhile (a stop, a test's timeout
        on a slow machine), the thread still finishes opening: the core it opens is then
        closed on a thread of its own, so no store process or socket is left behind (found
        as ResourceWarnings in a later test of CI)."""
        loop = asyncio.get_running_loop()
        opening = loop.run_in_executor(self._executor, self._open_core)
        try:
            return await asyncio.shield(opening)
        except asyncio.CancelledError:
            # (read once opened: the worker thread sets it)
            opening.add_done_callback(lambda f: _close_unused_core(f, self._pipeline))
            raise

    def _open_core(self) -> FogCore | CoreProcess:
        """On the worker thread (opening waits for SQLite, or for the child to start)."""
        c = self.config
        config = CoreConfig(
            fog_id=c.fog_id,
            issuer_key=c.issuer_key,
            policy=Policy(
                clock_skew_ms=c.policy.clock_skew_ms,
                rate_per_s=c.policy.rate_per_s,
                rate_burst=c.policy.rate_burst,
            ),
            batch=c.batch,
            uplink=c.uplink,
            lease=c.lease,
            federation=c.federation,
        )
        key = self._fog_key or load_key_file(c.key_file)
        self._vouchers = VoucherIssuer(key)
        core: FogCore | CoreProcess
        try:
            if c.store_process:
                core = CoreProcess.start(
                    c.db, config=config, fog_key=key, pipelined=c.store_pipeline
                )
                pid = core.pid
            else:
                durable = not c.store_pipeline
                core = FogCore.open(c.db, config=config, fog_key=key, durable_commits=durable)
                pid = os.getpid()
                if c.store_pipeline:
                    self._pipeline = Pipeline(core, sync_hook=self.sync_hook)
        except sqlite3.Error as exc:  # read-only file system, a failed disk: one line, no trace
            raise open_problem(c.db, exc) from exc
        self._log.info("store_opened", process=c.store_process, pid=pid, pipeline=c.store_pipeline)
        return core

    def _times(self) -> dict[str, int]:
        return {"now_ms": self._clock(), "mono_ms": mono_ms()}

    async def _handle(self, event: FogInput) -> list[FogOutput]:
        """The core's answer to ``event``: from the child process (no thread hop), or from
        the worker thread. Raises what the core raised; a lost child stops the fog."""
        core = self._core
        assert core is not None, "the core is closed"
        return await self._handle_on(core, event)

    async def _handle_on(self, core: FogCore | CoreProcess, event: FogInput) -> list[FogOutput]:
        try:
            if isinstance(core, CoreProcess):
                return await core.ahandle(event)
            loop = asyncio.get_running_loop()
            if self._pipeline is None:
                return await loop.run_in_executor(self._executor, core.handle, event)
            # handled on the worker thread in the order given, answered after its barrier
            answer: asyncio.Future[Result] = loop.create_future()
            pipeline = self._pipeline

            def done(result: Result) -> None:  # on a sync thread (or the worker)
                with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
                    loop.call_soon_threadsafe(_settle, answer, result)

            def submit() -> None:  # on the worker thread
                try:
                    pipeline.submit(event, done)
                except Exception as exc:
                    done(exc)

            loop.run_in_executor(self._executor, submit)
            result = await answer
            if isinstance(result, BaseException):
                raise result
            return result
        except StoreSyncError as exc:
            self._lost(exc, "store_sync_failed")
            raise
        except StoreProcessError as exc:
            self._store_lost(exc)
            raise

    async def _tell_core(self, event: Connected | Disconnected) -> None:
        """A link change: never raises (a lost core is noticed and stops the fog)."""
        if self._core is None:
            return
        try:
            await self._act(await self._handle(event))
        except Exception as exc:
            self._count("core_failed")
            self._log.error("core_failed", input=type(event).__name__, error=type(exc).__name__)

    async def _shutdown(self) -> None:
        if self._fatal is None:
            await self._return_at_stop()  # not connected at the stop: reported at the next start
        core, self._core = self._core, None
        if core is not None:
            try:
                if isinstance(core, CoreProcess) and isinstance(self._fatal, StoreProcessError):
                    core.close()  # the process is gone: reap it
                else:  # the core closes its database (checkpoint); a child then exits
                    closing = self._handle_on(core, Close(**self._times()))
                    await self._act(await asyncio.shield(closing))
            except Exception as exc:
                self._log.error("core_close_failed", error=type(exc).__name__)
                if isinstance(core, CoreProcess):
                    core.close()
        self._executor.shutdown(wait=True)
        if self._verify is not None:
            await self._verify.aclose()
        if self._broker is not None:
            await self._broker.stop()
        await self.observer.stop()  # observability hook
        self._log.info("fog_stopped", **self.counters)

    async def _return_at_stop(self) -> None:
        """``lease.return_on_stop``: give every live lease back (docs/protocol.md 18.1), once,
        after the last group committed: retired for good, sealed, reported, and the reports
        and batches published if the link is up (else they go at the next start)."""
        if (
            not self.config.lease.return_on_stop
            or self._returned_at_stop
            or self._core is None
            or not self._stopping.is_set()
        ):
            return
        self._returned_at_stop = True
        try:
            now = self._times()
            event = ReturnLeases(now_ms=now["now_ms"], mono_ms=now["mono_ms"], cause="shutdown")
            outputs = await self._handle(event)
            await self._act(outputs)
        except Exception as exc:  # the seam: the leases stay; reported at expiry as before
            self._count("core_failed")
            self._log.error("core_failed", input="ReturnLeases", error=type(exc).__name__)

    def _store_lost(self, exc: StoreProcessError) -> None:
        """The core's process is gone (killed, crashed): nothing can be authorized or sealed.
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

    def _lost(self, exc: StoreError | BrokerLostError, event: str) -> None:
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

    def _client_settings(self) -> ClientSettings:
        b = self.config.broker
        username: str | None
        password: str | None
        tls: TlsSettings | None = None
        if b.url is None:
            host = "127.0.0.1" if b.host in ("0.0.0.0", "localhost") else b.host
            host = "::1" if host == "::" else host
            port, username, password = self.broker_port, b.username, b.password
        else:
            addr = parse_broker_url(b.url)
            host, port, username, password = addr.host, addr.port, addr.username, addr.password
            tls = broker_tls(b) if addr.tls else None
        return ClientSettings(
            hostname=host,
            port=port,
            username=username,
            password=password,
            # unguessable (a random suffix): on amqtt a client reusing our id could take our
            # session over
            identifier_prefix=f"fogpay-fog-{self.config.fog_id}",
            keepalive_s=KEEPALIVE_S,
            connect_timeout_s=CONNECT_TIMEOUT_S,
            subscribe_timeout_s=SUBSCRIBE_TIMEOUT_S,
            inflight_max=INFLIGHT_MESSAGES_MAX,
            incoming_max=INTENT_QUEUE_MAX,
            # we publish a whole group's receipts at once by design; warn only past that
            pending_calls_threshold=GROUP_MAX * 2,
            failures_max=RECONNECT_ATTEMPTS_MAX,
            tls=tls,
        )

    async def _mqtt_loop(self, ready: asyncio.Event | None) -> None:
        """The MQTT shell (runtime/mqttshell.py): a clean session; devices retransmit."""
        fog_id = self.config.fog_id
        filters = [
            topics.intent_filter(fog_id),
            topics.TRUST_FILTER,
            topics.lease_filter(fog_id),
            topics.ack_topic(fog_id),
        ]
        if self.config.broker.handoff:  # the broker hands intents over (_handoff)
            filters.remove(topics.intent_filter(fog_id))
        if self.config.federation.peers:  # replication (docs/protocol.md 17.2): peers' gossip,
            # and every fog's ack (ours among them: the one filter replaces ours)
            filters.remove(topics.ack_topic(fog_id))
            filters += [topics.gossip_filter(fog_id), topics.ACK_FILTER]

        async def session(client: aiomqtt.Client) -> None:
            await self._session(client, ready, filters=len(filters))

        await serve(
            self._client_settings(),
            filters,
            stopping=self._stopping,
            session=session,
            lost=self._broker_lost,
        )

    async def _broker_lost(self, exc: aiomqtt.MqttError, delay_s: float) -> None:
        self._client = self._publisher = None
        await self._tell_core(Disconnected(**self._times()))
        self._count("broker_disconnected")
        self._log.warning("broker_disconnected", error=str(exc), retry_s=round(delay_s, 3))

    async def _session(
        self, client: aiomqtt.Client, ready: asyncio.Event | None, *, filters: int
    ) -> None:
        self._client = client
        broker = self._broker
        if self.config.broker.handoff and broker is not None:
            assert not isinstance(broker, BrokerProcess), "config: handoff needs process = false"
            self._publisher = _HandoffPublisher(client, broker)
        else:
            self._publisher = Publisher(
                client, in_flight_max=INFLIGHT_MESSAGES_MAX, timeout_s=PUBLISH_TIMEOUT_S
            )
        self._count("broker_connected")
        self._log.info("broker_connected", port=self.broker_port, filters=filters)
        # what went to the old connection may not have reached the cloud: the core sends
        # every unacked batch and open report again
        await self._tell_core(Connected(**self._times()))
        if self._broker is not None and not self._republished:
            await self._republish_trust(client)
        if ready is not None:
            ready.set()
        await read_until_stopped(self._read(client), self._stopping, name="fog.mqtt")
        # stopping: the reader is gone; let the group in flight commit and publish
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(STOP_DRAIN_TIMEOUT_S):
                await self._drained.wait()
        await self._return_at_stop()  # while the link is still up: the reports can leave
        self._client = self._publisher = None

    async def _republish_trust(self, client: aiomqtt.Client) -> None:
        """amqtt keeps nothing across restarts: put back what the fog holds, retained."""
        count = 0
        for out in await self._handle(Republish(**self._times())):
            assert isinstance(out, Publish)
            await client.publish(
                out.topic, out.payload, qos=1, retain=out.retain, timeout=PUBLISH_TIMEOUT_S
            )
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

    def _handoff(self, topic: str, payload: bytes) -> bool:
        """``broker.handoff``: a device's PUBLISH from the embedded broker on this loop, past
        its checks and ACLs (fog.broker.FogBroker). What is published under this fog's
        intent topics is the fog's (True): routed as ``_read`` routes it (queued, or dropped
        and counted: a bad device key, a full queue). Anything else goes on to the broker's
        subscribers (False), the fog's own connection among them. Never raises."""
        if not topic.startswith(self._intent_prefix):
            return False
        try:
            self._dispatch(topic, payload)
        except Exception as exc:  # the seam: no payload or topic may stop the broker
            self._count("message_dropped")
            self._log.error("message_dropped", cause=type(exc).__name__)
        return True

    def _dispatch(self, topic: str, payload: bytes) -> None:
        """Route one message; never raises (bad input is logged and counted). What is not
        an intent is the core's to classify (``TrustMessage``)."""
        try:
            parsed = topics.parse(topic)
        except TopicError:
            self._count("topic_dropped")
            self._log.warning("message_dropped", cause="bad_topic", topic=topic[:120])
            return
        if parsed.kind is Kind.INTENT:
            self._enqueue_intent(parsed, payload)
            return
        if len(payload) > _payload_max(parsed.kind):
            self._count("trust_dropped")
            self._log.warning("trust_dropped", cause="too_large", size=len(payload))
            return
        big = len(payload) if parsed.kind is Kind.GOSSIP_BATCH else 0
        if big and self._gossip_bytes + big > GOSSIP_QUEUED_BYTES_MAX:
            self._count("trust_dropped")
            self._log.warning("trust_dropped", cause="gossip_backlog", size=big)
            return
        try:
            self._trust.put_nowait((topic, payload))
            self._gossip_bytes += big
        except asyncio.QueueFull:
            self._count("trust_dropped")
            self._log.warning("trust_dropped", cause="queue_full", kind=str(parsed.kind))

    def _enqueue_intent(self, parsed: topics.Topic, payload: bytes) -> None:
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
        """Groups go to the core as they form, up to ``PIPELINE_GROUPS_MAX`` unanswered with
        ``store_pipeline`` (the core decides one while the previous ones sync; it takes inputs
        in the order given and answers in that order); without, one at a time."""
        deciding: set[asyncio.Task[None]] = set()
        unanswered_max = PIPELINE_GROUPS_MAX if self.config.store_pipeline else 1
        handed: asyncio.Future[None] | None = None  # the previous group is on its way to the core
        while True:
            group = await self._next_group()
            if not group:
                break
            order: _Order | None = None
            # checked by the workers (from now, while earlier groups decide), then to the core
            # in order; not when the core is idle (nothing in flight): it then verifies a lone
            # group sooner than a worker's round trip would
            if self._verify is not None and deciding:
                verdicts = asyncio.ensure_future(self._verify.verdicts([a.payload for a in group]))
                order = _Order(verdicts, handed, asyncio.get_running_loop().create_future())
                handed = order.handed
            if len(deciding) >= unanswered_max:
                await asyncio.wait(deciding, return_when=asyncio.FIRST_COMPLETED)
            task = asyncio.create_task(self._process_group(group, order), name="fog.group")
            deciding.add(task)
            task.add_done_callback(deciding.discard)
        if deciding:
            await asyncio.wait(deciding)
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

    async def _process_group(self, group: list[Arrival], order: "_Order | None" = None) -> None:
        started = time.perf_counter()
        try:
            handling: Awaitable[list[FogOutput]]
            if order is None:
                handling = self._handle(Intents(arrivals=tuple(group), **self._times()))
            else:
                handling = await self._after_workers(group, order)
            outputs = await handling
        except Exception as exc:  # the seam: a bug must not kill the fog; devices retransmit
            self._count("group_failed")
            self._log.error("group_failed", size=len(group), error=type(exc).__name__)
            return
        self._store_time.add(time.perf_counter() - started)
        receipts: list[Receipt] = []
        for out in outputs:
            if isinstance(out, Receipt):
                receipts.append(out)
                self._log_outcome(out.outcome)
            elif isinstance(out, Wake):
                self._wake_until(out.mono_ms)
            elif isinstance(out, Alarm):  # the disk failed: the group was declined, not recorded
                self._count("group_declined", len(group))
                if out.event == "store_sync_failed":  # the barrier failed: stop (fog/pipeline.py)
                    self._lost(StoreSyncError(out.error), out.event)
                else:
                    self._count(out.event)
                    self._log.error(out.event, size=len(group), error=out.error)
        # The group is durable: its receipts may leave. The next group commits while they do
        # (bounded: past PUBLISHING_RECEIPTS_MAX we wait, which is the backpressure).
        while self._publishing_receipts >= PUBLISHING_RECEIPTS_MAX and self._publishing:
            await asyncio.wait(self._publishing, return_when=asyncio.FIRST_COMPLETED)
        task = asyncio.create_task(self._publish_receipts(group, receipts), name="fog.publish")
        self._publishing.add(task)
        self._publishing_receipts += len(receipts)
        task.add_done_callback(functools.partial(self._published, receipts=len(receipts)))

    async def _after_workers(
        self, group: list[Arrival], order: "_Order"
    ) -> "asyncio.Future[list[FogOutput]]":
        """The group marked with its workers' verdicts, handed to the core after the groups
        before it (each hands its input over before the next may: the core takes inputs in
        the order they were made). Returns the core's answer to await."""
        try:
            try:
                verdicts = await order.verdicts
            except Exception:  # verdicts() does not raise; if it did, the core checks them all
                verdicts = [False] * len(group)
            assert self._verify is not None
            for pid in self._verify.lost():
                self._count("verify_worker_lost")
                self._log.error("verify_worker_lost", pid=pid, workers_left=self._verify.alive)
            marked = [
                Arrival(a.topic_device, a.payload, a.received_s, verified=True) if ok else a
                for a, ok in zip(group, verdicts, strict=True)
            ]
            self._count("intent_verified_by_worker", sum(verdicts))
            if order.after is not None:
                await order.after
            # the task starts (and writes its input) before the next group's may: FIFO
            return asyncio.ensure_future(
                self._handle(Intents(arrivals=tuple(marked), **self._times()))
            )
        finally:
            if not order.handed.done():
                order.handed.set_result(None)

    def _published(self, task: "asyncio.Task[None]", receipts: int) -> None:
        self._publishing.discard(task)
        self._publishing_receipts -= receipts
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

    async def _publish_receipts(self, group: list[Arrival], receipts: list[Receipt]) -> None:
        publisher = self._publisher
        if publisher is None:
            self._count("receipt_unsent", len(receipts))
            return
        sends = [self._publish_one(publisher, a, r) for a, r in zip(group, receipts, strict=True)]
        await asyncio.gather(*sends)

    async def _publish_one(self, publisher: Publisher, a: Arrival, r: Receipt) -> None:
        self._answer_time.add(time.perf_counter() - a.received_s)
        try:
            await publisher.publish(r.topic, r.payload)
            self._count("receipt_published")
            if r.outcome.status == "ok" and self._vouchers is not None:  # 18.3: after its receipt
                vch = self._vouchers.voucher(a.payload, r.outcome.receipt)
                if vch is not None:
                    await publisher.publish(r.topic, vch)
                    self._count("voucher_published")
        except aiomqtt.MqttError as exc:
            self._count("receipt_unsent")
            self._log.warning("receipt_unsent", device=short(r.outcome.device), error=str(exc))

    # ---- trust, time, what the core asks for ----------------------------------------------

    async def _trust_worker(self) -> None:
        while True:
            getter = asyncio.create_task(self._trust.get())
            stopping = asyncio.create_task(self._stopping.wait())
            done, _ = await asyncio.wait({getter, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                return
            stopping.cancel()
            topic, payload = getter.result()
            if topic.endswith("/batch"):  # only gossip batches reach this queue as batches
                self._gossip_bytes = max(0, self._gossip_bytes - len(payload))
            try:
                outputs = await self._handle(
                    TrustMessage(topic=topic, payload=payload, **self._times())
                )
            except Exception as exc:  # the seam: bad material is the core's to refuse
                self._count("trust_failed")
                self._log.error("trust_failed", error=type(exc).__name__)
                continue
            await self._act(outputs)

    async def _ticker(self) -> None:
        """Give the core a Tick when it asked (``Wake``), at least every ``TICK_S_MAX``."""
        while True:
            delay = TICK_S_MAX
            if self._wake_at is not None:
                delay = min(delay, max(0.0, (self._wake_at - mono_ms()) / 1000))
            if delay > 0:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._woken()
            if self._stopping.is_set():
                return
            if self._wake_at is not None and self._wake_at > mono_ms() and self._wake.is_set():
                continue  # an earlier Wake came: sleep again, to it
            self._wake_at = None  # from here, only Wakes given after this Tick count
            try:
                outputs = await self._handle(Tick(**self._times()))
            except Exception as exc:  # the seam: try again in a while
                self._count("tick_failed")
                self._log.error("tick_failed", error=type(exc).__name__)
                self._wake_until(mono_ms() + int(TICK_RETRY_S * 1000))
                continue
            await self._act(outputs)

    async def _woken(self) -> None:
        stopping = asyncio.ensure_future(self._stopping.wait())
        woken = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait({stopping, woken}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            woken.cancel()

    def _wake_until(self, at_ms: int) -> None:
        if self._wake_at is None or at_ms < self._wake_at:
            self._wake_at = at_ms
            self._wake.set()

    async def _act(self, outputs: list[FogOutput]) -> None:
        """Publish, log and count what the core answered (receipts: ``_process_group``)."""
        for out in outputs:
            match out:
                case Wake():
                    self._wake_until(out.mono_ms)
                case Sealed():
                    self._count("batch_sealed")
                    self._log.info(
                        "batch_sealed",
                        batch=out.number,
                        first_index=out.first_index,
                        records=out.records,
                    )
                case BatchSend():
                    if await self._publish_up(out.topic, out.payload):
                        self._count("batch_sent")
                        self._log.info("batch_sent", batch=out.number, size=len(out.payload))
                case LeaseRequest():
                    if not out.resend:
                        self._count("lease_requested")
                        self._log.info("lease_requested", owner=out.owner_id, currency=out.currency)
                    await self._publish_up(out.topic, out.payload)
                case LeaseReport():
                    if not out.resend:
                        self._count("lease_reported")
                        self._log.info(
                            "lease_reported",
                            lease=out.lease_id.hex(),
                            drawn_micros=out.drawn_micros,
                            batch=out.batch,
                        )
                    await self._publish_up(out.topic, out.payload)
                case TrustLoaded():
                    self._trust_loaded(out)
                case LeaseReturned():
                    self._count("lease_returned")
                    self._count("lease_returned_micros", out.amount_micros - out.drawn_micros)
                    self._log.info(
                        "lease_returned",
                        lease=out.lease_id.hex(),
                        owner=out.owner_id,
                        currency=out.currency,
                        drawn_micros=out.drawn_micros,
                        returned_micros=out.amount_micros - out.drawn_micros,
                        reason=out.cause,
                    )
                case LeaseClosed():
                    self._count("lease_closed")
                    self._log.info("lease_closed", lease=out.lease_id.hex())
                case Pruned():
                    self._count("records_pruned", out.records)
                    if self._debug:
                        self._log.debug("log_pruned", records=out.records)
                case Alarm():
                    self._count(out.event)
                    if out.event.endswith("_cleared"):  # an alarm that ended
                        self._log.info(out.event, detail=out.error)
                    else:
                        self._log.error(out.event, error=out.error)
                case Publish() if out.topic.startswith(f"{topics.ROOT}/up/") and out.topic.endswith(
                    "/xfer"
                ):
                    # a peer transfer up to the cloud (docs/protocol.md 18.2)
                    if await self._publish_up(out.topic, out.payload):
                        self._count("transfer_sent_up")
                case Publish():  # gossip to a peer (docs/protocol.md 17), or a relay to the cloud
                    kind = out.topic.rsplit("/", 1)[-1]
                    if await self._publish_up(out.topic, out.payload) and kind != "relay":
                        self._count(f"gossip_{kind}_sent")
                        to = out.topic.split("/")[3]
                        if kind in ("revoke", "fetch"):  # the rest: many a second, counted
                            self._log.info("gossip_sent", kind=kind, to=to, size=len(out.payload))
                        elif self._debug:
                            self._log.debug("gossip_sent", kind=kind, to=to, size=len(out.payload))
                case Counters():
                    self._core_counters = out.as_dict()
                case ReplicaEvent():
                    self._replica_event(out)
                case Receipt():
                    raise AssertionError(f"{type(out).__name__} outside its input")

    def _replica_event(self, out: ReplicaEvent) -> None:
        """Replication (fog/replicas.py): one log line and one counter per event."""
        self._count(out.event)
        fields = {"origin": out.origin, "batch": out.number, "detail": out.detail}
        if out.event in ("replica_fork", "replica_full"):
            self._log.error(out.event, **fields)
        elif out.event == "replica_refused":
            self._log.warning(out.event, **fields)
        elif out.event in ("replica_stored", "replica_acked"):
            if self._debug:  # one per batch per peer: counted, logged at debug only
                self._log.debug(out.event, **fields)
        else:
            self._log.info(out.event, **fields)

    def _trust_loaded(self, out: TrustLoaded) -> None:
        self._count(f"{out.msg_type}_{out.status}")
        if out.msg_type == "seen" and out.status == "accepted":  # twice a second per peer
            if self._debug:
                self._log.debug("seen_applied", detail=out.detail)
            return
        if out.answered_request:
            self._count("lease_request_answered")
        if out.status not in ("accepted", "duplicate", "kept"):  # kept: an rbal declined (18.5)
            self._log.warning(
                "trust_refused",
                type=out.msg_type,
                reason=str(out.reason),
                detail=out.detail,
            )
            return
        event = {"lease": "lease_loaded", "ack": "ack_applied"}.get(out.msg_type)
        self._log.info(
            event or "trust_loaded", type=out.msg_type, status=out.status, detail=out.detail
        )
        if out.status == "accepted" and out.msg_type == "ack":
            self._count("batch_acked")
            self._log.info("batch_acked", batch=out.batch)

    async def _publish_up(self, topic: str, payload: bytes) -> bool:
        """QoS 1, not retained, with a deadline; False (counted, logged) when it failed. The
        core sends it again on its own schedule."""
        publisher = self._publisher
        if publisher is None:
            self._count("uplink_unsent")
            return False
        try:
            await publisher.publish(topic, payload)
        except aiomqtt.MqttError as exc:
            self._count("uplink_unsent")
            self._log.warning("uplink_unsent", topic=topic.rsplit("/", 1)[-1], error=str(exc))
            return False
        return True

    async def _stats(self) -> None:
        while not await sleep_or_stop(self._stopping, self.config.stats_interval_s):
            try:
                await self._act(await self._handle(Stats(**self._times())))
            except Exception as exc:
                self._log.error("stats_failed", error=type(exc).__name__)
                continue
            self._log.info(
                "fog_stats",
                queued=self._intents.qsize(),
                **self.counters,
                **self._answer_time.take("answer_ms"),
                **self._store_time.take("store_ms"),
            )


def _settle(future: "asyncio.Future[Result]", result: Result) -> None:
    if not future.done():
        future.set_result(result)


def _payload_max(kind: Kind) -> int:
    """A batch offered by a peer is as large as a batch, a peer's seen has a limit of its own
    (docs/protocol.md 17.4); everything else is trust-sized."""
    if kind is Kind.GOSSIP_BATCH:
        return limits.BATCH_WIRE_BYTES_MAX
    return SEEN_ENVELOPE_BYTES_MAX if kind is Kind.GOSSIP_SEEN else TRUST_PAYLOAD_BYTES_MAX


@dataclasses.dataclass(slots=True)
class _Order:
    """A group checked by the verify workers: their answer, the previous group's hand-over
    to the core (None: the first), and this group's (set once its input is on its way)."""

    verdicts: "asyncio.Future[list[bool]]"
    after: "asyncio.Future[None] | None"
    handed: "asyncio.Future[None]"


class _HandoffPublisher(Publisher):
    """``broker.handoff``: the fog's QoS 1 messages (receipts, vouchers, uplink) handed to
    the embedded broker on this loop (``EmbeddedBroker.deliver``) instead of sent through the
    fog's own connection; retained ones still go through it, since amqtt's internal
    broadcast keeps nothing. Called where ``Publisher.publish`` was, so a receipt still
    leaves only after its group committed."""

    def __init__(self, client: aiomqtt.Client, broker: "EmbeddedBroker") -> None:
        super().__init__(client, in_flight_max=INFLIGHT_MESSAGES_MAX, timeout_s=PUBLISH_TIMEOUT_S)
        self._broker = broker

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        if retain:
            await super().publish(topic, payload, retain=retain)
            return
        try:
            await self._broker.deliver(topic, payload)
        except Exception as exc:  # amqtt's BrokerError: a publish failure to the callers
            raise aiomqtt.MqttError(f"embedded broker: {exc}") from exc
