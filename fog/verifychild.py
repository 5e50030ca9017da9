"""A verify worker's process (``python -m fog.verifychild FD``, started by
fog/verifyproc.py's ``VerifyPool``): reads frames of intent payloads from its socket pair and
answers one byte per payload, 1 when its signature verifies. Imports the protocol package,
msgpack and fog/frames.py only (no asyncio, nothing of the fog's state): about 20 MB."""

import signal
import socket
import sys
from typing import Final

import msgpack

from fog import frames
from protocol.limits import INTENT_ENVELOPE_BYTES_MAX
from protocol.messages import Intent
from protocol.signing import signatures_verify

PAYLOADS_MAX: Final = 4096  # per frame (the daemon's groups are up to 256)
FRAME_BYTES_MAX: Final = PAYLOADS_MAX * (INTENT_ENVELOPE_BYTES_MAX + 8) + 16


def verdict_bytes(payloads: object) -> bytes:
    """The child's answer to one frame's decoded body: a byte per payload, 1 when its
    signature verifies (``protocol.signing.signatures_verify``), 0 otherwise (not bytes,
    not an envelope, not an intent, a bad signature)."""
    if type(payloads) is not list or len(payloads) > PAYLOADS_MAX:
        raise ValueError("not a list of payloads")
    return bytes(signatures_verify(payloads, Intent))


def _serve(sock: socket.socket) -> None:
    """The child: say ready, then answer frames until the socket closes (the parent is gone
    or closed the pool) or a frame is not a list of payloads (the parent is mad)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if not frames.reply(sock, frames.HEADER.pack(0)):
        return
    reader = frames.Frames(sock, FRAME_BYTES_MAX)
    while True:
        try:
            body = reader.next()
            payloads = msgpack.unpackb(
                body,
                raw=False,
                max_bin_len=INTENT_ENVELOPE_BYTES_MAX,
                max_array_len=PAYLOADS_MAX,
                max_str_len=0,
                max_map_len=0,
                max_ext_len=0,
            )
            answer = verdict_bytes(payloads)
        except Exception:  # the socket broke, or the parent sent nonsense: exit
            return
        if not frames.reply(sock, frames.HEADER.pack(len(answer)) + answer):
            return


if __name__ == "__main__":
    _serve(socket.socket(fileno=int(sys.argv[1])))
