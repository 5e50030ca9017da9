"""protocol/vectors/transfer-v1.json: current, reproducible, and true for our code: both
envelopes open with the fog's key and give the stated body and id, the ``xfer``'s ``x`` is the
transfer id of the ``xreq``'s id, and every refused payload is refused with its reason."""

import json
from functools import cache
from typing import Any

import pytest

from protocol import transfer_vectors
from protocol.errors import Declined
from protocol.reasons import Reason
from protocol.signing import open_envelope, public_key, seal
from protocol.transfer import Transfer, TransferRequest, transfer_id
from protocol.vectors import key, seed

TYPES = {"xreq": TransferRequest, "xfer": Transfer}


@cache
def golden() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(transfer_vectors.DEFAULT_PATH.read_text())
    return data


def test_the_transfer_answers_the_request_by_its_id() -> None:
    g = golden()
    assert [e["type"] for e in g["envelopes"]] == ["xreq", "xfer"]
    request = open_envelope(bytes.fromhex(g["envelopes"][0]["envelope"]), TransferRequest)
    xfer = open_envelope(bytes.fromhex(g["envelopes"][1]["envelope"]), Transfer).msg
    [ids] = g["transfer_ids"]
    assert ids["request_id"] == request.id.hex()
    assert ids["transfer_id"] == transfer_id(request.id).hex() == xfer.transfer_id.hex()
    assert (xfer.fog_id, xfer.receiver_id) == (request.msg.giver_id, request.msg.fog_id)
    assert {m["reason"] for m in g["malformed"]} == {"malformed", "bad_signature"}


@pytest.mark.parametrize("e", golden()["envelopes"], ids=lambda e: e["name"])
def test_envelope_opens_with_the_stated_body_and_id(e: dict[str, str]) -> None:
    fog = key("fog")
    assert e["seed"] == golden()["fog_seed"] == seed("fog").hex()
    signed = open_envelope(bytes.fromhex(e["envelope"]), TYPES[e["type"]], signer=public_key(fog))
    assert (signed.body.hex(), signed.id.hex()) == (e["body"], e["id"])
    assert seal(signed.msg, fog).hex() == e["envelope"]  # our encoder writes the same bytes


@pytest.mark.parametrize("m", golden()["malformed"], ids=lambda m: m["name"])
def test_refused_with_the_stated_reason(m: dict[str, str]) -> None:
    with pytest.raises(Declined) as info:
        open_envelope(bytes.fromhex(m["payload"]), TYPES[m["topic_type"]])
    assert info.value.reason is Reason(m["reason"])
