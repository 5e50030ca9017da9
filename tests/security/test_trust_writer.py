"""One writer of trust: the simulator registers its owner, bindings and lease in the sandbox's
cloud registry (with the registry's checks) instead of signing and publishing them itself;
trust published around the registry is detected (alarms, a failing ``cloud check``, a
metric); an owner that revokes itself is honoured by the fog and the cloud."""

import asyncio
import json
import sqlite3
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Final

import pytest

import tests.edge.test_sandbox_process as sbx
from cloud import registry
from cloud.errors import RegistryError
from cloud.sqlitestore import SqliteStore
from edge.device import Device, DeviceSession, PaymentDeclined
from fogpay.sandbox import SANDBOX_JSON, SandboxInfo
from protocol.messages import Binding
from protocol.reasons import Reason
from protocol.signing import open_envelope, possession_proof
from tests.cloud.world import World, new_key
from tests.edge.fogtools import client

WAIT_S: Final = 60.0
PROBES_MAX: Final = 300
PROBE_PAUSE_S: Final = 0.1
CLI_TIMEOUT_S: Final = 120.0


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    store = await SqliteStore.open(str(tmp_path / "cloud.sqlite"))
    yield World(store)
    await store.close()


async def test_registry_refuses_a_binding_over_the_credit_limit_or_without_proof(
    world: World,
) -> None:
    await world.owner("alice", limit=5_000)
    device = new_key()
    over = world.binding("alice", device, tx_max_micros=5_001, day_max_micros=10_000)
    proof = possession_proof(device, open_envelope(over, Binding).body)
    with pytest.raises(RegistryError, match="exceeds the owner's credit limit"):
        await world.tx(lambda tx: registry.bind_device(tx, over, proof, now_ms=world.now))
    fine = world.binding("alice", device, tx_max_micros=5_000, day_max_micros=10_000)
    wrong = possession_proof(new_key(), open_envelope(fine, Binding).body)  # not the device's
    with pytest.raises(RegistryError, match="proof of possession"):
        await world.tx(lambda tx: registry.bind_device(tx, fine, wrong, now_ms=world.now))
    proof = possession_proof(device, open_envelope(fine, Binding).body)
    bound = await world.tx(lambda tx: registry.bind_device(tx, fine, proof, now_ms=world.now))
    assert bound.device == device.verify_key.encode()


def run(*args: str) -> "subprocess.CompletedProcess[str]":
    return subprocess.run(
        [*sbx.FOGPAY, *args], capture_output=True, text=True, timeout=CLI_TIMEOUT_S, check=False
    )


def ok_json(done: "subprocess.CompletedProcess[str]") -> Any:
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def simulate(directory: Path, devices_dir: Path, count: int = 4) -> Any:
    done = run(
        "edge", "simulate", "--sandbox", str(directory), "--devices", "2", "--count",
        str(count), "--rate", "40", "--json", "--devices-dir", str(devices_dir),
    )  # fmt: skip
    return done


def query(db: Path, sql: str, *params: Any) -> list[Any]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:
        return c.execute(sql, params).fetchall()


def wait_for(what: str, probe: Any) -> Any:
    deadline = time.monotonic() + WAIT_S
    while not (got := probe()):
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.2)
    return got


def test_trust_around_the_registry_is_refused_or_raises_alarms(tmp_path: Path) -> None:
    """The scenario of issue 13: the simulator run twice with the default owner. The second
    run is refused (the owner is registered with another key); trust published around the
    registry anyway (the issuer seed on a broker without ACLs) is paid at the fog, and every
    such record is an alarm at the cloud: listed, failing ``cloud check``, counted."""
    directory, work, log = tmp_path / "sbx", tmp_path / "work", tmp_path / "sandbox.log"
    work.mkdir()
    proc = sbx.start_sandbox(directory, log)
    try:
        info = SandboxInfo.load(directory / SANDBOX_JSON)
        db = directory / "cloud.sqlite"
        store = f"sqlite://{db}"
        first = ok_json(simulate(directory, work / "sim1"))
        assert first["status"] == {"ok": 4}
        [(owner_key,)] = query(db, "SELECT key FROM owners WHERE owner_id = 'sim-owner'")
        assert len(query(db, "SELECT 1 FROM bindings WHERE owner_id = 'sim-owner'")) == 2
        again = ok_json(simulate(directory, work / "sim1"))  # same owner key: credit topped up
        # the new lease reaches the fog about a second after the run starts: a payment that
        # overtakes it may meet the first lease's remainder (insufficient_budget, transient)
        assert set(again["status"]) <= {"ok", "declined"}, again
        assert set(again.get("reasons", {})) <= {"insufficient_budget"}, again
        assert len(query(db, "SELECT 1 FROM leases WHERE owner_id = 'sim-owner'")) >= 2

        second = simulate(directory, work / "sim2")  # a fresh owner key, the default owner id
        assert second.returncode == 2
        assert "registered in the sandbox's cloud with another key" in second.stderr
        assert query(db, "SELECT key FROM owners") == [(owner_key,)]
        assert ok_json(run("cloud", "--store", store, "check"))["alarms"] == 0

        # around the registry: an owner credential, a binding and a lease published directly
        url, seed = sbx.broker_url(info), str(directory / info.issuer_seed_file)
        rogue = work / "rogue.key"
        run("owner", "add", "--issuer-key", seed, "--owner-id", "sim-owner",
            "--owner-key", str(rogue), "--broker", url).check_returncode()  # fmt: skip
        device = Device.open(work / "dev", fog_id=info.fog_id, fog_key=info.fog_key)
        run("device", "bind", "--owner-key", str(rogue), "--owner-id", "sim-owner",
            "--device-key", str(device.state_dir / "device.key"), "--currency", "EUR",
            "--tx-max", "1000000", "--day-max", "50000000",
            "--broker", url).check_returncode()  # fmt: skip
        run("lease", "grant", "--issuer-key", seed, "--owner-id", "sim-owner",
            "--fog-id", info.fog_id, "--amount", "20000000", "--currency", "EUR",
            "--broker", url).check_returncode()  # fmt: skip
        receipt = asyncio.run(sbx.pay(info, device, 10_000))
        assert receipt.msg.ok  # the fog paid: trust the cloud never registered

        intent = receipt.msg.intent_id.hex()

        def alarm() -> list[dict[str, Any]]:
            listed = ok_json(run("cloud", "--store", store, "alarms"))
            return [a for a in listed if f"intent={intent}" in a["detail"]]

        [found] = wait_for("a record_rejected alarm", alarm)
        assert found["kind"] == "record_rejected" and found["fog_id"] == info.fog_id
        assert "reason=unknown_device" in found["detail"] and "batch=" in found["detail"]
        check = run("cloud", "--store", store, "check")
        assert check.returncode == 1 and "alarm(s) recorded" in check.stderr
        assert json.loads(check.stdout)["alarms_by_kind"]["record_rejected"] >= 1
        assert info.metrics is not None
        with urllib.request.urlopen(info.metrics["cloud"] + "/metrics", timeout=10) as r:
            text = r.read().decode()
        assert 'fogpay_cloud_alarms_recorded{kind="record_rejected"}' in text
    finally:
        assert sbx.stop_sandbox(proc) == 0


async def lasting_decline(info: SandboxInfo, device: Device) -> Reason:
    """Pay 1 micro until the fog declines for a reason that is not transient (the
    revocation arrives asynchronously; a spent lease is transient)."""
    async with (
        client(info.broker) as c,
        DeviceSession(c, fog_id=info.fog_id, fog_key=info.fog_key) as session,
    ):
        await session.attach(device)
        for _ in range(PROBES_MAX):
            try:
                await session.pay(device, "shop-1", 1, "EUR", timeout_s=5, retries_max=2)
            except PaymentDeclined as exc:
                if not exc.reason.transient:
                    return exc.reason
            await asyncio.sleep(PROBE_PAUSE_S)
    raise AssertionError("the fog never declined for good")


def test_owner_self_revocation_is_honoured_by_fog_and_cloud(tmp_path: Path) -> None:
    directory, work, log = tmp_path / "sbx", tmp_path / "work", tmp_path / "sandbox.log"
    work.mkdir()
    proc = sbx.start_sandbox(directory, log)
    try:
        info = SandboxInfo.load(directory / SANDBOX_JSON)
        db = directory / "cloud.sqlite"
        store = f"sqlite://{db}"
        assert ok_json(simulate(directory, work / "sim"))["status"] == {"ok": 4}
        [(owner_key,)] = query(db, "SELECT key FROM owners WHERE owner_id = 'sim-owner'")
        owner_file = work / "sim" / "owner.key"
        signed = run("device", "revoke", "--signer-key", str(owner_file),
                     "--key", bytes(owner_key).hex(), "--reason", "withdrawn")  # fmt: skip
        envelope = json.loads(signed.stdout)["envelope"]  # printed, not published
        revoked = ok_json(
            run(
                "cloud",
                "--store",
                store,
                "--issuer-key",
                str(directory / info.issuer_seed_file),
                "device",
                "revoke",
                "--envelope",
                envelope,
            )
        )
        assert revoked["revoked"] == bytes(owner_key).hex()
        assert query(db, "SELECT status FROM owners WHERE owner_id = 'sim-owner'") == [("revoked",)]
        device = Device.open(work / "sim" / "dev-00000", fog_id=info.fog_id, fog_key=info.fog_key)
        # the cloud service publishes the registry's revocation; the fog then declines
        assert asyncio.run(lasting_decline(info, device)) is Reason.REVOKED
        lease = run("cloud", "--store", store, "--issuer-key",
                    str(directory / info.issuer_seed_file), "lease", "grant", "sim-owner",
                    info.fog_id, "1000")  # fmt: skip
        assert lease.returncode != 0 and "no active owner" in lease.stderr
    finally:
        assert sbx.stop_sandbox(proc) == 0
