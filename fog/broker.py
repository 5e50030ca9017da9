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
- the application bounds payload sizes (the daemon declines oversized intents unread), and
  ``LimitedBroker`` below bounds every connection: a packet longer than
  ``broker.packet_bytes_max`` closes it before its body is read, and past
  ``broker.inflight_max`` QoS 1 PUBLISHes read and not yet acknowledged it stops reading that
  connection (TCP pushes back on the sender alone) until acknowledgements catch up; with
  ``broker.packets_per_s`` set, every connection but the fog's own reads at most that many
  packets a second (one second of burst);
- a TLS listener (``broker.tls_port``) beside the loopback one, TLS 1.2 at least; client
  certificates are required (and checked against ``broker.tls_ca_file``) when that is set;
- the fog republishes the trust material it keeps in SQLite at start instead of trusting
  amqtt's (absent) persistence;
- QoS is best effort: end-to-end receipts and idempotent retransmission carry reliability.

Mosquitto (``deploy/mosquitto/``) is the production broker.

``BrokerProcess`` (``fog.brokerproc``, re-exported here) runs the same broker in a child process
(``python -m fog.brokerchild``, whose side is ``_serve_child`` below; the default,
``broker.process = true``).
"""

import asyncio
import contextlib
import json
import os
import signal
import ssl
import sys
import time
from collections.abc import Callable
from typing import Any, Final

import structlog
from amqtt.adapters import StreamReaderAdapter, StreamWriterAdapter
from amqtt.broker import Action, Broker
from amqtt.errors import BrokerError

from fog import brokerauth
from fog.brokerproc import (  # re-exported: fog.broker is where callers look for them
    BrokerLostError,
    BrokerProcess,
    BrokerStartError,
    warn_if_public,
)
from fog.config import BrokerConfig

__all__ = [
    "BrokerLostError",
    "BrokerProcess",
    "BrokerStartError",
    "EmbeddedBroker",
    "PacketTooLargeError",
    "amqtt_config",
    "config_accounts",
    "warn_if_public",
]

log = structlog.get_logger()

# Nagle's algorithm plus delayed ACKs turned a sub-millisecond round trip into 44-88 ms.
LISTENER_CONNECTIONS_MAX: Final = 10_000
# inflight_max reached: wait this long for acknowledgements, then read on (a PUBLISH the
# broker never acknowledges, refused by an ACL, must not stall a connection for ever)
INFLIGHT_WAIT_S: Final = 5.0
_CONNECT: Final = 1
_PUBLISH: Final = 3
_ACKS: Final = frozenset({0x40, 0x50})  # PUBACK, PUBREC: the broker took a QoS 1/2 PUBLISH


class PacketTooLargeError(Exception):
    """A client announced a packet over ``broker.packet_bytes_max``: its connection closes.
    (Not an amqtt MQTTError: amqtt would skip the packet and read on.)"""


class _ConnectionLimits:
    """The MQTT framing of one connection as the broker reads it, byte by byte: the fixed
    header's remaining length is checked before the body is read, and QoS 1/2 PUBLISHes are
    counted until the broker writes their PUBACK/PUBREC."""

    def __init__(
        self,
        packet_bytes_max: int,
        inflight_max: int,
        *,
        packets_per_s: int = 0,
        exempt: frozenset[str] = frozenset(),
    ) -> None:
        self.packet_bytes_max = packet_bytes_max
        self.inflight_max = inflight_max
        self.inflight = 0
        # a token bucket of packets (0: none), one second of burst; not for ``exempt``
        # usernames (the fog's own account), read from the CONNECT packet
        self.packets_per_s = packets_per_s
        self._exempt = exempt
        self.username: str | None = None
        self.tokens = float(packets_per_s)
        self.refilled = time.monotonic()
        self._connect: bytearray | None = None
        self.acked = asyncio.Event()
        self._state = 0  # 0: first byte next; 1: in the length; 2: in the body
        self._kind = 0
        self._qos = 0
        self._length = 0
        self._multiplier = 1
        self._body_left = 0

    def at_packet_start(self) -> bool:
        return self._state == 0

    def feed(self, data: bytes) -> None:
        i, n = 0, len(data)
        while i < n:
            if self._state == 0:
                self._kind, self._qos = data[i] >> 4, (data[i] >> 1) & 3
                self._length, self._multiplier, self._state = 0, 1, 1
                if self._kind == _CONNECT and self.username is None:
                    self._connect = bytearray()
                i += 1
            elif self._state == 1:
                byte = data[i]
                i += 1
                self._length += (byte & 0x7F) * self._multiplier
                self._multiplier *= 128
                if byte & 0x80:
                    continue
                length_bytes = {128: 1, 128**2: 2, 128**3: 3}.get(self._multiplier, 4)
                if 1 + length_bytes + self._length > self.packet_bytes_max:
                    raise PacketTooLargeError(
                        f"packet of {self._length} bytes over {self.packet_bytes_max}"
                    )
                self._body_left, self._state = self._length, 2
                self._end_if_done()
            else:
                take = min(self._body_left, n - i)
                if self._connect is not None:
                    self._connect += data[i : i + take]
                self._body_left -= take
                i += take
                self._end_if_done()

    def _end_if_done(self) -> None:
        if self._body_left == 0:
            self._state = 0
            if self._kind == _PUBLISH and self._qos > 0:
                self.inflight += 1
            if self._connect is not None:
                self.username, self._connect = _connect_username(bytes(self._connect)), None

    @property
    def rate_limited(self) -> bool:
        return self.packets_per_s > 0 and self.username not in self._exempt

    def wait_s(self) -> float:
        """Take a token for the next packet; how long to wait first (0: none)."""
        now = time.monotonic()
        rate = self.packets_per_s
        self.tokens = min(float(rate), self.tokens + (now - self.refilled) * rate)
        self.refilled = now
        self.tokens -= 1
        return 0.0 if self.tokens >= 0 else -self.tokens / rate

    def wrote(self, data: bytes) -> None:
        if data and data[0] in _ACKS and self.inflight > 0:
            self.inflight -= 1
            self.acked.set()


def _connect_username(body: bytes) -> str:
    """The username of an MQTT 3.1.1 CONNECT body ("" when absent or unreadable: such a
    session is refused by the auth plugin anyway)."""
    try:
        at = 2 + int.from_bytes(body[0:2], "big")  # protocol name
        flags = body[at + 1]
        at += 4  # level, flags, keep-alive
        fields = 1 + (2 if flags & 0x04 else 0)  # client id; will topic and message
        for _ in range(fields):
            at += 2 + int.from_bytes(body[at : at + 2], "big")
        if not flags & 0x80:
            return ""
        size = int.from_bytes(body[at : at + 2], "big")
        return body[at + 2 : at + 2 + size].decode("utf-8", "replace")
    except IndexError:
        return ""


class _LimitedReader(StreamReaderAdapter):  # type: ignore[misc]  # amqtt is untyped here
    def __init__(self, reader: asyncio.StreamReader, limits: _ConnectionLimits) -> None:
        super().__init__(reader)
        self._limits = limits

    async def read(self, n: int = -1) -> bytes:
        limits = self._limits
        if limits.at_packet_start() and limits.rate_limited:
            pause = limits.wait_s()
            if pause > 0:
                await asyncio.sleep(pause)
        if limits.at_packet_start() and limits.inflight >= limits.inflight_max:
            deadline = time.monotonic() + INFLIGHT_WAIT_S
            while limits.inflight >= limits.inflight_max:
                limits.acked.clear()
                left = deadline - time.monotonic()
                if left <= 0:
                    log.warning("broker_inflight_wait_expired", inflight=limits.inflight)
                    limits.inflight = 0
                    break
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(left):
                        await limits.acked.wait()
        data: bytes = await super().read(n)
        try:
            limits.feed(data)
        except PacketTooLargeError as exc:
            log.warning("broker_packet_refused", reason=str(exc))
            raise
        return data


class _LimitedWriter(StreamWriterAdapter):  # type: ignore[misc]  # amqtt is untyped here
    def __init__(self, writer: asyncio.StreamWriter, limits: _ConnectionLimits) -> None:
        super().__init__(writer)
        self._limits = limits

    def write(self, data: bytes) -> None:
        super().write(data)
        self._limits.wrote(data)


class LimitedBroker(Broker):  # type: ignore[misc]  # amqtt is untyped here
    """amqtt with per-connection limits (packet size, QoS 1 inflight) and a strict TLS
    listener context."""

    def __init__(
        self,
        config: dict[str, Any],
        *,
        packet_bytes_max: int,
        inflight_max: int,
        packets_per_s: int = 0,
        exempt: frozenset[str] = frozenset(),
    ):
        super().__init__(config)
        self._packet_bytes_max = packet_bytes_max
        self._inflight_max = inflight_max
        self._packets_per_s = packets_per_s
        self._exempt = exempt

    async def stream_connected(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener_name: str
    ) -> None:
        limits = _ConnectionLimits(
            self._packet_bytes_max,
            self._inflight_max,
            packets_per_s=self._packets_per_s,
            exempt=self._exempt,
        )
        try:
            await self._client_connected(
                listener_name, _LimitedReader(reader, limits), _LimitedWriter(writer, limits)
            )
        except PacketTooLargeError:  # in the CONNECT, before amqtt has a session to close
            writer.close()

    @staticmethod
    def _create_ssl_context(listener: Any) -> ssl.SSLContext:
        """TLS 1.2+; client certificates required and verified against ``cafile`` when it
        is given, not asked for otherwise (amqtt's own trusts the system CAs for them)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(listener["certfile"], listener["keyfile"])
            if listener.get("cafile"):
                ctx.load_verify_locations(cafile=listener["cafile"])
                ctx.verify_mode = ssl.CERT_REQUIRED
        except (OSError, ssl.SSLError) as exc:
            raise BrokerError(f"TLS listener: {exc}") from exc
        return ctx


# the hand-off (``broker.handoff``): given a client's PUBLISH (topic, payload) that passed
# every check and ACL, True when the fog took it (it is then delivered to no subscriber)
Handoff = Callable[[str, bytes], bool]


class FogBroker(LimitedBroker, brokerauth.HardenedBroker):
    """The embedded broker: per-connection limits (``LimitedBroker``: its reads and TLS) over
    the hardened sessions and ACLs (``fog.brokerauth.HardenedBroker``); the two override
    disjoint methods of amqtt's ``Broker``.

    With a ``handoff`` (``broker.handoff = true``: the broker on the fog's event loop), a
    client's PUBLISH goes to it where amqtt would queue it for its subscribers: after amqtt's
    topic checks, the ACL (a denied PUBLISH closes the connection before this point,
    ``HardenedBroker``) and the connection's limits (``LimitedBroker``). The fog takes its
    intents there and queues them as its reader would, so an intent crosses no second MQTT
    connection (the fog's own client: encode, loopback TCP, decode, PUBACK); what it does not
    take (trust material, gossip, anything else) is broadcast as before. The fog's answers
    come back through ``EmbeddedBroker.deliver``."""

    def __init__(self, config: dict[str, Any], *, handoff: Handoff | None = None, **limits: Any):
        super().__init__(config, **limits)
        self._handoff = handoff

    async def _broadcast_message(
        self,
        session: Any,
        topic: str | None,
        data: bytes | bytearray | None,
        force_qos: int | None = None,
    ) -> None:
        if self._handoff is not None and session is not None and topic:  # a client's
            # a PUBLISH passed the ACL already; a will message (sent for a client gone
            # without DISCONNECT) never did in amqtt: checked here before the fog sees it.
            # Only then: one more await per message widens an amqtt race (a publisher that
            # disconnects right after its PUBACKs loses what the broker had not yet routed)
            if _is_will(session, topic, data) and not await self._topic_filtering(
                session, topic=topic, action=Action.PUBLISH
            ):
                log.warning("broker_will_denied", username=str(session.username)[:80])
                return
            if self._handoff(topic, bytes(data or b"")):
                return
        await super()._broadcast_message(session, topic, data, force_qos)


def _is_will(session: Any, topic: str, data: bytes | bytearray | None) -> bool:
    """Whether (topic, data) is the session's will (a PUBLISH equal to it is checked twice)."""
    return bool(
        getattr(session, "will_flag", False)
        and topic == session.will_topic
        and bytes(data or b"") == bytes(session.will_message or b"")
    )


def amqtt_config(broker: BrokerConfig) -> dict[str, Any]:
    """The amqtt configuration: one TCP listener, our auth plugin, no default plugin set
    (amqtt 0.12's default set allows anonymous access and warns with DeprecationWarning)."""
    if broker.device_username == broker.username:
        raise AssertionError("config check lets no device account shadow the fog's")
    host = f"[{broker.host}]" if ":" in broker.host else broker.host
    listeners: dict[str, Any] = {
        "default": {
            "type": "tcp",
            "bind": f"{host}:{broker.port}",
            "max_connections": LISTENER_CONNECTIONS_MAX,
        }
    }
    if broker.tls_port is not None:
        listeners["tls"] = {
            "type": "tcp",
            "bind": f"{host}:{broker.tls_port}",
            "max_connections": LISTENER_CONNECTIONS_MAX,
            "ssl": True,
            "certfile": broker.tls_cert_file,
            "keyfile": broker.tls_key_file,
        }
        if broker.tls_ca_file:
            listeners["tls"]["cafile"] = broker.tls_ca_file
    return {
        "listeners": listeners,
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


class EmbeddedBroker:
    """An amqtt broker bound as the config says; ``port`` is the port actually bound."""

    def __init__(
        self, config: BrokerConfig, *, warn: bool = True, handoff: Handoff | None = None
    ) -> None:
        assert config.embedded
        self._config = config
        self._handoff = handoff  # broker.handoff: the fog's intake (FogBroker)
        self._warn = warn  # False in BrokerProcess's child: the fog warned already
        self._broker: Broker | None = None
        self.port = 0
        self.tls_port: int | None = None

    async def start(self) -> None:
        if self._warn:
            warn_if_public(self._config)
        broker = FogBroker(
            amqtt_config(self._config),
            packet_bytes_max=self._config.packet_bytes_max,
            inflight_max=self._config.inflight_max,
            packets_per_s=self._config.packets_per_s,
            exempt=frozenset({self._config.username}),
            handoff=self._handoff,
        )
        await broker.start()
        self._broker = broker
        self.port = _bound_port(broker)
        if self._config.tls_port is not None:
            self.tls_port = _bound_port(broker, "tls")
        log.info(
            "broker_started",
            host=self._config.host,
            port=self.port,
            tls_port=self.tls_port,
            kind="amqtt",
        )

    async def stop(self) -> None:
        broker, self._broker = self._broker, None
        if broker is not None:
            await broker.shutdown()
            log.info("broker_stopped", port=self.port)

    async def deliver(self, topic: str, payload: bytes) -> None:
        """``broker.handoff``'s way out: a QoS 1 message from the fog to the subscribers
        (ACLs and per-session queues as for any publish), queued inside the broker, not sent
        through the fog's own connection. Raises ``BrokerError`` when it is not running."""
        if self._broker is None:
            raise BrokerError("embedded broker not running")
        await self._broker.internal_message_broadcast(topic, payload, 1)


def _bound_port(broker: Broker, listener: str = "default") -> int:
    server = broker._servers[listener].instance  # amqtt keeps asyncio.Server here
    sockets = getattr(server, "sockets", None)
    assert sockets, "amqtt listener has no socket"
    port: int = sockets[0].getsockname()[1]
    return port


async def _serve_child(answer_fd: int) -> int:
    """The child: configuration from stdin, the port (or the error) on ``answer_fd``, then
    serve until SIGTERM or stdin's end."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    config = BrokerConfig(**json.loads(await reader.readline()))
    # the fog warned already, in its own log; the child's stdout is the fog's process's
    # (``fogpay demo --json`` prints its summary alone there)
    broker = EmbeddedBroker(config, warn=False)
    try:
        await broker.start()
    except Exception as exc:  # amqtt wraps OSError (address in use...) in BrokerError
        _answer(answer_fd, {"error": str(exc.__cause__ or exc)})
        return 1
    _answer(answer_fd, {"port": broker.port, "tls_port": broker.tls_port})
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


def child_main(argv: list[str]) -> int:
    """The child process (``python -m fog.brokerchild ANSWER_FD``, or ``-m fog.broker``)."""
    from runtime.logs import configure, route_stdlib_logging

    configure(json=True, level="warning", component="broker")  # the fog logs start, stop
    route_stdlib_logging(json=True, component="broker")
    return asyncio.run(_serve_child(int(argv[0])))


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
