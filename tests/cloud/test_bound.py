"""The partition bound B(o) (cloud/bound.py, docs/protocol.md 17.9): the pure function on a
case computed by hand, and the store reader on a real store."""

from cloud.bound import DAY_MS, OpenLease, days_touched, lease_term, owner_bound, partition_bound
from tests.cloud.world import World


def test_a_case_computed_by_hand() -> None:
    # owner o: three open leases on two fogs, two devices
    leases = [
        OpenLease("fog-a", amount_micros=10_000_000, booked_micros=2_500_000, life_ms=3_600_000),
        OpenLease("fog-a", amount_micros=5_000_000, booked_micros=6_000_000, life_ms=DAY_MS),
        OpenLease("fog-b", amount_micros=8_000_000, booked_micros=0, life_ms=2 * 3_600_000),
    ]
    # lease term: (10 - 2.5) + max(0, 5 - 6) + (8 - 0) = 15.5 EUR
    assert lease_term(leases) == 7_500_000 + 0 + 8_000_000
    # L = 1 day (the longest): D = floor(1) + 2 = 3; day term: 2 fogs x (1 + 0.5) EUR x 3
    b = partition_bound(leases, [1_000_000, 500_000], policy_life_ms=3_600_000)
    assert (b.days, b.fogs, b.devices, b.life_ms) == (3, 2, 2, DAY_MS)
    assert b.day_term_micros == 2 * 1_500_000 * 3 == 9_000_000
    assert b.lease_term_micros == 15_500_000
    assert b.micros == 9_000_000  # the day limits bind here
    # with a device allowed 10 EUR a day, the leases bind instead
    b = partition_bound(leases, [10_000_000, 500_000], policy_life_ms=3_600_000)
    assert (b.day_term_micros, b.micros) == (2 * 10_500_000 * 3, 15_500_000)


def test_days_touched() -> None:
    assert days_touched(0) == 2  # granted at 23:59:59.999, expiring after midnight
    assert days_touched(3_600_000) == 2
    assert days_touched(DAY_MS - 1) == 2
    assert days_touched(DAY_MS) == 3  # noon to noon: three days, two of them partial


def test_no_open_lease_no_exposure_beyond_the_cloud() -> None:
    b = partition_bound([], [5_000_000], policy_life_ms=3_600_000)
    assert (b.micros, b.lease_term_micros, b.day_term_micros, b.days) == (0, 0, 0, 2)


async def test_owner_bound_reads_the_store(world: World) -> None:
    w = world
    await w.owner("alice")
    fog = await w.fog("fog-a")
    await w.fog("fog-b")
    await w.device("alice", day_max_micros=2_000_000)
    device = await w.device("alice", day_max_micros=3_000_000)
    await w.device("alice", day_max_micros=99_000_000, not_after_ms=w.now - 1)  # expired
    lease_a = (await w.lease("alice", "fog-a", 4_000_000)).lease.lease_id
    await w.lease("alice", "fog-b", 1_000_000)
    from cloud.ingest import Ingestor

    ingestor = Ingestor(store=w.store, issuer=w.issuer, clock=w.clock)
    await ingestor.ingest_batch(
        fog.cut([fog.authorize(device, seq=1, lease_id=lease_a, amount=750_000)])
    )
    b = await w.tx(lambda tx: owner_bound(tx, "alice", now_ms=w.now, policy_life_ms=1))
    # the World grants leases of the default policy's life, 1 h: D = 2
    assert (b.fogs, b.devices, b.days) == (2, 2, 2)
    assert b.lease_term_micros == (4_000_000 - 750_000) + 1_000_000
    assert b.day_term_micros == 2 * (2_000_000 + 3_000_000) * 2
    assert b.micros == 4_250_000
