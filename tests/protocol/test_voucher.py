"""protocol/voucher.py and protocol/vectors/voucher-v1.json: the ``vch`` and ``d2d`` messages,
the fog's voucher for an authorized voucher intent, the payer's bundle and the payee's check.
The file is current and reproducible; every envelope, payload and bundle in it is true for our
code."""

import json
from functools import cache
from typing import Any

import pytest

from protocol import voucher_vectors
from protocol.errors import Declined
from protocol.messages import Intent, Receipt, encode_body
from protocol.reasons import Reason
from protocol.signing import open_envelope, seal_signed
from protocol.vectors import T0_MS, key, pub
from protocol.voucher import (
    ENVELOPE_BYTES_MAX,
    VOUCHER_LIFE_MS,
    VOUCHER_PAYEES_MAX,
    Payment,
    Voucher,
    VoucherError,
    check_bundle,
    decode_bundle,
    decode_payees,
    encode_payees,
    is_voucher_record,
    voucher_for,
)

TYPES = {"vch": Voucher, "d2d": Payment}
SIGNERS = {"vch": pub("fog"), "d2d": pub("device")}


@cache
def golden() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(voucher_vectors.DEFAULT_PATH.read_text())
    return data


@pytest.mark.parametrize("e", golden()["envelopes"], ids=lambda e: e["name"])
def test_envelopes_open_and_encode_back(e: dict[str, str]) -> None:
    cls = TYPES[e["type"]]
    signed = open_envelope(bytes.fromhex(e["envelope"]), cls, signer=SIGNERS[e["type"]])
    assert signed.body.hex() == e["body"] and signed.id.hex() == e["id"]
    assert encode_body(signed.msg).hex() == e["body"]
    role = "fog" if e["type"] == "vch" else "device"
    assert seal_signed(signed.msg, key(role)).raw.hex() == e["envelope"]
    assert len(bytes.fromhex(e["envelope"])) <= ENVELOPE_BYTES_MAX


@pytest.mark.parametrize("m", golden()["malformed"], ids=lambda m: m["name"])
def test_malformed_refused(m: dict[str, str]) -> None:
    with pytest.raises(Declined) as info:
        open_envelope(bytes.fromhex(m["payload"]), TYPES[m["topic_type"]])
    assert info.value.reason is Reason(m["reason"])


@pytest.mark.parametrize("b", golden()["bundles"], ids=lambda b: b["name"])
def test_bundle_verdicts(b: dict[str, Any]) -> None:
    data = bytes.fromhex(b["bundle"])
    try:
        check_bundle(data, issuer_key=pub("issuer"), payee_id=b["payee"], now_ms=b["now_ms"])
        verdict = "ok"
    except VoucherError as exc:
        verdict = exc.code
    assert verdict == b["verdict"]


def test_the_fog_voucher_is_a_pure_function_of_the_record() -> None:
    g = golden()["voucher_intent"]
    intent, receipt = bytes.fromhex(g["intent"]), bytes.fromhex(g["receipt"])
    vch = voucher_for(intent, receipt, key("fog"))
    assert vch is not None and vch.hex() == g["vch"]
    assert voucher_for(intent, receipt, key("fog")) == vch  # a replay: the same bytes
    v = open_envelope(vch, Voucher, signer=pub("fog")).msg
    i = open_envelope(intent, Intent).msg
    r = open_envelope(receipt, Receipt).msg
    assert v.voucher_id == r.intent_id and v.device == i.device and v.fog_id == i.fog_id
    assert (v.amount_micros, v.currency) == (i.amount_micros, i.currency)
    assert (v.not_before_ms, v.not_after_ms) == (r.time_ms, r.time_ms + VOUCHER_LIFE_MS)
    assert v.payees == ("charger-7", "parking-2") and is_voucher_record(vch)
    assert not is_voucher_record(intent)


def test_no_voucher_for_other_payees_or_declines() -> None:
    ok = open_envelope(bytes.fromhex(golden()["voucher_intent"]["receipt"]), Receipt).msg
    other = seal_signed(
        Intent(
            device=pub("device"),
            fog_id="fog-1",
            seq=1,
            payee_id="shop",
            amount_micros=5,
            currency="EUR",
            time_ms=T0_MS,
        ),
        key("device"),
    )
    receipt = seal_signed(
        Receipt(
            intent_id=other.id,
            device=pub("device"),
            seq=1,
            status="ok",
            log_index=1,
            lease_id=ok.lease_id,
            time_ms=T0_MS,
        ),
        key("fog"),
    )
    assert voucher_for(other.raw, receipt.raw, key("fog")) is None
    intent = bytes.fromhex(golden()["voucher_intent"]["intent"])
    declined = seal_signed(
        Receipt(
            intent_id=ok.intent_id,
            device=pub("device"),
            seq=7,
            status="declined",
            reason=Reason.LIMIT_TX,
            time_ms=T0_MS,
        ),
        key("fog"),
    )
    assert voucher_for(intent, declined.raw, key("fog")) is None
    assert voucher_for(b"voucher but not an envelope", declined.raw, key("fog")) is None


def test_payee_lists_in_the_memo() -> None:
    ids = [f"pad-{n}" for n in range(VOUCHER_PAYEES_MAX)]
    assert decode_payees(encode_payees(ids)) == tuple(ids)
    assert decode_payees(None) is None
    assert decode_payees(b"free text, not a list") is None  # any payee
    for bad in ([], ["a", "a"], ["voucher"], [*ids, "one-more"], ["x" * 40, "y" * 40]):
        with pytest.raises(Declined):
            encode_payees(bad)


def test_a_bundle_that_does_not_decode_is_malformed() -> None:
    for data in (b"", b"\x93\xc4\x00\xc4\x00", b"\x92\xc4\x00\xc4\x00", b"\xc4\x00"):
        with pytest.raises(VoucherError) as info:
            decode_bundle(data)
        assert info.value.code == "malformed"
