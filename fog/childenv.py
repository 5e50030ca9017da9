"""The environment of the fog's child processes (``python -m fog.storeproc``, ``python -m
fog.brokerchild``, ``python -m fog.verifychild``): the parent's, with the directory holding
the fog package first on PYTHONPATH, so the child imports the same code whatever its working
directory; and ``spawn``, which starts one on a socket pair."""

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Final

ROOT: Final = str(Path(__file__).resolve().parent.parent)


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    return env


def spawn(module: str) -> "tuple[socket.socket, subprocess.Popen[bytes]]":
    """``python -m module FD`` with the child's end of a new socket pair as FD (passed, not
    inherited otherwise), stdin from /dev/null; returns the parent's end and the process."""
    ours, theirs = socket.socketpair()
    with theirs:
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", module, str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                env=child_env(),
                stdin=subprocess.DEVNULL,
            )
        except BaseException:
            ours.close()
            raise
    return ours, proc
