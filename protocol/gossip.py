"""Sequence gossip between fogs: the ``seen`` message (docs/protocol.md section 17.4).

A fog tells each of its peers which ``(device, q, intent id)`` it authorized since its last
``seen``, so a peer can hold a device's sequence high-water mark across fogs (its ``stale``
check) and notice a cloned device key: two different intents signed with one ``(d, q)``.
Signed by the fog of ``f`` (its fog credential's key), sent fog -> peer fog on
``fogpay/1/gossip/{to}/seen``, not retained. Its own envelope limit (``ENVELOPE_BYTES_MAX``,
16,384 bytes) holds the largest valid body (128 entries of 78 bytes at most) with room.

Revocations travel between fogs as they are (``gossip/{to}/revoke``: the ``revoke`` envelope
byte for byte), so they need no message here.
"""

from dataclasses import dataclass
from typing import Any, ClassVar, Final, NamedTuple

from protocol.messages import HASH, KEY, UINT, UINT_POS, Field, Message, is_fog_id

SEEN_TYPE: Final = "seen"
SEEN_ENVELOPE_BYTES_MAX: Final = 16_384
SEEN_ENTRIES_MAX: Final = 128
SEEN_ENTRY_ITEMS: Final = 3


class SeenEntry(NamedTuple):
    """One authorization: the device, its sequence number, the intent id authorized at it."""

    device: bytes
    seq: int
    intent_id: bytes


def _is_entry(v: object) -> bool:
    return (
        type(v) is list
        and len(v) == SEEN_ENTRY_ITEMS
        and KEY(v[0])
        and UINT_POS(v[1])
        and HASH(v[2])
    )


def _is_entries(v: object) -> bool:
    return type(v) is list and 1 <= len(v) <= SEEN_ENTRIES_MAX and all(_is_entry(e) for e in v)


def _entries(v: Any) -> tuple[SeenEntry, ...]:
    return tuple(SeenEntry(e[0], e[1], e[2]) for e in v)


@dataclass(frozen=True, slots=True, kw_only=True)
class Seen(Message):
    TYPE: ClassVar[str] = SEEN_TYPE
    SCHEMA: ClassVar[tuple[Field, ...]]
    ENVELOPE_BYTES_MAX: ClassVar[int] = SEEN_ENVELOPE_BYTES_MAX
    ITEMS_MAX: ClassVar[int] = SEEN_ENTRIES_MAX
    fog_id: str  # the fog that authorized (the signer is its fog credential's key)
    entries: tuple[SeenEntry, ...]
    time_ms: int  # fog time


Seen.SCHEMA = (
    Field("f", "fog_id", is_fog_id),
    Field("e", "entries", _is_entries, convert=_entries),
    Field("t", "time_ms", UINT),
)
