"""``broker.handoff``: the embedded broker hands a client's PUBLISH to the fog where amqtt
would queue it for its subscribers (fog.broker.FogBroker). Through real device clients over
TCP with per-device accounts: only what passed the ACL reaches the hand-off, a denied
publish still closes the connection, what the fog takes reaches no subscriber, and what it
leaves (trust material) is delivered as before."""

import asyncio
import json
import socket
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import aiomqtt
import pytest

from fog.broker import EmbeddedBroker
from fog.config import BrokerConfig
from protocol.login import account_digest
from tests.conftest import free_port

FOG = "fog-a"
A, B = "aa" * 32, "bb" * 32
A_PW, B_PW, OP_PW = "a-pw", "b-pw", "op-pw"
BOUND_S = 10.0


def intent(key: str, fog: str = FOG) -> str:
    return f"fogpay/1/{fog}/intent/{key}"


class Intake:
    """The fog's side of the hand-off: takes the intents of FOG, leaves everything else."""

    def __init__(self) -> None:
        self.taken: list[tuple[str, bytes]] = []
        self.arrived = asyncio.Event()

    def __call__(self, topic: str, payload: bytes) -> bool:
        if not topic.startswith(f"fogpay/1/{FOG}/intent/"):
            return False
        self.taken.append((topic, payload))
        self.arrived.set()
        return True


@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[tuple[int, Intake]]:
    async for b, intake in _broker(tmp_path):
        yield b.port, intake


@pytest.fixture
async def embedded(tmp_path: Path) -> AsyncIterator[EmbeddedBroker]:
    async for b, _ in _broker(tmp_path):
        yield b


async def _broker(tmp_path: Path) -> AsyncIterator[tuple[EmbeddedBroker, Intake]]:
    accounts = tmp_path / "accounts.json"
    entries = {
        A: {"role": "device", "sha256": account_digest(A_PW)},
        B: {"role": "device", "sha256": account_digest(B_PW)},
        "op": {"role": "operator", "sha256": account_digest(OP_PW)},
    }
    accounts.write_text(json.dumps({"accounts": entries}))
    config = BrokerConfig(
        host="127.0.0.1",
        port=free_port(),
        password="fog-pw",
        accounts_file=str(accounts),
        process=False,
        handoff=True,
    )
    intake = Intake()
    b = EmbeddedBroker(config, handoff=intake)
    await b.start()
    try:
        yield b, intake
    finally:
        await b.stop()


def client(port: int, user: str, password: str, name: str) -> aiomqtt.Client:
    return aiomqtt.Client("127.0.0.1", port, username=user, password=password, identifier=name)


async def wait_taken(intake: Intake, count: int) -> None:
    async with asyncio.timeout(BOUND_S):
        while len(intake.taken) < count:
            intake.arrived.clear()
            await intake.arrived.wait()


async def test_only_a_devices_own_intents_reach_the_fog(broker: tuple[int, Intake]) -> None:
    port, intake = broker
    async with client(port, "op", OP_PW, "op") as op:
        await op.subscribe(intent("+"), qos=1)
        await op.subscribe("fogpay/1/trust/#", qos=1)
        # A forges B's intent: refused by the ACL, the connection closes, nothing handed over
        try:
            async with client(port, A, A_PW, "a-forge") as dev:
                await dev.publish(intent(B), b"forged", qos=1)
                await asyncio.sleep(0.2)
                await dev.publish(intent(A), b"after the forgery", qos=1)
        except aiomqtt.MqttError:
            pass  # the embedded broker closes a connection at a denied publish
        # A's own intent and B's own: handed over, each once, as published
        async with client(port, A, A_PW, "a") as dev:
            await dev.publish(intent(A), b"A's intent", qos=1)
        async with client(port, B, B_PW, "b") as dev:
            await dev.publish(intent(B), b"B's intent", qos=1)
        await wait_taken(intake, 2)
        # the operator's trust publish is not the fog's to take: delivered to subscribers
        await op.publish(f"fogpay/1/trust/owner/{'cd' * 32}", b"trust", qos=1)
        async with asyncio.timeout(BOUND_S):
            got = []
            async for m in op.messages:
                got.append((str(m.topic), bytes(m.payload)))
                if m.payload == b"trust":
                    break
    assert intake.taken == [(intent(A), b"A's intent"), (intent(B), b"B's intent")]
    # what the fog took went to no subscriber (the operator's intent/+ saw none of it)
    assert got == [(f"fogpay/1/trust/owner/{'cd' * 32}", b"trust")]


async def test_another_fogs_intents_are_left_to_the_subscribers(
    broker: tuple[int, Intake],
) -> None:
    port, intake = broker
    async with client(port, "op", OP_PW, "op") as op:
        await op.subscribe(intent("+", "fog-b"), qos=1)
        async with client(port, A, A_PW, "a") as dev:
            await dev.publish(intent(A, "fog-b"), b"for fog-b", qos=1)
        async with asyncio.timeout(BOUND_S):
            message = await anext(aiter(op.messages))
    assert bytes(message.payload) == b"for fog-b"
    assert intake.taken == []


def _field(data: bytes) -> bytes:
    return struct.pack("!H", len(data)) + data


def connect_with_will(user: str, password: str, will_topic: str, will: bytes) -> bytes:
    """An MQTT 3.1.1 CONNECT with a username, a password and a QoS 1 will."""
    flags = 0x80 | 0x40 | 0x08 | 0x04 | 0x02  # username, password, will QoS 1, will, clean
    body = _field(b"MQTT") + bytes([4, flags]) + struct.pack("!H", 60)
    body += _field(b"willer") + _field(will_topic.encode()) + _field(will)
    body += _field(user.encode()) + _field(password.encode())
    assert len(body) < 128 * 128
    return bytes([0x10, 0x80 | (len(body) & 0x7F), len(body) >> 7]) + body


async def test_a_will_on_another_devices_intent_topic_reaches_nothing(
    broker: tuple[int, Intake],
) -> None:
    """amqtt checks no ACL on wills: with the hand-off the broker does, before the fog."""
    port, intake = broker
    async with client(port, "op", OP_PW, "op") as op:
        await op.subscribe(intent("+"), qos=1)
        for will_topic, payload in ((intent(B), b"forged will"), (intent(A), b"A's will")):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(connect_with_will(A, A_PW, will_topic, payload))
            await writer.drain()
            async with asyncio.timeout(BOUND_S):
                connack = await reader.readexactly(4)
            assert connack == b"\x20\x02\x00\x00"  # accepted
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.close()  # a reset, no DISCONNECT: the broker sends the will
        await wait_taken(intake, 1)  # A's own will is A's intent: handed over
    assert intake.taken == [(intent(A), b"A's will")]


async def test_what_the_fog_delivers_reaches_its_device_alone(embedded: EmbeddedBroker) -> None:
    """The way back (``EmbeddedBroker.deliver``): the subscribers' ACLs as for any publish."""
    port = embedded.port
    async with (
        client(port, A, A_PW, "a") as a,
        client(port, B, B_PW, "b") as b,
    ):
        await a.subscribe(f"fogpay/1/{FOG}/receipt/{A}", qos=1)
        await b.subscribe(f"fogpay/1/{FOG}/receipt/{B}", qos=1)
        await b.subscribe(f"fogpay/1/{FOG}/receipt/{A}", qos=1)  # refused: not B's
        await embedded.deliver(f"fogpay/1/{FOG}/receipt/{A}", b"A's receipt")
        await embedded.deliver(f"fogpay/1/{FOG}/receipt/{B}", b"B's receipt")
        async with asyncio.timeout(BOUND_S):
            got_a = await anext(aiter(a.messages))
            got_b = await anext(aiter(b.messages))
        assert bytes(got_a.payload) == b"A's receipt"
        assert bytes(got_b.payload) == b"B's receipt"
        with pytest.raises(TimeoutError):  # nothing more for B: A's receipt never reached it
            async with asyncio.timeout(0.5):
                await anext(aiter(b.messages))
