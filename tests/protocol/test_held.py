"""protocol/held.py and protocol/vectors/held-v1.json: the held payload codec and the
issuer's ``hack``. The file is current and reproducible; every payload and envelope in it is
true for our code (valid ones open with the stated content, refused ones with the reason)."""

import json
from functools import cache
from typing import Any

import pytest

from protocol import held_vectors
from protocol.batch import decode_record
from protocol.errors import Declined
from protocol.held import HELD_RECORDS_MAX, HeldAck, decode_held, encode_held
from protocol.messages import Intent, Receipt
from protocol.reasons import Reason
from protocol.signing import open_envelope, public_key, seal, seal_signed
from protocol.vectors import key, pub, seed


@cache
def golden() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(held_vectors.DEFAULT_PATH.read_text())
    return data


@pytest.mark.parametrize("h", golden()["held"], ids=lambda h: h["name"])
def test_held_payload_decodes_to_records_that_prove_themselves(h: dict[str, Any]) -> None:
    records = decode_held(bytes.fromhex(h["payload"]))
    assert [r.hex() for r in records] == h["records"]
    assert encode_held(records).hex() == h["payload"]
    for record, intent_id in zip(records, h["intent_ids"], strict=True):
        intent_env, receipt_env = decode_record(record)
        intent = open_envelope(intent_env, Intent, signer=bytes.fromhex(h["device"]))
        receipt = open_envelope(receipt_env, Receipt, signer=pub("fog"))
        assert intent.id.hex() == intent_id == receipt.msg.intent_id.hex()
        assert receipt.msg.ok


@pytest.mark.parametrize("m", golden()["held_malformed"], ids=lambda m: m["name"])
def test_held_payload_refused_whole(m: dict[str, str]) -> None:
    with pytest.raises(Declined) as info:
        decode_held(bytes.fromhex(m["payload"]))
    assert info.value.reason is Reason(m["reason"])


def test_encode_held_refuses_what_decode_would() -> None:
    record = bytes.fromhex(golden()["held"][0]["records"][0])
    with pytest.raises(Declined):
        encode_held([])
    with pytest.raises(Declined):
        encode_held([record] * (HELD_RECORDS_MAX + 1))
    with pytest.raises(Declined):
        encode_held([b"\x00" * 1_041])
    assert decode_held(encode_held([record] * HELD_RECORDS_MAX)) == [record] * HELD_RECORDS_MAX


@pytest.mark.parametrize("e", golden()["envelopes"], ids=lambda e: e["name"])
def test_hack_opens_with_the_stated_body_and_id(e: dict[str, str]) -> None:
    issuer = key("issuer")
    assert e["seed"] == golden()["issuer_seed"] == seed("issuer").hex()
    signed = open_envelope(bytes.fromhex(e["envelope"]), HeldAck, signer=public_key(issuer))
    assert (signed.body.hex(), signed.id.hex()) == (e["body"], e["id"])
    assert seal(signed.msg, issuer).hex() == e["envelope"]  # our encoder writes the same bytes


@pytest.mark.parametrize("m", golden()["malformed"], ids=lambda m: m["name"])
def test_hack_refused_with_the_stated_reason(m: dict[str, str]) -> None:
    with pytest.raises(Declined) as info:
        open_envelope(bytes.fromhex(m["payload"]), HeldAck)
    assert info.value.reason is Reason(m["reason"])


def test_the_largest_hack_fits_its_envelope_limit() -> None:
    ids = [bytes([n]) * 32 for n in range(32)]
    ack = HeldAck(
        device=pub("device"),
        booked=tuple(ids[:16]),
        refused=tuple((i, "receipt_mismatch") for i in ids[16:]),
        time_ms=2**64 - 1,
    )
    signed = seal_signed(ack, key("issuer"))
    opened = open_envelope(signed.raw, HeldAck)
    assert opened.msg.faults == [(i, "receipt_mismatch") for i in ids[16:]]
    assert list(opened.msg.booked) == ids[:16]
