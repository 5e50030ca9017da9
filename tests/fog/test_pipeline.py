"""The pipelined group commit (fog/pipeline.py) on real SQLite files: an answer is released
only after an fsync of the WAL that started after its commit; answers keep the order of the
inputs; the next input is decided while a sync runs; a failed sync (EIO) releases declines,
never an ok, and the alarm. The sync is observed through the pipeline's hook, which calls the
real fdatasync (or raises, for EIO) and records when it started and ended."""

import asyncio
import errno
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final

import pytest

from fog.core import Alarm, Close, FogCore, Intents, Receipt, Stats
from fog.pipeline import Pipeline, Result
from fog.store import Arrival, StoreSyncError
from fog.storeproc import CoreProcess
from protocol.signing import public_key
from tests.fog.test_storeproc import config
from tests.fog.world import NOW, World
from tests.integration.devices import intent_id

WAIT_S: Final = 10.0  # bound on every wait (never reached when the code is right)


def logged(path: Path) -> int:
    con = sqlite3.connect(path)
    try:
        return int(con.execute("SELECT count(*) FROM log").fetchone()[0])
    finally:
        con.close()


class Gate:
    """The sync hook: at each sync's start, how many log records another connection sees
    (what the sync must cover); blocks while closed; fails with EIO when told; records the
    starts and ends in one event list shared with the answers."""

    def __init__(self, path: Path, events: list[tuple[str, int]], lock: threading.Lock) -> None:
        self.path, self.events, self.lock = path, events, lock
        self.open = threading.Event()
        self.open.set()
        self.fail = False
        self.started = threading.Semaphore(0)

    def __call__(self, fsync: Callable[[], None]) -> None:
        rows = logged(self.path)
        with self.lock:
            self.events.append(("sync_start", rows))
        self.started.release()
        assert self.open.wait(WAIT_S)
        if self.fail:
            raise OSError(errno.EIO, "Input/output error")
        fsync()
        with self.lock:
            self.events.append(("sync_end", rows))


class Rig:
    def __init__(self, world: World, *, threads: int) -> None:
        self.world = world
        self.events: list[tuple[str, int]] = []
        self.lock = threading.Lock()
        self.gate = Gate(world.path, self.events, self.lock)
        self.submitted: list[int] = []
        self.answers: list[tuple[int, Result]] = []
        self.answered = threading.Condition()
        # the core opens the file itself (the world's own connection stays open and idle)
        self.core = FogCore.open(
            world.path, config=config(world), fog_key=world.fog_key, durable_commits=False
        )
        self.pipe = Pipeline(self.core, threads=threads, sync_hook=self.gate)
        self.closed = False

    def submit(self, n: int, event: Intents | Stats, rows: int = 0) -> None:
        """``rows``: the log records once ``event`` committed (its answer needs a sync that
        started when at least that many were committed); 0: nothing to check."""

        def done(result: Result) -> None:
            with self.lock:
                self.events.append(("answer", rows))
            with self.answered:
                self.answers.append((n, result))
                self.answered.notify_all()

        self.submitted.append(n)
        self.pipe.submit(event, done)

    def wait_answers(self, count: int) -> None:
        with self.answered:
            assert self.answered.wait_for(lambda: len(self.answers) >= count, WAIT_S)

    def each_answer_after_its_sync(self) -> None:
        """Every answer (with rows) came after the end of a sync that had started when its
        commit was visible."""
        covered = 0  # the most rows a completed sync covered, so far in the event list
        for kind, rows in self.events:
            if kind == "sync_end":
                covered = max(covered, rows)
            elif kind == "answer":
                assert rows <= covered, self.events

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.gate.open.set()
            self.pipe.submit(Close(now_ms=NOW), lambda _: None)


@pytest.fixture
def items(world: World) -> list[tuple[bytes, bytes]]:
    owner = world.owner()
    world.lease(amount=10**12)
    out = []
    for _ in range(12):
        d = world.device(owner)
        out += [(public_key(d), world.intent(d, q, 1_000)) for q in (1, 2)]
    return out


@pytest.fixture
def rig(world: World) -> Iterator[Callable[[int], Rig]]:
    made: list[Rig] = []

    def make(threads: int = 1) -> Rig:
        made.append(Rig(world, threads=threads))
        return made[-1]

    yield make
    for r in made:
        if not r.pipe.failed:
            r.close()


def intents(*items: tuple[bytes, bytes]) -> Intents:
    return Intents(arrivals=tuple(Arrival(d, p) for d, p in items), now_ms=NOW)


def receipts(result: Result) -> list[Receipt]:
    assert isinstance(result, list), result
    return [o for o in result if isinstance(o, Receipt)]


def test_receipts_wait_for_the_sync_while_the_next_group_is_decided(
    world: World, items: list[tuple[bytes, bytes]], rig: Callable[[int], Rig]
) -> None:
    r = rig(1)
    r.gate.open.clear()  # the sync blocks: nothing may be released
    r.submit(1, intents(*items[0:2]), rows=2)
    assert r.gate.started.acquire(timeout=WAIT_S)  # a sync started for group 1 ...
    r.submit(2, intents(*items[2:4]), rows=4)  # ... and group 2 is decided and committed
    assert logged(world.path) == 4  # both committed (another connection sees them)
    assert r.answers == []  # and not one receipt released: no sync has completed
    r.gate.open.set()
    r.wait_answers(2)
    assert [n for n, _ in r.answers] == [1, 2]
    assert all(x.outcome.status == "ok" for _, res in r.answers for x in receipts(res))
    r.each_answer_after_its_sync()
    assert r.pipe.syncs == 2  # group 2 came after the first sync started: a second one


@pytest.mark.parametrize("threads", [1, 2])
def test_many_inputs_are_answered_in_order_each_after_a_covering_sync(
    world: World, items: list[tuple[bytes, bytes]], rig: Callable[[int], Rig], threads: int
) -> None:
    r = rig(threads)
    for n, item in enumerate(items, 1):
        r.submit(n, intents(item), rows=n)
        if n % 5 == 0:
            r.submit(1000 + n, Stats(now_ms=NOW))  # writes nothing: in order all the same
    r.wait_answers(len(r.submitted))
    assert [n for n, _ in r.answers] == r.submitted
    assert logged(world.path) == len(items)
    r.each_answer_after_its_sync()
    assert 1 <= r.pipe.syncs <= len(items)


def test_a_failed_sync_declines_and_alarms_and_nothing_ok_leaves(
    world: World, items: list[tuple[bytes, bytes]], rig: Callable[[int], Rig]
) -> None:
    r = rig(1)
    r.submit(1, intents(items[0]))
    r.wait_answers(1)
    assert receipts(r.answers[0][1])[0].outcome.status == "ok"  # durable before the failure
    r.gate.open.clear()
    r.submit(2, intents(*items[2:4]))
    assert r.gate.started.acquire(timeout=WAIT_S)
    r.submit(3, intents(items[4]))  # decided while the failing sync runs
    r.gate.fail = True
    r.gate.open.set()
    r.wait_answers(3)
    r.submit(4, intents(items[6]))  # after the failure: declined without a decision
    r.submit(5, Stats(now_ms=NOW))
    r.wait_answers(5)
    assert [n for n, _ in r.answers] == [1, 2, 3, 4, 5]
    for _, res in r.answers[1:4]:
        assert all(
            x.outcome.status == "declined" and x.outcome.reason == "rate_limited"
            for x in receipts(res)
        )
        alarms = [o for o in res if isinstance(o, Alarm)]  # type: ignore[union-attr]
        assert [a.event for a in alarms] == ["store_sync_failed"]
        assert "Input/output error" in alarms[0].error
    assert isinstance(r.answers[4][1], StoreSyncError)
    assert r.pipe.failed
    closed: list[Result] = []
    r.pipe.submit(Close(now_ms=NOW), closed.append)  # the store is left open: no checkpoint
    assert isinstance(closed[0], StoreSyncError)
    r.core.store.connection.execute("SELECT 1")  # still open
    r.core.store.close()  # (the test's own clean-up)


def test_the_default_core_is_durable_on_return_and_refuses_a_pipeline(world: World) -> None:
    world.store.close()
    core = FogCore.open(world.path, config=config(world), fog_key=world.fog_key)
    try:
        assert core.store.durable_commits
        assert core.store.connection.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        with pytest.raises(AssertionError):
            Pipeline(core)
    finally:
        core.handle(Close(now_ms=NOW))
    piped = FogCore.open(
        world.path, config=config(world), fog_key=world.fog_key, durable_commits=False
    )
    try:
        assert not piped.store.durable_commits
        assert piped.store.connection.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    finally:
        piped.handle(Close(now_ms=NOW))
    world.store = world.open()


async def _answers_in_the_child(world: World, groups: list[Intents]) -> list[list[Receipt]]:
    proc = CoreProcess.start(
        world.path, config=config(world), fog_key=world.fog_key, pipelined=True
    )
    try:
        # written back to back: the child finds several waiting and may decide them as one
        results = await asyncio.gather(*(proc.ahandle(g) for g in groups))
        await proc.ahandle(Close(now_ms=NOW))
    except BaseException:
        proc.close()
        raise
    return [[o for o in r if isinstance(o, Receipt)] for r in results]


def test_the_child_answers_each_of_the_groups_it_decided_as_one(
    world: World, items: list[tuple[bytes, bytes]]
) -> None:
    groups = [intents(*items[i : i + 3]) for i in range(0, len(items), 3)]
    answers = asyncio.run(_answers_in_the_child(world, groups))
    assert len(answers) == len(groups)
    for group, got in zip(groups, answers, strict=True):
        assert [r.outcome.intent_id for r in got] == [intent_id(a.payload) for a in group.arrivals]
        assert all(r.outcome.status == "ok" for r in got)
    assert logged(world.path) == len(items)
