"""The environment of the fog's child processes (``python -m fog.storeproc``, ``python -m
fog.brokerchild``): the parent's, with the directory holding the fog package first on
PYTHONPATH, so the child imports the same code whatever its working directory."""

import os
from pathlib import Path
from typing import Final

ROOT: Final = str(Path(__file__).resolve().parent.parent)


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    return env
