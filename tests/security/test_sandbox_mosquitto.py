"""``fogpay sandbox --broker mosquitto`` as a real process (issue 13's sandbox contract): the
shipped Mosquitto configs as a child process; sandbox.json's operator account and its TLS
listener; ``fogpay sandbox credentials`` gives a device a login with exactly its rights on
the plain and the TLS port; a SIGKILLed sandbox leaves no Mosquitto behind."""

import asyncio
import os
import shutil
import signal
import time
from dataclasses import replace
from pathlib import Path
from typing import Final

import aiomqtt
import pytest

from edge.device import Device
from fogpay.provision import BrokerAddress
from fogpay.sandbox import SANDBOX_JSON, SandboxInfo
from protocol import topics
from runtime.tlsconf import TlsSettings
from tests.edge.fogtools import client
from tests.edge.test_sandbox_process import cli, pay, start_sandbox, stop_sandbox
from tests.security.test_trust_writer import ok_json, run, simulate, wait_for

pytestmark = pytest.mark.mosquitto

BOUND_S: Final = 10.0
GONE_S: Final = 15.0


def login(directory: Path, device: Device) -> BrokerAddress:
    [got] = cli("sandbox", "credentials", "--dir", str(directory), "--device", device.key_hex)
    return BrokerAddress("127.0.0.1", 0, got["username"], got["password"])


async def until(c: aiomqtt.Client, payload: bytes) -> list[tuple[str, bytes]]:
    """Everything ``c`` receives up to ``payload`` (bounded)."""
    seen: list[tuple[str, bytes]] = []
    async with asyncio.timeout(BOUND_S):
        async for m in c.messages:
            seen.append((str(m.topic), bytes(m.payload)))
            if m.payload == payload:
                return seen
    return seen


async def rights(info: SandboxInfo, a: BrokerAddress, key_a: bytes, key_b: bytes) -> None:
    """A reads its own receipts only and publishes on its own intent topic only."""
    fog = info.fog_id
    async with client(a) as dev, client(info.broker) as op:
        await dev.subscribe("fogpay/1/+/receipt/+", qos=1)  # Mosquitto filters deliveries
        await op.publish(topics.receipt_topic(fog, key_b), b"B's receipt", qos=1)
        await op.publish(topics.receipt_topic(fog, key_a), b"A's marker", qos=1)
        assert await until(dev, b"A's marker") == [
            (topics.receipt_topic(fog, key_a), b"A's marker")
        ]
        await op.subscribe("fogpay/1/#", qos=1)
        await dev.publish(topics.intent_topic(fog, key_b), b"forged intent", qos=1)
        await dev.publish("fogpay/1/trust/owner/mallory", b"forged trust", qos=1)
        await dev.publish(topics.batch_topic(fog), b"forged batch", qos=1)
        await dev.publish(topics.intent_topic(fog, key_a), b"own", qos=1)
        seen = await until(op, b"own")
        assert [p for _, p in seen if p.startswith(b"forged")] == []
        assert (topics.intent_topic(fog, key_a), b"own") in seen


def test_the_sandbox_on_mosquitto(tmp_path: Path) -> None:
    directory, work, log = tmp_path / "sbx", tmp_path / "work", tmp_path / "sandbox.log"
    work.mkdir()
    proc = start_sandbox(directory, log, "--broker", "mosquitto")
    try:
        info = SandboxInfo.load(directory / SANDBOX_JSON)
        assert info.broker.username == "operator" and info.tls is not None
        pid = int((directory / "mosquitto/mosquitto.pid").read_text())
        conf = (directory / "mosquitto/mosquitto.conf").read_text().splitlines()
        listeners = [line for line in conf if line.startswith("listener ")]
        assert listeners == [
            f"listener {info.broker.port} 127.0.0.1",
            f"listener {info.tls['port']} 127.0.0.1",
        ]
        assert ok_json(simulate(directory, work / "sim"))["status"] == {"ok": 4}
        a, b = (
            Device.open(work / "sim" / f"dev-0000{i}", fog_id=info.fog_id, fog_key=info.fog_key)
            for i in (0, 1)
        )
        own = login(directory, a)
        plain = replace(own, port=info.broker.port)
        assert asyncio.run(pay(replace(info, broker=plain), a, 1_000)).msg.ok
        ca = TlsSettings(ca_file=str(directory / info.tls["ca_file"]))
        tls = replace(own, port=info.tls["port"], tls=ca)
        assert asyncio.run(pay(replace(info, broker=tls), a, 1_000)).msg.ok
        for address in (plain, tls):
            asyncio.run(rights(info, address, a.public_key, b.public_key))
        store = f"sqlite://{directory / 'cloud.sqlite'}"

        def booked() -> bool:
            check = ok_json(run("cloud", "--store", store, "check"))
            return bool(check["transfers"] >= 6 and check["alarms"] == 0)

        wait_for("the 6 payments booked, no alarm", booked)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    if shutil.which("setpriv") is None:
        assert stop_sandbox(proc) == 0
        return
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + GONE_S
    while _alive(pid):
        assert time.monotonic() < deadline, "Mosquitto outlived its SIGKILLed sandbox"
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is gone for our purpose
        return f.read().split(")")[-1].split()[0] != "Z"
