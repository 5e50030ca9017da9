"""What a group reads is kept across groups only while the database provably has not changed
(fog/group.py): writers on the store's connection, other connections, the clock going back,
and many vouched bindings all give the decisions a store that reads everything afresh gives."""

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager

import nacl.signing
import pytest

from fog.group import VOUCHERS_MAX
from fog.store import Arrival, FogStore
from protocol.messages import Ack, BatchHeader, Revocation
from protocol.reasons import Reason
from protocol.signing import open_envelope, public_key, seal
from tests.fog.world import DAY_MS, NOW, World


@contextmanager
def statements(store: FogStore) -> Iterator[list[str]]:
    """The SQL statements the store runs on its connection meanwhile (SQLite's trace)."""
    seen: list[str] = []
    store._conn.set_trace_callback(seen.append)
    try:
        yield seen
    finally:
        store._conn.set_trace_callback(None)


def selects(seen: list[str]) -> list[str]:
    return [s for s in seen if s.lstrip().upper().startswith("SELECT")]


def second_store(world: World) -> FogStore:
    """Another FogStore (another connection) on the same database file."""
    return FogStore.open(
        world.path,
        fog_id=world.fog_id,
        fog_key=world.fog_key,
        issuer_key=public_key(world.issuer),
        policy=world.policy,
    )


def test_a_device_is_read_once_then_kept_across_groups(world: World) -> None:
    owner = world.owner()
    dev = world.device(owner)
    lease = world.lease()
    with statements(world.store) as first:
        assert world.pay(dev, 1).status == "ok"
    assert selects(first)  # read: bindings, device state, leases
    with statements(world.store) as later:
        assert world.pay(dev, 2).status == "ok"
        assert world.pay(dev, 3).status == "ok"
    assert selects(later) == []
    assert world.drawn() == {lease: (100_000_000, 3_000_000)}


def test_a_device_twice_in_a_group_sees_its_first_intent(world: World) -> None:
    owner = world.owner()
    dev = world.device(owner, day=3_000_000)
    lease = world.lease(amount=10_000_000)
    out = world.send(
        (dev, world.intent(dev, 1, 2_000_000)),
        (dev, world.intent(dev, 1, 1_000_000)),  # same q, other intent
        (dev, world.intent(dev, 2, 2_000_000)),  # day total 4 > 3
        (dev, world.intent(dev, 2, 1_000_000)),
        (dev, world.intent(dev, 1, 2_000_000)),  # retransmission of the first
    )
    assert [o.reason for o in out] == [
        None,
        Reason.SEQ_CONFLICT,
        Reason.LIMIT_DAY,
        None,
        None,
    ]
    assert out[4].replay and out[4].receipt == out[0].receipt
    assert world.drawn()[lease] == (10_000_000, 3_000_000)


def test_trust_material_between_groups_is_seen(world: World) -> None:
    owner = world.owner()
    dev = world.device(owner, tx=1_000_000)
    world.lease()
    assert world.pay(dev, 1).status == "ok"
    assert world.pay(dev, 2, 2_000_000).reason is Reason.LIMIT_TX
    new = world.binding(owner, public_key(dev), tx=5_000_000, nb=NOW - DAY_MS + 1)
    world.trust("bind", new)  # a newer binding with a higher limit
    assert world.pay(dev, 3, 2_000_000).status == "ok"
    world.revoke(public_key(dev))
    assert world.pay(dev, 4).reason is Reason.REVOKED


def test_a_write_on_the_stores_connection_is_seen(world: World) -> None:
    """Any writer on the store's connection (here a raw UPDATE, as a lease report does)
    moves total_changes: the next group reads again and draws nothing on the lease."""
    owner = world.owner()
    dev = world.device(owner)
    lease = world.lease()
    assert world.pay(dev, 1).status == "ok"
    world.store._conn.execute("UPDATE leases SET not_after_ms = -1 WHERE lease_id = ?", (lease,))
    assert world.pay(dev, 2).reason is Reason.INSUFFICIENT_BUDGET
    assert world.drawn()[lease] == (100_000_000, 1_000_000)


def test_another_connection_writing_is_seen(world: World) -> None:
    """Trust material stored through another connection (a second store on the same file,
    as an operator's tool would) is seen by the next group (PRAGMA data_version)."""
    owner = world.owner()
    dev = world.device(owner)
    world.lease()
    assert world.pay(dev, 1).status == "ok"
    other = second_store(world)
    try:
        revoked = other.put_trust("revoke", revocation(world, public_key(dev)), now_ms=NOW)
        assert revoked.status == "accepted"
    finally:
        other.close()
    assert world.pay(dev, 2).reason is Reason.REVOKED


def test_a_lease_changed_by_another_connection_is_not_drawn(world: World) -> None:
    """Had the group used what it read before, it would draw on a lease another connection
    closed (and its compare-and-set would fail); it reads again and declines."""
    owner = world.owner()
    dev = world.device(owner)
    lease = world.lease()
    assert world.pay(dev, 1).status == "ok"
    admin = sqlite3.connect(world.path, isolation_level=None)
    try:
        admin.execute("UPDATE leases SET not_after_ms = -1 WHERE lease_id = ?", (lease,))
    finally:
        admin.close()
    assert world.pay(dev, 2).reason is Reason.INSUFFICIENT_BUDGET
    assert world.drawn()[lease] == (100_000_000, 1_000_000)


def test_sealing_and_acks_keep_the_reads(world: World) -> None:
    owner = world.owner()
    dev = world.device(owner)
    world.lease()
    assert world.pay(dev, 1).status == "ok"
    [batch] = world.store.seal_due(now_ms=NOW, records_max=16, age_ms=0)
    header = open_envelope(batch.header, BatchHeader)
    ack = Ack(fog_id=world.fog_id, number=1, header_id=header.id)
    assert world.store.apply_ack(seal(ack, world.issuer)).status == "accepted"
    with statements(world.store) as seen:
        assert world.pay(dev, 2).status == "ok"
    assert selects(seen) == []


def test_the_binding_in_force_follows_the_clock_without_a_write(world: World) -> None:
    """Cached candidates are ranked at each group's time: the old binding until its na, the
    next one from its nb, whatever was read before."""
    owner = world.owner()
    k = nacl.signing.SigningKey.generate()
    d = public_key(k)
    world.trust("bind", world.binding(owner, d, tx=1_000_000, na=NOW + 1_000))
    world.trust("bind", world.binding(owner, d, tx=3_000_000, nb=NOW + 1_001))
    world.lease()
    assert world.pay(k, 1, 2_000_000).reason is Reason.LIMIT_TX
    assert world.pay(k, 2, 2_000_000, now_ms=NOW + 2_000, t=NOW + 2_000).status == "ok"
    assert world.pay(k, 3, 2_000_000, now_ms=NOW + 500, t=NOW + 500).reason is Reason.LIMIT_TX


def test_a_clock_gone_back_reads_the_leases_again(world: World) -> None:
    owner = world.owner()
    dev = world.device(owner)
    short = world.lease(amount=5_000_000, na=NOW + 1_000)
    assert world.pay(dev, 1, now_ms=NOW + 2_000, t=NOW).reason is Reason.INSUFFICIENT_BUDGET
    assert world.pay(dev, 2, now_ms=NOW).status == "ok"  # the lease is live again at NOW
    assert world.drawn()[short] == (5_000_000, 1_000_000)


def test_more_vouched_bindings_than_kept_still_choose_exactly(world: World) -> None:
    owner = world.owner()
    k = nacl.signing.SigningKey.generate()
    d = public_key(k)
    for i in range(VOUCHERS_MAX + 1):  # older bindings: tx 1
        world.trust("bind", world.binding(owner, d, tx=1_000_000, nb=NOW - DAY_MS + i))
    world.trust("bind", world.binding(owner, d, tx=3_000_000, nb=NOW - 10))  # the newest
    world.trust("bind", world.binding(owner, d, tx=9_000_000, nb=NOW + 10))  # not yet
    world.lease()
    assert world.pay(k, 1, 3_000_000).status == "ok"
    assert world.pay(k, 2, 4_000_000).reason is Reason.LIMIT_TX
    assert world.pay(k, 3, 4_000_000, now_ms=NOW + 10, t=NOW + 10).status == "ok"


def test_a_failed_group_forgets_what_it_applied(world: World) -> None:
    owner = world.owner()
    dev = world.device(owner, tx=10_000_000)
    lease = world.lease(amount=10_000_000)
    assert world.pay(dev, 1).status == "ok"
    conn = world.store._conn  # the fault on the store's own connection: no row changes
    conn.execute(
        "CREATE TRIGGER injected BEFORE INSERT ON log WHEN NEW.n = 2 "
        "BEGIN SELECT RAISE(ABORT, 'injected fault'); END"
    )
    with pytest.raises(sqlite3.IntegrityError, match="injected fault"):
        world.store.process([world_arrival(world, dev, 2, 5_000_000)], now_ms=NOW)
    conn.execute("DROP TRIGGER injected")
    assert world.pay(dev, 2, 9_000_000).status == "ok"  # 9 left: the failed 5 was forgotten
    assert world.drawn()[lease] == (10_000_000, 10_000_000)


def world_arrival(world: World, dev: nacl.signing.SigningKey, seq: int, amount: int) -> Arrival:
    return Arrival(public_key(dev), world.intent(dev, seq, amount))


def revocation(world: World, k: bytes) -> bytes:
    return seal(Revocation(key=k, time_ms=NOW, reason="test"), world.issuer)
