"""`make test` on a machine without Mosquitto: the broker-bound tests skip with one line
saying how to enable them (rc 0); under CI=true the same tests fail. Real pytest runs in a
subprocess, with a PATH without mosquitto and FOGPAY_TEST_MOSQUITTO naming a missing binary
(Debian's /usr/sbin would be found otherwise), on one Mosquitto test only."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ONE_MOSQUITTO_TEST = "tests/pipeline/test_acl.py"
HOW = "mosquitto not installed: run `sudo apt-get install mosquitto` or `sudo make services`"


def run_without_mosquitto(
    tmp_path: Path, *args: str, **extra: str
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS")}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), "/bin"])
    env["FOGPAY_TEST_MOSQUITTO"] = str(tmp_path / "no-such-mosquitto")
    env |= extra
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args, ONE_MOSQUITTO_TEST],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("workers", [(), ("-n", "2")], ids=["serial", "xdist"])
def test_without_mosquitto_the_broker_tests_skip_with_one_line_saying_how(
    tmp_path: Path, workers: tuple[str, ...]
) -> None:
    """Also with two workers, as `make test` runs: the skips happen in the workers and the
    summary line is printed by the controller."""
    done = run_without_mosquitto(tmp_path, *workers)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 skipped" in done.stdout
    assert "passed" not in done.stdout and "failed" not in done.stdout
    summary = [line for line in done.stdout.splitlines() if line.startswith("fogpay: ")]
    assert summary == [f"fogpay: 1 test skipped: {HOW}"]


def test_under_ci_a_missing_mosquitto_fails(tmp_path: Path) -> None:
    done = run_without_mosquitto(tmp_path, CI="true")
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"CI=true: {HOW}" in done.stdout
    last = done.stdout.strip().splitlines()[-1]
    assert "1 error" in last and "skipped" not in last, last
