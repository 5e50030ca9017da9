"""The production topology: the fog and its devices on one Mosquitto, the cloud on another,
joined by the bridge of ``deploy/mosquitto/fogpay-bridge.conf`` (as shipped, with the cloud's
address, no TLS and no password). Trust material, the lease and its acks come down the
bridge; batches and the lease request go up; everything is booked once."""

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cloud.sqlitestore import SqliteStore
from tests.conftest import BrokerEndpoint, free_port, start_mosquitto
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
