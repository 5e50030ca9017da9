"""Our verifier against public Ed25519 vectors: RFC 8032 / djb sign.input, Wycheproof, and
C2SP's cctv edge cases, which pin that we accept exactly what libsodium accepts (spec
section 2). If someone swapped libsodium for a more lenient library (OpenSSL, cryptography,
ZIP-215 verifiers), the cctv tests fail."""

import json
from collections import Counter
from functools import cache
from typing import Any, Final

import nacl.signing
import pytest

from protocol.signing import is_valid_public_key, signing_key_from_seed, verify
from tests.protocol.common import DATA

ED = DATA / "ed25519"
# The order of the Ed25519 base point: S must be < L (libsodium rejects S >= L).
L: Final = 2**252 + 27742317777372353535851937790883648493
# cctv flags libsodium tolerates: a point with a low-order component that is not itself of
# low order, when the low-order parts cancel (cofactorless verification).
LIBSODIUM_TOLERATED: Final = frozenset({"low_order_component_A", "low_order_component_R"})


@cache
def djb_lines() -> list[tuple[bytes, bytes, bytes, bytes]]:
    out = []
    for line in (ED / "djb_sign.input").read_text().splitlines():
        sk, pk, msg, sm, _ = line.split(":")
        out.append(
            (bytes.fromhex(sk)[:32], bytes.fromhex(pk), bytes.fromhex(msg), bytes.fromhex(sm)[:64])
        )
    return out


@cache
def cctv() -> list[dict[str, Any]]:
    vectors: list[dict[str, Any]] = json.loads((ED / "cctv_ed25519vectors.json").read_text())
    return vectors


def test_djb_sign_input_has_all_1024_vectors() -> None:
    assert len(djb_lines()) == 1024


def test_rfc8032_section_7_1_tests_1_to_3() -> None:
    """Lines 1-3 of sign.input are RFC 8032 TEST 1-3; pin TEST 1 by its published bytes too."""
    seed, pk, msg, sig = djb_lines()[0]
    assert seed.hex() == "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60"
    assert pk.hex() == "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
    assert msg == b""
    assert sig.hex().startswith("e5564300c360ac729086e2cc806e828a")
    for seed, pk, msg, sig in djb_lines()[:3]:
        key = signing_key_from_seed(seed)
        assert bytes(key.verify_key) == pk
        assert key.sign(msg).signature == sig
        assert verify(pk, msg, sig)


def test_djb_sign_input_sign_and_verify() -> None:
    """Signing is deterministic (RFC 8032): our keys reproduce every signature, every
    signature verifies, and the same signature over a changed message does not."""
    for seed, pk, msg, sig in djb_lines():
        key = nacl.signing.SigningKey(seed)
        assert bytes(key.verify_key) == pk
        assert key.sign(msg).signature == sig
        assert verify(pk, msg, sig)
        assert not verify(pk, msg + b"\x00", sig)


def test_wycheproof() -> None:
    data = json.loads((ED / "wycheproof_ed25519_test.json").read_text())
    results: Counter[str] = Counter()
    for group in data["testGroups"]:
        pk = bytes.fromhex(group["publicKey"]["pk"])
        for t in group["tests"]:
            got = verify(pk, bytes.fromhex(t["msg"]), bytes.fromhex(t["sig"]))
            assert got == (t["result"] == "valid"), (t["tcId"], t["comment"])
            results[t["result"]] += 1
    assert results == {"valid": 88, "invalid": 63}


def libsodium_accepts(flags: list[str] | None) -> bool:
    """What libsodium's crypto_sign_verify_detached does with a cctv vector: it rejects a
    small-order or non-canonical A or R, and verifies without the cofactor (so a residue
    fails); it accepts mixed-order points whose low-order parts cancel."""
    return set(flags or ()) <= LIBSODIUM_TOLERATED


def test_cctv_accepts_exactly_what_libsodium_accepts() -> None:
    accepted = Counter[bool]()
    for v in cctv():
        got = verify(bytes.fromhex(v["key"]), v["msg"].encode(), bytes.fromhex(v["sig"]))
        assert got == libsodium_accepts(v["flags"]), (v["number"], v["flags"])
        accepted[got] += 1
    # 1 clean vector + 42 with mixed-order A and/or R; the other 871 are refused.
    assert accepted == {True: 43, False: 871}


@pytest.mark.parametrize(
    "flag",
    [
        "low_order_A",
        "low_order_R",
        "non_canonical_A",
        "non_canonical_R",
        "low_order_residue",
        "reencoded_k",
    ],
)
def test_cctv_every_vector_with_flag_is_rejected(flag: str) -> None:
    flagged = [v for v in cctv() if flag in (v["flags"] or ())]
    assert flagged
    for v in flagged:
        assert not verify(bytes.fromhex(v["key"]), v["msg"].encode(), bytes.fromhex(v["sig"]))


def test_cctv_cofactored_only_vectors_are_rejected() -> None:
    """Vectors that verify only with the cofactored equation (low_order_residue) fail:
    libsodium's verification is cofactorless."""
    residue = [v for v in cctv() if "low_order_residue" in (v["flags"] or ())]
    assert len(residue) == 583
    assert not any(
        verify(bytes.fromhex(v["key"]), v["msg"].encode(), bytes.fromhex(v["sig"])) for v in residue
    )


def test_non_canonical_s_is_rejected() -> None:
    _, pk, msg, sig = djb_lines()[5]
    s = int.from_bytes(sig[32:], "little")
    assert s < L
    malleated = sig[:32] + (s + L).to_bytes(32, "little")
    assert not verify(pk, msg, malleated)


def test_is_valid_public_key_on_cctv_keys() -> None:
    """Only a canonical encoding of a prime-order point is a valid key: small-order,
    mixed-order (low-order component) and non-canonical keys are all refused."""
    seen: Counter[bool] = Counter()
    for v in cctv():
        key = bytes.fromhex(v["key"])
        a_flags = {f for f in v["flags"] or () if f.endswith("_A")}
        assert is_valid_public_key(key) == (not a_flags), (v["number"], a_flags)
        seen[not a_flags] += 1
    assert seen[True] > 0 and seen[False] > 0


@pytest.mark.parametrize(
    "key_hex",
    [
        "00" * 32,  # order 4
        "01" + "00" * 31,  # identity
        "01" + "00" * 30 + "80",  # identity, x = -0
        "ec" + "ff" * 30 + "7f",  # order 2
        "ed" + "ff" * 30 + "7f",  # y > p
        "ee" + "ff" * 30 + "ff",  # identity, y > p, x = -0
        "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",  # order 8
        "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",  # order 8
    ],
)
def test_is_valid_public_key_refuses_small_order_and_non_canonical(key_hex: str) -> None:
    assert not is_valid_public_key(bytes.fromhex(key_hex))


def test_is_valid_public_key_accepts_real_keys_and_checks_length() -> None:
    for _, pk, _, _ in djb_lines()[:64]:
        assert is_valid_public_key(pk)
        assert not is_valid_public_key(pk[:31])
        assert not is_valid_public_key(pk + b"\x00")
    assert not is_valid_public_key(bytearray(djb_lines()[0][1]))  # type: ignore[arg-type]
