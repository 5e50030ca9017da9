"""One device floods the broker; how much slower does another device's round trip get?

Per broker (the embedded amqtt broker in its own process, as the fog runs it, with and
without the per-connection limits of fog/broker.py; Mosquitto with the limits of
deploy/mosquitto/fogpay-server.conf), on 127.0.0.1:

- the victim publishes a 200-byte message (QoS 1) every ``--interval-ms`` on its intent
  topic to a responder (in the fog's place, with the fog's account on amqtt) that echoes it
  back (QoS 1) on the victim's receipt topic, and times each round trip: ``--samples`` of
  them; victim and flooder log in with the embedded broker's shared device account, whose
  rights are a device's (fogpay topics only, docs/protocol.md 9.1);
- the amqtt broker three ways: limits off, the default limits (packet size, inflight), and
  those plus ``broker.packets_per_s = --rate``;
- first without a flood, then while a flooder on its own raw TCP connection writes 512-byte
  QoS 1 PUBLISHes as fast as the socket takes them and never reads a PUBACK (a broken or
  hostile device), at most ``--flood-max`` packets.

Prints one line per broker and phase: the victim's p50/p99/max in ms and how many packets
the flooder got written. Bounded: every phase ends after its samples or ``--phase-s``.

    .venv/bin/python bench/flood.py [--samples 300] [--interval-ms 10]
"""

import argparse
import asyncio
import contextlib
import dataclasses
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Final

import aiomqtt

# run as a script from a checkout: the project root on the path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fog.broker import BrokerProcess
from fog.config import BROKER_INFLIGHT_MAX, PACKET_BYTES_MAX, BrokerConfig
from runtime.mqttshell import ClientSettings, client_for

HOST: Final = "127.0.0.1"
USER: Final = "device"
PASSWORD: Final = "bench-device"
FOG_USER: Final = "fog"
FOG_PASSWORD: Final = "bench-fog"
VICTIM: Final = "aa" * 32  # device keys as the topics name them
FLOODER: Final = "bb" * 32
REQ: Final = f"fogpay/1/bench/intent/{VICTIM}"
RESP: Final = f"fogpay/1/bench/receipt/{VICTIM}"
FLOOD_TOPIC: Final = f"fogpay/1/bench/intent/{FLOODER}"
SHIPPED: Final = Path(__file__).resolve().parents[1] / "deploy/mosquitto/fogpay-server.conf"
FLOOD_PAYLOAD: Final = 512
CONNECT_TIMEOUT_S: Final = 10.0


def _str(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("!H", len(raw)) + raw


def _packet(first: int, body: bytes) -> bytes:
    n, length = len(body), bytearray()
    while True:
        byte, n = n % 128, n // 128
        length.append(byte | (0x80 if n else 0))
        if not n:
            return bytes([first]) + bytes(length) + body


def _connect(user: str | None, password: str | None) -> bytes:
    flags = 0x02 | (0xC0 if user else 0)
    body = _str("MQTT") + bytes([4, flags]) + struct.pack("!H", 60) + _str("flooder")
    if user and password is not None:
        body += _str(user) + _str(password)
    return _packet(0x10, body)


async def flood(port: int, user: str | None, stop: asyncio.Event, count_max: int) -> int:
    """Write QoS 1 PUBLISHes until ``stop`` or ``count_max``; never read. The count written."""
    reader, writer = await asyncio.open_connection(HOST, port)
    sent = 0
    try:
        writer.write(_connect(user, PASSWORD if user else None))
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            await reader.readexactly(4)  # CONNACK
        payload = os.urandom(FLOOD_PAYLOAD)
        while not stop.is_set() and sent < count_max:
            for _ in range(64):
                pid = sent % 65535 + 1
                body = _str(FLOOD_TOPIC) + struct.pack("!H", pid) + payload
                writer.write(_packet(0x32, body))
                sent += 1
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.05):  # the broker stopped reading: wait a little
                    await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass  # the broker closed us: the limit worked
    finally:
        writer.close()
    return sent


def _settings(port: int, user: str | None, name: str) -> ClientSettings:
    password = FOG_PASSWORD if user == FOG_USER else PASSWORD
    return ClientSettings(
        hostname=HOST,
        port=port,
        identifier_prefix=f"bench-{name}",
        username=user,
        password=password if user else None,
    )


@contextlib.asynccontextmanager
async def connected(port: int, user: str | None, name: str) -> AsyncIterator[aiomqtt.Client]:
    client = client_for(_settings(port, user, name))
    async with asyncio.timeout(CONNECT_TIMEOUT_S):
        await client.__aenter__()
    try:
        yield client
    finally:
        with contextlib.suppress(aiomqtt.MqttError):
            await client.__aexit__(None, None, None)


async def victim(
    port: int, user: str | None, samples: int, interval_s: float, phase_s: float
) -> list[float]:
    """Round trips through an echoing responder: the latencies (ms)."""
    latencies: list[float] = []
    async with (
        connected(port, user and FOG_USER, "responder") as responder,
        connected(port, user, "victim") as me,
    ):
        await responder.subscribe(REQ, qos=1)
        await me.subscribe(RESP, qos=1)

        async def echo() -> None:
            async for message in responder.messages:
                await responder.publish(RESP, message.payload, qos=1)

        echoer = asyncio.create_task(echo())
        deadline = time.monotonic() + phase_s
        try:
            for i in range(samples):
                if time.monotonic() > deadline:
                    break
                tag = struct.pack("!I", i) + bytes(196)
                started = time.perf_counter()
                await me.publish(REQ, tag, qos=1)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.1, deadline - time.monotonic())):
                        async for message in me.messages:
                            if message.payload == tag:
                                latencies.append((time.perf_counter() - started) * 1000)
                                break
                await asyncio.sleep(interval_s)
        finally:
            echoer.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await echoer
    return latencies


def _line(broker: str, phase: str, lat: list[float], samples: int, flooded: int | None) -> str:
    if not lat:
        return f"{broker:<24} {phase:<8} no round trip completed"
    q = statistics.quantiles(lat, n=100, method="inclusive") if len(lat) > 1 else [lat[0]] * 99
    extra = "" if flooded is None else f"  flooder wrote {flooded} packets"
    return (
        f"{broker:<24} {phase:<8} n={len(lat)}/{samples}  p50={q[49]:.2f} ms"
        f"  p99={q[98]:.2f} ms  max={max(lat):.2f} ms{extra}"
    )


async def measure(name: str, port: int, user: str | None, args: argparse.Namespace) -> None:
    interval = args.interval_ms / 1000
    quiet = await victim(port, user, args.samples, interval, args.phase_s)
    print(_line(name, "quiet", quiet, args.samples, None), flush=True)
    stop = asyncio.Event()
    flooder = asyncio.create_task(flood(port, user, stop, args.flood_max))
    await asyncio.sleep(0.5)  # let the flood build up
    loud = await victim(port, user, args.samples, interval, args.phase_s)
    stop.set()
    sent = await flooder
    print(_line(name, "flooded", loud, args.samples, sent), flush=True)


async def amqtt_broker(args: argparse.Namespace, *, limited: bool, rate: int = 0) -> None:
    config = BrokerConfig(
        port=0, password=FOG_PASSWORD, device_password=PASSWORD, packets_per_s=rate
    )
    if not limited:
        config = dataclasses.replace(
            config, packet_bytes_max=PACKET_BYTES_MAX, inflight_max=BROKER_INFLIGHT_MAX
        )
    broker = BrokerProcess(config)
    await broker.start()
    try:
        name = "amqtt (limits off)"
        if limited:
            name = f"amqtt (limits, {rate}/s)" if rate else "amqtt (limits)"
        await measure(name, broker.port, USER, args)
    finally:
        await broker.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


async def mosquitto_broker(args: argparse.Namespace) -> None:
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not os.path.exists(binary):  # noqa: ASYNC240 (once, before the measurement)
        print("mosquitto                not installed: skipped")
        return
    port = _free_port()
    limits = [
        line
        for line in SHIPPED.read_text().splitlines()
        if line.startswith(("max_", "set_tcp_nodelay", "memory_limit"))
    ]
    with tempfile.TemporaryDirectory() as tmp:
        conf = Path(tmp) / "mosquitto.conf"
        conf.write_text(
            f"listener {port} {HOST}\nallow_anonymous true\npersistence false\n"
            + "\n".join(limits)
            + ("\nuser root\n" if os.geteuid() == 0 else "\n")
        )
        proc = subprocess.Popen(  # noqa: ASYNC220 (started once, before the measurement)
            [binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            deadline = time.monotonic() + CONNECT_TIMEOUT_S
            while True:
                with contextlib.suppress(OSError), socket.create_connection((HOST, port), 0.2):
                    break
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("mosquitto did not start")
                await asyncio.sleep(0.05)
            await measure("mosquitto (shipped)", port, None, args)
        finally:
            proc.terminate()
            proc.wait(timeout=10)


async def main(args: argparse.Namespace) -> None:
    print(
        f"victim: {args.samples} round trips, one per {args.interval_ms} ms; flooder: "
        f"{FLOOD_PAYLOAD}-byte QoS 1 PUBLISHes, never reading; {os.cpu_count()} CPUs",
        flush=True,
    )
    await amqtt_broker(args, limited=False)
    await amqtt_broker(args, limited=True)
    await amqtt_broker(args, limited=True, rate=args.rate)
    await mosquitto_broker(args)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--interval-ms", type=float, default=10.0)
    parser.add_argument("--phase-s", type=float, default=30.0, help="cap on each phase")
    parser.add_argument("--rate", type=int, default=200, help="broker.packets_per_s to try")
    parser.add_argument("--flood-max", type=int, default=2_000_000, help="cap on packets")
    a = parser.parse_args()
    assert 0 < a.samples <= 100_000 and 0 < a.phase_s <= 600 and a.flood_max > 0
    asyncio.run(main(a))
