"""Pruning the fog's log (FogStore.prune): only records whose batch the cloud acked, whose
lease is closed and that are old enough go; a prefix only, never the newest; the store
reopens and numbers on; a retransmission of a pruned intent changes nothing."""

import nacl.signing

from fog.store import Arrival
from protocol.leasing import LeaseReport
from protocol.signing import public_key, seal
from tests.fog.test_batcher import ack
from tests.fog.world import DAY_MS, NOW, World

HOUR_MS = 3_600_000
LATER = NOW + 2 * DAY_MS  # past the lease's expiry (NOW + 1 day)


def authorized(world: World, count: int) -> list[tuple[nacl.signing.SigningKey, bytes]]:
    """``count`` intents authorized at NOW, one device each, on one lease."""
    world.store.uplink_init()  # the daemon's start: the lease report table
    owner = world.owner()
    world.lease(amount=10**12)
    devices = [world.device(owner) for _ in range(count)]
    items = [(d, world.intent(d, 1, 1_000)) for d in devices]
    assert all(o.status == "ok" for o in world.send(*items))
    return items


def close_lease(world: World) -> None:
    """The lease expired, the fog reported it, the cloud cleared it."""
    (draws,) = world.store.lease_reports_due(now_ms=LATER)
    report = LeaseReport(
        lease_id=draws.lease_id,
        fog_id=world.fog_id,
        drawn_micros=draws.drawn_micros,
        last_batch=draws.last_batch,
        time_ms=LATER,
    )
    world.store.record_lease_report(draws, seal(report, world.fog_key), now_ms=LATER)
    assert world.store.close_lease(draws.lease_id, now_ms=LATER)


def log_indexes(world: World) -> list[int]:
    rows = world.store._conn.execute("SELECT n FROM log ORDER BY n").fetchall()
    return [int(r[0]) for r in rows]


def test_only_acked_closed_and_old_records_go_a_prefix_never_the_newest(world: World) -> None:
    items = authorized(world, 10)
    b1, b2, b3 = world.store.seal_due(now_ms=NOW, records_max=4, age_ms=0)  # 1-4, 5-8, 9-10
    prune = world.store.prune
    assert prune(now_ms=LATER, keep_ms=0) == 0  # nothing acked, lease open
    assert world.store.apply_ack(ack(world, b1)).status == "accepted"
    assert prune(now_ms=LATER, keep_ms=0) == 0  # the lease is still open
    close_lease(world)
    assert prune(now_ms=NOW + HOUR_MS, keep_ms=2 * HOUR_MS) == 0  # not old enough yet
    assert prune(now_ms=LATER, keep_ms=0) == 4  # batch 1 only: batch 2 is not acked
    assert log_indexes(world) == list(range(5, 11))
    assert world.store.apply_ack(ack(world, b2)).status == "accepted"
    assert prune(now_ms=LATER, keep_ms=0) == 4
    assert world.store.apply_ack(ack(world, b3)).status == "accepted"
    assert prune(now_ms=LATER, keep_ms=0) == 1  # 10, the newest, numbers the next
    assert log_indexes(world) == [10]
    assert world.store.counters()["records_pruned"] == 9

    # a retransmission of a pruned intent is declined (its q is used) and changes nothing
    before = world.store._conn.execute("SELECT * FROM devices ORDER BY device").fetchall()
    dev, payload = items[0]
    (o,) = world.store.process([Arrival(public_key(dev), payload)], now_ms=NOW)
    assert o.status == "declined"
    assert world.store._conn.execute("SELECT * FROM devices ORDER BY device").fetchall() == before
    # one not pruned still gets its stored receipt, byte for byte
    dev, payload = items[9]
    (again,) = world.store.process([Arrival(public_key(dev), payload)], now_ms=NOW)
    assert again.replay and again.log_index == 10


def test_unsealed_records_and_open_leases_stop_pruning(world: World) -> None:
    authorized(world, 8)
    b1, b2 = world.store.seal_due(now_ms=NOW, records_max=4, age_ms=DAY_MS)  # 1-4, 5-8
    world.store.apply_ack(ack(world, b2))
    close_lease(world)
    owner = world.owner("beta")
    world.lease("beta", amount=10**9)
    devs = [world.device(owner, owner_id="beta") for _ in range(2)]
    assert all(o.status == "ok" for o in world.send(*((d, world.intent(d, 1, 1)) for d in devs)))
    assert world.store.prune(now_ms=LATER, keep_ms=0) == 8  # 9 is not sealed (nor 10)
    assert log_indexes(world) == [9, 10]
    (b3,) = world.store.seal_due(now_ms=LATER, records_max=4, age_ms=0)
    world.store.apply_ack(ack(world, b3))
    assert world.store.prune(now_ms=LATER, keep_ms=0) == 0  # beta's lease is open
    assert (b1.number, b3.number) == (1, 3)


def test_the_store_reopens_after_pruning_and_numbers_on(world: World) -> None:
    authorized(world, 5)
    _, b2 = world.store.seal_due(now_ms=NOW, records_max=4, age_ms=0)  # 1-4, 5
    world.store.apply_ack(ack(world, b2))
    close_lease(world)
    assert world.store.prune(now_ms=LATER, keep_ms=0) == 4  # 5, the newest, stays
    store = world.reopen()  # the log is consecutive from 5, not from 1
    owner = world.owner("beta")
    world.lease("beta", amount=10**9)
    dev = world.device(owner, owner_id="beta")
    (o,) = store.process([Arrival(public_key(dev), world.intent(dev, 1, 1_000))], now_ms=NOW)
    assert o.status == "ok" and o.log_index == 6
    (b3,) = store.seal_due(now_ms=NOW, records_max=4, age_ms=0)
    assert (b3.number, b3.first_index, len(b3.records)) == (3, 6, 1)


def test_a_step_deletes_at_most_rows_max(world: World) -> None:
    authorized(world, 9)
    *_, last = world.store.seal_due(now_ms=NOW, records_max=4, age_ms=0)  # 1-4, 5-8, 9
    world.store.apply_ack(ack(world, last))
    close_lease(world)
    assert world.store.prune(now_ms=LATER, keep_ms=0, rows_max=3) == 3
    assert world.store.prune(now_ms=LATER, keep_ms=0, rows_max=3) == 3
    assert world.store.prune(now_ms=LATER, keep_ms=0, rows_max=3) == 2  # 9, the newest, stays
    assert log_indexes(world) == [9]
