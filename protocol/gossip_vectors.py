"""Golden vectors of the federation's ``seen`` message (docs/protocol.md 17.4):
``python -m protocol.gossip_vectors [out.json]``.

Writes ``protocol/vectors/gossip-v1.json`` (or the given path) with the fixed seeds of
``protocol.vectors``, so it is byte-for-byte reproducible. The file holds

- ``envelopes``: valid ``seen`` envelopes signed by the fog role's key (one entry; several
  devices; the largest body, 128 entries with every integer at its widest), with the seed,
  the body bytes, the envelope bytes and the message id (the fields of ``v1.json``);
- ``malformed``: payloads a receiver must refuse, each with its reason: bodies with a valid
  signature over bad bytes (``malformed``) and a good body with a broken signature
  (``bad_signature``).

``build()`` is pure; only ``main()`` touches the file system.
"""

import hashlib
import sys
from pathlib import Path
from typing import Any, Final

from protocol.codec import pack
from protocol.gossip import SEEN_ENTRIES_MAX, Seen, SeenEntry
from protocol.limits import UINT64_MAX
from protocol.reasons import Reason
from protocol.vectors import (
    T0_MS,
    VERSION,
    entry,
    pub,
    refusals,
    seed,
    write_vectors,
)

DEFAULT_PATH: Final = Path(__file__).parent / "vectors" / "gossip-v1.json"


def intent_id(n: int) -> bytes:
    """A stand-in intent id (any 32 bytes: a receiver does not open the intent)."""
    return hashlib.sha256(b"fogpay/1/vectors/gossip/" + str(n).encode()).digest()


def _messages() -> list[tuple[str, Seen]]:
    device, other = pub("device"), pub("stranger")
    widest = tuple(SeenEntry(device, UINT64_MAX - i, intent_id(i)) for i in range(SEEN_ENTRIES_MAX))
    return [
        (
            "seen_one",
            Seen(fog_id="fog-1", entries=(SeenEntry(device, 7, intent_id(7)),), time_ms=T0_MS),
        ),
        (
            "seen_two_devices",
            Seen(
                fog_id="fog-1",
                entries=(
                    SeenEntry(device, 8, intent_id(8)),
                    SeenEntry(other, 1, intent_id(101)),
                    SeenEntry(device, 9, intent_id(9)),
                ),
                time_ms=T0_MS + 500,
            ),
        ),
        ("seen_widest", Seen(fog_id="f" * 63, entries=widest, time_ms=UINT64_MAX)),
    ]


def envelopes() -> list[dict[str, str]]:
    return [entry(name, "fog", msg) for name, msg in _messages()]


def malformed() -> list[dict[str, str]]:
    device = pub("device")
    one: list[object] = [device, 7, intent_id(7)]
    seen: dict[str, object] = {"f": "fog-1", "e": [one], "t": T0_MS}
    cases: list[tuple[str, bytes]] = [
        ("seen_no_entries", pack(seen | {"e": []})),
        ("seen_129_entries", pack(seen | {"e": [one] * (SEEN_ENTRIES_MAX + 1)})),
        ("seen_entry_of_two", pack(seen | {"e": [one[:2]]})),
        ("seen_entry_of_four", pack(seen | {"e": [[*one, 0]]})),
        ("seen_q_zero", pack(seen | {"e": [[one[0], 0, one[2]]]})),
        ("seen_device_31_bytes", pack(seen | {"e": [[device[:31], 7, one[2]]]})),
        ("seen_intent_id_str", pack(seen | {"e": [[one[0], 7, "x" * 32]]})),
        ("seen_entry_is_a_map", pack(seen | {"e": [{"d": one[0], "q": 7, "i": one[2]}]})),
        ("seen_fog_reserved", pack(seen | {"f": "gossip"})),
        ("seen_missing_t", pack({k: v for k, v in seen.items() if k != "t"})),
        ("seen_unknown_key", pack(seen | {"x": 1})),
    ]
    return refusals(
        [(name, "seen", body, Reason.MALFORMED) for name, body in cases],
        role="fog",
        good_envelope=envelopes()[0]["envelope"],
        bad_signature=("seen_bad_signature", "seen"),
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
