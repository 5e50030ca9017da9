"""Load generator of bench/fog.py: publishes pre-signed intents and times their receipts.

One aiomqtt connection publishes intents (QoS 1) and subscribes to the receipt topics. A
receipt is matched to the oldest outstanding intent of its device (both the fog and the
baseline answer each device's intents in order). Two modes:
- saturation: keep ``window`` intents outstanding and count receipts per second;
- paced: offer ``rate`` intents/s on a fixed schedule and record each latency.
"""

import asyncio
import collections
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import aiomqtt

from protocol.codec import unpack_strict

PUBLISH_INFLIGHT_MAX = 1000
DRAIN_S_MAX = 10.0


@dataclass
class LoadResult:
    sent: int = 0
    received: int = 0
    received_in_window: int = 0  # receipts that arrived before the sending deadline
    elapsed_s: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    statuses: collections.Counter[str] = field(default_factory=collections.Counter)

    @property
    def per_s(self) -> float:
        """Receipts per second while the load was on (saturation throughput)."""
        return self.received_in_window / self.elapsed_s if self.elapsed_s else 0.0

    def percentile_ms(self, p: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        xs = sorted(self.latencies_ms)
        return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


@dataclass(frozen=True)
class Shot:
    topic: str
    payload: bytes
    device_hex: str


def receipt_status(payload: bytes) -> str:
    """'ok', 'declined:<reason>' or 'other' (the baseline's fixed payload)."""
    try:
        env = unpack_strict(payload, bytes_max=1024, items_max=4)
        body = unpack_strict(env[1], bytes_max=1024)
        return "ok" if body["s"] == "ok" else f"declined:{body.get('r')}"
    except Exception:
        return "other"


async def run(
    host: str,
    port: int,
    fog_id: str,
    shots: Sequence[Shot],
    *,
    rate: float | None,
    window: int = 500,
    duration_s: float = 5.0,
    username: str | None = None,
    password: str | None = None,
) -> LoadResult:
    result = LoadResult()
    outstanding: dict[str, collections.deque[float]] = collections.defaultdict(collections.deque)
    room = asyncio.Semaphore(window)
    async with aiomqtt.Client(
        host,
        port,
        username=username,
        password=password,
        max_inflight_messages=PUBLISH_INFLIGHT_MAX,
        socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
        timeout=30,
    ) as client:
        client.pending_calls_threshold = window * 2  # many publishes in flight is the point
        receipt_prefix = f"fogpay/1/{fog_id}/receipt/"
        await client.subscribe(f"{receipt_prefix}+", qos=1)

        async def receive() -> None:
            async for message in client.messages:
                now = time.perf_counter()
                topic = str(message.topic)
                if not topic.startswith(receipt_prefix):
                    continue  # amqtt delivers retained messages of topics nobody subscribed to
                device_hex = topic[len(receipt_prefix) :]
                queue = outstanding.get(device_hex)
                if not queue:
                    continue
                result.latencies_ms.append((now - queue.popleft()) * 1000)
                assert isinstance(message.payload, bytes)
                result.statuses[receipt_status(message.payload)] += 1
                result.received += 1
                if now <= deadline:
                    result.received_in_window += 1
                room.release()

        start = time.perf_counter()
        deadline = start + duration_s
        receiver = asyncio.create_task(receive())
        publishes: set[asyncio.Task[None]] = set()
        for i, shot in enumerate(shots):
            if rate is not None:
                delay = start + i / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            if time.perf_counter() >= deadline:
                break
            await room.acquire()
            outstanding[shot.device_hex].append(time.perf_counter())
            task = asyncio.create_task(client.publish(shot.topic, shot.payload, qos=1))
            publishes.add(task)
            task.add_done_callback(publishes.discard)
            result.sent += 1
        result.elapsed_s = time.perf_counter() - start
        drain_until = time.perf_counter() + DRAIN_S_MAX
        while result.received < result.sent and time.perf_counter() < drain_until:  # noqa: ASYNC110
            await asyncio.sleep(0.01)  # receipts come from the receiver task; poll, bounded
        receiver.cancel()
        await asyncio.gather(receiver, *publishes, return_exceptions=True)
    return result
