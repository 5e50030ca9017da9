"""Registry refusals, what the cloud publishes, proofs, and settlement periods on a real store."""

import json
from typing import Any

import pytest

from cloud import registry
from cloud.errors import RegistryError
from cloud.proof import ProofError, build_proof, verify_proof
from cloud.settle import close_period
from cloud.store import Tx
from protocol import topics
from protocol.batch import decode_record
from protocol.messages import Binding, Intent, OwnerCredential
from protocol.signing import open_envelope, possession_proof, public_key, seal
from tests.cloud.world import World, new_key


async def bind(w: World, env: bytes, proof: bytes) -> Any:
    return await w.tx(lambda tx: registry.bind_device(tx, env, proof, now_ms=w.now))


@pytest.mark.parametrize("flaw", ["signer", "owner", "proof", "currency", "small_order"])
async def test_binding_refused(world: World, flaw: str) -> None:
    w = world
    await w.owner("alice")
    device = new_key()
    kw: dict[str, Any] = {}
    if flaw == "owner":
        kw["owner_id"] = "nobody"
    if flaw == "currency":
        kw["currency"] = "USD"
    if flaw == "small_order":  # the identity point: small order, refused as a key
        kw["device"] = bytes([1]) + bytes(31)
    env = w.binding("alice", device, **kw)
    if flaw == "signer":
        env = seal(open_envelope(env, Binding).msg, new_key())
    body = open_envelope(env, Binding).body
    proof = possession_proof(new_key() if flaw == "proof" else device, body)
    with pytest.raises(RegistryError):
        await bind(w, env, proof)

    async def n(tx: Tx) -> int:
        row = await tx.fetchone("SELECT COUNT(*) FROM bindings")
        assert row is not None
        return int(row[0])

    assert await w.tx(n) == 0


async def test_published_trust_never_carries_funding(world: World) -> None:
    w = world
    await w.owner("alice")
    await w.fog("fog-a")
    device = await w.device("alice")
    await w.tx(
        lambda tx: registry.issuer_revoke(
            tx, w.issuer, public_key(device), reason="x", now_ms=w.now
        )
    )
    published = dict(await w.tx(registry.retained))
    assert set(published) == {
        topics.owner_topic("alice"),
        topics.fog_topic("fog-a"),
        topics.bind_topic(public_key(device)),
        topics.revoke_topic(public_key(device)),
    }
    assert not any(b"mandate-alice" in p for p in published.values())


async def booked_intent(w: World, amount: int = 1_234) -> tuple[bytes, bytes]:
    await w.owner("alice")
    await w.owner("shop")
    fog = await w.fog("fog-a")
    device = await w.device("alice")
    lease_id = (await w.lease("alice", "fog-a")).lease.lease_id
    records = [
        fog.authorize(device, seq=q, lease_id=lease_id, amount=amount, payee="shop")
        for q in range(1, 6)
    ]
    await w.ingestor().ingest_batch(fog.cut(records))
    intent_env, _ = decode_record(records[3])
    return open_envelope(intent_env, Intent).id, records[3]


async def test_proof_verifies_offline_and_tampering_fails(world: World) -> None:
    w = world
    intent_id, _ = await booked_intent(w)
    proof = await w.tx(lambda tx: build_proof(tx, intent_id))
    assert proof is not None
    issuer = public_key(w.issuer)
    ok = verify_proof(json.dumps(proof), issuer)
    assert ok.batch == 1 and ok.owner_id == "alice" and ok.intent.seq == 4
    receipt_only = {k: proof[k] for k in ("fogpay_proof", "intent", "receipt", "fog_credential")}
    assert verify_proof(json.dumps(receipt_only), issuer).batch is None
    for key, value in (("index", 2), ("path", list(reversed(proof["path"]))), ("size", 4)):
        with pytest.raises(ProofError):
            verify_proof(json.dumps(proof | {key: value}), issuer)
    with pytest.raises(ProofError):
        verify_proof(json.dumps(proof), public_key(new_key()))
    assert await w.tx(lambda tx: build_proof(tx, bytes(32))) is None
    # the owner credential, issuer-signed, must be valid at the receipt's time too
    t = ok.receipt.time_ms
    for nb, na, valid in ((0, t - 1, False), (t + 1, t + 10, False), (t, t + 1, True)):
        owner = OwnerCredential(
            owner_id="alice", key=public_key(w.owners["alice"]), not_before_ms=nb, not_after_ms=na
        )
        swapped = proof | {"owner_credential": seal(owner, w.issuer).hex()}
        if valid:
            assert verify_proof(json.dumps(swapped), issuer).owner_id == "alice"
        else:
            with pytest.raises(ProofError, match="owner credential: not valid"):
                verify_proof(json.dumps(swapped), issuer)


async def test_periods_carry_remainders_and_never_resettle(world: World) -> None:
    w = world
    await booked_intent(w, amount=1_234)  # 5 x 1,234 micros = 6,170: 0 cents, all carried

    async def close(pid: str) -> Any:
        return await w.tx(lambda tx: close_period(tx, period_id=pid, until_ms=w.now, now_ms=w.now))

    first = await close("P1")
    assert first.report["balanced"] and first.plan.charges == ()
    eur = first.report["currencies"][0]
    assert eur["receipts_micros"] == eur["ledger_debits_micros"] == 6_170
    assert eur["charge_carry_out_micros"] == 6_170
    second = await close("P2")  # nothing new: nothing settled twice, the carry stays
    assert second.report["balanced"] and second.plan.charges == ()
    assert [c.charge_micros for c in second.plan.carries if c.owner_id == "alice"] == [6_170]
