"""The pipeline through Mosquitto as deployed (``deploy/mosquitto/fogpay-server.conf`` and
``fogpay.acl``, passwords per account): the cloud as ``issuer``, the fog as its fog_id, the
device as its key. Everything the pipeline sends is allowed: lease request and lease down,
batches up and acks down, the lease report up and its clearing down."""

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cloud.leases import LeasePolicy
from cloud.sqlitestore import SqliteStore
from tests.conftest import BrokerEndpoint, free_port, launch_mosquitto
from tests.integration.devices import wallet
from tests.integration.fogrun import running_fog, wait_counter
from tests.integration.test_fog_mosquitto import deploy_conf, password_file
from tests.pipeline.mqtt import running_service
from tests.pipeline.test_end_to_end import first_payment, trusted
from tests.pipeline.world import Pipeline, wait_until

pytestmark = pytest.mark.mosquitto


@pytest.fixture
async def deployed(tmp_path: Path) -> AsyncIterator[tuple[Pipeline, Path]]:
    passwd = tmp_path / "passwd"
    port = free_port()
    store = await SqliteStore.open(str(tmp_path / "cloud.db"))
    cloud = BrokerEndpoint("127.0.0.1", port, "issuer", "issuer-pw")
    edge = BrokerEndpoint("127.0.0.1", port, "fog-a", "fog-pw")
    yield Pipeline(store, cloud, tmp_path, fog_broker=edge), passwd
    await store.close()


async def test_the_pipeline_through_mosquitto_with_the_shipped_acl(
    deployed: tuple[Pipeline, Path],
) -> None:
    p, passwd = deployed
    p.policy = LeasePolicy(20_000, 100_000, 1_500)
    await p.owner("alice", limit=1_000_000)
    config = await p.fog("fog-a")
    device = await p.device("alice", "fog-a")
    accounts = {"fog-a": "fog-pw", "issuer": "issuer-pw", device.public.hex(): "device-pw"}
    password_file(p.directory, accounts)
    port = p.broker.port
    broker = launch_mosquitto(
        p.directory, port, deploy_conf("fogpay-server.conf", p.directory, port, passwd)
    )
    try:
        async with (
            running_service(p.service()) as cloud,
            running_fog(config) as fog,
            wallet(
                "127.0.0.1",
                port,
                "fog-a",
                username=device.public.hex(),
                password="device-pw",
                devices=[device],
            ) as w,
        ):
            await trusted(fog)
            ids = [(await first_payment(fog, w, device)).intent_id]
            ids.append((await w.pay(device, device.intent(2_000))).intent_id)

            async def booked() -> bool:
                return all(n == 1 for n in (await p.booked(ids)).values())

            await wait_until(booked)
            await wait_counter(fog, "batch_acked")
            await wait_counter(fog, "lease_closed")
            assert cloud.counters["leases_granted"] == 1
        assert await p.exposure("alice") == 3_000
        await p.check_books(ids)
    finally:
        broker.stop()
