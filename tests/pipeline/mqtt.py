"""Test helpers for the pipeline: run a real CloudService, watch retained topics, wait
(bounded) for conditions. Real brokers, real stores; nothing of ours is replaced."""

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Final

import aiomqtt

from cloud.service import CloudService

READY_TIMEOUT_S: Final = 15.0
STOP_TIMEOUT_S: Final = 15.0
WAIT_TIMEOUT_S: Final = 20.0
POLL_S: Final = 0.02


async def wait_for(predicate: Callable[[], bool], *, timeout_s: float = WAIT_TIMEOUT_S) -> None:
    """Poll ``predicate`` until true; TimeoutError after ``timeout_s``."""
    async with asyncio.timeout(timeout_s):
        while not predicate():  # noqa: ASYNC110 (counters have no event to await)
            await asyncio.sleep(POLL_S)


@contextlib.asynccontextmanager
async def running_service(service: CloudService) -> AsyncIterator[CloudService]:
    ready = asyncio.Event()
    task = asyncio.create_task(service.run(ready=ready), name="test.cloud")
    try:
        async with asyncio.timeout(READY_TIMEOUT_S):
            waiter = asyncio.create_task(ready.wait())
            done, _ = await asyncio.wait({waiter, task}, return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                waiter.cancel()
                task.result()
                raise AssertionError("cloud service exited before ready")
        yield service
    finally:
        await service.stop()
        async with asyncio.timeout(STOP_TIMEOUT_S):
            await task


class Watcher:
    """Subscribes to ``filters`` and keeps the last payload per topic (b"" once cleared) and
    every message in order."""

    def __init__(self, client: aiomqtt.Client) -> None:
        self.client = client
        self.last: dict[str, bytes] = {}
        self.seen: list[tuple[str, bytes]] = []

    async def reader(self) -> None:
        async for message in self.client.messages:
            payload = bytes(message.payload) if isinstance(message.payload, bytes) else b""
            topic = str(message.topic)
            self.last[topic] = payload
            self.seen.append((topic, payload))

    def has(self, topic: str) -> bool:
        return bool(self.last.get(topic))


@contextlib.asynccontextmanager
async def watcher(host: str, port: int, filters: Sequence[str]) -> AsyncIterator[Watcher]:
    async with aiomqtt.Client(host, port, timeout=10) as client:
        w = Watcher(client)
        await client.subscribe([(f, 1) for f in filters])
        task = asyncio.create_task(w.reader(), name="test.watcher")
        try:
            yield w
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await task


async def publish(host: str, port: int, items: Sequence[tuple[str, bytes]]) -> None:
    """Publish raw bytes (QoS 1, not retained), in order, on one connection."""
    async with aiomqtt.Client(host, port, timeout=10) as client:
        for topic, payload in items:
            await client.publish(topic, payload, qos=1, timeout=10)
