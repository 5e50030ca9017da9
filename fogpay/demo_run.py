"""Small pieces every ``fogpay demo`` topology uses (one fog: ``demo``; several:
``demo_fed``): the wall clock, a bounded MQTT connection, a bounded wait, and what a fog must
have loaded before the devices pay."""

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final

import structlog

from fogpay import demo_cast as cast
from fogpay.provision import BrokerAddress

log = structlog.get_logger()

CONNECT_TIMEOUT_S: Final = 10.0
POLL_S: Final = 0.1


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@contextlib.asynccontextmanager
async def mqtt_client(address: BrokerAddress, name: str) -> AsyncIterator[Any]:
    client = address.client(identifier=f"fogpay-demo-{name}-{secrets.token_hex(4)}")
    async with asyncio.timeout(CONNECT_TIMEOUT_S):
        await client.__aenter__()
    try:
        yield client
    finally:
        await client.__aexit__(None, None, None)


async def wait_for(what: str, check: Callable[[], Awaitable[bool]], seconds: float) -> bool:
    """Poll ``check`` every POLL_S until true or ``seconds`` passed; False then (logged)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if await check():
            return True
        await asyncio.sleep(POLL_S)
    log.error("wait_timed_out", what=what, seconds=seconds)
    return False


def trust_expected() -> dict[str, int]:
    """What the fog must have loaded before the devices pay (top-ups come on demand)."""
    return {
        "fog_accepted": 1,
        "owner_accepted": len(cast.owners()),
        "bind_accepted": len(cast.devices()),
        "revoke_accepted": 1,
        "lease_accepted": len(cast.PAYERS),  # the first lease of each paying owner
    }
