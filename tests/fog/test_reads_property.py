"""Property: a store that keeps its reads across groups decides exactly as one reopened (so
reading everything afresh) before every group: the same receipts, byte for byte, and the same
money, sequence and log tables, whatever arrives, in whatever groups, whatever the clock."""

import sqlite3
import tempfile
from pathlib import Path
from typing import Any

import nacl.signing
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fog.store import Arrival, FogStore, Outcome
from protocol.messages import OwnerCredential, Revocation
from protocol.signing import public_key, seal
from tests.fog.world import DAY_MS, NOW, World, key

OWNERS = ("acme", "bolt")
DEVICE_KEYS = [key() for _ in range(4)]  # device i belongs to OWNERS[i % 2]

pay_op = st.tuples(
    st.just("pay"),
    st.integers(0, len(DEVICE_KEYS) - 1),
    st.integers(1, 3_000_000),  # amount
    st.integers(1, 8),  # q: repeats give stale, seq_conflict and retransmissions
)
lease_op = st.tuples(
    st.just("lease"), st.sampled_from(OWNERS), st.integers(1, 9_000_000), st.integers(0, 60_000)
)
bind_op = st.tuples(
    st.just("bind"),
    st.integers(0, len(DEVICE_KEYS) - 1),
    st.integers(500_000, 4_000_000),  # tx limit
    st.integers(-30_000, 30_000),  # nb relative to NOW
    st.integers(1_000, 90_000),  # length of validity
)
revoke_op = st.tuples(st.just("revoke"), st.integers(0, len(DEVICE_KEYS) - 1))
tick_op = st.tuples(st.just("tick"), st.integers(-20_000, 30_000))
group_op = st.tuples(st.just("group"))
seal_op = st.tuples(st.just("seal"))
ops = st.lists(
    st.one_of(
        pay_op, pay_op, pay_op, pay_op, lease_op, bind_op, revoke_op, tick_op, group_op, group_op
    )
    | seal_op,
    min_size=10,
    max_size=60,
)


class Twins:
    """Store ``kept`` (one connection all along) and ``fresh`` (reopened before each group)
    on two files, fed the same material."""

    def __init__(self, tmp: Path) -> None:
        self.world = World(tmp / "kept.db")  # keys, material builders, and the kept store
        self.fresh_path = tmp / "fresh.db"
        self.fresh = self._open_fresh()

    def _open_fresh(self) -> FogStore:
        w = self.world
        return FogStore.open(
            self.fresh_path,
            fog_id=w.fog_id,
            fog_key=w.fog_key,
            issuer_key=public_key(w.issuer),
            policy=w.policy,
        )

    def trust(self, msg_type: str, envelope: bytes, now_ms: int) -> None:
        a = self.world.store.put_trust(msg_type, envelope, now_ms=now_ms)
        b = self.fresh.put_trust(msg_type, envelope, now_ms=now_ms)
        assert a == b

    def process(self, arrivals: list[Arrival], now_ms: int) -> None:
        self.fresh.close()
        self.fresh = self._open_fresh()
        a = self.world.store.process(arrivals, now_ms=now_ms)
        b = self.fresh.process(arrivals, now_ms=now_ms)
        assert [_decided(o) for o in a] == [_decided(o) for o in b]
        for o in a:
            event(f"outcome {o.reason or ('replay' if o.replay else 'ok')}")

    def seal(self, now_ms: int) -> None:
        a = self.world.store.seal_due(now_ms=now_ms, records_max=3, age_ms=0)
        b = self.fresh.seal_due(now_ms=now_ms, records_max=3, age_ms=0)
        assert [s.wire for s in a] == [s.wire for s in b]

    def close(self) -> None:
        self.world.store.close()
        self.fresh.close()


def _decided(o: Outcome) -> tuple[object, ...]:
    return (o.receipt, o.status, o.reason, o.replay, o.log_index, o.owner_id)


def tables(path: Path) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(path)
    try:
        rows: list[tuple[object, ...]] = []
        for table in ("leases", "devices", "log", "batches"):
            rows += [(table, *r) for r in conn.execute(f"SELECT * FROM {table} ORDER BY 1")]
        return rows
    finally:
        conn.close()


def _bind(
    twins: Twins, owners: dict[str, nacl.signing.SigningKey], op: tuple[Any, ...], now: int
) -> None:
    _, i, tx, nb, length = op
    owner_id = OWNERS[i % 2]
    w = twins.world
    env = w.binding(
        owners[owner_id],
        public_key(DEVICE_KEYS[i]),
        owner_id=owner_id,
        tx=tx,
        nb=NOW + nb,
        na=NOW + nb + length,
    )
    if NOW + nb + length >= now:  # the store refuses material already expired
        twins.trust("bind", env, now)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops)
def test_kept_reads_decide_as_fresh_reads(program: list[tuple[Any, ...]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        twins = Twins(Path(tmp))
        w = twins.world
        owners = {o: nacl.signing.SigningKey.generate() for o in OWNERS}
        for owner_id, k in owners.items():
            env = seal(
                OwnerCredential(
                    owner_id=owner_id,
                    key=public_key(k),
                    not_before_ms=NOW - DAY_MS,
                    not_after_ms=NOW + DAY_MS,
                ),
                w.issuer,
            )
            twins.trust("owner", env, NOW)
        for i, dev in enumerate(DEVICE_KEYS):
            o = OWNERS[i % 2]
            twins.trust("bind", w.binding(owners[o], public_key(dev), owner_id=o), NOW)
        for owner_id in OWNERS:
            twins.trust("lease", w.lease_envelope(owner_id, 8_000_000), NOW)
        now, pending = NOW, []
        for op in program:
            if op[0] == "pay":
                dev = DEVICE_KEYS[op[1]]
                pending.append(Arrival(public_key(dev), w.intent(dev, op[3], op[2], t=now)))
            elif op[0] == "lease":
                if NOW + op[3] >= now:
                    twins.trust("lease", w.lease_envelope(op[1], op[2], na=NOW + op[3]), now)
            elif op[0] == "bind":
                _bind(twins, owners, op, now)
            elif op[0] == "revoke":
                r = Revocation(key=public_key(DEVICE_KEYS[op[1]]), time_ms=now, reason="t")
                twins.trust("revoke", seal(r, w.issuer), now)
            elif op[0] == "tick":
                now = max(NOW - 60_000, now + op[1])
            elif op[0] == "seal":
                twins.seal(now)
            else:
                twins.process(pending, now)
                pending = []
        twins.process(pending, now)
        twins.close()
        assert tables(w.path) == tables(twins.fresh_path)
