"""Broker accounts, roles and topic ACLs of the embedded amqtt broker; amqtt's holes closed.

Accounts (docs/protocol.md, "Broker login"; docs/security.md, "Broker accounts"):

- the accounts of the fog's config (``broker.username``: role ``operator``; the legacy shared
  ``broker.device_username``: role ``shared_device``);
- the accounts file ``broker.accounts_file`` (JSON, written by ``cloud.accounts``), re-read
  whenever its size or mtime changes (checked at every CONNECT, SUBSCRIBE, PUBLISH and
  delivery): ``{"accounts": {USERNAME: {"role": ROLE, "sha256": HEX}}}``. A device's
  username is its key as 64 lowercase hex characters; an account removed from the file
  (revoked binding) loses every right at once, also on a connection already open.

Roles, over spec section 8 topics:

- ``operator``: publishes and reads everything (the fog itself, the sandbox's cloud and
  tools).
- ``device`` (username = key hex K): publishes only ``fogpay/1/+/intent/K``, reads only
  ``fogpay/1/+/receipt/K`` and the retained trust material ``fogpay/1/trust/#``.
- ``shared_device`` (legacy, one account for all devices, only when
  ``broker.device_password`` is set): a device's rights for every device at once: publishes
  any intent topic, reads any receipt topic and the retained trust material; never trust,
  leases, acks or the uplink. Devices sharing it can still read each other's receipts and
  publish under each other's topics (the fog declines an intent whose signer is not its
  topic's device), so leave ``broker.device_password`` empty and give devices their own
  accounts (the sandbox does).

``HardenedBroker`` fixes in a subclass what amqtt 0.12.1 gets wrong (tests/security/
test_amqtt_holes.py holds each):

1. On CONNECT amqtt sends the session the retained messages of *every* client's
   subscriptions, past topic ACLs: retained messages go only to the session's own
   subscriptions, each message checked against the ACL (``RECEIVE``).
2. amqtt deletes or rewrites the session of a client id *before* authenticating: a failed
   login under another client's id wiped that client's subscriptions and took its connection
   over. Here the login is checked first; a refused login touches no session.
3. A client id already held by another account is refused (CONNACK 2, identifier rejected):
   no session takeover across accounts; the same account may take its own session over
   (MQTT 3.1.1 behaviour).
4. amqtt sends the PUBACK of a QoS 1 PUBLISH in its protocol handler before the broker checks
   the ACL. That cannot be fixed outside amqtt's handler: a denied PUBLISH closes the network
   connection instead (MQTT 3.1.1, MQTT-3.3.5-2 allows it), so the client learns of it and the
   message goes nowhere; the PUBACK may still have been sent before the close.
5. amqtt acknowledges a PUBLISH when its handler queues it, and its client loop takes one
   queued message per turn; when the DISCONNECT arrives first, the loop ends and the messages
   still queued are dropped, acknowledged and never delivered (a tool that publishes trust
   and disconnects lost some, under load: found as flaky tests). ``DeliverBeforeDisconnect``
   delivers every message the client sent before its DISCONNECT, in order, then ends the
   session.
"""

import asyncio
import hmac
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import structlog
from amqtt.broker import Action, Broker
from amqtt.contexts import BaseContext
from amqtt.errors import AMQTTError
from amqtt.mqtt.connack import IDENTIFIER_REJECTED, ConnackPacket
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session
from amqtt.utils import gen_client_id

from protocol.login import account_digest

log = structlog.get_logger()

ROLE_OPERATOR: Final = "operator"
ROLE_DEVICE: Final = "device"
ROLE_SHARED_DEVICE: Final = "shared_device"
ROLES: Final = frozenset({ROLE_OPERATOR, ROLE_DEVICE, ROLE_SHARED_DEVICE})
ACCOUNTS_FILE_BYTES_MAX: Final = 64 * 1024 * 1024
KEY_HEX_CHARS: Final = 64
ROOT: Final = "fogpay/1"


digest = account_digest


@dataclass(frozen=True, slots=True)
class Account:
    username: str
    role: str
    sha256: str = field(repr=False)


def is_key_hex(text: str) -> bool:
    return len(text) == KEY_HEX_CHARS and all(c in "0123456789abcdef" for c in text)


def parse_accounts(raw: Any) -> dict[str, Account]:
    """The accounts of an accounts file's content; raises ValueError for anything malformed."""
    if not isinstance(raw, Mapping) or not isinstance(raw.get("accounts"), Mapping):
        raise ValueError("not an accounts file: no 'accounts' object")
    out: dict[str, Account] = {}
    for name, entry in raw["accounts"].items():
        if not isinstance(entry, Mapping):
            raise ValueError(f"account {name!r}: not an object")
        role, sha = entry.get("role"), entry.get("sha256")
        if role not in ROLES or not isinstance(sha, str) or len(sha) != 64:
            raise ValueError(f"account {name!r}: bad role or sha256")
        if role == ROLE_DEVICE and not is_key_hex(name):
            raise ValueError(f"account {name!r}: a device's username is its key hex")
        out[str(name)] = Account(str(name), str(role), sha)
    return out


class AccountTable:
    """Config accounts plus the accounts file, re-read when the file changes. A file that
    cannot be read or parsed leaves the last good table in place (logged once per change)."""

    def __init__(self, fixed: Mapping[str, Account], path: str | None) -> None:
        self._fixed = dict(fixed)
        self._path = Path(path) if path else None
        self._stamp: tuple[int, int] | None = None
        self._file: dict[str, Account] = {}

    def _refresh(self) -> None:
        if self._path is None:
            return
        try:
            st = os.stat(self._path)
        except FileNotFoundError:
            if self._stamp != (0, 0):
                self._stamp, self._file = (0, 0), {}
            return
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            if st.st_size > ACCOUNTS_FILE_BYTES_MAX:
                raise ValueError("too large")
            self._file = parse_accounts(json.loads(self._path.read_bytes()))
        except (OSError, ValueError) as exc:
            log.error("broker_accounts_unreadable", path=str(self._path), error=str(exc)[:200])
            return
        log.info("broker_accounts_loaded", path=str(self._path), accounts=len(self._file))

    def get(self, username: str | None) -> Account | None:
        if not username:
            return None
        if username in self._fixed:
            return self._fixed[username]
        self._refresh()
        return self._file.get(username)

    def login(self, username: str | None, password: str | None) -> Account | None:
        account = self.get(username)
        if account is None or not hmac.compare_digest(account.sha256, digest(password or "")):
            return None
        return account


def _covers(pattern: str, topic: str) -> bool:
    """Does ``pattern`` (an ACL filter, ``+``/``#`` wildcards) cover ``topic`` (a topic or a
    subscription filter: a ``+`` in it needs a ``+`` in the pattern, a ``#`` a ``#``)?"""
    p, t = pattern.split("/"), topic.split("/")
    for i, level in enumerate(p):
        if level == "#":
            return True
        if i >= len(t):
            return False
        if t[i] == "#":
            return False
        if level == "+":
            continue
        if t[i] != level:
            return False
    return len(t) == len(p)


def allowed(account: Account, topic: str, *, write: bool) -> bool:
    """The role's ACL: may ``account`` publish (``write``) on, or subscribe to / receive
    from, ``topic``?"""
    if account.role == ROLE_OPERATOR:
        return True
    if account.role == ROLE_DEVICE:
        return _device_may(account.username, topic, write=write)
    if account.role == ROLE_SHARED_DEVICE:  # a device's rights, for every device (docstring)
        return _device_may("+", topic, write=write)
    return False


def _device_may(me: str, topic: str, *, write: bool) -> bool:
    """A device (``me``: its key in hex, or ``+`` for the shared account): its intents and
    the receipts it holds (docs/protocol.md 17.7) out; its receipts, its held records'
    answers and the trust material in."""
    if write:
        return _covers(f"{ROOT}/+/intent/{me}", topic) or _covers(
            f"{ROOT}/held/{me}/records", topic
        )
    return (
        _covers(f"{ROOT}/+/receipt/{me}", topic)
        or _covers(f"{ROOT}/held/{me}/ack", topic)
        or _covers(f"{ROOT}/trust/#", topic)
    )


def fixed_accounts(users: Mapping[str, Mapping[str, str]]) -> dict[str, Account]:
    return {name: Account(name, u["role"], u["sha256"]) for name, u in users.items()}


def plugins_config(users: Mapping[str, Account], accounts_file: str | None) -> dict[str, Any]:
    """The ``plugins`` section of the amqtt configuration."""
    cfg = {
        "users": {a.username: {"role": a.role, "sha256": a.sha256} for a in users.values()},
        "accounts_file": accounts_file or "",
    }
    return {f"{__name__}.AccountAuthPlugin": cfg, f"{__name__}.AccountTopicPlugin": cfg}


class _TableMixin:
    @dataclass
    class Config:
        users: dict[str, dict[str, str]] = field(default_factory=dict)
        accounts_file: str = ""

    def _table(self, context: BaseContext, config: Any) -> AccountTable:
        users = getattr(config, "users", None) or {}
        path = getattr(config, "accounts_file", "") or None
        return AccountTable(fixed_accounts(users), path)


class AccountAuthPlugin(BaseAuthPlugin, _TableMixin):  # type: ignore[misc]  # amqtt untyped
    """Username and password against the account table; never marks a session anonymous."""

    Config = _TableMixin.Config

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        self.table = self._table(context, self.config)

    async def authenticate(self, *, session: Session) -> bool | None:
        if session is None:
            return False
        ok = self.table.login(session.username, session.password) is not None
        if not ok:
            log.warning("broker_login_refused", username=str(session.username or "")[:80])
        return ok


class AccountTopicPlugin(BaseTopicPlugin, _TableMixin):  # type: ignore[misc]  # amqtt untyped
    """The role ACLs (``allowed``) on publish, subscribe and every delivery."""

    Config = _TableMixin.Config

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        self.table = self._table(context, self.config)

    async def topic_filtering(
        self, *, session: Session | None = None, topic: str | None = None, action: Any = None
    ) -> bool | None:
        if session is None or topic is None:
            return False
        account = self.table.get(session.username)
        if account is None:
            return False
        ok = allowed(account, topic, write=action == Action.PUBLISH)
        if not ok and action != Action.RECEIVE:
            log.warning(
                "broker_topic_denied",
                username=account.username[:80],
                action=str(getattr(action, "value", action)),
                topic=topic[:200],
            )
        return ok


class DeliverBeforeDisconnect(Broker):  # type: ignore[misc]  # amqtt is untyped here
    """amqtt's client loop (``Broker._client_message_loop``, 0.12) with hole 5 closed: on a
    disconnect, the message already taken off the session's queue and every message still
    queued are delivered, in the order sent, before the session ends."""

    async def _client_message_loop(
        self, client_session: Session, handler: BrokerProtocolHandler
    ) -> None:
        disconnect_waiter = asyncio.ensure_future(handler.wait_disconnect())
        subscribe_waiter = asyncio.ensure_future(handler.get_next_pending_subscription())
        unsubscribe_waiter = asyncio.ensure_future(handler.get_next_pending_unsubscription())
        wait_deliver = asyncio.ensure_future(handler.mqtt_deliver_next_message())
        waiters = [disconnect_waiter, subscribe_waiter, unsubscribe_waiter, wait_deliver]
        try:
            while True:
                done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                if subscribe_waiter in done:
                    await self._handle_subscription(client_session, handler, subscribe_waiter)
                    subscribe_waiter = asyncio.ensure_future(
                        handler.get_next_pending_subscription()
                    )
                if unsubscribe_waiter in done:
                    await self._handle_unsubscription(client_session, handler, unsubscribe_waiter)
                    unsubscribe_waiter = asyncio.ensure_future(
                        handler.get_next_pending_unsubscription()
                    )
                if disconnect_waiter in done:
                    await self._deliver_the_rest(client_session, handler, wait_deliver)
                    await self._handle_disconnect(client_session, handler, disconnect_waiter)
                    break
                if wait_deliver in done:
                    if not await self._handle_message_delivery(
                        client_session, handler, wait_deliver
                    ):
                        break
                    wait_deliver = asyncio.ensure_future(handler.mqtt_deliver_next_message())
                waiters = [disconnect_waiter, subscribe_waiter, unsubscribe_waiter, wait_deliver]
        except asyncio.CancelledError:
            pass  # the broker is shutting down: as amqtt, end the loop quietly
        finally:
            for waiter in waiters:
                waiter.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)

    async def _deliver_the_rest(
        self, session: Session, handler: BrokerProtocolHandler, wait_deliver: Any
    ) -> None:
        """The client has gone: deliver what it sent before (acknowledged already)."""
        if not wait_deliver.done():
            wait_deliver.cancel()  # its message, if any, is still on the queue
            await asyncio.gather(wait_deliver, return_exceptions=True)
        if wait_deliver.done() and not wait_deliver.cancelled() and wait_deliver.result():
            if not await self._handle_message_delivery(session, handler, wait_deliver):
                return
        queue = session.delivered_message_queue
        for _ in range(queue.qsize()):  # bounded: what is queued now
            taken: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            taken.set_result(queue.get_nowait())
            if not await self._handle_message_delivery(session, handler, taken):
                return


class HardenedBroker(DeliverBeforeDisconnect):
    """amqtt's ``Broker`` with holes 1-5 of the module docstring closed."""

    async def _initialize_client_session(
        self, reader: Any, writer: Any, remote_address: str, remote_port: int
    ) -> tuple[BrokerProtocolHandler, Session]:
        try:
            handler, session = await BrokerProtocolHandler.init_from_connect(
                reader, writer, self.plugins_manager
            )
        except Exception as exc:
            await writer.close()
            raise AMQTTError(f"CONNECT from {remote_address}: {exc}") from exc
        # hole 2: the login first, before any session is looked at
        if not await self._authenticate(session, None):
            session.parent = 0
            handler.attach(session, reader, writer)
            await handler.mqtt_connack_authorize(False)
            await writer.close()
            raise AMQTTError("login refused")
        existing = self._sessions.get(session.client_id, (None, None))[0]
        # hole 3: a client id held by another account is not taken over
        if existing is not None and existing.username != session.username:
            log.warning("broker_client_id_refused", username=str(session.username)[:80])
            session.parent = 0
            handler.attach(session, reader, writer)
            await handler._send_packet(ConnackPacket.build(0, IDENTIFIER_REJECTED))
            await writer.close()
            raise AMQTTError("client id held by another account")
        if session.clean_session:
            if session.client_id:
                await self._delete_session(session.client_id)
            else:
                session.client_id = gen_client_id()
            session.parent = 0
        elif existing is not None:
            for name in ("will_flag", "will_message", "will_topic", "will_qos", "keep_alive"):
                setattr(existing, name, getattr(session, name))
            existing.password = session.password
            session = existing
            session.parent = 1
        else:
            session.parent = 0
        delay = self.config.get("timeout-disconnect-delay", 0)
        if session.keep_alive > 0 and isinstance(delay, int):
            session.keep_alive += delay
        return handler, session

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        # hole 1: only the session's own subscriptions, each message past the ACL
        topic_filter, qos = subscription
        own = self._subscriptions.get(topic_filter, [])
        if not any(s.client_id == session.client_id for s, _ in own):
            return
        for s, sub_qos in own:
            if s.client_id == session.client_id:
                qos = min(qos, sub_qos) if qos else sub_qos
        handler = self._get_handler(session)
        if handler is None:
            return
        for topic, retained in list(self._retained_messages.items()):
            if not self._matches(topic, topic_filter):
                continue
            if not await self._topic_filtering(session, topic=topic, action=Action.RECEIVE):
                continue
            await handler.mqtt_publish(
                retained.topic, retained.data, min(qos, retained.qos or qos), retain=True
            )

    async def _handle_message_delivery(
        self, client_session: Session, handler: BrokerProtocolHandler, wait_deliver: Any
    ) -> bool:
        # hole 4: a denied PUBLISH closes the connection (amqtt already sent its PUBACK)
        message = wait_deliver.result()
        topic = getattr(message, "topic", None)
        if topic and not await self._topic_filtering(
            client_session, topic=topic, action=Action.PUBLISH
        ):
            log.warning("broker_publish_denied_closed", username=str(client_session.username)[:80])
            await handler.writer.close()
            return False
        result: bool = await super()._handle_message_delivery(client_session, handler, wait_deliver)
        return result
