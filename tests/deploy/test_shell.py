"""The shell scripts of deploy/ and .ci/ pass shellcheck (skipped where it is not installed:
`apt-get install shellcheck`)."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ["deploy/install-pi.sh", ".ci/services.sh", ".ci/run"]
SCRIPTS += ["tests/deploy/debootstrap_pi.sh", "tests/deploy/fresh_machine.sh"]


def test_the_scripts_pass_shellcheck() -> None:
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed: apt-get install shellcheck")
    done = subprocess.run(
        [shellcheck, *SCRIPTS], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert (done.returncode, done.stdout) == (0, "")
