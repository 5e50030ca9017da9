from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fog.world import World


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path / "fog.db")
    yield w
    w.store.close()
