"""Seeded payload mutations for the fuzz campaign (``tests/faults/fuzz.py``).

One ``random.Random(seed)`` drives everything, so a run is repeatable from its seed and a
failing payload can be found again. The operators, each named in the counts a run prints:

- ``flip``: 1-8 single-bit flips; ``byte``: 1-4 bytes set to random values;
- ``truncate``: cut at a random length (0 included); ``extend``: random bytes appended
  (sometimes past the 512-byte and 1,024-byte envelope limits, up to 64 KiB);
- ``insert`` / ``delete``: bytes inserted or removed in the middle;
- ``type_swap``: one msgpack value of the envelope or of its body replaced by a value of
  another type (int for bin, str for int, nil, float, array, map...), re-packed;
- ``huge_length``: a container or bin/str header rewritten to claim 2^16-1 or 2^32-1 items
  or bytes (array 32, map 32, bin 32, str 32) with nothing behind it;
- ``dup_key``: a body map with one key repeated (same or other value, first or last), in a
  fixmap, map 16 or map 32 header, re-signed with the real key so only the duplicate is wrong;
- ``resigned``: a well-formed, validly signed message with one field wrong for the fog
  (other fog, other currency, over the limit, stale time or sequence, unbound key,
  wrong topic device): only semantics are wrong;
- ``replay``: an authorized payload sent again byte for byte;
- ``random``: random bytes; ``msgpack``: a random msgpack value (nested).
"""

import random
import struct
from collections.abc import Callable
from typing import Any, Final

import msgpack

from protocol.codec import pack

OPERATORS: Final = (
    "flip",
    "byte",
    "truncate",
    "extend",
    "insert",
    "delete",
    "type_swap",
    "huge_length",
    "random",
    "msgpack",
)
EXTEND_BYTES_MAX: Final = 65_536
RANDOM_BYTES_MAX: Final = 1_200
MSGPACK_DEPTH_MAX: Final = 3


def flip(rng: random.Random, raw: bytes) -> bytes:
    if not raw:
        return bytes([1 << rng.randrange(8)])
    out = bytearray(raw)
    for _ in range(rng.randint(1, 8)):
        out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    return bytes(out)


def set_bytes(rng: random.Random, raw: bytes) -> bytes:
    if not raw:
        return bytes([rng.randrange(256)])
    out = bytearray(raw)
    for _ in range(rng.randint(1, 4)):
        out[rng.randrange(len(out))] = rng.randrange(256)
    return bytes(out)


def truncate(rng: random.Random, raw: bytes) -> bytes:
    return raw[: rng.randrange(len(raw))] if raw else raw


def extend(rng: random.Random, raw: bytes) -> bytes:
    size = rng.choice((1, 2, 8, 100, 600, 1_100, rng.randint(1, EXTEND_BYTES_MAX)))
    return raw + rng.randbytes(size)


def insert(rng: random.Random, raw: bytes) -> bytes:
    i = rng.randint(0, len(raw))
    return raw[:i] + rng.randbytes(rng.randint(1, 16)) + raw[i:]


def delete(rng: random.Random, raw: bytes) -> bytes:
    if len(raw) < 2:
        return b""
    i = rng.randrange(len(raw) - 1)
    return raw[:i] + raw[i + rng.randint(1, min(16, len(raw) - i)) :]


def random_value(rng: random.Random, depth: int = 0) -> Any:
    kinds = ["nil", "bool", "int", "negint", "bigint", "float", "str", "bin"]
    if depth < MSGPACK_DEPTH_MAX:
        kinds += ["array", "map"]
    kind = rng.choice(kinds)
    if kind == "nil":
        return None
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "int":
        return rng.choice((0, 1, 127, 128, 255, 256, 2**16, 2**32, 2**53, 2**53 + 1))
    if kind == "negint":
        return -rng.randint(1, 2**63)
    if kind == "bigint":
        return rng.randint(2**63, 2**64 - 1)
    if kind == "float":
        return rng.choice((0.0, -1.5, 1e300, float("inf"), float("nan")))
    if kind == "str":
        return "".join(chr(rng.randint(32, 0x2FF)) for _ in range(rng.randint(0, 70)))
    if kind == "bin":
        return rng.randbytes(rng.choice((0, 16, 31, 32, 33, 64, 65, 70)))
    if kind == "array":
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 5))]
    keys = ["d", "f", "q", "p", "a", "c", "t", "m", "i", "s", "zz", 1, b"k"]
    return {rng.choice(keys): random_value(rng, depth + 1) for _ in range(rng.randint(0, 5))}


def random_msgpack(rng: random.Random, _raw: bytes = b"") -> bytes:
    return pack(random_value(rng))


def random_bytes(rng: random.Random, _raw: bytes = b"") -> bytes:
    return rng.randbytes(rng.randint(0, RANDOM_BYTES_MAX))


def _unpack(raw: bytes) -> Any:
    return msgpack.unpackb(raw, strict_map_key=False, raw=False)


def type_swap(rng: random.Random, raw: bytes) -> bytes:
    """One value of the envelope (or of the body inside it) replaced by another type."""
    try:
        env = _unpack(raw)
    except Exception:
        return flip(rng, raw)
    if isinstance(env, list) and env:
        i = rng.randrange(len(env))
        body = env[i] if isinstance(env[i], bytes) else None
        if body is not None and rng.random() < 0.6:
            try:
                fields = _unpack(body)
            except Exception:
                fields = None
            if isinstance(fields, dict) and fields:
                key = rng.choice(list(fields))
                fields[key] = _other_type(rng, fields[key])
                env[i] = pack(fields)
                return pack(env)
        env[i] = _other_type(rng, env[i])
        return pack(env)
    return pack(_other_type(rng, env))


def _other_type(rng: random.Random, value: Any) -> Any:
    for _ in range(20):
        new = random_value(rng, depth=MSGPACK_DEPTH_MAX - 1)
        if type(new) is not type(value):
            return new
    return None


HUGE_HEADERS: Final = (
    b"\xdd\xff\xff\xff\xff",  # array 32 of 2^32-1
    b"\xdf\xff\xff\xff\xff",  # map 32 of 2^32-1
    b"\xc6\xff\xff\xff\xff",  # bin 32 of 2^32-1 bytes
    b"\xdb\xff\xff\xff\xff",  # str 32 of 2^32-1 bytes
    b"\xdc\xff\xff",  # array 16 of 65,535
    b"\xde\xff\xff",  # map 16 of 65,535
    b"\xc5\xff\xff",  # bin 16 of 65,535 bytes
)


def huge_length(rng: random.Random, raw: bytes) -> bytes:
    """A header claiming far more than follows: at the start, or in place of a header
    found inside (the envelope's array, its bin body)."""
    header = rng.choice(HUGE_HEADERS)
    where = rng.random()
    if where < 0.4 or len(raw) < 2:
        return header + raw[1:]
    if where < 0.7:
        # the body's bin header is the byte after the type string (fixarray, fixstr)
        if raw[0] & 0xF0 == 0x90 and len(raw) > 2 and raw[1] & 0xE0 == 0xA0:
            at = 2 + (raw[1] & 0x1F)
            return raw[:at] + header + raw[at + 2 :]
    i = rng.randrange(len(raw))
    return raw[:i] + header + raw[i:]


def dup_key_map(rng: random.Random, fields: dict[str, Any]) -> bytes:
    """The body map's pairs with one key repeated, in a fixmap, map 16 or map 32 header."""
    pairs = list(fields.items())
    key, value = rng.choice(pairs)
    extra = (key, value if rng.random() < 0.5 else random_value(rng, MSGPACK_DEPTH_MAX))
    pairs = [extra, *pairs] if rng.random() < 0.5 else [*pairs, extra]
    items = b"".join(pack(k) + pack(v) for k, v in pairs)
    n = len(pairs)
    width = rng.choice(("fix", "16", "32")) if n < 16 else rng.choice(("16", "32"))
    if width == "fix":
        head = bytes([0x80 | n])
    elif width == "16":
        head = b"\xde" + struct.pack(">H", n)
    else:
        head = b"\xdf" + struct.pack(">I", n)
    return head + items


MUTATORS: Final[dict[str, Callable[[random.Random, bytes], bytes]]] = {
    "flip": flip,
    "byte": set_bytes,
    "truncate": truncate,
    "extend": extend,
    "insert": insert,
    "delete": delete,
    "type_swap": type_swap,
    "huge_length": huge_length,
    "random": random_bytes,
    "msgpack": random_msgpack,
}


def mutate(rng: random.Random, raw: bytes) -> tuple[str, bytes]:
    """One operator of ``OPERATORS`` applied to ``raw`` (sometimes twice in a row)."""
    op = rng.choice(OPERATORS)
    out = MUTATORS[op](rng, raw)
    if rng.random() < 0.2:
        out = MUTATORS[rng.choice(OPERATORS[:6])](rng, out)
    return op, out
