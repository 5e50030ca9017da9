"""The embedded amqtt broker: a loopback, trusted-client default, and the MQTT client settings.

What amqtt 0.12.1 can be trusted with (tried against the Eclipse Paho interoperability suite
and by hand): it speaks MQTT 3.1.1 only; on every CONNECT it sends the retained messages of
every subscription past topic ACLs; a client with a wrong password can disrupt another
client's session; it drops a QoS 1 delivery not acknowledged within 5 s; it never enforces
keep-alive; it bounds neither packet sizes nor queues; and ``AnonymousAuthPlugin`` marks
sessions anonymous, which purges persistent sessions at once. Hence:

- it binds loopback unless ``broker.allow_public_bind`` forces otherwise (warned at every start);
- ``PasswordAuthPlugin`` below checks a username and password and never marks a session
  anonymous (two accounts: the fog's own and one shared by devices);
- the application bounds payload sizes (the daemon declines oversized intents unread);
- the fog republishes the trust material it keeps in SQLite at start instead of trusting
  amqtt's (absent) persistence;
- QoS is best effort: end-to-end receipts and idempotent retransmission carry reliability.

Mosquitto (``deploy/mosquitto/``) is the production broker.
"""

import hashlib
import hmac
import socket
from dataclasses import dataclass, field
from typing import Any, Final

import structlog
from amqtt.broker import Broker
from amqtt.contexts import BaseContext
from amqtt.plugins.base import BaseAuthPlugin
from amqtt.session import Session

from fog.config import BrokerConfig

log = structlog.get_logger()

# Nagle's algorithm plus delayed ACKs turned a sub-millisecond round trip into 44-88 ms.
TCP_NODELAY_OPTION: Final = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
LISTENER_CONNECTIONS_MAX: Final = 10_000


def _digest(password: str) -> str:
    return hashlib.sha256(password.encode()).hexdigest()


class PasswordAuthPlugin(BaseAuthPlugin):  # type: ignore[misc]  # amqtt is untyped here
    """Username and password from the fog's config; never marks a session anonymous."""

    @dataclass
    class Config:
        users: dict[str, str] = field(default_factory=dict)  # username -> sha256 hex of password

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        self._users: dict[str, str] = dict(self._get_config_option("users", {}))

    async def authenticate(self, *, session: Session) -> bool | None:
        if session is None or not session.username:
            return False
        expected = self._users.get(session.username)
        if expected is None:
            return False
        return hmac.compare_digest(expected, _digest(session.password or ""))


def amqtt_config(broker: BrokerConfig) -> dict[str, Any]:
    """The amqtt configuration: one TCP listener, our auth plugin, no default plugin set
    (amqtt 0.12's default set allows anonymous access and warns with DeprecationWarning)."""
    users = {broker.username: _digest(broker.password)}
    users[broker.device_username] = _digest(broker.device_password)
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
        "plugins": {f"{__name__}.PasswordAuthPlugin": {"users": users}},
    }


class EmbeddedBroker:
    """An amqtt broker bound as the config says; ``port`` is the port actually bound."""

    def __init__(self, config: BrokerConfig) -> None:
        assert config.embedded
        self._config = config
        self._broker: Broker | None = None
        self.port = 0

    async def start(self) -> None:
        if self._config.allow_public_bind:
            log.warning(
                "broker_public_bind_forced",
                host=self._config.host,
                note="amqtt is fit only for loopback trusted clients; use Mosquitto",
            )
        broker = Broker(amqtt_config(self._config))
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
