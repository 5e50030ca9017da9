"""Properties of the pure booking plan over random batches (hypothesis)."""

import hashlib

from hypothesis import given, settings
from hypothesis import strategies as st

from cloud.booking import BindingRow, BookState, LeaseRow, plan
from cloud.verify import CheckedBatch, CheckedHeader, CheckedRecord, Fault

DEVICES = [bytes([i]) * 32 for i in range(1, 5)]
LEASES = [bytes([i]) * 16 for i in range(1, 4)]
HEADER = CheckedHeader("fog-a", 1, bytes(32), 1, 1, bytes(32), 0, bytes(32), bytes(32), b"")


def state() -> BookState:
    binding = BindingRow("alice", "EUR", 0, 1_000, 0, 1_000)
    return BookState(
        bindings={d: [binding] for d in DEVICES[:3]},  # the 4th device has no binding
        leases={
            LEASES[0]: LeaseRow("alice", "fog-a", "EUR", 500, 1_000, 0),
            LEASES[1]: LeaseRow("bob", "fog-a", "EUR", 500, 1_000, 0),  # another owner's
        },  # LEASES[2] unknown
        booked=set(),
        seqs={},
    )


record = st.builds(
    lambda d, q, lease, amount, payee, t, body, fault: (d, q, lease, amount, payee, t, body, fault),
    st.sampled_from(DEVICES),
    st.integers(1, 4),
    st.sampled_from(LEASES),
    st.integers(1, 300),
    st.sampled_from(["shop", "cafe", "alice"]),
    st.integers(0, 2_000),
    st.integers(0, 3),  # which intent body: same (d, q, body) is the same intent id
    st.sampled_from([None, None, None, Fault.BAD_INTENT]),
)


def batch(specs: list[tuple[object, ...]]) -> CheckedBatch:
    out = []
    for pos, (d, q, lease, amount, payee, t, body, fault) in enumerate(specs):
        iid = hashlib.sha256(repr((d, q, body)).encode()).digest()
        if fault is not None:
            out.append(CheckedRecord(pos, b"r", fault, iid))  # type: ignore[arg-type]
            continue
        out.append(CheckedRecord(pos, b"r", None, iid, d, q, payee, amount, "EUR", lease, t))  # type: ignore[arg-type]
    return CheckedBatch(HEADER, tuple(out))


@settings(max_examples=200, deadline=None)
@given(st.lists(record, min_size=1, max_size=40))
def test_plan_balances_books_once_and_accounts_for_every_record(
    specs: list[tuple[object, ...]],
) -> None:
    b = batch(specs)
    p = plan(b, state())
    assert sum(p.balances.values()) == 0
    ids = [t.intent_id for t in p.transfers]
    assert len(ids) == len(set(ids))
    assert len(p.transfers) + len(p.rejected) + p.duplicates == len(b.records)
    assert sum(p.lease_draws.values()) == sum(t.amount_micros for t in p.transfers)
    assert all(t.lease_id == LEASES[0] and t.debit == "alice" for t in p.transfers)
    seen: dict[tuple[bytes, bytes], set[bytes]] = {}
    for t in p.transfers:
        seen.setdefault((t.device, t.seq), set()).add(t.intent_id)
    cloned = {d for (d, _), ids_ in seen.items() if len(ids_) > 1}
    assert p.suspend == cloned
    overdrawn = sum(p.lease_draws.values()) > 500
    assert any(a.kind == "lease_overdrawn" for a in p.alarms) == overdrawn
