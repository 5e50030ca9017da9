"""The store in a child process (fog/storeproc.py): a real second process on a real SQLite
file, answering exactly what a FogStore on a thread answers."""

import asyncio
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from fog.schema import StoreError
from fog.store import Arrival, FogStore
from fog.storeproc import StoreProcess, StoreProcessError
from protocol.signing import public_key
from tests.conftest import process_running
from tests.fog.world import NOW, World

EXIT_WAIT_S = 10.0


def opening(world: World) -> dict[str, Any]:
    """What FogStore.open and StoreProcess.start take besides the path."""
    return {
        "fog_id": world.fog_id,
        "fog_key": world.fog_key,
        "issuer_key": public_key(world.issuer),
        "policy": world.policy,
    }


def start(world: World) -> StoreProcess:
    return StoreProcess.start(world.path, **opening(world))


def provisioned(world: World, devices: int) -> list[tuple[bytes, bytes]]:
    """An owner, a lease and ``devices`` bound devices, with one intent each (not sent).
    The world's own connection stays open and idle (WAL: the child writes meanwhile)."""
    owner = world.owner()
    world.lease(amount=10**12)
    devs = [world.device(owner) for _ in range(devices)]
    return [(public_key(d), world.intent(d, 1, 1_000)) for d in devs]


def test_process_answers_as_a_thread_store_would_and_the_log_holds_it(world: World) -> None:
    items = provisioned(world, 3)
    proc = start(world)
    try:
        assert proc.pid != os.getpid() and process_running(proc.pid)
        arrivals = [Arrival(d, p) for d, p in items]
        outcomes = proc.process(arrivals, now_ms=NOW)
        assert [o.status for o in outcomes] == ["ok"] * 3
        again = proc.process(arrivals[:1], now_ms=NOW)  # a retransmission: the same bytes
        assert again[0].replay and again[0].receipt == outcomes[0].receipt
        assert proc.counters()["intents_ok"] == 3
        sealed = proc.seal_due(now_ms=NOW + 60_000, records_max=256, age_ms=1_000)
        assert [len(b.records) for b in sealed] == [3]
        assert proc.batch_wire(sealed[0].number) == sealed[0].wire
    finally:
        proc.close()
    assert not process_running(proc.pid)
    store = world.reopen()  # what the child committed is in the file
    again = store.process([Arrival(*items[1])], now_ms=NOW)
    assert again[0].replay and again[0].receipt == outcomes[1].receipt


def test_an_exception_in_the_store_is_raised_in_the_caller_and_the_process_serves_on(
    world: World,
) -> None:
    provisioned(world, 1)
    proc = start(world)
    try:
        with pytest.raises(AssertionError):
            proc.unacked_numbers(0)  # FogStore asserts 1 <= limit
        with pytest.raises(AttributeError):
            proc.no_such_method()
        assert proc.unacked_numbers(8) == []
    finally:
        proc.close()


def test_open_failure_is_raised_by_start(world: World, tmp_path: Path) -> None:
    newer = tmp_path / "newer.db"
    FogStore.open(newer, **opening(world)).close()
    con = sqlite3.connect(newer)
    con.execute("UPDATE schema_version SET version = 999")
    con.commit()
    con.close()
    with pytest.raises(StoreError, match="newer"):
        StoreProcess.start(newer, **opening(world))


async def test_awaited_calls_from_many_tasks_are_served_one_at_a_time(world: World) -> None:
    items = provisioned(world, 40)
    proc = start(world)
    try:
        calls = [proc.acall("process", [Arrival(d, p)], now_ms=NOW) for d, p in items]
        calls += [proc.acall("unacked_numbers", 8) for _ in range(10)]
        results = await asyncio.gather(*calls)
        outcomes = [r[0] for r in results[: len(items)]]
        assert [o.status for o in outcomes] == ["ok"] * len(items)
        assert sorted(o.log_index for o in outcomes) == list(range(1, len(items) + 1))
        with pytest.raises(AssertionError):
            await proc.acall("unacked_numbers", 0)
        await proc.acall("close")
    finally:
        proc.close()
    assert not process_running(proc.pid)
    with pytest.raises(StoreProcessError):
        proc.counters()


def test_the_child_exits_when_its_parent_goes_and_keeps_what_committed(world: World) -> None:
    """A SIGKILLed daemon closes its end of the socket: the child finishes, then exits."""
    items = provisioned(world, 2)
    proc = start(world)
    outcomes = proc.process([Arrival(*items[0])], now_ms=NOW)
    proc._sock.close()  # what the kernel does for a killed parent
    deadline = time.monotonic() + EXIT_WAIT_S
    while process_running(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not process_running(proc.pid)
    proc._proc.wait(EXIT_WAIT_S)
    store = world.reopen()
    again = store.process([Arrival(*items[0])], now_ms=NOW)
    assert again[0].replay and again[0].receipt == outcomes[0].receipt


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
