"""Running the real ``fogpay`` command line in a second process, and the files it needs."""

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pytest

from protocol.signing import public_key
from runtime.keyfile import new_key_file

FOGPAY: Final = [sys.executable, "-m", "fogpay.cli"]
# A command that hangs fails the test here rather than at pytest's global timeout.
COMMAND_TIMEOUT_S: Final = 60


def fogpay(
    *args: str, cwd: Path | None = None, code: str | None = None
) -> "subprocess.CompletedProcess[str]":
    """``fogpay ARGS`` in a second process (``code``: run this Python instead, for a process
    that must differ from an ordinary one, e.g. without asyncpg)."""
    argv = [sys.executable, "-c", code, *args] if code else [*FOGPAY, *args]
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, cwd=cwd, check=False
    )


def one_error_line(done: "subprocess.CompletedProcess[str]", code: int, *words: str) -> str:
    """The command exited with ``code`` and said why in ONE ``fogpay: <what>: <why>`` line on
    stderr, with no traceback anywhere; every one of ``words`` is in that line."""
    assert done.returncode == code, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr + done.stdout, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    line = lines[0]
    assert line.startswith("fogpay: ") and line.count(": ") >= 2, line
    for word in words:
        assert word in line, (word, line)
    return line


@dataclass(frozen=True, slots=True)
class FogFiles:
    directory: Path
    issuer_hex: str

    def config(self, *, db: str = "fog.db", broker: str = "[broker]\nport = 0\n") -> Path:
        """A fog config in the directory (relative paths resolve against it)."""
        path = self.directory / "fog.toml"
        path.write_text(
            'fog_id = "fog-cli"\nkey_file = "fog.key"\n'
            f'issuer_key = "{self.issuer_hex}"\ndb = "{db}"\n'
            + broker
            + ('password = "fog-pw"\ndevice_password = "dev-pw"\n' if "url" not in broker else "")
        )
        return path


@pytest.fixture
def fog_files(tmp_path: Path) -> FogFiles:
    new_key_file(tmp_path / "fog.key")
    issuer = new_key_file(tmp_path / "issuer.key")
    return FogFiles(tmp_path, public_key(issuer).hex())


@contextlib.contextmanager
def unwritable(directory: Path) -> Iterator[None]:
    """Make ``directory`` unwritable for this user: mode 0555, or, as root (who writes
    anywhere), the immutable attribute. Skips where neither can be had."""
    if os.geteuid() != 0:
        directory.chmod(0o555)
        try:
            yield
        finally:
            directory.chmod(0o755)
        return
    chattr = shutil.which("chattr")
    if chattr is None:
        pytest.skip("running as root without chattr: cannot make a directory unwritable")
    done = subprocess.run([chattr, "+i", str(directory)], capture_output=True, check=False)
    if done.returncode != 0 or os.access(directory, os.W_OK):
        pytest.skip(f"cannot make a directory unwritable as root here: {done.stderr!r}")
    try:
        yield
    finally:
        subprocess.run([chattr, "-i", str(directory)], check=True)
