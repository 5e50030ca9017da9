"""The core in a child process (fog/storeproc.py): a real second process on a real SQLite
file, answering exactly what an in-process FogCore answers, through fog/corewire.py."""

import asyncio
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fog.config import BatchConfig, UplinkConfig
from fog.core import (
    Close,
    CoreConfig,
    Counters,
    FogCore,
    FogOutput,
    Intents,
    Receipt,
    Sealed,
    Stats,
    Tick,
)
from fog.corewire import CoreError
from fog.schema import StoreError
from fog.store import Arrival, FogStore
from fog.storeproc import CoreProcess, StoreProcessError
from protocol.signing import public_key
from tests.conftest import process_running
from tests.fog.world import NOW, World

EXIT_WAIT_S = 10.0


def config(world: World) -> CoreConfig:
    return CoreConfig(
        fog_id=world.fog_id,
        issuer_key=public_key(world.issuer),
        policy=world.policy,
        batch=BatchConfig(records_max=256, age_ms=1_000),
        uplink=UplinkConfig(enabled=False),
    )


def start(world: World) -> CoreProcess:
    return CoreProcess.start(world.path, config=config(world), fog_key=world.fog_key)


def provisioned(world: World, devices: int) -> list[tuple[bytes, bytes]]:
    """An owner, a lease and ``devices`` bound devices, with one intent each (not sent).
    The world's own connection stays open and idle (WAL: the child writes meanwhile)."""
    owner = world.owner()
    world.lease(amount=10**12)
    devs = [world.device(owner) for _ in range(devices)]
    return [(public_key(d), world.intent(d, 1, 1_000)) for d in devs]


def receipts(outputs: list[FogOutput]) -> list[Receipt]:
    return [o for o in outputs if isinstance(o, Receipt)]


def test_the_child_answers_as_an_in_process_core_would_and_the_log_holds_it(
    world: World, tmp_path: Path
) -> None:
    items = provisioned(world, 3)
    arrivals = tuple(Arrival(d, p) for d, p in items)
    proc = start(world)
    try:
        assert proc.pid != os.getpid() and process_running(proc.pid)
        outputs = receipts(proc.handle(Intents(arrivals=arrivals, now_ms=NOW)))
        assert [r.outcome.status for r in outputs] == ["ok"] * 3
        again = receipts(proc.handle(Intents(arrivals=arrivals[:1], now_ms=NOW)))
        assert again[0].outcome.replay and again[0].payload == outputs[0].payload
        [counters] = proc.handle(Stats(now_ms=NOW))
        assert isinstance(counters, Counters) and counters.as_dict()["intents_ok"] == 3
        sealed = [o for o in proc.handle(Tick(now_ms=NOW + 60_000)) if isinstance(o, Sealed)]
        assert sealed == [Sealed(number=1, first_index=1, records=3)]
    finally:
        proc.close()
    assert not process_running(proc.pid)
    store = world.reopen()  # what the child committed is in the file
    again_here = store.process([Arrival(*items[1])], now_ms=NOW)
    assert again_here[0].replay and again_here[0].receipt == outputs[1].payload
    # an in-process core on a copy of the file answers the same intents from the same
    # durable records: replays, with the very receipts the child sent
    world.store.close()
    copy = tmp_path / "copy.db"
    src, dst = sqlite3.connect(world.path), sqlite3.connect(copy)
    src.backup(dst)
    src.close()
    dst.close()
    local = FogCore.open(copy, config=config(world), fog_key=world.fog_key)
    try:
        here = receipts(local.handle(Intents(arrivals=arrivals, now_ms=NOW)))
        assert [r.outcome for r in here] == [
            type(r.outcome)(**{**_fields(r.outcome), "replay": True}) for r in outputs
        ]
    finally:
        local.handle(Close(now_ms=NOW))
    world.store = world.open()


def _fields(o: object) -> dict[str, object]:
    return {f: getattr(o, f) for f in o.__dataclass_fields__}  # type: ignore[attr-defined]


def test_an_exception_in_the_core_is_raised_in_the_caller_and_the_process_serves_on(
    world: World,
) -> None:
    items = provisioned(world, 1)
    proc = start(world)
    try:
        with pytest.raises(CoreError, match="AssertionError"):
            proc.handle(Intents(arrivals=(Arrival(b"short", b"x"),), now_ms=NOW))
        outputs = receipts(proc.handle(Intents(arrivals=(Arrival(*items[0]),), now_ms=NOW)))
        assert outputs[0].outcome.status == "ok"
    finally:
        proc.close()


def test_open_failure_is_raised_by_start(world: World, tmp_path: Path) -> None:
    newer = tmp_path / "newer.db"
    FogStore.open(
        newer,
        fog_id=world.fog_id,
        fog_key=world.fog_key,
        issuer_key=public_key(world.issuer),
        policy=world.policy,
    ).close()
    con = sqlite3.connect(newer)
    con.execute("UPDATE schema_version SET version = 999")
    con.commit()
    con.close()
    with pytest.raises(StoreError, match="newer"):
        CoreProcess.start(newer, config=config(world), fog_key=world.fog_key)


async def test_awaited_inputs_from_many_tasks_are_handled_one_at_a_time(world: World) -> None:
    items = provisioned(world, 40)
    proc = start(world)
    try:
        calls = [proc.ahandle(Intents(arrivals=(Arrival(d, p),), now_ms=NOW)) for d, p in items]
        calls += [proc.ahandle(Stats(now_ms=NOW)) for _ in range(10)]
        results = await asyncio.gather(*calls)
        outcomes = [receipts(r)[0].outcome for r in results[: len(items)]]
        assert [o.status for o in outcomes] == ["ok"] * len(items)
        assert sorted(o.log_index for o in outcomes) == list(range(1, len(items) + 1))
        with pytest.raises(CoreError):
            await proc.ahandle(Intents(arrivals=(Arrival(b"", b""),), now_ms=NOW))
        await proc.ahandle(Close(now_ms=NOW))
    finally:
        proc.close()
    assert not process_running(proc.pid)
    with pytest.raises(StoreProcessError):
        await proc.ahandle(Stats(now_ms=NOW))


def test_the_child_exits_when_its_parent_goes_and_keeps_what_committed(world: World) -> None:
    """A SIGKILLed daemon closes its end of the socket: the child finishes, then exits."""
    items = provisioned(world, 2)
    proc = start(world)
    outputs = receipts(proc.handle(Intents(arrivals=(Arrival(*items[0]),), now_ms=NOW)))
    proc._sock.close()  # what the kernel does for a killed parent
    deadline = time.monotonic() + EXIT_WAIT_S
    while process_running(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not process_running(proc.pid)
    proc._proc.wait(EXIT_WAIT_S)
    store = world.reopen()
    again = store.process([Arrival(*items[0])], now_ms=NOW)
    assert again[0].replay and again[0].receipt == outputs[0].payload


def test_the_fog_key_is_not_on_the_child_command_line_or_environment(world: World) -> None:
    provisioned(world, 1)
    proc = start(world)
    try:
        seed = bytes(world.fog_key)
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        environ = Path(f"/proc/{proc.pid}/environ").read_bytes()
        for text in (cmdline, environ):
            assert seed not in text and seed.hex().encode() not in text
    finally:
        proc.close()


def test_the_core_imports_no_io() -> None:
    """Sans-IO: importing the core pulls in no event loop, MQTT client or logger."""
    code = (
        "import sys, fog.core\n"
        "bad = [m for m in ('asyncio', 'aiomqtt', 'paho', 'structlog', 'socket') "
        "if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
