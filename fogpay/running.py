"""Run long-lived components (fog daemon, cloud service, mirror...) side by side in one
process, each a named task with a bounded start and a bounded, graceful stop.

``async with running("fog", with_ready(daemon.run), daemon.stop) as task:`` starts the task,
waits until it sets its ``ready`` event (or fails, or ``READY_TIMEOUT_S`` passes), and at
the end of the block calls ``stop()`` and waits ``STOP_TIMEOUT_S`` for the task before
cancelling it. Used by ``fogpay demo`` and ``fogpay sandbox``.
"""

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, Final

import structlog

from protocol.errors import FogpayError

log = structlog.get_logger()

READY_TIMEOUT_S: Final = 30.0
STOP_TIMEOUT_S: Final = 30.0

Runner = Callable[[asyncio.Event], Coroutine[Any, Any, None]]


class ComponentError(FogpayError):
    """A component did not start."""


def with_ready(run: Callable[..., Coroutine[Any, Any, None]]) -> Runner:
    """For ``run(*, ready: asyncio.Event | None)`` methods (FogDaemon, CloudService...)."""
    return lambda ready: run(ready=ready)


def ready_at_once(run: Callable[[], Awaitable[None]]) -> Runner:
    """For a ``run()`` with no readiness of its own: ready as soon as it starts."""

    async def wrapped(ready: asyncio.Event) -> None:
        ready.set()
        await run()

    return wrapped


@contextlib.asynccontextmanager
async def running(
    name: str, run: Runner, stop: Callable[[], Awaitable[None]]
) -> AsyncIterator["asyncio.Task[None]"]:
    ready = asyncio.Event()
    task = asyncio.create_task(run(ready), name=name)
    waiter = asyncio.create_task(ready.wait(), name=f"{name}.ready")
    try:
        done, _ = await asyncio.wait(
            {waiter, task}, timeout=READY_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED
        )
        if waiter not in done:
            if task in done:
                task.result()  # raises what stopped it
            raise ComponentError(f"{name}: not ready within {READY_TIMEOUT_S:g} s")
        yield task
    finally:
        waiter.cancel()
        await stop()
        try:
            async with asyncio.timeout(STOP_TIMEOUT_S):
                await task
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            log.error("component_stop_timed_out", component=name)
