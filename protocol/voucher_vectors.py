"""Golden vectors of device-to-device payments (docs/protocol.md 18.3):
``python -m protocol.voucher_vectors [out.json]``.

Writes ``protocol/vectors/voucher-v1.json`` (or the given path) with the fixed seeds of
``protocol.vectors``, so it is byte-for-byte reproducible. The file holds

- ``voucher_intent``: a voucher intent (payee ``voucher``, a payee-list memo) and the fog's ok
  receipt, and the ``vch`` the fog issues for them (``voucher_for``: a pure function of the
  record);
- ``envelopes``: valid ``vch`` (signed by the fog role) and ``d2d`` (signed by the device
  role) envelopes with seed, body bytes, envelope bytes and message id;
- ``malformed``: ``vch`` and ``d2d`` payloads to refuse, with the reason;
- ``bundles``: payer -> payee bundles ``[fog credential, vch, d2d]`` with the payee's id and
  clock, and the verdict of ``check_bundle`` under the issuer role's key (``ok`` or a fault).

``build()`` is pure; only ``main()`` touches the file system.
"""

import sys
from pathlib import Path
from typing import Any, Final

from protocol.batch import encode_record
from protocol.codec import pack
from protocol.messages import FogCredential, Intent, Receipt
from protocol.reasons import Reason
from protocol.signing import Signed, seal_signed
from protocol.vectors import (
    T0_MS,
    VERSION,
    YEAR_MS,
    entry,
    key,
    pub,
    seed,
    signed_envelope,
    write_vectors,
)
from protocol.voucher import (
    VOUCHER_PAYEE,
    Payment,
    Voucher,
    VoucherError,
    check_bundle,
    encode_bundle,
    encode_payees,
    voucher_for,
)

DEFAULT_PATH: Final = Path(__file__).parent / "vectors" / "voucher-v1.json"
LEASE_ID: Final = bytes(range(16))
AMOUNT: Final = 10_000_000


def _intent() -> tuple[Signed[Intent], Signed[Receipt]]:
    intent = seal_signed(
        Intent(
            device=pub("device"),
            fog_id="fog-1",
            seq=7,
            payee_id=VOUCHER_PAYEE,
            amount_micros=AMOUNT,
            currency="EUR",
            time_ms=T0_MS + 1_000,
            memo=encode_payees(["charger-7", "parking-2"]),
        ),
        key("device"),
    )
    receipt = seal_signed(
        Receipt(
            intent_id=intent.id,
            device=pub("device"),
            seq=7,
            status="ok",
            log_index=1,
            lease_id=LEASE_ID,
            time_ms=T0_MS + 1_005,
        ),
        key("fog"),
    )
    return intent, receipt


def _vch() -> bytes:
    intent, receipt = _intent()
    vch = voucher_for(intent.raw, receipt.raw, key("fog"))
    assert vch is not None
    return vch


def _fog_credential() -> bytes:
    cred = FogCredential(
        fog_id="fog-1", key=pub("fog"), not_before_ms=T0_MS, not_after_ms=T0_MS + YEAR_MS
    )
    return seal_signed(cred, key("issuer")).raw


def _payment(s: int, payee: str, a: int, u: int, t: int = T0_MS + 60_000) -> Payment:
    intent, _ = _intent()
    return Payment(
        voucher_id=intent.id, seq=s, payee_id=payee, amount_micros=a, spent_micros=u, time_ms=t
    )


def voucher_intent() -> dict[str, str]:
    intent, receipt = _intent()
    return {
        "intent": intent.raw.hex(),
        "receipt": receipt.raw.hex(),
        "record": encode_record(intent.raw, receipt.raw).hex(),
        "vch": _vch().hex(),
    }


def envelopes() -> list[dict[str, str]]:
    intent, receipt = _intent()
    plain = Voucher(
        voucher_id=intent.id,
        device=pub("device"),
        fog_id="fog-1",
        amount_micros=AMOUNT,
        currency="EUR",
        not_before_ms=receipt.msg.time_ms,
        not_after_ms=receipt.msg.time_ms + 86_400_000,
    )
    return [
        entry("vch_any_payee", "fog", plain),
        entry("vch_payees", "fog", _open_vch()),
        entry("d2d_first", "device", _payment(1, "charger-7", 2_500_000, 2_500_000)),
        entry("d2d_second", "device", _payment(2, "parking-2", 1_000_000, 3_500_000)),
    ]


def _open_vch() -> Voucher:
    from protocol.signing import open_envelope

    return open_envelope(_vch(), Voucher).msg


def malformed() -> list[dict[str, str]]:
    intent, _ = _intent()
    v = {
        "i": intent.id,
        "d": pub("device"),
        "f": "fog-1",
        "a": AMOUNT,
        "c": "EUR",
        "nb": T0_MS,
        "na": T0_MS + 1,
    }
    p = {"v": intent.id, "s": 1, "p": "charger-7", "a": 5, "u": 5, "t": T0_MS}
    cases: list[tuple[str, str, bytes, str]] = [
        ("vch_na_not_after_nb", "vch", pack(v | {"na": T0_MS}), "fog"),
        ("vch_pay_reserved", "vch", pack(v | {"pay": [VOUCHER_PAYEE]}), "fog"),
        ("vch_pay_empty", "vch", pack(v | {"pay": []}), "fog"),
        ("vch_pay_nine", "vch", pack(v | {"pay": [f"p{n}" for n in range(9)]}), "fog"),
        ("vch_amount_zero", "vch", pack(v | {"a": 0}), "fog"),
        ("vch_unknown_key", "vch", pack(v | {"x": 1}), "fog"),
        ("d2d_a_over_u", "d2d", pack(p | {"a": 6}), "device"),
        ("d2d_s_zero", "d2d", pack(p | {"s": 0}), "device"),
        ("d2d_s_over_u32", "d2d", pack(p | {"s": 2**32}), "device"),
        ("d2d_payee_reserved", "d2d", pack(p | {"p": VOUCHER_PAYEE}), "device"),
        ("d2d_missing_u", "d2d", pack({k: x for k, x in p.items() if k != "u"}), "device"),
    ]
    out = [
        {
            "name": name,
            "topic_type": t,
            "payload": signed_envelope(t, body, role).hex(),
            "reason": str(Reason.MALFORMED),
        }
        for name, t, body, role in cases
    ]
    good = bytes.fromhex(envelopes()[2]["envelope"])
    out.append(
        {
            "name": "d2d_bad_signature",
            "topic_type": "d2d",
            "payload": (good[:-1] + bytes([good[-1] ^ 1])).hex(),
            "reason": str(Reason.BAD_SIGNATURE),
        }
    )
    return out


def bundles() -> list[dict[str, Any]]:
    cred, vch = _fog_credential(), _vch()
    na = T0_MS + 1_005 + 86_400_000
    stranger_cred = seal_signed(
        FogCredential(
            fog_id="fog-1", key=pub("fog"), not_before_ms=T0_MS, not_after_ms=T0_MS + YEAR_MS
        ),
        key("stranger"),
    ).raw
    cases: list[tuple[str, bytes, Payment, str, int, str]] = [
        (
            "ok",
            cred,
            _payment(1, "charger-7", 2_500_000, 2_500_000),
            "charger-7",
            T0_MS + 61_000,
            "ok",
        ),
        (
            "other_payee",
            cred,
            _payment(1, "charger-7", 1, 1),
            "parking-2",
            T0_MS,
            "payee_not_allowed",
        ),
        (
            "payee_not_listed",
            cred,
            _payment(1, "shop-1", 1, 1),
            "shop-1",
            T0_MS,
            "payee_not_allowed",
        ),
        (
            "over_amount",
            cred,
            _payment(3, "charger-7", 1, AMOUNT + 1),
            "charger-7",
            T0_MS,
            "voucher_overspent",
        ),
        (
            "expired_at_payee",
            cred,
            _payment(1, "charger-7", 1, 1),
            "charger-7",
            na + 1,
            "voucher_expired",
        ),
        (
            "signed_after_na",
            cred,
            _payment(1, "charger-7", 1, 1, t=na + 1),
            "charger-7",
            T0_MS,
            "voucher_expired",
        ),
        (
            "fog_credential_not_issuer",
            stranger_cred,
            _payment(1, "charger-7", 1, 1),
            "charger-7",
            T0_MS,
            "bad_voucher",
        ),
    ]
    out = []
    for name, c, payment, payee, now, verdict in cases:
        d2d = seal_signed(payment, key("device")).raw
        data = encode_bundle(c, vch, d2d)
        try:
            check_bundle(data, issuer_key=pub("issuer"), payee_id=payee, now_ms=now)
            got = "ok"
        except VoucherError as exc:
            got = exc.code
        assert got == verdict, (name, got)
        out.append(
            {"name": name, "bundle": data.hex(), "payee": payee, "now_ms": now, "verdict": verdict}
        )
    return out


def build() -> dict[str, Any]:
    return {
        "version": VERSION,
        "issuer_seed": seed("issuer").hex(),
        "fog_seed": seed("fog").hex(),
        "device_seed": seed("device").hex(),
        "voucher_intent": voucher_intent(),
        "envelopes": envelopes(),
        "malformed": malformed(),
        "bundles": bundles(),
    }


def main(argv: list[str]) -> int:
    return write_vectors(argv, DEFAULT_PATH, build)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
