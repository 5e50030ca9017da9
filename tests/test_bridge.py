"""runtime/bridge.py between two real amqtt brokers on 127.0.0.1: rules in and out with QoS 1,
retained messages arrive retained, overlapping rules do not loop, a cut (pause) queues and a
heal delivers in order, the queue is bounded, a restarted broker is reconnected to."""

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Final

import aiomqtt
import pytest
from amqtt.broker import Broker

from runtime.bridge import Bridge, BridgeConfig, Rule, rules_from
from runtime.mqttshell import ClientSettings
from tests.conftest import BROKER_STOP_TIMEOUT_S, free_port

WAIT_S: Final = 15.0
FOG: Final = "fog-a"
RULES: Final = rules_from(
    [
        "fogpay/1/up/fog-a/batch out",
        "fogpay/1/gossip/+/# out",
        "fogpay/1/held/# out",
        "fogpay/1/trust/# in retain",
        "fogpay/1/up/+/ack in retain",
        "fogpay/1/gossip/fog-a/# in",
        "fogpay/1/held/+/ack in",
    ]
)


def amqtt_config(port: int) -> dict[str, object]:
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }


@contextlib.asynccontextmanager
async def amqtt_at(port: int) -> AsyncIterator[int]:
    broker = Broker(amqtt_config(port))
    await broker.start()
    try:
        yield port
    finally:
        async with asyncio.timeout(BROKER_STOP_TIMEOUT_S):
            await broker.shutdown()


def settings(port: int) -> ClientSettings:
    return ClientSettings(
        hostname="127.0.0.1", port=port, identifier_prefix="bridge-test", connect_timeout_s=2.0
    )


@contextlib.asynccontextmanager
async def bridging(
    local: int, remote: int, rules: tuple[Rule, ...] = RULES, **kw: int
) -> AsyncIterator[Bridge]:
    bridge = Bridge(
        BridgeConfig(name="test", local=settings(local), remote=settings(remote), rules=rules, **kw)
    )
    ready = asyncio.Event()
    task = asyncio.create_task(bridge.run(ready=ready))
    try:
        async with asyncio.timeout(WAIT_S):
            await ready.wait()
        yield bridge
    finally:
        await bridge.stop()
        async with asyncio.timeout(WAIT_S):
            await task


@contextlib.asynccontextmanager
async def client(port: int, *filters: str) -> AsyncIterator[aiomqtt.Client]:
    c = aiomqtt.Client("127.0.0.1", port, identifier=f"t-{free_port()}", timeout=5)
    async with c:
        if filters:
            await c.subscribe([(f, 1) for f in filters])
        yield c


async def collect(c: aiomqtt.Client, count: int, *filters: str) -> list[aiomqtt.Message]:
    """The next ``count`` messages (of ``filters`` only, if given: a plain amqtt broker also
    sends a new session the retained messages of other clients' subscriptions)."""
    got: list[aiomqtt.Message] = []
    async with asyncio.timeout(WAIT_S):
        async for m in c.messages:
            if filters and not any(m.topic.matches(f) for f in filters):
                continue
            got.append(m)
            if len(got) == count:
                return got
    return got


@pytest.fixture
async def two() -> AsyncIterator[tuple[int, int]]:
    async with amqtt_at(free_port()) as local, amqtt_at(free_port()) as remote:
        yield local, remote


async def test_rules_carry_each_way_and_retained_stays_retained(two: tuple[int, int]) -> None:
    local, remote = two
    async with client(remote) as cloud:
        await cloud.publish("fogpay/1/trust/owner/acme", b"cred", qos=1, retain=True)
    async with bridging(local, remote) as bridge:
        async with client(remote, "fogpay/1/up/+/batch") as cloud:
            async with client(local) as fog:
                await fog.publish("fogpay/1/up/fog-a/batch", b"b1", qos=1)
                await fog.publish("fogpay/1/up/fog-b/batch", b"not ours", qos=1)
                await fog.publish("fogpay/1/up/fog-a/batch", b"b2", qos=1)
            got = await collect(cloud, 2, "fogpay/1/up/+/batch")
        assert [m.payload for m in got] == [b"b1", b"b2"]
        async with asyncio.timeout(WAIT_S):
            while bridge.forwarded["in"] < 1:  # noqa: ASYNC110 (a counter)
                await asyncio.sleep(0.01)
        # a new subscriber of the fog's broker gets the trust material retained
        async with client(local, "fogpay/1/trust/#") as late:
            (m,) = await collect(late, 1, "fogpay/1/trust/#")
        assert m.payload == b"cred" and m.retain
        # a live ack at the cloud (delivered unretained by amqtt) is kept retained by the rule
        async with client(remote) as cloud:
            await cloud.publish("fogpay/1/up/fog-b/ack", b"ack-b", qos=1, retain=True)
        async with asyncio.timeout(WAIT_S):
            while bridge.forwarded["in"] < 2:  # noqa: ASYNC110 (a counter)
                await asyncio.sleep(0.01)
        async with client(local, "fogpay/1/up/+/ack") as late:
            (m,) = await collect(late, 1, "fogpay/1/up/+/ack")
        assert m.payload == b"ack-b" and m.retain


async def test_overlapping_rules_do_not_echo(two: tuple[int, int]) -> None:
    """``gossip/+/# out`` and ``gossip/fog-a/# in`` overlap: gossip for fog-a arrives once at
    the fog's broker and is not sent back to the cloud's (it would loop for ever)."""
    local, remote = two
    async with bridging(local, remote) as bridge:
        async with (
            client(local, "fogpay/1/gossip/#", "fogpay/1/held/#") as fog,
            client(remote, "fogpay/1/gossip/#", "fogpay/1/held/#") as cloud,
        ):
            await cloud.publish("fogpay/1/gossip/fog-a/seen", b"s1", qos=1)
            await cloud.publish("fogpay/1/held/" + "ab" * 32 + "/ack", b"h1", qos=1)
            got_fog = await collect(fog, 2)
            # a marker the other way: once the cloud has it, any echo sent earlier is there too
            await fog.publish("fogpay/1/gossip/fog-b/batch", b"to-b", qos=1)
            got_cloud = await collect(cloud, 3)
        assert sorted(m.payload for m in got_fog) == [b"h1", b"s1"]
        assert [m.payload for m in got_cloud] == [b"s1", b"h1", b"to-b"]
        assert bridge.counters["echo_dropped"] == 2
        assert bridge.forwarded == {"in": 2, "out": 1}


async def test_a_cut_queues_and_the_heal_delivers_in_order(two: tuple[int, int]) -> None:
    local, remote = two
    async with bridging(local, remote) as bridge:
        bridge.pause()
        async with asyncio.timeout(WAIT_S):
            while bridge.connected("remote"):  # noqa: ASYNC110 (a flag)
                await asyncio.sleep(0.01)
        async with client(remote, "fogpay/1/up/+/batch") as cloud:
            async with client(local) as fog:
                for i in range(5):
                    await fog.publish("fogpay/1/up/fog-a/batch", b"%d" % i, qos=1)
            async with asyncio.timeout(WAIT_S):
                while bridge.queued("remote") < 5:  # noqa: ASYNC110 (a counter)
                    await asyncio.sleep(0.01)
            assert bridge.forwarded["out"] == 0 and bridge.paused
            bridge.resume()
            got = await collect(cloud, 5, "fogpay/1/up/+/batch")
        assert [m.payload for m in got] == [b"0", b"1", b"2", b"3", b"4"]
        assert bridge.counters["paused"] == 1 and bridge.counters["remote_connected"] == 2


async def test_the_queue_is_bounded_and_keeps_the_newest(two: tuple[int, int]) -> None:
    local, remote = two
    async with bridging(local, remote, queue_max=3) as bridge:
        bridge.pause()
        async with asyncio.timeout(WAIT_S):
            while bridge.connected("remote"):  # noqa: ASYNC110 (a flag)
                await asyncio.sleep(0.01)
        async with client(remote, "fogpay/1/up/+/batch") as cloud:
            async with client(local) as fog:
                for i in range(5):
                    await fog.publish("fogpay/1/up/fog-a/batch", b"%d" % i, qos=1)
            async with asyncio.timeout(WAIT_S):
                while bridge.queued("remote") < 3 or bridge._remote.dropped < 2:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
            bridge.resume()
            got = await collect(cloud, 3, "fogpay/1/up/+/batch")
        assert [m.payload for m in got] == [b"2", b"3", b"4"]


async def test_a_restarted_remote_broker_is_reconnected(two: tuple[int, int]) -> None:
    """The cloud's broker goes away and comes back on its port: what the fog published
    meanwhile waits in the queue and is delivered (retained here, so that the test's
    subscriber, which cannot connect before the broker is back, gets it whenever it comes)."""
    local, _ = two
    port = free_port()
    rules = rules_from(["fogpay/1/up/fog-a/batch out retain"])
    broker = Broker(amqtt_config(port))
    await broker.start()
    try:
        async with bridging(local, port, rules) as bridge:
            async with asyncio.timeout(BROKER_STOP_TIMEOUT_S):
                await broker.shutdown()
            async with asyncio.timeout(WAIT_S):
                while bridge.connected("remote"):  # noqa: ASYNC110 (a flag)
                    await asyncio.sleep(0.01)
            async with client(local) as fog:
                await fog.publish("fogpay/1/up/fog-a/batch", b"while-down", qos=1)
            async with asyncio.timeout(WAIT_S):
                while bridge.queued("remote") < 1:  # noqa: ASYNC110 (a counter)
                    await asyncio.sleep(0.01)
            broker = Broker(amqtt_config(port))
            await broker.start()
            async with client(port, "fogpay/1/up/+/batch") as cloud:
                (got,) = await collect(cloud, 1, "fogpay/1/up/+/batch")
            assert got.payload == b"while-down"
            assert bridge.counters["remote_connected"] == 2
    finally:
        async with asyncio.timeout(BROKER_STOP_TIMEOUT_S):
            await broker.shutdown()


def test_rules_from_mosquitto_style_lines() -> None:
    assert rules_from(["# c", "", "a/# in retain", "b/+ out"]) == (
        Rule("a/#", "in", retain=True),
        Rule("b/+", "out"),
    )
    for bad in ("a/b", "a/b both", "a/b in 1"):
        with pytest.raises(ValueError, match="bridge rule"):
            rules_from([bad])
