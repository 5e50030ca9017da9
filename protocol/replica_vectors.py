"""Golden vectors of the project's replication messages (``racc``, ``fetch``;
docs/protocol.md 17.2 and 17.3): ``python -m protocol.replica_vectors [out.json]``.

Writes ``protocol/vectors/replica-v1.json`` (or the given path) with the fixed seeds of
``protocol.vectors``, so it is byte-for-byte reproducible. The file holds

- ``envelopes``: valid envelopes of both types, signed by the fog role's key, with the seed,
  the body bytes, the envelope bytes and the message id (the same fields as ``v1.json``);
- ``malformed``: payloads a receiver must refuse, each with its reason: bodies with a valid
  signature over bad bytes (``malformed``) and a good body with a broken signature
  (``bad_signature``).

``build()`` is pure; only ``main()`` touches the file system.
"""

import sys
from pathlib import Path
from typing import Any, Final

from protocol.codec import pack
from protocol.messages import Message
from protocol.reasons import Reason
from protocol.replica import Fetch, ReplicaAck
from protocol.vectors import (
    T0_MS,
    VERSION,
    entry,
    refusals,
    seed,
    write_vectors,
)

DEFAULT_PATH: Final = Path(__file__).parent / "vectors" / "replica-v1.json"
HEADER_ID: Final = bytes(range(32))


def _messages() -> list[tuple[str, Message]]:
    return [
        (
            "racc",  # fog-2 holds batch 7 of fog-1
            ReplicaAck(
                origin="fog-1", number=7, header_id=HEADER_ID, holder="fog-2", time_ms=T0_MS
            ),
        ),
        ("fetch_from_1", Fetch(fog_id="fog-1", from_number=1, time_ms=T0_MS + 1_000)),
        ("fetch_from_42", Fetch(fog_id="fog-1", from_number=42, time_ms=T0_MS + 2_000)),
    ]


def envelopes() -> list[dict[str, str]]:
    return [entry(name, "fog", msg) for name, msg in _messages()]


def malformed() -> list[dict[str, str]]:
    racc = {"f": "fog-1", "b": 7, "h": HEADER_ID, "p": "fog-2", "t": T0_MS}
    fetch = {"f": "fog-1", "b": 1, "t": T0_MS}
    cases: list[tuple[str, str, bytes, Reason]] = [
        ("racc_holder_is_origin", "racc", pack(racc | {"p": "fog-1"}), Reason.MALFORMED),
        ("racc_batch_zero", "racc", pack(racc | {"b": 0}), Reason.MALFORMED),
        ("racc_header_id_short", "racc", pack(racc | {"h": HEADER_ID[:31]}), Reason.MALFORMED),
        (
            "racc_missing_p",
            "racc",
            pack({k: v for k, v in racc.items() if k != "p"}),
            Reason.MALFORMED,
        ),
        ("racc_reserved_fog_id", "racc", pack(racc | {"p": "gossip"}), Reason.MALFORMED),
        ("fetch_from_zero", "fetch", pack(fetch | {"b": 0}), Reason.MALFORMED),
        ("fetch_unknown_key", "fetch", pack(fetch | {"x": 1}), Reason.MALFORMED),
    ]
    return refusals(
        cases,
        role="fog",
        good_envelope=envelopes()[0]["envelope"],
        bad_signature=("racc_bad_signature", "racc"),
    )


def build() -> dict[str, Any]:
    return {
        "version": VERSION,
        "fog_seed": seed("fog").hex(),
        "envelopes": envelopes(),
        "malformed": malformed(),
    }


def main(argv: list[str]) -> int:
    return write_vectors(argv, DEFAULT_PATH, build)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
