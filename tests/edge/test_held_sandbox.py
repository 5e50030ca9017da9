"""``fogpay edge upload`` against ``fogpay sandbox`` as real processes (a real fog, its
broker and the cloud): a device pays through the fog, then hands in what it holds; the cloud
answers for every record (booked by the fog's batch or by the upload, once) and the device
holds nothing more."""

import json
import subprocess
from pathlib import Path

from tests.edge.test_sandbox_process import CLI_TIMEOUT_S, FOGPAY, start_sandbox, stop_sandbox


def run(*args: str) -> dict[str, object]:
    done = subprocess.run(
        [*FOGPAY, *args], capture_output=True, text=True, timeout=CLI_TIMEOUT_S, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out: dict[str, object] = json.loads(done.stdout)  # one object (on one line or indented)
    return out


def test_pay_through_the_sandbox_then_upload_what_the_device_holds(tmp_path: Path) -> None:
    directory, devices = tmp_path / "sbx", tmp_path / "devices"
    proc = start_sandbox(directory, tmp_path / "sandbox.log")
    try:
        sim = run(
            "edge", "simulate", "--sandbox", str(directory), "--devices", "1", "--count", "3",
            "--rate", "20", "--devices-dir", str(devices), "--json",
        )  # fmt: skip
        assert sim["status"] == {"ok": 3}, sim
        state = devices / "dev-00000"
        assert len((state / "held.jsonl").read_text().splitlines()) >= 3  # the probe's too
        up = run("edge", "upload", "--sandbox", str(directory), "--state", str(state))
        assert up["held"] == 0 and up["refused"] == [] and up["unanswered"] == 0, up
        assert up["booked"] == up["sent"]
        again = run("edge", "upload", "--sandbox", str(directory), "--state", str(state))
        assert again["sent"] == 0
        check = run("cloud", "--store", f"sqlite://{directory}/cloud.sqlite", "check")
        assert check["ok"] and check["transfers"] == up["booked"], check
    finally:
        assert stop_sandbox(proc) == 0
