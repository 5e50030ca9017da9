"""Run a real FogDaemon in-process for a test, and wait on its counters (bounded)."""

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Final

from fog.config import load_config
from fog.daemon import FogDaemon

READY_TIMEOUT_S: Final = 10.0
STOP_TIMEOUT_S: Final = 15.0
WAIT_TIMEOUT_S: Final = 10.0
POLL_S: Final = 0.01


@contextlib.asynccontextmanager
async def running_fog(
    config_path: Path, *, clock: Callable[[], int] | None = None
) -> AsyncIterator[FogDaemon]:
    config = load_config(config_path)
    daemon = FogDaemon(config) if clock is None else FogDaemon(config, clock=clock)
    ready = asyncio.Event()
    task = asyncio.create_task(daemon.run(ready=ready), name="test.fog")
    try:
        async with asyncio.timeout(READY_TIMEOUT_S):
            waiter = asyncio.create_task(ready.wait())
            done, _ = await asyncio.wait({waiter, task}, return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                waiter.cancel()
                task.result()
                raise AssertionError("fog exited before ready")
        yield daemon
    finally:
        await daemon.stop()
        async with asyncio.timeout(STOP_TIMEOUT_S):
            await task


async def wait_for(predicate: Callable[[], bool], *, timeout_s: float = WAIT_TIMEOUT_S) -> None:
    """Poll ``predicate`` until true; TimeoutError after ``timeout_s``."""
    async with asyncio.timeout(timeout_s):
        while not predicate():  # noqa: ASYNC110 (counters have no event to await)
            await asyncio.sleep(POLL_S)


async def wait_counter(daemon: FogDaemon, name: str, at_least: int = 1) -> None:
    await wait_for(lambda: daemon.counters.get(name, 0) >= at_least)
