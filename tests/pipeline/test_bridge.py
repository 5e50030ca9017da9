"""The production topology: the fog and its devices on one Mosquitto, the cloud on another,
joined by the bridge of ``deploy/mosquitto/fogpay-bridge.conf`` (as shipped, with the cloud's
address, no TLS and no password). Trust material, the lease and its acks come down the
bridge; batches and the lease request go up; everything is booked once.

Federation (docs/protocol.md 17.10): two fogs' Mosquittos bridged to the cloud's, which runs
``fogpay-server.conf`` with ``fogpay.acl`` and a password per account, as shipped: gossip
crosses fog -> cloud broker -> fog, relays, every fog's ack and held receipts cross, the ACL
keeps a fog to its own relay topic and its own gossip; and two fogs of one site joined by
``fogpay-peer-bridge.conf``."""

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
import pytest

from cloud.sqlitestore import SqliteStore
from tests.conftest import BrokerEndpoint, free_port, launch_mosquitto, start_mosquitto
from tests.integration.test_fog_mosquitto import deploy_conf, password_file
from tests.pipeline.test_end_to_end import run_flow
from tests.pipeline.test_leases import report_flow
from tests.pipeline.world import Pipeline

BRIDGE = Path(__file__).parents[2] / "deploy" / "mosquitto" / "fogpay-bridge.conf"


def bridge_lines(cloud_port: int) -> str:
    out = []
    for line in BRIDGE.read_text().splitlines():
        if line.startswith(("remote_username", "remote_password", "bridge_cafile")):
            continue  # the test's cloud broker is anonymous and plain TCP
        if line.startswith("bridge_insecure"):
            continue
        out.append(line.replace("CLOUD_HOST:8883", f"127.0.0.1:{cloud_port}"))
    return "\n".join(out) + "\n"


@pytest.fixture
async def bridged(tmp_path: Path) -> AsyncIterator[Pipeline]:
    cloud_dir, fog_dir = tmp_path / "cloud-broker", tmp_path / "fog-broker"
    cloud_dir.mkdir()
    fog_dir.mkdir()
    cloud_broker = start_mosquitto(cloud_dir)
    fog_broker = start_mosquitto(
        fog_dir, port=free_port(), extra=bridge_lines(cloud_broker.endpoint.port)
    )
    store = await SqliteStore.open(str(tmp_path / "cloud.db"))
    try:
        yield Pipeline(store, cloud_broker.endpoint, tmp_path, fog_broker=fog_broker.endpoint)
    finally:
        await store.close()
        fog_broker.stop()
        cloud_broker.stop()


@pytest.mark.mosquitto
async def test_a_fog_behind_a_mosquitto_bridge(bridged: Pipeline) -> None:
    assert isinstance(bridged.edge, BrokerEndpoint) and bridged.edge != bridged.broker
    await run_flow(bridged, rounds=3)


@pytest.mark.mosquitto
async def test_a_lease_report_and_its_clearing_cross_the_bridge(bridged: Pipeline) -> None:
    await report_flow(bridged)


# --- federation (docs/protocol.md 17.10): three Mosquittos, the shipped bridge and ACL ------

PEER_BRIDGE = BRIDGE.with_name("fogpay-peer-bridge.conf")
WAIT_S = 15.0
PROBE_EVERY_S = 0.2
HELD_DEVICE = "ab" * 32
ACCOUNTS = {"issuer": "issuer-pw", "fog-a": "a-pw", "fog-b": "b-pw", HELD_DEVICE: "dev-pw"}


def bridge_for(path: Path, fog_id: str, host_port: str, password: str, peer: str = "") -> str:
    """A shipped bridge file for ``fog_id``, plain TCP to ``host_port``, with its account."""
    out = []
    for line in path.read_text().splitlines():
        if line.startswith(("bridge_cafile", "bridge_insecure")):
            continue  # the test's brokers are plain TCP
        if line.startswith("restart_timeout"):
            line = "restart_timeout 1 2"  # the test waits for first connections
        line = line.replace("fog-b", peer) if peer else line
        line = line.replace("fog-a", fog_id).replace("PASSWORD", password)
        out.append(line.replace("CLOUD_HOST:8883", host_port).replace("PEER_HOST:8883", host_port))
    return "\n".join(out) + "\n"


@dataclass
class Federation:
    cloud: int  # the cloud's Mosquitto: fogpay-server.conf, fogpay.acl, a password per account
    fogs: dict[str, int]  # each fog's Mosquitto, bridged to the cloud's


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[Federation]:
    accounts = ACCOUNTS
    passwd = password_file(tmp_path, accounts)
    port = free_port()
    cloud = launch_mosquitto(
        tmp_path, port, deploy_conf("fogpay-server.conf", tmp_path, port, passwd)
    )
    brokers = [cloud]
    try:
        fogs = {}
        for fog_id in ("fog-a", "fog-b"):
            d = tmp_path / fog_id
            d.mkdir()
            conf = bridge_for(BRIDGE, fog_id, f"127.0.0.1:{port}", accounts[fog_id])
            brokers.append(start_mosquitto(d, extra=conf))
            fogs[fog_id] = brokers[-1].endpoint.port
        yield Federation(port, fogs)
    finally:
        for b in reversed(brokers):
            b.stop()


@contextlib.asynccontextmanager
async def mqtt(port: int, *filters: str, user: str | None = None) -> AsyncIterator[aiomqtt.Client]:
    password = ACCOUNTS.get(user or "")
    c = aiomqtt.Client("127.0.0.1", port, username=user, password=password, timeout=5)
    async with c:
        if filters:
            await c.subscribe([(f, 1) for f in filters])
        yield c


async def crosses(
    sender: aiomqtt.Client, receiver: aiomqtt.Client, topic: str, *, retain: bool = False
) -> list[bytes]:
    """Publish probes on ``topic`` until one reaches ``receiver`` (the bridges connect in
    their own time); returns every payload ``receiver`` got on ``topic`` until then."""
    got: list[bytes] = []
    done = asyncio.Event()

    async def send() -> None:  # never cancelled in a publish: aiomqtt would not let go
        probe = 0
        while not done.is_set():
            probe += 1
            await sender.publish(topic, b"probe-%d" % probe, qos=1, retain=retain, timeout=5)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(PROBE_EVERY_S):
                    await done.wait()

    task = asyncio.create_task(send())
    try:
        async with asyncio.timeout(WAIT_S):
            async for m in receiver.messages:
                if m.topic.value == topic and isinstance(m.payload, bytes):
                    got.append(m.payload)
                    return got
    finally:
        done.set()
        async with asyncio.timeout(WAIT_S):
            await task
    return got


async def after_marker(receiver: aiomqtt.Client, topic: str, marker: bytes) -> list[bytes]:
    """Payloads on ``topic`` up to and including ``marker`` (sent behind them, on the same
    path: MQTT keeps order, so anything sent before the marker has arrived by then)."""
    got: list[bytes] = []
    async with asyncio.timeout(WAIT_S):
        async for m in receiver.messages:
            if m.topic.value == topic and isinstance(m.payload, bytes):
                got.append(m.payload)
                if m.payload == marker:
                    return got
    return got


@pytest.mark.mosquitto
async def test_gossip_crosses_from_fog_to_fog_through_the_cloud_broker(
    federation: Federation,
) -> None:
    """fog-a's broker -> (its bridge) -> the cloud's Mosquitto -> (fog-b's bridge) -> fog-b's
    broker, with the shipped bridge, server config and ACL; and back; nothing loops."""
    a, b = federation.fogs["fog-a"], federation.fogs["fog-b"]
    async with mqtt(a, "fogpay/1/gossip/#") as at_a, mqtt(b, "fogpay/1/gossip/#") as at_b:
        got = await crosses(at_a, at_b, "fogpay/1/gossip/fog-b/batch")
        assert got[0].startswith(b"probe-")
        got = await crosses(at_b, at_a, "fogpay/1/gossip/fog-a/seen")
        assert got[0].startswith(b"probe-")
        # gossip/fog-a/# in overlaps gossip/+/# out: a message arrives once and is not sent
        # back (it would come round again and again)
        await at_b.publish("fogpay/1/gossip/fog-a/revoke", b"once", qos=1)
        await at_b.publish("fogpay/1/gossip/fog-a/revoke", b"marker", qos=1)
        assert await after_marker(at_a, "fogpay/1/gossip/fog-a/revoke", b"marker") == [
            b"once",
            b"marker",
        ]
        # gossip a fog sends to itself stays home (no rule sends gossip/fog-a/ up from fog-a
        # and back) and gossip for fog-b is not delivered to fog-a's broker
        await at_b.publish("fogpay/1/gossip/fog-b/racc", b"not for a", qos=1)
        await at_b.publish("fogpay/1/gossip/fog-a/racc", b"marker", qos=1)
        assert await after_marker(at_a, "fogpay/1/gossip/fog-a/racc", b"marker") == [b"marker"]


@pytest.mark.mosquitto
async def test_relay_acks_and_held_receipts_cross_the_bridge(federation: Federation) -> None:
    a = federation.fogs["fog-a"]
    cloud = federation.cloud
    async with (
        mqtt(cloud, "fogpay/1/up/+/relay", "fogpay/1/held/+/records", user="issuer") as issuer,
        mqtt(a, "fogpay/1/up/+/ack", f"fogpay/1/held/{HELD_DEVICE}/ack") as fog_a,
    ):
        # relay (a replica holder forwards another fog's batch) goes up under fog-a's topic
        assert await crosses(fog_a, issuer, "fogpay/1/up/fog-a/relay")
        # every fog's ack comes down, retained (a holder learns the cloud's height of each)
        assert await crosses(issuer, fog_a, "fogpay/1/up/fog-b/ack", retain=True)
        # a device's held receipts uploaded at fog-a reach the cloud; its answer comes back
        assert await crosses(fog_a, issuer, f"fogpay/1/held/{HELD_DEVICE}/records")
        assert await crosses(issuer, fog_a, f"fogpay/1/held/{HELD_DEVICE}/ack")
    # and stays retained at fog-a's broker: a fog (re)subscribing gets it at once
    async with mqtt(a, "fogpay/1/up/fog-b/ack") as late, asyncio.timeout(WAIT_S):
        message = await anext(aiter(late.messages))
    assert message.retain and isinstance(message.payload, bytes)
    assert message.payload.startswith(b"probe-")


@pytest.mark.mosquitto
async def test_the_cloud_acl_keeps_a_fog_to_its_own_relay_and_gossip(
    federation: Federation,
) -> None:
    """fog-a's account on the cloud's Mosquitto: relays only under up/fog-a/, reads only the
    gossip addressed to it; devices publish held records only under their own key."""
    cloud = federation.cloud
    async with (
        mqtt(cloud, "fogpay/1/up/+/relay", "fogpay/1/held/+/records", user="issuer") as issuer,
        mqtt(cloud, "fogpay/1/gossip/#", user="fog-a") as fog_a,
        mqtt(cloud, user="fog-b") as fog_b,
        mqtt(cloud, user=HELD_DEVICE) as device,
    ):
        await fog_a.publish("fogpay/1/up/fog-b/relay", b"forged", qos=1)
        await fog_a.publish("fogpay/1/up/fog-a/relay", b"own", qos=1)
        assert await after_marker(issuer, "fogpay/1/up/fog-a/relay", b"own") == [b"own"]
        await fog_b.publish("fogpay/1/gossip/fog-b/seen", b"b's own", qos=1)
        await fog_b.publish("fogpay/1/gossip/fog-a/seen", b"for a", qos=1)
        assert await after_marker(fog_a, "fogpay/1/gossip/fog-a/seen", b"for a") == [b"for a"]
        other = "cd" * 32
        await device.publish(f"fogpay/1/held/{other}/records", b"not mine", qos=1)
        await device.publish(f"fogpay/1/held/{HELD_DEVICE}/records", b"mine", qos=1)
        got = await after_marker(issuer, f"fogpay/1/held/{HELD_DEVICE}/records", b"mine")
        assert got == [b"mine"]


@pytest.mark.mosquitto
async def test_two_fogs_of_one_site_gossip_over_the_direct_bridge(tmp_path: Path) -> None:
    """fogpay-peer-bridge.conf on fog-a's Mosquitto, to fog-b's Mosquitto as deployed on a
    Pi (fogpay-pi.conf, fogpay.acl, fog-a's account there): gossip crosses both ways."""
    passwd = password_file(tmp_path, ACCOUNTS)
    port = free_port()
    b = launch_mosquitto(tmp_path, port, deploy_conf("fogpay-pi.conf", tmp_path, port, passwd))
    d = tmp_path / "fog-a"
    d.mkdir()
    conf = bridge_for(PEER_BRIDGE, "fog-a", f"127.0.0.1:{port}", ACCOUNTS["fog-a"], "fog-b")
    a = start_mosquitto(d, extra=conf)
    try:
        async with (
            mqtt(a.endpoint.port, "fogpay/1/gossip/#") as at_a,
            mqtt(port, "fogpay/1/gossip/#", user="fog-b") as at_b,
        ):
            assert await crosses(at_a, at_b, "fogpay/1/gossip/fog-b/batch")
            assert await crosses(at_b, at_a, "fogpay/1/gossip/fog-a/racc")
    finally:
        a.stop()
        b.stop()


@pytest.mark.mosquitto
async def test_a_fog_broker_shows_its_bridge_state(federation: Federation) -> None:
    """``notifications_local_only``: the bridge's state is retained on the fog's broker (for
    monitoring), 1 once connected."""
    topic = "$SYS/broker/connection/fogpay-bridge-fog-a/state"
    async with asyncio.timeout(WAIT_S):
        while True:
            async with mqtt(federation.fogs["fog-a"], topic) as c:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        message = await anext(aiter(c.messages))
                        if message.payload == b"1":
                            assert message.retain
                            return
