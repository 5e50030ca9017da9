"""Wire integers in SQLite: its integers are signed 64-bit, the wire's unsigned 64-bit.

Sequence numbers ``q`` are stored offset by -2^63 (order and identity kept); times are
clamped to 2^63-1 ms, which is "never" for any clock a fog will run on. Amounts and day
totals are at most 2^53 and are stored as they are.
"""

from typing import Final

INT64_MAX: Final = 2**63 - 1
U64_OFFSET: Final = 2**63


def to_i64(u: int) -> int:
    """An unsigned 64-bit wire integer as SQLite's signed one, order kept."""
    return u - U64_OFFSET


def from_i64(i: int) -> int:
    return i + U64_OFFSET


def clamp_ms(t: int) -> int:
    """A wire time for SQLite: clamped to 2^63-1 ms (never, for our clocks)."""
    return min(t, INT64_MAX)
