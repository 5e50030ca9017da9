"""The embedded amqtt broker: a loopback, trusted-client default, and the MQTT client settings.

What amqtt 0.12.1 can be trusted with (tried against the Eclipse Paho interoperability suite
and by hand): it speaks MQTT 3.1.1 only; on every CONNECT it sends the retained messages of
every subscription past topic ACLs; a client with a wrong password can disrupt another
client's session; it drops a QoS 1 delivery not acknowledged within 5 s; it never enforces
keep-alive; it bounds neither packet sizes nor queues; and ``AnonymousAuthPlugin`` marks
sessions anonymous, which purges persistent sessions at once. Hence:

- it binds loopback unless ``broker.allow_public_bind`` forces otherwise (warned at every start);
- ``fog.brokerauth`` checks logins against the config's accounts and the accounts file (one
  per device, roles and topic ACLs), never marks a session anonymous, and closes amqtt's
  holes with retained messages, client ids and denied publishes (its docstring);
- the application bounds payload sizes (the daemon declines oversized intents unread);
- the fog republishes the trust material it keeps in SQLite at start instead of trusting
  amqtt's (absent) persistence;
- QoS is best effort: end-to-end receipts and idempotent retransmission carry reliability.

Mosquitto (``deploy/mosquitto/``) is the production broker.

``BrokerProcess`` runs the same broker in a child process (``python -m fog.broker``; the
default, ``broker.process = true``): amqtt costs more CPU per message than the fog's own MQTT
client, and on the fog's event loop the two shared one GIL. The child reads its configuration
(passwords included) as one JSON line on stdin, never from argv or the environment, answers
with one JSON line on stdout (``{"port": N}`` once listening, or ``{"error": "..."}``), logs
JSON lines on stderr, and shuts down on SIGTERM or when its stdin closes (its fog is gone).
"""

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import sys
from typing import Any, Final

import structlog
from amqtt.broker import Broker

from fog import brokerauth
from fog.childenv import child_env
from fog.config import BrokerConfig
from protocol.errors import FogpayError

log = structlog.get_logger()

# Nagle's algorithm plus delayed ACKs turned a sub-millisecond round trip into 44-88 ms.
LISTENER_CONNECTIONS_MAX: Final = 10_000
PROCESS_START_TIMEOUT_S: Final = 30.0
PROCESS_STOP_TIMEOUT_S: Final = 15.0


def amqtt_config(broker: BrokerConfig) -> dict[str, Any]:
    """The amqtt configuration: one TCP listener, our auth plugin, no default plugin set
    (amqtt 0.12's default set allows anonymous access and warns with DeprecationWarning)."""
    if broker.device_username == broker.username:
        raise AssertionError("config check lets no device account shadow the fog's")
    host = f"[{broker.host}]" if ":" in broker.host else broker.host
    return {
        "listeners": {
            "default": {
                "type": "tcp",
                "bind": f"{host}:{broker.port}",
                "max_connections": LISTENER_CONNECTIONS_MAX,
            }
        },
        "plugins": brokerauth.plugins_config(config_accounts(broker), broker.accounts_file),
    }


def config_accounts(broker: BrokerConfig) -> dict[str, brokerauth.Account]:
    """The config's accounts: the fog's own (operator) and the legacy shared device account
    (none when ``device_password`` is empty)."""
    accounts = {
        broker.username: brokerauth.Account(
            broker.username, brokerauth.ROLE_OPERATOR, brokerauth.digest(broker.password)
        )
    }
    if broker.device_password:
        accounts[broker.device_username] = brokerauth.Account(
            broker.device_username,
            brokerauth.ROLE_SHARED_DEVICE,
            brokerauth.digest(broker.device_password),
        )
    return accounts


def warn_if_public(config: BrokerConfig) -> None:
    """At every start of a broker bound beyond loopback (``broker.allow_public_bind``), or
    with the legacy shared device account (every topic: ``fog.brokerauth``)."""
    if config.device_password:
        log.warning("broker_shared_account", username=config.device_username)
    if config.allow_public_bind:
        log.warning(
            "broker_public_bind_forced",
            host=config.host,
            note="amqtt is fit only for loopback trusted clients; use Mosquitto",
        )


class EmbeddedBroker:
    """An amqtt broker bound as the config says; ``port`` is the port actually bound."""

    def __init__(self, config: BrokerConfig) -> None:
        assert config.embedded
        self._config = config
        self._broker: Broker | None = None
        self.port = 0

    async def start(self) -> None:
        warn_if_public(self._config)
        broker = brokerauth.HardenedBroker(amqtt_config(self._config))
        await broker.start()
        self._broker = broker
        self.port = _bound_port(broker)
        log.info("broker_started", host=self._config.host, port=self.port, kind="amqtt")

    async def stop(self) -> None:
        broker, self._broker = self._broker, None
        if broker is not None:
            await broker.shutdown()
            log.info("broker_stopped", port=self.port)


def _bound_port(broker: Broker) -> int:
    server = broker._servers["default"].instance  # amqtt keeps asyncio.Server here
    sockets = getattr(server, "sockets", None)
    assert sockets, "amqtt listener has no socket"
    port: int = sockets[0].getsockname()[1]
    return port


class BrokerProcess:
    """``EmbeddedBroker`` in a child process: same configuration, same ``start``/``stop``/
    ``port``. ``start`` raises ``BrokerStartError`` with the child's reason (port in use...)."""

    def __init__(self, config: BrokerConfig) -> None:
        assert config.embedded
        self._config = config
        self._proc: asyncio.subprocess.Process | None = None
        self.port = 0

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
                "fog.broker",
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
        log.info(
            "broker_started", host=self._config.host, port=self.port, kind="amqtt", pid=proc.pid
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


async def _serve_child(answer_fd: int) -> int:
    """The child: configuration from stdin, the port (or the error) on ``answer_fd``, then
    serve until SIGTERM or stdin's end."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    config = BrokerConfig(**json.loads(await reader.readline()))
    broker = EmbeddedBroker(config)
    try:
        await broker.start()
    except Exception as exc:  # amqtt wraps OSError (address in use...) in BrokerError
        _answer(answer_fd, {"error": str(exc.__cause__ or exc)})
        return 1
    _answer(answer_fd, {"port": broker.port})
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, lambda: None)  # the fog decides when to stop
    eof = asyncio.ensure_future(reader.read())  # the fog closed our stdin, or died
    done = asyncio.ensure_future(stop.wait())
    await asyncio.wait({eof, done}, return_when=asyncio.FIRST_COMPLETED)
    eof.cancel()
    done.cancel()
    await broker.stop()
    return 0


def _answer(fd: int, obj: dict[str, Any]) -> None:
    os.write(fd, json.dumps(obj).encode() + b"\n")
    os.close(fd)


if __name__ == "__main__":
    from runtime.logs import configure, route_stdlib_logging

    configure(json=True, level="warning", component="broker")  # the fog logs start, stop
    route_stdlib_logging(json=True, component="broker")
    sys.exit(asyncio.run(_serve_child(int(sys.argv[1]))))
