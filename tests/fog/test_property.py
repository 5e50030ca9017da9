"""Property: whatever arrives, in whatever groups, the fog never authorizes beyond its leases."""

import sqlite3
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fog.authorize import Policy
from fog.store import Arrival
from protocol.messages import Receipt
from protocol.signing import open_envelope, public_key
from tests.fog.world import NOW, World, key

OWNERS = ("acme", "bolt")
DEVICE_KEYS = [key() for _ in range(4)]  # device i belongs to OWNERS[i % 2]

lease_op = st.tuples(
    st.just("lease"),
    st.sampled_from(OWNERS),
    st.integers(1, 5_000_000),  # amount
    st.integers(-1000, 60_000),  # expiry relative to NOW
)
pay_op = st.tuples(
    st.just("pay"),
    st.integers(0, len(DEVICE_KEYS) - 1),
    st.integers(1, 2_000_000),  # amount
    st.integers(1, 12),  # q (repeats give stale, seq_conflict or retransmissions)
)
tick_op = st.tuples(st.just("tick"), st.integers(0, 30_000))
commit_op = st.tuples(st.just("commit"))
reopen_op = st.tuples(st.just("reopen"))
ops = st.lists(
    st.one_of(lease_op, pay_op, pay_op, pay_op, tick_op, commit_op, reopen_op),
    min_size=5,
    max_size=60,
)
initial_leases = st.lists(lease_op, min_size=1, max_size=3)


def check_invariants(world: World, receipts: list[bytes]) -> None:
    conn = sqlite3.connect(world.path)
    try:
        leases = {
            bytes(r[0]): (r[1], r[2], r[3], r[4])
            for r in conn.execute(
                "SELECT lease_id, owner_id, amount_micros, drawn_micros, not_after_ms FROM leases"
            )
        }
        drawn_by_log: dict[bytes, int] = {}
        log_rows = conn.execute("SELECT count(*) FROM log").fetchone()[0]
        for lease_id, owner_id, amount, at_ms in conn.execute(
            "SELECT lease_id, owner_id, amount_micros, at_ms FROM log"
        ):
            lease = leases[bytes(lease_id)]
            assert lease[0] == owner_id and at_ms <= lease[3]
            drawn_by_log[bytes(lease_id)] = drawn_by_log.get(bytes(lease_id), 0) + amount
    finally:
        conn.close()
    for lease_id, (_, amount, drawn, _) in leases.items():
        assert drawn == drawn_by_log.get(lease_id, 0) <= amount
    ok = [(r, open_envelope(r, Receipt).msg) for r in receipts]
    ok = [(raw, r) for raw, r in ok if r.status == "ok"]
    by_intent: dict[bytes, set[bytes]] = {}
    for raw, r in ok:
        by_intent.setdefault(r.intent_id, set()).add(raw)
    # each authorized intent has one receipt, byte for byte, and one log index
    assert all(len(raws) == 1 for raws in by_intent.values())
    assert len(by_intent) == len({r.log_index for _, r in ok}) == log_rows
    event("authorized: none" if not ok else "authorized: some")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(initial_leases, ops)
def test_never_authorizes_beyond_the_leases(
    leases: list[tuple[Any, ...]], program: list[tuple[Any, ...]]
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        world = World(Path(tmp) / "fog.db", policy=Policy(rate_per_s=5.0, rate_burst=3))
        owner_keys = {o: world.owner(o) for o in OWNERS}
        for i, dev in enumerate(DEVICE_KEYS):
            o = OWNERS[i % 2]
            world.trust("bind", world.binding(owner_keys[o], public_key(dev), owner_id=o))
        now, pending, receipts = NOW, [], []
        for op in leases + program:
            if op[0] == "lease":
                if NOW + op[3] >= now:  # the store refuses leases already expired
                    world.lease(op[1], op[2], na=NOW + op[3])
            elif op[0] == "pay":
                dev = DEVICE_KEYS[op[1]]
                pending.append(Arrival(public_key(dev), world.intent(dev, op[3], op[2], t=now)))
            elif op[0] == "tick":
                now += op[1]
            else:
                receipts += [o.receipt for o in world.store.process(pending, now_ms=now)]
                pending = []
                if op[0] == "reopen":
                    world.reopen()
        receipts += [o.receipt for o in world.store.process(pending, now_ms=now)]
        check_invariants(world, receipts)
        world.store.close()
