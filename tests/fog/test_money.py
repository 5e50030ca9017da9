"""Money moves once: idempotent retransmissions, leases never overdrawn, state durable."""

import sqlite3

import pytest

from fog.store import Arrival
from protocol.messages import Receipt
from protocol.reasons import Reason
from protocol.signing import open_envelope, public_key
from tests.fog.world import DAY_MS, NOW, World


def test_retransmission_gets_identical_bytes_and_no_second_draw(world: World) -> None:
    owner = world.owner()
    dev = world.device(owner)
    lease = world.lease(amount=10_000_000)
    payload = world.intent(dev, 1, 3_000_000)
    [first] = world.send((dev, payload))
    before = world.money_dump()
    [again, again2] = world.send((dev, payload), (dev, payload), now_ms=NOW + 5_000)
    assert again.receipt == first.receipt == again2.receipt
    assert again.replay and again2.replay and not first.replay
    assert again.log_index == first.log_index == 1
    assert world.money_dump() == before
    assert world.drawn()[lease] == (10_000_000, 3_000_000)
    assert world.store.counters()["intents_replayed"] == 2


def test_retransmission_within_one_group(world: World) -> None:
    owner = world.owner()
    dev = world.device(owner)
    world.lease(amount=10_000_000)
    payload = world.intent(dev, 1, 3_000_000)
    a, b = world.send((dev, payload), (dev, payload))
    assert a.status == "ok" and b.replay and a.receipt == b.receipt


def test_retransmission_is_answered_even_after_revocation(world: World) -> None:
    """Spec: the stored receipt comes right after the first three checks; it stands."""
    owner = world.owner()
    dev = world.device(owner)
    world.lease()
    payload = world.intent(dev, 1)
    [first] = world.send((dev, payload))
    world.revoke(public_key(dev))
    [again] = world.send((dev, payload))
    assert again.replay and again.receipt == first.receipt
    assert world.pay(dev, 2).reason is Reason.REVOKED


def test_retransmission_on_wrong_topic_is_still_topic_mismatch(world: World) -> None:
    owner = world.owner()
    dev, other = world.device(owner), world.device(owner)
    world.lease()
    payload = world.intent(dev, 1)
    world.send((dev, payload))
    [o] = world.send((other, payload))
    assert o.reason is Reason.TOPIC_MISMATCH and not o.replay


def test_declined_intent_changes_nothing(world: World) -> None:
    owner = world.owner()
    dev = world.device(owner, tx=2_000_000, day=3_000_000)
    world.lease(amount=2_500_000)
    assert world.pay(dev, 1, 2_000_000).status == "ok"
    before = world.money_dump()
    declines = [
        world.pay(dev, 2, 2_000_001).reason,  # limit_tx
        world.pay(dev, 2, 1_000_001).reason,  # limit_day
        world.pay(dev, 2, 600_000).reason,  # insufficient_budget (500_000 left)
        world.pay(dev, 1, 1).reason,  # seq_conflict
        world.pay(dev, 2, 1, currency="USD").reason,
    ]
    assert declines == [
        Reason.LIMIT_TX,
        Reason.LIMIT_DAY,
        Reason.INSUFFICIENT_BUDGET,
        Reason.SEQ_CONFLICT,
        Reason.CURRENCY,
    ]
    assert world.money_dump() == before
    # and the same q is evaluated afresh once it can pass
    assert world.pay(dev, 2, 500_000).status == "ok"


def test_log_indexes_consecutive_and_receipt_names_the_lease(world: World) -> None:
    owner = world.owner()
    devs = [world.device(owner) for _ in range(3)]
    lease = world.lease()
    out = world.send(*[(d, world.intent(d, 1)) for d in devs])
    assert [o.log_index for o in out] == [1, 2, 3]
    for o in out:
        r = open_envelope(o.receipt, Receipt).msg
        assert r.lease_id == lease and r.time_ms == NOW and r.log_index == o.log_index


def test_lease_exhausted_exactly_in_one_group(world: World) -> None:
    owner = world.owner()
    devs = [world.device(owner) for _ in range(10)]
    lease = world.lease(amount=7_000_000)
    out = world.send(*[(d, world.intent(d, 1, 1_000_000)) for d in devs])
    assert [o.status for o in out] == ["ok"] * 7 + ["declined"] * 3
    assert {o.reason for o in out[7:]} == {Reason.INSUFFICIENT_BUDGET}
    assert world.drawn()[lease] == (7_000_000, 7_000_000)


def test_lease_exhausted_exactly_across_groups_and_reopen(world: World) -> None:
    owner = world.owner()
    devs = [world.device(owner) for _ in range(6)]
    lease = world.lease(amount=10_000_000)
    ok = 0
    for q in range(1, 4):
        out = world.send(*[(d, world.intent(d, q, 700_000)) for d in devs])
        ok += sum(o.status == "ok" for o in out)
        world.reopen()
    assert ok == 14  # 14 * 0.7 = 9.8 <= 10 < 15 * 0.7
    assert world.drawn()[lease] == (10_000_000, 9_800_000)
    assert world.pay(devs[0], 10, 200_000).status == "ok"
    assert world.pay(devs[1], 10, 1).reason is Reason.INSUFFICIENT_BUDGET


def test_overlapping_leases_soonest_expiry_first_whole_amount_from_one(world: World) -> None:
    owner = world.owner()
    dev = world.device(owner)
    late = world.lease(amount=5_000_000, na=NOW + 2 * DAY_MS)
    soon = world.lease(amount=1_500_000, na=NOW + DAY_MS)
    lease_of = {}
    for q, amount in enumerate([1_000_000, 1_000_000, 400_000], start=1):
        o = world.pay(dev, q, amount)
        lease_of[q] = open_envelope(o.receipt, Receipt).msg.lease_id
    # 1.0 from soon; 1.0 does not fit in soon's 0.5 so late; 0.4 fits soon again
    assert lease_of == {1: soon, 2: late, 3: soon}
    assert world.drawn()[soon] == (1_500_000, 1_400_000)
    assert world.drawn()[late] == (5_000_000, 1_000_000)


def test_state_survives_close_and_reopen(world: World) -> None:
    owner = world.owner()
    dev = world.device(owner, day=3_000_000)
    world.lease()
    payload = world.intent(dev, 1, 2_000_000)
    [first] = world.send((dev, payload))
    before = world.money_dump()
    store = world.reopen()
    assert world.money_dump() == before
    [again] = world.send((dev, payload))
    assert again.receipt == first.receipt and again.replay
    assert world.pay(dev, 1, 1).reason is Reason.SEQ_CONFLICT
    assert world.pay(dev, 2, 1_000_001).reason is Reason.LIMIT_DAY  # day total kept
    assert world.pay(dev, 2, 1_000_000).log_index == 2
    assert store.counters()["intents_ok"] == 1


def test_trust_survives_reopen_without_the_broker(world: World) -> None:
    owner = world.owner()
    dev = world.device(owner)
    world.lease()
    envelopes = world.store.trust_envelopes()
    assert [t for t, _ in envelopes] == ["owner", "bind", "lease"]
    world.reopen()
    assert world.pay(dev, 1).status == "ok"
    assert world.store.trust_envelopes() == envelopes


def test_empty_group(world: World) -> None:
    assert world.store.process([], now_ms=NOW) == []


def test_huge_sequence_numbers(world: World) -> None:
    owner = world.owner()
    dev = world.device(owner)
    world.lease()
    top = 2**64 - 1
    assert world.pay(dev, top - 1).status == "ok"
    assert world.pay(dev, top - 1, 2).reason is Reason.SEQ_CONFLICT
    assert world.pay(dev, top).status == "ok"
    world.reopen()
    assert world.pay(dev, 2**63).reason is Reason.STALE


def test_malformed_never_touches_the_database(world: World) -> None:
    owner = world.owner()
    dev = world.device(owner)
    world.lease()
    before = world.money_dump()
    junk = [Arrival(public_key(dev), bytes([i % 256]) * i) for i in range(0, 600, 37)]
    out = world.store.process(junk, now_ms=NOW)
    assert {o.reason for o in out} == {Reason.MALFORMED}
    assert world.money_dump() == before
    assert world.store.counters()["declined_malformed"] == len(junk)


def test_storage_failure_mid_group_rolls_back_the_whole_group(world: World) -> None:
    """Fault injected in real SQLite (a trigger that aborts the second log insert): the group
    raises, nothing of it is stored, and the next group starts again at n = 1."""
    owner = world.owner()
    devs = [world.device(owner) for _ in range(3)]
    lease = world.lease(amount=10_000_000)
    group = [(d, world.intent(d, 1)) for d in devs]
    before = world.money_dump()
    admin = sqlite3.connect(world.path, isolation_level=None)
    admin.execute(
        "CREATE TRIGGER injected BEFORE INSERT ON log WHEN NEW.n = 2 "
        "BEGIN SELECT RAISE(ABORT, 'injected fault'); END"
    )
    with pytest.raises(sqlite3.IntegrityError, match="injected fault"):
        world.send(*group)
    admin.execute("DROP TRIGGER injected")
    admin.close()
    assert world.money_dump() == before
    out = world.send(*group)
    assert [o.log_index for o in out] == [1, 2, 3]
    assert world.drawn()[lease] == (10_000_000, 3_000_000)
