"""runtime/mqttshell.py against a real broker on 127.0.0.1: subscribed before the session,
TCP_NODELAY on the socket, bounded reconnects with the delays reported, a stop ends it."""

import asyncio
import socket

import aiomqtt
import pytest

from runtime.mqttshell import ClientSettings, Publisher, client_for, serve
from tests.conftest import BrokerEndpoint, free_port

TOPIC = "fogpay-test/shell/echo"


def settings(port: int, **kw: object) -> ClientSettings:
    return ClientSettings(
        hostname="127.0.0.1",
        port=port,
        identifier_prefix="shell-test",
        connect_timeout_s=2.0,
        **kw,  # type: ignore[arg-type]
    )


async def test_a_session_is_subscribed_and_its_socket_has_no_nagle(
    amqtt_broker: BrokerEndpoint,
) -> None:
    got: list[bytes] = []
    nodelay: list[int] = []

    async def session(client: aiomqtt.Client) -> None:
        sock = client._client.socket()
        assert isinstance(sock, socket.socket)
        nodelay.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        await client.publish(TOPIC, b"ping", qos=1, timeout=5)
        async for message in client.messages:
            assert isinstance(message.payload, bytes)
            got.append(message.payload)
            return

    async def lost(exc: aiomqtt.MqttError, delay_s: float) -> None:
        raise AssertionError(f"lost: {exc}")

    async with asyncio.timeout(15):
        await serve(
            settings(amqtt_broker.port),
            [TOPIC],
            stopping=asyncio.Event(),
            session=session,
            lost=lost,
        )
    assert got == [b"ping"] and nodelay and nodelay[0] != 0


async def test_failed_connections_are_reported_and_bounded() -> None:
    port = free_port()  # nothing listens here
    delays: list[float] = []

    async def session(client: aiomqtt.Client) -> None:
        raise AssertionError("connected to nothing")

    async def lost(exc: aiomqtt.MqttError, delay_s: float) -> None:
        delays.append(delay_s)

    async with asyncio.timeout(30):
        with pytest.raises(aiomqtt.MqttError):
            await serve(
                settings(port, failures_max=2),
                [TOPIC],
                stopping=asyncio.Event(),
                session=session,
                lost=lost,
            )
    assert len(delays) == 2 and all(0 < d <= 5 for d in delays)


async def test_a_stop_ends_the_retries() -> None:
    stopping = asyncio.Event()
    calls = 0

    async def session(client: aiomqtt.Client) -> None:
        raise AssertionError("connected to nothing")

    async def lost(exc: aiomqtt.MqttError, delay_s: float) -> None:
        nonlocal calls
        calls += 1
        stopping.set()

    async with asyncio.timeout(30):
        await serve(
            settings(free_port()),
            [TOPIC],
            stopping=stopping,
            session=session,
            lost=lost,
        )
    assert calls == 1


async def test_the_publisher_bounds_what_is_in_flight_and_every_message_arrives(
    amqtt_broker: BrokerEndpoint,
) -> None:
    topic = "fogpay-test/shell/bounded"
    count, bound = 200, 8
    async with aiomqtt.Client("127.0.0.1", amqtt_broker.port, identifier="shell-sub") as sub:
        await sub.subscribe(topic, qos=1)
        publisher_client = client_for(settings(amqtt_broker.port, inflight_max=100))
        async with asyncio.timeout(30), publisher_client:
            publisher = Publisher(publisher_client, in_flight_max=bound, timeout_s=5)
            items = [(topic, i.to_bytes(2, "big")) for i in range(count)]
            assert await publisher.publish_all(items) == [None] * count
            assert 1 < publisher.peak <= bound  # concurrent, and never past the bound
        got: set[bytes] = set()
        async with asyncio.timeout(30):
            async for message in sub.messages:
                assert isinstance(message.payload, bytes)
                got.add(message.payload)
                if len(got) == count:
                    break
        assert got == {p for _, p in items}


async def test_the_publisher_reports_a_failure_per_message_after_the_connection_is_gone(
    amqtt_broker: BrokerEndpoint,
) -> None:
    client = client_for(settings(amqtt_broker.port))
    async with asyncio.timeout(30):
        async with client:
            publisher = Publisher(client, in_flight_max=4, timeout_s=2)
        results = await publisher.publish_all([("fogpay-test/shell/gone", b"x")] * 3)
    assert len(results) == 3 and all(isinstance(r, aiomqtt.MqttError) for r in results)
