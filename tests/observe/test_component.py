"""Every log line names its component: read from the real output of a second process that
configures logging as the daemons do and logs from two tasks (a fog and a cloud in one
process, as the demo and the sandbox run them) and through amqtt's standard-library logger."""

import json
import subprocess
import sys
from typing import Final

TIMEOUT_S: Final = 30.0

SCRIPT: Final = """
import asyncio, logging
import structlog
from runtime.logs import bind_component, configure, route_stdlib_logging

configure(json=True, component="demo")
route_stdlib_logging(json=True, component="demo")
log = structlog.get_logger()

async def daemon(name):
    bind_component(name)
    log.info("daemon_started", name=name)
    async def child():
        log.info("child_ran", name=name)
    await asyncio.create_task(child())

async def main():
    log.info("demo_started")
    await asyncio.gather(daemon("fog"), daemon("cloud"))
    log.info("demo_stopped")
    logging.getLogger("amqtt.broker").warning("broker trouble")
    logging.getLogger("aiomqtt").warning("client trouble")
    structlog.get_logger(component="edge").info("device_paid")

asyncio.run(main())
"""


def test_every_line_carries_its_component() -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, timeout=TIMEOUT_S, check=True
    )
    lines = [json.loads(line) for line in done.stdout.decode().splitlines()]
    got = [(e["event"], e.get("name"), e["component"]) for e in lines]
    assert sorted(got, key=str) == sorted(
        [
            ("demo_started", None, "demo"),
            ("daemon_started", "fog", "fog"),
            ("child_ran", "fog", "fog"),
            ("daemon_started", "cloud", "cloud"),
            ("child_ran", "cloud", "cloud"),
            ("demo_stopped", None, "demo"),  # the daemons' bindings stayed in their tasks
            ("broker trouble", None, "broker"),
            ("client trouble", None, "demo"),
            ("device_paid", None, "edge"),  # a logger bound at creation keeps its own
        ],
        key=str,
    )
