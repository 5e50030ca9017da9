"""Paths and hypothesis settings shared by the protocol tests (no global profile: other
packages' tests keep their own settings)."""

from pathlib import Path
from typing import Final

from hypothesis import HealthCheck, settings

DATA: Final = Path(__file__).parent.parent / "data"
VECTORS: Final = Path(__file__).parent.parent.parent / "protocol" / "vectors" / "v1.json"

# No timing in unit tests: no deadline. Bounded example counts keep the suite fast.
PROPERTY: Final = settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
FEW: Final = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def mth(records: list[bytes]) -> bytes:
    """RFC 9162 section 2.1.1 MTH, written from the RFC's recursive definition (a reference
    independent of protocol.merkle's iterative code)."""
    import hashlib

    n = len(records)
    if n == 0:
        return hashlib.sha256(b"").digest()
    if n == 1:
        return hashlib.sha256(b"\x00" + records[0]).digest()
    k = 1
    while k * 2 < n:
        k *= 2
    return hashlib.sha256(b"\x01" + mth(records[:k]) + mth(records[k:])).digest()
