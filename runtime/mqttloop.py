"""The pieces of the MQTT shell (``runtime/mqttshell.py``) that a session uses too: the
jittered reconnect delay, the read loop that ends on stop, the interruptible wait."""

import asyncio
import contextlib
import random
from collections.abc import Coroutine
from typing import Any, Final

RECONNECT_BACKOFF_S_MIN: Final = 0.1
RECONNECT_BACKOFF_S_MAX: Final = 5.0
BACKOFF_DOUBLINGS_MAX: Final = 16


def reconnect_delay_s(failures: int) -> float:
    """Seconds to wait after ``failures`` consecutive failed connections: doubling from 0.1 s,
    capped at 5 s, then scaled by a random factor in [0.5, 1] so that clients that lost the
    same broker do not come back in lockstep."""
    assert failures >= 1
    delay: float = min(
        RECONNECT_BACKOFF_S_MAX,
        RECONNECT_BACKOFF_S_MIN * 2 ** min(failures, BACKOFF_DOUBLINGS_MAX),
    )
    return delay * random.uniform(0.5, 1.0)


async def sleep_or_stop(stopping: asyncio.Event, seconds: float) -> bool:
    """Sleep ``seconds``, or less if ``stopping`` is set; returns whether it is set."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await stopping.wait()
    return stopping.is_set()


async def read_until_stopped(
    reading: Coroutine[Any, Any, None], stopping: asyncio.Event, *, name: str
) -> None:
    """Run ``reading`` (a client's message loop) until it ends or ``stopping`` is set.

    Both tasks are reaped either way. An exception of the reader (aiomqtt.MqttError when the
    connection drops) is raised again, for the caller's reconnect loop.
    """
    reader = asyncio.create_task(reading, name=f"{name}.reader")
    waiter = asyncio.create_task(stopping.wait(), name=f"{name}.stop")
    try:
        await asyncio.wait({reader, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (reader, waiter):
            task.cancel()
        await asyncio.gather(reader, waiter, return_exceptions=True)
    if not reader.cancelled():
        exc = reader.exception()
        if exc is not None:
            raise exc
