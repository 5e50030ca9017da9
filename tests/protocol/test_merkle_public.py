"""Merkle proofs against transparency-dev/merkle's RFC 6962/9162 test data, including every
case that must fail (wantErr), and against its reference leaves and roots."""

import base64
import json
from typing import Any

import pytest

from protocol import merkle
from tests.protocol.common import DATA

MERKLE = DATA / "merkle"


def b64(s: str | None) -> bytes:
    return base64.b64decode(s) if s else b""


def cases(kind: str) -> list[Any]:
    files = sorted((MERKLE / kind).rglob("*.json"))
    assert files
    return [pytest.param(json.loads(f.read_text()), id=str(f.relative_to(MERKLE))) for f in files]


def reference_leaves() -> tuple[list[bytes], list[bytes]]:
    data = json.loads((MERKLE / "leaf_inputs_and_roots.json").read_text())
    leaves = [bytes.fromhex(x) for x in data["leaf_inputs_hex"]]
    roots = [bytes.fromhex(x) for x in data["root_hash_by_tree_size_hex"]]
    return leaves, roots


@pytest.mark.parametrize("case", cases("inclusion"))
def test_inclusion(case: dict[str, Any]) -> None:
    ok = merkle.verify_inclusion(
        b64(case["leafHash"]),
        case["leafIdx"],
        case["treeSize"],
        [b64(p) for p in case["proof"] or []],
        b64(case["root"]),
    )
    assert ok is not case["wantErr"], case["desc"]


@pytest.mark.parametrize("case", cases("consistency"))
def test_consistency(case: dict[str, Any]) -> None:
    ok = merkle.verify_consistency(
        case["size1"],
        case["size2"],
        b64(case["root1"]),
        b64(case["root2"]),
        [b64(p) for p in case["proof"] or []],
    )
    assert ok is not case["wantErr"], case["desc"]


def test_data_has_failing_cases() -> None:
    inclusion = [c.values[0] for c in cases("inclusion")]
    consistency = [c.values[0] for c in cases("consistency")]
    assert sum(c["wantErr"] for c in inclusion) > 50
    assert sum(c["wantErr"] for c in consistency) > 50


def test_reference_roots_sizes_0_to_8() -> None:
    leaves, roots = reference_leaves()
    assert len(roots) == 9
    for n, want in enumerate(roots):
        assert merkle.root_of_records(leaves[:n]) == want
    assert merkle.EMPTY_ROOT == roots[0]


def _happy(kind: str) -> list[dict[str, Any]]:
    return [c.values[0] for c in cases(kind) if not c.values[0]["wantErr"]]


def test_our_inclusion_proofs_equal_the_reference_proofs() -> None:
    """Where a happy-path proof is over the reference leaves, we produce the same bytes."""
    leaves, roots = reference_leaves()
    hashes = [merkle.leaf_hash(x) for x in leaves]
    compared = 0
    for c in _happy("inclusion"):
        n, i = c["treeSize"], c["leafIdx"]
        if n <= len(leaves) and b64(c["root"]) == roots[n]:
            assert merkle.inclusion_proof(hashes[:n], i) == [b64(p) for p in c["proof"] or []]
            compared += 1
    assert compared >= 5


def test_our_consistency_proofs_equal_the_reference_proofs() -> None:
    leaves, roots = reference_leaves()
    hashes = [merkle.leaf_hash(x) for x in leaves]
    compared = 0
    for c in _happy("consistency"):
        m, n = c["size1"], c["size2"]
        if n <= len(leaves) and b64(c["root2"]) == roots[n] and 0 < m < n:
            assert merkle.consistency_proof(hashes[:n], m) == [b64(p) for p in c["proof"]]
            compared += 1
    assert compared >= 3
