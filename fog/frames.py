"""Length-prefixed frames between the fog daemon and its child processes over a socket pair.

Used by the core's process (fog/storeproc.py) and the verify workers (fog/verifyproc.py): a
frame is a 4-byte big-endian length (``HEADER``) and that many bytes. The parent's end is a
``Channel`` on its event loop (frames out, answers matched to them in order); a child reads
with ``Frames`` (blocking) and answers with ``reply``. Light on purpose (no project import
beyond this module): a verify worker imports this, the protocol package and nothing else.
"""

import asyncio
import collections
import socket
import struct
from collections.abc import Callable
from typing import Final

HEADER: Final = struct.Struct("!I")
RECV_BYTES: Final = 1 << 16


class Channel(asyncio.Protocol):
    """The parent's end on the event loop: frames out, answers matched to them in order.
    ``gone(why)`` makes the exception every waiting (and later) caller gets once the child
    is gone; an answer past ``frame_max`` bytes, or one nobody asked for, is the child gone
    mad: the channel fails and closes."""

    def __init__(self, gone: Callable[[str], Exception], frame_max: int) -> None:
        self._gone = gone
        self._frame_max = frame_max
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._waiting: collections.deque[asyncio.Future[bytes]] = collections.deque()
        self._lost: str | None = None

    @property
    def lost(self) -> str | None:
        return self._lost

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def send(self, frame: bytes) -> "asyncio.Future[bytes]":
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        if self._lost is not None or self._transport is None:
            future.set_exception(self._gone(self._lost or "not connected"))
            return future
        self._waiting.append(future)
        self._transport.write(frame)
        return future

    def data_received(self, data: bytes) -> None:
        self._buf += data
        while len(self._buf) >= HEADER.size:
            (size,) = HEADER.unpack_from(self._buf)
            if size > self._frame_max or not self._waiting:
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
                future.set_exception(self._gone(why))
        self.close()


class Frames:
    """A child's reader: the next whole frame (waiting for it), or one already arrived.
    ``next`` raises ``ConnectionResetError`` when the parent closed the socket and
    ``ValueError`` for a frame past ``frame_max`` bytes."""

    def __init__(self, sock: socket.socket, frame_max: int) -> None:
        self._sock = sock
        self._frame_max = frame_max
        self._buf = bytearray()

    def next(self) -> bytes:
        while (body := self._take()) is None:
            data = self._sock.recv(RECV_BYTES)
            if not data:
                raise ConnectionResetError("the other end closed the socket")
            self._buf += data
        return body

    def ready(self) -> bytes | None:
        body = self._take()
        if body is None:
            try:
                data = self._sock.recv(RECV_BYTES, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return None
            if not data:
                return None  # closed: next() says so
            self._buf += data
            body = self._take()
        return body

    def _take(self) -> bytes | None:
        if len(self._buf) < HEADER.size:
            return None
        (size,) = HEADER.unpack_from(self._buf)
        if size > self._frame_max:
            raise ValueError(f"bad frame size {size}")
        if len(self._buf) < HEADER.size + size:
            return None
        body = bytes(self._buf[HEADER.size : HEADER.size + size])
        del self._buf[: HEADER.size + size]
        return body


def recv_frame(sock: socket.socket, frame_max: int) -> bytes:
    """One frame, blocking (the parent's start-up handshake); ``ValueError`` past
    ``frame_max``, ``ConnectionResetError`` when the other end closed."""
    (size,) = HEADER.unpack(_recv_exactly(sock, HEADER.size))
    if size > frame_max:
        raise ValueError(f"bad frame size {size}")
    return _recv_exactly(sock, size)


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise ConnectionResetError("the other end closed the socket")
        got += k
    return bytes(buf)


def reply(sock: socket.socket, frame: bytes) -> bool:
    """Send an answer; False when the parent is gone."""
    try:
        sock.sendall(frame)
    except OSError:
        return False
    return True
