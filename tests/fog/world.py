"""Real signed material for the fog tests: an issuer, owners, devices, leases, intents."""

import itertools
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import nacl.signing

from fog.authorize import Policy
from fog.store import Arrival, FogStore, Outcome
from protocol.messages import Binding, Intent, Lease, OwnerCredential, Receipt, Revocation
from protocol.signing import open_envelope, public_key, seal

DAY_MS: Final = 86_400_000
NOW: Final = 1_790_000_000_000 + 12 * 3_600_000  # noon UTC
FOG_ID: Final = "fog-1"


def key() -> nacl.signing.SigningKey:
    return nacl.signing.SigningKey.generate()


@dataclass
class World:
    path: Path
    policy: Policy = field(default_factory=lambda: Policy(rate_burst=10_000, rate_per_s=10_000.0))
    fog_id: str = FOG_ID
    issuer: nacl.signing.SigningKey = field(default_factory=key)
    fog_key: nacl.signing.SigningKey = field(default_factory=key)
    _lease_ids: "itertools.count[int]" = field(default_factory=lambda: itertools.count(1))

    def __post_init__(self) -> None:
        self.store = self.open()

    def open(self) -> FogStore:
        return FogStore.open(
            self.path,
            fog_id=self.fog_id,
            fog_key=self.fog_key,
            issuer_key=public_key(self.issuer),
            policy=self.policy,
        )

    def reopen(self) -> FogStore:
        self.store.close()
        self.store = self.open()
        return self.store

    def trust(self, msg_type: str, envelope: bytes, now_ms: int = NOW) -> None:
        out = self.store.put_trust(msg_type, envelope, now_ms=now_ms)
        assert out.status == "accepted", out

    def owner(
        self, owner_id: str = "acme", *, nb: int = NOW - DAY_MS, na: int = NOW + 365 * DAY_MS
    ) -> nacl.signing.SigningKey:
        k = key()
        cred = OwnerCredential(
            owner_id=owner_id, key=public_key(k), not_before_ms=nb, not_after_ms=na
        )
        self.trust("owner", seal(cred, self.issuer))
        return k

    def binding(
        self,
        owner_key: nacl.signing.SigningKey,
        device: bytes,
        *,
        owner_id: str = "acme",
        currency: str = "EUR",
        tx: int = 5_000_000,
        day: int = 50_000_000,
        pay: tuple[str, ...] | None = None,
        nb: int = NOW - DAY_MS,
        na: int = NOW + 365 * DAY_MS,
    ) -> bytes:
        b = Binding(
            device=device,
            owner_id=owner_id,
            not_before_ms=nb,
            not_after_ms=na,
            currency=currency,
            tx_max_micros=tx,
            day_max_micros=day,
            payees=pay,
        )
        return seal(b, owner_key)

    def device(
        self, owner_key: nacl.signing.SigningKey, owner_id: str = "acme", **kw: object
    ) -> nacl.signing.SigningKey:
        k = key()
        self.trust("bind", self.binding(owner_key, public_key(k), owner_id=owner_id, **kw))  # type: ignore[arg-type]
        return k

    def lease_envelope(
        self,
        owner_id: str = "acme",
        amount: int = 100_000_000,
        *,
        currency: str = "EUR",
        na: int = NOW + DAY_MS,
        fog_id: str | None = None,
        lease_id: bytes | None = None,
    ) -> bytes:
        lid = lease_id or next(self._lease_ids).to_bytes(16, "big")
        lease = Lease(
            lease_id=lid,
            owner_id=owner_id,
            fog_id=fog_id or self.fog_id,
            amount_micros=amount,
            currency=currency,
            not_after_ms=na,
        )
        return seal(lease, self.issuer)

    def lease(self, owner_id: str = "acme", amount: int = 100_000_000, **kw: object) -> bytes:
        env = self.lease_envelope(owner_id, amount, **kw)  # type: ignore[arg-type]
        self.trust("lease", env)
        return open_envelope(env, Lease).msg.lease_id

    def revoke(self, k: bytes, signer: nacl.signing.SigningKey | None = None) -> None:
        r = Revocation(key=k, time_ms=NOW, reason="test")
        self.trust("revoke", seal(r, signer or self.issuer))

    def intent(
        self,
        dev: nacl.signing.SigningKey,
        seq: int,
        amount: int = 1_000_000,
        *,
        payee: str = "shop",
        currency: str = "EUR",
        t: int = NOW,
        fog_id: str | None = None,
        memo: bytes | None = None,
    ) -> bytes:
        i = Intent(
            device=public_key(dev),
            fog_id=fog_id or self.fog_id,
            seq=seq,
            payee_id=payee,
            amount_micros=amount,
            currency=currency,
            time_ms=t,
            memo=memo,
        )
        return seal(i, dev)

    def send(
        self, *items: tuple[nacl.signing.SigningKey | bytes, bytes], now_ms: int = NOW
    ) -> list[Outcome]:
        arrivals = [
            Arrival(d if isinstance(d, bytes) else public_key(d), payload) for d, payload in items
        ]
        outcomes = self.store.process(arrivals, now_ms=now_ms)
        assert len(outcomes) == len(arrivals)
        for o in outcomes:
            r = open_envelope(o.receipt, Receipt, signer=public_key(self.fog_key)).msg
            assert (r.intent_id, r.device, r.seq, r.status, r.reason, r.log_index) == (
                o.intent_id,
                o.device,
                o.seq,
                o.status,
                o.reason,
                o.log_index,
            )
        return outcomes

    def pay(
        self,
        dev: nacl.signing.SigningKey,
        seq: int,
        amount: int = 1_000_000,
        *,
        now_ms: int = NOW,
        **kw: object,
    ) -> Outcome:
        return self.send((dev, self.intent(dev, seq, amount, **kw)), now_ms=now_ms)[0]  # type: ignore[arg-type]

    def money_dump(self) -> list[tuple[object, ...]]:
        """Every row of the tables that hold money and sequence state, from a second
        connection (what is durable, not what this connection caches)."""
        conn = sqlite3.connect(self.path)
        try:
            rows: list[tuple[object, ...]] = []
            for table in ("leases", "devices", "log", "batches"):
                rows += [(table, *r) for r in conn.execute(f"SELECT * FROM {table} ORDER BY 1")]
            return rows
        finally:
            conn.close()

    def drawn(self) -> dict[bytes, tuple[int, int]]:
        conn = sqlite3.connect(self.path)
        try:
            rows = conn.execute("SELECT lease_id, amount_micros, drawn_micros FROM leases")
            return {bytes(r[0]): (r[1], r[2]) for r in rows}
        finally:
            conn.close()
