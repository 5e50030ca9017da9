"""The fog's uplink window: which sealed batches to publish to the cloud, and when again.

Batches go up on ``fogpay/1/up/{fog_id}/batch`` (QoS 1) in order, at most ``window`` unacked
ones in flight. The cloud answers with a retained, issuer-signed ack naming the highest batch
it holds with all earlier ones; the daemon applies it to the store, which marks batches acked
(acks only move forward). Go-back-N: when no ack has moved for ``ack_timeout_ms`` since the
first unacked batch was sent, everything from the first unacked batch is sent again, and the
wait doubles for each such silent round (to ``ACK_WAIT_MS_MAX``), back to ``ack_timeout_ms``
once an ack moves; everything is sent again after every reconnect (a QoS 1 delivery to a
broker is not a delivery to the cloud). Sending a batch twice costs nothing: the cloud books a
batch once (a duplicate is answered with the current ack) and holds one that arrives early
until the gap before it fills.

An ack does not delete anything at once: records go later, once old enough and their lease
closed (``FogStore.prune``, ``batch.keep_acked_ms``), so a retransmitted intent still gets its
stored receipt meanwhile.

``Window`` is pure (the clock is passed in). ``Uplink`` is the daemon's ``fog.uplink`` task
around it; ``Link`` is what that task and the lease task (``fog.leasing.LeaseKeeper``) share
with the daemon: its store thread, its one MQTT client, its counters, its log.
"""

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final

import aiomqtt

from fog.config import UplinkConfig
from fog.store import FogStore
from protocol import topics

WINDOW_MAX: Final = 64  # the cloud holds at most 64 batches ahead of its chain
RESENDS_MAX: Final = 1_000_000  # go-back-N rounds counted (a counter, not a stop)
ACK_WAIT_MS_MAX: Final = 300_000  # the wait for an ack doubles per silent round, to this
PUBLISH_TIMEOUT_S: Final = 5.0
TICK_S_MAX: Final = 1.0


def mono_ms() -> int:
    """For resend timers: elapsed time, whatever the wall clock does."""
    return time.monotonic_ns() // 1_000_000


@dataclass(slots=True)
class Window:
    """Which unacked batches to send now. ``plan`` is given the first ``window`` unacked
    batch numbers, ascending, and returns those to publish (marking them sent)."""

    window: int
    ack_timeout_ms: int
    sent: dict[int, int] = field(default_factory=dict)  # batch number -> time sent (ms)
    first_unacked: int | None = None
    progress_ms: int = 0  # when the first unacked batch last changed or was (re)sent
    resends: int = 0
    wait_ms: int = 0  # the current wait for an ack: ack_timeout_ms, doubled per silent round

    def __post_init__(self) -> None:
        assert 1 <= self.window <= WINDOW_MAX and self.ack_timeout_ms > 0
        self.wait_ms = self.ack_timeout_ms

    def plan(self, unacked: list[int], *, now_ms: int) -> list[int]:
        assert unacked == sorted(unacked) and len(unacked) <= self.window
        pending = set(unacked)
        self.sent = {n: t for n, t in self.sent.items() if n in pending}
        first = unacked[0] if unacked else None
        if first != self.first_unacked:  # an ack moved (or the first batch was sealed)
            self.first_unacked, self.progress_ms = first, now_ms
            self.wait_ms = self.ack_timeout_ms
        elif first is not None and first in self.sent:
            if now_ms - self.progress_ms >= self.wait_ms:
                self.sent.clear()  # no ack moved: go back to the first unacked
                self.resends = min(self.resends + 1, RESENDS_MAX)
                # the cloud or the link is down: don't flood a bridge's queue with copies
                self.wait_ms = min(ACK_WAIT_MS_MAX, max(self.wait_ms * 2, self.ack_timeout_ms))
        out = [n for n in unacked if n not in self.sent]
        for n in out:
            self.sent[n] = now_ms
        if first is not None and first in out:
            self.progress_ms = now_ms
        return out

    def reset(self) -> None:
        """After a reconnect: everything unacked is sent again, and acks are awaited afresh."""
        self.sent.clear()
        self.wait_ms = self.ack_timeout_ms

    def failed(self, number: int) -> None:
        """Publishing ``number`` failed: it is sent again at the next plan."""
        self.sent.pop(number, None)


@dataclass(slots=True)
class Link:
    """The daemon's pieces the uplink and lease tasks use."""

    fog_id: str
    call: Callable[..., Awaitable[Any]]  # run a store method on the daemon's store thread
    client: Callable[[], aiomqtt.Client | None]  # the connected client, if any
    count: Callable[..., None]  # count(name, n=1)
    log: Any  # the daemon's bound structlog logger
    stopping: asyncio.Event

    async def publish(self, topic: str, payload: bytes) -> bool:
        """QoS 1, not retained, with a deadline; False (counted, logged) when it failed."""
        client = self.client()
        if client is None:
            self.count("uplink_unsent")
            return False
        try:
            await client.publish(topic, payload, qos=1, timeout=PUBLISH_TIMEOUT_S)
        except aiomqtt.MqttError as exc:
            self.count("uplink_unsent")
            self.log.warning("uplink_unsent", topic=topic.rsplit("/", 1)[-1], error=str(exc))
            return False
        return True

    async def wait(self, wake: asyncio.Event, seconds: float) -> bool:
        """Wait for ``wake`` (then clear it) or ``seconds``; True at once when stopping."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                stopping = asyncio.create_task(self.stopping.wait())
                woken = asyncio.create_task(wake.wait())
                try:
                    await asyncio.wait({stopping, woken}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    stopping.cancel()
                    woken.cancel()
        wake.clear()
        return self.stopping.is_set()


class Uplink:
    """The ``fog.uplink`` task: publishes what ``Window`` says, woken by seals, acks and
    reconnects (``wake``, ``reconnected``), and at least every tick."""

    def __init__(self, link: Link, config: UplinkConfig) -> None:
        self._link = link
        self._window = Window(window=config.window, ack_timeout_ms=config.ack_timeout_ms)
        self._tick_s = min(TICK_S_MAX, config.ack_timeout_ms / 4000)
        self._wake = asyncio.Event()
        # Wires of batches just sealed, so their first send needs no store call: rebuilding
        # a batch from the log holds the store thread for milliseconds, and authorizations
        # queue behind it. Bounded; a resend or a batch not kept here is read from the store.
        self._fresh: dict[int, bytes] = {}
        self._fresh_max = config.window

    def wake(self) -> None:
        self._wake.set()

    def sealed(self, number: int, wire: bytes) -> None:
        """Batch ``number`` was sealed with these bytes: keep them for its first send."""
        self._fresh[number] = wire
        while len(self._fresh) > self._fresh_max:
            del self._fresh[min(self._fresh)]
        self._wake.set()

    def reconnected(self) -> None:
        """What went to the old connection may not have reached the cloud: all again."""
        self._window.reset()
        self._wake.set()

    async def run(self, store: FogStore) -> None:
        link = self._link
        while not await link.wait(self._wake, self._tick_s):
            if link.client() is None:
                continue
            try:
                numbers = await link.call(store.unacked_numbers, self._window.window)
                if numbers:  # acked batches leave the cache
                    for n in [n for n in self._fresh if n < numbers[0]]:
                        del self._fresh[n]
                for number in self._window.plan(numbers, now_ms=mono_ms()):
                    await self._send(store, number)
            except Exception as exc:  # the seam: the uplink retries at the next tick
                link.count("uplink_failed")
                link.log.error("uplink_failed", error=type(exc).__name__)

    async def _send(self, store: FogStore, number: int) -> None:
        link = self._link
        wire = self._fresh.pop(number, None)
        if wire is None:
            wire = await link.call(store.batch_wire, number)
        assert wire is not None, "an unacked batch is not in the store"
        if await link.publish(topics.batch_topic(link.fog_id), wire):
            link.count("batch_sent")
            link.log.info("batch_sent", batch=number, size=len(wire))
        else:
            self._window.failed(number)
