"""The disk campaign: the fog's database on a small tmpfs (mounted here as root; skipped with
the reason when mounting is not permitted) that a filler file makes full while the fog runs
as a real process on Mosquitto; and a database on a file system mounted read-only.

Full disk: devices keep paying until the store cannot commit. From then on every intent is
answered with a signed decline (``rate_limited``, transient: send the same bytes again
later), never with an ok for something the log does not hold; the fog logs the failure at
error level (``group_failed``, with the error) and counts it, and keeps running. Once the
filler is removed, the same intents sent again are authorized, and every ok receipt a device
holds is in the log, byte for byte.

Read-only: the fog refuses to start with a one-line error on stderr naming the database and exit
status 2 (an unusable configured database, as for every fog command), after answering nothing.
"""

import asyncio
import contextlib
import fcntl
import json
import os
import signal
import sqlite3
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import pytest

from fog.authorize import Policy
from fog.store import FogStore
from protocol.messages import Receipt
from protocol.signing import open_envelope
from tests.conftest import BrokerEndpoint
from tests.integration.devices import (
    Device,
    Issuer,
    Wallet,
    intent_id,
    new_key,
    publish_retained,
    wallet,
    write_fog_files,
)

FOG: Final = "fog-d"
TMPFS_BYTES: Final = 2 * 1024 * 1024
DEVICES: Final = 4
PAYMENTS_MAX: Final = 5_000  # bound: the disk fills long before (each record ~0.5 KiB)
RETRANSMIT_S: Final = 0.5
ATTEMPTS_MAX: Final = 60
EXIT_TIMEOUT_S: Final = 20.0
LIMITS: Final = (
    "[policy]\nrate_per_s = 100000\nrate_burst = 100000\n"
    "[batch]\nrecords_max = 16\n[uplink]\nenabled = false\n"
)
FILLER_CHUNK: Final = 64 * 1024
SLACK_BYTES: Final = 256 * 1024  # left free: some payments commit, then the disk is full


@contextlib.contextmanager
def tmpfs(directory: Path, size: int) -> Iterator[Path]:
    directory.mkdir()
    try:
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)],
            capture_output=True,
            check=False,
        )
    except OSError as exc:  # no mount binary
        pytest.skip(f"cannot mount a tmpfs here: {exc}")
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.decode().strip()}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=False)


def fill(path: Path) -> int:
    """Write ``path`` until the file system is full (unbuffered, halving the write size at
    each ENOSPC down to one byte); returns the bytes written."""
    written, chunk = 0, FILLER_CHUNK
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        while chunk:
            try:
                written += os.write(fd, b"\0" * chunk)
            except OSError:
                chunk //= 2
    finally:
        os.close(fd)
    return written


def start_fog(config: Path, log: Path) -> "subprocess.Popen[bytes]":
    out = log.open("ab")
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "fog", "--config", str(config)], stdout=out, stderr=out
        )
    finally:
        out.close()


async def answer(w: Wallet, device: Device, intent: bytes) -> Receipt:
    raw = await w.pay_until_answered(
        device, intent, timeout_s=RETRANSMIT_S, attempts_max=ATTEMPTS_MAX
    )
    return open_envelope(raw, Receipt).msg


def events(log: Path) -> list[dict[str, object]]:
    return [json.loads(x) for x in log.read_text().splitlines() if x.startswith("{")]


@pytest.mark.mosquitto
async def test_full_disk_declines_with_a_reason_and_recovers(
    tmp_path: Path, mosquitto_broker: BrokerEndpoint
) -> None:
    issuer = Issuer()
    devices = [Device(FOG) for _ in range(DEVICES)]
    with tmpfs(tmp_path / "disk", TMPFS_BYTES) as disk:
        config = write_fog_files(
            tmp_path,
            fog_id=FOG,
            issuer_key=issuer.public,
            broker=f'url = "{mosquitto_broker.url}"',
            extra=LIMITS,
        )
        text = config.read_text().replace(str(tmp_path / "fog.sqlite"), str(disk / "fog.sqlite"))
        config.write_text(text)
        trust = [issuer.owner_credential(), issuer.lease(FOG, 10**12)]
        trust += [issuer.binding(d.public) for d in devices]
        await publish_retained("127.0.0.1", mosquitto_broker.port, trust)
        log = tmp_path / "fog.log"
        fog = start_fog(config, log)
        try:
            async with wallet("127.0.0.1", mosquitto_broker.port, FOG) as w:
                for d in devices:  # trust loaded: each device paid once
                    while (r := await answer(w, d, d.intent(100))).reason is not None:
                        assert r.reason.transient
                        await asyncio.sleep(0.05)
                filled = fill(disk / "filler")
                assert filled > 0
                os.truncate(disk / "filler", filled - SLACK_BYTES)  # full a little later
                held: list[bytes] = []  # ok receipts, raw
                refused: list[tuple[Device, bytes]] = []  # intents declined for the disk
                for k in range(PAYMENTS_MAX):
                    d = devices[k % DEVICES]
                    intent = d.intent(100)
                    raw = await w.pay_until_answered(
                        d, intent, timeout_s=RETRANSMIT_S, attempts_max=ATTEMPTS_MAX
                    )
                    r = open_envelope(raw, Receipt).msg
                    if r.ok:
                        held.append(raw)
                        continue
                    assert r.reason == "rate_limited" and r.reason.transient, r.reason
                    assert r.intent_id == intent_id(intent)
                    refused.append((d, intent))
                    if len(refused) == DEVICES:  # each device has one intent declined
                        break
                assert len(refused) == DEVICES, f"the disk never filled: {len(held)} paid"
                paid_before_full = len(held)
                assert fog.poll() is None  # still running
                # while full: the same intent again is declined again, never ok
                d, intent = refused[0]
                assert (await answer(w, d, intent)).reason == "rate_limited"
                failed = [e for e in events(log) if e["event"] == "group_failed"]
                assert failed and failed[-1]["level"] == "error"
                assert "full" in str(failed[-1].get("error", "")), failed[-1]
                (disk / "filler").unlink()  # space returns
                for d, intent in refused:  # the same bytes again: authorized now
                    raw = await w.pay_until_answered(
                        d, intent, timeout_s=RETRANSMIT_S, attempts_max=ATTEMPTS_MAX
                    )
                    assert open_envelope(raw, Receipt).msg.ok
                    held.append(raw)
                    w.receipts.clear()
        finally:
            fog.send_signal(signal.SIGTERM)
            rc = await asyncio.to_thread(fog.wait, EXIT_TIMEOUT_S)
        assert rc == 0
        con = sqlite3.connect(disk / "fog.sqlite")
        try:
            stored = {
                bytes(i): bytes(r) for i, r in con.execute("SELECT intent_id, receipt FROM log")
            }
        finally:
            con.close()
    for raw in held:
        receipt = open_envelope(raw, Receipt).msg
        assert stored[receipt.intent_id] == raw  # every ok receipt held is logged
    last = [e for e in events(log) if e["event"] == "fog_stopped"][-1]
    assert int(str(last.get("group_failed", 0))) >= 1
    assert int(str(last.get("group_declined", 0))) >= DEVICES + 1
    figures = {
        "event": "disk_full_campaign",
        "filler_bytes": filled,
        "paid_before_full": paid_before_full,
        "declined_while_full": int(str(last["group_declined"])),
        "group_failed": int(str(last["group_failed"])),
        "seal_failed": int(str(last.get("seal_failed", 0))),
        "paid_after_space_returned": len(refused),
        "ok_receipts_held_all_logged": len(held),
    }
    print(json.dumps(figures))


def test_read_only_database_refuses_to_start_with_one_line(tmp_path: Path) -> None:
    issuer = Issuer()
    with tmpfs(tmp_path / "disk", TMPFS_BYTES) as disk:
        config = write_fog_files(
            tmp_path,
            fog_id=FOG,
            issuer_key=issuer.public,
            broker='url = "mqtt://127.0.0.1:1"',  # never reached: the store opens first
            extra=LIMITS,
        )
        db = disk / "fog.sqlite"
        config.write_text(config.read_text().replace(str(tmp_path / "fog.sqlite"), str(db)))
        FogStore.open(
            db, fog_id=FOG, fog_key=new_key(), issuer_key=issuer.public, policy=Policy()
        ).close()
        size = db.stat().st_size
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        result = subprocess.run(
            [sys.executable, "-m", "fog", "--config", str(config)],
            capture_output=True,
            timeout=EXIT_TIMEOUT_S,
            check=False,
        )
        assert db.stat().st_size == size
    assert result.returncode == 2  # the configured database is unusable here: runtime.cli
    stderr = result.stderr.decode().strip()
    assert stderr.count("\n") == 0 and f"database {db}" in stderr, stderr
    lines = [json.loads(x) for x in result.stdout.decode().splitlines()]
    assert [e["event"] for e in lines][-2:] == ["fog_stopped", "fog_failed"]
    print(
        json.dumps(
            {"event": "disk_read_only_campaign", "exit": result.returncode, "stderr": stderr}
        )
    )


EXT4_IOC_SHUTDOWN: Final = 0x8004587D  # _IOR('X', 125, __u32): the file system fails all I/O
EXT4_GOING_FLAGS_LOGFLUSH: Final = 1  # what committed stays (the journal is flushed first)
LOOP_IMAGE_BYTES: Final = 32 * 1024 * 1024


@contextlib.contextmanager
def ext4_loop(image: Path, directory: Path) -> Iterator[Path]:
    """An ext4 file system in ``image``, loop-mounted on ``directory`` (skip if not allowed)."""
    directory.mkdir()
    with image.open("wb") as f:
        f.truncate(LOOP_IMAGE_BYTES)
    try:
        made = subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], capture_output=True)
        mounted = made.returncode == 0 and mount_loop(image, directory)
    except OSError as exc:
        pytest.skip(f"cannot make an ext4 loop file system here: {exc}")
    if not mounted:
        pytest.skip("cannot loop-mount an ext4 file system here (needs root and /dev/loop*)")
    try:
        yield directory
    finally:
        subprocess.run(["umount", str(directory)], check=False)


def mount_loop(image: Path, directory: Path) -> bool:
    result = subprocess.run(["mount", "-o", "loop", str(image), str(directory)], check=False)
    return result.returncode == 0


def shut_down(directory: Path) -> None:
    """EXT4_IOC_SHUTDOWN: from now on every read and write on the file system fails (EIO),
    as on a disk that died or a file system the kernel turned read-only after errors."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.ioctl(fd, EXT4_IOC_SHUTDOWN, struct.pack("I", EXT4_GOING_FLAGS_LOGFLUSH))
    finally:
        os.close(fd)


@pytest.mark.mosquitto
@pytest.mark.parametrize("pipeline", [True, False], ids=["pipelined", "fsync_in_commit"])
async def test_failed_disk_declines_and_a_restart_on_the_repaired_disk_loses_nothing(
    tmp_path: Path, mosquitto_broker: BrokerEndpoint, pipeline: bool
) -> None:
    """``store_pipeline = false``: every COMMIT fails (EIO): each group is declined, logged
    ``group_failed``, and the fog keeps answering. ``true`` (fog/pipeline.py): the fsync of
    the WAL after the commit fails: the intents not yet answered are declined (never an ok),
    ``store_sync_failed`` is logged and the fog exits 1 without closing the database (the
    page cache after a failed writeback is not to be trusted; systemd restarts it)."""
    issuer = Issuer()
    devices = [Device(FOG) for _ in range(DEVICES)]
    image, disk_dir = tmp_path / "disk.img", tmp_path / "disk"
    with ext4_loop(image, disk_dir) as disk:
        config = write_fog_files(
            tmp_path,
            fog_id=FOG,
            issuer_key=issuer.public,
            broker=f'url = "{mosquitto_broker.url}"',
            extra=("" if pipeline else "store_pipeline = false\n") + LIMITS,
        )
        text = config.read_text().replace(str(tmp_path / "fog.sqlite"), str(disk / "fog.sqlite"))
        config.write_text(text)
        trust = [issuer.owner_credential(), issuer.lease(FOG, 10**12)]
        trust += [issuer.binding(d.public) for d in devices]
        await publish_retained("127.0.0.1", mosquitto_broker.port, trust)
        log = tmp_path / "fog.log"
        held: list[bytes] = []
        refused: list[tuple[Device, bytes]] = []
        fog = start_fog(config, log)
        try:
            async with wallet("127.0.0.1", mosquitto_broker.port, FOG) as w:
                for d in devices * 3:
                    intent = d.intent(100)
                    while (r := await answer(w, d, intent)).reason is not None:
                        assert r.reason.transient  # trust still loading
                        await asyncio.sleep(0.05)
                    held += w.raw_for(r.intent_id)[-1:]
                shut_down(disk)
                if pipeline:
                    d = devices[0]
                    intent = d.intent(100)
                    refused.append((d, intent))
                    await w.client.publish(d.intent_topic, intent, qos=1)
                    rc = await asyncio.to_thread(fog.wait, EXIT_TIMEOUT_S)
                    assert rc == 1, rc  # the barrier failed: the fog stopped
                    for _, raw in w.receipts:  # what came after the disk died: no ok
                        r = open_envelope(raw, Receipt).msg
                        if r.intent_id == intent_id(intent):
                            assert r.reason == "rate_limited", r.reason
                    refused += [(d, d.intent(100)) for d in devices[1:]]  # paid after the restart
                    failed = [e for e in events(log) if e["event"] == "store_sync_failed"]
                    assert any("Input/output error" in str(e.get("error")) for e in failed), failed
                else:
                    for d in devices:
                        intent = d.intent(100)
                        r = await answer(w, d, intent)
                        assert r.reason == "rate_limited", r.reason  # never ok: nothing recorded
                        refused.append((d, intent))
                    assert fog.poll() is None  # still running, answering
                    failed = [e for e in events(log) if e["event"] == "group_failed"]
                    assert any("disk I/O error" in str(e.get("error")) for e in failed), failed
        finally:
            fog.send_signal(signal.SIGTERM)
            stop_rc = await asyncio.to_thread(fog.wait, EXIT_TIMEOUT_S)
        await asyncio.to_thread(subprocess.run, ["umount", str(disk)], check=True)
        assert await asyncio.to_thread(
            mount_loop, image, disk
        )  # the disk is back (here: the same, mounted again)
        fog = start_fog(config, log)
        try:
            async with wallet("127.0.0.1", mosquitto_broker.port, FOG) as w:
                for d, intent in refused:  # the same bytes again: authorized now
                    while (r := await answer(w, d, intent)).reason is not None:
                        assert r.reason.transient
                        await asyncio.sleep(0.05)
                    held += w.raw_for(r.intent_id)[-1:]
        finally:
            fog.send_signal(signal.SIGTERM)
            rc = await asyncio.to_thread(fog.wait, EXIT_TIMEOUT_S)
        assert rc == 0
        con = sqlite3.connect(disk / "fog.sqlite")
        try:
            stored = {
                bytes(i): bytes(r) for i, r in con.execute("SELECT intent_id, receipt FROM log")
            }
        finally:
            con.close()
    assert len(held) == 4 * DEVICES
    for raw in held:
        assert stored[open_envelope(raw, Receipt).msg.intent_id] == raw
    assert len(stored) == len(held)
    print(
        json.dumps(
            {
                "event": "disk_failed_campaign",
                "paid_before": 3 * DEVICES,
                "declined_while_failed": len(refused),
                "pipeline": pipeline,
                "failed_lines": len(failed),
                "stop_exit_on_failed_disk": stop_rc,
                "paid_after_restart": len(refused),
                "ok_receipts_held_all_logged": len(held),
            }
        )
    )
