"""The reconnect delay and read-until-stopped shape under the MQTT shell (runtime/mqttshell.py)."""

import asyncio

import pytest

from runtime.mqttloop import (
    RECONNECT_BACKOFF_S_MAX,
    RECONNECT_BACKOFF_S_MIN,
    read_until_stopped,
    reconnect_delay_s,
    sleep_or_stop,
)


def test_reconnect_delay_doubles_is_capped_and_jittered() -> None:
    for failures in range(1, 40):
        expected = min(RECONNECT_BACKOFF_S_MAX, RECONNECT_BACKOFF_S_MIN * 2 ** min(failures, 16))
        delays = {reconnect_delay_s(failures) for _ in range(50)}
        assert all(expected / 2 <= d <= expected for d in delays)
        assert len(delays) > 1  # jitter: clients that lost one broker do not return in step
    assert max(reconnect_delay_s(1000) for _ in range(50)) <= RECONNECT_BACKOFF_S_MAX


async def test_read_until_stopped_raises_what_the_reader_raised() -> None:
    class Dropped(Exception):
        pass

    async def reader() -> None:
        await asyncio.sleep(0)
        raise Dropped

    with pytest.raises(Dropped):
        await read_until_stopped(reader(), asyncio.Event(), name="t")


async def test_read_until_stopped_returns_when_stopping_and_cancels_the_reader() -> None:
    stopping = asyncio.Event()
    cancelled = asyncio.Event()

    async def reader() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    asyncio.get_running_loop().call_later(0.01, stopping.set)
    async with asyncio.timeout(5):
        await read_until_stopped(reader(), stopping, name="t")
    assert cancelled.is_set()


async def test_sleep_or_stop() -> None:
    stopping = asyncio.Event()
    assert await sleep_or_stop(stopping, 0.001) is False
    stopping.set()
    async with asyncio.timeout(5):
        assert await sleep_or_stop(stopping, 30) is True
