"""protocol/vectors/gossip-v1.json and the ``seen`` message (docs/protocol.md 17.4): the file
is current and reproducible, every envelope opens as ``seen`` with the fog's key and gives the
stated body and id, every refused payload is refused with the stated reason; and the limits
that make ``seen`` differ from the other messages (arrays of arrays, 128 items, 16 KiB)."""

import json
from functools import cache
from typing import Any

import pytest

from protocol import gossip_vectors
from protocol.codec import pack
from protocol.errors import Declined
from protocol.gossip import SEEN_ENTRIES_MAX, SEEN_ENVELOPE_BYTES_MAX, Seen, SeenEntry
from protocol.messages import Revocation
from protocol.reasons import Reason
from protocol.signing import open_envelope, public_key, seal
from protocol.vectors import key, seed, signed_envelope


@cache
def golden() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(gossip_vectors.DEFAULT_PATH.read_text())
    return data


@pytest.mark.parametrize("e", golden()["envelopes"], ids=lambda e: e["name"])
def test_envelope_opens_with_the_stated_body_and_id(e: dict[str, str]) -> None:
    fog = key("fog")
    assert e["seed"] == golden()["fog_seed"] == seed("fog").hex()
    signed = open_envelope(bytes.fromhex(e["envelope"]), Seen, signer=public_key(fog))
    assert (signed.body.hex(), signed.id.hex()) == (e["body"], e["id"])
    assert seal(signed.msg, fog).hex() == e["envelope"]  # our encoder writes the same bytes
    assert all(isinstance(x, SeenEntry) for x in signed.msg.entries)


def test_the_widest_seen_fits_its_envelope_limit() -> None:
    widest = next(e for e in golden()["envelopes"] if e["name"] == "seen_widest")
    raw = bytes.fromhex(widest["envelope"])
    msg = open_envelope(raw, Seen).msg
    assert len(msg.entries) == SEEN_ENTRIES_MAX
    assert len(raw) <= SEEN_ENVELOPE_BYTES_MAX


@pytest.mark.parametrize("m", golden()["malformed"], ids=lambda m: m["name"])
def test_refused_with_the_stated_reason(m: dict[str, str]) -> None:
    with pytest.raises(Declined) as info:
        open_envelope(bytes.fromhex(m["payload"]), Seen)
    assert info.value.reason is Reason(m["reason"])


def test_an_envelope_past_16_kib_is_malformed_before_anything_else() -> None:
    body = pack({"f": "fog-1", "e": [[bytes(32), 1, bytes(32)]], "t": 1, "p": b"x" * 17_000})
    with pytest.raises(Declined) as info:
        open_envelope(signed_envelope("seen", body, "fog"), Seen)
    assert info.value.reason is Reason.MALFORMED


def test_other_messages_keep_their_64_item_and_1_kib_limits() -> None:
    """The wider limits are the seen message's own: a revocation is still refused past
    1,024 bytes, and the encoder of every other type is unchanged."""
    long = pack({"k": bytes(32), "t": 1, "r": "x" * 1100})
    with pytest.raises(Declined) as info:
        open_envelope(signed_envelope("revoke", long, "issuer"), Revocation)
    assert info.value.reason is Reason.MALFORMED


def test_encoder_refuses_what_the_decoder_would() -> None:
    entry = SeenEntry(bytes(32), 1, bytes(32))
    with pytest.raises(Declined):
        seal(Seen(fog_id="fog-1", entries=(), time_ms=1), key("fog"))
    with pytest.raises(Declined):
        seal(Seen(fog_id="fog-1", entries=(entry,) * 129, time_ms=1), key("fog"))
    with pytest.raises(Declined):
        seal(
            Seen(fog_id="fog-1", entries=(SeenEntry(bytes(32), 0, bytes(32)),), time_ms=1),
            key("fog"),
        )
