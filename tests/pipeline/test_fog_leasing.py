"""fog.leasing (pure): one outstanding request per (owner, currency), the policy request for
an owner with no live lease, top-ups under the threshold, bounded resends of the same bytes;
reports resent with backoff until cleared."""

import nacl.signing
import pytest

from fog.leasing import (
    REPORT_RETRY_MS_MAX,
    LeaseReports,
    LeaseRequests,
    report_envelope,
)
from protocol.leasing import LeaseReport, LeaseRequest, lease_report_topic, lease_request_topic
from protocol.signing import open_envelope, public_key

KEY = nacl.signing.SigningKey(bytes(range(32)))
DEVICE = bytes(range(1, 33))
PAIR = ("alice", "EUR")


def requests(**kw: int) -> LeaseRequests:
    args = {"below_micros": 1_000, "request_micros": 50_000, "timeout_ms": 100}
    args |= {"attempts_max": 3} | kw
    return LeaseRequests(fog_id="fog-a", key=KEY, **args)


def opened(wire: bytes) -> LeaseRequest:
    signed = open_envelope(wire, LeaseRequest, signer=public_key(KEY))
    return signed.msg


def test_no_live_lease_asks_for_the_policy_lease_with_the_device() -> None:
    r = requests()
    topic, wire = r.declined(PAIR, device=DEVICE, amount_micros=5, has_live=False, now_ms=7)
    assert topic == lease_request_topic("fog-a")
    msg = opened(wire)
    assert (msg.owner_id, msg.currency, msg.amount_micros, msg.device) == (
        "alice",
        "EUR",
        None,
        DEVICE,
    )
    # one outstanding per pair: a second decline sends nothing
    assert r.declined(PAIR, device=DEVICE, amount_micros=5, has_live=False, now_ms=8) is None
    assert r.room(PAIR, 0, now_ms=9) is None


def test_a_live_lease_short_of_room_asks_for_the_larger_of_request_and_amount() -> None:
    r = requests()
    out = r.declined(PAIR, device=DEVICE, amount_micros=80_000, has_live=True, now_ms=1)
    assert out is not None and opened(out[1]).amount_micros == 80_000
    r2 = requests()
    out2 = r2.declined(PAIR, device=DEVICE, amount_micros=5, has_live=True, now_ms=1)
    assert out2 is not None and opened(out2[1]).amount_micros == 50_000
    assert opened(out2[1]).device is None


def test_top_up_only_under_the_threshold() -> None:
    r = requests()
    assert r.room(PAIR, 1_000, now_ms=1) is None
    out = r.room(PAIR, 999, now_ms=1)
    assert out is not None and opened(out[1]).amount_micros == 50_000


def test_resent_same_bytes_until_attempts_then_forgotten_and_a_new_one_may_go() -> None:
    r = requests(attempts_max=3)
    _, wire = r.room(PAIR, 0, now_ms=0) or ("", b"")
    assert r.due(now_ms=99) == []
    assert r.due(now_ms=100) == [(lease_request_topic("fog-a"), wire)]
    assert r.due(now_ms=200) == [(lease_request_topic("fog-a"), wire)]
    assert r.due(now_ms=300) == []  # three sends: abandoned
    assert r.abandoned == 1 and not r.pending
    again = r.room(PAIR, 0, now_ms=301)
    assert again is not None and again[1] != wire  # a new request (new t, new id)


def test_a_lease_of_the_pair_answers_the_request() -> None:
    r = requests()
    assert r.room(PAIR, 0, now_ms=0) is not None
    assert r.answered(("alice", "USD")) is False
    assert r.answered(PAIR) is True
    assert r.due(now_ms=10_000) == []


def test_reports_back_off_until_cleared_and_are_bounded() -> None:
    rep = LeaseReports(fog_id="fog-a", retry_ms=100)
    wire = report_envelope(
        KEY, fog_id="fog-a", lease_id=bytes(16), drawn_micros=5, last_batch=2, now_ms=9
    )
    msg = open_envelope(wire, LeaseReport, signer=public_key(KEY)).msg
    assert (msg.drawn_micros, msg.last_batch, msg.lease_id) == (5, 2, bytes(16))
    assert rep.track(bytes(16), wire, now_ms=0)
    assert not rep.track(bytes(16), wire, now_ms=0)
    assert rep.due(now_ms=0) == [(lease_report_topic("fog-a"), wire)]
    assert rep.due(now_ms=99) == []
    assert len(rep.due(now_ms=100)) == 1  # then 200 later, then 400...
    assert rep.due(now_ms=299) == []
    assert len(rep.due(now_ms=300)) == 1
    rep.reset()
    assert len(rep.due(now_ms=301)) == 1  # a reconnect: due at once
    assert rep.cleared(bytes(16)) and rep.due(now_ms=10**9) == []
    capped = LeaseReports(fog_id="fog-a", retry_ms=100)
    capped.track(b"x" * 16, wire, now_ms=0)
    now, sends = 0, 0
    for _ in range(1_000):  # past the 200 sends at which reports used to be abandoned
        sends += len(capped.due(now_ms=now))
        now += REPORT_RETRY_MS_MAX
    assert sends == 1_000 and capped.pending  # never abandoned (docs/protocol.md 17.6)
    assert capped.due(now_ms=now - 1) == []  # and never more often than the cap


def test_limits_are_checked() -> None:
    with pytest.raises(AssertionError):
        requests(request_micros=0)
    with pytest.raises(AssertionError):
        LeaseReports(fog_id="fog-a", retry_ms=0)


def test_request_time_is_the_fog_clock_not_the_resend_schedule() -> None:
    # Resends run on a monotonic clock that restarts at boot; the request's t must be wall
    # time, or the first request after a reboot could repeat an old request's id (and the
    # cloud would answer it with the old, maybe closed, lease).
    r = requests()
    _, wire = r.declined(
        PAIR, device=DEVICE, amount_micros=5, has_live=False, now_ms=7, fog_time_ms=1_790_000
    )
    assert opened(wire).time_ms == 1_790_000
    r2 = requests()
    _, wire2 = r2.room(PAIR, 0, now_ms=3, fog_time_ms=1_790_001) or ("", b"")
    assert opened(wire2).time_ms == 1_790_001
