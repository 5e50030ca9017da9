"""fog/corewire.py: every input and output of the core round-trips; bad frames are refused."""

import dataclasses
import sqlite3
import typing

import msgpack
import pytest

from fog import corewire
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
from fog.corewire import CoreError, CoreWireError
from fog.replicas import ReplicaEvent
from fog.schema import StoreOpenError
from fog.store import Arrival, Outcome
from protocol.reasons import Reason

OUTCOME = Outcome(
    receipt=b"r" * 90,
    status="declined",
    reason=Reason.LIMIT_DAY,
    replay=False,
    intent_id=b"i" * 32,
    device=b"d" * 32,
    seq=2**64 - 1,
    owner_id="acme",
    amount_micros=1_500,
    log_index=None,
    detail="why",
    currency="EUR",
)
INPUTS: list[FogInput] = [
    Intents(
        arrivals=(
            Arrival(b"d" * 32, b"p1"),
            Arrival(b"e" * 32, b""),
            Arrival(b"f" * 32, b"p", verified=True),
        ),
        now_ms=5,
        mono_ms=7,
    ),
    TrustMessage(topic="fogpay/1/trust/owner/acme", payload=b"\x00\xff", now_ms=1),
    Tick(now_ms=1, mono_ms=2),
    Connected(now_ms=3),
    Disconnected(now_ms=4, mono_ms=0),
    Republish(now_ms=5),
    Stats(now_ms=6),
    Close(now_ms=7),
    ReturnLeases(now_ms=8, mono_ms=9, owner_id="acme", cause="shutdown"),
    ReturnLeases(now_ms=8),
]
OUTPUTS: list[FogOutput] = [
    Receipt(topic="t/r", outcome=OUTCOME),
    Receipt(topic="t/r", outcome=dataclasses.replace(OUTCOME, reason=None, status="ok")),
    Publish(topic="t/p", payload=b"x", retain=True),
    BatchSend(number=3, topic="t/b", payload=b"b" * 1000),
    LeaseRequest(topic="t/q", payload=b"q", owner_id="acme", currency="EUR", resend=True),
    LeaseReport(topic="t/l", payload=b"l", lease_id=b"L" * 16, drawn_micros=9, batch=2),
    Sealed(number=1, first_index=1, records=4),
    TrustLoaded(msg_type="ack", status="refused", reason=Reason.MALFORMED, detail="d", batch=3),
    TrustLoaded(msg_type="lease", status="accepted", answered_request=True),
    LeaseClosed(lease_id=b"L" * 16),
    Pruned(records=12),
    Alarm(event="seal_failed", error="OperationalError"),
    ReplicaEvent(event="replica_stored", origin="fog-2", number=3, detail="x"),
    Wake(mono_ms=123),
    Counters(items=(("a", 1), ("b", 2))),
    LeaseReturned(
        lease_id=b"L" * 16,
        owner_id="acme",
        currency="EUR",
        amount_micros=10,
        drawn_micros=3,
        cause="idle",
    ),
]


def body(frame: bytes) -> bytes:
    (size,) = corewire.HEADER.unpack_from(frame)
    assert size == len(frame) - corewire.HEADER.size
    return frame[corewire.HEADER.size :]


def test_the_tests_cover_every_type_of_the_closed_sets() -> None:
    assert {type(i) for i in INPUTS} == set(typing.get_args(FogInput))
    assert {type(o) for o in OUTPUTS} == set(typing.get_args(FogOutput))


@pytest.mark.parametrize("event", INPUTS, ids=lambda e: type(e).__name__)
def test_inputs_round_trip(event: FogInput) -> None:
    assert corewire.read_input(body(corewire.input_frame(event))) == event


def test_outputs_round_trip_and_arrival_read_times_stay_home() -> None:
    assert corewire.read_reply(body(corewire.outputs_frame(OUTPUTS))) == OUTPUTS
    timed = Intents(arrivals=(Arrival(b"d" * 32, b"p", 12.5),), now_ms=1)
    [arrival] = corewire.read_input(body(corewire.input_frame(timed))).arrivals  # type: ignore[union-attr]
    assert arrival.received_s == 0.0


def test_an_error_reply_is_raised_with_its_class_and_text() -> None:
    with pytest.raises(CoreError, match="OperationalError: disk I/O error"):
        import sqlite3

        corewire.read_reply(body(corewire.error_frame(sqlite3.OperationalError("disk I/O error"))))


def test_the_open_frame_round_trips() -> None:
    config = CoreConfig(
        fog_id="fog-9",
        issuer_key=b"k" * 32,
        policy=Policy(clock_skew_ms=5, rate_per_s=2.5, rate_burst=3),
        batch=BatchConfig(records_max=7, age_ms=8, keep_acked_ms=9),
        uplink=UplinkConfig(enabled=False, window=2, ack_timeout_ms=11, backlog_alarm_records=12),
        lease=LeaseConfig(
            request_below_micros=1, request_micros=2, report=False, renew_before_ms=3
        ),
        federation=FederationConfig(peers=("fog-7", "fog-8"), replicas=1, seen_every_ms=13),
    )
    assert corewire.read_open(body(corewire.open_frame("/x.db", b"s" * 32, config))) == (
        "/x.db",
        b"s" * 32,
        config,
        False,
    )
    frame = corewire.open_frame("/x.db", b"s" * 32, config, pipelined=True)
    assert corewire.read_open(body(frame))[3] is True


@pytest.mark.parametrize("event", INPUTS, ids=lambda e: type(e).__name__)
def test_every_truncated_prefix_is_refused(event: FogInput) -> None:
    data = body(corewire.input_frame(event))
    for n in range(len(data)):
        with pytest.raises(CoreWireError):
            corewire.read_input(data[:n])


@pytest.mark.parametrize(
    "value",
    [
        [],
        [99, 1],
        ["tick", 1, 2],
        [2, 1],  # Tick with a field missing
        [2, 1, 2, 3],  # one too many
        [0, [[b"d", b"p"]], 1, None],  # an arrival of two (no verified)
        [0, [[b"d", b"p", 1]], 1, None],  # verified is not a bool
        [0, [[b"d", b"p", True, b"x"]], 1, None],  # an arrival of four
        [6, 1],
        {"a": 1},
    ],
)
def test_what_is_not_a_tagged_input_is_refused(value: object) -> None:
    with pytest.raises(CoreWireError):
        corewire.read_input(msgpack.packb(value))


def test_bad_replies_are_refused() -> None:
    for value in ([], [0], [0, [[99]]], [2, []], [1, "X"]):
        with pytest.raises(CoreWireError):
            corewire.read_reply(msgpack.packb(value))


def test_an_unusable_database_in_the_child_arrives_as_store_open_error() -> None:
    """The CLI exits 2 for a database the configuration names wrongly (runtime.cli): the
    child's StoreOpenError must not become a generic CoreError on the way."""
    with pytest.raises(StoreOpenError, match="not writable"):
        corewire.read_reply(body(corewire.error_frame(StoreOpenError("database x: not writable"))))
    with pytest.raises(corewire.CoreError, match="OperationalError: disk I/O error") as caught:
        corewire.read_reply(body(corewire.error_frame(sqlite3.OperationalError("disk I/O error"))))
    assert not isinstance(caught.value, StoreOpenError)
