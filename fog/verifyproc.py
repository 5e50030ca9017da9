"""Verify workers: the intents' Ed25519 signatures checked on other cores, before the core
decides (``verify_workers = N``, issue 15).

Why. The fog's daemon (MQTT) and its core (decide, SQLite, sign; fog/storeproc.py) each keep
one core busy under load; the core is the longer path, and the device's signature is its
largest single cost (one Ed25519 verify, about a quarter of the core's CPU per intent). On a
4-core Pi, ``N`` worker processes take that check off the core's path: the daemon sends the
payloads of each group that forms while earlier ones are deciding to the workers (a group
that finds the core idle goes straight to it: no worker round trip at low load), and the
intents a worker found good reach the core marked ``verified`` (``fog.store.Arrival``); the
core skips only that one check (row 2's signature, ``protocol.signing.open_envelope(...,
verified=True)``) and does everything else of spec section 6 as before: decode, signer is
``d``, topic, then rows 4 to 15.

How. ``VerifyPool.start(n)`` starts ``n`` children (``python -m fog.verifychild FD``: a
fresh interpreter importing the protocol package and nothing of the fog's state, about 20 MB),
each on a socket pair. ``verdicts(payloads)`` cuts a group into at most one contiguous slice
per live worker (no slice under ``SLICE_MIN`` payloads: a frame costs more than a verify),
sends each slice as one frame (a msgpack array of the payloads) and reads back one byte per
payload (1: the envelope splits and its signature verifies by its signer,
``signatures_verify``). The daemon keeps the groups' order into the core whatever order
the workers answer in.

Failure. A payload a worker found bad goes to the core unmarked: the core checks it and
declines it (``bad_signature`` or ``malformed``) exactly as without workers. A worker that dies
or answers nonsense is dropped: its slice goes unmarked (the core verifies it), the daemon
logs ``verify_worker_lost`` and counts it, and the other workers serve on; with none left the
core verifies everything, as with ``verify_workers = 0``. Nothing is declined or lost because
a worker is.

Trust. The workers are the fog's own processes started from its own files; the mark crosses
only the daemon's socket pairs to them and to the core. Nothing a device or peer sends can
set it.
"""

import asyncio
import contextlib
import socket
import subprocess
from collections.abc import Sequence
from typing import Final

import msgpack

from fog import frames
from fog.channel import Channel
from fog.childenv import spawn
from fog.config import VERIFY_WORKERS_MAX
from fog.verifychild import FRAME_BYTES_MAX
from protocol.limits import INTENT_ENVELOPE_BYTES_MAX

SLICE_MIN: Final = 4
START_TIMEOUT_S: Final = 60.0
STOP_TIMEOUT_S: Final = 10.0


class VerifyWorkerError(Exception):
    """A verify worker is gone (or answered nonsense)."""


class _Worker:
    def __init__(self, sock: socket.socket, proc: "subprocess.Popen[bytes]") -> None:
        self.sock = sock
        self.proc = proc
        self.channel: Channel | None = None

    @property
    def alive(self) -> bool:
        return self.channel is not None and self.channel.lost is None

    def kill(self) -> None:
        if self.channel is not None:
            self.channel.close()
        self.sock.close()
        with contextlib.suppress(OSError):
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(STOP_TIMEOUT_S)


class VerifyPool:
    """``n`` verify workers, used from one event loop. ``start`` blocks (run it on a thread);
    ``open`` attaches the workers to the running loop; ``close`` ends them."""

    def __init__(self, workers: list[_Worker]) -> None:
        self._workers = workers
        self._next = 0  # the worker that takes the first slice of the next group
        self._lost: list[int] = []  # pids of workers found gone, not yet reported

    @classmethod
    def start(cls, n: int) -> "VerifyPool":
        """Start ``n`` workers and wait until each has imported what it needs; raises
        ``VerifyWorkerError`` if one does not come up."""
        assert 1 <= n <= VERIFY_WORKERS_MAX
        started: list[_Worker] = []
        try:
            for _ in range(n):
                started.append(_spawn())
            for w in started:
                w.sock.settimeout(START_TIMEOUT_S)
                try:
                    frames.recv_frame(w.sock, 0)  # the empty "ready" frame
                except (OSError, ValueError) as exc:
                    raise VerifyWorkerError(f"verify worker not ready: {exc}") from None
                w.sock.settimeout(None)
        except BaseException:
            for w in started:
                w.kill()
            raise
        return cls(started)

    @property
    def pids(self) -> list[int]:
        return [w.proc.pid for w in self._workers]

    @property
    def alive(self) -> int:
        return sum(1 for w in self._workers if w.alive)

    def lost(self) -> list[int]:
        """The pids of workers found gone since the last call (each reported once)."""
        lost, self._lost = self._lost, []
        return lost

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        for w in self._workers:
            w.sock.setblocking(False)
            _, w.channel = await loop.connect_accepted_socket(_channel, sock=w.sock)

    async def verdicts(self, payloads: Sequence[bytes]) -> list[bool]:
        """One bool per payload: True when a worker found its signature good. Never raises:
        a payload no live worker checked is False (the core checks it)."""
        n = len(payloads)
        for w in [w for w in self._workers if not w.alive]:  # died since: reported once
            self._drop(w)
        live = list(self._workers)
        if not n or not live:
            return [False] * n
        k = max(1, min(len(live), n // SLICE_MIN))
        first = self._next % len(live)
        self._next = first + k
        bounds = [n * i // k for i in range(k + 1)]
        asked = []
        for i in range(k):
            w = live[(first + i) % len(live)]
            part = payloads[bounds[i] : bounds[i + 1]]
            assert w.channel is not None
            asked.append((w, len(part), w.channel.send(_frame(part))))
        out: list[bool] = []
        for w, size, future in asked:
            try:
                answer = await future
                if len(answer) != size:
                    raise VerifyWorkerError(f"{len(answer)} verdicts for {size} payloads")
            except Exception:
                self._drop(w)
                out.extend([False] * size)
                continue
            out.extend(b == 1 for b in answer)
        return out

    def _drop(self, w: _Worker) -> None:
        """A worker gone, or one that answered nonsense: never asked again, reported once."""
        if w in self._workers:
            self._workers.remove(w)
            self._lost.append(w.proc.pid)
            w.kill()

    async def aclose(self) -> None:
        """End every worker, from the loop ``open`` attached them to: they exit when their
        socket closes; reaped on a thread (bounded, killed past ``STOP_TIMEOUT_S``)."""
        for w in self._workers:
            if w.channel is not None:
                w.channel.close()
        await asyncio.get_running_loop().run_in_executor(None, self.close)

    def close(self) -> None:
        """End every worker (blocking, bounded), for a pool never opened or after ``aclose``
        closed its channels."""
        workers, self._workers = self._workers, []
        for w in workers:
            w.sock.close()
        for w in workers:
            try:
                w.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                w.kill()


def _gone(why: str) -> VerifyWorkerError:
    return VerifyWorkerError(f"verify worker gone: {why}")


def _channel() -> Channel:
    return Channel(_gone, FRAME_BYTES_MAX)


def _spawn() -> _Worker:
    return _Worker(*spawn("fog.verifychild"))


def _frame(payloads: Sequence[bytes]) -> bytes:
    # a payload past an intent's size cannot verify: sent empty (verdict 0), within the limit
    sent = [p if len(p) <= INTENT_ENVELOPE_BYTES_MAX else b"" for p in payloads]
    body: bytes = msgpack.packb(sent, use_bin_type=True)
    return frames.HEADER.pack(len(body)) + body
