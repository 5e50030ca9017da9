"""The do-nothing baseline of bench/fog.py: answers every intent with a fixed payload.

Same broker, same client library and settings as the fog, so the difference between the two
is what the fog does per intent (verify, authorize, commit, sign). Run as its own process:
    python bench/responder.py --host 127.0.0.1 --port N --fog-id F
"""

import sys
from pathlib import Path

# The project before bench/ on the path: bench/fog.py would shadow the fog package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import asyncio
import contextlib
import signal
import socket

import aiomqtt

FIXED_RECEIPT = b"\x94\xa7receipt\xc4\x00\xc4\x20" + bytes(32) + b"\xc4\x40" + bytes(64)
RECEIPT_INFLIGHT_MAX = 1000


async def serve(host: str, port: int, fog_id: str, user: str | None, password: str | None) -> None:
    async with aiomqtt.Client(
        host,
        port,
        username=user,
        password=password,
        identifier=f"bench-responder-{fog_id}",
        max_inflight_messages=RECEIPT_INFLIGHT_MAX,
        socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
    ) as client:
        client.pending_calls_threshold = RECEIPT_INFLIGHT_MAX  # as the fog: many in flight
        await client.subscribe(f"fogpay/1/{fog_id}/intent/+", qos=1)
        pending: set[asyncio.Task[None]] = set()
        async for message in client.messages:
            device_hex = str(message.topic).rsplit("/", 1)[-1]
            task = asyncio.create_task(
                client.publish(f"fogpay/1/{fog_id}/receipt/{device_hex}", FIXED_RECEIPT, qos=1)
            )
            pending.add(task)
            task.add_done_callback(pending.discard)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--fog-id", required=True)
    ap.add_argument("--username")
    ap.add_argument("--password")
    args = ap.parse_args()
    loop = asyncio.new_event_loop()
    task = loop.create_task(serve(args.host, args.port, args.fog_id, args.username, args.password))
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        loop.run_until_complete(task)


if __name__ == "__main__":
    main()
