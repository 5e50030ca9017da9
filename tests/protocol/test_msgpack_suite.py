"""The strict decoder against kawanet/msgpack-test-suite: every non-extension value decodes
to the expected value from each of its encodings; every extension (timestamps included) is
refused; duplicate keys, trailing bytes and exceeded limits are refused."""

import json
from typing import Any

import pytest

from protocol.codec import pack, unpack_strict
from protocol.errors import Declined
from protocol.reasons import Reason
from tests.protocol.common import DATA

SUITE: dict[str, list[dict[str, Any]]] = json.loads(
    (DATA / "msgpack" / "msgpack-test-suite.json").read_text()
)
FLOAT_TAGS = {0xCA, 0xCB}


def decode_hex(enc: str) -> bytes:
    return bytes.fromhex(enc.replace("-", ""))


def expected(entry: dict[str, Any]) -> Any:
    if "bignum" in entry:
        return int(entry["bignum"])
    if "binary" in entry:
        return decode_hex(entry["binary"])
    for kind in ("nil", "bool", "number", "string", "array", "map"):
        if kind in entry:
            return entry[kind]
    raise AssertionError(f"unknown entry {entry}")


def values() -> list[Any]:
    out = []
    for name, entries in SUITE.items():
        for entry in entries:
            if "ext" in entry or "timestamp" in entry:
                continue
            for enc in entry["msgpack"]:
                out.append(pytest.param(expected(entry), enc, id=f"{name}:{enc}"))
    return out


def extensions() -> list[Any]:
    return [
        pytest.param(enc, id=f"{name}:{enc}")
        for name, entries in SUITE.items()
        for entry in entries
        if "ext" in entry or "timestamp" in entry
        for enc in entry["msgpack"]
    ]


def test_suite_is_complete() -> None:
    assert sum(len(e["msgpack"]) for es in SUITE.values() for e in es) == 233
    assert len(extensions()) == 30


@pytest.mark.parametrize(("want", "enc"), values())
def test_value_decodes_from_every_encoding(want: Any, enc: str) -> None:
    data = decode_hex(enc)
    got = unpack_strict(data, bytes_max=1024)
    assert got == want
    if isinstance(want, int | float) and not isinstance(want, bool):
        # integer encodings give int, float32/64 encodings give float: never mixed up
        assert type(got) is (float if data[0] in FLOAT_TAGS else int)
    else:
        assert type(got) is type(want)


@pytest.mark.parametrize("enc", extensions())
def test_extension_types_are_refused(enc: str) -> None:
    with pytest.raises(Declined) as e:
        unpack_strict(decode_hex(enc), bytes_max=1024)
    assert e.value.reason is Reason.MALFORMED


def refused(data: bytes, *, bytes_max: int = 1024, items_max: int = 64) -> Declined:
    with pytest.raises(Declined) as e:
        unpack_strict(data, bytes_max=bytes_max, items_max=items_max)
    assert e.value.reason is Reason.MALFORMED
    return e.value


def test_duplicate_key_refused_at_any_depth() -> None:
    refused(b"\x82\xa1a\x01\xa1a\x02")  # {"a": 1, "a": 2}
    refused(b"\x82\xa1a\x01\xa1a\x01")  # same value twice is still a duplicate
    refused(b"\x91\x82\xa1b\x01\xa1b\x02")  # [{"b": 1, "b": 2}]
    assert unpack_strict(b"\x82\xa1a\x01\xa1b\x02", bytes_max=16) == {"a": 1, "b": 2}


def test_trailing_bytes_refused() -> None:
    assert unpack_strict(b"\x01", bytes_max=16) == 1
    refused(b"\x01\x02")
    refused(pack({"a": 1}) + b"\xc0")


def test_non_str_map_keys_refused() -> None:
    refused(b"\x81\x01\x02")  # {1: 2}
    refused(b"\x81\xc0\x02")  # {nil: 2}


def test_limits_are_explicit() -> None:
    refused(bytes(17), bytes_max=16)
    refused(pack(list(range(5))), items_max=4)
    refused(pack({str(i): i for i in range(5)}), items_max=4)
    assert unpack_strict(pack(list(range(4))), bytes_max=16, items_max=4) == [0, 1, 2, 3]
    # a length header promising more than the payload holds
    refused(b"\xc6\xff\xff\xff\xff")
    refused(b"\xdd\xff\xff\xff\xff")


def test_invalid_utf8_and_reserved_byte_refused() -> None:
    refused(b"\xa1\xff")
    refused(b"\xc1")
    refused(b"")


def test_not_bytes_refused() -> None:
    refused("abc")  # type: ignore[arg-type]


def test_deep_nesting_is_refused_not_crashing() -> None:
    refused(b"\x91" * 2000 + b"\x00", bytes_max=4096)
    refused(b"\x81\xa1a" * 2000 + b"\x00", bytes_max=8192)
