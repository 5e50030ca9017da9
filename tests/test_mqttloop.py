"""The one MQTT shell: client factory, reconnect loop and read-until-stopped shape shared by
the fog, the cloud, the mirror and the device tools."""

import asyncio
import socket

import aiomqtt
import pytest

from runtime.mqttloop import (
    RECONNECT_BACKOFF_S_MAX,
    RECONNECT_BACKOFF_S_MIN,
    new_client,
    read_until_stopped,
    reconnect_delay_s,
    run_connected,
    sleep_or_stop,
)
from tests.conftest import BrokerEndpoint, free_port


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


def _nodelay(client: aiomqtt.Client) -> int:
    sock = client._client.socket()  # paho's socket under aiomqtt
    assert sock is not None
    value: int = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    return value


async def test_new_client_sets_tcp_nodelay_on_the_connected_socket(
    amqtt_broker: BrokerEndpoint,
) -> None:
    client = new_client(hostname=amqtt_broker.host, port=amqtt_broker.port, identifier="t-nd")
    async with asyncio.timeout(10), client:
        assert _nodelay(client) != 0
        await client.publish("t/nodelay", b"x", qos=1)


async def test_run_connected_gives_up_after_attempts_max_with_a_delay_each_time() -> None:
    port = free_port()  # nothing listens there
    lost: list[float] = []

    def connect() -> aiomqtt.Client:
        return new_client(hostname="127.0.0.1", port=port, identifier="t-refused", timeout=1)

    async def session(client: aiomqtt.Client) -> None:
        raise AssertionError("no broker: the session never runs")

    with pytest.raises(aiomqtt.MqttError):
        async with asyncio.timeout(30):
            await run_connected(
                connect=connect,
                session=session,
                stopping=asyncio.Event(),
                attempts_max=2,
                on_lost=lambda exc, delay: lost.append(delay),
            )
    assert len(lost) == 2  # two waits, the third failure raises
    assert all(0 < d <= RECONNECT_BACKOFF_S_MAX for d in lost)


async def test_run_connected_reconnects_after_the_session_drops(
    amqtt_broker: BrokerEndpoint,
) -> None:
    sessions = 0
    lost: list[str] = []

    def connect() -> aiomqtt.Client:
        return new_client(hostname=amqtt_broker.host, port=amqtt_broker.port, identifier="t-rc")

    async def session(client: aiomqtt.Client) -> None:
        nonlocal sessions
        sessions += 1
        assert _nodelay(client) != 0
        if sessions == 1:
            raise aiomqtt.MqttError("dropped")  # what a lost connection raises in the reader
        await client.publish("t/again", b"x", qos=1)

    async with asyncio.timeout(30):
        await run_connected(
            connect=connect,
            session=session,
            stopping=asyncio.Event(),
            attempts_max=3,
            on_lost=lambda exc, delay: lost.append(str(exc)),
        )
    assert sessions == 2
    assert lost == ["dropped"]


async def test_run_connected_does_not_connect_once_stopping() -> None:
    stopping = asyncio.Event()
    stopping.set()

    def connect() -> aiomqtt.Client:
        raise AssertionError("stopping: no connection is made")

    async def session(client: aiomqtt.Client) -> None:
        raise AssertionError

    await run_connected(
        connect=connect, session=session, stopping=stopping, attempts_max=1, on_lost=print
    )
