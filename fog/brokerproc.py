"""The embedded broker in a child process (``python -m fog.brokerchild``; the default,
``broker.process = true``), as the fog's daemon sees it: start it, learn its port, watch it,
stop it. This module imports no amqtt: the daemon runs the broker in the child and does not
carry amqtt's modules itself (5 MB of resident memory; bench/memory.py). ``fog.broker`` holds
the broker (``EmbeddedBroker``) and the child's side, and re-exports what is here.

amqtt costs more CPU per message than the fog's own MQTT client, and on the fog's event loop
the two shared one GIL. The child reads its configuration (passwords included) as one JSON
line on stdin, never from argv or the environment, answers with one JSON line on stdout
(``{"port": N}`` once listening, or ``{"error": "..."}``), logs JSON lines on stderr, and
shuts down on SIGTERM or when its stdin closes (its fog is gone).
"""

import asyncio
import contextlib
import dataclasses
import json
import os
import sys
from typing import Final

import structlog

from fog.childenv import child_env
from fog.config import BrokerConfig
from protocol.errors import FogpayError

log = structlog.get_logger()

PROCESS_START_TIMEOUT_S: Final = 30.0
PROCESS_STOP_TIMEOUT_S: Final = 15.0


def warn_if_public(config: BrokerConfig) -> None:
    """At every start of a broker bound beyond loopback (``broker.allow_public_bind``), or
    with the legacy shared device account (every device's intents and receipts:
    ``fog.brokerauth``)."""
    if config.device_password:
        log.warning("broker_shared_account", username=config.device_username)
    if config.allow_public_bind:
        log.warning(
            "broker_public_bind_forced",
            host=config.host,
            note="amqtt is fit only for loopback trusted clients; use Mosquitto",
        )


class BrokerProcess:
    """``EmbeddedBroker`` in a child process: same configuration, same ``start``/``stop``/
    ``port``. ``start`` raises ``BrokerStartError`` with the child's reason (port in use...)."""

    def __init__(self, config: BrokerConfig) -> None:
        assert config.embedded
        self._config = config
        self._proc: asyncio.subprocess.Process | None = None
        self.port = 0
        self.tls_port: int | None = None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    async def start(self) -> None:
        warn_if_public(self._config)
        env = child_env()
        answers, theirs = os.pipe()  # the child's answer; its stdout is the fog's (logs)
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "fog.brokerchild",
                str(theirs),
                stdin=asyncio.subprocess.PIPE,
                pass_fds=(theirs,),
                env=env,
            )
        except BaseException:
            os.close(answers)
            raise
        finally:
            os.close(theirs)
        self._proc = proc
        assert proc.stdin is not None
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        pipe = os.fdopen(answers, "rb", buffering=0)
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), pipe
        )
        try:
            # warned above already: the child need not say it again
            config = dataclasses.replace(self._config, allow_public_bind=False)
            proc.stdin.write(json.dumps(dataclasses.asdict(config)).encode() + b"\n")
            await proc.stdin.drain()
            async with asyncio.timeout(PROCESS_START_TIMEOUT_S):
                line = await reader.readline()
            answer = json.loads(line) if line.strip() else {"error": "exited at start"}
        except (OSError, TimeoutError, ValueError) as exc:
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            transport.close()
        if "port" not in answer:
            await self._end(kill=True)
            raise BrokerStartError(str(answer.get("error", "no answer")))
        self.port = int(answer["port"])
        self.tls_port = None if answer.get("tls_port") is None else int(answer["tls_port"])
        log.info(
            "broker_started",
            host=self._config.host,
            port=self.port,
            tls_port=self.tls_port,
            kind="amqtt",
            pid=proc.pid,
        )

    async def stop(self) -> None:
        if self._proc is not None:
            await self._end(kill=False)
            log.info("broker_stopped", port=self.port)

    async def exited(self) -> int:
        """Wait until the broker process exits (of itself: ``stop`` forgets it); its code."""
        proc = self._proc
        assert proc is not None, "not started"
        return await proc.wait()

    async def _end(self, *, kill: bool) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                if kill:
                    proc.kill()
                else:
                    proc.terminate()
        try:
            async with asyncio.timeout(PROCESS_STOP_TIMEOUT_S):
                await proc.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


class BrokerStartError(Exception):
    """The broker process could not listen (the message is its reason)."""


class BrokerLostError(FogpayError):
    """The embedded broker's process exited while the fog was running."""
