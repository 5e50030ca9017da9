"""The fog's store in a child process: ``FogStore`` methods as calls over a pipe.

Why. The event loop (MQTT through aiomqtt/paho) and the store (decode, verify, authorize,
SQLite, sign) each cost a few hundred microseconds of Python per intent. On one thread pool
they share the GIL: each waits for the other, every verify or commit hands the GIL over and
waits to get it back, and at 1,000 intents/s the process ran near one core's worth of
GIL time (bench/fog.py). In a process of its own the store runs on another core, and the
loop never waits for it.

How. ``StoreProcess.start(...)`` starts ``python -m fog.storeproc`` (a fresh interpreter: no
fork of a process with threads and an event loop, and no re-import of the embedder's main
script as ``multiprocessing`` would do) with one end of a socket pair, sends it what it needs
to open ``FogStore``, and then the child serves one call at a time: ``(method, args,
kwargs)`` in, ``(True, result)`` or ``(False, exception)`` out, pickled by
``multiprocessing.connection.Connection`` over the socket pair. The daemon calls it from
its single store thread, exactly as it calls a ``FogStore`` there (``proxy.process`` is a
callable like ``store.process``), so the order of calls and the one-transaction-per-call
contract are unchanged.

Life and death. The child ignores SIGINT and SIGTERM (systemd signals the whole unit at once;
the parent decides when to stop: it drains the group in flight, then calls ``close``). It
exits after ``close`` or when the pipe breaks: if the parent is SIGKILLed, the child finishes
the call in hand (one SQLite transaction: all or nothing either way), finds the pipe gone and
exits. Intents are answered only by the parent, after the child returned the committed
outcome, so durability before the receipt holds as in the thread design.

Secrets. The fog key crosses as its 32-byte seed over the socket pair, never in argv or the
environment, and is never logged.
"""

import asyncio
import collections
import gc
import multiprocessing.connection
import pickle
import signal
import socket
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any, Final

import nacl.signing

from fog.authorize import Policy
from fog.childenv import child_env
from fog.schema import StoreError
from fog.store import Arrival, FogStore, Outcome

START_TIMEOUT_S: Final = 60.0
STOP_TIMEOUT_S: Final = 30.0
HEADER: Final = struct.Struct("!i")  # multiprocessing.connection's frame header (< 2 GiB)
FRAME_BYTES_MAX: Final = 256 * 1024 * 1024  # far above any call: a bigger size is a bug


class StoreProcessError(StoreError):
    """The store process died, or answered with something that cannot be read."""


class RemoteMethod:
    """``proxy.process`` etc.: called like the ``FogStore`` bound method (blocking), or
    awaited through ``StoreProcess.acall`` (the daemon's way, without a thread hop)."""

    __slots__ = ("__name__", "name", "proxy")

    def __init__(self, proxy: "StoreProcess", name: str) -> None:
        self.proxy = proxy
        self.name = name
        self.__name__ = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.proxy.call(self.name, *args, **kwargs)


class StoreProcess:
    """A ``FogStore`` living in a child process, which serves one call at a time: the
    blocking ``call`` from one thread, or ``acall`` from one event loop (calls written in
    the order made, answered in that order), not both."""

    def __init__(self, sock: socket.socket, proc: "subprocess.Popen[bytes]") -> None:
        self._sock = sock
        self._proc = proc
        self._closed = False
        self._channel: _Channel | None = None  # once an event loop calls (acall)
        self._opening: asyncio.Lock | None = None

    @classmethod
    def start(
        cls,
        path: str | Path,
        *,
        fog_id: str,
        fog_key: nacl.signing.SigningKey,
        issuer_key: bytes,
        policy: Policy,
    ) -> "StoreProcess":
        """Start the child and open the store there; raises what ``FogStore.open`` raised."""
        ours, theirs = socket.socketpair()
        env = child_env()
        with theirs:
            try:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "fog.storeproc", str(theirs.fileno())],
                    pass_fds=(theirs.fileno(),),
                    env=env,
                    stdin=subprocess.DEVNULL,
                )
            except BaseException:
                ours.close()
                raise
        store = cls(ours, proc)
        try:
            ours.settimeout(START_TIMEOUT_S)
            opening = pickle.dumps((str(path), fog_id, bytes(fog_key), issuer_key, policy))
            store._send_frame(HEADER.pack(len(opening)) + opening)
            store._answer(store._recv_frame())  # the child's open: None, or what it raised
            ours.settimeout(None)
        except TimeoutError:
            store._kill()
            raise StoreProcessError(f"store process not ready in {START_TIMEOUT_S:.0f} s") from None
        except BaseException:
            store._kill()
            raise
        return store

    @property
    def pid(self) -> int:
        return self._proc.pid

    def __getattr__(self, name: str) -> RemoteMethod:
        if name.startswith("_"):
            raise AttributeError(name)
        return RemoteMethod(self, name)

    # ---- blocking calls (one thread) ---------------------------------------------------

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if self._channel is not None:
            raise StoreProcessError("store process: called blocking after awaited calls")
        frame = self._request(method, args, kwargs)
        self._sock.setblocking(True)
        try:
            self._send_frame(frame)
            answer = self._recv_frame()
        except OSError as exc:
            raise self._gone(exc) from exc
        return self._finish(method, answer)

    def close(self) -> None:
        """Close the store in the child and wait for the child to exit (blocking; after
        awaited calls, ``await acall("close")`` instead)."""
        if self._closed:
            return
        if self._channel is not None:
            self._kill()
            return
        try:
            self.call("close")
        finally:
            self._closed = True
            self._sock.close()
            self._wait_exit()

    # ---- awaited calls (one event loop) ------------------------------------------------

    async def acall(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """``call`` without blocking the loop. Calls are written in the order they are made
        and the child answers them in that order (no waiting for one answer before sending
        the next). A cancelled caller's call still runs (the child commits or not, as a
        thread would); its answer is dropped."""
        frame = self._request(method, args, kwargs)
        channel = await self._channel_open()
        answer = await channel.send(frame)
        result = self._finish(method, answer)
        if method == "close":
            self._closed = True
            channel.close()
            await asyncio.get_running_loop().run_in_executor(None, self._wait_exit)
        return result

    async def _channel_open(self) -> "_Channel":
        if self._channel is not None:
            return self._channel
        if self._opening is None:  # calls made while the channel opens queue here, in order
            self._opening = asyncio.Lock()
        async with self._opening:
            if self._channel is None:
                self._sock.setblocking(False)
                loop = asyncio.get_running_loop()
                _, channel = await loop.connect_accepted_socket(_Channel, sock=self._sock)
                self._channel = channel
        return self._channel

    # ---- frames: 4-byte big-endian length + pickle (multiprocessing.connection's) ------

    def _request(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
        if self._closed:
            raise StoreProcessError("store process closed")
        if method == "process":  # the hot path: plain tuples pickle several times faster
            args = ([(a.topic_device, a.payload) for a in args[0]],)
        payload = pickle.dumps((method, args, kwargs), protocol=pickle.HIGHEST_PROTOCOL)
        return HEADER.pack(len(payload)) + payload

    def _finish(self, method: str, answer: bytes) -> Any:
        result = self._answer(answer)
        if method == "process":
            return [Outcome(*fields) for fields in result]
        return result

    def _answer(self, answer: bytes) -> Any:
        try:
            ok, value = pickle.loads(answer)
        except Exception as exc:
            raise StoreProcessError(f"unreadable answer: {type(exc).__name__}") from exc
        if ok:
            return value
        raise value

    def _send_frame(self, frame: bytes) -> None:
        self._sock.sendall(frame)

    def _recv_frame(self) -> bytes:
        return self._recv_exactly(self._frame_size(self._recv_exactly(HEADER.size)))

    def _recv_exactly(self, n: int) -> bytes:
        buf = bytearray(n)
        view, got = memoryview(buf), 0
        while got < n:
            k = self._sock.recv_into(view[got:])
            if k == 0:
                raise ConnectionResetError("store process closed the socket")
            got += k
        return bytes(buf)

    @staticmethod
    def _frame_size(head: bytes) -> int:
        (size,) = HEADER.unpack(head)
        if not 0 <= size <= FRAME_BYTES_MAX:
            raise StoreProcessError(f"bad frame size {size}")
        return int(size)

    def _gone(self, exc: BaseException) -> StoreProcessError:
        self._closed = True
        return StoreProcessError(f"store process gone: {type(exc).__name__}")

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


class _Channel(asyncio.Protocol):
    """The parent's end on the event loop: frames out, answers matched to calls in order."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._waiting: collections.deque[asyncio.Future[bytes]] = collections.deque()
        self._lost: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def send(self, frame: bytes) -> "asyncio.Future[bytes]":
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        if self._lost is not None or self._transport is None:
            future.set_exception(StoreProcessError(f"store process gone: {self._lost}"))
            return future
        self._waiting.append(future)
        self._transport.write(frame)
        return future

    def data_received(self, data: bytes) -> None:
        self._buf += data
        while len(self._buf) >= HEADER.size:
            (size,) = HEADER.unpack_from(self._buf)
            if not 0 <= size <= FRAME_BYTES_MAX or not self._waiting:
                self._fail(f"unexpected frame of {size} bytes")
                return
            if len(self._buf) < HEADER.size + size:
                return
            answer = bytes(self._buf[HEADER.size : HEADER.size + size])
            del self._buf[: HEADER.size + size]
            future = self._waiting.popleft()
            if not future.done():  # a cancelled caller: the answer is dropped
                future.set_result(answer)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(type(exc).__name__ if exc else "socket closed")

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def _fail(self, why: str) -> None:
        self._lost = self._lost or why
        while self._waiting:
            future = self._waiting.popleft()
            if not future.done():
                future.set_exception(StoreProcessError(f"store process gone: {why}"))
        self.close()


def _serve(conn: multiprocessing.connection.Connection) -> None:
    """The child: open the store, then answer calls until ``close`` or a broken pipe."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        path, fog_id, seed, issuer_key, policy = conn.recv()
    except (OSError, EOFError):
        return  # the parent is gone
    try:
        store = FogStore.open(
            path,
            fog_id=fog_id,
            fog_key=nacl.signing.SigningKey(seed),
            issuer_key=issuer_key,
            policy=policy,
        )
    except BaseException as exc:  # the parent raises it
        _reply(conn, False, exc)
        return
    del seed
    gc.collect()
    gc.freeze()  # as the daemon does once serving: full collections skip the start-up heap
    _reply(conn, True, None)
    while True:
        try:
            method, args, kwargs = conn.recv()
        except (OSError, EOFError):
            break  # the parent is gone: nothing is half-done, every call is one transaction
        try:
            if method == "process":
                arrivals = [Arrival(device, payload) for device, payload in args[0]]
                outcomes = store.process(arrivals, **kwargs)
                result: Any = [_fields(o) for o in outcomes]
            else:
                result = getattr(store, method)(*args, **kwargs)
        except Exception as exc:
            if not _reply(conn, False, exc):
                break
            continue
        if not _reply(conn, True, result):
            break
        if method == "close":
            return
    _close_quietly(store)


def _fields(o: Outcome) -> tuple[Any, ...]:
    return (
        o.receipt,
        o.status,
        o.reason,
        o.replay,
        o.intent_id,
        o.device,
        o.seq,
        o.owner_id,
        o.amount_micros,
        o.log_index,
        o.detail,
    )


def _reply(conn: multiprocessing.connection.Connection, ok: bool, value: Any) -> bool:
    """Send a result; an exception that does not pickle goes as a StoreError with its text.
    False when the parent is gone."""
    try:
        try:
            conn.send((ok, value))
        except (pickle.PicklingError, TypeError, AttributeError):
            conn.send((False, StoreError(f"{type(value).__name__}: {value}")))
    except (OSError, EOFError):
        return False
    return True


def _close_quietly(store: FogStore) -> None:
    """The parent vanished between calls: close the connection (no transaction is open)."""
    try:
        store.close()
    except Exception:  # exiting anyway; SQLite's WAL keeps what committed
        return


if __name__ == "__main__":
    _serve(multiprocessing.connection.Connection(int(sys.argv[1])))
