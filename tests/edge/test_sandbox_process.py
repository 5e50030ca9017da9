"""``fogpay sandbox`` as a real subprocess: provision with the CLI, pay, restart, pay again."""

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Final

import pytest

from edge.device import Device, DeviceSession, PaymentDeclined
from edge.simulate import Payment
from fogpay.edge_cli import wait_until_payable
from fogpay.sandbox import SANDBOX_JSON, SandboxInfo
from protocol.reasons import Reason
from tests.edge.fogtools import client

START_TIMEOUT_S: Final = 30.0
STOP_TIMEOUT_S: Final = 30.0
CLI_TIMEOUT_S: Final = 60.0
PROBES_MAX: Final = 100
PROBE_PAUSE_S: Final = 0.05
FOGPAY: Final = [sys.executable, "-m", "fogpay.cli"]


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns)


def start_sandbox(directory: Path, log: Path, *extra: str) -> subprocess.Popen[bytes]:
    """Start the sandbox (``extra``: more options); return once it has written a new
    sandbox.json (a restart must not read the previous run's file)."""
    old = _stamp(directory / SANDBOX_JSON)
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [*FOGPAY, "sandbox", "--dir", str(directory), "--port", "0", *extra],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + START_TIMEOUT_S
    while _stamp(directory / SANDBOX_JSON) in (None, old):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            pytest.fail(f"sandbox did not become ready:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)
    return proc


def stop_sandbox(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


def cli(*args: str) -> list[dict[str, Any]]:
    done = subprocess.run(
        [*FOGPAY, *args], capture_output=True, text=True, timeout=CLI_TIMEOUT_S, check=False
    )
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def broker_url(info: SandboxInfo) -> str:
    b = info.broker
    return f"mqtt://{b.username}:{b.password}@{b.host}:{b.port}"


async def pay(info: SandboxInfo, device: Device, amount: int) -> Any:
    async with (
        client(info.broker) as c,
        DeviceSession(c, fog_id=info.fog_id, fog_key=info.fog_key) as session,
    ):
        await session.attach(device)
        payment = Payment(
            payee_id="shop-1", amount_micros=amount, currency="EUR", timeout_s=5, retries_max=2
        )
        await wait_until_payable(session, device, payment)  # trust arrives asynchronously
    return device.receipts()[-1]


async def declined_reason(info: SandboxInfo, device: Device) -> Reason:
    """Pay until the fog declines for a lasting reason (the revocation arrives async)."""
    async with (
        client(info.broker) as c,
        DeviceSession(c, fog_id=info.fog_id, fog_key=info.fog_key) as session,
    ):
        await session.attach(device)
        for _ in range(PROBES_MAX):
            try:
                await session.pay(device, "shop-1", 1_000, "EUR", timeout_s=5, retries_max=2)
            except PaymentDeclined as exc:
                return exc.reason
            await asyncio.sleep(PROBE_PAUSE_S)
    raise AssertionError("the revocation never took effect")


def provision(directory: Path, work: Path, info: SandboxInfo, device: Device) -> None:
    seed = (directory / info.issuer_seed_file).read_text().strip()
    url = broker_url(info)
    issuer_key = str(directory / info.issuer_seed_file)
    owner = cli(
        "owner", "add", "--issuer-key", issuer_key, "--owner-id", "acme",
        "--owner-key", str(work / "owner.key"), "--broker", url,
    )  # fmt: skip
    bind = cli(
        "device", "bind", "--owner-key", str(work / "owner.key"), "--owner-id", "acme",
        "--device-key", str(device.state_dir / "device.key"), "--currency", "EUR",
        "--tx-max", "1000000", "--day-max", "50000000", "--broker", url,
    )  # fmt: skip
    lease = cli(
        "lease", "grant", "--issuer-key", issuer_key, "--owner-id", "acme",
        "--fog-id", info.fog_id, "--amount", "20000000", "--currency", "EUR", "--broker", url,
    )  # fmt: skip
    assert owner[0]["type"] == "owner" and owner[0]["published"] is True
    assert bind[0]["device"] == device.key_hex and bind[0]["topic"].endswith(device.key_hex)
    assert lease[0]["topic"].startswith(f"fogpay/1/{info.fog_id}/lease/")
    printed = json.dumps([owner, bind, lease])
    assert seed not in printed  # private keys are never printed
    assert (work / "owner.key").read_text().strip() not in printed


def test_sandbox_provision_pay_restart_pay(tmp_path: Path) -> None:
    directory, work, log = tmp_path / "sbx", tmp_path / "work", tmp_path / "sandbox.log"
    work.mkdir()
    proc = start_sandbox(directory, log)
    try:
        info = SandboxInfo.load(directory / SANDBOX_JSON)
        assert info.broker.host == "127.0.0.1" and info.broker.port > 0
        assert (directory / info.issuer_seed_file).exists()
        device = Device.open(work / "dev", fog_id=info.fog_id, fog_key=info.fog_key)
        provision(directory, work, info, device)
        first = asyncio.run(pay(info, device, 10_000))
        assert first.msg.ok and first.signer == info.fog_key
    finally:
        assert stop_sandbox(proc) == 0
    assert not log.read_text().count("Traceback")

    proc = start_sandbox(directory, log)  # same DIR: keys, trust, lease and log kept
    try:
        info2 = SandboxInfo.load(directory / SANDBOX_JSON)
        assert (info2.fog_key, info2.issuer_key) == (info.fog_key, info.issuer_key)
        rebooted = Device.open(work / "dev", fog_id=info2.fog_id, fog_key=info2.fog_key)
        second = asyncio.run(pay(info2, rebooted, 20_000))
        assert second.msg.ok and second.msg.seq > first.msg.seq
        assert second.msg.log_index == first.msg.log_index + 1
        assert second.msg.lease_id == first.msg.lease_id
        paid = cli("edge", "pay", "--sandbox", str(directory), "--state", str(work / "dev"))
        assert paid[0]["status"] == "ok" and paid[0]["seq"] > second.msg.seq
        summary = cli(
            "edge", "simulate", "--sandbox", str(directory), "--devices", "3",
            "--count", "12", "--rate", "40", "--json", "--devices-dir", str(work / "sim"),
        )  # fmt: skip
        assert summary[0]["sent"] == 12 and summary[0]["status"] == {"ok": 12}
        assert summary[0]["latency"]["max_ms"] > 0
        again = cli(
            "edge", "simulate", "--broker", broker_url(info2), "--fog-id", info2.fog_id,
            "--fog-key", info2.fog_key.hex(), "--devices", "3", "--count", "6", "--rate", "40",
            "--json", "--devices-dir", str(work / "sim"),
        )  # fmt: skip
        assert again[0]["status"] == {"ok": 6}  # devices bound by the first run, same dirs
        revoke = cli(
            "device", "revoke", "--signer-key", str(work / "owner.key"),
            "--key", rebooted.key_hex, "--reason", "stolen", "--broker", broker_url(info2),
        )  # fmt: skip
        assert revoke[0]["type"] == "revoke" and revoke[0]["key"] == rebooted.key_hex
        assert asyncio.run(declined_reason(info2, rebooted)) is Reason.REVOKED
    finally:
        assert stop_sandbox(proc) == 0
