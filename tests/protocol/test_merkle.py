"""Merkle properties: roots equal the RFC's recursive definition; inclusion and consistency
proofs verify for random trees and fail for any altered leaf, index, path element or root."""

import hashlib

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from protocol import merkle
from tests.protocol.common import FEW, PROPERTY, mth

SIZE_MAX = 300


def leaves(n: int, salt: int = 0) -> list[bytes]:
    return [hashlib.sha256(f"{salt}:{i}".encode()).digest()[: i % 40] for i in range(n)]


def flip(h: bytes, bit: int) -> bytes:
    b = bytearray(h)
    b[bit // 8 % len(b)] ^= 1 << (bit % 8)
    return bytes(b)


@pytest.mark.parametrize("n", range(70))
def test_root_matches_rfc_definition(n: int) -> None:
    records = leaves(n)
    assert merkle.root_of_records(records) == mth(records)


def test_empty_tree() -> None:
    assert merkle.root([]) == hashlib.sha256(b"").digest() == merkle.EMPTY_ROOT
    with pytest.raises(IndexError):
        merkle.inclusion_proof([], 0)


def test_leaf_and_node_domain_separation() -> None:
    a, b = merkle.leaf_hash(b"a"), merkle.leaf_hash(b"b")
    assert a == hashlib.sha256(b"\x00a").digest()
    assert merkle.node_hash(a, b) == hashlib.sha256(b"\x01" + a + b).digest()
    # a two-leaf tree's root is not the leaf hash of the concatenation
    assert merkle.root([a, b]) != merkle.leaf_hash(a + b)


@st.composite
def tree_and_index(draw: st.DrawFn) -> tuple[list[bytes], int]:
    n = draw(st.integers(1, SIZE_MAX))
    hashes = [merkle.leaf_hash(x) for x in leaves(n, draw(st.integers(0, 9)))]
    return hashes, draw(st.integers(0, n - 1))


@PROPERTY
@given(ti=tree_and_index(), data=st.data())
def test_inclusion_proof_verifies_and_any_alteration_fails(
    ti: tuple[list[bytes], int], data: st.DataObject
) -> None:
    hashes, i = ti
    n, root = len(hashes), merkle.root(hashes)
    path = merkle.inclusion_proof(hashes, i)
    assert len(path) <= n.bit_length()
    assert merkle.verify_inclusion(hashes[i], i, n, path, root)
    bit = data.draw(st.integers(0, 255))
    assert not merkle.verify_inclusion(flip(hashes[i], bit), i, n, path, root)
    assert not merkle.verify_inclusion(hashes[i], i, n, path, flip(root, bit))
    if n > 1:
        j = data.draw(st.integers(0, n - 1).filter(lambda j: j != i))
        assert not merkle.verify_inclusion(hashes[i], j, n, path, root)
    if path:
        k = data.draw(st.integers(0, len(path) - 1))
        altered = [*path[:k], flip(path[k], bit), *path[k + 1 :]]
        assert not merkle.verify_inclusion(hashes[i], i, n, altered, root)
        assert not merkle.verify_inclusion(hashes[i], i, n, path[:-1], root)
    assert not merkle.verify_inclusion(hashes[i], i, n, [*path, root], root)
    assert not merkle.verify_inclusion(hashes[i], n, n, path, root)


@st.composite
def tree_and_prefix(draw: st.DrawFn) -> tuple[list[bytes], int]:
    n = draw(st.integers(2, SIZE_MAX))
    hashes = [merkle.leaf_hash(x) for x in leaves(n, draw(st.integers(0, 9)))]
    return hashes, draw(st.integers(1, n - 1))


@PROPERTY
@given(tm=tree_and_prefix(), data=st.data())
def test_consistency_proof_verifies_and_any_alteration_fails(
    tm: tuple[list[bytes], int], data: st.DataObject
) -> None:
    hashes, m = tm
    n = len(hashes)
    root1, root2 = merkle.root(hashes[:m]), merkle.root(hashes)
    proof = merkle.consistency_proof(hashes, m)
    assert merkle.verify_consistency(m, n, root1, root2, proof)
    bit = data.draw(st.integers(0, 255))
    assert not merkle.verify_consistency(m, n, flip(root1, bit), root2, proof)
    assert not merkle.verify_consistency(m, n, root1, flip(root2, bit), proof)
    k = data.draw(st.integers(0, len(proof) - 1))
    altered = [*proof[:k], flip(proof[k], bit), *proof[k + 1 :]]
    assert not merkle.verify_consistency(m, n, root1, root2, altered)
    assert not merkle.verify_consistency(m, n, root1, root2, proof[:-1])
    assert not merkle.verify_consistency(n, m, root2, root1, proof)


@FEW
@given(tm=tree_and_prefix(), salt=st.integers(10, 20))
def test_consistency_fails_for_a_rewritten_history(tm: tuple[list[bytes], int], salt: int) -> None:
    """A log that changed one of its first m records is not consistent with the old root."""
    hashes, m = tm
    rewritten = list(hashes)
    rewritten[salt % m] = merkle.leaf_hash(b"rewritten")
    assume(rewritten != hashes)
    proof = merkle.consistency_proof(rewritten, m)
    assert not merkle.verify_consistency(
        m, len(hashes), merkle.root(hashes[:m]), merkle.root(rewritten), proof
    )


def test_trivial_consistency() -> None:
    hashes = [merkle.leaf_hash(x) for x in leaves(5)]
    r = merkle.root(hashes)
    assert merkle.consistency_proof(hashes, 5) == []
    assert merkle.verify_consistency(5, 5, r, r, [])
    assert not merkle.verify_consistency(5, 5, r, r, [r])
    assert not merkle.verify_consistency(0, 5, merkle.EMPTY_ROOT, r, [])  # proves nothing
    with pytest.raises(IndexError):
        merkle.consistency_proof(hashes, 6)


def test_proof_elements_must_be_32_bytes() -> None:
    hashes = [merkle.leaf_hash(x) for x in leaves(4)]
    r = merkle.root(hashes)
    path = merkle.inclusion_proof(hashes, 1)
    assert merkle.verify_inclusion(hashes[1], 1, 4, path, r)
    assert not merkle.verify_inclusion(hashes[1] + b"\x00", 1, 4, path, r)
    assert not merkle.verify_inclusion(hashes[1], 1, 4, [path[0][:31], path[1]], r)
