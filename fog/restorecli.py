"""``fogpay fog restore --config fog.toml [--wait-s 10]``: rebuild a fog that lost its disk
from its peers' replicas (docs/protocol.md 17.3, docs/fog.md "A fog's disk died").

The database must not exist (exit 2 otherwise). The command connects to the fog's broker
(``broker.url``, or the embedded broker it starts for the time of the restore, so bridges and
peers reach it as they reach the fog), subscribes to ``gossip/{me}/batch``, its retained ack
and leases and the trust topics, and sends a signed ``fetch`` to every peer of
``federation.peers``: from batch 1, then from after the highest batch answered, until a
round brings nothing new or ``--wait-s`` has passed. ``fog.restore`` verifies what came
(this fog's own key), picks the contiguous run ending at the highest batch and writes it into
a new database (with the trust material seen, every lease of this fog seen retained retired).
If the cloud's ack is above what the peers hold, or the run does not reach back to it, the
chain head is lost: nothing is written and the command exits 1 (that fog needs a new
fog_id; the cloud closes its leases: ``fogpay cloud fog close-leases FOG_ID``).
"""

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Final

import aiomqtt
import nacl.signing
import structlog

from fog import restore
from fog.authorize import Policy
from fog.broker import EmbeddedBroker
from fog.config import FogConfig, broker_tls, parse_broker_url
from fog.store import FogStore
from fog.trust import TRUST_KINDS
from protocol import topics
from protocol.errors import TopicError
from protocol.replica import Fetch
from protocol.signing import public_key, seal
from protocol.topics import Kind
from runtime.mqttshell import ClientSettings, client_for, connect_client

log = structlog.get_logger()

QUIET_S: Final = 1.0  # a fetch round ends when nothing new came for this long
ROUNDS_MAX: Final = 10_000
PUBLISH_TIMEOUT_S: Final = 5.0


@dataclass(slots=True)
class Gathered:
    wires: list[bytes] = field(default_factory=list)
    ack: bytes | None = None
    leases: set[bytes] = field(default_factory=set)
    trust: list[tuple[str, bytes]] = field(default_factory=list)
    last_at: float = 0.0


@dataclass(frozen=True, slots=True)
class Restored:
    batches: int
    head: int
    records: int
    cloud_acked: int
    leases_retired: int
    refused: int


def _settings(config: FogConfig, port: int | None) -> ClientSettings:
    b = config.broker
    if b.url is not None:
        addr = parse_broker_url(b.url)
        return ClientSettings(
            hostname=addr.host,
            port=addr.port,
            username=addr.username,
            password=addr.password,
            identifier_prefix=f"fogpay-restore-{config.fog_id}",
            tls=broker_tls(b) if addr.tls else None,
        )
    assert port is not None
    return ClientSettings(
        hostname="127.0.0.1",
        port=port,
        username=b.username,
        password=b.password,
        identifier_prefix=f"fogpay-restore-{config.fog_id}",
    )


async def restore_fog(
    config: FogConfig, key: nacl.signing.SigningKey, *, wait_s: float
) -> Restored:
    """Gather, plan, import (module docstring). Raises ``restore.RestoreError`` when the
    chain head is lost (nothing written), ``aiomqtt.MqttError`` when the broker fails."""
    assert not config.db.exists(), "the caller checks that the database does not exist"
    broker: EmbeddedBroker | None = None
    if config.broker.url is None:
        broker = EmbeddedBroker(config.broker)
        await broker.start()
    try:
        got = await _gather(config, key, wait_s, None if broker is None else broker.port)
    finally:
        if broker is not None:
            await broker.stop()
    acked = restore.cloud_ack_number(got.ack, fog_id=config.fog_id, issuer=config.issuer_key)
    plan = restore.plan(
        got.wires, fog_id=config.fog_id, fog_public=public_key(key), cloud_acked=acked
    )
    store = FogStore.open(
        config.db,
        fog_id=config.fog_id,
        fog_key=key,
        issuer_key=config.issuer_key,
        policy=Policy(),
    )
    try:
        for msg_type, payload in got.trust:  # owner ids of the records come from bindings
            store.put_trust(msg_type, payload, now_ms=int(time.time() * 1000))
        records = restore.import_into(
            store.connection,
            plan,
            retired_leases=sorted(got.leases),
            now_ms=int(time.time() * 1000),
        )
    finally:
        store.close()
    return Restored(
        batches=len(plan.batches),
        head=plan.head,
        records=records,
        cloud_acked=acked,
        leases_retired=len(got.leases),
        refused=plan.refused,
    )


async def _gather(
    config: FogConfig, key: nacl.signing.SigningKey, wait_s: float, port: int | None
) -> Gathered:
    me = config.fog_id
    settings = _settings(config, port)
    client = client_for(settings)
    await connect_client(client, settings)
    got = Gathered(last_at=time.monotonic())
    try:
        for f in (
            topics.gossip_topic(me, "batch"),
            topics.ack_topic(me),
            topics.lease_filter(me),
            topics.TRUST_FILTER,
        ):
            await client.subscribe(f, qos=1)
        reader = asyncio.create_task(_read(client, me, got), name="fog.restore.reader")
        try:
            await _fetch_rounds(client, config, key, got, time.monotonic() + wait_s)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await reader
    finally:
        with contextlib.suppress(aiomqtt.MqttError):
            await client.__aexit__(None, None, None)
    return got


async def _read(client: aiomqtt.Client, me: str, got: Gathered) -> None:
    async for message in client.messages:
        payload = message.payload if isinstance(message.payload, bytes | bytearray) else b""
        try:
            parsed = topics.parse(str(message.topic))
        except TopicError:
            continue
        data = bytes(payload)
        if parsed.kind is Kind.GOSSIP_BATCH:
            got.wires.append(data)
            got.last_at = time.monotonic()
        elif parsed.kind is Kind.ACK and parsed.fog_id == me and data:
            got.ack = data
        elif parsed.kind is Kind.LEASE and parsed.fog_id == me and data:
            assert parsed.lease_id is not None
            got.leases.add(parsed.lease_id)
        elif parsed.kind in TRUST_KINDS and parsed.kind is not Kind.LEASE and data:
            got.trust.append((TRUST_KINDS[parsed.kind], data))


async def _fetch_rounds(
    client: aiomqtt.Client,
    config: FogConfig,
    key: nacl.signing.SigningKey,
    got: Gathered,
    deadline: float,
) -> None:
    """Fetch from 1, then from after the highest answered, until a round brings nothing."""
    high = 0
    for _ in range(ROUNDS_MAX):
        fetch = seal(
            Fetch(fog_id=config.fog_id, from_number=high + 1, time_ms=int(time.time() * 1000)),
            key,
        )
        for peer in config.federation.peers:
            await client.publish(
                topics.gossip_topic(peer, "fetch"), fetch, qos=1, timeout=PUBLISH_TIMEOUT_S
            )
        before = len(got.wires)
        started = time.monotonic()
        while time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            quiet_since = max(started, got.last_at)
            if time.monotonic() - quiet_since >= QUIET_S:
                break
        log.info("restore_fetched", round_from=high + 1, batches=len(got.wires) - before)
        new_high = max((restore.batch_number(w) for w in got.wires), default=0)
        if new_high <= high or time.monotonic() >= deadline:
            return
        high = new_high
