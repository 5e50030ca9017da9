"""A fog cancelled while its store process is still starting leaves nothing behind.

CI once failed on ResourceWarnings ("subprocess N is still running", an unclosed socketpair)
raised in a test that had nothing to do with them: on a loaded machine a fog's store took
30 s to open, the test's timeout cancelled ``FogDaemon.run`` meanwhile, and the core the worker
thread went on to open was never closed. Now the daemon closes it once it is open."""

import asyncio
import gc
import os
import threading
import time
from pathlib import Path

import nacl.signing

from fog.config import load_config
from fog.daemon import FogDaemon
from protocol.signing import public_key
from tests.integration.devices import write_fog_files
from tests.integration.test_fog_end_to_end import AMQTT

WAIT_S = 20.0


def _children() -> set[int]:
    out: set[int] = set()
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        try:
            out.update(int(c) for c in (task / "children").read_text().split())
        except OSError:
            continue
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


async def test_a_fog_cancelled_while_its_store_opens_closes_the_store_it_opened(
    tmp_path: Path,
) -> None:
    issuer = public_key(nacl.signing.SigningKey.generate())
    config = load_config(
        write_fog_files(
            tmp_path,
            fog_id="fog-a",
            issuer_key=issuer,
            broker=AMQTT.broker_toml,
            extra=AMQTT.top,  # the store in its own process
        )
    )
    assert config.store_process
    before = _children()
    daemon = FogDaemon(config)
    task = asyncio.create_task(daemon.run())
    await asyncio.sleep(0)  # run() has handed the opening to its worker thread
    await asyncio.sleep(0.05)
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    end = time.monotonic() + WAIT_S
    started: set[int] = set()
    while time.monotonic() < end:  # bounded: the store process starts, then is closed
        started |= _children() - before
        closers = [t for t in threading.enumerate() if t.name == "fog.close-unused"]
        if started and not closers and not any(_alive(p) for p in started):
            break
        await asyncio.sleep(0.05)
    assert started, "the store process never started: the test proves nothing"
    assert not any(_alive(p) for p in started), "the store process of a cancelled fog runs on"
    gc.collect()  # an unclosed socket or a running Popen would warn here (warnings are errors)
