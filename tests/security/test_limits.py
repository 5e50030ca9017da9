"""Per-connection abuse limits of the embedded broker: an oversized packet closes its
connection before the body is read while another device keeps paying; the framing the limits
read is the framing MQTT sends, however the bytes are chunked."""

import asyncio
import random
import struct
from pathlib import Path

import nacl.signing
import pytest

from edge.device import Device
from fog.broker import PacketTooLargeError, _ConnectionLimits
from fogpay.provision import BrokerAddress
from protocol.signing import public_key
from tests.edge.fogtools import DEV_PW, FOG_ID, FOG_PW, client, fog_key, provision
from tests.integration.devices import write_fog_files
from tests.integration.fogrun import running_fog

PACKET_MAX = 8192


def _str(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("!H", len(raw)) + raw


def _length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + _length(len(body)) + body


def connect_packet(username: str, password: str) -> bytes:
    header = _str("MQTT") + bytes([4, 0xC2]) + struct.pack("!H", 60)
    return packet(0x10, header + _str("flooder") + _str(username) + _str(password))


def publish(topic: str, payload: bytes, *, qos: int, packet_id: int = 1) -> bytes:
    body = _str(topic) + (struct.pack("!H", packet_id) if qos else b"") + payload
    return packet(0x30 | (qos << 1), body)


async def next_packet(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    first = (await reader.readexactly(1))[0]
    length, multiplier = 0, 1
    while True:
        byte = (await reader.readexactly(1))[0]
        length += (byte & 0x7F) * multiplier
        multiplier *= 128
        if not byte & 0x80:
            break
    return first, await reader.readexactly(length)


async def puback(reader: asyncio.StreamReader) -> bytes:
    """The next PUBACK's body (amqtt sends retained messages to any new session first)."""
    for _ in range(1000):
        first, body = await next_packet(reader)
        if first == 0x40:
            return body
    raise AssertionError("no PUBACK in 1000 packets")


async def closed_by_peer(reader: asyncio.StreamReader) -> bool:
    """Read (what the broker had sent before) until the connection ends: True at EOF or
    reset; a TimeoutError when it stays open."""
    async with asyncio.timeout(10):
        for _ in range(10_000):
            try:
                if not await reader.read(65536):
                    return True
            except ConnectionError:
                return True
    return False


@pytest.fixture
def issuer() -> nacl.signing.SigningKey:
    return nacl.signing.SigningKey.generate()


async def test_an_oversized_packet_closes_its_connection_while_another_device_pays(
    tmp_path: Path, issuer: nacl.signing.SigningKey
) -> None:
    broker_toml = (
        f'port = 0\npassword = "{FOG_PW}"\ndevice_password = "{DEV_PW}"\n'
        f"packet_bytes_max = {PACKET_MAX}\n"
    )
    config = write_fog_files(
        tmp_path, fog_id=FOG_ID, issuer_key=public_key(issuer), broker=broker_toml
    )
    async with running_fog(config) as fog:
        broker = BrokerAddress("127.0.0.1", fog.broker_port, "device", DEV_PW)
        device = Device.open(tmp_path / "dev", fog_id=FOG_ID, fog_key=fog_key(tmp_path))
        await provision(fog, broker, issuer, [device])
        async with client(broker) as c:
            first = await device.pay(c, "shop-1", 1_000, "EUR", timeout_s=5)
            reader, writer = await asyncio.open_connection("127.0.0.1", fog.broker_port)
            try:
                writer.write(connect_packet("device", DEV_PW))
                async with asyncio.timeout(10):
                    connack = await reader.readexactly(4)
                assert connack == b"\x20\x02\x00\x00"  # accepted
                # a packet under the limit passes (QoS 1: acknowledged)
                writer.write(publish("fogpay/1/junk", b"x" * 100, qos=1, packet_id=7))
                async with asyncio.timeout(10):
                    assert await puback(reader) == b"\x00\x07"
                # announce 2 MiB, send a little of it: the broker closes the connection
                oversized = publish("fogpay/1/junk", b"x" * (2 * 1024 * 1024), qos=1)
                writer.write(oversized[: PACKET_MAX // 2])
                assert await closed_by_peer(reader)
                # meanwhile and after, the other device pays as before
                second = await device.pay(c, "shop-1", 2_000, "EUR", timeout_s=5)
            finally:
                writer.close()
        assert first.msg.ok and second.msg.ok and second.msg.log_index == 2


def stream_of_packets(rng: random.Random, n: int) -> tuple[bytes, int]:
    """``n`` random packets (PUBLISH QoS 0/1, PINGREQ, PUBACK); how many are QoS 1 PUBLISHes."""
    out, qos1 = bytearray(), 0
    for i in range(n):
        kind = rng.randrange(4)
        if kind == 0:
            out += publish("t/x", rng.randbytes(rng.randrange(0, 3000)), qos=0)
        elif kind == 1:
            out += publish("t/y", rng.randbytes(rng.randrange(0, 300)), qos=1, packet_id=i + 1)
            qos1 += 1
        elif kind == 2:
            out += b"\xc0\x00"
        else:
            out += packet(0x40, struct.pack("!H", i + 1))
    return bytes(out), qos1


def test_the_framing_is_read_right_in_any_chunking() -> None:
    rng = random.Random(13)
    for _ in range(50):
        data, qos1 = stream_of_packets(rng, rng.randrange(1, 40))
        limits = _ConnectionLimits(packet_bytes_max=4096, inflight_max=10_000)
        i = 0
        while i < len(data):
            step = rng.choice((1, 2, 3, 7, 64, 1000, len(data)))
            limits.feed(data[i : i + step])
            i += step
        assert limits.at_packet_start() and limits.inflight == qos1
        for _ in range(qos1):
            limits.wrote(b"\x40\x02\x00\x01")
        assert limits.inflight == 0
        limits.wrote(b"\x40\x02\x00\x01")  # an ack of nothing counted does not go negative
        assert limits.inflight == 0


def test_an_oversized_length_is_refused_before_its_body() -> None:
    limits = _ConnectionLimits(packet_bytes_max=4096, inflight_max=10)
    limits.feed(b"\x30")
    with pytest.raises(PacketTooLargeError):
        limits.feed(_length(4094))  # 1 + 2 + 4094 > 4096: nothing of the body was needed
    fits = _ConnectionLimits(packet_bytes_max=4096, inflight_max=10)
    fits.feed(b"\x30" + _length(4093))  # exactly 4096 bytes
    assert not fits.at_packet_start()


def test_the_rate_limit_reads_the_username_and_spares_the_fog() -> None:
    for user, limited in (("fog", False), ("device", True)):
        limits = _ConnectionLimits(4096, 10, packets_per_s=5, exempt=frozenset({"fog"}))
        limits.feed(connect_packet(user, "pw"))
        assert limits.username == user and limits.rate_limited is limited
    waits = [limits.wait_s() for _ in range(6)]  # a burst of 5, then the 6th waits
    assert waits[:5] == [0.0] * 5 and waits[5] > 0
