"""Device-to-device payments handed in (cloud/vouchers.py, docs/protocol.md 18.3), against a
real store (SQLite and PostgreSQL): the voucher intent is booked like any record (into the
escrow), each payment is booked once and never past the voucher's amount, a voucher spent twice
is attributed to its device and the device is suspended, a payment whose voucher intent has
not arrived is left for later, and the owner's escrow adds up."""

import nacl.signing

from cloud import ledger, registry, vouchers
from cloud.booking import ALARM_CLONED_KEY
from cloud.core import CloudCore
from cloud.events import Publish
from cloud.ingest import Status
from cloud.leases import LeasePolicy, exposure
from cloud.store import Tx
from protocol import topics
from protocol.batch import decode_record
from protocol.codec import pack
from protocol.held import HeldAck, encode_held
from protocol.signing import Signed, open_envelope, public_key, seal_signed
from protocol.voucher import (
    FAULT_BAD_VOUCHER,
    FAULT_OVERSPENT,
    FAULT_PAYEE,
    VOUCHER_GRACE_MS,
    VOUCHER_LIFE_MS,
    VOUCHER_PAYEE,
    Payment,
    Voucher,
    encode_payees,
    voucher_for,
)
from tests.cloud.world import T0, World, count, new_key

VOUCHER = 10_000


def core_of(w: World) -> CloudCore:
    return CloudCore(store=w.store, issuer=w.issuer, clock=w.clock, policy=LeasePolicy())


def hack_of(w: World, published: list[Publish], device: bytes) -> HeldAck:
    [hack] = [p for p in published if p.topic == topics.held_ack_topic(device)]
    return open_envelope(hack.payload, HeldAck, signer=public_key(w.issuer)).msg


async def voucher(
    w: World,
    core: CloudCore,
    payer: nacl.signing.SigningKey,
    *,
    seq: int = 1,
    book: bool = True,
    memo: bytes | None = None,
    amount: int = VOUCHER,
) -> bytes:
    """A voucher intent authorized by fog-a (booked by its batch when ``book``): the vch."""
    fog = w.fogs["fog-a"]
    lease_id = w.lease_ids["fog-a"]  # type: ignore[attr-defined]
    record = fog.authorize(payer, seq=seq, lease_id=lease_id, amount=amount, payee=VOUCHER_PAYEE)
    if memo is not None:  # the same intent with a memo (the payee list)
        from protocol.messages import Intent

        intent = seal_signed(
            Intent(
                device=public_key(payer),
                fog_id="fog-a",
                seq=seq,
                payee_id=VOUCHER_PAYEE,
                amount_micros=amount,
                currency="EUR",
                time_ms=T0,
                memo=memo,
            ),
            payer,
        )
        fog.next_index -= 1
        record = fog.receipt_record(intent.raw, intent.id, public_key(payer), seq, lease_id, T0)
    if book:
        out = await core.ingest_batch(fog.cut([record]))
        assert out.status == Status.BOOKED and out.booked == 1
    else:  # never batched (the fog's batch is still on its way): its index is reused
        fog.next_index -= 1
    intent_env, receipt_env = decode_record(record)
    vch = voucher_for(intent_env, receipt_env, fog.key)
    assert vch is not None
    return vch


def payment(
    payer: nacl.signing.SigningKey, vch: bytes, *, s: int, payee: str, a: int, u: int
) -> Signed[Payment]:
    vid = open_envelope(vch, Voucher).msg.voucher_id
    return seal_signed(
        Payment(
            voucher_id=vid, seq=s, payee_id=payee, amount_micros=a, spent_micros=u, time_ms=T0 + 1
        ),
        payer,
    )


async def setup(w: World) -> tuple[CloudCore, nacl.signing.SigningKey]:
    await w.owner("alice")
    await w.fog("fog-a")
    w.lease_ids = {"fog-a": (await w.lease("alice", "fog-a", 1_000_000)).lease.lease_id}  # type: ignore[attr-defined]
    return core_of(w), await w.device("alice")


async def escrow(w: World) -> dict[str, int]:
    async def q(tx: Tx) -> dict[str, int]:
        return (await vouchers.escrow(tx, "alice", now_ms=w.now)).as_json()

    out: dict[str, int] = await w.tx(q)
    return out


async def test_payments_booked_once_within_the_voucher(world: World) -> None:
    w = world
    core, payer = await setup(w)
    vch = await voucher(w, core, payer)
    assert await w.tx(lambda tx: exposure(tx, "alice")) == 1_000_000  # the lease, unchanged
    p1 = payment(payer, vch, s=1, payee="parking-7", a=3_000, u=3_000)
    p2 = payment(payer, vch, s=2, payee="pad-2", a=5_000, u=8_000)
    payee = public_key(new_key())  # whoever hands in: the payee is paid by id
    judged, published = await core.held_upload(
        encode_held([pack([vch, p1.raw]), pack([vch, p2.raw])]), payee
    )
    assert (judged.booked, judged.already, judged.rejected) == (2, 0, 0)
    ack = hack_of(w, published, payee)
    assert list(ack.booked) == [p1.id, p2.id] and ack.faults == []
    assert await count(w.store, "voucher_payments") == 2
    assert await escrow(w) == {
        "vouchers": 1,
        "deposited_micros": VOUCHER,
        "spent_micros": 8_000,
        "outstanding_micros": 2_000,
        "returnable_micros": 0,
        "returned_micros": 0,
    }
    # handed in again (by another device, too): listed booked, nothing changes
    judged, published = await core.held_upload(encode_held([pack([vch, p1.raw])]), payee)
    assert (judged.booked, judged.already) == (0, 1)
    assert list(hack_of(w, published, payee).booked) == [p1.id]
    assert await count(w.store, "voucher_payments") == 2
    # past the grace the rest of the escrow is returnable
    w.now = T0 + VOUCHER_LIFE_MS + VOUCHER_GRACE_MS + 1
    assert (await escrow(w))["returnable_micros"] == 2_000
    late = payment(payer, vch, s=3, payee="pad-2", a=1_000, u=9_000)
    judged, published = await core.held_upload(encode_held([pack([vch, late.raw])]), payee)
    assert hack_of(w, published, payee).faults == [(late.id, "voucher_expired")]
    # the unspent escrow returns to the owner, once; the books still balance (the fixture)
    shown = await w.tx(lambda tx: vouchers.return_expired(tx, now_ms=w.now, apply=False))
    assert [d.unspent_micros for d in shown] == [2_000]
    assert await count(w.store, "voucher_returns") == 0
    done = await w.tx(lambda tx: vouchers.return_expired(tx, now_ms=w.now, apply=True))
    assert [(d.owner_id, d.unspent_micros) for d in done] == [("alice", 2_000)]
    assert await w.tx(lambda tx: vouchers.return_expired(tx, now_ms=w.now, apply=True)) == []
    assert (await escrow(w))["returned_micros"] == 2_000
    assert (await escrow(w))["returnable_micros"] == 0

    async def balances(tx: Tx) -> dict[str, int]:
        return {a: await ledger.balance(tx, a, "EUR") for a in ("alice", "voucher", "pad-2")}

    assert await w.tx(balances) == {"alice": -VOUCHER + 2_000, "voucher": 0, "pad-2": 5_000}


async def test_double_spending_is_booked_up_to_the_amount_and_suspends_the_device(
    world: World,
) -> None:
    w = world
    core, payer = await setup(w)
    d = public_key(payer)
    vch = await voucher(w, core, payer)
    a = payment(payer, vch, s=1, payee="parking-7", a=6_000, u=6_000)
    b = payment(payer, vch, s=1, payee="pad-2", a=3_000, u=3_000)  # the same s again
    c = payment(payer, vch, s=2, payee="pad-3", a=2_000, u=8_000)  # past the amount in all
    payee = public_key(new_key())
    judged, published = await core.held_upload(encode_held([pack([vch, a.raw])]), payee)
    assert judged.booked == 1
    judged, published = await core.held_upload(
        encode_held([pack([vch, b.raw]), pack([vch, c.raw])]), payee
    )
    ack = hack_of(w, published, payee)
    assert list(ack.booked) == [b.id]  # still fits the amount: the payee was served
    assert ack.faults == [(c.id, FAULT_OVERSPENT)]
    assert await escrow(w) == {
        "vouchers": 1,
        "deposited_micros": VOUCHER,
        "spent_micros": 9_000,
        "outstanding_micros": 1_000,
        "returnable_micros": 0,
        "returned_micros": 0,
    }

    async def alarms(tx: Tx) -> list[tuple[str, str]]:
        rows = await tx.fetchall("SELECT kind, subject FROM alarms ORDER BY kind")
        return [(str(k), str(s)) for k, s in rows]

    assert await w.tx(alarms) == [(vouchers.ALARM_DOUBLE_SPENT, d.hex())]
    assert ALARM_CLONED_KEY not in dict(await w.tx(alarms))
    assert await w.tx(lambda tx: registry.is_revoked(tx, d))

    async def reason(tx: Tx) -> str:
        row = await tx.fetchone("SELECT reason FROM revocations WHERE key = ?", (d,))
        assert row is not None
        return str(row[0])

    assert await w.tx(reason) == vouchers.SUSPEND_REASON
    assert any(p.topic == topics.revoke_topic(d) for p in published)


async def test_pending_refused_and_payee_lists(world: World) -> None:
    w = world
    core, payer = await setup(w)
    payee = public_key(new_key())
    # the voucher intent has not reached the cloud: in neither list, nothing written
    early = await voucher(w, core, payer, seq=1, book=False)
    p = payment(payer, early, s=1, payee="pad-2", a=1_000, u=1_000)
    judged, published = await core.held_upload(encode_held([pack([early, p.raw])]), payee)
    ack = hack_of(w, published, payee)
    assert (list(ack.booked), ack.faults) == ([], []) and judged.rejected == 0
    assert await count(w.store, "voucher_payments") == 0
    # a voucher limited to one payee; a payment to another, and one signed by a stranger
    listed = await voucher(w, core, payer, seq=2, memo=encode_payees(["pad-2"]))
    wrong = payment(payer, listed, s=1, payee="pad-9", a=1_000, u=1_000)
    forged = payment(new_key(), listed, s=2, payee="pad-2", a=1_000, u=2_000)
    fake_fog = voucher_for(
        *decode_record(
            w.fogs["fog-a"].authorize(
                payer,
                seq=3,
                lease_id=w.lease_ids["fog-a"],
                amount=VOUCHER,
                payee=VOUCHER_PAYEE,  # type: ignore[attr-defined]
            )
        ),
        new_key(),
    )
    assert fake_fog is not None
    fake = payment(payer, fake_fog, s=1, payee="pad-2", a=1_000, u=1_000)
    judged, published = await core.held_upload(
        encode_held(
            [pack([listed, wrong.raw]), pack([listed, forged.raw]), pack([fake_fog, fake.raw])]
        ),
        payee,
    )
    ack = hack_of(w, published, payee)
    assert ack.booked == () and ack.faults == [
        (wrong.id, FAULT_PAYEE),
        (fake.id, FAULT_BAD_VOUCHER),
    ]
    assert judged.rejected == 3  # the forged payment has no trustworthy id: in neither list
    assert await count(w.store, "voucher_payments") == 0
    assert not await w.tx(lambda tx: registry.is_revoked(tx, public_key(payer)))


async def test_a_cumulative_past_the_amount_is_attributed_only_on_a_real_voucher(
    world: World,
) -> None:
    w = world
    core, payer = await setup(w)
    d = public_key(payer)
    payee = public_key(new_key())
    fake = voucher_for(
        *decode_record(
            w.fogs["fog-a"].authorize(
                payer,
                seq=9,
                lease_id=w.lease_ids["fog-a"],
                amount=VOUCHER,
                payee=VOUCHER_PAYEE,  # type: ignore[attr-defined]
            )
        ),
        new_key(),
    )
    assert fake is not None
    w.fogs["fog-a"].next_index -= 1  # that record never reaches a batch
    over_fake = payment(payer, fake, s=1, payee="pad-2", a=1_000, u=VOUCHER + 1)
    _, published = await core.held_upload(encode_held([pack([fake, over_fake.raw])]), payee)
    assert hack_of(w, published, payee).faults == [(over_fake.id, FAULT_BAD_VOUCHER)]
    assert not await w.tx(lambda tx: registry.is_revoked(tx, d))  # nothing proven against d
    vch = await voucher(w, core, payer, seq=10)
    over = payment(payer, vch, s=1, payee="pad-2", a=1_000, u=VOUCHER + 1)
    _, published = await core.held_upload(encode_held([pack([vch, over.raw])]), payee)
    assert hack_of(w, published, payee).faults == [(over.id, FAULT_OVERSPENT)]
    assert await w.tx(lambda tx: registry.is_revoked(tx, d))
    assert await count(w.store, "voucher_payments") == 0


async def test_settlement_pays_d2d_payees_and_refunds_returned_escrow_once(world: World) -> None:
    """The voucher intent charges its owner like any payment but pays nobody: the escrow pays
    each d2d payee when its payment is booked, and the owner when its unspent escrow is
    returned, each in one period only; the reconciliation report balances with the escrow."""
    from cloud.settle import close_period

    w = world
    await w.owner("parking-7", funding="")  # a payee with an account (manual rail)
    core, payer = await setup(w)
    vch = await voucher(w, core, payer, amount=500_000)  # 0.50 EUR
    p1 = payment(payer, vch, s=1, payee="parking-7", a=120_000, u=120_000)
    await core.held_upload(encode_held([pack([vch, p1.raw])]), public_key(new_key()))

    async def lines(period: str) -> dict[tuple[str, str], int]:
        rows = await w.tx(
            lambda tx: tx.fetchall(
                "SELECT kind, owner_id, micros FROM settlement_lines WHERE period_id = ?",
                (period,),
            )
        )
        return {(str(r[0]), str(r[1])): int(r[2]) for r in rows}

    closed = await w.tx(lambda tx: close_period(tx, period_id="P1", until_ms=w.now, now_ms=w.now))
    assert closed.report["balanced"], closed.report["mismatches"]
    [eur] = closed.report["currencies"]
    assert (eur["escrow_in_micros"], eur["escrow_out_micros"]) == (500_000, 120_000)
    # alice is charged the whole voucher; the payee is paid its 0.12 EUR; nobody is paid 'voucher'
    assert await lines("P1") == {("charge", "alice"): 500_000, ("payout", "parking-7"): 120_000}
    # the voucher expires; its unspent 0.38 EUR go back to alice and are paid out to her next
    w.now += VOUCHER_LIFE_MS + VOUCHER_GRACE_MS + 1
    await w.tx(lambda tx: vouchers.return_expired(tx, now_ms=w.now, apply=True))
    closed = await w.tx(lambda tx: close_period(tx, period_id="P2", until_ms=w.now, now_ms=w.now))
    assert closed.report["balanced"], closed.report["mismatches"]
    assert await lines("P2") == {("payout", "alice"): 380_000}
    # nothing is paid twice: a third period has no lines
    w.now += 1
    closed = await w.tx(lambda tx: close_period(tx, period_id="P3", until_ms=w.now, now_ms=w.now))
    assert closed.report["balanced"] and await lines("P3") == {}
    assert (await w.tx(ledger.check)).ok
