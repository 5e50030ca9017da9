"""Golden vectors of the peer transfer messages (``xreq``, ``xfer``; docs/protocol.md 18.2):
``python -m protocol.transfer_vectors [out.json]``.

Writes ``protocol/vectors/transfer-v1.json`` (or the given path) with the fixed seeds of
``protocol.vectors``, byte-for-byte reproducible. Both messages are signed with the ``fog``
role's key (in a deployment the ``xreq`` is the asking fog's, the ``xfer`` the giver's). The
file holds

- ``envelopes``: an ``xreq`` and the ``xfer`` answering it, with seed, body bytes, envelope
  bytes and message id (the fields of ``v1.json``);
- ``transfer_ids``: the ``xreq``'s message id and the transfer id derived from it (the ``x``
  of the ``xfer``);
- ``malformed``: payloads a receiver must refuse, each with its reason.

``build()`` is pure; only ``main()`` touches the file system.
"""

import sys
from pathlib import Path
from typing import Any, Final

from protocol.codec import pack
from protocol.reasons import Reason
from protocol.signing import seal_signed
from protocol.transfer import Transfer, TransferRequest, transfer_id
from protocol.vectors import (
    DAY_MS,
    T0_MS,
    VERSION,
    entry,
    key,
    refusals,
    seed,
    write_vectors,
)

DEFAULT_PATH: Final = Path(__file__).parent / "vectors" / "transfer-v1.json"
LEASE_ID: Final = bytes(range(16))

REQUEST: Final = TransferRequest(
    fog_id="fog-2",
    giver_id="fog-1",
    owner_id="acme",
    currency="EUR",
    amount_micros=10_000_000,
    time_ms=T0_MS + 1_000,
)


def _transfer() -> Transfer:
    return Transfer(
        transfer_id=transfer_id(seal_signed(REQUEST, key("fog")).id),
        lease_id=LEASE_ID,
        fog_id="fog-1",
        receiver_id="fog-2",
        owner_id="acme",
        currency="EUR",
        amount_micros=5_000_000,
        not_after_ms=T0_MS + DAY_MS,
        time_ms=T0_MS + 1_500,
    )


def envelopes() -> list[dict[str, str]]:
    return [entry("xreq", "fog", REQUEST), entry("xfer", "fog", _transfer())]


def transfer_ids() -> list[dict[str, str]]:
    request_id = seal_signed(REQUEST, key("fog")).id
    return [{"request_id": request_id.hex(), "transfer_id": transfer_id(request_id).hex()}]


def malformed() -> list[dict[str, str]]:
    xreq = {"f": "fog-2", "g": "fog-1", "o": "acme", "c": "EUR", "a": 1, "t": T0_MS}
    xfer = {
        "x": bytes(16),
        "l": LEASE_ID,
        "f": "fog-1",
        "r": "fog-2",
        "o": "acme",
        "c": "EUR",
        "a": 1,
        "na": T0_MS,
        "t": T0_MS,
    }
    cases: list[tuple[str, str, bytes]] = [
        ("xreq_asks_itself", "xreq", pack(xreq | {"g": "fog-2"})),
        ("xreq_amount_zero", "xreq", pack(xreq | {"a": 0})),
        ("xreq_missing_g", "xreq", pack({k: v for k, v in xreq.items() if k != "g"})),
        ("xreq_unknown_key", "xreq", pack(xreq | {"x": 1})),
        ("xfer_gives_itself", "xfer", pack(xfer | {"r": "fog-1"})),
        ("xfer_id_short", "xfer", pack(xfer | {"x": bytes(15)})),
        ("xfer_amount_over_2_53", "xfer", pack(xfer | {"a": 2**53 + 1})),
        ("xfer_receiver_reserved", "xfer", pack(xfer | {"r": "held"})),
        ("xfer_na_negative", "xfer", pack(xfer | {"na": -1})),
    ]
    return refusals(
        [(name, msg_type, body, Reason.MALFORMED) for name, msg_type, body in cases],
        role="fog",
        good_envelope=envelopes()[1]["envelope"],
        bad_signature=("xfer_bad_signature", "xfer"),
    )


def build() -> dict[str, Any]:
    return {
        "version": VERSION,
        "fog_seed": seed("fog").hex(),
        "envelopes": envelopes(),
        "transfer_ids": transfer_ids(),
        "malformed": malformed(),
    }


def main(argv: list[str]) -> int:
    return write_vectors(argv, DEFAULT_PATH, build)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
