"""The fog's uplink window: which sealed batches to publish to the cloud, and when again.

Batches go up on ``fogpay/1/up/{fog_id}/batch`` (QoS 1) in order, at most ``window`` unacked
ones in flight. The cloud answers with a retained, issuer-signed ack naming the highest batch
it holds with all earlier ones; the daemon applies it to the store, which marks batches acked
(acks only move forward). Go-back-N: when no ack has moved for ``ack_timeout_ms`` since the
first unacked batch was sent, everything from the first unacked batch is sent again, and the
wait doubles for each such silent round (to ``ACK_WAIT_MS_MAX``), back to ``ack_timeout_ms``
once an ack moves; everything is sent again after every reconnect (a QoS 1 delivery to a
broker is not a delivery to the cloud). Sending a batch twice costs nothing: the cloud books a
batch once (a duplicate is answered with the current ack) and holds one that arrives early
until the gap before it fills.

An ack does not delete anything at once: records go later, once old enough and their lease
closed (``FogStore.prune``, ``batch.keep_acked_ms``), so a retransmitted intent still gets its
stored receipt meanwhile.

``Window`` is pure (the clock is passed in). ``FogCore`` (fog/core.py) plans with it after
every seal, every ack that moved and every uplink tick, and hands the batches to send to the
daemon; the wire of a batch just sealed is kept for its first send (rebuilding a batch from
the log costs milliseconds), a resend reads it from the store.
"""

from dataclasses import dataclass, field
from typing import Final

WINDOW_MAX: Final = 64  # the cloud holds at most 64 batches ahead of its chain
RESENDS_MAX: Final = 1_000_000  # go-back-N rounds counted (a counter, not a stop)
ACK_WAIT_MS_MAX: Final = 300_000  # the wait for an ack doubles per silent round, to this


@dataclass(slots=True)
class Window:
    """Which unacked batches to send now. ``plan`` is given the first ``window`` unacked
    batch numbers, ascending, and returns those to publish (marking them sent)."""

    window: int
    ack_timeout_ms: int
    sent: dict[int, int] = field(default_factory=dict)  # batch number -> time sent (ms)
    first_unacked: int | None = None
    progress_ms: int = 0  # when the first unacked batch last changed or was (re)sent
    resends: int = 0
    wait_ms: int = 0  # the current wait for an ack: ack_timeout_ms, doubled per silent round

    def __post_init__(self) -> None:
        assert 1 <= self.window <= WINDOW_MAX and self.ack_timeout_ms > 0
        self.wait_ms = self.ack_timeout_ms

    def plan(self, unacked: list[int], *, now_ms: int) -> list[int]:
        assert unacked == sorted(unacked) and len(unacked) <= self.window
        pending = set(unacked)
        self.sent = {n: t for n, t in self.sent.items() if n in pending}
        first = unacked[0] if unacked else None
        if first != self.first_unacked:  # an ack moved (or the first batch was sealed)
            self.first_unacked, self.progress_ms = first, now_ms
            self.wait_ms = self.ack_timeout_ms
        elif first is not None and first in self.sent:
            if now_ms - self.progress_ms >= self.wait_ms:
                self.sent.clear()  # no ack moved: go back to the first unacked
                self.resends = min(self.resends + 1, RESENDS_MAX)
                # the cloud or the link is down: don't flood a bridge's queue with copies
                self.wait_ms = min(ACK_WAIT_MS_MAX, max(self.wait_ms * 2, self.ack_timeout_ms))
        out = [n for n in unacked if n not in self.sent]
        for n in out:
            self.sent[n] = now_ms
        if first is not None and first in out:
            self.progress_ms = now_ms
        return out

    def reset(self) -> None:
        """After a reconnect: everything unacked is sent again, and acks are awaited afresh."""
        self.sent.clear()
        self.wait_ms = self.ack_timeout_ms

    def failed(self, number: int) -> None:
        """Publishing ``number`` failed: it is sent again at the next plan."""
        self.sent.pop(number, None)
