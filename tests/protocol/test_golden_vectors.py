"""protocol/vectors/v1.json: its format, its determinism, and our implementation against it.

The file is what device makers build against; these tests make sure it is current (equal to
a fresh ``python -m protocol.vectors``), complete (every type, every section 2 rule, every
tree size 0..17) and true (our code opens, refuses and proves exactly what it says)."""

import hashlib
import json
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import nacl.signing
import pytest

from protocol import merkle, vectors
from protocol.batch import decode_record
from protocol.errors import Declined
from protocol.messages import MESSAGE_TYPES, Intent, Receipt
from protocol.signing import open_envelope, seal, signing_input, split_envelope, verify
from tests.protocol.common import VECTORS, mth


@cache
def golden() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(VECTORS.read_text())
    return data


def envelopes() -> list[Any]:
    return [pytest.param(e, id=e["name"]) for e in golden()["envelopes"]]


def refused() -> list[Any]:
    return [pytest.param(m, id=m["name"]) for m in golden()["malformed"]]


def trees() -> list[Any]:
    return [pytest.param(t, id=f"size{len(t['leaves'])}") for t in golden()["merkle"]]


def test_file_is_current() -> None:
    """The committed file equals a fresh build (regenerate with ``make vectors``)."""
    assert VECTORS.read_text() == vectors.dumps(vectors.build())


def test_generator_is_deterministic(tmp_path: Path) -> None:
    outs = [tmp_path / "a.json", tmp_path / "b.json"]
    for out in outs:
        subprocess.run([sys.executable, "-m", "protocol.vectors", str(out)], check=True)
    assert outs[0].read_bytes() == outs[1].read_bytes() == VECTORS.read_bytes()


def test_format() -> None:
    g = golden()
    assert set(g) == {"version", "envelopes", "malformed", "merkle"}
    assert g["version"] == 1
    for e in g["envelopes"]:
        assert set(e) == {"name", "type", "seed", "body", "envelope", "id"}
    for m in g["malformed"]:
        assert set(m) == {"name", "topic_type", "payload", "reason"}
        assert m["reason"] in {"malformed", "bad_signature"}
        assert m["topic_type"] in MESSAGE_TYPES
    for t in g["merkle"]:
        assert set(t) == {"leaves", "root", "proofs", "consistency"}
    names = [x["name"] for x in g["envelopes"] + g["malformed"]]
    assert len(names) == len(set(names))


def test_coverage() -> None:
    g = golden()
    assert {e["type"] for e in g["envelopes"]} == set(MESSAGE_TYPES)
    assert len(g["malformed"]) >= 15
    sizes = [len(t["leaves"]) for t in g["merkle"]]
    assert set(range(18)) <= set(sizes)
    for t in g["merkle"]:
        assert [p["index"] for p in t["proofs"]] == list(range(len(t["leaves"])))


# One vector per rule of spec section 2 at least (names are part of the file's contract).
RULES = {
    "truncation": ["truncated_last_byte", "truncated_half", "empty_payload"],
    "trailing bytes": ["trailing_byte"],
    "duplicate key": ["duplicate_key"],
    "unknown key": ["unknown_key"],
    "missing key": ["missing_key_a"],
    "wrong types": ["amount_str", "amount_float", "memo_str", "time_bool", "body_not_bin"],
    "out of range": ["amount_zero", "amount_over_2_53", "seq_zero", "memo_65_bytes"],
    "patterns": ["fog_id_uppercase", "fog_id_reserved", "currency_lowercase"],
    "oversize": ["oversize_bind", "oversize_intent_envelope"],
    "not an envelope": ["not_an_array", "array_of_3", "array_of_5", "signer_31_bytes"],
    "wrong envelope type": ["wrong_envelope_type", "unknown_envelope_type"],
    "signer not d": ["signer_not_d"],
    "flipped signature bit": ["sig_bit_flipped", "sig_last_bit_flipped"],
}


@pytest.mark.parametrize("rule", RULES)
def test_every_section_2_rule_has_a_vector(rule: str) -> None:
    names = {m["name"] for m in golden()["malformed"]}
    assert set(RULES[rule]) <= names


@pytest.mark.parametrize("entry", envelopes())
def test_envelope_opens_and_reseals_byte_for_byte(entry: dict[str, str]) -> None:
    cls = MESSAGE_TYPES[entry["type"]]
    key = nacl.signing.SigningKey(bytes.fromhex(entry["seed"]))
    raw = bytes.fromhex(entry["envelope"])
    signed = open_envelope(raw, cls, signer=bytes(key.verify_key))
    assert signed.body.hex() == entry["body"]
    assert signed.id.hex() == entry["id"]
    assert signed.raw == raw
    # the id is SHA-256 of the signing input, computed here without our helpers
    want = hashlib.sha256(b"fogpay/1/" + entry["type"].encode() + b"\x00" + signed.body)
    assert signed.id == want.digest()
    assert seal(signed.msg, key) == raw


@pytest.mark.parametrize("entry", refused())
def test_refused_payload_gets_its_reason(entry: dict[str, str]) -> None:
    with pytest.raises(Declined) as e:
        open_envelope(bytes.fromhex(entry["payload"]), MESSAGE_TYPES[entry["topic_type"]])
    assert e.value.reason == entry["reason"]


def test_bad_bodies_carry_valid_signatures() -> None:
    """A malformed body with a valid signature: the reason cannot be bad_signature."""
    checked = 0
    for m in golden()["malformed"]:
        try:
            env = split_envelope(bytes.fromhex(m["payload"]), bytes_max=4096)
        except Declined:
            continue
        if m["reason"] == "malformed" and env.type == m["topic_type"]:
            if m["name"] != "sig_zero_and_body_bad":
                assert verify(env.signer, signing_input(env.type, env.body), env.sig), m["name"]
                checked += 1
    assert checked >= 25


@pytest.mark.parametrize("tree", trees())
def test_merkle_tree(tree: dict[str, Any]) -> None:
    leaves = [bytes.fromhex(x) for x in tree["leaves"]]
    hashes = [merkle.leaf_hash(x) for x in leaves]
    root = bytes.fromhex(tree["root"])
    assert merkle.root(hashes) == root == mth(leaves)
    for p in tree["proofs"]:
        path = [bytes.fromhex(x) for x in p["path"]]
        assert merkle.inclusion_proof(hashes, p["index"]) == path
        assert merkle.verify_inclusion(hashes[p["index"]], p["index"], len(leaves), path, root)
    for c in tree["consistency"]:
        m, path = c["size1"], [bytes.fromhex(x) for x in c["path"]]
        assert merkle.consistency_proof(hashes, m) == path
        root1 = merkle.root(hashes[:m])
        assert merkle.verify_consistency(m, len(leaves), root1, root, path)


def test_records_tree_holds_real_records() -> None:
    """The last tree's leaves are records of real intent and receipt envelopes."""
    tree = golden()["merkle"][-1]
    assert len(tree["leaves"]) == 3
    for leaf in tree["leaves"]:
        intent_env, receipt_env = decode_record(bytes.fromhex(leaf))
        intent = open_envelope(intent_env, Intent)
        receipt = open_envelope(receipt_env, Receipt)
        assert receipt.msg.ok and receipt.msg.device == intent.msg.device
