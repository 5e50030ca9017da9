"""Registry: owners, fogs, device bindings and revocations, and what the issuer publishes.

The issuer's private key signs owner and fog credentials, issuer revocations and acks; it
lives only in the cloud. Every credential, binding and revocation the cloud accepts is also
written to ``retained`` under its spec section 8 topic: the MQTT shell publishes that table
(retained) on start and after each change. Funding references never leave the store.
"""

from dataclasses import dataclass
from typing import Final

import nacl.signing

from cloud.errors import RegistryError
from cloud.store import Tx, clamp_ms
from protocol import topics
from protocol.errors import Declined
from protocol.messages import Binding, FogCredential, OwnerCredential, Revocation, is_currency
from protocol.money import MINOR_UNIT_EXPONENT
from protocol.signing import (
    is_valid_public_key,
    open_envelope,
    public_key,
    seal_signed,
    verify_possession,
)

OWNER_VALIDITY_MS_DEFAULT: Final = 2 * 365 * 86_400_000
FOG_VALIDITY_MS_DEFAULT: Final = 365 * 86_400_000
STATUS_ACTIVE: Final = "active"
STATUS_REVOKED: Final = "revoked"
DEVICE_LIST_MAX: Final = 10_000


@dataclass(frozen=True, slots=True)
class Owner:
    owner_id: str
    key: bytes
    name: str
    limit_micros: int
    currency: str
    funding_ref: str
    status: str
    not_before_ms: int
    not_after_ms: int


@dataclass(frozen=True, slots=True)
class DeviceRow:
    device: bytes
    owner_id: str
    currency: str
    not_before_ms: int
    not_after_ms: int
    revoked: bool


async def put_retained(tx: Tx, topic: str, payload: bytes) -> None:
    sql = (
        "INSERT INTO retained (topic, payload) VALUES (?, ?) "
        "ON CONFLICT (topic) DO UPDATE SET payload = excluded.payload"
    )
    await tx.execute(sql, (topic, payload))


async def retained(tx: Tx) -> list[tuple[str, bytes]]:
    rows = await tx.fetchall("SELECT topic, payload FROM retained ORDER BY topic")
    return [(r[0], bytes(r[1])) for r in rows]


def _check_key(key: bytes, what: str) -> None:
    if not is_valid_public_key(key):
        raise RegistryError(f"{what} key is not a valid Ed25519 public key")


async def add_owner(
    tx: Tx,
    issuer: nacl.signing.SigningKey,
    *,
    owner_id: str,
    key: bytes,
    limit_micros: int,
    currency: str,
    funding_ref: str,
    now_ms: int,
    name: str = "",
    validity_ms: int = OWNER_VALIDITY_MS_DEFAULT,
) -> bytes:
    """Register an owner and sign its credential; returns the credential envelope."""
    _check_key(key, "owner")
    if not is_currency(currency) or currency not in MINOR_UNIT_EXPONENT:
        raise RegistryError(f"currency {currency!r}: not an ISO 4217 code with a known minor unit")
    assert type(limit_micros) is int
    if limit_micros < 0:
        raise RegistryError("credit limit must be >= 0 micros")
    if await get_owner(tx, owner_id) is not None:
        raise RegistryError(f"owner {owner_id!r} exists")
    if await tx.fetchone("SELECT owner_id FROM owners WHERE key = ?", (key,)):
        raise RegistryError("owner key already registered")
    cred = OwnerCredential(
        owner_id=owner_id, key=key, not_before_ms=now_ms, not_after_ms=now_ms + validity_ms
    )
    try:
        signed = seal_signed(cred, issuer)
    except Declined as exc:
        raise RegistryError(str(exc)) from exc
    sql = (
        "INSERT INTO owners (owner_id, key, name, limit_micros, currency, funding_ref, status, "
        "nb, na, credential) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    )
    row = (owner_id, key, name or owner_id, limit_micros, currency, funding_ref, STATUS_ACTIVE)
    await tx.execute(sql, (*row, cred.not_before_ms, clamp_ms(cred.not_after_ms), signed.raw))
    await put_retained(tx, topics.owner_topic(owner_id), signed.raw)
    return signed.raw


async def get_owner(tx: Tx, owner_id: str) -> Owner | None:
    row = await tx.fetchone(
        "SELECT owner_id, key, name, limit_micros, currency, funding_ref, status, nb, na "
        "FROM owners WHERE owner_id = ?",
        (owner_id,),
    )
    if row is None:
        return None
    return Owner(row[0], bytes(row[1]), *row[2:9])


async def set_limit(tx: Tx, owner_id: str, limit_micros: int) -> None:
    """Change a credit limit. Lowering it below what is outstanding grants nothing new until
    settlement and returned leases bring the exposure under it; nothing is clawed back."""
    if limit_micros < 0:
        raise RegistryError("credit limit must be >= 0 micros")
    n = await tx.execute(
        "UPDATE owners SET limit_micros = ? WHERE owner_id = ?", (limit_micros, owner_id)
    )
    if n != 1:
        raise RegistryError(f"no owner {owner_id!r}")


async def add_fog(
    tx: Tx,
    issuer: nacl.signing.SigningKey,
    *,
    fog_id: str,
    key: bytes,
    now_ms: int,
    validity_ms: int = FOG_VALIDITY_MS_DEFAULT,
) -> bytes:
    _check_key(key, "fog")
    if await tx.fetchone("SELECT fog_id FROM fogs WHERE fog_id = ? OR key = ?", (fog_id, key)):
        raise RegistryError(f"fog {fog_id!r} or its key exists")
    cred = FogCredential(
        fog_id=fog_id, key=key, not_before_ms=now_ms, not_after_ms=now_ms + validity_ms
    )
    try:
        signed = seal_signed(cred, issuer)
    except Declined as exc:
        raise RegistryError(str(exc)) from exc
    await tx.execute(
        "INSERT INTO fogs (fog_id, key, credential) VALUES (?, ?, ?)", (fog_id, key, signed.raw)
    )
    await put_retained(tx, topics.fog_topic(fog_id), signed.raw)
    return signed.raw


async def fog_key(tx: Tx, fog_id: str) -> bytes | None:
    row = await tx.fetchone("SELECT key FROM fogs WHERE fog_id = ?", (fog_id,))
    return None if row is None else bytes(row[0])


async def fog_credential(tx: Tx, fog_id: str) -> bytes | None:
    row = await tx.fetchone("SELECT credential FROM fogs WHERE fog_id = ?", (fog_id,))
    return None if row is None else bytes(row[0])


async def bind_device(tx: Tx, envelope: bytes, proof: bytes, *, now_ms: int) -> Binding:
    """Register an owner-signed binding after checking the owner's signature, the owner's
    standing, the device's proof of possession (``protocol.signing.possession_proof``) and
    that its ``tx`` limit (one payment) does not exceed the owner's credit limit (``day`` may:
    it is per fog and day, leases bound what is spent)."""
    try:
        signed = open_envelope(envelope, Binding)
    except Declined as exc:
        raise RegistryError(f"binding refused: {exc}") from exc
    b = signed.msg
    owner = await get_owner(tx, b.owner_id)
    if owner is None or owner.status != STATUS_ACTIVE:
        raise RegistryError(f"binding refused: no active owner {b.owner_id!r}")
    if signed.signer != owner.key:
        raise RegistryError("binding refused: not signed by the owner's key")
    _check_key(b.device, "device")
    if await is_revoked(tx, b.device):
        raise RegistryError("binding refused: device key revoked")
    if not verify_possession(b.device, signed.body, proof):
        raise RegistryError("binding refused: proof of possession does not verify")
    if b.currency != owner.currency:
        raise RegistryError(f"binding refused: currency {b.currency} != owner's")
    if b.tx_max_micros > owner.limit_micros:
        raise RegistryError(
            f"binding refused: tx limit {b.tx_max_micros} micros exceeds the owner's credit "
            f"limit {owner.limit_micros}"
        )
    sql = (
        "INSERT INTO bindings (binding_id, device, owner_id, nb, na, currency, envelope, "
        "registered_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (binding_id) DO NOTHING"
    )
    row = (signed.id, b.device, b.owner_id, clamp_ms(b.not_before_ms))
    await tx.execute(sql, (*row, clamp_ms(b.not_after_ms), b.currency, envelope, now_ms))
    await put_retained(tx, topics.bind_topic(b.device), envelope)
    return b


async def is_revoked(tx: Tx, key: bytes) -> bool:
    return await tx.fetchone("SELECT 1 FROM revocations WHERE key = ?", (key,)) is not None


async def revoke(tx: Tx, issuer_key: bytes, envelope: bytes) -> Revocation:
    """Accept a revocation signed by the issuer (any key) or by an owner (its own key or its
    devices' keys). Idempotent: a key revoked twice keeps its first revocation."""
    try:
        signed = open_envelope(envelope, Revocation)
    except Declined as exc:
        raise RegistryError(f"revocation refused: {exc}") from exc
    key = signed.msg.key
    if signed.signer != issuer_key and not await _owner_may_revoke(tx, signed.signer, key):
        raise RegistryError("revocation refused: signer may not revoke this key")
    sql = (
        "INSERT INTO revocations (key, signer, time_ms, reason, envelope) "
        "VALUES (?, ?, ?, ?, ?) ON CONFLICT (key) DO NOTHING"
    )
    row = (key, signed.signer, clamp_ms(signed.msg.time_ms), signed.msg.reason, envelope)
    if await tx.execute(sql, row) == 1:
        await tx.execute("UPDATE owners SET status = ? WHERE key = ?", (STATUS_REVOKED, key))
        await put_retained(tx, topics.revoke_topic(key), envelope)
    return signed.msg


async def _owner_may_revoke(tx: Tx, signer: bytes, key: bytes) -> bool:
    row = await tx.fetchone("SELECT owner_id FROM owners WHERE key = ?", (signer,))
    if row is None:
        return False
    if key == signer:
        return True
    owned = await tx.fetchone(
        "SELECT 1 FROM bindings WHERE device = ? AND owner_id = ?", (key, row[0])
    )
    return owned is not None


async def issuer_revoke(
    tx: Tx, issuer: nacl.signing.SigningKey, key: bytes, *, reason: str, now_ms: int
) -> Revocation:
    raw = seal_signed(Revocation(key=key, time_ms=now_ms, reason=reason[:64]), issuer).raw
    return await revoke(tx, public_key(issuer), raw)


async def devices(tx: Tx, owner_id: str | None = None) -> list[DeviceRow]:
    sql = (
        "SELECT b.device, b.owner_id, b.currency, b.nb, b.na, "
        "(SELECT COUNT(*) FROM revocations r WHERE r.key = b.device) FROM bindings b"
    )
    params: tuple[object, ...] = ()
    if owner_id is not None:
        sql += " WHERE b.owner_id = ?"
        params = (owner_id,)
    sql += f" ORDER BY b.owner_id, b.device LIMIT {DEVICE_LIST_MAX}"
    rows = await tx.fetchall(sql, params)
    return [DeviceRow(bytes(r[0]), r[1], r[2], r[3], r[4], r[5] > 0) for r in rows]


async def login_devices(tx: Tx, *, now_ms: int) -> list[bytes]:
    """The devices that get a broker account (``cloud.accounts``): a binding valid at
    ``now_ms`` of an active owner, the device key not revoked. Ordered, at most
    ``DEVICE_LIST_MAX`` x 10."""
    rows = await tx.fetchall(
        "SELECT DISTINCT b.device FROM bindings b JOIN owners o ON o.owner_id = b.owner_id "
        "WHERE o.status = ? AND b.nb <= ? AND b.na > ? "
        "AND NOT EXISTS (SELECT 1 FROM revocations r WHERE r.key = b.device) "
        f"ORDER BY b.device LIMIT {DEVICE_LIST_MAX * 10}",
        (STATUS_ACTIVE, now_ms, now_ms),
    )
    return [bytes(r[0]) for r in rows]


async def login_fingerprint(tx: Tx) -> tuple[int, int, int]:
    """Changes whenever a binding, a revocation or an owner's status changes (cheap)."""
    row = await tx.fetchone(
        "SELECT (SELECT COUNT(*) FROM bindings), (SELECT COUNT(*) FROM revocations), "
        "(SELECT COUNT(*) FROM owners WHERE status = ?)",
        (STATUS_ACTIVE,),
    )
    assert row is not None
    return (int(row[0]), int(row[1]), int(row[2]))
