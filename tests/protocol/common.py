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
