"""protocol/vectors/replica-v1.json: current, reproducible, and true for our code: every
envelope opens as its type with the fog's key and gives the stated body and id; every refused
payload is refused with the stated reason."""

import json
import re
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from protocol import replica_vectors
from protocol.errors import Declined
from protocol.messages import decode_body
from protocol.reasons import Reason
from protocol.replica import Fetch, ReplicaAck
from protocol.signing import message_id, open_envelope, public_key, seal
from protocol.vectors import key, seed

TYPES = {"racc": ReplicaAck, "fetch": Fetch}


@cache
def golden() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(replica_vectors.DEFAULT_PATH.read_text())
    return data


def test_both_types_are_covered_and_each_rule_refused() -> None:
    g = golden()
    assert {e["type"] for e in g["envelopes"]} == set(TYPES)
    names = {m["name"] for m in g["malformed"]}
    assert {"racc_holder_is_origin", "fetch_from_zero", "racc_bad_signature"} <= names
    assert {m["reason"] for m in g["malformed"]} == {"malformed", "bad_signature"}


def test_envelope_limit_is_1024_bytes() -> None:
    """The largest racc (63-character fog ids, the largest integers) fits its limit."""
    big = ReplicaAck(
        origin="a" * 63, number=2**64 - 1, header_id=bytes(32), holder="b" * 63, time_ms=2**64 - 1
    )
    assert len(seal(big, key("fog"))) <= 1_024


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


def test_the_document_lists_the_vectors_of_the_file() -> None:
    """docs/protocol.md 17.2's table: each body and id is the file's, and true for our code."""
    doc = (Path(__file__).parents[2] / "docs" / "protocol.md").read_text()
    section = doc[doc.index("### 17.2") : doc.index("### 17.3")]
    row = r"^\| `([a-z_0-9]+)` \| `(racc|fetch)` \| `([0-9a-f]+)` \| `([0-9a-f]{64})` \|$"
    rows = re.findall(row, section, re.MULTILINE)
    by_name = {e["name"]: e for e in golden()["envelopes"]}
    assert {r[0] for r in rows} == set(by_name)
    for name, msg_type, body, msg_id in rows:
        e = by_name[name]
        assert (e["type"], e["body"], e["id"]) == (msg_type, body, msg_id)
        decode_body(TYPES[msg_type], bytes.fromhex(body))
        assert message_id(msg_type, bytes.fromhex(body)).hex() == msg_id
