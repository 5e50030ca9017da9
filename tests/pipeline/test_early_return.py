"""Early return end to end (docs/protocol.md 18.1): a real fog daemon, the real cloud service
and a real broker. A lease that lives an hour is given back after seconds (an idle owner, an
operator's ``fogpay fog return-leases`` against the running fog, a graceful stop with
``lease.return_on_stop``); the cloud closes it by the rules of 14.4 and the owner's credit is
freed long before the lease's ``na``."""

import asyncio
import json

from cloud.service import wall_ms
from protocol.reasons import Reason
from tests.integration.devices import wallet
from tests.integration.fogrun import running_fog, wait_counter
from tests.pipeline.mqtt import running_service
from tests.pipeline.test_end_to_end import first_payment, trusted
from tests.pipeline.world import FOG_EXTRA, Pipeline, return_leases, wait_until

LEASE_MS = 3_600_000  # the cloud's leases live an hour (the Pipeline's policy)


def lease_extra(lines: str) -> str:
    assert FOG_EXTRA.rstrip().endswith("check_interval_ms = 100")  # [lease] is the last table
    return FOG_EXTRA + lines


async def closed_early(p: Pipeline, drawn: int) -> None:
    """The first lease is closed at ``drawn``, long before its na: of it only ``drawn`` stays
    owed (any later lease counts whole while open)."""
    first = "SELECT lease_id FROM leases ORDER BY granted_ms LIMIT 1"

    async def closed() -> bool:
        rows = await p.query(f"SELECT state FROM leases WHERE lease_id = ({first})")
        return [r[0] for r in rows] == ["closed"]

    await wait_until(closed)
    [(state, booked, reported, na, granted)] = await p.query(
        "SELECT state, drawn_micros, reported_micros, not_after_ms, granted_ms FROM leases "
        f"WHERE lease_id = ({first})"
    )
    assert (state, booked, reported) == ("closed", drawn, drawn)
    assert na - granted == LEASE_MS and wall_ms() < na - LEASE_MS // 2  # far from expiry
    [(others,)] = await p.query(
        "SELECT coalesce(sum(amount_micros), 0) FROM leases WHERE state = 'open'"
    )
    assert await p.exposure("alice") == drawn + others  # 20,000 - drawn is credit again


async def test_an_idle_owner_s_lease_returns_to_its_credit_before_expiry(pipe: Pipeline) -> None:
    p = pipe
    await p.owner("alice", limit=1_000_000)
    config = await p.fog("fog-a", extra=lease_extra("return_idle_ms = 1500\n"))
    device = await p.device("alice", "fog-a")
    async with (
        running_service(p.service()),
        running_fog(config) as fog,
        wallet(p.edge.host, p.edge.port, "fog-a") as w,
    ):
        await trusted(fog)
        await first_payment(fog, w, device)  # the initial lease: 20,000
        assert (await w.pay(device, device.intent(2_000))).ok
        await wait_counter(fog, "lease_returned")
        await wait_counter(fog, "lease_closed")  # the cloud closed it and cleared its topic
        assert fog.counters["lease_returned_micros"] == 17_000
        await closed_early(p, 3_000)
        # the owner pays again: a new lease (first seen), not the returned one
        again = await w.pay(device, device.intent(1_000))
        assert again.reason == Reason.INSUFFICIENT_BUDGET
        await wait_counter(fog, "lease_request_answered", 2)
    rows = await p.query("SELECT count(*) FROM leases")
    assert rows[0][0] == 2


async def test_return_leases_works_against_a_running_fog(pipe: Pipeline) -> None:
    p = pipe
    await p.owner("alice", limit=1_000_000)
    config = await p.fog("fog-a")
    device = await p.device("alice", "fog-a")
    async with (
        running_service(p.service()),
        running_fog(config) as fog,
        wallet(p.edge.host, p.edge.port, "fog-a") as w,
    ):
        await trusted(fog)
        await first_payment(fog, w, device)
        assert (await w.pay(device, device.intent(4_000))).ok
        printed = json.loads(await return_leases(config, "--owner", "alice", "--json"))
        assert printed["returned_micros"] == 15_000
        assert [(x["owner"], x["drawn_micros"]) for x in printed["leases"]] == [("alice", 5_000)]
        # the running fog no longer draws on it, and reports it
        declined = await w.pay(device, device.intent(1_000))
        assert declined.reason == Reason.INSUFFICIENT_BUDGET
        await wait_counter(fog, "lease_closed")
        await closed_early(p, 5_000)


async def test_a_graceful_stop_returns_the_leases(pipe: Pipeline) -> None:
    p = pipe
    await p.owner("alice", limit=1_000_000)
    config = await p.fog("fog-a", extra=lease_extra("return_on_stop = true\n"))
    device = await p.device("alice", "fog-a")
    async with running_service(p.service()):
        async with (
            running_fog(config) as fog,
            wallet(p.edge.host, p.edge.port, "fog-a") as w,
        ):
            await trusted(fog)
            await first_payment(fog, w, device)
            assert (await w.pay(device, device.intent(6_000))).ok
            assert await p.exposure("alice") == 20_000
        # stopped: the lease was sealed, reported and sent before the fog went
        assert fog.counters["lease_returned"] == 1
        assert fog.counters["lease_reported"] == 1
        await closed_early(p, 7_000)


async def test_the_cloud_asks_an_idle_fog_for_its_lease_for_a_busy_one(pipe: Pipeline) -> None:
    """Rebalancing (docs/protocol.md 18.5) through the real service and two real fog
    daemons on one broker: fog-a's lease holds all of alice's credit; a payment at fog-b
    finds none, the cloud publishes an ``rbal`` (not retained) to fog-a, which gives the
    lease back (alice idle there), the cloud closes it, and fog-b's resent request is
    granted: the payment goes through with the cloud reachable and no peer transfer."""
    p = pipe
    await p.owner("alice", limit=20_000)  # exactly the policy's first lease
    config_a = await p.fog("fog-a", extra=lease_extra("recall_idle_ms = 500\n"))
    config_b = await p.fog("fog-b")
    dev_a = await p.device("alice", "fog-a")
    dev_b = await p.device("alice", "fog-b")
    async with (
        running_fog(config_a) as fog_a,
        running_fog(config_b) as fog_b,
        wallet(p.edge.host, p.edge.port, "fog-a") as wa,
        wallet(p.edge.host, p.edge.port, "fog-b") as wb,
        running_service(p.service()),
    ):
        await trusted(fog_a, 2)
        await trusted(fog_b, 2)
        await first_payment(fog_a, wa, dev_a)  # fog-a's lease: all 20,000 of alice's credit
        assert await p.exposure("alice") == 20_000
        await asyncio.sleep(1.0)  # alice idle at fog-a for longer than recall_idle_ms
        payload = dev_b.intent(2_000)
        for _ in range(120):  # what a device does: the same bytes again
            receipt = await wb.pay(dev_b, payload)
            if receipt.reason is None:
                break
            assert receipt.reason == Reason.INSUFFICIENT_BUDGET
            await asyncio.sleep(0.25)
        assert receipt.reason is None, "fog-b never got a lease"
        assert fog_a.counters.get("rbal_accepted", 0) == 1
        rows = await p.query("SELECT fog_id, state, drawn_micros FROM leases ORDER BY granted_ms")
        first, *later = [tuple(r) for r in rows]
        assert first == ("fog-a", "closed", 1_000)
        assert [r[:2] for r in later] == [("fog-b", "open")]
        # fog-a never draws on the lease it gave back
        late = await wa.pay(dev_a, dev_a.intent(1_000))
        assert late.reason == Reason.INSUFFICIENT_BUDGET
