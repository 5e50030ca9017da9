"""``fogpay sandbox`` as a real process names its fog's and its cloud's metrics endpoints in
sandbox.json; both answer, become ready, and every log line names its component."""

import json
import time
from pathlib import Path
from typing import Final

from fogpay.sandbox import SANDBOX_JSON, SandboxInfo
from tests.edge.test_sandbox_process import start_sandbox, stop_sandbox
from tests.observe.scrape import get_sync, parse, value

READY_TIMEOUT_S: Final = 30.0


def wait_ready(url: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while get_sync(url + "/readyz")[0] != 200:
        assert time.monotonic() < deadline, f"{url} not ready"
        time.sleep(0.05)


def test_sandbox_json_names_both_metrics_endpoints(tmp_path: Path) -> None:
    directory, log = tmp_path / "sb", tmp_path / "sandbox.log"
    proc = start_sandbox(directory, log)
    try:
        raw = json.loads((directory / SANDBOX_JSON).read_text())
        info = SandboxInfo.load(directory / SANDBOX_JSON)
        assert info.metrics == raw["metrics"] and set(raw["metrics"]) == {"fog", "cloud"}
        fog, cloud = raw["metrics"]["fog"], raw["metrics"]["cloud"]
        assert fog.startswith("http://127.0.0.1:") and cloud.startswith("http://127.0.0.1:")
        assert fog != cloud
        for url in (fog, cloud):
            wait_ready(url)
        status, body = get_sync(fog + "/metrics")
        assert status == 200
        assert value(parse(body.decode()), "fogpay_fog_info", fog_id="sandbox") == 1
        status, body = get_sync(cloud + "/metrics")
        assert status == 200 and value(parse(body.decode()), "fogpay_cloud_broker_up") == 1
    finally:
        assert stop_sandbox(proc) == 0
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert {e["component"] for e in lines} <= {"sandbox", "fog", "cloud", "broker"}
    first = {}
    for e in lines:
        first.setdefault(e["event"], e["component"])
    assert (first["sandbox_ready"], first["fog_starting"], first["cloud_starting"]) == (
        "sandbox",
        "fog",
        "cloud",
    )
