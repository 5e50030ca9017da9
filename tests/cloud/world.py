"""Test world for the cloud: real keys, real protocol messages, real batches.

``FogLog`` plays a fog's log as spec section 7 defines it (log index from 1, batches chained
by header id, RFC 9162 root), using only ``protocol`` functions; nothing here reimplements
the cloud.
"""

from dataclasses import dataclass, field
from typing import Any

import nacl.signing

from cloud import registry
from cloud.ingest import Ingestor
from cloud.leases import Granted, LeasePolicy, grant
from cloud.store import Store, Tx
from protocol import merkle
from protocol.batch import encode_batch, encode_record
from protocol.messages import ZERO_HASH, BatchHeader, Binding, Intent, Receipt
from protocol.signing import possession_proof, public_key, seal, seal_signed

T0 = 1_790_000_000_000  # a fixed "now" (ms): tests never read the wall clock


def new_key() -> nacl.signing.SigningKey:
    return nacl.signing.SigningKey.generate()


@dataclass
class FogLog:
    fog_id: str
    key: nacl.signing.SigningKey
    next_index: int = 1
    number: int = 0
    prev_id: bytes = ZERO_HASH

    def authorize(
        self,
        device: nacl.signing.SigningKey,
        *,
        seq: int,
        lease_id: bytes,
        amount: int = 1_000,
        payee: str = "payee",
        currency: str = "EUR",
        t: int = T0,
        fog_id: str | None = None,
    ) -> bytes:
        """An authorized intent as its record: [intent envelope, ok receipt envelope]."""
        intent = seal_signed(
            Intent(
                device=public_key(device),
                fog_id=fog_id or self.fog_id,
                seq=seq,
                payee_id=payee,
                amount_micros=amount,
                currency=currency,
                time_ms=t,
            ),
            device,
        )
        return self.receipt_record(intent.raw, intent.id, public_key(device), seq, lease_id, t)

    def receipt_record(
        self, intent_raw: bytes, intent_id: bytes, device: bytes, seq: int, lease_id: bytes, t: int
    ) -> bytes:
        receipt = Receipt(
            intent_id=intent_id,
            device=device,
            seq=seq,
            status="ok",
            log_index=self.next_index,
            lease_id=lease_id,
            time_ms=t,
        )
        self.next_index += 1
        return encode_record(intent_raw, seal(receipt, self.key))

    def cut(self, records: list[bytes], *, t: int = T0) -> bytes:
        self.number += 1
        header = seal_signed(
            BatchHeader(
                fog_id=self.fog_id,
                number=self.number,
                prev_id=self.prev_id,
                first_index=self.next_index - len(records),
                count=len(records),
                root=merkle.root_of_records(records),
                time_ms=t,
            ),
            self.key,
        )
        self.prev_id = header.id
        return encode_batch(header.raw, records)


@dataclass
class World:
    store: Store
    issuer: nacl.signing.SigningKey = field(default_factory=new_key)
    now: int = T0
    policy: LeasePolicy = field(default_factory=LeasePolicy)
    owners: dict[str, nacl.signing.SigningKey] = field(default_factory=dict)
    fogs: dict[str, FogLog] = field(default_factory=dict)
    limits: dict[str, int] = field(default_factory=dict)  # owner_id -> credit limit

    def clock(self) -> int:
        return self.now

    def ingestor(self, **kw: Any) -> Ingestor:
        return Ingestor(store=self.store, issuer=self.issuer, clock=self.clock, **kw)

    async def tx(self, fn: Any) -> Any:
        return await self.store.transact(fn)

    async def owner(
        self, owner_id: str, limit: int = 1_000_000_000, currency: str = "EUR", funding: str = ""
    ) -> None:
        key = new_key()
        self.owners[owner_id] = key
        self.limits[owner_id] = limit

        async def add(tx: Tx) -> bytes:
            return await registry.add_owner(
                tx,
                self.issuer,
                owner_id=owner_id,
                key=public_key(key),
                limit_micros=limit,
                currency=currency,
                funding_ref=funding or f"mandate-{owner_id}",
                now_ms=self.now - 1000,
            )

        await self.tx(add)

    async def fog(self, fog_id: str) -> FogLog:
        log = FogLog(fog_id, new_key())
        self.fogs[fog_id] = log

        async def add(tx: Tx) -> bytes:
            return await registry.add_fog(
                tx, self.issuer, fog_id=fog_id, key=public_key(log.key), now_ms=self.now - 1000
            )

        await self.tx(add)
        return log

    def binding(self, owner: str, device: nacl.signing.SigningKey, /, **kw: Any) -> bytes:
        """A binding signed by ``owner``'s key (``kw`` overrides any field)."""
        args: dict[str, Any] = {
            "device": public_key(device),
            "owner_id": owner,
            "not_before_ms": self.now - 1000,
            "not_after_ms": self.now + 86_400_000,
            "currency": "EUR",
            # the registry refuses a tx limit over the owner's credit limit
            "tx_max_micros": min(10_000_000, self.limits.get(owner, 10_000_000)),
            "day_max_micros": 100_000_000,
        }
        args.update(kw)
        return seal(Binding(**args), self.owners[owner])

    async def device(self, owner_id: str, **kw: Any) -> nacl.signing.SigningKey:
        device = new_key()
        env = self.binding(owner_id, device, **kw)
        from protocol.signing import open_envelope

        proof = possession_proof(device, open_envelope(env, Binding).body)
        await self.tx(lambda tx: registry.bind_device(tx, env, proof, now_ms=self.now))
        return device

    async def lease(self, owner_id: str, fog_id: str, amount: int = 100_000_000) -> Granted:
        async def g(tx: Tx) -> Granted:
            return await grant(
                tx,
                self.issuer,
                owner_id=owner_id,
                fog_id=fog_id,
                amount_micros=amount,
                now_ms=self.now,
                policy=LeasePolicy(request_micros_max=10**12),
            )

        granted: Granted = await self.tx(g)
        return granted


async def count(store: Store, table: str) -> int:
    async def q(tx: Tx) -> int:
        row = await tx.fetchone(f"SELECT COUNT(*) FROM {table}")
        assert row is not None
        return int(row[0])

    n: int = await store.transact(q)
    return n


STATE_TABLES = (
    "transfers",
    "accounts",
    "batches",
    "records",
    "held",
    "held_records",
    "chains",
    "rejected",
    "alarms",
    "revocations",
    "leases",
    "retained",
)


async def snapshot(store: Store) -> dict[str, list[Any]]:
    """Every row of every table that ingest may change (to prove nothing changed)."""

    async def q(tx: Tx) -> dict[str, list[Any]]:
        out = {}
        for t in STATE_TABLES:
            rows = await tx.fetchall(f"SELECT * FROM {t}")
            out[t] = sorted(
                tuple(bytes(v) if isinstance(v, memoryview) else v for v in r) for r in rows
            )
        return out

    snap: dict[str, list[Any]] = await store.transact(q)
    return snap
