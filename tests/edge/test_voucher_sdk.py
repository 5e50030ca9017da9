"""The SDK's device-to-device payments (edge/voucher.py, docs/protocol.md 18.3) on real files:
the payer's vouchers and spending survive a reopen (no sequence or micro signed twice), a
payment past the voucher is not signed, the payee refuses what contradicts what it holds and
keeps what it accepts held for upload."""

import shutil
from pathlib import Path

import nacl.signing
import pytest

from edge.device import Device
from edge.voucher import NoRoom, Payee, Payer
from protocol.batch import decode_record
from protocol.messages import FogCredential, Receipt
from protocol.signing import public_key, seal, seal_signed
from protocol.voucher import (
    VOUCHER_LIFE_MS,
    Payment,
    VoucherError,
    decode_bundle,
    encode_bundle,
    voucher_for,
)

T0 = 1_790_000_000_000
AMOUNT = 10_000


class World:
    def __init__(self, tmp_path: Path) -> None:
        self.issuer, self.fog = (
            nacl.signing.SigningKey.generate(),
            nacl.signing.SigningKey.generate(),
        )
        self.cred = seal(
            FogCredential(
                fog_id="fog-a",
                key=public_key(self.fog),
                not_before_ms=T0 - 1,
                not_after_ms=T0 + 10 * VOUCHER_LIFE_MS,
            ),
            self.issuer,
        )
        self.now = T0
        self.tmp = tmp_path

    def clock(self) -> int:
        return self.now

    def device(self, name: str) -> Device:
        return Device.open(
            self.tmp / name, fog_id="fog-a", fog_key=public_key(self.fog), clock=self.clock
        )

    def voucher(self, device: Device, seq: int = 1) -> bytes:
        """What the fog answers a voucher intent with (as fog/vouchers.py does)."""
        intent = device.new_intent("voucher", AMOUNT, "EUR")
        receipt = seal(
            Receipt(
                intent_id=intent.id,
                device=device.public_key,
                seq=intent.msg.seq,
                status="ok",
                log_index=seq,
                lease_id=bytes(16),
                time_ms=self.now,
            ),
            self.fog,
        )
        vch = voucher_for(intent.raw, receipt, self.fog)
        assert vch is not None
        return vch


def test_payer_spends_within_its_voucher_across_reopens(tmp_path: Path) -> None:
    w = World(tmp_path)
    payer = Payer(w.device("payer"), clock=w.clock)
    held = payer.add(w.cred, w.voucher(payer.device))
    vid = held.voucher.msg.voucher_id
    assert payer.add(w.cred, held.voucher.raw).left_micros == AMOUNT  # idempotent
    b1 = payer.pay("pad-2", 6_000)
    again = Payer(w.device("payer"), clock=w.clock)  # reopened: the state is on disk
    [h] = again.vouchers()
    assert (h.seq, h.spent_micros, h.left_micros) == (1, 6_000, 4_000)
    with pytest.raises(NoRoom):
        again.pay("pad-2", 4_001)
    b2 = again.pay("pad-3", 4_000, voucher_id=vid)
    _, _, d1 = decode_bundle(b1)
    _, _, d2 = decode_bundle(b2)
    assert d1 != d2
    with pytest.raises(NoRoom):
        again.pay("pad-2", 1)
    # an expired voucher is not spent
    fresh = again.add(w.cred, w.voucher(again.device, seq=2))
    w.now += VOUCHER_LIFE_MS + 1
    with pytest.raises(NoRoom):
        again.pay("pad-2", 1, voucher_id=fresh.voucher.msg.voucher_id)


def test_payer_keeps_only_its_own_vouchers_from_its_fog(tmp_path: Path) -> None:
    w = World(tmp_path)
    payer, other = Payer(w.device("payer")), w.device("other")
    with pytest.raises(VoucherError):
        payer.add(w.cred, w.voucher(other))  # another device's voucher
    stranger = seal(
        FogCredential(
            fog_id="fog-a",
            key=public_key(nacl.signing.SigningKey.generate()),
            not_before_ms=T0 - 1,
            not_after_ms=T0 + 1,
        ),
        w.issuer,
    )
    with pytest.raises(VoucherError):
        payer.add(stranger, w.voucher(payer.device))


def test_payee_checks_keeps_and_holds(tmp_path: Path) -> None:
    w = World(tmp_path)
    payer = Payer(w.device("payer"), clock=w.clock)
    payer.add(w.cred, w.voucher(payer.device))
    pad = w.device("pad")
    issuer = public_key(w.issuer)
    payee = Payee(pad, payee_id="pad-2", issuer_key=issuer, clock=w.clock)
    b1 = payer.pay("pad-2", 3_000)
    checked = payee.accept(b1)
    assert payee.accept(b1).payment.id == checked.payment.id  # idempotent
    [record] = pad.held_records()
    vch, d2d = decode_record(record)
    assert (vch, d2d) == (checked.voucher.raw, checked.payment.raw)
    # a clone of the payer signs another payment at s = 1: refused by the payee that holds s = 1
    clone_dir = tmp_path / "clone"
    shutil.copytree(tmp_path / "payer", clone_dir)
    clone = Payer(
        Device.open(clone_dir, fog_id="fog-a", fog_key=public_key(w.fog), clock=w.clock),
        clock=w.clock,
    )
    clone._held = {
        k: v.__class__(v.voucher, v.fog_credential, 0, 0) for k, v in clone._held.items()
    }
    with pytest.raises(VoucherError) as info:
        Payee(w.device("pad"), payee_id="pad-2", issuer_key=issuer, clock=w.clock).accept(
            clone.pay("pad-2", 1_000)
        )
    assert info.value.code == "voucher_seq_conflict"  # the kept payments survived a reopen
    # the payer's s = 2 claims less spent than s = 1 already was: cumulatives do not add up
    fog_cred, vch_env, _ = decode_bundle(b1)
    lying = seal_signed(
        Payment(
            voucher_id=checked.payment.msg.voucher_id,
            seq=2,
            payee_id="pad-2",
            amount_micros=1_000,
            spent_micros=2_000,
            time_ms=w.now,
        ),
        payer.device._key,
    )
    with pytest.raises(VoucherError) as info:
        payee.accept(encode_bundle(fog_cred, vch_env, lying.raw))
    assert info.value.code == "voucher_overspent"
    with pytest.raises(VoucherError) as info:
        Payee(pad, payee_id="pad-9", issuer_key=issuer, clock=w.clock).accept(payer.pay("pad-2", 1))
    assert info.value.code == "payee_not_allowed"
    w.now += VOUCHER_LIFE_MS + 1
    with pytest.raises(VoucherError) as info:
        payee.accept(b1)  # every bundle is checked again, at the payee's clock
    assert info.value.code == "voucher_expired"
    assert len(pad.held_records()) == 1
