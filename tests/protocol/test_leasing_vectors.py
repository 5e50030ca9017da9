"""protocol/vectors/leasing-v1.json: current, reproducible, and true for our code: every
envelope opens as its type with its signer's key (the fog's; the issuer's for ``rbal``) and
gives the stated body and id; every refused payload is refused with the stated reason."""

import json
from functools import cache
from typing import Any

import pytest

from protocol import leasing_vectors
from protocol.errors import Declined
from protocol.leasing import LeaseRecall, LeaseReport, LeaseRequest
from protocol.reasons import Reason
from protocol.signing import open_envelope, public_key, seal
from protocol.vectors import key, seed

TYPES = {"lreq": LeaseRequest, "lrep": LeaseReport, "rbal": LeaseRecall}
SIGNERS = {"lreq": "fog", "lrep": "fog", "rbal": "issuer"}


@cache
def golden() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(leasing_vectors.DEFAULT_PATH.read_text())
    return data


def test_both_types_and_both_forms_are_covered() -> None:
    g = golden()
    assert {e["type"] for e in g["envelopes"]} == set(TYPES)
    bodies = [
        open_envelope(bytes.fromhex(e["envelope"]), TYPES[e["type"]]).msg for e in g["envelopes"]
    ]
    requests = [b for b in bodies if isinstance(b, LeaseRequest)]
    assert {r.amount_micros is None for r in requests} == {True, False}  # initial and amount
    reports = [b for b in bodies if isinstance(b, LeaseReport)]
    assert {r.last_batch == 0 for r in reports} == {True, False}
    assert {m["reason"] for m in g["malformed"]} == {"malformed", "bad_signature"}


@pytest.mark.parametrize("e", golden()["envelopes"], ids=lambda e: e["name"])
def test_envelope_opens_with_the_stated_body_and_id(e: dict[str, str]) -> None:
    role = SIGNERS[e["type"]]
    signer = key(role)
    assert e["seed"] == seed(role).hex()
    assert golden()["fog_seed"] == seed("fog").hex()
    signed = open_envelope(
        bytes.fromhex(e["envelope"]), TYPES[e["type"]], signer=public_key(signer)
    )
    assert (signed.body.hex(), signed.id.hex()) == (e["body"], e["id"])
    assert seal(signed.msg, signer).hex() == e["envelope"]  # our encoder writes the same bytes


@pytest.mark.parametrize("m", golden()["malformed"], ids=lambda m: m["name"])
def test_refused_with_the_stated_reason(m: dict[str, str]) -> None:
    with pytest.raises(Declined) as info:
        open_envelope(bytes.fromhex(m["payload"]), TYPES[m["topic_type"]])
    assert info.value.reason is Reason(m["reason"])
