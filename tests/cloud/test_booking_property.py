"""Properties of the pure booking plan over random batches (hypothesis)."""

import dataclasses
import hashlib
import pickle

from hypothesis import given, settings
from hypothesis import strategies as st

from cloud.booking import BindingRow, BookState, LeaseRow, book, plan
from cloud.chain import Chain
from cloud.verify import CheckedBatch, CheckedHeader, CheckedRecord, Fault
from tests.cloud import reference_booking

DEVICES = [bytes([i]) * 32 for i in range(1, 5)]
LEASES = [bytes([i]) * 16 for i in range(1, 4)]
HEADER = CheckedHeader("fog-a", 1, bytes(32), 1, 1, bytes(32), 0, bytes(32), bytes(32), b"")


def state() -> BookState:
    binding = BindingRow("alice", "EUR", 0, 1_000, 0, 1_000)
    bindings = {d: [binding] for d in DEVICES[:2]}
    # the 3rd device: an expired GBP binding, then one valid from t = 500 in USD and in EUR
    bindings[DEVICES[2]] = [
        BindingRow("alice", "GBP", 0, 400, 0, 1_000),
        BindingRow("alice", "USD", 500, 2_000, 0, 2_000),
        BindingRow("alice", "EUR", 500, 2_000, 0, 2_000),
    ]
    return BookState(
        bindings=bindings,  # the 4th device has no binding
        leases={
            LEASES[0]: LeaseRow("alice", "fog-a", "EUR", 500, 1_000, 0),
            LEASES[1]: LeaseRow("bob", "fog-a", "EUR", 500, 1_000, 0),  # another owner's
        },  # LEASES[2] unknown
        booked=set(),
        seqs={},
    )


record = st.builds(
    lambda *fields: fields,
    st.sampled_from(DEVICES),
    st.integers(1, 4),
    st.sampled_from(LEASES),
    st.integers(1, 300),
    st.sampled_from(["shop", "cafe", "alice"]),
    st.sampled_from([0, 399, 400, 401, 499, 500, 1_000, 1_001, 2_000]) | st.integers(0, 2_001),
    st.integers(0, 3),  # which intent body: same (d, q, body) is the same intent id
    st.sampled_from([None, None, None, Fault.BAD_INTENT]),
    st.sampled_from(["EUR", "EUR", "EUR", "USD"]),
)


def batch(specs: list[tuple[object, ...]]) -> CheckedBatch:
    out = []
    for pos, (d, q, lease, amount, payee, t, body, fault, cur) in enumerate(specs):
        iid = hashlib.sha256(repr((d, q, body)).encode()).digest()
        if fault is not None:
            out.append(CheckedRecord(pos, fault, iid))  # type: ignore[arg-type]
            continue
        out.append(CheckedRecord(pos, None, iid, d, q, payee, amount, cur, lease, t))  # type: ignore[arg-type]
    return CheckedBatch.of(HEADER, out)


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
    assert len(p.transfers) + len(p.rejected) + p.duplicates == b.count == len(specs)
    assert sum(p.lease_draws.values()) == sum(t.amount_micros for t in p.transfers)
    assert all(t.lease_id == LEASES[0] and t.debit == "alice" for t in p.transfers)
    seen: dict[bytes, set[bytes]] = {}
    for t in p.transfers:
        seen.setdefault(t.dseq, set()).add(t.intent_id)
    cloned = {dseq[:32] for dseq, ids_ in seen.items() if len(ids_) > 1}
    assert p.suspend == cloned
    overdrawn = sum(p.lease_draws.values()) > 500
    assert any(a.kind == "lease_overdrawn" for a in p.alarms) == overdrawn


@settings(max_examples=300, deadline=None)
@given(st.lists(record, min_size=1, max_size=40), st.sets(st.integers(0, 39)))
def test_plan_equals_the_per_record_reference(
    specs: list[tuple[object, ...]], booked_before: set[int]
) -> None:
    """The column-wise plan decides exactly what the per-record one did (commit f48db37):
    transfers, rejections and their faults, duplicates, draws, balances, alarms, suspensions.
    Some intents and (device, q) are booked already."""
    b = batch(specs)
    old_state, new_state = state(), state()
    for r in b.records():
        if r.position in booked_before and r.intent_id is not None and r.fault is None:
            for s in (old_state, new_state):
                s.booked.add(r.intent_id)
                s.seqs[r.device + r.seq.to_bytes(8, "big")] = r.intent_id
    want, got = reference_booking.plan(b, old_state), plan(b, new_state)
    assert got == want
    assert (new_state.booked, new_state.seqs) == (old_state.booked, old_state.seqs)


def test_checked_batch_columns_round_trip() -> None:
    specs = [(DEVICES[i % 4], i, LEASES[0], 5, "shop", 10, i, None, "EUR") for i in range(6)]
    specs[2] = (*specs[2][:7], Fault.BAD_INTENT, "EUR")
    b = batch(specs)
    assert [r.position for r in b.records()] == list(range(6))
    assert b.records()[2].fault is Fault.BAD_INTENT and len(b.draws) == 5 == b.count - 1
    assert CheckedBatch.of(HEADER, b.records()) == b
    assert pickle.loads(pickle.dumps(b)) == b
    assert b.intent_ids() == [r.intent_id for r in b.records()]


@settings(max_examples=200, deadline=None)
@given(st.lists(record, min_size=1, max_size=40))
def test_book_writes_the_reference_plan_as_rows(specs: list[tuple[object, ...]]) -> None:
    """``book`` (plan + rows + the chain after) writes exactly what the per-record reference
    decides, and nothing it does not."""
    b = batch(specs)
    header = dataclasses.replace(HEADER, count=b.count)
    raw = tuple(bytes([p]) * 3 for p in range(b.count))  # each record's bytes, as received
    verified = CheckedBatch(header, b.faults, b.draws, raw)
    want = reference_booking.plan(verified, state())
    got = book(verified, state(), Chain(), now_ms=77)
    assert got.plan == want
    assert got.batch_row == ("fog-a", 1, header.header_id, header.raw, 1, b.count, 77)
    assert got.chain == Chain(1, header.header_id, 1 + b.count)
    assert got.record_rows == [
        ("fog-a", 1, p, b"" if i is None else i, raw[p]) for p, i in enumerate(b.intent_ids())
    ]
    assert got.transfer_rows == [(*t, "fog-a", 1, 77) for t in want.transfers]
    assert got.draw_rows == [(a, lease) for lease, a in sorted(want.lease_draws.items())]
    assert got.account_rows == sorted((a, c, d) for (a, c), d in want.balances.items())
    assert sum(d for _, _, d in got.account_rows) == 0
    assert got.rejected_rows == [("fog-a", 1, p, i, str(f)) for p, i, f in want.rejected]
