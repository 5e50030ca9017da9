"""Golden vectors of the project's lease messages (``lreq``, ``lrep``; docs/protocol.md 14.1;
``rbal``, signed by the issuer: 18.5):
``python -m protocol.leasing_vectors [out.json]``.

Writes ``protocol/vectors/leasing-v1.json`` (or the given path) with the fixed seeds of
``protocol.vectors``, so it is byte-for-byte reproducible. The file holds

- ``envelopes``: valid envelopes of both types, signed by the fog role's key, with the seed,
  the body bytes, the envelope bytes and the message id (the same fields as ``v1.json``);
- ``malformed``: payloads a receiver must refuse, each with its reason: bodies with a valid
  signature over bad bytes (``malformed``) and a good body with a broken signature
  (``bad_signature``).

A fog in another language builds these messages against this file and the tables of section
14.1. ``build()`` is pure; only ``main()`` touches the file system.
"""

import sys
from pathlib import Path
from typing import Any, Final

from protocol.codec import pack
from protocol.leasing import LeaseRecall, LeaseReport, LeaseRequest
from protocol.messages import Message
from protocol.reasons import Reason
from protocol.vectors import (
    DAY_MS,
    T0_MS,
    VERSION,
    entry,
    pub,
    refusals,
    seed,
    write_vectors,
)

DEFAULT_PATH: Final = Path(__file__).parent / "vectors" / "leasing-v1.json"
LEASE_ID: Final = bytes(range(16))


def _messages() -> list[tuple[str, Message]]:
    return [
        (
            "lreq_initial",  # no a: the policy's initial lease, prompted by device d
            LeaseRequest(
                fog_id="fog-1",
                owner_id="acme",
                currency="EUR",
                device=pub("device"),
                time_ms=T0_MS + 1_000,
            ),
        ),
        (
            "lreq_amount",
            LeaseRequest(
                fog_id="fog-1",
                owner_id="acme",
                currency="EUR",
                amount_micros=50_000_000,
                time_ms=T0_MS + 2_000,
            ),
        ),
        (
            "lrep_drawn",
            LeaseReport(
                lease_id=LEASE_ID,
                fog_id="fog-1",
                drawn_micros=3_250_000,
                last_batch=7,
                time_ms=T0_MS + DAY_MS,
            ),
        ),
        (
            "lrep_unused",  # nothing drawn: no batch holds a draw (b = 0)
            LeaseReport(
                lease_id=LEASE_ID,
                fog_id="fog-1",
                drawn_micros=0,
                last_batch=0,
                time_ms=T0_MS + DAY_MS,
            ),
        ),
    ]


def envelopes() -> list[dict[str, str]]:
    recall = LeaseRecall(
        lease_id=LEASE_ID, fog_id="fog-1", owner_id="acme", requester="fog-2", time_ms=T0_MS
    )
    return [entry(name, "fog", msg) for name, msg in _messages()] + [
        entry("rbal", "issuer", recall)  # the cloud asks fog-1 to give LEASE_ID back (18.5)
    ]


def malformed() -> list[dict[str, str]]:
    lreq = {"f": "fog-1", "o": "acme", "c": "EUR", "t": T0_MS}
    lrep = {"l": LEASE_ID, "f": "fog-1", "u": 1, "b": 1, "t": T0_MS}
    rbal = {"l": LEASE_ID, "f": "fog-1", "o": "acme", "r": "fog-2", "t": T0_MS}
    cases: list[tuple[str, str, bytes, Reason]] = [
        (
            "lreq_missing_t",
            "lreq",
            pack({k: v for k, v in lreq.items() if k != "t"}),
            Reason.MALFORMED,
        ),
        ("lreq_unknown_key", "lreq", pack(lreq | {"x": 1}), Reason.MALFORMED),
        ("lreq_amount_zero", "lreq", pack(lreq | {"a": 0}), Reason.MALFORMED),
        ("lreq_currency_lower", "lreq", pack(lreq | {"c": "eur"}), Reason.MALFORMED),
        ("lrep_lease_id_short", "lrep", pack(lrep | {"l": LEASE_ID[:15]}), Reason.MALFORMED),
        ("lrep_drawn_negative", "lrep", pack(lrep | {"u": -1}), Reason.MALFORMED),
        (
            "rbal_missing_r",
            "rbal",
            pack({k: v for k, v in rbal.items() if k != "r"}),
            Reason.MALFORMED,
        ),
    ]
    return refusals(
        cases,
        role="fog",
        good_envelope=envelopes()[0]["envelope"],
        bad_signature=("lreq_bad_signature", "lreq"),
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
