"""The one codec between the fog daemon and a ``FogCore`` in a child process (fog/storeproc.py).

What crosses the socket pair is the core's closed set of messages and nothing else: a
``FogInput`` one way, the list of ``FogOutput``s (or an error) back, and once, at start, what
the core is opened with. Each message is a msgpack array: a small integer tag naming the
dataclass, then its fields in the order listed in ``_INPUT_FIELDS`` / ``_OUTPUT_FIELDS``. A
field added to a dataclass must be added here too: ``test_corewire`` round-trips one of every
type and fails on a field the tables miss. Both ends run the same code (the child is started
from the parent's files), so there is no version negotiation; a frame that does not decode is
a ``CoreWireError``.

Frames: 4-byte big-endian length, then the msgpack bytes (``HEADER``). Limits are passed to
msgpack explicitly. Outcomes inside receipts travel as their fields (``store.Outcome``), reasons
as their wire strings, arrivals as ``[device, payload, verified]`` (their read time stays with the
parent).

Replies: ``[0, [output, ...]]``, or ``[1, error_class, text]`` for an exception raised by the
core (the parent raises ``CoreError`` with that text: a storage failure, or a bug caught at the
seam; the child serves on).
"""

import dataclasses
import operator
from typing import Any, Final

import msgpack

from fog.authorize import Policy
from fog.config import BatchConfig, FederationConfig, LeaseConfig, UplinkConfig
from fog.core import (
    Alarm,
    BatchSend,
    Close,
    Connected,
    CoreConfig,
    Counters,
    Disconnected,
    FogInput,
    FogOutput,
    Intents,
    LeaseClosed,
    LeaseReport,
    LeaseRequest,
    LeaseReturned,
    Pruned,
    Publish,
    Receipt,
    Republish,
    ReturnLeases,
    Sealed,
    Stats,
    Tick,
    TrustLoaded,
    TrustMessage,
    Wake,
)
from fog.frames import HEADER
from fog.replicas import ReplicaEvent
from fog.schema import StoreError, StoreOpenError
from fog.store import Arrival, Outcome, StoreSyncError
from protocol.reasons import Reason

FRAME_BYTES_MAX: Final = 64 * 1024 * 1024  # a group of 4096 intents with receipts is < 8 MiB
ITEMS_MAX: Final = 1_000_000  # array items, map pairs in one frame
OK: Final = 0
ERROR: Final = 1

_INPUTS: Final[tuple[type, ...]] = (
    Intents,
    TrustMessage,
    Tick,
    Connected,
    Disconnected,
    Republish,
    Stats,
    Close,
    ReturnLeases,
)
_OUTPUTS: Final[tuple[type, ...]] = (
    Receipt,
    Publish,
    BatchSend,
    LeaseRequest,
    LeaseReport,
    Sealed,
    TrustLoaded,
    LeaseClosed,
    Pruned,
    Alarm,
    Wake,
    Counters,
    LeaseReturned,
    ReplicaEvent,
)
_OUTCOME_FIELDS: Final = tuple(f.name for f in dataclasses.fields(Outcome))
_OUTCOME_VALUES: Final = operator.attrgetter(*_OUTCOME_FIELDS)
_REASON_AT: Final = _OUTCOME_FIELDS.index("reason")
_REASONS: Final = {str(r): r for r in Reason}
_INTENTS_TAG: Final = _INPUTS.index(Intents)
_RECEIPT_TAG: Final = _OUTPUTS.index(Receipt)


class CoreWireError(StoreError):
    """A frame that does not decode into one of the core's messages."""


class CoreError(StoreError):
    """The core raised (in the child); ``str()`` names the exception class and its text."""


# ---- values that are not msgpack scalars ----------------------------------------------------
# (a Reason is a str: msgpack packs it as one; it is read back through _REASONS)


def _enc_value(name: str, value: Any) -> Any:
    if name == "arrivals":
        return [[a.topic_device, a.payload, a.verified] for a in value]
    if name == "outcome":
        return _OUTCOME_VALUES(value)
    if name == "items":
        return [[k, v] for k, v in value]
    return value


def _arrival(device: Any, payload: Any, verified: Any) -> Arrival:
    if type(verified) is not bool:
        raise CoreWireError("arrival: verified is not a bool")
    return Arrival(bytes(device), bytes(payload), verified=verified)


def _dec_value(name: str, value: Any) -> Any:
    if name == "arrivals":
        return tuple([_arrival(d, p, v) for d, p, v in value])
    if name == "outcome":
        return _outcome(value)
    if name == "items":
        return tuple((str(k), int(v)) for k, v in value)
    if name == "reason":
        return None if value is None else _REASONS[value]
    return value


def _outcome(values: list[Any]) -> Outcome:
    if len(values) != len(_OUTCOME_FIELDS):
        raise ValueError("outcome: wrong number of fields")
    reason = values[_REASON_AT]
    if reason is not None:
        values[_REASON_AT] = _REASONS[reason]
    return Outcome(*values)


_NAMES: Final[dict[type, tuple[str, ...]]] = {
    cls: tuple(f.name for f in dataclasses.fields(cls)) for cls in (*_INPUTS, *_OUTPUTS)
}


def _encode(obj: Any, table: tuple[type, ...]) -> list[Any]:
    cls = type(obj)
    if cls is Receipt:  # the hot path: one per intent
        return [_RECEIPT_TAG, obj.topic, _OUTCOME_VALUES(obj.outcome)]
    return [table.index(cls), *(_enc_value(f, getattr(obj, f)) for f in _NAMES[cls])]


def _decode(data: Any, table: tuple[type, ...]) -> Any:
    if not isinstance(data, list) or not data or type(data[0]) is not int:
        raise CoreWireError("not a tagged message")
    if not 0 <= data[0] < len(table):
        raise CoreWireError(f"unknown tag {data[0]}")
    cls = table[data[0]]
    names = _NAMES[cls]
    if len(data) != 1 + len(names):
        raise CoreWireError(f"{cls.__name__}: {len(data) - 1} fields, not {len(names)}")
    try:
        if cls is Receipt:
            return Receipt(topic=data[1], outcome=_outcome(data[2]))
        return cls(**{n: _dec_value(n, v) for n, v in zip(names, data[1:], strict=True)})
    except (TypeError, ValueError, KeyError) as exc:
        raise CoreWireError(f"{cls.__name__}: {exc}") from exc


def _pack(obj: Any) -> bytes:
    body: bytes = msgpack.packb(obj, use_bin_type=True)
    assert len(body) <= FRAME_BYTES_MAX, "a core message past the frame limit"
    return HEADER.pack(len(body)) + body


def unpack(body: bytes) -> Any:
    """The msgpack value of one frame's body (limits explicit)."""
    try:
        return msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=True,
            max_bin_len=FRAME_BYTES_MAX,
            max_str_len=FRAME_BYTES_MAX,
            max_array_len=ITEMS_MAX,
            max_map_len=ITEMS_MAX,
            max_ext_len=0,
        )
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise CoreWireError(f"undecodable frame: {type(exc).__name__}") from exc


# ---- the frames -----------------------------------------------------------------------------


def input_frame(event: FogInput) -> bytes:
    return _pack(_encode(event, _INPUTS))


def read_input(body: bytes) -> FogInput:
    event: FogInput = _decode(unpack(body), _INPUTS)
    return event


def outputs_frame(outputs: list[FogOutput]) -> bytes:
    return _pack([OK, [_encode(o, _OUTPUTS) for o in outputs]])


def error_frame(exc: BaseException) -> bytes:
    return _pack([ERROR, type(exc).__name__, str(exc)[:1000]])


def read_reply(body: bytes) -> list[FogOutput]:
    """The outputs of a reply; raises ``CoreError`` for an error reply (``StoreOpenError`` as
    itself: the CLI tells an unusable database from a failure)."""
    data = unpack(body)
    if not isinstance(data, list) or len(data) < 2:
        raise CoreWireError("not a reply")
    if data[0] == ERROR and len(data) == 3:
        if data[1] == StoreOpenError.__name__:  # the configured database is unusable: exit 2
            raise StoreOpenError(str(data[2]))
        if data[1] == StoreSyncError.__name__:  # the durability barrier failed: the fog stops
            raise StoreSyncError(str(data[2]))
        raise CoreError(f"{data[1]}: {data[2]}")
    if data[0] != OK or not isinstance(data[1], list):
        raise CoreWireError("not a reply")
    return [_decode(o, _OUTPUTS) for o in data[1]]


def open_frame(path: str, seed: bytes, config: CoreConfig, *, pipelined: bool = False) -> bytes:
    """What the child opens its core with (sent once, first; the seed never in argv/env).
    ``pipelined``: the pipelined group commit (fog/pipeline.py) rather than a fsync in each
    COMMIT."""
    return _pack(
        [
            path,
            seed,
            config.fog_id,
            config.issuer_key,
            dataclasses.asdict(config.policy),
            dataclasses.asdict(config.batch),
            dataclasses.asdict(config.uplink),
            dataclasses.asdict(config.lease),
            dataclasses.asdict(config.federation),
            pipelined,
        ]
    )


def read_open(body: bytes) -> tuple[str, bytes, CoreConfig, bool]:
    """``open_frame``'s path, seed, config and ``pipelined``."""
    try:
        path, seed, fog_id, issuer, policy, batch, uplink, lease, federation, pipe = unpack(body)
        federation["peers"] = tuple(federation["peers"])
        config = CoreConfig(
            fog_id=fog_id,
            issuer_key=issuer,
            policy=Policy(**policy),
            batch=BatchConfig(**batch),
            uplink=UplinkConfig(**uplink),
            lease=LeaseConfig(**lease),
            federation=FederationConfig(**federation),
        )
    except (TypeError, ValueError) as exc:
        raise CoreWireError(f"bad open frame: {exc}") from exc
    if type(pipe) is not bool:
        raise CoreWireError("bad open frame: pipelined")
    return str(path), bytes(seed), config, pipe
