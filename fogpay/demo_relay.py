"""Stopgap uplink for the demo and the sandbox while the fog has none of its own: publish
the fog's sealed, unacked batches on ``fogpay/1/up/{fog_id}/batch``, as the fog's uplink
will.

It reads the fog's SQLite file read-only (WAL lets a reader run beside the fog's writer) with
``fog.batcher.unacked``, publishes each batch once (QoS 1), and again if it is still unacked
``RESEND_S`` later (the cloud answers a duplicate with the same ack). The acks travel back
to the fog on the spec's retained ack topic, where the fog applies them itself.
"""

import asyncio
import contextlib
import sqlite3
import time
from pathlib import Path
from typing import Final

import aiomqtt
import structlog

from fog.batcher import SealedBatch, unacked
from protocol import topics

log = structlog.get_logger()

POLL_S: Final = 0.2
RESEND_S: Final = 3.0
PUBLISH_TIMEOUT_S: Final = 5.0
BATCHES_PER_POLL_MAX: Final = 64


def _unacked(db: Path) -> list[SealedBatch]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5.0)
    try:
        return unacked(conn)[:BATCHES_PER_POLL_MAX]
    finally:
        conn.close()


class BatchRelay:
    def __init__(self, *, db: Path, fog_id: str, client: aiomqtt.Client) -> None:
        self._db, self._fog_id, self._client = db, fog_id, client
        self._sent: dict[int, float] = {}  # batch number -> monotonic time last published
        self._stopping = asyncio.Event()
        self.published = 0

    async def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        while not self._stopping.is_set():
            try:
                await self._poll()
            except (sqlite3.Error, aiomqtt.MqttError) as exc:
                log.warning("relay_failed", fog_id=self._fog_id, error=type(exc).__name__)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(POLL_S):
                    await self._stopping.wait()

    async def _poll(self) -> None:
        batches = await asyncio.to_thread(_unacked, self._db)
        now = time.monotonic()
        live = {b.number for b in batches}
        self._sent = {n: t for n, t in self._sent.items() if n in live}
        topic = topics.batch_topic(self._fog_id)
        for b in batches:
            if now - self._sent.get(b.number, -RESEND_S) < RESEND_S:
                continue
            await self._client.publish(topic, b.wire, qos=1, timeout=PUBLISH_TIMEOUT_S)
            self._sent[b.number] = now
            self.published += 1
            log.info("batch_relayed", fog_id=self._fog_id, batch=b.number)
