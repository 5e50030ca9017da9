"""Golden vectors for device makers: ``python -m protocol.vectors [out.json]``.

Writes ``protocol/vectors/v1.json`` (or the given path) from fixed seeds, so running it twice
gives the same bytes (Ed25519 signatures are deterministic). The file holds

- ``envelopes``: at least one valid envelope of each of the nine types, with the signer's
  32-byte seed, the body bytes, the envelope bytes and the message id;
- ``malformed``: payloads a receiver must refuse, with the topic's type and the reason
  (``malformed`` or ``bad_signature``). Bad bodies carry a *valid* signature over the bad
  bytes, so the expected reason is unambiguous;
- ``merkle``: trees of every size 0..17 (arbitrary leaves, each a prefix of the same 17
  leaves) and one tree of real records, with the root, an inclusion proof for every index and
  (an extra key) a consistency proof from every smaller size.

``build()`` is pure; only ``main()`` touches the file system.
"""

import hashlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import msgpack
import nacl.signing

from protocol import merkle
from protocol.batch import encode_record
from protocol.codec import pack
from protocol.messages import (
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
    encode_body,
)
from protocol.reasons import Reason
from protocol.signing import message_id, seal_signed, signing_input

VERSION: Final = 1
DEFAULT_PATH: Final = Path(__file__).parent / "vectors" / "v1.json"
MERKLE_SIZE_MAX: Final = 17
T0_MS: Final = 1_767_225_600_000  # 2026-01-01T00:00:00Z
DAY_MS: Final = 86_400_000
YEAR_MS: Final = 365 * DAY_MS
ROLES: Final = ("issuer", "owner", "fog", "device", "stranger")


def seed(role: str) -> bytes:
    """The fixed 32-byte Ed25519 seed of a role: SHA-256("fogpay/1/vectors/" + role)."""
    return hashlib.sha256(b"fogpay/1/vectors/" + role.encode()).digest()


def key(role: str) -> nacl.signing.SigningKey:
    return nacl.signing.SigningKey(seed(role))


def pub(role: str) -> bytes:
    return bytes(key(role).verify_key)


# ---------------------------------------------------------------- valid messages


def _intent(**over: Any) -> Intent:
    fields: dict[str, Any] = {
        "device": pub("device"),
        "fog_id": "fog-1",
        "seq": 1,
        "payee_id": "charger-7",
        "amount_micros": 1_250_000,
        "currency": "EUR",
        "time_ms": T0_MS + 1_000,
    }
    return Intent(**(fields | over))


def _messages() -> list[tuple[str, str, Message]]:
    """(name, signer role, message) of every valid envelope, records excluded."""
    validity: dict[str, Any] = {"not_before_ms": T0_MS, "not_after_ms": T0_MS + YEAR_MS}
    bind: dict[str, Any] = {
        "device": pub("device"),
        "owner_id": "acme-fleet",
        "currency": "EUR",
        "tx_max_micros": 5_000_000,
        "day_max_micros": 50_000_000,
    }
    return [
        ("owner", "issuer", OwnerCredential(owner_id="acme-fleet", key=pub("owner"), **validity)),
        ("fog", "issuer", FogCredential(fog_id="fog-1", key=pub("fog"), **validity)),
        ("bind", "owner", Binding(**bind, **validity)),
        ("bind_pay_list", "owner", Binding(**bind, **validity, payees=("charger-7", "park.2"))),
        ("revoke", "issuer", Revocation(key=pub("stranger"), time_ms=T0_MS, reason="lost")),
        ("intent", "device", _intent()),
        ("intent_memo", "device", _intent(seq=2, memo=b"session-0042")),
        ("intent_amount_max", "device", _intent(seq=3, amount_micros=2**53, currency="JPY")),
        ("intent_amount_min", "device", _intent(seq=4, amount_micros=1, payee_id="a")),
        (
            "lease",
            "issuer",
            Lease(
                lease_id=bytes(range(16)),
                owner_id="acme-fleet",
                fog_id="fog-1",
                amount_micros=100_000_000,
                currency="EUR",
                not_after_ms=T0_MS + DAY_MS,
            ),
        ),
    ]


def _receipts(intent_id: bytes) -> list[tuple[str, str, Message]]:
    base: dict[str, Any] = {
        "intent_id": intent_id,
        "device": pub("device"),
        "seq": 1,
        "time_ms": T0_MS + 1_005,
    }
    return [
        ("receipt_ok", "fog", Receipt(**base, status="ok", log_index=1, lease_id=bytes(range(16)))),
        (
            "receipt_declined",
            "fog",
            Receipt(**base, status="declined", reason=Reason.INSUFFICIENT_BUDGET),
        ),
        (
            "receipt_malformed",
            "fog",
            Receipt(
                intent_id=hashlib.sha256(b"\xc1").digest(),
                device=ZERO_KEY,
                seq=0,
                status="declined",
                reason=Reason.MALFORMED,
                time_ms=T0_MS + 2_000,
            ),
        ),
    ]


def _chain(record: bytes) -> list[tuple[str, str, Message]]:
    header = BatchHeader(
        fog_id="fog-1",
        number=1,
        prev_id=ZERO_HASH,
        first_index=1,
        count=1,
        root=merkle.root_of_records([record]),
        time_ms=T0_MS + 60_000,
    )
    header_id = message_id(header.TYPE, seal_signed(header, key("fog")).body)
    ack = Ack(fog_id="fog-1", number=1, header_id=header_id)
    return [("batch", "fog", header), ("ack", "issuer", ack)]


def entry(name: str, role: str, msg: Message) -> dict[str, str]:
    signed = seal_signed(msg, key(role))
    return {
        "name": name,
        "type": msg.TYPE,
        "seed": seed(role).hex(),
        "body": signed.body.hex(),
        "envelope": signed.raw.hex(),
        "id": signed.id.hex(),
    }


def envelopes() -> list[dict[str, str]]:
    out = [entry(*m) for m in _messages()]
    intent = next(e for e in out if e["name"] == "intent")
    out += [entry(*m) for m in _receipts(bytes.fromhex(intent["id"]))]
    ok = next(e for e in out if e["name"] == "receipt_ok")
    record = encode_record(bytes.fromhex(intent["envelope"]), bytes.fromhex(ok["envelope"]))
    out += [entry(*m) for m in _chain(record)]
    return out


# ---------------------------------------------------------------- malformed payloads


class Raw(bytes):
    """Bytes placed into a ``raw_map`` as they are, already msgpack-encoded."""


def _enc(value: object) -> bytes:
    return bytes(value) if isinstance(value, Raw) else pack(value)


def raw_map(pairs: list[tuple[object, object]]) -> bytes:
    """A msgpack map of these pairs in this order, duplicates allowed (for bad bodies)."""
    n = len(pairs)
    head = bytes([0x80 | n]) if n < 16 else b"\xde" + n.to_bytes(2, "big")
    return head + b"".join(_enc(k) + _enc(v) for k, v in pairs)


def intent_pairs(**over: object) -> list[tuple[object, object]]:
    """The body pairs of the vectors' first intent, with values replaced (None drops a key)."""
    i = _intent()
    pairs: dict[str, object] = {
        "d": i.device,
        "f": i.fog_id,
        "q": i.seq,
        "p": i.payee_id,
        "a": i.amount_micros,
        "c": i.currency,
        "t": i.time_ms,
    }
    pairs |= over
    return [(k, v) for k, v in pairs.items() if v is not None]


def signed_envelope(msg_type: str, body: bytes, role: str = "device") -> bytes:
    """An envelope with a valid signature over any body bytes."""
    sig = key(role).sign(signing_input(msg_type, body)).signature
    return pack([msg_type, body, pub(role), sig])


def _bad_body(name: str, body: bytes, topic: str = "intent") -> tuple[str, str, bytes, Reason]:
    return (name, topic, signed_envelope(topic, body), Reason.MALFORMED)


def _flip(data: bytes, index: int, bit: int = 0) -> bytes:
    b = bytearray(data)
    b[index] ^= 1 << bit
    return bytes(b)


def _bad_envelopes(good: bytes, body: bytes, receipt: bytes) -> list[tuple[str, str, bytes]]:
    sig = key("device").sign(signing_input("intent", body)).signature
    d = pub("device")
    return [
        ("empty_payload", "intent", b""),
        ("truncated_last_byte", "intent", good[:-1]),
        ("truncated_half", "intent", good[: len(good) // 2]),
        ("trailing_byte", "intent", good + b"\x00"),
        ("not_an_array", "intent", pack({"type": "intent"})),
        ("array_of_3", "intent", pack(["intent", body, d])),
        ("array_of_5", "intent", pack(["intent", body, d, sig, b""])),
        ("type_not_str", "intent", pack([1, body, d, sig])),
        ("wrong_envelope_type", "intent", receipt),
        ("unknown_envelope_type", "intent", pack(["pay", body, d, sig])),
        ("body_not_bin", "intent", pack(["intent", body.decode("latin-1"), d, sig])),
        ("signer_31_bytes", "intent", pack(["intent", body, d[:31], sig])),
        ("signer_str", "intent", pack(["intent", body, d.hex(), sig])),
        ("sig_63_bytes", "intent", pack(["intent", body, d, sig[:63]])),
        ("sig_65_bytes", "intent", pack(["intent", body, d, sig + b"\x00"])),
        ("reserved_byte_c1", "intent", b"\xc1"),
    ]


def _bad_bodies() -> list[tuple[str, bytes]]:
    m = intent_pairs
    return [
        ("body_not_map", pack([1, 2, 3])),
        ("duplicate_key", raw_map([*m(), ("a", 1)])),
        ("unknown_key", raw_map([*m(), ("x", 1)])),
        ("missing_key_a", raw_map(m(a=None))),
        ("key_not_str", raw_map([(b"d" if k == "d" else k, v) for k, v in m()])),
        ("amount_str", raw_map(m(a="1250000"))),
        ("amount_float", raw_map(m(a=1.25))),
        ("amount_zero", raw_map(m(a=0))),
        ("amount_over_2_53", raw_map(m(a=2**53 + 1))),
        ("seq_zero", raw_map(m(q=0))),
        ("seq_negative", raw_map(m(q=-1))),
        ("time_bool", raw_map(m(t=True))),
        ("device_31_bytes", raw_map(m(d=pub("device")[:31]))),
        ("fog_id_uppercase", raw_map(m(f="Fog-1"))),
        ("fog_id_reserved", raw_map(m(f="trust"))),
        ("payee_id_64_chars", raw_map(m(p="p" * 64))),
        ("currency_lowercase", raw_map(m(c="eur"))),
        ("memo_65_bytes", raw_map(m(m=b"x" * 65))),
        ("memo_str", raw_map(m(m="session"))),
        ("str_not_utf8", raw_map(m(p=Raw(b"\xa1\xff")))),
        ("ext_value", raw_map(m(t=msgpack.ExtType(1, b"\x00")))),
        ("nil_memo", raw_map(m(m=Raw(b"\xc0")))),
        ("oversize_intent_envelope", raw_map(m(m=b"x" * 420))),
    ]


def _other_bad_bodies() -> list[tuple[str, str, bytes]]:
    """Bad bodies of other types, each signed by the device key (the body is what fails)."""
    bind = [
        ("d", pub("device")),
        ("o", "acme-fleet"),
        ("nb", T0_MS),
        ("na", T0_MS),  # na must be > nb
        ("c", "EUR"),
        ("tx", 1),
        ("day", 1),
    ]
    ok: list[tuple[object, object]] = [
        ("i", bytes(32)),
        ("d", pub("device")),
        ("q", 1),
        ("s", "ok"),
        ("r", "stale"),  # ok must not carry r
        ("n", 1),
        ("l", bytes(16)),
        ("t", T0_MS),
    ]
    return [
        ("bind_na_not_after_nb", "bind", raw_map(list(bind))),
        (
            "bind_pay_duplicate",
            "bind",
            raw_map([*bind[:3], ("na", T0_MS + 1), *bind[4:], ("pay", ["a", "a"])]),
        ),
        ("receipt_ok_with_reason", "receipt", raw_map(ok)),
        (
            "receipt_unknown_reason",
            "receipt",
            raw_map([*ok[:3], ("s", "declined"), ("r", "nope"), ok[7]]),
        ),
        (
            "receipt_malformed_with_d",
            "receipt",
            raw_map([*ok[:3], ("s", "declined"), ("r", "malformed"), ok[7]]),
        ),
    ]


def _oversize_bind() -> bytes:
    """A bind whose fields are each valid but whose envelope exceeds 1,024 bytes."""
    payees = [f"{i:02d}" + "p" * 61 for i in range(32)]
    b = Binding(
        device=pub("device"),
        owner_id="acme-fleet",
        not_before_ms=T0_MS,
        not_after_ms=T0_MS + YEAR_MS,
        currency="EUR",
        tx_max_micros=1,
        day_max_micros=1,
        payees=tuple(payees),
    )
    return signed_envelope("bind", encode_body(b), "owner")


def _signature_cases(good: bytes, body: bytes) -> list[tuple[str, str, bytes, Reason]]:
    stranger = signed_envelope("intent", body, "stranger")  # valid signature, signer is not d
    sig_at = len(good) - 64  # the signer's last byte is 3 before: bin 8 header c4 40
    body_at = good.index(body)
    amount_at = body_at + body.index(b"\xa1a") + 2  # first byte of the amount's encoding
    bad_sig_bad_body = pack(["intent", raw_map(intent_pairs(a=0)), pub("device"), bytes(64)])
    return [
        ("signer_not_d", "intent", stranger, Reason.BAD_SIGNATURE),
        ("sig_bit_flipped", "intent", _flip(good, sig_at), Reason.BAD_SIGNATURE),
        ("sig_last_bit_flipped", "intent", _flip(good, len(good) - 1, 7), Reason.BAD_SIGNATURE),
        ("body_amount_changed", "intent", _flip(good, amount_at + 1), Reason.BAD_SIGNATURE),
        ("signer_bit_flipped", "intent", _flip(good, sig_at - 3), Reason.BAD_SIGNATURE),
        ("sig_zero_and_body_bad", "intent", bad_sig_bad_body, Reason.MALFORMED),
    ]


def malformed() -> list[dict[str, str]]:
    good = signed_envelope("intent", pack(dict(intent_pairs())))
    body = pack(dict(intent_pairs()))
    receipt_env = bytes.fromhex(next(e for e in envelopes() if e["type"] == "receipt")["envelope"])
    cases: list[tuple[str, str, bytes, Reason]] = [
        (n, t, p, Reason.MALFORMED) for n, t, p in _bad_envelopes(good, body, receipt_env)
    ]
    cases += [_bad_body(n, b) for n, b in _bad_bodies()]
    cases += [_bad_body(n, b, t) for n, t, b in _other_bad_bodies()]
    cases.append(("oversize_bind", "bind", _oversize_bind(), Reason.MALFORMED))
    cases += _signature_cases(good, body)
    return [
        {"name": n, "topic_type": t, "payload": p.hex(), "reason": str(r)} for n, t, p, r in cases
    ]


# ---------------------------------------------------------------- Merkle trees


def merkle_leaf(i: int) -> bytes:
    """Leaf i (0..16) of the 0..17 trees: the first i bytes of SHA-256(i as 4 bytes)."""
    assert 0 <= i < MERKLE_SIZE_MAX
    return hashlib.sha256(i.to_bytes(4, "big")).digest()[:i]


def _tree(leaves: list[bytes]) -> dict[str, Any]:
    hashes = [merkle.leaf_hash(r) for r in leaves]
    n = len(leaves)
    return {
        "leaves": [r.hex() for r in leaves],
        "root": merkle.root(hashes).hex(),
        "proofs": [
            {"index": i, "path": [p.hex() for p in merkle.inclusion_proof(hashes, i)]}
            for i in range(n)
        ],
        "consistency": [
            {"size1": m, "path": [p.hex() for p in merkle.consistency_proof(hashes, m)]}
            for m in range(1, n + 1)
        ],
    }


def merkle_trees() -> list[dict[str, Any]]:
    leaves = [merkle_leaf(i) for i in range(MERKLE_SIZE_MAX)]
    trees = [_tree(leaves[:n]) for n in range(MERKLE_SIZE_MAX + 1)]
    env = {e["name"]: bytes.fromhex(e["envelope"]) for e in envelopes()}
    records = [
        encode_record(env["intent"], env["receipt_ok"]),
        encode_record(env["intent_memo"], env["receipt_ok"]),
        encode_record(env["intent_amount_max"], env["receipt_ok"]),
    ]
    return [*trees, _tree(records)]


# ---------------------------------------------------------------- file


def build() -> dict[str, Any]:
    return {
        "version": VERSION,
        "envelopes": envelopes(),
        "malformed": malformed(),
        "merkle": merkle_trees(),
    }


def refusals(
    cases: list[tuple[str, str, bytes, Reason]],
    *,
    role: str,
    good_envelope: str,
    bad_signature: tuple[str, str],
) -> list[dict[str, str]]:
    """The refusal vectors of a project message module: each case's body signed by ``role``
    (name, topic type, payload hex, reason), then ``good_envelope`` (hex) with the last byte
    of its signature flipped, as ``bad_signature`` = (name, topic type)."""
    out = [
        {
            "name": name,
            "topic_type": msg_type,
            "payload": signed_envelope(msg_type, body, role).hex(),
            "reason": str(reason),
        }
        for name, msg_type, body, reason in cases
    ]
    good = bytes.fromhex(good_envelope)
    broken = good[:-1] + bytes([good[-1] ^ 1])  # the last byte is the signature's
    name, msg_type = bad_signature
    out.append(
        {
            "name": name,
            "topic_type": msg_type,
            "payload": broken.hex(),
            "reason": str(Reason.BAD_SIGNATURE),
        }
    )
    return out


def write_vectors(argv: list[str], default: Path, build: Callable[[], dict[str, Any]]) -> int:
    """``python -m protocol.X_vectors [PATH]``: write ``build()`` to PATH or ``default``."""
    out = Path(argv[0]) if argv else default
    out.write_text(dumps(build()), encoding="utf-8")
    return 0


def dumps(vectors: dict[str, Any]) -> str:
    return json.dumps(vectors, indent=1) + "\n"


def main(argv: list[str]) -> int:
    out = Path(argv[0]) if argv else DEFAULT_PATH
    out.write_text(dumps(build()), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
