"""The device SDK: a device's key, its sequence numbers, its receipts, and paying over MQTT.

A device's whole durable state is a small directory::

    device.key      Ed25519 seed, hex, mode 0600 (runtime.keyfile); created on first open
    seq             highest sequence number reserved, decimal; replaced atomically, fsynced
    receipts.jsonl  one verified ok receipt per line, appended and fsynced: the device's
                    proof of payment
    held.jsonl      the ok receipts with their intents (batch records) the cloud has not
                    said it booked: appended and fsynced with each receipt, rewritten
                    atomically when a ``hack`` lists some (docs/protocol.md 17.7); at most
                    ``held_max`` records; beyond, the oldest eighth is dropped (``held_evicted``)

Sequence numbers (spec: ``q`` strictly increasing over the device's whole life) are reserved
in blocks of ``seq_block``: before the first ``q`` of a block is used, the block's last number
is written to ``seq`` (temp file, fsync, rename, fsync of the directory). A device that
reopens its state starts after the reserved block, so a crash skips at most ``seq_block - 1``
numbers and never reuses one. Gaps are harmless: a fog only needs ``q`` above the highest it
authorized. ``seq_block=1`` writes before every intent.

Paying: :class:`DeviceSession` owns an aiomqtt client's message stream and one subscription
per attached device's receipt topic (or one wildcard for a simulator with many devices). It
seals an intent, publishes it with QoS 1, waits for the receipt, and on timeout publishes the
*same bytes* again (the fog answers a retransmitted authorized intent with the stored
receipt, byte for byte). A receipt counts only if it verifies under the fog's key and its
``i``, ``d`` and ``q`` match an intent in flight; anything else is logged and ignored. One
payment per device is in flight at a time, so a device's intents reach the fog in ``q`` order.

Held receipts: a fog that loses its disk loses the records it had not handed on; the device
still holds them. ``Device.upload_held(client, issuer_key=...)`` publishes them (16 per
``held`` payload) on ``fogpay/1/held/{device_hex}/records`` and waits for the cloud's
``hack`` on ``.../ack``; the records it lists (booked, or refused with a fault) are forgotten.

Latency: an intent is one small write. With Nagle's algorithm on, the kernel holds it back
while an earlier segment is unacknowledged, and the broker delays its ACK up to ~40 ms: a
payment waits ~35 ms for nothing. Every device client therefore sets ``TCP_NODELAY``: make
clients with ``socket_options=DEVICE_SOCKET_OPTIONS`` (``fogpay.provision.BrokerAddress``
does), and a ``DeviceSession`` also sets it on the connected socket of any client it is given.
"""

import asyncio
import contextlib
import json
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final, Self

import aiomqtt
import nacl.signing
import structlog

from protocol import limits, sealed, topics
from protocol.batch import encode_record
from protocol.errors import Declined, FogpayError, TopicError
from protocol.held import HELD_RECORDS_MAX, HeldAck, encode_held
from protocol.messages import Intent, Message, Receipt, encode_body
from protocol.reasons import Reason
from protocol.signing import (
    Signed,
    is_valid_public_key,
    open_envelope,
    possession_proof,
    public_key,
    seal_signed,
)
from runtime.files import write_atomic
from runtime.keyfile import load_key_file, new_key_file
from runtime.mqttshell import TCP_NODELAY_OPTION

log = structlog.get_logger(component="edge")  # every edge line names it (runtime/logs.py)

KEY_FILE: Final = "device.key"
SEQ_FILE: Final = "seq"
RECEIPTS_FILE: Final = "receipts.jsonl"
HELD_FILE: Final = "held.jsonl"
HELD_MAX_DEFAULT: Final = 4_096  # records kept for upload (about 1.7 MB of file at most)
HELD_MAX: Final = 1_000_000
UPLOAD_TIMEOUT_S_DEFAULT: Final = 5.0
SEQ_BLOCK_DEFAULT: Final = 32
SEQ_BLOCK_MAX: Final = 1_000_000
PAY_TIMEOUT_S_DEFAULT: Final = 5.0
RETRIES_MAX_DEFAULT: Final = 3
RETRIES_MAX: Final = 100
IN_FLIGHT_MAX: Final = 10_000
UNSUBSCRIBE_TIMEOUT_S: Final = 5.0
RECEIPTS_FILE_BYTES_MAX: Final = 256 * 1024 * 1024
DEVICE_SOCKET_OPTIONS: Final = (TCP_NODELAY_OPTION,)  # aiomqtt.Client(socket_options=...)
# a fog answers these before it has read an intent it can trust, so they come plain even to a
# device that asked for sealed receipts (docs/protocol.md section 16)
PLAIN_REASONS: Final = frozenset({Reason.MALFORMED, Reason.BAD_SIGNATURE, Reason.TOPIC_MISMATCH})


class DeviceStateError(FogpayError):
    """The device's state directory or its settings cannot be used."""


class PaymentError(FogpayError):
    """A payment did not go through."""


class PaymentDeclined(PaymentError):
    """The fog declined the intent; ``reason`` is the spec's code, ``receipt`` the fog's proof."""

    def __init__(self, reason: Reason, receipt: Signed[Receipt]) -> None:
        super().__init__(f"payment declined: {reason}")
        self.reason = reason
        self.receipt = receipt


@dataclass(frozen=True, slots=True)
class UploadResult:
    """What ``Device.upload_held`` achieved."""

    booked: list[bytes]  # intent ids the cloud lists as booked (by this upload or before)
    refused: list[tuple[bytes, str]]  # (intent id, fault) the cloud will not book
    unanswered: int  # records sent that no hack answered (still held)
    held: int  # records still held after the upload


class PaymentTimeout(PaymentError):
    """No valid receipt after the first attempt and every retransmission."""

    def __init__(self, intent_id: bytes, attempts: int) -> None:
        super().__init__(f"no receipt for intent {intent_id.hex()[:16]} after {attempts} attempts")
        self.intent_id = intent_id
        self.attempts = attempts


def time_ms() -> int:
    return time.time_ns() // 1_000_000


def answers(receipt: Signed[Receipt], intent: Signed[Intent]) -> bool:
    """True if a (verified) receipt is about ``intent``: same ``i``, ``d`` and ``q``."""
    r = receipt.msg
    return r.intent_id == intent.id and r.device == intent.msg.device and r.seq == intent.msg.seq


class Device:
    """A device's key, sequence numbers and receipts, kept in ``state_dir``."""

    def __init__(
        self,
        state_dir: Path,
        key: nacl.signing.SigningKey,
        *,
        fog_id: str,
        fog_key: bytes,
        seq_block: int,
        clock: Callable[[], int],
        sealing: bool = False,
        memo_recipient: bytes | None = None,
        held_max: int = HELD_MAX_DEFAULT,
    ) -> None:
        assert 1 <= seq_block <= SEQ_BLOCK_MAX
        assert 1 <= held_max <= HELD_MAX
        self.state_dir = state_dir
        self._key = key
        self.public_key = public_key(key)
        # the sealing extension: receipts sealed to this key, memos sealed to memo_recipient
        # (an X25519 key; this device's own when None)
        self.sealing = sealing
        self._x25519 = sealed.x25519_private(key)
        self.x25519_public = bytes(self._x25519.public_key)
        if memo_recipient is not None and len(memo_recipient) != limits.KEY_BYTES:
            raise DeviceStateError("memo_recipient is not a 32-byte X25519 key")
        self.memo_recipient = memo_recipient or self.x25519_public
        self.fog_id = fog_id
        self.fog_key = fog_key
        self._seq_block = seq_block
        self._clock = clock
        self._seq_reserved = self._read_seq()
        self._seq_next = self._seq_reserved + 1
        self._receipt_ids = self._load_receipt_ids()
        self._held_max = held_max
        self._held = self._load_held()  # intent id -> record, oldest first
        self.lock = asyncio.Lock()  # one payment in flight per device

    @classmethod
    def open(
        cls,
        state_dir: str | Path,
        *,
        fog_id: str,
        fog_key: bytes,
        seq_block: int = SEQ_BLOCK_DEFAULT,
        clock: Callable[[], int] = time_ms,
        sealing: bool = False,
        memo_recipient: bytes | None = None,
        held_max: int = HELD_MAX_DEFAULT,
    ) -> "Device":
        """Open (or create, with a new key) the device whose state lives in ``state_dir``.

        ``sealing``: every intent asks for its receipt sealed to this device's key (``sr``)
        and carries its memo sealed (``sm``) to ``memo_recipient`` (an X25519 public key, e.g.
        the payee's; this device's own ``x25519_public`` when None)."""
        if not is_valid_public_key(fog_key):
            raise DeviceStateError("fog_key is not a valid Ed25519 public key")
        path = Path(state_dir)
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        key_path = path / KEY_FILE
        key = load_key_file(key_path) if key_path.exists() else new_key_file(key_path)
        topics.receipt_topic(fog_id, public_key(key))  # validates fog_id
        return cls(
            path,
            key,
            fog_id=fog_id,
            fog_key=fog_key,
            seq_block=seq_block,
            clock=clock,
            sealing=sealing,
            memo_recipient=memo_recipient,
            held_max=held_max,
        )

    @property
    def key_hex(self) -> str:
        return self.public_key.hex()

    @property
    def seq_last(self) -> int:
        """The highest q this device has used (0 before its first intent)."""
        return self._seq_next - 1

    def prove_possession(self, binding_body: bytes) -> bytes:
        """Proof that this device holds its key, over an owner's binding body."""
        return possession_proof(self._key, binding_body)

    # --- sequence numbers --------------------------------------------------------------

    def _read_seq(self) -> int:
        path = self.state_dir / SEQ_FILE
        if not path.exists():
            return 0
        text = path.read_text().strip()
        if not text.isdigit():
            raise DeviceStateError(f"{path}: corrupt sequence file; refusing to guess a q")
        return int(text)

    def _reserve_seq(self) -> int:
        """The next q, durable in ``seq`` before it is returned."""
        if self._seq_next > self._seq_reserved:
            reserved = self._seq_next + self._seq_block - 1
            write_atomic(self.state_dir / SEQ_FILE, f"{reserved}\n".encode())
            self._seq_reserved = reserved
        q = self._seq_next
        self._seq_next += 1
        return q

    def new_intent(
        self, payee_id: str, amount_micros: int, currency: str, *, memo: bytes | None = None
    ) -> Signed[Intent]:
        """Seal a new intent with a fresh q (raises Declined(MALFORMED) for invalid fields).
        A sealing device seals ``memo`` to its memo recipient and asks for a sealed receipt."""
        sealed_memo = None
        if self.sealing and memo is not None:
            sealed_memo, memo = sealed.seal_memo(memo, self.memo_recipient), None
        intent = Intent(
            device=self.public_key,
            fog_id=self.fog_id,
            seq=self._seq_next,
            payee_id=payee_id,
            amount_micros=amount_micros,
            currency=currency,
            time_ms=self._clock(),
            memo=memo,
            sealed_memo=sealed_memo,
            seal_receipts=sealed.SCHEME if self.sealing else None,
        )
        encode_body(intent)  # validate (raises MALFORMED) before spending a q on it
        q = self._reserve_seq()
        assert q == intent.seq
        return seal_signed(intent, self._key)

    # --- receipts ----------------------------------------------------------------------

    def open_receipt(self, payload: bytes) -> Signed[Receipt]:
        """A payload of this device's receipt topic, sealed or plain, as a receipt verified
        under the fog's key; raises Declined. A sealing device takes a plain receipt only for
        the reasons a fog gives before it read a trustworthy intent (``PLAIN_REASONS``)."""
        if sealed.is_sealed_payload(payload):
            return open_envelope(
                sealed.open_receipt(payload, self._x25519), Receipt, signer=self.fog_key
            )
        receipt = open_envelope(payload, Receipt, signer=self.fog_key)
        if self.sealing and receipt.msg.reason not in PLAIN_REASONS:
            raise Declined(Reason.MALFORMED, "sealed: a plain receipt to a sealing device")
        return receipt

    def read_memo(self, intent: Signed[Intent]) -> bytes | None:
        """The memo of one of this device's intents: ``m``, or ``sm`` opened with this
        device's key (raises Declined(MALFORMED) if it was sealed to another recipient)."""
        if intent.msg.sealed_memo is not None:
            return sealed.open_memo(intent.msg.sealed_memo, self._x25519)
        return intent.msg.memo

    def check_receipt(self, payload: bytes, intent: Signed[Intent]) -> Signed[Receipt] | None:
        """The receipt if it is the fog's answer to ``intent``, else None (logged)."""
        try:
            receipt = self.open_receipt(payload)
        except Declined as exc:
            log.warning("receipt_ignored", device=self.key_hex[:16], reason=str(exc.reason))
            return None
        if not answers(receipt, intent):
            log.warning("receipt_ignored", device=self.key_hex[:16], reason="not_our_intent")
            return None
        return receipt

    def _load_receipt_ids(self) -> set[bytes]:
        path = self.state_dir / RECEIPTS_FILE
        if not path.exists():
            return set()
        if path.stat().st_size > RECEIPTS_FILE_BYTES_MAX:
            raise DeviceStateError(f"{path}: larger than {RECEIPTS_FILE_BYTES_MAX} bytes")
        ids = set()
        for line in path.read_text().splitlines():
            try:
                ids.add(bytes.fromhex(json.loads(line)["i"]))
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line after a crash: that receipt was never returned
        return ids

    def store_receipt(self, receipt: Signed[Receipt], intent: Signed[Intent] | None = None) -> None:
        """Append a verified ok receipt (idempotent by intent id), durable on return. With
        its ``intent``, the record is also held for upload until the cloud says it booked
        it (written first: a receipt this returns is always held)."""
        assert receipt.msg.ok and receipt.msg.device == self.public_key
        if intent is not None:
            assert answers(receipt, intent)
            self._hold(intent, receipt)
        if receipt.msg.intent_id in self._receipt_ids:
            return
        line = json.dumps(
            {
                "i": receipt.msg.intent_id.hex(),
                "q": receipt.msg.seq,
                "fog": receipt.signer.hex(),
                "env": receipt.raw.hex(),
            }
        )
        with open(self.state_dir / RECEIPTS_FILE, "a", encoding="ascii") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._receipt_ids.add(receipt.msg.intent_id)

    # --- held records (docs/protocol.md 17.7) -------------------------------------------

    def _load_held(self) -> dict[bytes, bytes]:
        path = self.state_dir / HELD_FILE
        held: dict[bytes, bytes] = {}
        if not path.exists():
            return held
        if path.stat().st_size > RECEIPTS_FILE_BYTES_MAX:
            raise DeviceStateError(f"{path}: larger than {RECEIPTS_FILE_BYTES_MAX} bytes")
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
                held[bytes.fromhex(rec["i"])] = bytes.fromhex(rec["r"])
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line after a crash: that receipt was never returned
        return held

    def _hold(self, intent: Signed[Intent], receipt: Signed[Receipt]) -> None:
        if intent.id in self._held:
            return
        record = encode_record(intent.raw, receipt.raw)
        self._held[intent.id] = record
        if len(self._held) > self._held_max:
            # full: drop the oldest eighth at once, so the file is rewritten once per
            # held_max / 8 payments, not at every one
            keep = self._held_max - max(1, self._held_max // 8)
            evicted = len(self._held) - keep
            for old in list(self._held)[:evicted]:
                del self._held[old]
            log.warning("held_evicted", device=self.key_hex[:16], evicted=evicted)
            self._write_held()
            return
        line = json.dumps({"i": intent.id.hex(), "r": record.hex()})
        with open(self.state_dir / HELD_FILE, "a", encoding="ascii") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    def hold(self, record_id: bytes, record: bytes) -> None:
        """Hold another record for upload under ``record_id`` (a payee's device-to-device
        payment, docs/protocol.md 18.3: the record ``[vch, d2d]``, its id the payment's);
        durable on return, forgotten when a ``hack`` lists the id."""
        if record_id in self._held:
            return
        if len(self._held) >= self._held_max:  # never evict money a payee was given: refuse
            raise DeviceStateError(f"{len(self._held)} records held: upload them first")
        self._held[record_id] = record
        line = json.dumps({"i": record_id.hex(), "r": record.hex()})
        with open(self.state_dir / HELD_FILE, "a", encoding="ascii") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    def seal(self, msg: Message) -> Signed[Message]:
        """Sign another message with this device's key (a ``d2d`` payment, 18.3)."""
        return seal_signed(msg, self._key)

    def _write_held(self) -> None:
        lines = "".join(
            json.dumps({"i": i.hex(), "r": r.hex()}) + "\n" for i, r in self._held.items()
        )
        write_atomic(self.state_dir / HELD_FILE, lines.encode("ascii"))

    def held_records(self) -> list[bytes]:
        """The records (intent, ok receipt) no ``hack`` has listed yet, oldest first."""
        return list(self._held.values())

    def apply_hack(self, payload: bytes, issuer_key: bytes) -> HeldAck | None:
        """Forget the records a ``hack`` lists (booked, or refused with a fault: the cloud
        will never book those); the file is rewritten atomically. Returns the hack, or None
        if it is not the issuer's answer to this device (logged, nothing changes)."""
        try:
            ack = open_envelope(payload, HeldAck, signer=issuer_key).msg
        except Declined as exc:
            log.warning("hack_ignored", device=self.key_hex[:16], reason=str(exc.reason))
            return None
        if ack.device != self.public_key:
            log.warning("hack_ignored", device=self.key_hex[:16], reason="not_this_device")
            return None
        listed = [*ack.booked, *(i for i, _ in ack.faults)]
        gone = [i for i in listed if self._held.pop(i, None) is not None]
        if gone:
            self._write_held()
        for intent_id, fault in ack.faults:
            log.warning(
                "held_not_booked",
                device=self.key_hex[:16],
                intent=intent_id.hex()[:16],
                fault=fault,
            )
        return ack

    async def upload_held(
        self,
        client: aiomqtt.Client,
        *,
        issuer_key: bytes,
        timeout_s: float = UPLOAD_TIMEOUT_S_DEFAULT,
        retries_max: int = RETRIES_MAX_DEFAULT,
    ) -> UploadResult:
        """Hand the held records to the cloud over ``client`` (whose message stream this call
        reads while it runs): 16 per ``held`` payload, each sent again (same bytes) after
        ``timeout_s`` until a ``hack`` answers every record in it, ``retries_max`` times."""
        assert 0 <= retries_max <= RETRIES_MAX and timeout_s > 0
        ack_topic = topics.held_ack_topic(self.public_key)
        answered: dict[bytes, str | None] = {}  # intent id -> None (booked) or the fault
        changed = asyncio.Event()

        async def read() -> None:
            async for message in client.messages:
                payload = message.payload
                if str(message.topic) != ack_topic or not isinstance(payload, bytes | bytearray):
                    continue
                ack = self.apply_hack(bytes(payload), issuer_key)
                if ack is not None:
                    answered.update((i, None) for i in ack.booked)
                    answered.update(ack.faults)
                    changed.set()

        unanswered = 0
        async with self.lock:
            await client.subscribe(ack_topic, qos=1)
            reader = asyncio.create_task(read(), name="edge.upload.read")
            try:
                held = list(self._held.items())
                for start in range(0, len(held), HELD_RECORDS_MAX):
                    chunk = held[start : start + HELD_RECORDS_MAX]
                    payload = encode_held([r for _, r in chunk])
                    ids = {i for i, _ in chunk}
                    for attempt in range(1 + retries_max):
                        if attempt:
                            log.info("held_resent", device=self.key_hex[:16], records=len(ids))
                        await client.publish(topics.held_topic(self.public_key), payload, qos=1)
                        if await _wait_answered(ids, answered, changed, timeout_s, reader):
                            break
                    unanswered += len(ids - answered.keys())
            finally:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                    await reader
                with contextlib.suppress(aiomqtt.MqttError):
                    await client.unsubscribe(ack_topic, timeout=UNSUBSCRIBE_TIMEOUT_S)
        result = UploadResult(
            booked=[i for i, f in answered.items() if f is None],
            refused=[(i, f) for i, f in answered.items() if f is not None],
            unanswered=unanswered,
            held=len(self._held),
        )
        log.info(
            "held_uploaded",
            device=self.key_hex[:16],
            booked=len(result.booked),
            refused=len(result.refused),
            unanswered=unanswered,
            held=result.held,
        )
        return result

    def receipts(self) -> list[Signed[Receipt]]:
        """Every stored receipt, re-verified under the fog key it was stored with."""
        path = self.state_dir / RECEIPTS_FILE
        out: list[Signed[Receipt]] = []
        if not path.exists():
            return out
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
                signed = open_envelope(
                    bytes.fromhex(rec["env"]), Receipt, signer=bytes.fromhex(rec["fog"])
                )
            except (ValueError, KeyError, TypeError, Declined):
                continue
            out.append(signed)
        return out

    async def pay(
        self,
        client: aiomqtt.Client,
        payee_id: str,
        amount_micros: int,
        currency: str,
        *,
        memo: bytes | None = None,
        timeout_s: float = PAY_TIMEOUT_S_DEFAULT,
        retries_max: int = RETRIES_MAX_DEFAULT,
    ) -> Signed[Receipt]:
        """Pay once over ``client`` (whose message stream this call reads while it runs)."""
        async with DeviceSession(client, fog_id=self.fog_id, fog_key=self.fog_key) as session:
            await session.attach(self)
            return await session.pay(
                self,
                payee_id,
                amount_micros,
                currency,
                memo=memo,
                timeout_s=timeout_s,
                retries_max=retries_max,
            )


async def _wait_answered(
    ids: set[bytes],
    answered: dict[bytes, str | None],
    changed: asyncio.Event,
    timeout_s: float,
    reader: "asyncio.Task[None]",
) -> bool:
    """Wait until every id is answered (True) or ``timeout_s`` passes (False); the reader's
    failure (the connection died) is raised."""
    waiter: asyncio.Task[bool] | None = None
    try:
        async with asyncio.timeout(timeout_s):
            while not ids <= answered.keys():
                changed.clear()
                waiter = asyncio.create_task(changed.wait())
                done, _ = await asyncio.wait({waiter, reader}, return_when=asyncio.FIRST_COMPLETED)
                if reader in done:
                    reader.result()  # raises what ended it
                    raise aiomqtt.MqttError("the message stream ended")
    except TimeoutError:
        return False
    finally:
        if waiter is not None:
            waiter.cancel()
    return True


def client_socket(client: aiomqtt.Client) -> socket.socket | None:
    """The connected socket of an aiomqtt client, None if not connected. aiomqtt 2.x (pinned
    below 3) keeps it on its paho client, whose ``socket()`` is public API."""
    paho = getattr(client, "_client", None)
    sock = paho.socket() if paho is not None else None
    return sock if isinstance(sock, socket.socket) else None


def set_nodelay(client: aiomqtt.Client) -> bool:
    """Set TCP_NODELAY on ``client``'s connected socket; False if there is none (not
    connected, or not TCP: a Unix socket). Never raises."""
    sock = client_socket(client)
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    try:
        sock.setsockopt(*TCP_NODELAY_OPTION)
    except OSError as exc:
        log.warning("socket_option_failed", option="TCP_NODELAY", error=str(exc))
        return False
    return True


@dataclass(slots=True)
class _InFlight:
    device: Device
    intent: Signed[Intent]
    future: "asyncio.Future[Signed[Receipt]]"


class DeviceSession:
    """One MQTT client carrying the payments of one or many devices of one fog.

    Use as ``async with DeviceSession(client, ...) as s``; the session reads
    ``client.messages`` while open, so nothing else may. ``wildcard=True`` subscribes once to
    every receipt topic of the fog (a simulator); otherwise ``attach`` subscribes each device.
    """

    def __init__(
        self,
        client: aiomqtt.Client,
        *,
        fog_id: str,
        fog_key: bytes,
        wildcard: bool = False,
        in_flight_max: int = IN_FLIGHT_MAX,
    ) -> None:
        assert 1 <= in_flight_max <= IN_FLIGHT_MAX
        self.client = client
        # aiomqtt warns above 10 unacknowledged publishes; a session has up to in_flight_max
        client.pending_calls_threshold = max(client.pending_calls_threshold, in_flight_max)
        self.fog_id = fog_id
        self.fog_key = fog_key
        self.wildcard = wildcard
        self._in_flight: dict[bytes, _InFlight] = {}
        self._slots = asyncio.Semaphore(in_flight_max)
        self._subscribed: list[str] = []
        self._devices: dict[bytes, Device] = {}  # attached or paying, by key: opens receipts
        self._reader: asyncio.Task[None] | None = None
        self.ignored = 0  # receipts that failed verification or matched nothing in flight

    async def __aenter__(self) -> Self:
        set_nodelay(self.client)
        if self.wildcard:
            await self._subscribe(topics.receipt_filter(self.fog_id))
        self._reader = asyncio.create_task(self._read(), name="edge.session.read")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._reader is not None
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
            await self._reader  # MqttError: the connection died, already reported to payers
        for topic in self._subscribed:
            try:
                await self.client.unsubscribe(topic, timeout=UNSUBSCRIBE_TIMEOUT_S)
            except aiomqtt.MqttError:
                break  # connection gone: nothing to unsubscribe from
        self._subscribed.clear()

    async def _subscribe(self, topic: str) -> None:
        await self.client.subscribe(topic, qos=1)
        self._subscribed.append(topic)

    async def attach(self, device: Device) -> None:
        """Subscribe to ``device``'s receipt topic (no-op in wildcard mode)."""
        assert device.fog_id == self.fog_id and device.fog_key == self.fog_key
        self._devices[device.public_key] = device
        if not self.wildcard:
            await self._subscribe(topics.receipt_topic(self.fog_id, device.public_key))

    async def _read(self) -> None:
        try:
            async for message in self.client.messages:
                payload = message.payload
                if not isinstance(payload, bytes | bytearray):
                    continue
                self._dispatch(str(message.topic), bytes(payload))
        except aiomqtt.MqttError as exc:
            log.warning("broker_disconnected", error=str(exc), fog_id=self.fog_id)
            for entry in self._in_flight.values():  # fail fast rather than time out
                if not entry.future.done():
                    entry.future.set_exception(exc)
            raise

    def _dispatch(self, topic: str, payload: bytes) -> None:
        try:
            parsed = topics.parse(topic)
        except TopicError:
            return  # not ours: the client may carry other subscriptions
        if parsed.kind is not topics.Kind.RECEIPT or parsed.fog_id != self.fog_id:
            return
        device = self._devices.get(parsed.key) if parsed.key is not None else None
        try:
            if device is not None:
                receipt = device.open_receipt(payload)
            elif sealed.is_sealed_payload(payload):
                raise Declined(Reason.MALFORMED, "sealed: no device of this topic here")
            else:
                receipt = open_envelope(payload, Receipt, signer=self.fog_key)
        except Declined as exc:
            self.ignored += 1
            log.warning("receipt_ignored", reason=str(exc.reason), fog_id=self.fog_id)
            return
        entry = self._in_flight.get(receipt.msg.intent_id)
        if entry is None or entry.device.public_key != parsed.key:
            self.ignored += 1
            log.info("receipt_unmatched", intent=receipt.msg.intent_id.hex()[:16])
            return
        if not answers(receipt, entry.intent):
            self.ignored += 1
            log.warning("receipt_ignored", reason="not_our_intent", fog_id=self.fog_id)
            return
        if not entry.future.done():
            entry.future.set_result(receipt)

    async def pay(
        self,
        device: Device,
        payee_id: str,
        amount_micros: int,
        currency: str,
        *,
        memo: bytes | None = None,
        timeout_s: float = PAY_TIMEOUT_S_DEFAULT,
        retries_max: int = RETRIES_MAX_DEFAULT,
    ) -> Signed[Receipt]:
        """Seal, send and settle one intent. Raises PaymentDeclined or PaymentTimeout."""
        async with device.lock:
            intent = device.new_intent(payee_id, amount_micros, currency, memo=memo)
            return await self._send_locked(device, intent, timeout_s, retries_max)

    async def send(
        self,
        device: Device,
        intent: Signed[Intent],
        *,
        timeout_s: float = PAY_TIMEOUT_S_DEFAULT,
        retries_max: int = RETRIES_MAX_DEFAULT,
    ) -> Signed[Receipt]:
        """(Re)send an intent ``device`` sealed earlier, same bytes; settle it like ``pay``."""
        assert intent.msg.device == device.public_key
        async with device.lock:
            return await self._send_locked(device, intent, timeout_s, retries_max)

    async def _send_locked(
        self, device: Device, intent: Signed[Intent], timeout_s: float, retries_max: int
    ) -> Signed[Receipt]:
        assert 0 <= retries_max <= RETRIES_MAX and timeout_s > 0
        receipt = await self._exchange(device, intent, timeout_s, retries_max)
        bound = log.bind(device=device.key_hex[:16], intent=intent.id.hex()[:16])
        if not receipt.msg.ok:
            assert receipt.msg.reason is not None
            bound.info("payment_declined", reason=str(receipt.msg.reason))
            raise PaymentDeclined(receipt.msg.reason, receipt)
        device.store_receipt(receipt, intent)
        bound.info("payment_authorized", amount_micros=intent.msg.amount_micros)
        return receipt

    async def _exchange(
        self, device: Device, intent: Signed[Intent], timeout_s: float, retries_max: int
    ) -> Signed[Receipt]:
        topic = topics.intent_topic(self.fog_id, device.public_key)
        self._devices.setdefault(device.public_key, device)
        future: asyncio.Future[Signed[Receipt]] = asyncio.get_running_loop().create_future()
        async with self._slots:
            assert intent.id not in self._in_flight
            self._in_flight[intent.id] = _InFlight(device, intent, future)
            try:
                for attempt in range(1 + retries_max):
                    if attempt:
                        log.info("intent_retransmitted", intent=intent.id.hex()[:16])
                    await self.client.publish(topic, intent.raw, qos=1)
                    try:
                        async with asyncio.timeout(timeout_s):
                            return await asyncio.shield(future)
                    except TimeoutError:
                        continue
            finally:
                del self._in_flight[intent.id]
        raise PaymentTimeout(intent.id, 1 + retries_max)
