"""The fog as a real process (``python -m fog --config FILE``): SIGKILL under load, restart,
and no receipt lost and none authorized twice; SIGTERM under load stops it cleanly (exit 0)
and restarts the same way; logs are JSON lines without key material.

Devices behave as the protocol asks: one intent at a time, retransmitting the same bytes until
a receipt comes. The broker is a Mosquitto subprocess, so devices stay connected while the
fog dies and comes back.
"""

import asyncio
import json
import signal
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Final

import pytest

from protocol.messages import Receipt
from protocol.signing import open_envelope
from tests.conftest import BrokerEndpoint, process_running
from tests.integration.devices import (
    Device,
    Issuer,
    Wallet,
    publish_retained,
    wallet,
    write_fog_files,
)

FOG = "fog-k"
DEVICES: Final = 20
INTENTS_PER_DEVICE: Final = 30
KILL_AFTER_RECEIPTS: Final = 150
TERM_AFTER_RECEIPTS: Final = 350
RETRANSMIT_S: Final = 0.5
TRANSIENT_RETRY_S: Final = 0.05
ATTEMPTS_MAX: Final = 60
EXIT_TIMEOUT_S: Final = 20.0
LIMITS = "[policy]\nrate_per_s = 100000\nrate_burst = 100000\n[batch]\nrecords_max = 16\n"


def start_fog(config: Path, log: Path) -> "subprocess.Popen[bytes]":
    out = log.open("ab")
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "fog", "--config", str(config)], stdout=out, stderr=out
        )
    finally:
        out.close()


async def pay_all(w: Wallet, device: Device, held: list[bytes]) -> None:
    """Pay, retransmitting on silence; on a transient decline (the fog is still loading its
    trust material at first start) send the same bytes again a little later."""
    for _ in range(INTENTS_PER_DEVICE):
        intent = device.intent(100)
        for _ in range(ATTEMPTS_MAX):
            raw = await w.pay_until_answered(
                device, intent, timeout_s=RETRANSMIT_S, attempts_max=ATTEMPTS_MAX
            )
            reason = open_envelope(raw, Receipt).msg.reason
            if reason is None or not reason.transient:
                break
            await asyncio.sleep(TRANSIENT_RETRY_S)
        held.append(raw)


def store_pids(log: Path) -> list[int]:
    """The store processes the fog's log names (``store_opened``), oldest first."""
    lines = [json.loads(x) for x in log.read_text().splitlines() if x.startswith("{")]
    return [e["pid"] for e in lines if e.get("event") == "store_opened" and e.get("process")]


async def exited(pid: int) -> None:
    async with asyncio.timeout(EXIT_TIMEOUT_S):
        while process_running(pid):  # noqa: ASYNC110 (another process: no event to await)
            await asyncio.sleep(0.02)


async def wait_receipts(held: list[bytes], count: int) -> None:
    async with asyncio.timeout(60):
        while len(held) < count:  # noqa: ASYNC110 (receipts arrive on another task)
            await asyncio.sleep(0.005)


@pytest.mark.mosquitto
async def test_sigkill_and_sigterm_under_load_lose_no_receipt_and_authorize_nothing_twice(
    tmp_path: Path, mosquitto_broker: BrokerEndpoint
) -> None:
    issuer = Issuer()
    devices = [Device(FOG) for _ in range(DEVICES)]
    config = write_fog_files(
        tmp_path,
        fog_id=FOG,
        issuer_key=issuer.public,
        broker=f'url = "{mosquitto_broker.url}"',
        extra=LIMITS,
    )
    trust = [issuer.owner_credential(), issuer.lease(FOG, 10**12)]
    trust += [issuer.binding(d.public) for d in devices]
    await publish_retained("127.0.0.1", mosquitto_broker.port, trust)
    log = tmp_path / "fog.log"
    held: list[bytes] = []
    fog = start_fog(config, log)
    try:
        async with wallet("127.0.0.1", mosquitto_broker.port, FOG) as w:
            load = asyncio.gather(*(pay_all(w, d, held) for d in devices))
            try:
                await wait_receipts(held, KILL_AFTER_RECEIPTS)
                store_pid = store_pids(log)[-1]
                fog.send_signal(signal.SIGKILL)
                await asyncio.to_thread(fog.wait, EXIT_TIMEOUT_S)
                killed_at = len(held)
                await exited(store_pid)  # the store process does not outlive its fog
                fog = start_fog(config, log)
                await wait_receipts(held, TERM_AFTER_RECEIPTS)
                fog.send_signal(signal.SIGTERM)  # under load too: a clean stop
                assert await asyncio.to_thread(fog.wait, EXIT_TIMEOUT_S) == 0
                termed_at = len(held)
                fog = start_fog(config, log)
                async with asyncio.timeout(120):
                    await load
            finally:
                load.cancel()
        assert killed_at < termed_at < DEVICES * INTENTS_PER_DEVICE  # both came under load
        fog.send_signal(signal.SIGTERM)
        assert fog.wait(timeout=EXIT_TIMEOUT_S) == 0
    finally:
        if fog.poll() is None:
            fog.kill()
            fog.wait()

    receipts = [open_envelope(raw, Receipt).msg for raw in held]
    assert all(r.ok for r in receipts), {r.reason for r in receipts}
    assert len({r.intent_id for r in receipts}) == DEVICES * INTENTS_PER_DEVICE
    con = sqlite3.connect(tmp_path / "fog.sqlite")
    try:
        rows = con.execute("select n, intent_id, receipt from log order by n").fetchall()
    finally:
        con.close()
    stored = {bytes(i): bytes(r) for _, i, r in rows}
    assert [n for n, _, _ in rows] == list(range(1, len(rows) + 1))
    assert len(rows) == len(stored) == DEVICES * INTENTS_PER_DEVICE  # each exactly once
    for raw, receipt in zip(held, receipts, strict=True):
        assert stored[receipt.intent_id] == raw  # the receipt held is the one logged

    lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    events = [e["event"] for e in lines]
    assert events.count("fog_starting") == 3 and events.count("fog_stopped") == 2
    assert len(store_pids(log)) == 3  # the store ran in a process of its own each time
    assert events[-1] == "fog_stopped"
    assert "batch_sealed" in events
    seed = (tmp_path / "fog.key").read_text().strip()
    assert seed not in log.read_text()


def test_bad_config_fails_at_start_with_one_line(tmp_path: Path) -> None:
    config = tmp_path / "fog.toml"
    config.write_text('fog_id = "fog-1"\n')
    result = subprocess.run(
        [sys.executable, "-m", "fog", "--config", str(config)],
        capture_output=True,
        timeout=EXIT_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.decode().strip().count("\n") == 0
    assert "key_file" in result.stderr.decode()


def test_embedded_broker_port_in_use_fails_with_one_line_naming_the_key(tmp_path: Path) -> None:
    issuer = Issuer()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = write_fog_files(
            tmp_path,
            fog_id=FOG,
            issuer_key=issuer.public,
            broker=f'port = {port}\npassword = "a"\ndevice_password = "b"\n',
        )
        result = subprocess.run(
            [sys.executable, "-m", "fog", "--config", str(config)],
            capture_output=True,
            timeout=EXIT_TIMEOUT_S,
            check=False,
        )
    assert result.returncode == 1
    stderr = result.stderr.decode().strip()
    assert stderr.count("\n") == 0 and "broker.port" in stderr, stderr
    events = [json.loads(line)["event"] for line in result.stdout.decode().splitlines()]
    assert events[-1] == "fog_failed" and "fog_stopped" in events
