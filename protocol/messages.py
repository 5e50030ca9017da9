"""The nine message types of the spec as frozen dataclasses, with their body schemas.

A body is a msgpack map with short string keys. ``encode_body`` writes the keys in the order
of the spec's tables and omits absent optional keys; ``decode_body`` enforces every rule of
spec section 2 (no unknown, duplicate or missing keys, exact msgpack types, ranges, patterns)
and each type's cross-field rules, raising ``Declined(MALFORMED)``.
"""

import re
from collections.abc import Callable
from dataclasses import dataclass, fields
from types import MemberDescriptorType
from typing import Any, ClassVar, Final, TypeVar

from protocol import limits, sealed
from protocol.codec import CONTAINER_ITEMS_MAX, pack, unpack_body, unpack_strict
from protocol.errors import Declined
from protocol.reasons import Reason

ID_PATTERN: Final = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
CURRENCY_PATTERN: Final = re.compile(r"[A-Z]{3}")
RESERVED_FOG_IDS: Final = frozenset({"trust", "up", "gossip", "held"})
STATUS_OK: Final = "ok"
STATUS_DECLINED: Final = "declined"
ZERO_KEY: Final = bytes(32)
ZERO_HASH: Final = bytes(32)


def is_id(value: object) -> bool:
    return type(value) is str and ID_PATTERN.fullmatch(value) is not None


def is_fog_id(value: object) -> bool:
    return is_id(value) and value not in RESERVED_FOG_IDS


def is_currency(value: object) -> bool:
    return type(value) is str and CURRENCY_PATTERN.fullmatch(value) is not None


# Strings already matched (ids and currencies repeat: one fog, a few payees), so the decoders
# compiled by ``_compile`` skip the regular expression; bounded, then no longer added to.
SEEN_STRINGS_MAX: Final = 4096
_seen_ids: set[str] = set()
_seen_currencies: set[str] = set()


def _seen_id(v: str) -> bool:
    if ID_PATTERN.fullmatch(v) is None:
        return False
    if len(_seen_ids) < SEEN_STRINGS_MAX:
        _seen_ids.add(v)
    return True


def _seen_currency(v: str) -> bool:
    if CURRENCY_PATTERN.fullmatch(v) is None:
        return False
    if len(_seen_currencies) < SEEN_STRINGS_MAX:
        _seen_currencies.add(v)
    return True


# A check's expression over ``{v}``, for the decoders compiled by ``_compile`` (same rule).
_INLINE: Final[dict[Callable[[object], bool], str]] = {
    is_id: "type({v}) is str and ({v} in _seen_ids or _seen_id({v}))",
    is_fog_id: (
        "type({v}) is str and ({v} in _seen_ids or _seen_id({v})) and {v} not in _reserved"
    ),
    is_currency: "type({v}) is str and ({v} in _seen_currencies or _seen_currency({v}))",
}


def _uint(lo: int, hi: int) -> Callable[[object], bool]:
    check: Callable[[object], bool] = lambda v: type(v) is int and lo <= v <= hi  # noqa: E731
    _INLINE[check] = f"type({{v}}) is int and {lo} <= {{v}} <= {hi}"
    return check


def _bin(n: int) -> Callable[[object], bool]:
    check: Callable[[object], bool] = lambda v: type(v) is bytes and len(v) == n  # noqa: E731
    _INLINE[check] = f"type({{v}}) is bytes and len({{v}}) == {n}"
    return check


def _is_memo(v: object) -> bool:
    return type(v) is bytes and len(v) <= limits.MEMO_BYTES_MAX


def _is_sealed_memo(v: object) -> bool:
    return (
        type(v) is bytes and sealed.SEALED_MEMO_BYTES_MIN <= len(v) <= sealed.SEALED_MEMO_BYTES_MAX
    )


def _is_text64(v: object) -> bool:
    return type(v) is str and len(v.encode()) <= limits.REVOKE_REASON_BYTES_MAX


def _is_pay_list(v: object) -> bool:
    return (
        type(v) is list
        and 1 <= len(v) <= limits.PAY_LIST_MAX
        and all(is_id(p) for p in v)
        and len(set(v)) == len(v)
    )


_REASON_CODES: Final = frozenset(str(r) for r in Reason)


def _is_reason(v: object) -> bool:
    return type(v) is str and v in _REASON_CODES


UINT = _uint(0, limits.UINT64_MAX)
UINT_POS = _uint(1, limits.UINT64_MAX)
AMOUNT = _uint(limits.AMOUNT_MICROS_MIN, limits.AMOUNT_MICROS_MAX)
LIMIT = _uint(0, limits.AMOUNT_MICROS_MAX)
KEY = _bin(limits.KEY_BYTES)
HASH = _bin(limits.HASH_BYTES)
LEASE_ID = _bin(limits.LEASE_ID_BYTES)


@dataclass(frozen=True, slots=True)
class Field:
    key: str  # on the wire
    attr: str  # on the dataclass
    # Never true for a map: decode_body relies on it (see protocol.codec.unpack_body).
    check: Callable[[object], bool]
    optional: bool = False
    # what the checked wire value becomes on the dataclass (None: an array becomes a tuple);
    # for a field whose values nest arrays (``protocol.gossip``'s entries)
    convert: Callable[[Any], Any] | None = None


class Message:
    """Base of the message dataclasses. TYPE is the envelope type string."""

    __slots__ = ()
    TYPE: ClassVar[str]
    SCHEMA: ClassVar[tuple[Field, ...]]
    ENVELOPE_BYTES_MAX: ClassVar[int] = limits.IDENTITY_ENVELOPE_BYTES_MAX
    # items of one msgpack array or map inside the body (a larger one is malformed)
    ITEMS_MAX: ClassVar[int] = CONTAINER_ITEMS_MAX

    def validate(self) -> None:
        """Cross-field rules; raises Declined(MALFORMED)."""


def _fail(detail: str) -> Declined:
    return Declined(Reason.MALFORMED, detail)


def _check_window(msg: Any) -> None:
    if not msg.not_before_ms < msg.not_after_ms:
        raise _fail(f"{msg.TYPE}: na must be > nb")


@dataclass(frozen=True, slots=True, kw_only=True)
class OwnerCredential(Message):
    TYPE: ClassVar[str] = "owner"
    SCHEMA: ClassVar[tuple[Field, ...]]
    owner_id: str
    key: bytes
    not_before_ms: int
    not_after_ms: int

    def validate(self) -> None:
        _check_window(self)


@dataclass(frozen=True, slots=True, kw_only=True)
class FogCredential(Message):
    TYPE: ClassVar[str] = "fog"
    SCHEMA: ClassVar[tuple[Field, ...]]
    fog_id: str
    key: bytes
    not_before_ms: int
    not_after_ms: int

    def validate(self) -> None:
        _check_window(self)


@dataclass(frozen=True, slots=True, kw_only=True)
class Binding(Message):
    TYPE: ClassVar[str] = "bind"
    SCHEMA: ClassVar[tuple[Field, ...]]
    device: bytes
    owner_id: str
    not_before_ms: int
    not_after_ms: int
    currency: str
    tx_max_micros: int
    day_max_micros: int
    payees: tuple[str, ...] | None = None

    def validate(self) -> None:
        _check_window(self)


@dataclass(frozen=True, slots=True, kw_only=True)
class Revocation(Message):
    TYPE: ClassVar[str] = "revoke"
    SCHEMA: ClassVar[tuple[Field, ...]]
    key: bytes
    time_ms: int
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Intent(Message):
    TYPE: ClassVar[str] = "intent"
    SCHEMA: ClassVar[tuple[Field, ...]]
    ENVELOPE_BYTES_MAX: ClassVar[int] = limits.INTENT_ENVELOPE_BYTES_MAX
    device: bytes
    fog_id: str
    seq: int
    payee_id: str
    amount_micros: int
    currency: str
    time_ms: int
    memo: bytes | None = None
    # the sealing extension (docs/protocol.md section 16): a memo sealed to a key the device
    # chose, and the request that receipts to this intent come sealed to d
    sealed_memo: bytes | None = None
    seal_receipts: int | None = None

    def validate(self) -> None:
        if self.memo is not None and self.sealed_memo is not None:
            raise _fail("intent: m and sm exclude each other")


@dataclass(frozen=True, slots=True, kw_only=True)
class Receipt(Message):
    TYPE: ClassVar[str] = "receipt"
    SCHEMA: ClassVar[tuple[Field, ...]]
    ENVELOPE_BYTES_MAX: ClassVar[int] = limits.INTENT_ENVELOPE_BYTES_MAX
    intent_id: bytes
    device: bytes
    seq: int
    status: str
    reason: Reason | None = None
    log_index: int | None = None
    lease_id: bytes | None = None
    time_ms: int

    @property
    def ok(self) -> bool:
        return self.status == STATUS_OK

    def validate(self) -> None:
        if self.status == STATUS_OK:
            if self.reason is not None or self.log_index is None or self.lease_id is None:
                raise _fail("receipt: ok needs n and l and no r")
        elif self.status == STATUS_DECLINED:
            if self.reason is None or self.log_index is not None or self.lease_id is not None:
                raise _fail("receipt: declined needs r and no n or l")
        else:
            raise _fail(f"receipt: status {self.status!r}")
        # A payload declined malformed has no d or q to echo: spec section 4 fixes them.
        if self.reason == Reason.MALFORMED:
            if self.device != ZERO_KEY or self.seq != 0:
                raise _fail("receipt: malformed needs d = 32 zero bytes and q = 0")
        elif self.seq == 0:
            raise _fail("receipt: q = 0 only for malformed")


@dataclass(frozen=True, slots=True, kw_only=True)
class Lease(Message):
    TYPE: ClassVar[str] = "lease"
    SCHEMA: ClassVar[tuple[Field, ...]]
    lease_id: bytes
    owner_id: str
    fog_id: str
    amount_micros: int
    currency: str
    not_after_ms: int


@dataclass(frozen=True, slots=True, kw_only=True)
class BatchHeader(Message):
    TYPE: ClassVar[str] = "batch"
    SCHEMA: ClassVar[tuple[Field, ...]]
    fog_id: str
    number: int
    prev_id: bytes
    first_index: int
    count: int
    root: bytes
    time_ms: int

    def validate(self) -> None:
        if self.number == 1 and self.prev_id != ZERO_HASH:
            raise _fail("batch: batch 1 must have h = 32 zero bytes")


@dataclass(frozen=True, slots=True, kw_only=True)
class Ack(Message):
    TYPE: ClassVar[str] = "ack"
    SCHEMA: ClassVar[tuple[Field, ...]]
    fog_id: str
    number: int
    header_id: bytes


def _status(v: object) -> bool:
    return v in (STATUS_OK, STATUS_DECLINED)


OwnerCredential.SCHEMA = (
    Field("o", "owner_id", is_id),
    Field("k", "key", KEY),
    Field("nb", "not_before_ms", UINT),
    Field("na", "not_after_ms", UINT),
)
FogCredential.SCHEMA = (
    Field("f", "fog_id", is_fog_id),
    Field("k", "key", KEY),
    Field("nb", "not_before_ms", UINT),
    Field("na", "not_after_ms", UINT),
)
Binding.SCHEMA = (
    Field("d", "device", KEY),
    Field("o", "owner_id", is_id),
    Field("nb", "not_before_ms", UINT),
    Field("na", "not_after_ms", UINT),
    Field("c", "currency", is_currency),
    Field("tx", "tx_max_micros", LIMIT),
    Field("day", "day_max_micros", LIMIT),
    Field("pay", "payees", _is_pay_list, optional=True),
)
Revocation.SCHEMA = (
    Field("k", "key", KEY),
    Field("t", "time_ms", UINT),
    Field("r", "reason", _is_text64),
)
Intent.SCHEMA = (
    Field("d", "device", KEY),
    Field("f", "fog_id", is_fog_id),
    Field("q", "seq", UINT_POS),
    Field("p", "payee_id", is_id),
    Field("a", "amount_micros", AMOUNT),
    Field("c", "currency", is_currency),
    Field("t", "time_ms", UINT),
    Field("m", "memo", _is_memo, optional=True),
    Field("sm", "sealed_memo", _is_sealed_memo, optional=True),
    Field("sr", "seal_receipts", _uint(sealed.SCHEME, sealed.SCHEME), optional=True),
)
Receipt.SCHEMA = (
    Field("i", "intent_id", HASH),
    Field("d", "device", KEY),
    Field("q", "seq", UINT),
    Field("s", "status", _status),
    Field("r", "reason", _is_reason, optional=True),
    Field("n", "log_index", UINT_POS, optional=True),
    Field("l", "lease_id", LEASE_ID, optional=True),
    Field("t", "time_ms", UINT),
)
Lease.SCHEMA = (
    Field("l", "lease_id", LEASE_ID),
    Field("o", "owner_id", is_id),
    Field("f", "fog_id", is_fog_id),
    Field("a", "amount_micros", AMOUNT),
    Field("c", "currency", is_currency),
    Field("na", "not_after_ms", UINT),
)
BatchHeader.SCHEMA = (
    Field("f", "fog_id", is_fog_id),
    Field("b", "number", UINT_POS),
    Field("h", "prev_id", HASH),
    Field("s", "first_index", UINT_POS),
    Field("n", "count", _uint(1, limits.BATCH_RECORDS_MAX)),
    Field("r", "root", HASH),
    Field("t", "time_ms", UINT),
)
Ack.SCHEMA = (
    Field("f", "fog_id", is_fog_id),
    Field("b", "number", UINT_POS),
    Field("h", "header_id", HASH),
)

MESSAGE_TYPES: Final[dict[str, type[Message]]] = {
    cls.TYPE: cls
    for cls in (
        OwnerCredential,
        FogCredential,
        Binding,
        Revocation,
        Intent,
        Receipt,
        Lease,
        BatchHeader,
        Ack,
    )
}

M = TypeVar("M", bound=Message)


def _wire_value(value: object) -> object:
    if isinstance(value, tuple):
        return [_wire_value(v) for v in value]
    if isinstance(value, Reason):
        return str(value)
    return value


def encode_body(msg: Message) -> bytes:
    """The canonical body bytes of ``msg`` (validated first: we never sign what we'd refuse)."""
    body: dict[str, object] = {}
    for f in msg.SCHEMA:
        value = getattr(msg, f.attr)
        if value is None and f.optional:
            continue
        wire = _wire_value(value)
        if not f.check(wire):
            raise _fail(f"{msg.TYPE}.{f.key}: invalid value {value!r}")
        body[f.key] = wire
    msg.validate()
    return pack(body)


def decode_body(cls: type[M], body: bytes) -> M:
    """Decode and validate a body; raises Declined(MALFORMED).

    The common case (a valid body) takes the fast path: ``unpack_body`` (no pairs hook) and
    the type's compiled ``_Decoder``. Anything it does not accept is decoded again the
    thorough way, ``unpack_strict`` and ``_decode_checked`` rule by rule, which refuses it
    with the rule broken (or, never in practice, accepts it: the verdict is that path's)."""
    decoder = _DECODERS.get(cls) or _compile(cls)
    size, items = cls.ENVELOPE_BYTES_MAX, cls.ITEMS_MAX
    obj = unpack_body(body, bytes_max=size, items_max=items, what=decoder.what)
    msg = decoder.fast(obj) if type(obj) is dict else None
    if msg is None:
        strict = unpack_strict(body, bytes_max=size, items_max=items, what=decoder.what)
        msg = _decode_checked(cls, strict)
    msg.validate()
    return msg


_ABSENT: Final = object()
_DECODERS: dict[type[Message], "_Decoder"] = {}  # filled on first use (also lreq, lrep)


@dataclass(frozen=True, slots=True)
class _Decoder:
    """A type's schema compiled once. ``fast(obj)`` applies exactly the rules of
    ``_decode_checked`` to a decoded map (no unknown or missing key, every value checked,
    the same conversions) but returns None instead of explaining a failure;
    ``decode_body`` then asks ``_decode_checked`` for the reason."""

    what: str
    fast: Callable[[dict[Any, Any]], Any]


def _compile(cls: type[Message]) -> _Decoder:
    """Write ``fast`` for ``cls`` as straight-line Python (as ``dataclasses`` writes
    ``__init__``): one lookup and one inlined check per field; then the message is built as
    ``pickle`` builds one, ``object.__new__`` and each slot's setter (the frozen dataclass's
    ``__init__`` costs twice that, through ``object.__setattr__``; there is no
    ``__post_init__`` to skip, and every field is set)."""
    defaults = {f.name: f.default for f in fields(cls)}  # type: ignore[arg-type]
    assert not hasattr(cls, "__post_init__"), cls
    env: dict[str, Any] = {
        "cls": cls,
        "Reason": Reason,
        "ABSENT": _ABSENT,
        "required": frozenset(f.key for f in cls.SCHEMA if not f.optional),
        "known": frozenset(f.key for f in cls.SCHEMA),
        "_seen_ids": _seen_ids,
        "_seen_id": _seen_id,
        "_seen_currencies": _seen_currencies,
        "_seen_currency": _seen_currency,
        "_reserved": RESERVED_FOG_IDS,
        "new": object.__new__,
    }
    lines = [
        "def fast(obj):",
        "    keys = obj.keys()",
        "    if not (keys >= required and keys <= known):",
        "        return None",
    ]
    sets = []
    for i, f in enumerate(cls.SCHEMA):
        v = f"v{i}"
        env[f"check{i}"] = f.check
        test = _INLINE.get(f.check, f"check{i}({{v}})").replace("{v}", v)
        if f.optional:
            assert defaults[f.attr] is None, (cls, f.attr)  # absent = the default, None
            lines += [
                f"    {v} = obj.get({f.key!r}, ABSENT)",
                f"    if {v} is ABSENT:",
                f"        {v} = None",
                f"    elif not ({test}):",
                "        return None",
            ]
        else:
            lines += [f"    {v} = obj[{f.key!r}]", f"    if not ({test}):", "        return None"]
        if f.convert is not None:
            env[f"convert{i}"] = f.convert
            lines.append(f"    if {v} is not None: {v} = convert{i}({v})")
        elif f.check not in _INLINE:  # only an opaque check may accept an array
            lines.append(f"    if type({v}) is list: {v} = tuple({v})")
        if cls is Receipt and f.attr == "reason":
            lines.append(f"    if {v} is not None: {v} = Reason({v})")
        slot = getattr(cls, f.attr)
        assert isinstance(slot, MemberDescriptorType), (cls, f.attr)  # slots=True
        env[f"set{i}"] = slot.__set__
        sets.append(f"    set{i}(msg, {v})")
    assert len(sets) == len(fields(cls)), cls  # type: ignore[arg-type]
    lines += ["    msg = new(cls)", *sets, "    return msg"]
    exec("\n".join(lines), env)  # our own schema: no outside input reaches the source
    decoder = _Decoder(f"{cls.TYPE} body", env["fast"])
    _DECODERS[cls] = decoder
    return decoder


def _decode_checked(cls: type[M], obj: object) -> M:
    """Every rule in turn, raising Declined(MALFORMED) with the first one broken."""
    if type(obj) is not dict:
        raise _fail(f"{cls.TYPE}: body is not a map")
    known = {f.key for f in cls.SCHEMA}
    unknown = [k for k in obj if k not in known]
    if unknown:
        raise _fail(f"{cls.TYPE}: unknown keys {sorted(map(str, unknown))}")
    kwargs: dict[str, object] = {}
    for f in cls.SCHEMA:
        if f.key not in obj:
            if not f.optional:
                raise _fail(f"{cls.TYPE}: missing key {f.key!r}")
            continue
        value = obj[f.key]
        if not f.check(value):
            raise _fail(f"{cls.TYPE}.{f.key}: invalid value")
        if f.convert is not None:
            value = f.convert(value)
        elif type(value) is list:
            value = tuple(value)
        elif f.attr == "reason" and cls is Receipt:
            value = Reason(value)
        kwargs[f.attr] = value
    return cls(**kwargs)


def _check_schemas() -> None:
    for cls in MESSAGE_TYPES.values():
        attrs = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        assert attrs == {f.attr for f in cls.SCHEMA}, cls


_check_schemas()
