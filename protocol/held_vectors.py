"""Golden vectors of the held-receipt messages (docs/protocol.md 17.7):
``python -m protocol.held_vectors [out.json]``.

Writes ``protocol/vectors/held-v1.json`` (or the given path) with the fixed seeds of
``protocol.vectors``, so it is byte-for-byte reproducible. The file holds

- ``held``: valid held payloads (device -> cloud), each with its records and their intent ids;
  the records are built from the ``intent`` and ``receipt_ok`` envelopes of ``v1.json``;
- ``held_malformed``: held payloads a cloud must refuse whole (``decode_held``);
- ``envelopes``: valid ``hack`` envelopes, signed by the issuer role's key, with the seed,
  body bytes, envelope bytes and message id (the same fields as ``v1.json``);
- ``malformed``: ``hack`` payloads a device must refuse, with the reason.

``build()`` is pure; only ``main()`` touches the file system.
"""

import sys
from pathlib import Path
from typing import Any, Final

from protocol.batch import encode_record
from protocol.codec import pack
from protocol.held import HELD_BYTES_MAX, HELD_RECORDS_MAX, HeldAck, encode_held
from protocol.messages import Intent, Receipt
from protocol.reasons import Reason
from protocol.signing import seal_signed
from protocol.vectors import (
    T0_MS,
    VERSION,
    entry,
    key,
    pub,
    refusals,
    seed,
    write_vectors,
)

DEFAULT_PATH: Final = Path(__file__).parent / "vectors" / "held-v1.json"
LEASE_ID: Final = bytes(range(16))


def _record(seq: int) -> tuple[bytes, bytes]:
    """(intent id, record) of the device's ok payment ``seq`` at fog-1."""
    intent = seal_signed(
        Intent(
            device=pub("device"),
            fog_id="fog-1",
            seq=seq,
            payee_id="charger-7",
            amount_micros=1_250_000,
            currency="EUR",
            time_ms=T0_MS + 1_000 * seq,
        ),
        key("device"),
    )
    receipt = seal_signed(
        Receipt(
            intent_id=intent.id,
            device=pub("device"),
            seq=seq,
            status="ok",
            log_index=seq,
            lease_id=LEASE_ID,
            time_ms=T0_MS + 1_000 * seq + 5,
        ),
        key("fog"),
    )
    return intent.id, encode_record(intent.raw, receipt.raw)


def held() -> list[dict[str, Any]]:
    out = []
    for name, seqs in (("held_one", [1]), ("held_three", [1, 2, 3])):
        pairs = [_record(q) for q in seqs]
        out.append(
            {
                "name": name,
                "device": pub("device").hex(),
                "payload": encode_held([r for _, r in pairs]).hex(),
                "records": [r.hex() for _, r in pairs],
                "intent_ids": [i.hex() for i, _ in pairs],
            }
        )
    return out


def held_malformed() -> list[dict[str, str]]:
    _, record = _record(1)
    cases = [
        ("held_empty", pack([])),
        ("held_17_records", pack([record] * (HELD_RECORDS_MAX + 1))),
        ("held_not_array", pack({"r": [record]})),
        ("held_record_str", pack(["not a record"])),
        ("held_record_too_large", pack([b"\x00" * 1_041])),
        ("held_trailing_byte", pack([record]) + b"\x00"),
        ("held_too_large", pack([b"\x00" * 1_040] * 16) + b"\x00" * (HELD_BYTES_MAX)),
    ]
    return [{"name": n, "payload": p.hex(), "reason": str(Reason.MALFORMED)} for n, p in cases]


def _messages() -> list[tuple[str, HeldAck]]:
    id1, _ = _record(1)
    id2, _ = _record(2)
    id3, _ = _record(3)
    return [
        ("hack_booked", HeldAck(device=pub("device"), booked=(id1,), refused=(), time_ms=T0_MS)),
        (
            "hack_mixed",
            HeldAck(
                device=pub("device"),
                booked=(id1, id2),
                refused=((id3, "unknown_lease"),),
                time_ms=T0_MS + 1,
            ),
        ),
        ("hack_empty", HeldAck(device=pub("device"), booked=(), refused=(), time_ms=T0_MS + 2)),
    ]


def envelopes() -> list[dict[str, str]]:
    return [entry(name, "issuer", msg) for name, msg in _messages()]


def malformed() -> list[dict[str, str]]:
    id1, _ = _record(1)
    hack: dict[str, object] = {"d": pub("device"), "i": [id1], "x": [], "t": T0_MS}
    cases: list[tuple[str, bytes, Reason]] = [
        ("hack_missing_x", pack({k: v for k, v in hack.items() if k != "x"}), Reason.MALFORMED),
        ("hack_unknown_key", pack(hack | {"y": 1}), Reason.MALFORMED),
        ("hack_id_short", pack(hack | {"i": [id1[:31]]}), Reason.MALFORMED),
        ("hack_17_ids", pack(hack | {"i": [bytes([n]) * 32 for n in range(17)]}), Reason.MALFORMED),
        ("hack_fault_upper", pack(hack | {"i": [], "x": [[id1, "Unknown"]]}), Reason.MALFORMED),
        (
            "hack_fault_triple",
            pack(hack | {"i": [], "x": [[id1, "currency", 1]]}),
            Reason.MALFORMED,
        ),
        ("hack_id_twice", pack(hack | {"x": [[id1, "currency"]]}), Reason.MALFORMED),
    ]
    return refusals(
        [(name, "hack", body, reason) for name, body, reason in cases],
        role="issuer",
        good_envelope=envelopes()[0]["envelope"],
        bad_signature=("hack_bad_signature", "hack"),
    )


def build() -> dict[str, Any]:
    return {
        "version": VERSION,
        "issuer_seed": seed("issuer").hex(),
        "held": held(),
        "held_malformed": held_malformed(),
        "envelopes": envelopes(),
        "malformed": malformed(),
    }


def main(argv: list[str]) -> int:
    return write_vectors(argv, DEFAULT_PATH, build)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
