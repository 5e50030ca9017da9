"""SANDBOX ONLY: teach the cloud's registry what was provisioned around it on the broker.

In ``fogpay sandbox`` the issuer seed is the cloud's issuer key, and anyone holding it may
still provision with ``fogpay owner add / device bind / device revoke / lease grant``, which
publish signed material retained on the spec's topics without asking the cloud. The mirror
subscribes to ``fogpay/1/trust/#`` and ``fogpay/1/+/lease/+`` and imports into the registry
what is not there yet, so that the cloud can book the batches paid with it:

- ``owner`` (signed by the issuer): remembered; the owner is registered at its first
  binding or lease, in that one's currency (a credential names none), with credit limit
  ``OWNER_LIMIT_MICROS`` and no funding reference (settlement routes it to the manual rail).
- ``fog`` (signed by the issuer): a registered fog.
- ``bind`` (signed by the key of its owner's issuer-signed credential, in the owner's
  currency): a binding **without** proof of possession (``fogpay device bind`` checked the
  proof before publishing; the mirror cannot see it).
- ``revoke``: whatever ``cloud.registry.revoke`` accepts (issuer; an owner for itself and
  its own devices).
- ``lease`` (signed by the issuer): an open lease, outside any credit check (it was granted
  by hand).

Material already in the registry is left alone (idempotent: the cloud's own retained
publications come back to the mirror and change nothing). Material that arrives before
the owner credential it depends on waits in memory (``PENDING_MAX``) until it does.
Anything refused is counted (``refused_<type>``) and logged (``mirror_refused``), never
raised. A production cloud does not run this: there the registry is the only way in.
"""

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import aiomqtt
import structlog

from cloud import registry
from cloud.errors import RegistryError
from cloud.leases import STATE_OPEN
from cloud.store import Store, Tx, clamp_ms
from protocol import topics
from protocol.errors import Declined, FogpayError
from protocol.messages import Binding, FogCredential, Lease, OwnerCredential, Revocation
from protocol.signing import Signed, open_envelope
from protocol.topics import Kind
from runtime.mqttloop import read_until_stopped
from runtime.mqttshell import ClientSettings, serve

log = structlog.get_logger()

OWNER_LIMIT_MICROS: Final = 1_000_000_000_000  # 1,000,000 of the owner's currency
PENDING_MAX: Final = 10_000
LEASE_FILTER: Final = f"{topics.ROOT}/+/lease/+"
FILTERS: Final = (topics.TRUST_FILTER, LEASE_FILTER)
CONNECT_TIMEOUT_S: Final = 10.0
SUBSCRIBE_TIMEOUT_S: Final = 10.0
RECONNECT_ATTEMPTS_MAX: Final = 1_000
INCOMING_MESSAGES_MAX: Final = 10_000


class MirrorRefused(FogpayError):
    pass


@dataclass(frozen=True, slots=True)
class Pending:
    kind: Kind
    payload: bytes


class Importer:
    """The mirror's decisions over the registry, one message per transaction (no MQTT)."""

    def __init__(self, *, store: Store, issuer_key: bytes, clock: Callable[[], int]) -> None:
        self._store, self._issuer, self._clock = store, issuer_key, clock
        self._credentials: dict[str, Signed[OwnerCredential]] = {}
        self._pending: dict[str, list[Pending]] = {}
        self.counters: dict[str, int] = {}

    def _count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1

    async def handle(self, topic: str, payload: bytes) -> str:
        """Import one retained message; returns ``imported``, ``known`` (already in the
        registry), ``remembered`` (an owner credential), ``pending`` (waits for its owner's
        credential), ``refused`` or ``ignored``. Never raises for bad input."""
        try:
            parsed = topics.parse(topic)
        except FogpayError:
            return "ignored"
        if not payload or parsed.kind not in _TYPES:
            return "ignored"
        name = _TYPES[parsed.kind]
        try:
            status = await self._handle(parsed.kind, payload)
        except (Declined, RegistryError, MirrorRefused) as exc:
            status = "refused"
            log.warning("mirror_refused", type=name, error=str(exc)[:200])
        self._count(f"{status}_{name}")
        if status == "imported":
            log.info("mirror_imported", type=name)
        return status

    async def _handle(self, kind: Kind, payload: bytes) -> str:
        if kind is Kind.TRUST_OWNER:
            return await self._owner(payload)
        if kind is Kind.TRUST_FOG:
            signed = open_envelope(payload, FogCredential, signer=self._issuer)
            return await self._store.transact(lambda tx: _import_fog(tx, signed))
        if kind is Kind.TRUST_REVOKE:
            return await self._store.transact(
                lambda tx: _import_revocation(tx, self._issuer, payload)
            )
        return await self._owned(kind, payload)

    async def _owner(self, payload: bytes) -> str:
        signed = open_envelope(payload, OwnerCredential, signer=self._issuer)
        self._credentials[signed.msg.owner_id] = signed
        waiting = self._pending.pop(signed.msg.owner_id, [])
        for p in waiting:
            await self.handle(_topic_for(p), p.payload)
        return "remembered"

    async def _owned(self, kind: Kind, payload: bytes) -> str:
        """A binding or a lease: both need their owner registered, in their currency."""
        if kind is Kind.TRUST_BIND:
            owner_id, currency = _peek_binding(payload)
        else:
            lease = open_envelope(payload, Lease, signer=self._issuer)
            owner_id, currency = lease.msg.owner_id, lease.msg.currency
        credential = self._credentials.get(owner_id)

        async def fn(tx: Tx) -> str:
            owner = await registry.get_owner(tx, owner_id)
            if owner is None:
                if credential is None:
                    return "pending"
                await _import_owner(tx, credential, currency, now_ms=self._clock())
            if kind is Kind.TRUST_BIND:
                return await _import_binding(tx, payload, now_ms=self._clock())
            return await _import_lease(tx, payload, self._issuer, now_ms=self._clock())

        status: str = await self._store.transact(fn)
        if status == "pending":
            self._park(owner_id, Pending(kind, payload))
        return status

    def _park(self, owner_id: str, pending: Pending) -> None:
        if sum(len(v) for v in self._pending.values()) >= PENDING_MAX:
            raise MirrorRefused("too much material waiting for owner credentials")
        waiting = self._pending.setdefault(owner_id, [])
        if pending not in waiting:
            waiting.append(pending)


_TYPES: Final = {
    Kind.TRUST_OWNER: "owner",
    Kind.TRUST_FOG: "fog",
    Kind.TRUST_BIND: "bind",
    Kind.TRUST_REVOKE: "revoke",
    Kind.LEASE: "lease",
}


def _topic_for(p: Pending) -> str:
    if p.kind is Kind.TRUST_BIND:
        return topics.bind_topic(open_envelope(p.payload, Binding).msg.device)
    lease = open_envelope(p.payload, Lease).msg
    return topics.lease_topic(lease.fog_id, lease.lease_id)


def _peek_binding(payload: bytes) -> tuple[str, str]:
    """The owner and currency a binding names (its signature is checked on import)."""
    b = open_envelope(payload, Binding).msg
    return b.owner_id, b.currency


async def _import_owner(
    tx: Tx, credential: Signed[OwnerCredential], currency: str, *, now_ms: int
) -> None:
    c = credential.msg
    if await tx.fetchone("SELECT 1 FROM owners WHERE key = ?", (c.key,)):
        raise MirrorRefused(f"owner {c.owner_id!r}: key registered to another owner")
    await tx.execute(
        "INSERT INTO owners (owner_id, key, name, limit_micros, currency, funding_ref, status, "
        "nb, na, credential) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            *(c.owner_id, c.key, c.owner_id, OWNER_LIMIT_MICROS, currency, ""),
            *(registry.STATUS_ACTIVE, clamp_ms(c.not_before_ms), clamp_ms(c.not_after_ms)),
            credential.raw,
        ),
    )
    await registry.put_retained(tx, topics.owner_topic(c.owner_id), credential.raw)
    log.info("mirror_owner_registered", owner=c.owner_id, currency=currency, at_ms=now_ms)


async def _import_fog(tx: Tx, signed: Signed[FogCredential]) -> str:
    f = signed.msg
    if await tx.fetchone("SELECT 1 FROM fogs WHERE fog_id = ?", (f.fog_id,)):
        return "known"
    if await tx.fetchone("SELECT 1 FROM fogs WHERE key = ?", (f.key,)):
        raise MirrorRefused(f"fog {f.fog_id!r}: key registered to another fog")
    await tx.execute(
        "INSERT INTO fogs (fog_id, key, credential) VALUES (?, ?, ?)", (f.fog_id, f.key, signed.raw)
    )
    await registry.put_retained(tx, topics.fog_topic(f.fog_id), signed.raw)
    return "imported"


async def _import_binding(tx: Tx, payload: bytes, *, now_ms: int) -> str:
    b = open_envelope(payload, Binding)
    if await tx.fetchone("SELECT 1 FROM bindings WHERE binding_id = ?", (b.id,)):
        return "known"
    owner = await registry.get_owner(tx, b.msg.owner_id)
    assert owner is not None
    if b.signer != owner.key:
        raise MirrorRefused("binding not signed by its owner's key")
    if b.msg.currency != owner.currency:
        raise MirrorRefused(f"binding currency {b.msg.currency} != owner's {owner.currency}")
    sql = (
        "INSERT INTO bindings (binding_id, device, owner_id, nb, na, currency, envelope, "
        "registered_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
    )
    m = b.msg
    row = (b.id, m.device, m.owner_id, clamp_ms(m.not_before_ms), clamp_ms(m.not_after_ms))
    await tx.execute(sql, (*row, m.currency, payload, now_ms))
    await registry.put_retained(tx, topics.bind_topic(m.device), payload)
    return "imported"


async def _import_revocation(tx: Tx, issuer_key: bytes, payload: bytes) -> str:
    signed = open_envelope(payload, Revocation)
    if await registry.is_revoked(tx, signed.msg.key):
        return "known"
    await registry.revoke(tx, issuer_key, payload)
    return "imported"


async def _import_lease(tx: Tx, payload: bytes, issuer_key: bytes, *, now_ms: int) -> str:
    signed = open_envelope(payload, Lease, signer=issuer_key)
    m = signed.msg
    if await tx.fetchone("SELECT 1 FROM leases WHERE lease_id = ?", (m.lease_id,)):
        return "known"
    owner = await registry.get_owner(tx, m.owner_id)
    assert owner is not None
    if m.currency != owner.currency:
        raise MirrorRefused(f"lease currency {m.currency} != owner's {owner.currency}")
    await tx.execute(
        "INSERT INTO leases (lease_id, owner_id, fog_id, currency, amount_micros, not_after_ms, "
        "granted_ms, state, drawn_micros, envelope) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0, ?)",
        (
            *(m.lease_id, m.owner_id, m.fog_id, m.currency, m.amount_micros),
            *(clamp_ms(m.not_after_ms), now_ms, STATE_OPEN, payload),
        ),
    )
    await registry.put_retained(tx, topics.lease_topic(m.fog_id, m.lease_id), payload)
    return "imported"


class Mirror:
    """The importer on MQTT: one client subscribed to the trust and lease topics,
    reconnecting with capped, jittered backoff. ``run()`` until ``stop()``."""

    def __init__(self, *, importer: Importer, client_args: dict[str, Any]) -> None:
        self.importer = importer
        self._client_args = client_args
        self._stopping = asyncio.Event()

    async def stop(self) -> None:
        self._stopping.set()

    async def run(self, *, ready: asyncio.Event | None = None) -> None:
        """The MQTT shell (runtime/mqttshell.py), subscribed to the trust and lease topics."""
        settings = ClientSettings(
            **self._client_args,
            identifier_prefix="fogpay-mirror",
            connect_timeout_s=CONNECT_TIMEOUT_S,
            subscribe_timeout_s=SUBSCRIBE_TIMEOUT_S,
            incoming_max=INCOMING_MESSAGES_MAX,
            failures_max=RECONNECT_ATTEMPTS_MAX,
        )

        async def lost(exc: aiomqtt.MqttError, delay: float) -> None:
            log.warning("broker_disconnected", error=str(exc), retry_s=round(delay, 3))

        async def session(client: aiomqtt.Client) -> None:
            if ready is not None:
                ready.set()
            await read_until_stopped(self._read(client), self._stopping, name="cloud.mirror")

        await serve(settings, FILTERS, stopping=self._stopping, session=session, lost=lost)

    async def _read(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            payload = message.payload
            if not isinstance(payload, bytes | bytearray):
                continue
            try:
                await self.importer.handle(str(message.topic), bytes(payload))
            except Exception as exc:  # the seam: a store fault must not stop the mirror
                log.error("mirror_failed", error=type(exc).__name__)
