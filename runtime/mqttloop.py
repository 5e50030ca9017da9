"""The one MQTT shell of the project: how every client of ours is made (fog daemon, cloud
service, sandbox mirror, device SDK and tools) and how a long-lived one stays connected.

- ``new_client``: an aiomqtt client with TCP_NODELAY (a receipt or an intent is one small
  packet: Nagle plus delayed ACKs added ~35 ms to each), explicit limits and a deadline.
- ``run_connected``: aiomqtt's documented reconnect pattern ("catch MqttError, back off,
  connect again") with capped, jittered backoff and a bound on consecutive failures.
- ``read_until_stopped``, ``sleep_or_stop``: the read loop and the interruptible wait.
"""

import asyncio
import contextlib
import random
import socket
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Final

import aiomqtt

RECONNECT_BACKOFF_S_MIN: Final = 0.1
RECONNECT_BACKOFF_S_MAX: Final = 5.0
BACKOFF_DOUBLINGS_MAX: Final = 16
TCP_NODELAY_OPTION: Final = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
CONNECT_TIMEOUT_S: Final = 5.0
KEEPALIVE_S: Final = 30


def new_client(
    *,
    hostname: str,
    port: int,
    identifier: str,
    username: str | None = None,
    password: str | None = None,
    clean_session: bool = True,
    keepalive: int = KEEPALIVE_S,
    timeout: float = CONNECT_TIMEOUT_S,
    max_inflight_messages: int | None = None,
    max_queued_incoming_messages: int | None = None,
    pending_calls_threshold: int | None = None,
) -> aiomqtt.Client:
    """An MQTT 3.1.1 client with TCP_NODELAY set on its socket; nothing is sent until it is
    entered (``async with``)."""
    client = aiomqtt.Client(
        hostname=hostname,
        port=port,
        username=username,
        password=password,
        identifier=identifier,
        clean_session=clean_session,
        keepalive=keepalive,
        timeout=timeout,
        max_inflight_messages=max_inflight_messages,
        max_queued_incoming_messages=max_queued_incoming_messages,
        socket_options=(TCP_NODELAY_OPTION,),
    )
    if pending_calls_threshold is not None:  # aiomqtt warns past this many unfinished calls
        client.pending_calls_threshold = pending_calls_threshold
    return client


async def run_connected(
    *,
    connect: Callable[[], aiomqtt.Client],
    session: Callable[[aiomqtt.Client], Awaitable[None]],
    stopping: asyncio.Event,
    attempts_max: int,
    on_lost: Callable[[aiomqtt.MqttError, float], None],
) -> None:
    """Enter a fresh client from ``connect()`` and run ``session(client)`` on it until the
    session returns (done) or ``stopping`` is set; when the connection fails or drops, call
    ``on_lost(error, retry_s)``, wait a jittered, growing delay, and connect again. More than
    ``attempts_max`` consecutive failures raise the last ``MqttError`` (the service manager
    restarts the daemon); a session that connected resets the count."""
    failures = 0
    while not stopping.is_set():
        try:
            async with connect() as client:
                failures = 0
                await session(client)
                return
        except aiomqtt.MqttError as exc:
            failures += 1
            if failures > attempts_max:
                raise
            delay = reconnect_delay_s(failures)
            on_lost(exc, delay)
            await sleep_or_stop(stopping, delay)


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
