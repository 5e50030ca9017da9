"""The fog's durable state: trust material, leases, devices, the log and its batches.

Synchronous, plain ``sqlite3``, used from ONE worker thread (the daemon's single-thread
executor): the hot path is one thread hop per group of intents, not one per SQL statement.
``process`` decides a whole group in one ``BEGIN IMMEDIATE ... COMMIT``; the database is in WAL
mode with ``synchronous=FULL``, so when ``process`` returns the group is durable and its
receipts may leave. Nothing here raises for bad input: bad input becomes a decline receipt
(intents) or a refused outcome (trust material, acks), and a counter.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import nacl.signing

from fog.authorize import Policy
from protocol.reasons import Reason

TRUST_TYPES = ("owner", "fog", "bind", "revoke", "lease")


@dataclass(frozen=True, slots=True)
class Arrival:
    topic_device: bytes  # the 32 key bytes parsed from the intent topic's device level
    payload: bytes  # raw MQTT payload (unverified)


@dataclass(frozen=True, slots=True)
class Outcome:
    receipt: bytes  # receipt envelope to publish on receipt_topic(fog_id, topic_device)
    status: str  # "ok" | "declined"
    reason: Reason | None
    replay: bool  # a stored receipt answered again (retransmission of an authorized intent)
    intent_id: bytes  # for malformed: sha256(payload)
    device: bytes  # the intent's d (zeros when malformed)
    seq: int
    owner_id: str | None
    amount_micros: int | None
    log_index: int | None
    detail: str = ""  # why, for the log line (never a key or payload)


@dataclass(frozen=True, slots=True)
class TrustOutcome:
    status: Literal["accepted", "duplicate", "refused"]
    reason: Reason | None  # when refused
    detail: str  # short description for the log line
    msg_id: bytes | None = None  # message id when the envelope verified


@dataclass(frozen=True, slots=True)
class AckOutcome:
    status: Literal["accepted", "duplicate", "refused"]
    reason: Reason | None
    detail: str
    number: int | None = None  # the acked batch number b


@dataclass(frozen=True, slots=True)
class SealedBatch:
    number: int
    header: bytes  # header envelope
    records: list[bytes]
    first_index: int
    wire: bytes  # protocol.batch.encode_batch(header, records)


class FogStore:
    """One fog's database. Open with ``FogStore.open``; call from one thread at a time."""

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        fog_id: str,
        fog_key: nacl.signing.SigningKey,
        issuer_key: bytes,
        policy: Policy,
    ) -> "FogStore":
        """Open (creating or migrating the schema) with WAL, synchronous=FULL and
        check_same_thread=False (opened on one thread, used on the worker thread)."""
        raise NotImplementedError

    def process(self, arrivals: Sequence[Arrival], *, now_ms: int) -> list[Outcome]:
        """Decode, verify and authorize every arrival in order, in ONE transaction, durable on
        return; one Outcome per arrival, same order. Later arrivals see earlier ones' effects.
        Never raises for bad input (a storage failure rolls the group back and raises)."""
        raise NotImplementedError

    def put_trust(self, msg_type: str, envelope: bytes, *, now_ms: int) -> TrustOutcome:
        """Verify and store trust material or a lease (``msg_type`` in TRUST_TYPES), durably,
        idempotent by message id. Signers: issuer for owner/fog/lease; any valid key for bind
        and revoke (a binding counts once an owner credential of its owner_id with the
        binding's signer as key is known; a revocation counts when signed by the issuer or by
        the owner key of the device's binding), so material may arrive in any order."""
        raise NotImplementedError

    def trust_envelopes(self) -> list[tuple[str, bytes]]:
        """All stored trust and lease envelopes as (type, bytes), in arrival order."""
        raise NotImplementedError

    def seal_due(self, *, now_ms: int, records_max: int, age_ms: int) -> list[SealedBatch]:
        """Seal every full batch (``records_max`` records, or fewer if 1 MiB on the wire is
        reached) and a partial one if its oldest record is ``age_ms`` old or more; each batch
        in its own transaction. Returns the batches sealed, in order."""
        raise NotImplementedError

    def unacked_batches(self) -> list[SealedBatch]:
        """Every sealed batch not yet acked, in order."""
        raise NotImplementedError

    def apply_ack(self, envelope: bytes) -> AckOutcome:
        """An issuer-signed ack: marks batches <= b acked if b is sealed here and h is its
        header id."""
        raise NotImplementedError

    def counters(self) -> dict[str, int]:
        """Counters since open: intents_ok, intents_replayed, declined_<reason>,
        trust_accepted, trust_duplicate, trust_refused, batches_sealed, acks_accepted, ..."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError
