"""The fog's core in a child process: ``FogCore.handle`` over a socket pair, one codec.

Why. The event loop (MQTT through aiomqtt/paho) and the core (decode, verify, authorize,
SQLite, sign) each cost a few hundred microseconds of Python per intent. On one thread pool
they share the GIL: each waits for the other, every verify or commit hands the GIL over and
waits to get it back, and at 1,000 intents/s the process ran near one core's worth of
GIL time (bench/fog.py). In a process of its own the core runs on another core, and the
loop never waits for it.

How. ``CoreProcess.start(...)`` starts ``python -m fog.storeproc`` (a fresh interpreter: no
fork of a process with threads and an event loop, and no re-import of the embedder's main
script as ``multiprocessing`` would do) with one end of a socket pair, sends it what it needs
to open a ``FogCore`` (``corewire.open_frame``), and then the child handles one input at a
time: a ``FogInput`` in, its ``FogOutput``s (or the error the core raised) out, encoded by
``fog/corewire.py``, the one codec for that closed set of messages. Nothing else crosses: there
is no remote method call, so a new store method cannot become a wire message by accident.
Inputs are written in the order made and answered in that order, so the one transaction per
``Intents`` input and the order of inputs are exactly those of an in-process core.

Life and death. The child ignores SIGINT and SIGTERM (systemd signals the whole unit at once;
the parent decides when to stop: it drains the group in flight, then sends ``Close``). It
exits after ``Close`` or when the socket breaks: if the parent is SIGKILLed, the child finishes
the input in hand (one SQLite transaction: all or nothing either way), finds the socket gone
and exits. Intents are answered only by the parent, after the child returned the committed
outcome, so durability before the receipt holds as in-process. Pipelined (``store_pipeline``,
fog/pipeline.py) the child answers an input once the fsync of the WAL covering its commit
completed, from a sync thread, while its main thread reads and decides the next inputs; a
parent SIGKILLed leaves the child to finish what it read, make it durable and exit.

Secrets. The fog key crosses as its 32-byte seed over the socket pair, never in argv or the
environment, and is never logged.
"""

import asyncio
import contextlib
import gc
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Final

import nacl.signing

from fog import corewire, frames
from fog.channel import Channel
from fog.childenv import spawn
from fog.core import Alarm, Close, CoreConfig, FogCore, FogInput, FogOutput, Intents, Receipt
from fog.corewire import CoreWireError
from fog.pipeline import Pipeline
from fog.schema import StoreError

START_TIMEOUT_S: Final = 60.0
STOP_TIMEOUT_S: Final = 30.0
FRAME_BYTES_MAX: Final = corewire.FRAME_BYTES_MAX
MERGED_ARRIVALS_MAX: Final = 1024  # Intents waiting on the socket decided as one, at most


class StoreProcessError(StoreError):
    """The core's process died, or answered with something that cannot be read."""


class CoreProcess:
    """A ``FogCore`` living in a child process, which handles one input at a time: the
    blocking ``handle`` from one thread, or ``ahandle`` from one event loop (inputs written in
    the order made, answered in that order), not both."""

    def __init__(self, sock: socket.socket, proc: "subprocess.Popen[bytes]") -> None:
        self._sock = sock
        self._proc = proc
        self._closed = False
        self._channel: Channel | None = None  # once an event loop calls (ahandle)
        self._opening: asyncio.Lock | None = None

    @classmethod
    def start(
        cls,
        path: str | Path,
        *,
        config: CoreConfig,
        fog_key: nacl.signing.SigningKey,
        pipelined: bool = False,
    ) -> "CoreProcess":
        """Start the child and open the core there; raises ``CoreError`` (a ``StoreError``)
        with what ``FogCore.open`` raised. ``pipelined``: the child commits without a sync
        and answers each input once a sync covering it completed (fog/pipeline.py), reading
        the next inputs meanwhile."""
        ours, proc = spawn("fog.storeproc")
        core = cls(ours, proc)
        try:
            ours.settimeout(START_TIMEOUT_S)
            frame = corewire.open_frame(str(path), bytes(fog_key), config, pipelined=pipelined)
            ours.sendall(frame)
            corewire.read_reply(_recv_frame(ours))  # [] or what the child's open raised
            ours.settimeout(None)
        except TimeoutError:
            core._kill()
            raise StoreProcessError(f"core process not ready in {START_TIMEOUT_S:.0f} s") from None
        except BaseException:
            core._kill()
            raise
        return core

    @property
    def pid(self) -> int:
        return self._proc.pid

    # ---- blocking (one thread) ---------------------------------------------------------

    def handle(self, event: FogInput) -> list[FogOutput]:
        """``FogCore.handle`` in the child; raises ``CoreError`` if the core raised there,
        ``StoreProcessError`` if the child is gone."""
        if self._channel is not None:
            raise StoreProcessError("core process: handled blocking after awaited inputs")
        frame = self._frame(event)
        self._sock.setblocking(True)
        try:
            self._sock.sendall(frame)
            answer = _recv_frame(self._sock)
        except OSError as exc:
            raise self._gone(exc) from exc
        return self._finish(event, answer)

    def close(self) -> None:
        """Close the core in the child and wait for the child to exit (blocking; after
        awaited inputs, ``await ahandle(Close(...))`` instead). Killed if it is stuck."""
        if self._closed:
            return
        if self._channel is not None:
            self._kill()
            return
        try:
            self.handle(Close(now_ms=0))
        finally:
            self._closed = True
            self._sock.close()
            self._wait_exit()

    # ---- awaited (one event loop) -------------------------------------------------------

    async def ahandle(self, event: FogInput) -> list[FogOutput]:
        """``handle`` without blocking the loop. Inputs are written in the order given and
        the child answers them in that order (no waiting for one answer before sending the
        next). A cancelled caller's input still runs (the child commits or not, as a thread
        would); its answer is dropped."""
        frame = self._frame(event)
        channel = await self._channel_open()
        answer = await channel.send(frame)
        outputs = self._finish(event, answer)
        if isinstance(event, Close):
            self._closed = True
            channel.close()
            await asyncio.get_running_loop().run_in_executor(None, self._wait_exit)
        return outputs

    async def _channel_open(self) -> Channel:
        if self._channel is not None:
            return self._channel
        if self._opening is None:  # inputs sent while the channel opens queue here, in order
            self._opening = asyncio.Lock()
        async with self._opening:
            if self._channel is None:
                self._sock.setblocking(False)
                loop = asyncio.get_running_loop()
                _, channel = await loop.connect_accepted_socket(_channel, sock=self._sock)
                self._channel = channel
        return self._channel

    # ---- frames ----------------------------------------------------------------------------

    def _frame(self, event: FogInput) -> bytes:
        if self._closed:
            raise StoreProcessError("core process closed")
        return corewire.input_frame(event)

    def _finish(self, event: FogInput, answer: bytes) -> list[FogOutput]:
        try:
            return corewire.read_reply(answer)
        except CoreWireError as exc:
            raise StoreProcessError(f"unreadable answer: {exc}") from exc

    def _gone(self, exc: BaseException) -> StoreProcessError:
        self._closed = True
        return StoreProcessError(f"core process gone: {type(exc).__name__}")

    def _wait_exit(self) -> None:
        try:
            self._proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._kill()

    def _kill(self) -> None:
        self._closed = True
        if self._channel is not None:
            self._channel.close()
        self._sock.close()
        self._proc.kill()
        self._proc.wait(STOP_TIMEOUT_S)


def _recv_frame(sock: socket.socket) -> bytes:
    try:
        return frames.recv_frame(sock, FRAME_BYTES_MAX)
    except ValueError as exc:
        raise StoreProcessError(str(exc)) from None


def _channel() -> Channel:
    gone = lambda why: StoreProcessError(f"core process gone: {why}")  # noqa: E731
    return Channel(gone, FRAME_BYTES_MAX)


def _serve(sock: socket.socket) -> None:
    """The child: open the core, then answer inputs until ``Close`` or a broken socket."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        path, seed, config, pipelined = corewire.read_open(_recv_frame(sock))
    except (OSError, CoreWireError):
        return  # the parent is gone
    try:
        core = FogCore.open(
            path,
            config=config,
            fog_key=nacl.signing.SigningKey(seed),
            durable_commits=not pipelined,
        )
        pipeline = Pipeline(core) if pipelined else None
    except BaseException as exc:  # the parent raises it
        frames.reply(sock, corewire.error_frame(exc))
        return
    del seed
    gc.collect()
    gc.freeze()  # as the daemon does once serving: full collections skip the start-up heap
    frames.reply(sock, corewire.outputs_frame([]))
    if pipeline is not None:
        _serve_pipelined(sock, pipeline)
        return
    while True:
        try:
            event = corewire.read_input(_recv_frame(sock))
        except (OSError, CoreWireError, StoreProcessError):
            break  # the parent is gone (or mad): nothing is half-done, each input is atomic
        try:
            frame = corewire.outputs_frame(core.handle(event))
        except Exception as exc:
            frame = corewire.error_frame(exc)
        if not frames.reply(sock, frame):
            break
        if isinstance(event, Close):
            return
    with contextlib.suppress(Exception):  # exiting anyway; SQLite's WAL keeps what committed
        core.handle(Close(now_ms=0))


def _serve_pipelined(sock: socket.socket, pipeline: Pipeline) -> None:
    """Read and handle inputs while sync threads make them durable and answer them (in
    order, under the pipeline's release lock: one sender at a time). ``Intents`` inputs that
    are already waiting on the socket when the core is free are decided as one (one
    transaction, up to ``MERGED_ARRIVALS_MAX`` arrivals) and answered as they came: the daemon
    sends each group as it forms, and the group that is decided is whatever came meanwhile,
    as with the commit in the loop (fewer, larger transactions under load)."""

    def send(answers: list[bytes]) -> None:  # on a sync thread: no Python work but the send
        frames.reply(sock, b"".join(answers))  # a parent gone: the reader below notices

    reader = frames.Frames(sock, FRAME_BYTES_MAX)
    held: FogInput | None = None
    while True:
        try:
            event = held if held is not None else corewire.read_input(reader.next())
            held = None
            group = [event]
            if isinstance(event, Intents):
                n = len(event.arrivals)
                while n < MERGED_ARRIVALS_MAX and (body := reader.ready()) is not None:
                    more = corewire.read_input(body)
                    if not isinstance(more, Intents) or n + len(more.arrivals) > (
                        MERGED_ARRIVALS_MAX
                    ):
                        held = more
                        break
                    group.append(more)
                    n += len(more.arrivals)
        except (OSError, ValueError, CoreWireError):
            break  # the parent is gone (or mad): what was handled is made durable, then Close
        if len(group) == 1:
            pipeline.submit(event, send, lambda result: [_encoded(result)])
        else:
            intents = [g for g in group if isinstance(g, Intents)]
            pipeline.submit(_merged(intents), send, _split(intents))
        if isinstance(event, Close):
            if pipeline.failed:
                os._exit(3)  # the connection stays unclosed: see Pipeline._close
            return
    if pipeline.failed:  # no checkpoint from a page cache that failed to write: exit as is
        os._exit(3)
    with contextlib.suppress(Exception):
        pipeline.submit(Close(now_ms=0), lambda _: None)


def _merged(group: list[Intents]) -> Intents:
    monos = [g.mono_ms for g in group if g.mono_ms is not None]
    return Intents(
        arrivals=tuple(a for g in group for a in g.arrivals),
        now_ms=max(g.now_ms for g in group),
        mono_ms=max(monos) if monos else None,
    )


def _split(group: list[Intents]) -> Callable[[list[FogOutput] | BaseException], list[bytes]]:
    """The answer of merged inputs, as the answer frames of each: its receipts, every
    ``Alarm`` (each input was declined with the group), the other outputs (a ``Wake``) with
    the last."""

    def answers(result: list[FogOutput] | BaseException) -> list[bytes]:
        if isinstance(result, BaseException):
            return [_encoded(result)] * len(group)
        receipts = [o for o in result if isinstance(o, Receipt)]
        alarms = [o for o in result if isinstance(o, Alarm)]
        rest: list[FogOutput] = [o for o in result if not isinstance(o, Receipt | Alarm)]
        assert len(receipts) == sum(len(g.arrivals) for g in group)
        out, at = [], 0
        for k, g in enumerate(group):
            part: list[FogOutput] = [*receipts[at : at + len(g.arrivals)], *alarms]
            at += len(g.arrivals)
            out.append(_encoded(part + rest if k == len(group) - 1 else part))
        return out

    return answers


def _encoded(result: list[FogOutput] | BaseException) -> bytes:
    if isinstance(result, BaseException):
        return corewire.error_frame(result)
    try:
        return corewire.outputs_frame(result)
    except Exception as exc:
        return corewire.error_frame(exc)


if __name__ == "__main__":
    _serve(socket.socket(fileno=int(sys.argv[1])))
