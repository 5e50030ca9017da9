"""Strict MessagePack decoding (spec section 2).

Every limit is passed to msgpack explicitly; nothing relies on library defaults. Maps are
decoded through a pairs hook that refuses duplicate keys, extension types are refused, and
trailing bytes after the top-level object are refused. Every failure becomes
``Declined(Reason.MALFORMED)``: third-party exceptions are translated once, here.
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


def pack(obj: Any) -> bytes:
    """Encode with bin for bytes and str for text (msgpack's current format)."""
    out: bytes = msgpack.packb(obj, use_bin_type=True)
    return out
