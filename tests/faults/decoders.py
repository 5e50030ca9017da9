"""Fuzz the protocol decoders: the fast paths (``protocol``) against the strict reference
(``tests/protocol/reference.py``, the decoders before the fast paths).

Every payload goes through ``split_envelope`` (512- and 1,024-byte limits), ``open_envelope``
and ``open_message`` for the class its type names and one other class, ``decode_body`` for
two classes (its body when it splits, else the raw bytes), ``decode_record`` and
``decode_batch``. A decoder may return or raise ``Declined``; anything else is a crash. Fast
and reference must give the same verdict (same result, or same reason and detail).
"""

import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Final

import msgpack
import nacl.signing

from protocol import limits, signing
from protocol.batch import decode_batch, decode_record, encode_batch, encode_record
from protocol.codec import pack
from protocol.errors import Declined
from protocol.leasing import LeaseReport, LeaseRequest
from protocol.messages import MESSAGE_TYPES, Message, decode_body
from protocol.signing import signing_input, signing_key_from_seed
from tests.faults import mutate as mu
from tests.protocol import reference
from tests.protocol.common import VECTORS

CLASSES: Final[list[type[Message]]] = [*MESSAGE_TYPES.values(), LeaseRequest, LeaseReport]
BY_TYPE: Final = {cls.TYPE: cls for cls in CLASSES}
CRASHES_KEPT: Final = 20


@dataclass
class DecoderFigures:
    payloads: int = 0
    calls: int = 0
    ops: Counter[str] = field(default_factory=Counter)
    verdicts: Counter[str] = field(default_factory=Counter)  # open_envelope, own class
    crashes: list[str] = field(default_factory=list)  # "op decoder exc payload-hex"
    disagreements: list[str] = field(default_factory=list)  # other result or reason
    detail_only: list[str] = field(default_factory=list)  # same reason, other log detail
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "payloads": self.payloads,
            "decoder_calls": self.calls,
            "crashes": len(self.crashes),
            "disagreements": len(self.disagreements),
            "detail_only_differences": len(self.detail_only),
            "seconds": round(self.seconds, 1),
            "ops": dict(sorted(self.ops.items())),
            "open_envelope_verdicts": dict(sorted(self.verdicts.items())),
            "first_crashes": self.crashes[:CRASHES_KEPT],
            "first_disagreements": self.disagreements[:CRASHES_KEPT],
            "first_detail_only": self.detail_only[:CRASHES_KEPT],
        }


@dataclass(frozen=True)
class Seed:
    raw: bytes  # a valid envelope (or record, batch)
    key: nacl.signing.SigningKey | None  # its signer's key, to re-sign mutated bodies


@cache
def seeds() -> tuple[Seed, ...]:
    """The golden envelopes (with their keys), records and a batch built from them, and the
    refused payloads of the vectors."""
    data = json.loads(VECTORS.read_text())
    out = [
        Seed(bytes.fromhex(e["envelope"]), signing_key_from_seed(bytes.fromhex(e["seed"])))
        for e in data["envelopes"]
    ]
    envs = [s.raw for s in out]
    small = [e for e in envs if len(e) <= limits.INTENT_ENVELOPE_BYTES_MAX]
    records = [encode_record(small[i], small[(i + 1) % len(small)]) for i in range(len(small))]
    out += [Seed(r, None) for r in records]
    out.append(Seed(encode_batch(envs[0], records), None))
    out += [Seed(bytes.fromhex(m["payload"]), None) for m in data["malformed"]]
    return tuple(out)


def envelope(msg_type: str, body: bytes, key: nacl.signing.SigningKey) -> bytes:
    sig = key.sign(signing_input(msg_type, body)).signature
    return pack([msg_type, body, bytes(key.verify_key), sig])


def dup_key_payload(rng: random.Random, seed: Seed) -> bytes | None:
    """The seed's body with one key repeated, signed with the seed's real key."""
    if seed.key is None:
        return None
    msg_type, body, _, _ = msgpack.unpackb(seed.raw)
    fields = msgpack.unpackb(body)
    return envelope(msg_type, mu.dup_key_map(rng, fields), seed.key)


def resigned_payload(rng: random.Random, seed: Seed) -> bytes | None:
    """The seed's body with one field set to a random value, validly signed: only the
    field is wrong (or, sometimes, still right)."""
    if seed.key is None:
        return None
    msg_type, body, _, _ = msgpack.unpackb(seed.raw)
    fields = msgpack.unpackb(body)
    key = rng.choice([*fields, "zz"])
    if rng.random() < 0.3 and key in fields:
        del fields[key]
    else:
        fields[key] = mu.random_value(rng, mu.MSGPACK_DEPTH_MAX - 1)
    return envelope(msg_type, pack(fields), seed.key)


def payload(rng: random.Random) -> tuple[str, bytes]:
    seed = rng.choice(seeds())
    roll = rng.random()
    if roll < 0.08:
        out = dup_key_payload(rng, seed)
        if out is not None:
            return "dup_key", out
    elif roll < 0.16:
        out = resigned_payload(rng, seed)
        if out is not None:
            return "resigned", out
    elif roll < 0.18:
        return "replay", seed.raw
    return mu.mutate(rng, seed.raw)


def verdict(fn: Any, *args: Any, **kwargs: Any) -> tuple[object, ...]:
    try:
        out = fn(*args, **kwargs)
    except Declined as e:
        return ("declined", str(e.reason), e.detail)
    if isinstance(out, signing.Signed):
        return ("ok", out.msg, out.id, out.signer, out.raw)
    return ("ok", out)


class Crash(Exception):
    """A decoder raised something other than Declined."""


def _guarded(fig: DecoderFigures, name: str, fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, ...]:
    fig.calls += 1
    try:
        return verdict(fn, *args, **kwargs)
    except Exception as exc:
        raise Crash(f"{name} {type(exc).__name__}: {exc}") from exc


def check_payload(fig: DecoderFigures, rng: random.Random, op: str, raw: bytes) -> None:
    """All decoders on ``raw``: no crash, and fast == reference."""

    def same(name: str, fast: Any, ref: Any, *args: Any, **kwargs: Any) -> tuple[Any, ...]:
        a: tuple[Any, ...] = _guarded(fig, f"fast.{name}", fast, *args, **kwargs)
        b = _guarded(fig, f"reference.{name}", ref, *args, **kwargs)
        if a[:2] != b[:2]:
            fig.disagreements.append(f"{op} {name} {raw.hex()}")
        elif a != b:
            fig.detail_only.append(f"{op} {name} {a[2]!r} / {b[2]!r} {raw.hex()}")
        return a

    try:
        own: type[Message] | None = None
        body = raw
        for bytes_max in (limits.INTENT_ENVELOPE_BYTES_MAX, limits.IDENTITY_ENVELOPE_BYTES_MAX):
            split = same(
                "split_envelope",
                signing.split_envelope,
                reference.split_envelope,
                raw,
                bytes_max=bytes_max,
            )
            if split[0] == "ok":
                env: signing.RawEnvelope = split[1]
                own = BY_TYPE.get(env.type)
                body = env.body
        other = rng.choice(CLASSES)
        for cls in {c for c in (own, other) if c is not None}:
            v = same("open_envelope", signing.open_envelope, reference.open_envelope, raw, cls)
            if cls is own:
                fig.verdicts[f"{cls.TYPE}:{v[0] if v[0] == 'ok' else v[1]}"] += 1
            opened = _guarded(fig, "fast.open_message", signing.open_message, raw, cls)
            if v[0] == "ok":
                if opened[1] != (v[1], v[2], v[3]):
                    fig.disagreements.append(f"{op} open_message {raw.hex()}")
            elif opened != v:
                fig.disagreements.append(f"{op} open_message {raw.hex()}")
        if own is None:
            fig.verdicts["unopened"] += 1
        for cls in {own or other, rng.choice(CLASSES)}:
            same("decode_body", decode_body, reference.decode_body, cls, body)
        same("decode_record", decode_record, reference.decode_record, raw)
        _guarded(fig, "decode_batch", decode_batch, raw)
    except Crash as exc:
        fig.crashes.append(f"{op} {exc} {raw[:2048].hex()}")


def run(count: int, *, seed: int = 1) -> DecoderFigures:
    """``count`` payloads from ``random.Random(seed)``."""
    rng = random.Random(seed)
    fig = DecoderFigures()
    started = time.perf_counter()
    for _ in range(count):
        op, raw = payload(rng)
        fig.ops[op] += 1
        fig.payloads += 1
        check_payload(fig, rng, op, raw)
    fig.seconds = time.perf_counter() - started
    return fig
