"""The cloud service's /metrics, /healthz and /readyz, scraped over 127.0.0.1 while a real fog
pays through it (real broker, real SQLite store): batches and records booked, leases granted
and outstanding as the store holds them, a malformed batch refused by reason."""

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiomqtt
import pytest

from cloud.config import MetricsConfig
from cloud.service import CloudService
from cloud.sqlitestore import SqliteStore
from protocol import topics
from tests.conftest import BrokerEndpoint, free_port
from tests.integration.devices import wallet
from tests.integration.fogrun import running_fog, wait_counter
from tests.observe.scrape import get, scrape, undocumented, value, wait_scrape
from tests.pipeline.mqtt import running_service
from tests.pipeline.test_end_to_end import first_payment, pay_all, trusted
from tests.pipeline.world import Pipeline, wait_until

WAIT_S = 15.0
METRICS = MetricsConfig(enabled=True, host="127.0.0.1", port=0)


@pytest.fixture
async def pipe(tmp_path: Path, amqtt_broker: BrokerEndpoint) -> AsyncIterator[Pipeline]:
    store = await SqliteStore.open(str(tmp_path / "cloud.db"))
    yield Pipeline(store, amqtt_broker, tmp_path)
    await store.close()


def service(p: Pipeline, *, port: int | None = None) -> CloudService:
    return CloudService(
        core=p.core(),
        broker_host=p.broker.host,
        broker_port=p.broker.port if port is None else port,
        store=p.store,
        stats_s=1.0,
        metrics=METRICS,
    )


async def test_ingest_leases_and_refusals_show_in_the_metrics(pipe: Pipeline) -> None:
    p = pipe
    await p.owner("alice", limit=1_000_000)
    config = await p.fog("fog-a")
    devices = [await p.device("alice", "fog-a") for _ in range(2)]
    async with (
        running_service(service(p)) as cloud,
        running_fog(config) as fog,
        wallet(p.edge.host, p.edge.port, "fog-a") as w,
    ):
        base = cloud.observer.url
        assert base is not None
        status, body = await get(base + "/readyz")
        assert (status, json.loads(body)) == (200, {"ready": True})
        assert (await get(base + "/healthz"))[0] == 200
        await trusted(fog, 2)
        ids = [(await first_payment(fog, w, devices[0])).intent_id]
        ids += await pay_all(w, devices, 5)

        async def all_booked() -> bool:
            return all(n == 1 for n in (await p.booked(ids)).values())

        await wait_until(all_booked)
        await wait_counter(fog, "batch_acked")
        s = await wait_scrape(
            base, lambda s: value(s, "fogpay_cloud_records_booked_total") == len(ids)
        )
        booked = value(s, "fogpay_cloud_batches_total", status="booked") or 0
        assert booked == cloud.counters["batch_booked"] >= 1
        assert value(s, "fogpay_cloud_batches_total", status="refused") == 0
        granted = value(s, "fogpay_cloud_lease_requests_total", outcome="granted", reason="")
        assert granted == cloud.counters["lease_granted"] >= 1
        rows = await p.query(
            "SELECT COUNT(*), SUM(amount_micros) FROM leases WHERE fog_id = 'fog-a' "
            "AND state = 'open'"
        )
        n, micros = rows[0]
        assert n >= 1
        assert value(s, "fogpay_cloud_leases_outstanding", fog_id="fog-a", currency="EUR") == n
        assert (
            value(s, "fogpay_cloud_leases_outstanding_micros", fog_id="fog-a", currency="EUR")
            == micros
        )
        assert value(s, "fogpay_cloud_broker_up") == 1
        assert value(s, "fogpay_cloud_store_read_ok") == 1

        # a batch that does not decode: refused, counted by reason, nothing booked
        async with aiomqtt.Client(p.broker.host, p.broker.port) as client:
            await client.publish(topics.batch_topic("fog-a"), b"\x93garbage", qos=1)
        s = await wait_scrape(
            base, lambda s: value(s, "fogpay_cloud_batches_total", status="refused") == 1
        )
        refused = {
            labels[0][1]: v
            for (name, labels), v in s.items()
            if name == "fogpay_cloud_batches_refused_total"
        }
        assert list(refused.values()) == [1] and list(refused) == ["malformed"]
        assert value(s, "fogpay_cloud_records_booked_total") == len(ids)
        assert undocumented(s, "cloud.md") == []


async def test_readyz_is_503_until_the_broker_is_there(pipe: Pipeline) -> None:
    svc = service(pipe, port=free_port())  # nothing listens there

    task = asyncio.create_task(svc.run())
    try:
        async with asyncio.timeout(WAIT_S):
            while svc.observer.url is None:  # noqa: ASYNC110 (no event for it)
                await asyncio.sleep(0.01)
        status, body = await get(svc.observer.url + "/readyz")
        assert (status, json.loads(body)) == (
            503,
            {"ready": False, "why": ["broker not connected"]},
        )
        s = await scrape(svc.observer.url)
        assert value(s, "fogpay_cloud_broker_up") == 0 and value(s, "fogpay_cloud_ready") == 0
    finally:
        await svc.stop()
        async with asyncio.timeout(WAIT_S):
            await task
    assert svc.observer.url is None  # closed with the service
