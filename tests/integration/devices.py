"""Test helpers: an issuer that seals trust material, devices that seal intents, and an MQTT
client that publishes them and awaits receipts. Real keys, real envelopes, real aiomqtt."""

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import aiomqtt
import nacl.signing

from protocol import topics
from protocol.limits import INTENT_ENVELOPE_BYTES_MAX
from protocol.messages import (
    Binding,
    Intent,
    Lease,
    OwnerCredential,
    Receipt,
    Revocation,
)
from protocol.signing import message_id, open_envelope, public_key, seal, split_envelope
from runtime.keyfile import write_key_file
from runtime.mqttshell import TCP_NODELAY_OPTION

RECEIPT_TIMEOUT_S: Final = 10.0
DAY_MS: Final = 86_400_000
FAR_FUTURE_MS: Final = 4_102_444_800_000  # 2100-01-01


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def intent_id(payload: bytes) -> bytes:
    env = split_envelope(payload, bytes_max=INTENT_ENVELOPE_BYTES_MAX)
    return message_id(env.type, env.body)


def new_key() -> nacl.signing.SigningKey:
    return nacl.signing.SigningKey.generate()


@dataclass
class Issuer:
    """The issuer and one owner: seals owner credentials, bindings, leases, revocations."""

    key: nacl.signing.SigningKey = field(default_factory=new_key)
    owner_key: nacl.signing.SigningKey = field(default_factory=new_key)
    owner_id: str = "acme"

    @property
    def public(self) -> bytes:
        return public_key(self.key)

    def owner_credential(self, *, not_after_ms: int = FAR_FUTURE_MS) -> tuple[str, bytes]:
        msg = OwnerCredential(
            owner_id=self.owner_id,
            key=public_key(self.owner_key),
            not_before_ms=0,
            not_after_ms=not_after_ms,
        )
        return topics.owner_topic(self.owner_id), seal(msg, self.key)

    def binding(
        self,
        device: bytes,
        *,
        currency: str = "EUR",
        tx_max_micros: int = 1_000_000,
        day_max_micros: int = 10_000_000,
        payees: tuple[str, ...] | None = None,
        not_after_ms: int = FAR_FUTURE_MS,
    ) -> tuple[str, bytes]:
        msg = Binding(
            device=device,
            owner_id=self.owner_id,
            not_before_ms=0,
            not_after_ms=not_after_ms,
            currency=currency,
            tx_max_micros=tx_max_micros,
            day_max_micros=day_max_micros,
            payees=payees,
        )
        return topics.bind_topic(device), seal(msg, self.owner_key)

    def lease(self, fog_id: str, amount_micros: int, *, currency: str = "EUR") -> tuple[str, bytes]:
        lease_id = os.urandom(16)
        msg = Lease(
            lease_id=lease_id,
            owner_id=self.owner_id,
            fog_id=fog_id,
            amount_micros=amount_micros,
            currency=currency,
            not_after_ms=FAR_FUTURE_MS,
        )
        return topics.lease_topic(fog_id, lease_id), seal(msg, self.key)

    def revocation(self, key: bytes) -> tuple[str, bytes]:
        msg = Revocation(key=key, time_ms=now_ms(), reason="test")
        return topics.revoke_topic(key), seal(msg, self.key)


@dataclass
class Device:
    fog_id: str
    key: nacl.signing.SigningKey = field(default_factory=new_key)
    seq: int = 0

    @property
    def public(self) -> bytes:
        return public_key(self.key)

    def intent(self, amount_micros: int, **overrides: Any) -> bytes:
        """A sealed intent with the next sequence number (unless ``seq`` is overridden)."""
        if "seq" not in overrides:
            self.seq += 1
        fields: dict[str, Any] = {
            "device": self.public,
            "fog_id": self.fog_id,
            "seq": self.seq,
            "payee_id": "shop",
            "amount_micros": amount_micros,
            "currency": "EUR",
            "time_ms": now_ms(),
        }
        fields.update(overrides)
        return seal(Intent(**fields), self.key)

    @property
    def intent_topic(self) -> str:
        return topics.intent_topic(self.fog_id, self.public)


def write_fog_files(
    directory: Path,
    *,
    fog_id: str,
    issuer_key: bytes,
    broker: str,
    extra: str = "",
) -> Path:
    """A fog key file and config TOML in ``directory``; returns the config path.
    ``broker`` is the TOML body of the [broker] table."""
    key_file = directory / "fog.key"
    if not key_file.exists():
        write_key_file(key_file, new_key())
    config = directory / "fog.toml"
    config.write_text(
        f'fog_id = "{fog_id}"\n'
        f'key_file = "{key_file}"\n'
        f'issuer_key = "{issuer_key.hex()}"\n'
        f'db = "{directory / "fog.sqlite"}"\n'
        "stats_interval_s = 0.5\n"
        f"{extra}\n"
        f"[broker]\n{broker}\n"
    )
    return config


class Wallet:
    """One MQTT connection for many devices: publishes intents, collects receipts by intent
    id (the receipt's ``i``); every receipt seen is kept in ``receipts`` (raw bytes)."""

    def __init__(self, client: aiomqtt.Client, fog_id: str) -> None:
        self.client = client
        self.fog_id = fog_id
        self.receipts: list[tuple[str, bytes]] = []
        self._waiters: dict[bytes, list[asyncio.Future[bytes]]] = {}
        self._by_id: dict[bytes, list[bytes]] = {}

    async def listen(self, devices: Sequence["Device"] = ()) -> None:
        """Subscribe to the receipts of ``devices`` (all receipts of the fog if none given;
        a broker with per-device ACLs refuses that wildcard)."""
        if not devices:
            await self.client.subscribe(topics.receipt_filter(self.fog_id), qos=1)
            return
        for device in devices:
            await self.client.subscribe(topics.receipt_topic(self.fog_id, device.public), qos=1)

    async def reader(self) -> None:
        receipt_prefix = f"{topics.ROOT}/{self.fog_id}/receipt/"
        async for message in self.client.messages:
            # amqtt sends every retained message in the broker on CONNECT, past subscriptions
            if not str(message.topic).startswith(receipt_prefix):
                continue
            payload = bytes(message.payload) if isinstance(message.payload, bytes) else b""
            self.receipts.append((str(message.topic), payload))
            try:
                receipt = open_envelope(payload, Receipt).msg
            except Exception:  # a test asserts on receipts; junk is just recorded
                continue
            self._by_id.setdefault(receipt.intent_id, []).append(payload)
            for waiter in self._waiters.pop(receipt.intent_id, []):
                if not waiter.done():
                    waiter.set_result(payload)

    async def send(self, topic: str, payload: bytes, intent_id: bytes) -> Receipt:
        """Publish ``payload`` and wait for the receipt whose ``i`` is ``intent_id``."""
        raw = await self.send_raw(topic, payload, intent_id)
        return open_envelope(raw, Receipt).msg

    async def send_raw(
        self, topic: str, payload: bytes, intent_id: bytes, *, timeout_s: float = RECEIPT_TIMEOUT_S
    ) -> bytes:
        waiter: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(intent_id, []).append(waiter)
        await self.client.publish(topic, payload, qos=1, timeout=RECEIPT_TIMEOUT_S)
        async with asyncio.timeout(timeout_s):
            return await waiter

    async def pay(self, device: "Device", payload: bytes) -> Receipt:
        return await self.send(device.intent_topic, payload, intent_id(payload))

    async def pay_until_answered(
        self, device: "Device", payload: bytes, *, timeout_s: float, attempts_max: int
    ) -> bytes:
        """What a device does: retransmit the same bytes until a receipt comes (bounded)."""
        for _ in range(attempts_max):
            with contextlib.suppress(TimeoutError):
                return await self.send_raw(
                    device.intent_topic, payload, intent_id(payload), timeout_s=timeout_s
                )
        raise AssertionError(f"no receipt after {attempts_max} attempts")

    def raw_for(self, intent_id: bytes) -> list[bytes]:
        """Every receipt seen for ``intent_id``, raw, in arrival order."""
        return list(self._by_id.get(intent_id, []))

    def ok_receipts(self) -> list[Receipt]:
        out = []
        for _, raw in self.receipts:
            with contextlib.suppress(Exception):
                r = open_envelope(raw, Receipt).msg
                if r.ok:
                    out.append(r)
        return out


@contextlib.asynccontextmanager
async def wallet(
    host: str,
    port: int,
    fog_id: str,
    *,
    username: str | None = None,
    password: str | None = None,
    devices: Sequence[Device] = (),
) -> AsyncIterator[Wallet]:
    client = aiomqtt.Client(
        host,
        port,
        username=username,
        password=password,
        timeout=RECEIPT_TIMEOUT_S,
        max_inflight_messages=1000,
        socket_options=(TCP_NODELAY_OPTION,),
    )
    async with client:
        w = Wallet(client, fog_id)
        await w.listen(devices)
        task = asyncio.create_task(w.reader(), name="test.wallet.reader")
        try:
            yield w
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await task


async def publish_retained(
    host: str,
    port: int,
    items: Sequence[tuple[str, bytes]],
    *,
    username: str | None = None,
    password: str | None = None,
) -> None:
    async with aiomqtt.Client(
        host, port, username=username, password=password, timeout=RECEIPT_TIMEOUT_S
    ) as client:
        for topic, payload in items:
            await client.publish(topic, payload, qos=1, retain=True, timeout=RECEIPT_TIMEOUT_S)
