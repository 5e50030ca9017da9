"""Proofs that an intent was booked, checkable offline with only the issuer's public key.

A proof file (``fogpay cloud prove INTENT_ID`` writes it, ``fogpay verify-receipt FILE``
checks it) is a JSON object; binary values are lowercase hex:

| key | meaning |
| --- | --- |
| ``fogpay_proof`` | 1 (format version) |
| ``intent``, ``receipt`` | the intent and receipt envelopes |
| ``fog_credential`` | the fog's credential envelope (signed by the issuer) |
| ``owner_credential``, ``binding`` | optional: the owner credential and the device binding |
| ``record``, ``header`` | optional, with the next three: the Merkle record, the batch header |
| ``index``, ``size`` | the record's position in the batch and the batch's record count |
| ``path`` | the RFC 9162 inclusion path, from the leaf up, as a list of hex hashes |

Without the optional parts the file is a device's receipt alone: the check proves the fog
(accredited by the issuer) authorized that intent. With them it proves the record is in a
fog-signed batch and that the device was the owner's.
"""

import json
from dataclasses import dataclass
from typing import Any, Final

from cloud.store import Tx, clamp_ms
from protocol import merkle
from protocol.batch import decode_record
from protocol.errors import Declined, FogpayError
from protocol.messages import (
    BatchHeader,
    Binding,
    FogCredential,
    Intent,
    OwnerCredential,
    Receipt,
)
from protocol.signing import Signed, open_envelope

PROOF_VERSION: Final = 1
PROOF_FILE_BYTES_MAX: Final = 64 * 1024
PATH_HASHES_MAX: Final = 64


class ProofError(FogpayError):
    """A proof does not hold; the message says which step failed."""


@dataclass(frozen=True, slots=True)
class Verified:
    intent: Intent
    receipt: Receipt
    fog_id: str
    batch: int | None  # None: receipt only
    owner_id: str | None


def _hex(obj: dict[str, Any], key: str) -> bytes:
    value = obj.get(key)
    if not isinstance(value, str):
        raise ProofError(f"{key}: missing or not a hex string")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise ProofError(f"{key}: not hex") from None


def _open(data: bytes, cls: Any, what: str, signer: bytes | None = None) -> Signed[Any]:
    try:
        return open_envelope(data, cls, signer=signer)
    except Declined as exc:
        raise ProofError(f"{what}: {exc}") from exc


def verify_proof(text: str | bytes, issuer_key: bytes) -> Verified:
    """Check a proof file's content; raises ProofError naming the failed step."""
    if len(text) > PROOF_FILE_BYTES_MAX:
        raise ProofError("proof file too large")
    try:
        obj = json.loads(text)
    except ValueError as exc:
        raise ProofError(f"not JSON: {exc}") from exc
    if not isinstance(obj, dict) or obj.get("fogpay_proof") != PROOF_VERSION:
        raise ProofError(f"not a fogpay proof (version {PROOF_VERSION})")
    fog = _open(_hex(obj, "fog_credential"), FogCredential, "fog credential", issuer_key)
    intent = _open(_hex(obj, "intent"), Intent, "intent")
    receipt = _open(_hex(obj, "receipt"), Receipt, "receipt", fog.msg.key)
    r, i = receipt.msg, intent.msg
    if not r.ok or r.intent_id != intent.id or (r.device, r.seq) != (i.device, i.seq):
        raise ProofError("receipt: not an ok receipt of this intent")
    if i.fog_id != fog.msg.fog_id:
        raise ProofError("intent: addressed to another fog")
    if not fog.msg.not_before_ms <= r.time_ms <= fog.msg.not_after_ms:
        raise ProofError("fog credential: not valid at the receipt's time")
    batch = _verify_inclusion(obj, intent, receipt, fog) if "record" in obj else None
    owner_id = _verify_owner(obj, i, r.time_ms, issuer_key) if "binding" in obj else None
    return Verified(i, r, fog.msg.fog_id, batch, owner_id)


def _verify_inclusion(
    obj: dict[str, Any], intent: Signed[Intent], receipt: Signed[Receipt], fog: Any
) -> int:
    record = _hex(obj, "record")
    try:
        pair = decode_record(record)
    except Declined as exc:
        raise ProofError(f"record: {exc}") from exc
    if pair != (intent.raw, receipt.raw):
        raise ProofError("record: does not hold this intent and receipt")
    header = _open(_hex(obj, "header"), BatchHeader, "batch header", fog.msg.key).msg
    index, size, path = obj.get("index"), obj.get("size"), obj.get("path")
    if type(index) is not int or type(size) is not int or not isinstance(path, list):
        raise ProofError("index, size, path: missing or of the wrong type")
    if size != header.count or len(path) > PATH_HASHES_MAX:
        raise ProofError("size: not the batch's record count")
    if receipt.msg.log_index != header.first_index + index:
        raise ProofError("index: not the receipt's log index in this batch")
    hashes = [_hex({"p": p}, "p") for p in path]
    if not merkle.verify_inclusion(merkle.leaf_hash(record), index, size, hashes, header.root):
        raise ProofError("inclusion path: does not lead to the batch header's root")
    return int(header.number)


def _verify_owner(obj: dict[str, Any], intent: Intent, t: int, issuer_key: bytes) -> str:
    owner = _open(_hex(obj, "owner_credential"), OwnerCredential, "owner credential", issuer_key)
    binding = _open(_hex(obj, "binding"), Binding, "binding", owner.msg.key).msg
    if binding.device != intent.device or binding.owner_id != owner.msg.owner_id:
        raise ProofError("binding: not this device's binding to this owner")
    if not binding.not_before_ms <= t <= binding.not_after_ms:
        raise ProofError("binding: not valid at the receipt's time")
    if not owner.msg.not_before_ms <= t <= owner.msg.not_after_ms:
        raise ProofError("owner credential: not valid at the receipt's time")
    return str(owner.msg.owner_id)


async def build_proof(tx: Tx, intent_id: bytes) -> dict[str, Any] | None:
    """The proof of a booked intent, or None if it is not booked."""
    row = await tx.fetchone(
        "SELECT t.fog_id, t.number, t.position, b.header, b.count, f.credential, "
        "o.credential, r.record, t.debit, t.device FROM transfers t "
        "JOIN batches b ON b.fog_id = t.fog_id AND b.number = t.number "
        "JOIN fogs f ON f.fog_id = t.fog_id JOIN owners o ON o.owner_id = t.debit "
        "JOIN records r ON r.fog_id = t.fog_id AND r.number = t.number "
        "AND r.position = t.position WHERE t.intent_id = ?",
        (intent_id,),
    )
    if row is None:
        return await _held_proof(tx, intent_id)
    fog_id, number, position, header, count, fog_cred, owner_cred, record, owner_id, device = row
    leaves = await tx.fetchall(
        "SELECT record FROM records WHERE fog_id = ? AND number = ? ORDER BY position",
        (fog_id, number),
    )
    assert len(leaves) == count
    hashes = [merkle.leaf_hash(bytes(r[0])) for r in leaves]
    intent_env, receipt_env = decode_record(bytes(record))
    receipt_time = open_envelope(receipt_env, Receipt).msg.time_ms
    binding = await _binding_envelope(tx, bytes(device), owner_id, receipt_time)
    return {
        "fogpay_proof": PROOF_VERSION,
        "intent": intent_env.hex(),
        "receipt": receipt_env.hex(),
        "fog_credential": bytes(fog_cred).hex(),
        "owner_credential": bytes(owner_cred).hex(),
        "binding": binding.hex(),
        "record": bytes(record).hex(),
        "header": bytes(header).hex(),
        "index": position,
        "size": count,
        "path": [h.hex() for h in merkle.inclusion_proof(hashes, position)],
    }


async def _held_proof(tx: Tx, intent_id: bytes) -> dict[str, Any] | None:
    """The proof of an intent booked from a device's upload that no batch has brought yet
    (docs/protocol.md 17.8): the receipt, the fog credential, the owner credential and the
    binding, without the batch group (there is no batch to prove it in)."""
    row = await tx.fetchone(
        "SELECT f.credential, o.credential, h.record, t.debit, t.device FROM transfers t "
        "JOIN held_records h ON h.intent_id = t.intent_id "
        "JOIN fogs f ON f.fog_id = t.fog_id JOIN owners o ON o.owner_id = t.debit "
        "WHERE t.intent_id = ? AND t.number = 0",
        (intent_id,),
    )
    if row is None:
        return None
    fog_cred, owner_cred, record, owner_id, device = row
    intent_env, receipt_env = decode_record(bytes(record))
    receipt_time = open_envelope(receipt_env, Receipt).msg.time_ms
    binding = await _binding_envelope(tx, bytes(device), owner_id, receipt_time)
    return {
        "fogpay_proof": PROOF_VERSION,
        "intent": intent_env.hex(),
        "receipt": receipt_env.hex(),
        "fog_credential": bytes(fog_cred).hex(),
        "owner_credential": bytes(owner_cred).hex(),
        "binding": binding.hex(),
    }


async def _binding_envelope(tx: Tx, device: bytes, owner_id: str, t: int) -> bytes:
    """The binding booking used: the owner's binding of ``device`` valid at time ``t``."""
    row = await tx.fetchone(
        "SELECT envelope FROM bindings WHERE device = ? AND owner_id = ? AND nb <= ? AND ? <= na "
        "ORDER BY registered_ms DESC",
        (device, owner_id, clamp_ms(t), clamp_ms(t)),
    )
    assert row is not None, "a booked transfer always has a binding valid at its receipt"
    return bytes(row[0])
