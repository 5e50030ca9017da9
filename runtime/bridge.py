"""An MQTT bridge between two brokers, for the embedded (amqtt) default, which has none.

Production joins a fog's Mosquitto to the cloud's with Mosquitto's own bridge
(``deploy/mosquitto/fogpay-bridge.conf``); a fog on its embedded amqtt broker (the demo, a
sandbox, a lab) has no such thing, so ``Bridge`` does the same job with two aiomqtt clients:
one on the *local* broker (the fog's), one on the *remote* one (the cloud's hub). Each
``Rule`` names a topic filter and a direction: ``out`` (local -> remote) or ``in``
(remote -> local), as a Mosquitto ``topic`` line does.

- QoS 1 both ways: a message is forwarded when the other broker acknowledged it (PUBACK);
  until then it stays first in its side's queue, across reconnections. The queues live in
  memory: a bridge that stops (or its process dies) loses what waits in them; its source
  broker acknowledged them already, so only the senders' own retransmission (the uplink's
  go-back-N, replica resends) brings them again, as it does after any lost message.
- The retained flag is kept as received. amqtt (MQTT 3.1.1, no "retain as published") clears
  it on live delivery and sets it only on the copies a new subscription gets; a rule with
  ``retain=True`` therefore publishes every message of its filter retained: use it only for
  topics the protocol always publishes retained (trust material, leases, acks).
- Reconnects on each side independently with ``runtime.mqttloop``'s jittered backoff; what
  arrives meanwhile on the other side waits in a bounded queue (``queue_max`` per direction;
  past it the oldest is dropped, counted and logged ``bridge_dropped``: the fog's uplink
  resends what the cloud did not ack). Sessions are clean: what the remote side publishes
  while the link is down reaches the fog only if retained (acks, leases, trust: the
  protocol's state is retained, the rest is resent by its sender).
- No echo: MQTT 3.1.1 has no "no local", so a message the bridge publishes on a broker comes
  back to it when one of its own filters there matches (``gossip/+/# out`` with
  ``gossip/FOG/# in``). The bridge remembers what it published (bounded) and drops that copy
  once, as Mosquitto's bridges do.
- ``pause()`` cuts the remote link (closes its connection and keeps it closed) until
  ``resume()``: the demo's partition. The local side stays connected and queues.

Log events: ``bridge_connected`` (side, url), ``bridge_down`` (side, error, retry_s; also on
``pause``), ``bridge_forwarded`` (counted: every ``stats_interval_s`` when something moved,
and at stop), ``bridge_dropped`` (a queue overflowed; once per episode).
"""

import asyncio
import collections
import contextlib
import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

import aiomqtt
import structlog

from runtime.mqttloop import reconnect_delay_s, sleep_or_stop
from runtime.mqttshell import QOS, ClientSettings, client_for, connect_client

log = structlog.get_logger()

Direction = Literal["in", "out"]
QUEUE_MAX_DEFAULT: Final = 10_000
ECHOES_MAX: Final = 10_000  # remembered publications that may come back (per side)
PUBLISH_TIMEOUT_S: Final = 10.0
STATS_INTERVAL_S: Final = 5.0
LOCAL: Final = "local"
REMOTE: Final = "remote"


@dataclass(frozen=True, slots=True)
class Rule:
    """One topic filter and its direction: ``out`` local -> remote, ``in`` remote -> local."""

    filter: str
    direction: Direction
    retain: bool = False  # True: publish retained whatever the flag received (see module)

    def __post_init__(self) -> None:
        assert self.direction in ("in", "out"), self.direction
        assert self.filter and "\x00" not in self.filter


@dataclass(frozen=True, slots=True, kw_only=True)
class BridgeConfig:
    name: str  # for log lines and client ids
    local: ClientSettings
    remote: ClientSettings
    rules: tuple[Rule, ...]
    queue_max: int = QUEUE_MAX_DEFAULT  # messages waiting per direction
    stats_interval_s: float = STATS_INTERVAL_S

    def __post_init__(self) -> None:
        assert self.rules and self.queue_max >= 1 and self.stats_interval_s > 0


def _digest(topic: str, payload: bytes) -> bytes:
    return hashlib.blake2b(topic.encode() + b"\x00" + payload, digest_size=16).digest()


@dataclass(slots=True)
class _Side:
    """One broker's connection: what it subscribes to, and what waits to be published on it."""

    name: str  # LOCAL or REMOTE
    settings: ClientSettings
    filters: tuple[str, ...]  # subscribed here: the rules that carry from this side
    queue: collections.deque[tuple[str, bytes, bool]] = field(default_factory=collections.deque)
    ready: asyncio.Event = field(default_factory=asyncio.Event)  # the queue is not empty
    echoes: collections.OrderedDict[bytes, int] = field(default_factory=collections.OrderedDict)
    client: aiomqtt.Client | None = None
    forwarded: int = 0  # published here and acknowledged
    dropped: int = 0
    full: bool = False  # in a queue-overflow episode (logged once)

    def would_echo(self, topic: str) -> bool:
        t = aiomqtt.Topic(topic)
        return any(t.matches(f) for f in self.filters)


class Bridge:
    """Forward messages between two brokers by ``config.rules``; ``run`` until ``stop``."""

    def __init__(self, config: BridgeConfig) -> None:
        self.config = config
        outs = tuple(r.filter for r in config.rules if r.direction == "out")
        ins = tuple(r.filter for r in config.rules if r.direction == "in")
        self._local = _Side(LOCAL, config.local, outs)
        self._remote = _Side(REMOTE, config.remote, ins)
        self._stopping = asyncio.Event()
        self._cut = asyncio.Event()  # set while paused
        self._healed = asyncio.Event()
        self._healed.set()
        self._log = log.bind(bridge=config.name)
        self._ready: asyncio.Event | None = None
        self.counters: collections.Counter[str] = collections.Counter()

    # --- control -------------------------------------------------------------------------

    @property
    def paused(self) -> bool:
        return self._cut.is_set()

    def connected(self, side: str = REMOTE) -> bool:
        return (self._remote if side == REMOTE else self._local).client is not None

    def pause(self) -> None:
        """Cut the remote link until ``resume``: its connection closes now and stays closed."""
        self._healed.clear()
        self._cut.set()
        self._maybe_ready()

    def resume(self) -> None:
        self._cut.clear()
        self._healed.set()

    async def stop(self) -> None:
        self._stopping.set()

    def queued(self, side: str) -> int:
        """Messages waiting to be published on ``side`` (``local`` or ``remote``)."""
        return len((self._remote if side == REMOTE else self._local).queue)

    # --- running -------------------------------------------------------------------------

    async def run(self, *, ready: asyncio.Event | None = None) -> None:
        """Both sides until ``stop``; ``ready`` is set once both are connected the first time
        (the local one alone when paused)."""
        self._ready = ready
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._keep(self._local, self._remote), name="bridge.local")
                tg.create_task(self._keep(self._remote, self._local), name="bridge.remote")
                tg.create_task(self._stats(), name="bridge.stats")
        finally:
            self._log_forwarded()

    def _maybe_ready(self) -> None:
        if self._ready is not None and self.connected(LOCAL):
            if self.connected(REMOTE) or self.paused:
                self._ready.set()

    async def _keep(self, side: _Side, other: _Side) -> None:
        """Keep ``side`` connected (reconnect with backoff) until stopping."""
        failures = 0
        while not self._stopping.is_set():
            if side is self._remote and self._cut.is_set():
                await self._wait_healed()
                continue
            client = client_for(side.settings)
            try:
                await connect_client(client, side.settings)
                try:
                    failures = 0
                    await self._session(client, side, other)
                finally:
                    side.client = None
                    with contextlib.suppress(aiomqtt.MqttError, OSError):
                        await client.__aexit__(None, None, None)
            except (aiomqtt.MqttError, TimeoutError) as exc:  # TimeoutError: a SUBSCRIBE unanswered
                failures += 1
                delay = reconnect_delay_s(failures)
                self._log.warning(
                    "bridge_down",
                    side=side.name,
                    error=str(exc) or type(exc).__name__,
                    retry_s=round(delay, 3),
                )
                await sleep_or_stop(self._stopping, delay)

    async def _wait_healed(self) -> None:
        waiters = [
            asyncio.create_task(self._healed.wait()),
            asyncio.create_task(self._stopping.wait()),
        ]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)

    async def _session(self, client: aiomqtt.Client, side: _Side, other: _Side) -> None:
        async with asyncio.timeout(side.settings.subscribe_timeout_s):
            if side.filters:
                await client.subscribe([(f, QOS) for f in side.filters])
        side.client = client
        self.counters[f"{side.name}_connected"] += 1
        self._maybe_ready()
        self._log.info("bridge_connected", side=side.name, url=side.settings.url)
        reader = asyncio.create_task(self._read(client, side, other), name="bridge.read")
        writer = asyncio.create_task(self._write(client, side), name="bridge.write")
        ends = [asyncio.create_task(self._stopping.wait(), name="bridge.stop")]
        if side is self._remote:
            ends.append(asyncio.create_task(self._cut.wait(), name="bridge.cut"))
        tasks = {reader, writer, *ends}
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for t in (reader, writer):
            if not t.cancelled() and t.exception() is not None:
                raise t.exception()  # type: ignore[misc]
        if side is self._remote and self._cut.is_set() and not self._stopping.is_set():
            self.counters["paused"] += 1
            self._log.warning("bridge_down", side=side.name, error="paused", retry_s=None)

    async def _read(self, client: aiomqtt.Client, side: _Side, other: _Side) -> None:
        direction: Direction = "out" if side is self._local else "in"
        rules = [r for r in self.config.rules if r.direction == direction]
        async for message in client.messages:
            topic = message.topic.value
            payload = message.payload if isinstance(message.payload, bytes) else b""
            key = _digest(topic, payload)
            seen = side.echoes.get(key, 0)
            if seen:  # our own publication, back from a filter of ours
                if seen == 1:
                    del side.echoes[key]
                else:
                    side.echoes[key] = seen - 1
                self.counters["echo_dropped"] += 1
                continue
            rule = next((r for r in rules if message.topic.matches(r.filter)), None)
            if rule is None:  # an overlapping subscription of someone else's: not ours
                continue
            self._enqueue(other, topic, payload, bool(message.retain) or rule.retain)

    def _enqueue(self, side: _Side, topic: str, payload: bytes, retain: bool) -> None:
        if len(side.queue) >= self.config.queue_max:
            side.queue.popleft()
            side.dropped += 1
            if not side.full:
                side.full = True
                self._log.warning("bridge_dropped", side=side.name, queue_max=self.config.queue_max)
        elif side.full and len(side.queue) < self.config.queue_max // 2:
            side.full = False
        side.queue.append((topic, payload, retain))
        side.ready.set()

    async def _write(self, client: aiomqtt.Client, side: _Side) -> None:
        """Publish ``side``'s queue in order, one message acknowledged before the next; a
        message leaves the queue only once acknowledged."""
        while True:
            while not side.queue:
                side.ready.clear()
                await side.ready.wait()
            topic, payload, retain = side.queue[0]
            if side.would_echo(topic):
                key = _digest(topic, payload)
                side.echoes[key] = side.echoes.get(key, 0) + 1
                side.echoes.move_to_end(key)
                while len(side.echoes) > ECHOES_MAX:
                    side.echoes.popitem(last=False)
            await client.publish(topic, payload, qos=QOS, retain=retain, timeout=PUBLISH_TIMEOUT_S)
            if side.queue and side.queue[0][0] == topic and side.queue[0][1] is payload:
                side.queue.popleft()
            side.forwarded += 1

    async def _stats(self) -> None:
        last = (0, 0, 0)
        next_at = time.monotonic() + self.config.stats_interval_s
        while not await sleep_or_stop(self._stopping, max(0.0, next_at - time.monotonic())):
            next_at += self.config.stats_interval_s
            now = self._totals()
            if now != last:
                last = now
                self._log_forwarded()

    def _totals(self) -> tuple[int, int, int]:
        return (
            self._local.forwarded,
            self._remote.forwarded,
            self._local.dropped + self._remote.dropped,
        )

    def _log_forwarded(self) -> None:
        inward, outward, dropped = self._totals()
        self._log.info(
            "bridge_forwarded",
            **{"in": inward, "out": outward},
            dropped=dropped,
            queued_in=len(self._local.queue),
            queued_out=len(self._remote.queue),
        )

    @property
    def forwarded(self) -> dict[str, int]:
        """Messages forwarded so far: ``in`` (remote -> local) and ``out``."""
        return {"in": self._local.forwarded, "out": self._remote.forwarded}


def rules_from(lines: Sequence[str]) -> tuple[Rule, ...]:
    """Rules from Mosquitto-style lines ``FILTER in|out [retain]`` (blank lines and ``#``
    comments skipped); raises ValueError naming the bad line."""
    out: list[Rule] = []
    for line in lines:
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        parts = text.split()
        if len(parts) not in (2, 3) or parts[1] not in ("in", "out"):
            raise ValueError(f"bridge rule {text!r}: want 'FILTER in|out [retain]'")
        if len(parts) == 3 and parts[2] != "retain":
            raise ValueError(f"bridge rule {text!r}: the third word can only be 'retain'")
        direction: Direction = "in" if parts[1] == "in" else "out"
        out.append(Rule(parts[0], direction, retain=len(parts) == 3))
    return tuple(out)
