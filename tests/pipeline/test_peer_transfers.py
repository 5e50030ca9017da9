"""Peer transfers with real processes' pieces (docs/protocol.md 18.2): two fog daemons, peers
of each other, on one broker; the cloud service goes away, one fog runs dry and borrows from
the other, payments continue; the operator gives both leases back, the cloud comes back, and
everything reconciles: every payment booked once, both leases closed by their fogs' reports,
the owner owing exactly what was paid."""

import asyncio

from protocol.reasons import Reason
from tests.integration.devices import wallet
from tests.integration.fogrun import running_fog, wait_counter
from tests.pipeline.mqtt import running_service
from tests.pipeline.test_end_to_end import first_payment, trusted
from tests.pipeline.world import FOG_EXTRA, Pipeline, return_leases, wait_until

HEAL_TIMEOUT_S = 90.0  # resends back off while the cloud is away (up to tens of seconds)
PAY_ATTEMPTS = 60


def extra(peer: str) -> str:
    assert FOG_EXTRA.rstrip().endswith("check_interval_ms = 100")  # [lease] is the last table
    return FOG_EXTRA + f'peer_transfers = true\n\n[federation]\npeers = ["{peer}"]\n'


async def test_a_fog_cut_off_from_the_cloud_borrows_from_its_peer(pipe: Pipeline) -> None:
    p = pipe
    await p.owner("alice", limit=1_000_000)
    config_a = await p.fog("fog-a", extra=extra("fog-b"))
    config_b = await p.fog("fog-b", extra=extra("fog-a"))
    dev_a = await p.device("alice", "fog-a")
    dev_b = await p.device("alice", "fog-b")
    async with (
        running_fog(config_a) as fog_a,
        running_fog(config_b) as fog_b,
        wallet(p.edge.host, p.edge.port, "fog-a") as wa,
        wallet(p.edge.host, p.edge.port, "fog-b") as wb,
    ):
        async with running_service(p.service()):
            await trusted(fog_a, 2)
            await trusted(fog_b, 2)
            await wait_counter(fog_b, "fog_accepted", 2)  # both fog credentials: the peers'
            await first_payment(fog_a, wa, dev_a)  # fog-a's lease: 20,000, 1,000 drawn
        # --- the cloud is gone: fog-b's lease request goes unanswered; it asks fog-a
        payload = dev_b.intent(2_000)
        ids = []
        for _ in range(PAY_ATTEMPTS):  # what a device does: the same bytes again
            receipt = await wb.pay(dev_b, payload)
            if receipt.reason is None:
                break
            assert receipt.reason == Reason.INSUFFICIENT_BUDGET
            await asyncio.sleep(0.25)
        assert receipt.reason is None, "fog-b never got budget from its peer"
        ids.append(receipt.intent_id)
        assert fog_a.counters.get("xreq_accepted", 0) == 1
        assert fog_b.counters.get("xfer_accepted", 0) == 1
        xid = receipt.lease_id  # drawn on the sub-lease: the transfer id
        for _ in range(2):  # payments continue at both fogs
            r = await wb.pay(dev_b, dev_b.intent(1_000))
            assert r.ok and r.lease_id == xid
            ids.append(r.intent_id)
        r = await wa.pay(dev_a, dev_a.intent(3_000))
        assert r.ok
        ids.append(r.intent_id)
        # --- the operator gives both leases back; then the cloud comes back
        await return_leases(config_a)
        await return_leases(config_b)
        async with running_service(p.service()):

            async def closed() -> bool:
                rows = await p.query(
                    "SELECT count(*) FROM leases l WHERE state = 'closed' AND (lease_id = ? "
                    "OR lease_id IN (SELECT parent_id FROM peer_transfers))",
                    (xid,),
                )
                return bool(rows[0][0] == 2)

            await wait_until(closed, timeout_s=HEAL_TIMEOUT_S)
            await wait_counter(fog_a, "lease_closed")
            await wait_counter(fog_b, "lease_closed")
    first_id = (await p.query("SELECT intent_id FROM transfers ORDER BY rowid LIMIT 1"))[0][0]
    ids.append(bytes(first_id))  # fog-a's first payment
    booked = await p.booked(ids)
    assert all(n == 1 for n in booked.values()), booked
    [(given,)] = await p.query("SELECT amount_micros FROM peer_transfers")
    assert given == 9_500  # half of fog-a's room (19,000) at the time
    rows = await p.query(
        "SELECT fog_id, drawn_micros, reported_micros FROM leases WHERE state = 'closed' "
        "ORDER BY granted_ms"
    )
    assert [tuple(r) for r in rows] == [
        ("fog-a", 4_000, 4_000 + 9_500),  # booked draws; its report counts what it gave
        ("fog-b", 4_000, 4_000),
    ]
    [(others,)] = await p.query(
        "SELECT coalesce(sum(amount_micros), 0) FROM leases WHERE state = 'open'"
    )
    assert await p.exposure("alice") == 8_000 + others  # what was paid, nothing created
