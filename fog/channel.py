"""The parent's end of a child process's socket pair on the event loop (fog/frames.py's
frames): frames out, answers matched to them in order."""

import asyncio
import collections
from collections.abc import Callable

from fog.frames import HEADER


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
