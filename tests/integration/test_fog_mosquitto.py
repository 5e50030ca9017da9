"""The fog end to end through a Mosquitto subprocess (``broker.url``), with the ACL file from
``deploy/mosquitto/`` and per-account passwords, as in production."""

import asyncio
import subprocess
from pathlib import Path

import pytest

from protocol.reasons import Reason
from tests.conftest import BrokerEndpoint, free_port, launch_mosquitto, start_mosquitto
from tests.integration.devices import Device, Issuer, publish_retained, wallet, write_fog_files
from tests.integration.fogrun import running_fog, wait_counter, wait_for

pytestmark = pytest.mark.mosquitto

FOG = "fog-m"
DEPLOY = Path(__file__).parents[2] / "deploy" / "mosquitto"
ACL_FILE = DEPLOY / "fogpay.acl"
TLS_KEYS = ("certfile", "keyfile", "cafile", "tls_version", "listener 8883")


def deploy_conf(name: str, directory: Path, port: int, passwd: Path) -> str:
    """A deploy/mosquitto config as shipped, moved to a free loopback port and test paths
    (TLS listener left out: the test has no certificates)."""
    out = []
    for line in (DEPLOY / name).read_text().splitlines():
        if line.startswith(TLS_KEYS):
            continue
        if line.startswith("listener 1883"):
            line = f"listener {port} 127.0.0.1"
        line = line.replace("/etc/mosquitto/fogpay.passwd", str(passwd))
        line = line.replace("/etc/mosquitto/fogpay.acl", str(ACL_FILE))
        line = line.replace("/var/lib/mosquitto/", f"{directory}/")
        line = line.replace("log_dest syslog", "log_dest stderr")
        out.append(line)
    return "\n".join(out) + "\n"


def password_file(directory: Path, accounts: dict[str, str]) -> Path:
    path = directory / "passwd"
    path.touch(mode=0o600)
    for user, password in accounts.items():
        subprocess.run(
            ["mosquitto_passwd", "-b", str(path), user, password], check=True, timeout=30
        )
    return path


@pytest.mark.parametrize("conf", ["fogpay-pi.conf", "fogpay-server.conf"])
async def test_fog_serves_devices_through_mosquitto_as_deployed(tmp_path: Path, conf: str) -> None:
    issuer = Issuer()
    alice, bob = Device(FOG), Device(FOG)
    accounts = {FOG: "fog-pw", "issuer": "issuer-pw"}
    accounts |= {alice.public.hex(): "alice-pw", bob.public.hex(): "bob-pw"}
    passwd = password_file(tmp_path, accounts)
    port = free_port()
    broker = launch_mosquitto(tmp_path, port, deploy_conf(conf, tmp_path, port, passwd))
    try:
        url = f"mqtt://{FOG}:fog-pw@127.0.0.1:{broker.endpoint.port}"
        config = write_fog_files(
            tmp_path, fog_id=FOG, issuer_key=issuer.public, broker=f'url = "{url}"'
        )
        trust = [issuer.owner_credential(), issuer.lease(FOG, 1_000)]
        trust += [issuer.binding(d.public, tx_max_micros=600) for d in (alice, bob)]
        # retained before the fog starts: Mosquitto keeps it for the fog's subscription
        await publish_retained(
            "127.0.0.1", broker.endpoint.port, trust, username="issuer", password="issuer-pw"
        )
        async with running_fog(config) as fog:
            await wait_counter(fog, "lease_accepted")
            await wait_counter(fog, "bind_accepted", 2)
            async with wallet(
                "127.0.0.1",
                broker.endpoint.port,
                FOG,
                username=alice.public.hex(),
                password="alice-pw",
                devices=[alice],
            ) as w:
                intent = alice.intent(500)
                first = await w.pay(alice, intent)
                again = await w.pay(alice, intent)
                assert first.ok and again == first
                assert (await w.pay(alice, alice.intent(700))).reason == Reason.LIMIT_TX
                assert (await w.pay(alice, alice.intent(600))).reason == (
                    Reason.INSUFFICIENT_BUDGET
                )
                # alice may not speak for bob: Mosquitto drops it, the fog never sees it
                received = fog.counters["intent_received"]
                await w.client.publish(bob.intent_topic, bob.intent(1), qos=1)
                assert (await w.pay(alice, alice.intent(500))).ok
                assert fog.counters["intent_received"] == received + 1
    finally:
        broker.stop()


async def test_fog_on_the_shared_mosquitto_fixture(
    tmp_path: Path, mosquitto_broker: BrokerEndpoint
) -> None:
    issuer = Issuer()
    devices = [Device(FOG) for _ in range(10)]
    config = write_fog_files(
        tmp_path, fog_id=FOG, issuer_key=issuer.public, broker=f'url = "{mosquitto_broker.url}"'
    )
    async with running_fog(config) as fog:
        trust = [issuer.owner_credential(), issuer.lease(FOG, 1_000)]
        trust += [issuer.binding(d.public) for d in devices]
        await publish_retained("127.0.0.1", mosquitto_broker.port, trust)
        await wait_for(lambda: fog.counters.get("bind_accepted", 0) == 10)
        await wait_counter(fog, "lease_accepted")
        async with wallet("127.0.0.1", mosquitto_broker.port, FOG) as w:
            receipts = await asyncio.gather(*(w.pay(d, d.intent(150)) for d in devices))
    assert sum(1 for r in receipts if r.ok) == 6  # 6 x 150 <= 1,000 < 7 x 150
    assert {r.reason for r in receipts if not r.ok} == {Reason.INSUFFICIENT_BUDGET}


async def test_fog_reconnects_after_the_broker_restarts_and_needs_no_retained_state(
    tmp_path: Path,
) -> None:
    issuer = Issuer()
    device = Device(FOG)
    first = start_mosquitto(tmp_path)  # persistence off: a restart forgets everything
    port = first.endpoint.port
    config = write_fog_files(
        tmp_path, fog_id=FOG, issuer_key=issuer.public, broker=f'url = "{first.endpoint.url}"'
    )
    second = None
    try:
        async with running_fog(config) as fog:
            trust = [issuer.owner_credential(), issuer.lease(FOG, 1_000)]
            trust.append(issuer.binding(device.public))
            await publish_retained("127.0.0.1", port, trust)
            await wait_counter(fog, "lease_accepted")
            await wait_counter(fog, "bind_accepted")
            async with wallet("127.0.0.1", port, FOG) as w:
                assert (await w.pay(device, device.intent(100))).ok
            first.stop()
            await wait_counter(fog, "broker_disconnected")
            second = start_mosquitto(tmp_path, port=port)
            await wait_counter(fog, "broker_connected", 2)
            async with wallet("127.0.0.1", port, FOG) as w:
                receipt = await w.pay(device, device.intent(100))
            assert receipt.ok and receipt.log_index == 2
    finally:
        first.stop()
        if second is not None:
            second.stop()
