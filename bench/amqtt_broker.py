"""A standalone amqtt broker configured exactly as the fog's embedded one, for the baseline
responder of bench/fog.py:  python bench/amqtt_broker.py --port N --password P"""

import sys
from pathlib import Path

# The project before bench/ on the path: bench/fog.py would shadow the fog package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import asyncio
import contextlib
import signal

from fog.broker import EmbeddedBroker
from fog.config import BrokerConfig


async def serve(port: int, password: str) -> None:
    broker = EmbeddedBroker(
        BrokerConfig(
            port=port, password=password, device_username="device", device_password=password
        )
    )
    await broker.start()
    try:
        await asyncio.Event().wait()
    finally:
        await broker.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--password", required=True)
    args = ap.parse_args()
    loop = asyncio.new_event_loop()
    task = loop.create_task(serve(args.port, args.password))
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        loop.run_until_complete(task)


if __name__ == "__main__":
    main()
