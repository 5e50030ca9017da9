"""Helpers for edge tests against a real fog: its config, provisioning through our own
provisioning builders, and an MQTT observer that records what crosses a topic."""

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Final

import aiomqtt
import nacl.signing

from edge.device import Device
from fog.daemon import FogDaemon
from fogpay.edge_cli import provision_publications
from fogpay.provision import BrokerAddress, publish_retained
from protocol.signing import public_key
from tests.integration.devices import write_fog_files
from tests.integration.fogrun import wait_counter

FOG_ID: Final = "fog-edge"
FOG_PW: Final = "fog-secret"
DEV_PW: Final = "device-secret"
EMBEDDED: Final = f'port = 0\npassword = "{FOG_PW}"\ndevice_password = "{DEV_PW}"\n'
OWNER_ID: Final = "acme"
TX_MAX_MICROS: Final = 500_000
LEASE_MICROS: Final = 10_000_000
CLIENT_TIMEOUT_S: Final = 10.0


def embedded_fog(tmp_path: Path, issuer: nacl.signing.SigningKey) -> Path:
    return write_fog_files(tmp_path, fog_id=FOG_ID, issuer_key=public_key(issuer), broker=EMBEDDED)


def external_fog(tmp_path: Path, issuer: nacl.signing.SigningKey, port: int) -> Path:
    broker = f'url = "mqtt://127.0.0.1:{port}"\n'
    return write_fog_files(tmp_path, fog_id=FOG_ID, issuer_key=public_key(issuer), broker=broker)


def fog_key(tmp_path: Path) -> bytes:
    from runtime.keyfile import load_key_file

    return public_key(load_key_file(tmp_path / "fog.key"))


async def provision(
    fog: FogDaemon,
    broker: BrokerAddress,
    issuer: nacl.signing.SigningKey,
    devices: Sequence[Device],
) -> None:
    """Owner, bindings and a lease, published retained; returns once the fog holds them."""
    owner = nacl.signing.SigningKey.generate()
    pubs = provision_publications(
        issuer,
        owner,
        devices,
        owner_id=OWNER_ID,
        fog_id=FOG_ID,
        currency="EUR",
        lease_micros=LEASE_MICROS,
        tx_max_micros=TX_MAX_MICROS,
    )
    # trust goes in through the fog's own (operator) account: a device account may not
    # publish it (fog/brokerauth.py roles)
    operator = dataclasses.replace(broker, username=fog.config.broker.username, password=FOG_PW)
    await publish_retained(operator, pubs)
    await wait_counter(fog, "bind_accepted", len(devices))
    await wait_counter(fog, "lease_accepted")


@contextlib.asynccontextmanager
async def client(broker: BrokerAddress) -> AsyncIterator[aiomqtt.Client]:
    async with asyncio.timeout(CLIENT_TIMEOUT_S):
        c = broker.client()
        await c.__aenter__()
    try:
        yield c
    finally:
        await c.__aexit__(None, None, None)


class Observer:
    """Records every payload on ``topic`` (its own connection and reader task)."""

    def __init__(self, c: aiomqtt.Client, topic: str) -> None:
        self.client = c
        self.topic = topic
        self.payloads: list[bytes] = []
        self.arrived = asyncio.Event()

    async def read(self) -> None:
        async for message in self.client.messages:
            if not message.topic.matches(self.topic):
                continue  # amqtt delivers other retained messages on connect
            assert isinstance(message.payload, bytes)
            self.payloads.append(message.payload)
            self.arrived.set()

    async def wait_count(self, n: int, timeout_s: float = CLIENT_TIMEOUT_S) -> None:
        async with asyncio.timeout(timeout_s):
            while len(self.payloads) < n:
                self.arrived.clear()
                await self.arrived.wait()


@contextlib.asynccontextmanager
async def observing(broker: BrokerAddress, topic: str) -> AsyncIterator[Observer]:
    async with client(broker) as c:
        await c.subscribe(topic, qos=1)
        obs = Observer(c, topic)
        task = asyncio.create_task(obs.read(), name="test.observer")
        try:
            yield obs
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await task  # MqttError: a test that stops the broker
