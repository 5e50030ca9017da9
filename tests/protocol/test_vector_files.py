"""Every project vector file (docs/protocol.md sections 14, 17, 18) is what its module builds
now, and ``python -m protocol.X_vectors PATH`` writes the same bytes."""

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from protocol.vectors import dumps

MODULES = ["leasing", "replica", "gossip", "held", "transfer", "voucher"]


@pytest.mark.parametrize("name", MODULES)
def test_file_is_current_and_reproducible(name: str, tmp_path: Path) -> None:
    module = importlib.import_module(f"protocol.{name}_vectors")
    text = module.DEFAULT_PATH.read_text()
    assert text == dumps(module.build())
    out = tmp_path / f"{name}.json"
    subprocess.run([sys.executable, "-m", f"protocol.{name}_vectors", str(out)], check=True)
    assert out.read_text() == text
