"""Strict MessagePack decoding (spec section 2).

Every limit is passed to msgpack explicitly; nothing relies on library defaults. Maps are
decoded through a pairs hook that refuses duplicate keys, extension types are refused, and
trailing bytes after the top-level object are refused. Every failure becomes
``Declined(Reason.MALFORMED)``: third-party exceptions are translated once, here.

``unpack_body`` is the same decoder for a message body, without the Python pairs hook (a
third of a body's decoding time): it finds a duplicate key of the top-level map by comparing
the decoded map's size with the count its header declares. It does not see duplicates inside
a nested map, which is sound only where a nested map is refused anyway: a body's values are
ints, str, bin, an array of str (spec section 5) or arrays of such scalars (the federation's
``seen``, docs/protocol.md 17.4), no field check accepts a map, so
``protocol.messages.decode_body`` refuses any body holding one (and says why after decoding
it again with ``unpack_strict``).
"""

from typing import Any, NoReturn

import msgpack

from protocol.errors import Declined
from protocol.reasons import Reason

# A body nests at most an array of strings inside a map; an envelope is one flat array.
CONTAINER_ITEMS_MAX = 64


def _pairs(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    out: dict[Any, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate map key {key!r}")
        out[key] = value
    return out


def _no_ext(code: int, data: bytes) -> NoReturn:
    raise ValueError(f"extension type {code} not allowed")


def unpack_strict(
    data: bytes,
    *,
    bytes_max: int,
    items_max: int = CONTAINER_ITEMS_MAX,
    what: str = "payload",
) -> Any:
    """Decode one msgpack object from ``data`` with explicit limits, or raise MALFORMED."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise Declined(Reason.MALFORMED, f"{what}: not bytes")
    if len(data) > bytes_max:
        raise Declined(Reason.MALFORMED, f"{what}: {len(data)} bytes > {bytes_max}")
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            object_pairs_hook=_pairs,
            ext_hook=_no_ext,
            max_str_len=bytes_max,
            max_bin_len=bytes_max,
            max_array_len=items_max,
            max_map_len=items_max,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises ValueError, TypeError, UnicodeDecodeError, ...
        raise Declined(Reason.MALFORMED, f"{what}: {type(exc).__name__}: {exc}") from exc


def unpack_body(
    data: bytes, *, bytes_max: int, items_max: int = CONTAINER_ITEMS_MAX, what: str = "body"
) -> Any:
    """``unpack_strict`` for a message body (a flat map): see the module docstring for why a
    duplicate key is caught here without a hook, and where that is valid."""
    if type(data) is not bytes and not isinstance(data, bytearray | memoryview):
        raise Declined(Reason.MALFORMED, f"{what}: not bytes")
    if len(data) > bytes_max:
        raise Declined(Reason.MALFORMED, f"{what}: {len(data)} bytes > {bytes_max}")
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            ext_hook=_no_ext,
            max_str_len=bytes_max,
            max_bin_len=bytes_max,
            max_array_len=items_max,
            max_map_len=items_max,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises ValueError, TypeError, UnicodeDecodeError, ...
        raise Declined(Reason.MALFORMED, f"{what}: {type(exc).__name__}: {exc}") from exc
    if type(obj) is dict and len(obj) != _map_count(data):
        unpack_strict(
            data, bytes_max=bytes_max, items_max=items_max, what=what
        )  # names the duplicate key
        raise AssertionError("a map shorter than its header has a duplicate key")
    return obj


def _map_count(data: bytes | bytearray | memoryview) -> int:
    """The entry count in the header of the map that ``data`` (one whole msgpack object,
    already decoded as a map) starts with: fixmap, map 16 or map 32."""
    tag = data[0]
    if tag <= 0x8F:  # fixmap 0x80-0x8f: nothing else decodes to a map
        return tag & 0x0F
    if tag == 0xDE:
        return int.from_bytes(data[1:3], "big")
    assert tag == 0xDF, tag
    return int.from_bytes(data[1:5], "big")


def pack(obj: Any) -> bytes:
    """Encode with bin for bytes and str for text (msgpack's current format)."""
    out: bytes = msgpack.packb(obj, use_bin_type=True)
    return out
