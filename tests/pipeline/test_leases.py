"""Leases end to end: a fog that runs low on an owner's budget asks for more and gets it; an
expired lease is reported, closed by the cloud, and its unused credit returns to the owner
(the cloud's exposure drops to what was drawn)."""

import sqlite3
from pathlib import Path

from cloud.leases import LeasePolicy
from tests.integration.devices import wallet
from tests.integration.fogrun import running_fog, wait_counter
from tests.pipeline.mqtt import running_service
from tests.pipeline.test_end_to_end import first_payment, trusted
from tests.pipeline.world import FOG_EXTRA, Pipeline


async def test_a_fog_running_low_asks_for_more_budget(pipe: Pipeline) -> None:
    p = pipe
    await p.owner("alice", limit=1_000_000)
    config = await p.fog("fog-a")
    device = await p.device("alice", "fog-a")
    async with (
        running_service(p.service()) as cloud,
        running_fog(config) as fog,
        wallet(p.edge.host, p.edge.port, "fog-a") as w,
    ):
        await trusted(fog)
        await first_payment(fog, w, device)  # the initial lease: 20,000; 1,000 drawn
        for _ in range(19):  # 19,000 more: 0 left, under request_below_micros (1,000)
            assert (await w.pay(device, device.intent(1_000))).ok
        await wait_counter(fog, "lease_request_answered", 2)
        assert (await w.pay(device, device.intent(1_000))).ok  # drawn on the top-up
    assert cloud.counters["leases_granted"] == 2
    rows = await p.query("SELECT amount_micros FROM leases ORDER BY granted_ms")
    assert [r[0] for r in rows] == [20_000, 50_000]


async def test_an_expired_lease_is_reported_and_its_unused_credit_returns(
    pipe: Pipeline,
) -> None:
    await report_flow(pipe)


async def test_once_acked_and_its_lease_closed_the_fog_prunes_its_log(pipe: Pipeline) -> None:
    extra = FOG_EXTRA.replace("age_ms = 100\n", "age_ms = 100\nkeep_acked_ms = 1\n")
    assert "keep_acked_ms" in extra
    db = await report_flow(pipe, extra=extra, prune=True)
    con = sqlite3.connect(db)
    try:
        assert con.execute("SELECT n FROM log").fetchall() == [(2,)]  # the newest stays
    finally:
        con.close()
    rows = await pipe.query("SELECT count(*) FROM transfers")
    assert rows[0][0] == 2  # the cloud holds both payments


async def report_flow(p: Pipeline, *, extra: str = FOG_EXTRA, prune: bool = False) -> Path:
    """Draw 3,000 on a 20,000 lease that lives 1.5 s; the fog reports it once expired and
    sealed; the cloud closes it and clears its topic; the fog closes it too. Returns the
    fog's database."""
    p.policy = LeasePolicy(20_000, 100_000, 1_500)  # leases live 1.5 s
    await p.owner("alice", limit=1_000_000)
    config = await p.fog("fog-a", extra=extra)
    device = await p.device("alice", "fog-a")
    async with (
        running_service(p.service()) as cloud,
        running_fog(config) as fog,
        wallet(p.edge.host, p.edge.port, "fog-a") as w,
    ):
        await trusted(fog)
        await first_payment(fog, w, device)
        assert (await w.pay(device, device.intent(2_000))).ok
        assert await p.exposure("alice") == 20_000  # the whole lease, until reported
        await wait_counter(fog, "lease_closed")
        assert fog.counters["lease_reported"] == 1
        if prune:
            await wait_counter(fog, "records_pruned")
        else:
            assert "records_pruned" not in fog.counters  # a week by default
    assert await p.exposure("alice") == 3_000  # only what was drawn stays owed
    [(state, drawn, reported)] = await p.query(
        "SELECT state, drawn_micros, reported_micros FROM leases"
    )
    assert (state, drawn, reported) == ("closed", 3_000, 3_000)
    assert cloud.counters["leases_closed"] >= 1
    return p.directory / "fog-a" / "fog.sqlite"
