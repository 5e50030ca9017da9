"""Hypothesis strategies for every message type, drawn over the full ranges we accept."""

from typing import Any

import nacl.signing
from hypothesis import strategies as st

from protocol import limits
from protocol.messages import (
    ID_PATTERN,
    RESERVED_FOG_IDS,
    ZERO_HASH,
    ZERO_KEY,
    Ack,
    BatchHeader,
    Binding,
    FogCredential,
    Intent,
    Lease,
    Message,
    OwnerCredential,
    Receipt,
    Revocation,
)
from protocol.reasons import Reason

ids = st.from_regex(ID_PATTERN, fullmatch=True)
fog_ids = ids.filter(lambda s: s not in RESERVED_FOG_IDS)
keys = st.binary(min_size=32, max_size=32)
hashes = st.binary(min_size=32, max_size=32)
lease_ids = st.binary(min_size=16, max_size=16)
currencies = st.from_regex(r"[A-Z]{3}", fullmatch=True)
uints = st.integers(0, limits.UINT64_MAX)
pos_uints = st.integers(1, limits.UINT64_MAX)
amounts = st.integers(limits.AMOUNT_MICROS_MIN, limits.AMOUNT_MICROS_MAX)
caps = st.integers(0, limits.AMOUNT_MICROS_MAX)
seeds = st.binary(min_size=32, max_size=32)


@st.composite
def windows(draw: st.DrawFn) -> dict[str, int]:
    nb = draw(st.integers(0, limits.UINT64_MAX - 1))
    return {"not_before_ms": nb, "not_after_ms": draw(st.integers(nb + 1, limits.UINT64_MAX))}


def owners() -> st.SearchStrategy[OwnerCredential]:
    return st.builds(lambda w, **kw: OwnerCredential(**w, **kw), windows(), owner_id=ids, key=keys)


def fogs() -> st.SearchStrategy[FogCredential]:
    return st.builds(lambda w, **kw: FogCredential(**w, **kw), windows(), fog_id=fog_ids, key=keys)


def bindings(pay_max: int = limits.PAY_LIST_MAX) -> st.SearchStrategy[Binding]:
    pay = st.none() | st.lists(ids, min_size=1, max_size=pay_max, unique=True).map(tuple)
    return st.builds(
        lambda w, **kw: Binding(**w, **kw),
        windows(),
        device=keys,
        owner_id=ids,
        currency=currencies,
        tx_max_micros=caps,
        day_max_micros=caps,
        payees=pay,
    )


revoke_reasons = st.text(max_size=64).filter(lambda s: len(s.encode()) <= 64)


def revocations() -> st.SearchStrategy[Revocation]:
    return st.builds(Revocation, key=keys, time_ms=uints, reason=revoke_reasons)


def intents(device: bytes | None = None) -> st.SearchStrategy[Intent]:
    return st.builds(
        Intent,
        device=st.just(device) if device is not None else keys,
        fog_id=fog_ids,
        seq=pos_uints,
        payee_id=ids,
        amount_micros=amounts,
        currency=currencies,
        time_ms=uints,
        memo=st.none() | st.binary(max_size=limits.MEMO_BYTES_MAX),
    )


@st.composite
def receipts(draw: st.DrawFn) -> Receipt:
    common: dict[str, Any] = {"intent_id": draw(hashes), "time_ms": draw(uints)}
    if draw(st.booleans()):
        return Receipt(
            **common,
            device=draw(keys),
            seq=draw(pos_uints),
            status="ok",
            log_index=draw(pos_uints),
            lease_id=draw(lease_ids),
        )
    reason = draw(st.sampled_from(list(Reason)))
    if reason == Reason.MALFORMED:
        return Receipt(**common, device=ZERO_KEY, seq=0, status="declined", reason=reason)
    return Receipt(
        **common, device=draw(keys), seq=draw(pos_uints), status="declined", reason=reason
    )


def leases() -> st.SearchStrategy[Lease]:
    return st.builds(
        Lease,
        lease_id=lease_ids,
        owner_id=ids,
        fog_id=fog_ids,
        amount_micros=amounts,
        currency=currencies,
        not_after_ms=uints,
    )


@st.composite
def batch_headers(draw: st.DrawFn) -> BatchHeader:
    number = draw(pos_uints)
    return BatchHeader(
        fog_id=draw(fog_ids),
        number=number,
        prev_id=ZERO_HASH if number == 1 else draw(hashes),
        first_index=draw(pos_uints),
        count=draw(st.integers(1, limits.BATCH_RECORDS_MAX)),
        root=draw(hashes),
        time_ms=draw(uints),
    )


def acks() -> st.SearchStrategy[Ack]:
    return st.builds(Ack, fog_id=fog_ids, number=pos_uints, header_id=hashes)


# Binding envelopes must stay within 1,024 bytes: at most 8 payees of 63 characters fit.
SEALABLE: dict[str, st.SearchStrategy[Message]] = {
    "owner": owners(),
    "fog": fogs(),
    "bind": bindings(pay_max=8),
    "revoke": revocations(),
    "intent": intents(),
    "receipt": receipts(),
    "lease": leases(),
    "batch": batch_headers(),
    "ack": acks(),
}
BODIES: dict[str, st.SearchStrategy[Message]] = SEALABLE | {"bind": bindings()}


def signing_keys() -> st.SearchStrategy[nacl.signing.SigningKey]:
    return seeds.map(nacl.signing.SigningKey)
