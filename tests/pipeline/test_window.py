"""fog.uplink.Window (pure): in order, bounded in flight, go-back-N after a silent timeout,
everything again after a reconnect, acked batches never again."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fog.uplink import Window
from tests.protocol.common import PROPERTY


def test_sends_in_order_once_then_waits_for_acks() -> None:
    w = Window(window=3, ack_timeout_ms=1000)
    assert w.plan([1, 2, 3], now_ms=0) == [1, 2, 3]
    assert w.plan([1, 2, 3], now_ms=500) == []  # in flight, not timed out
    assert w.plan([3, 4, 5], now_ms=600) == [4, 5]  # 1 and 2 acked: the window slides
    assert w.plan([3, 4, 5], now_ms=1500) == []  # progress at 600: not yet 1 s without an ack


def test_no_ack_for_the_timeout_sends_again_from_the_first_unacked() -> None:
    w = Window(window=2, ack_timeout_ms=1000)
    assert w.plan([1, 2], now_ms=0) == [1, 2]
    assert w.plan([1, 2], now_ms=999) == []
    assert w.plan([1, 2], now_ms=1000) == [1, 2]
    assert w.resends == 1
    assert w.plan([1, 2], now_ms=2999) == []  # restarted, and the wait doubled: 2 s
    assert w.plan([1, 2], now_ms=3000) == [1, 2]
    assert w.plan([1, 2], now_ms=7000) == [1, 2]  # 4 s
    assert w.plan([2, 3], now_ms=7001) == [3]  # an ack moved: back to 1 s
    assert w.plan([2, 3], now_ms=8001) == [2, 3]


def test_the_wait_for_an_ack_is_capped() -> None:
    w = Window(window=1, ack_timeout_ms=100_000)
    now, sends = 0, 0
    for _ in range(100):
        sends += len(w.plan([1], now_ms=now))
        now += 100_000
    assert w.wait_ms == 300_000  # ACK_WAIT_MS_MAX
    assert 30 <= sends <= 40  # one send per 300 s once capped: ~100 * 100 s / 300 s


def test_reconnect_and_failed_publish_send_again() -> None:
    w = Window(window=4, ack_timeout_ms=10_000)
    assert w.plan([5, 6, 7], now_ms=0) == [5, 6, 7]
    w.failed(6)
    assert w.plan([5, 6, 7], now_ms=1) == [6]
    w.reset()
    assert w.plan([5, 6, 7], now_ms=2) == [5, 6, 7]


def test_limits_are_checked() -> None:
    with pytest.raises(AssertionError):
        Window(window=0, ack_timeout_ms=1)
    with pytest.raises(AssertionError):
        Window(window=65, ack_timeout_ms=1)
    w = Window(window=2, ack_timeout_ms=1)
    with pytest.raises(AssertionError):
        w.plan([1, 2, 3], now_ms=0)  # more than the window
    with pytest.raises(AssertionError):
        w.plan([2, 1], now_ms=0)  # not in order


@PROPERTY
@given(
    acks=st.lists(st.integers(min_value=0, max_value=3), min_size=1, max_size=40),
    gaps=st.lists(st.integers(min_value=0, max_value=700), min_size=1, max_size=40),
)
def test_every_batch_is_sent_until_acked_and_never_after(acks: list[int], gaps: list[int]) -> None:
    """Against a cloud that acks a few batches at each step: whatever is unacked has been sent
    at least once, nothing beyond the window is sent, nothing acked is sent again."""
    window, total = 4, 20
    w = Window(window=window, ack_timeout_ms=1000)
    acked, now, sent_ever = 0, 0, set()
    for ack, gap in zip(acks, gaps, strict=False):
        now += gap
        unacked = list(range(acked + 1, min(total, acked + window) + 1))
        out = w.plan(unacked, now_ms=now)
        assert set(out) <= set(unacked) and all(n > acked for n in out)
        sent_ever |= set(out)
        assert set(unacked) <= sent_ever
        acked = min(total, acked + ack) if unacked else acked
