"""Length-prefixed frames between the fog daemon and its child processes over a socket pair.

Used by the core's process (fog/storeproc.py) and the verify workers (fog/verifychild.py): a
frame is a 4-byte big-endian length (``HEADER``) and that many bytes. The parent's end is a
``fog.channel.Channel`` on its event loop; a child reads with ``Frames`` (blocking) and
answers with ``reply``. Light on purpose (no asyncio, no project import): a verify worker
imports this, the protocol package and nothing else.
"""

import socket
import struct
from typing import Final

HEADER: Final = struct.Struct("!I")
RECV_BYTES: Final = 1 << 16


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
