"""Device-to-device payments in the SDK (docs/protocol.md 18.3): the payer's and the payee's
sides.

Payer (``Payer``): ``obtain`` pays an intent to the reserved payee ``voucher`` through the fog
and keeps the fog's ``vch`` with the fog's credential (read from its retained trust topic);
``pay`` then signs a ``d2d`` payment against a voucher with room and returns the **bundle**
for the payee (fog credential, voucher, payment), needing no network at all. Its state,
``vouchers.json`` in the device's directory, is rewritten atomically (temporary file, fsync,
rename, fsync of the directory) **before** the bundle is returned: a crash never lets the
device sign two payments at one voucher sequence or past the voucher's amount.

Payee (``Payee``): ``accept`` checks a bundle with the issuer key alone
(``protocol.voucher.check_bundle``), refuses a payment that contradicts one it already holds
of the same voucher (another payment at its sequence, or cumulatives that do not add up), and
keeps it: appended to ``d2d-in.jsonl`` and held for upload (``Device.hold``), so
``Device.upload_held`` (``fogpay edge upload``) hands it in with the device's receipts; the
cloud's ``hack`` lists it by its payment id.
"""

import asyncio
import contextlib
import json
import os
from dataclasses import dataclass
from typing import Any, Final

import aiomqtt
import structlog

from edge.device import (
    PAY_TIMEOUT_S_DEFAULT,
    RETRIES_MAX,
    RETRIES_MAX_DEFAULT,
    UNSUBSCRIBE_TIMEOUT_S,
    Device,
    DeviceStateError,
    PaymentDeclined,
    PaymentTimeout,
    time_ms,
)
from protocol import topics
from protocol.errors import Declined
from protocol.messages import FogCredential
from protocol.signing import Signed, open_envelope
from protocol.voucher import (
    FAULT_OVERSPENT,
    FAULT_SEQ,
    VOUCHER_PAYEE,
    Checked,
    Payment,
    Voucher,
    VoucherError,
    check_bundle,
    encode_bundle,
    encode_payees,
    open_voucher,
)
from runtime.files import write_atomic

log = structlog.get_logger(component="edge")

VOUCHERS_FILE: Final = "vouchers.json"
D2D_IN_FILE: Final = "d2d-in.jsonl"
VOUCHERS_KEPT_MAX: Final = 256


class NoRoom(DeviceStateError):
    """No voucher of this device has room for the payment (or all have expired)."""


@dataclass(frozen=True, slots=True)
class Held:
    """A voucher the payer holds, with what it has spent on it."""

    voucher: Signed[Voucher]
    fog_credential: bytes
    seq: int  # the last payment's s (0: none yet)
    spent_micros: int

    @property
    def left_micros(self) -> int:
        return self.voucher.msg.amount_micros - self.spent_micros

    def as_json(self) -> dict[str, Any]:
        v = self.voucher.msg
        return {
            "voucher": self.voucher.msg.voucher_id.hex(),
            "amount_micros": v.amount_micros,
            "spent_micros": self.spent_micros,
            "left_micros": self.left_micros,
            "currency": v.currency,
            "fog_id": v.fog_id,
            "not_after_ms": v.not_after_ms,
            "payees": list(v.payees) if v.payees is not None else None,
            "payments": self.seq,
        }


class Payer:
    """The payer's side of a device: its vouchers, and payments signed against them."""

    def __init__(self, device: Device, *, clock: Any = time_ms) -> None:
        self.device = device
        self._clock = clock
        self._path = device.state_dir / VOUCHERS_FILE
        self._held: dict[bytes, Held] = self._load()

    def _load(self) -> dict[bytes, Held]:
        if not self._path.exists():
            return {}
        try:
            rows = json.loads(self._path.read_text())
            out = {}
            for row in rows:
                voucher = open_voucher(bytes.fromhex(row["vch"]))
                out[voucher.msg.voucher_id] = Held(
                    voucher, bytes.fromhex(row["fog"]), int(row["seq"]), int(row["spent"])
                )
        except (ValueError, KeyError, TypeError, VoucherError) as exc:
            raise DeviceStateError(f"{self._path}: corrupt ({exc}); refusing to guess") from None
        return out

    def _save(self) -> None:
        rows = [
            {
                "vch": h.voucher.raw.hex(),
                "fog": h.fog_credential.hex(),
                "seq": h.seq,
                "spent": h.spent_micros,
            }
            for h in self._held.values()
        ]
        write_atomic(self._path, json.dumps(rows).encode("ascii"))

    def vouchers(self) -> list[Held]:
        return list(self._held.values())

    def add(self, fog_credential: bytes, vch: bytes) -> Held:
        """Keep a voucher the fog issued to this device (idempotent)."""
        voucher = open_voucher(vch, self.device.fog_key)
        if voucher.msg.device != self.device.public_key:
            raise VoucherError("bad_voucher", "not this device's voucher")
        cred = open_envelope(fog_credential, FogCredential).msg
        if cred.key != self.device.fog_key or cred.fog_id != voucher.msg.fog_id:
            raise VoucherError("bad_voucher", "the fog credential is not the voucher's fog's")
        if voucher.msg.voucher_id not in self._held:
            if len(self._held) >= VOUCHERS_KEPT_MAX:  # forget the one that expired first
                oldest = min(self._held.values(), key=lambda h: h.voucher.msg.not_after_ms)
                del self._held[oldest.voucher.msg.voucher_id]
            self._held[voucher.msg.voucher_id] = Held(voucher, fog_credential, 0, 0)
            self._save()
            log.info(
                "voucher_kept",
                device=self.device.key_hex[:16],
                voucher=voucher.msg.voucher_id.hex()[:16],
                amount_micros=voucher.msg.amount_micros,
            )
        return self._held[voucher.msg.voucher_id]

    def pay(self, payee_id: str, amount_micros: int, *, voucher_id: bytes | None = None) -> bytes:
        """Sign a payment of ``amount_micros`` to ``payee_id`` against ``voucher_id`` (or the
        voucher with room that expires first) and return the bundle for the payee. Durable
        before it returns. Raises NoRoom, or Declined(MALFORMED) for invalid fields."""
        now = self._clock()
        candidates = [
            h
            for h in self._held.values()
            if (voucher_id is None or h.voucher.msg.voucher_id == voucher_id)
            and h.left_micros >= amount_micros
            and now <= h.voucher.msg.not_after_ms
            and (h.voucher.msg.payees is None or payee_id in h.voucher.msg.payees)
        ]
        if not candidates:
            raise NoRoom(f"no voucher with {amount_micros} micros left for {payee_id}")
        h = min(candidates, key=lambda c: (c.voucher.msg.not_after_ms, c.voucher.msg.voucher_id))
        payment = Payment(
            voucher_id=h.voucher.msg.voucher_id,
            seq=h.seq + 1,
            payee_id=payee_id,
            amount_micros=amount_micros,
            spent_micros=h.spent_micros + amount_micros,
            time_ms=now,
        )
        signed = self.device.seal(payment)  # validates first
        self._held[h.voucher.msg.voucher_id] = Held(
            h.voucher, h.fog_credential, payment.seq, payment.spent_micros
        )
        self._save()  # durable before the payment leaves
        log.info(
            "d2d_signed",
            device=self.device.key_hex[:16],
            voucher=h.voucher.msg.voucher_id.hex()[:16],
            seq=payment.seq,
            payee=payee_id,
            amount_micros=amount_micros,
        )
        return encode_bundle(h.fog_credential, h.voucher.raw, signed.raw)

    async def obtain(
        self,
        client: aiomqtt.Client,
        amount_micros: int,
        currency: str,
        *,
        payees: list[str] | None = None,
        timeout_s: float = PAY_TIMEOUT_S_DEFAULT,
        retries_max: int = RETRIES_MAX_DEFAULT,
    ) -> Held:
        """Pay ``amount_micros`` to the reserved payee ``voucher`` through the fog over
        ``client`` (whose message stream this call reads while it runs) and keep the voucher
        the fog answers with, and its fog credential. Raises PaymentDeclined, PaymentTimeout."""
        assert 0 <= retries_max <= RETRIES_MAX and timeout_s > 0
        device = self.device
        memo = encode_payees(payees) if payees else None
        receipt_topic = topics.receipt_topic(device.fog_id, device.public_key)
        fog_topic = topics.fog_topic(device.fog_id)
        got: dict[str, bytes] = {}
        changed = asyncio.Event()
        async with device.lock:
            intent = device.new_intent(VOUCHER_PAYEE, amount_micros, currency, memo=memo)

            async def read() -> None:
                async for message in client.messages:
                    payload = message.payload
                    if not isinstance(payload, bytes | bytearray):
                        continue
                    data, topic = bytes(payload), str(message.topic)
                    if topic == fog_topic:
                        with contextlib.suppress(Declined):
                            if open_envelope(data, FogCredential).msg.key == device.fog_key:
                                got["fog"] = data
                    elif topic == receipt_topic:
                        try:
                            v = open_voucher(data, device.fog_key)
                        except VoucherError:
                            receipt = device.check_receipt(data, intent)
                            if receipt is not None:
                                got["receipt"] = data
                                if not receipt.msg.ok:
                                    got["declined"] = data
                        else:
                            if v.msg.voucher_id == intent.id:
                                got["vch"] = data
                    changed.set()

            await client.subscribe(receipt_topic, qos=1)
            await client.subscribe(fog_topic, qos=1)
            reader = asyncio.create_task(read(), name="edge.voucher.read")
            try:
                for attempt in range(1 + retries_max):
                    await client.publish(
                        topics.intent_topic(device.fog_id, device.public_key), intent.raw, qos=1
                    )
                    if await _wait(got, changed, timeout_s, reader):
                        break
                    log.info("voucher_resent", device=device.key_hex[:16], attempt=attempt + 1)
            finally:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                    await reader
                for t in (receipt_topic, fog_topic):
                    with contextlib.suppress(aiomqtt.MqttError):
                        await client.unsubscribe(t, timeout=UNSUBSCRIBE_TIMEOUT_S)
        if "receipt" in got:
            receipt = device.open_receipt(got["receipt"])
            if not receipt.msg.ok:
                assert receipt.msg.reason is not None
                raise PaymentDeclined(receipt.msg.reason, receipt)
            device.store_receipt(receipt, intent)
        if "vch" not in got or "fog" not in got:
            raise PaymentTimeout(intent.id, 1 + retries_max)
        return self.add(got["fog"], got["vch"])


async def _wait(
    got: dict[str, bytes], changed: asyncio.Event, timeout_s: float, reader: "asyncio.Task[None]"
) -> bool:
    """Until the receipt, the voucher and the fog credential are in (True), a decline came
    (True: nothing more will), or ``timeout_s`` passes (False)."""
    try:
        async with asyncio.timeout(timeout_s):
            while not ({"receipt", "vch", "fog"} <= got.keys()):
                if "declined" in got:
                    return True
                changed.clear()
                waiter = asyncio.create_task(changed.wait())
                done, _ = await asyncio.wait({waiter, reader}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                if reader in done:
                    reader.result()
                    raise aiomqtt.MqttError("the message stream ended")
    except TimeoutError:
        return False
    return True


class Payee:
    """The payee's side: bundles checked and kept, held for upload."""

    def __init__(
        self, device: Device, *, payee_id: str, issuer_key: bytes, clock: Any = time_ms
    ) -> None:
        self.device, self.payee_id, self.issuer_key = device, payee_id, issuer_key
        self._clock = clock
        self._path = device.state_dir / D2D_IN_FILE
        # voucher id -> {payment id: (s, a, u)}
        self._kept: dict[bytes, dict[bytes, tuple[int, int, int]]] = {}
        if self._path.exists():
            for line in self._path.read_text().splitlines():
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    row = json.loads(line)
                    self._kept.setdefault(bytes.fromhex(row["v"]), {})[bytes.fromhex(row["id"])] = (
                        int(row["s"]),
                        int(row["a"]),
                        int(row["u"]),
                    )

    def accept(self, bundle: bytes) -> Checked:
        """Check and keep a bundle (idempotent by payment id); raises VoucherError."""
        checked = check_bundle(
            bundle, issuer_key=self.issuer_key, payee_id=self.payee_id, now_ms=self._clock()
        )
        p, pid = checked.payment.msg, checked.payment.id
        kept = self._kept.setdefault(p.voucher_id, {})
        if pid in kept:
            return checked
        for s, a, u in kept.values():
            if s == p.seq:
                raise VoucherError(FAULT_SEQ, f"another payment at s={s}")
            if (s < p.seq and p.spent_micros - p.amount_micros < u) or (
                s > p.seq and u - a < p.spent_micros
            ):
                raise VoucherError(FAULT_OVERSPENT, "cumulatives do not add up")
        self.device.hold(pid, checked.record)  # held for upload first, then noted
        line = json.dumps(
            {
                "v": p.voucher_id.hex(),
                "id": pid.hex(),
                "s": p.seq,
                "a": p.amount_micros,
                "u": p.spent_micros,
                "b": bundle.hex(),
            }
        )
        with open(self._path, "a", encoding="ascii") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        kept[pid] = (p.seq, p.amount_micros, p.spent_micros)
        log.info(
            "d2d_accepted",
            device=self.device.key_hex[:16],
            payment=pid.hex()[:16],
            voucher=p.voucher_id.hex()[:16],
            amount_micros=p.amount_micros,
        )
        return checked

    def received(self) -> int:
        """How many payments this payee has accepted."""
        return sum(len(v) for v in self._kept.values())
