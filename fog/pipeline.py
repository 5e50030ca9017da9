"""The pipelined group commit: decide the next group while the previous one syncs.

Why. With ``synchronous=FULL`` each group's COMMIT ends with an fsync of the WAL (~4 ms on
this kind of disk), and the core does nothing else meanwhile: intents arriving during a
commit wait for it, then for their own decision and their own fsync (p50 ~3 fsyncs at 1,000
intents/s, bench/fog.py). Here the core's thread commits without syncing and goes on to the
next input at once; sync threads make the commits durable; answers are released, in the order
of the inputs, only once a sync that started after their commit has completed.

How (the store: ``FogCore.open(..., durable_commits=False)``, fog/store.py). Every COMMIT is
``synchronous=NORMAL`` in WAL mode: its frames are written to the ``-wal`` file, not synced.
The barrier is ``WalFile.sync()``: fdatasync of the ``-wal`` file. fsync is per inode: it
writes and waits for every dirty page of the file, whoever wrote it, so a sync that *started*
after commit N returned covers commit N and every commit before it. Each input handled gets a
sequence number; a sync thread takes the newest sequence handled, syncs, and then everything
up to that sequence is durable and released, oldest first (with ``SYNC_THREADS`` > 1 a second
sync starts while one runs, for a commit that came after its start; each thread has its own
descriptor, see ``WalFile``).

Why a crash cannot leave a receipt without its record (the prefix property). After a crash
SQLite recovers the WAL by reading frames from its start while each frame's salt matches the
header and its checksum, which is cumulative (each frame's checksum covers the previous
frame's), is right, and keeps the commits up to the last valid commit frame. The page cache
may have written the file's pages in any order, but a commit whose frames did not all reach the
disk breaks the chain there, and every later commit is discarded with it: what survives is a
prefix of the commits. Every commit whose answers were released is covered by a completed
fdatasync, so it and everything before it is in that prefix. Checkpoints keep this:
with ``synchronous=NORMAL`` SQLite syncs the WAL before copying pages back into the database
and the database after (https://sqlite.org/pragma.html#pragma_synchronous, wal.html), so a
checkpointed commit is durable in the database file. When the WAL restarts from its beginning
(after a complete checkpoint) the new header carries a new salt and is not synced at once: a
crash then leaves the old header (new frames fail the salt check: nothing after the
checkpoint, which was synced) or the new one with a prefix of the new frames: a prefix again.
No answer about an input leaves before its barrier: receipts, batches, lease requests and
reports, gossip, everything (a batch sent before its seal is durable could be sealed again
differently after a crash: a fork). Inputs that wrote nothing (``conn.total_changes``
unchanged) need only the barrier of the last input that wrote; their answers still wait for
it, in order.

The barrier failing (fdatasync raises: EIO). The commits since the last good sync may or may
not be on disk, and after a failed writeback Linux may have marked the pages clean: the
connection's view can no longer be trusted. Every input not yet released is answered as
unrecorded (``FogCore.unrecorded``: each intent a signed transient decline, never an ok, plus
``Alarm("store_sync_failed")``; any other input: ``StoreSyncError``), every later input too
without touching the database, and the daemon stops (systemd restarts it: SQLite recovers the
durable prefix). A device whose intent was in fact recorded gets the stored receipt when it
sends the same bytes again.

Bounded: at most ``DEPTH_MAX`` inputs handled and not yet released; the core's thread waits
past it (the daemon keeps at most ``PIPELINE_GROUPS_MAX`` groups in flight, fog/daemon.py).
``Close`` waits for everything before it to be released, then closes the store (SQLite's
close checkpoints with FULL syncs). The pure ``FogCore`` keeps its semantics (durable when
``handle`` returns, with the default ``durable_commits=True``); the simulator drives it so.
"""

import collections
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from fog.core import Close, FogCore, FogInput, FogOutput, Intents
from fog.store import StoreSyncError, WalFile

SYNC_THREADS: Final = 2  # syncs in flight at once (a commit need not wait for a running one)
DEPTH_MAX: Final = 64  # inputs handled and not yet released, at most

_ABANDONED: list[FogCore] = []  # cores whose barrier failed: never closed (no checkpoint)

Result = list[FogOutput] | BaseException
Done = Callable[[Any], None]  # given the Result, or what ``prepare`` made of it
Prepare = Callable[[Result], Any]


@dataclass(slots=True)
class _Entry:
    seq: int
    need: int  # the sequence that must be durable before this answer leaves
    event: FogInput
    result: Any  # the Result, prepared
    done: Done
    prepare: Prepare | None


class Pipeline:
    """``FogCore.handle`` on the caller's one thread (``submit``), answers released through
    ``done`` in input order after the barrier covering them, from a sync thread (or from the
    caller's thread when nothing needs a sync). ``sync_hook`` (tests): called by a sync thread
    in place of the WAL's fdatasync, given the fdatasync to call."""

    def __init__(
        self,
        core: FogCore,
        *,
        threads: int = SYNC_THREADS,
        depth: int = DEPTH_MAX,
        sync_hook: Callable[[Callable[[], None]], None] | None = None,
    ) -> None:
        assert not core.store.durable_commits, "open the core with durable_commits=False"
        assert threads >= 1 and depth >= 1
        self._core = core
        self._depth = depth
        self._hook = sync_hook
        self._cond = threading.Condition()
        self._core_lock = threading.Lock()  # handle vs. answering unrecorded after a failure
        self._release_lock = threading.Lock()  # answers go out one at a time, in order
        self._pending: collections.deque[_Entry] = collections.deque()
        self._seq = 0  # the last input handled
        self._wanted = 0  # the last input that wrote: what the next sync must cover
        self._started = 0  # the highest sequence a sync was started for
        self._durable = 0  # the highest sequence a completed sync covered
        self._changes = core.store.connection.total_changes
        self._failed: BaseException | None = None
        self._stopping = False
        self.syncs = 0  # completed fdatasyncs (tests, bench)
        self._threads = []
        for i in range(threads):
            wal = core.store.wal_file()
            t = threading.Thread(
                target=self._syncer, args=(wal,), name=f"fog-sync-{i}", daemon=True
            )
            t.start()
            self._threads.append(t)

    @property
    def failed(self) -> bool:
        return self._failed is not None

    def submit(self, event: FogInput, done: Done, prepare: Prepare | None = None) -> None:
        """Handle ``event`` now (blocking while ``DEPTH_MAX`` answers wait), answer it through
        ``done`` once durable. Call from one thread, the same every time. ``prepare``: made of
        the result on this thread, at once (the child encodes its answer here, so that a sync
        thread only sends it); ``done`` is then given what it made."""
        if isinstance(event, Close):
            self._close(event, done, prepare)
            return
        with self._cond:
            while len(self._pending) >= self._depth and self._failed is None:
                self._cond.wait()
        with self._core_lock:
            failed = self._failed
            if failed is None:
                result = self._run(event)
                changes = self._core.store.connection.total_changes
            else:
                result = self._unrecorded(event, failed)
                changes = self._changes
            with self._cond:
                self._seq += 1
                if changes != self._changes:
                    self._changes = changes
                    self._wanted = self._seq
                made = result if prepare is None else prepare(result)
                entry = _Entry(self._seq, self._wanted, event, made, done, prepare)
                self._pending.append(entry)
                self._cond.notify_all()
        self._release()

    def drain(self) -> None:
        """Wait until every answer so far was released (or the barrier failed)."""
        with self._cond:
            while self._pending and self._failed is None:
                self._cond.wait()
        self._release()

    def _close(self, event: Close, done: Done, prepare: Prepare | None) -> None:
        self.drain()
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for t in self._threads:
            t.join()
        if self._failed is not None:  # no checkpoint from a page cache that failed to write:
            _ABANDONED.append(self._core)  # the connection stays open until the process exits
            result = self._unrecorded(event, self._failed)
        else:
            result = self._run(event)
        done(result if prepare is None else prepare(result))

    def _run(self, event: FogInput) -> Result:
        try:
            return self._core.handle(event)
        except Exception as exc:  # the caller's to raise, in order
            return exc

    def _unrecorded(self, event: FogInput, exc: BaseException) -> Result:
        if isinstance(event, Intents):
            return self._core.unrecorded(event, "store_sync_failed", exc)
        return StoreSyncError(f"the store's sync failed: {type(exc).__name__}: {exc}")

    # ---- the sync threads --------------------------------------------------------------

    def _syncer(self, wal: WalFile) -> None:
        try:
            while True:
                with self._cond:
                    while not (self._stopping or self._failed) and self._wanted <= self._started:
                        self._cond.wait()
                    if self._stopping or self._failed is not None:
                        return
                    target = self._started = self._wanted
                try:
                    if self._hook is not None:
                        self._hook(wal.sync)
                    else:
                        wal.sync()
                except Exception as exc:
                    self._fail(exc)
                    return
                with self._cond:
                    self.syncs += 1
                    self._durable = max(self._durable, target)
                self._release()
        finally:
            wal.close()

    def _fail(self, exc: BaseException) -> None:
        with self._core_lock:  # no input is being handled: answer the unreleased ones again
            with self._cond:
                if self._failed is None:
                    self._failed = exc
                    for e in self._pending:
                        if e.need > self._durable:
                            unrecorded = self._unrecorded(e.event, exc)
                            e.result = unrecorded if e.prepare is None else e.prepare(unrecorded)
                self._cond.notify_all()
        self._release()

    def _release(self) -> None:
        """Hand out, oldest first, every answer whose barrier completed (all, after a
        failure: they were answered again as unrecorded)."""
        with self._release_lock:
            while True:
                with self._cond:
                    if not self._pending:
                        return
                    e = self._pending[0]
                    if e.need > self._durable and self._failed is None:
                        return
                    self._pending.popleft()
                    self._cond.notify_all()
                e.done(e.result)
