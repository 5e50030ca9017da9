"""``cloud.mirror.Importer`` over a real SQLite cloud store: what hand-provisioned material it
imports, in any order, and what it refuses without changing anything."""

from collections.abc import AsyncIterator
from pathlib import Path

import nacl.signing
import pytest

from cloud import leases, registry
from cloud.mirror import OWNER_LIMIT_MICROS, Importer
from cloud.sqlitestore import SqliteStore
from cloud.store import Store, Tx
from fogpay.provision import (
    Validity,
    bind_local_device,
    fog_credential,
    lease,
    make_binding,
    owner_credential,
    revocation,
)
from protocol.signing import public_key

NOW = 1_790_000_000_000


def key() -> nacl.signing.SigningKey:
    return nacl.signing.SigningKey.generate()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = await SqliteStore.open(str(tmp_path / "cloud.sqlite"))
    yield s
    await s.close()


async def rows(store: Store, table: str) -> int:
    async def fn(tx: Tx) -> int:
        row = await tx.fetchone(f"SELECT COUNT(*) FROM {table}")
        assert row is not None
        return int(row[0])

    n: int = await store.transact(fn)
    return n


async def snapshot(store: Store) -> dict[str, int]:
    tables = ("owners", "fogs", "bindings", "revocations", "leases", "retained")
    return {t: await rows(store, t) for t in tables}


VALID = Validity(NOW - 60_000, NOW + 86_400_000)


async def test_binding_before_its_owner_waits_then_imports(store: Store) -> None:
    issuer, owner, device = key(), key(), key()
    importer = Importer(store=store, issuer_key=public_key(issuer), clock=lambda: NOW)
    binding = make_binding(
        public_key(device),
        owner_id="acme",
        currency="EUR",
        tx_max_micros=1_000_000,
        day_max_micros=9_000_000,
        validity=VALID,
    )
    bind = bind_local_device(owner, device, binding)
    assert await importer.handle(bind.topic, bind.payload) == "pending"
    assert (await snapshot(store))["bindings"] == 0
    cred = owner_credential(issuer, owner_id="acme", owner_key=public_key(owner), validity=VALID)
    assert await importer.handle(cred.topic, cred.payload) == "remembered"
    assert (await snapshot(store))["bindings"] == 1  # the parked binding went in with it

    async def fn(tx: Tx) -> registry.Owner | None:
        return await registry.get_owner(tx, "acme")

    acme = await store.transact(fn)
    assert acme is not None and acme.currency == "EUR" and acme.key == public_key(owner)
    assert acme.limit_micros == OWNER_LIMIT_MICROS
    assert await importer.handle(bind.topic, bind.payload) == "known"
    assert importer.counters["pending_bind"] == 1 and importer.counters["imported_bind"] == 1


async def test_fog_lease_and_revocation_imported_once(store: Store) -> None:
    issuer, owner, fog = key(), key(), key()
    importer = Importer(store=store, issuer_key=public_key(issuer), clock=lambda: NOW)
    fog_pub = fog_credential(issuer, fog_id="fog-1", fog_key=public_key(fog), validity=VALID)
    cred = owner_credential(issuer, owner_id="acme", owner_key=public_key(owner), validity=VALID)
    grant = lease(
        issuer,
        owner_id="acme",
        fog_id="fog-1",
        amount_micros=5_000_000,
        currency="GBP",
        not_after_ms=NOW + 3_600_000,
    )
    revoke = revocation(issuer, key=public_key(key()), reason="lost", time_ms=NOW)
    for pub in (fog_pub, cred, grant, revoke):
        assert await importer.handle(pub.topic, pub.payload) in ("imported", "remembered")
    before = await snapshot(store)
    assert before["fogs"] == before["leases"] == before["revocations"] == before["owners"] == 1
    for pub in (fog_pub, grant, revoke):
        assert await importer.handle(pub.topic, pub.payload) == "known"
    assert await snapshot(store) == before

    async def fn(tx: Tx) -> int:
        return await leases.exposure(tx, "acme")

    assert await store.transact(fn) == 5_000_000  # the lease counts against the owner


async def test_refuses_what_the_issuer_did_not_sign_and_changes_nothing(store: Store) -> None:
    issuer, stranger, owner, device = key(), key(), key(), key()
    importer = Importer(store=store, issuer_key=public_key(issuer), clock=lambda: NOW)
    cred = owner_credential(issuer, owner_id="acme", owner_key=public_key(owner), validity=VALID)
    assert await importer.handle(cred.topic, cred.payload) == "remembered"
    forged = [
        owner_credential(stranger, owner_id="evil", owner_key=public_key(key()), validity=VALID),
        fog_credential(stranger, fog_id="fog-x", fog_key=public_key(key()), validity=VALID),
        lease(
            stranger,
            owner_id="acme",
            fog_id="fog-x",
            amount_micros=1,
            currency="EUR",
            not_after_ms=NOW + 1,
        ),
        revocation(stranger, key=public_key(owner), reason="x", time_ms=NOW),
    ]
    binding = make_binding(
        public_key(device),
        owner_id="acme",
        currency="EUR",
        tx_max_micros=1,
        day_max_micros=1,
        validity=VALID,
    )
    forged.append(bind_local_device(stranger, device, binding))  # not the owner's key
    for pub in forged:
        assert await importer.handle(pub.topic, pub.payload) == "refused"
    assert await importer.handle(cred.topic, b"\x94garbage") == "refused"
    assert await importer.handle("fogpay/1/trust/nonsense/x", cred.payload) == "ignored"
    assert await importer.handle(cred.topic, b"") == "ignored"  # a cleared retained topic
    assert set((await snapshot(store)).values()) == {0}


async def test_binding_in_another_currency_than_its_owner_is_refused(store: Store) -> None:
    issuer, owner = key(), key()
    importer = Importer(store=store, issuer_key=public_key(issuer), clock=lambda: NOW)
    cred = owner_credential(issuer, owner_id="acme", owner_key=public_key(owner), validity=VALID)
    await importer.handle(cred.topic, cred.payload)
    statuses = []
    for currency in ("EUR", "JPY"):
        device = key()
        binding = make_binding(
            public_key(device),
            owner_id="acme",
            currency=currency,
            tx_max_micros=1,
            day_max_micros=1,
            validity=VALID,
        )
        pub = bind_local_device(owner, device, binding)
        statuses.append(await importer.handle(pub.topic, pub.payload))
    assert statuses == ["imported", "refused"]
    assert (await snapshot(store))["bindings"] == 1
