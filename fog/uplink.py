"""The fog's uplink window: which sealed batches to publish to the cloud, and when again.

Batches go up on ``fogpay/1/up/{fog_id}/batch`` (QoS 1) in order, at most ``window`` unacked
ones in flight. The cloud answers with a retained, issuer-signed ack naming the highest batch
it holds with all earlier ones; the daemon applies it to the store, which marks batches acked
(acks only move forward). Go-back-N: when no ack has moved for ``ack_timeout_ms`` since the
first unacked batch was sent, everything from the first unacked batch is sent again; the same
after every reconnect (a QoS 1 delivery to a broker is not a delivery to the cloud). Sending
a batch twice costs nothing: the cloud books a batch once (a duplicate is answered with the
current ack) and holds one that arrives early until the gap before it fills.

Nothing is pruned after an ack: a retransmitted intent must still get its stored receipt.

``Window`` is pure (the clock is passed in); the daemon does the I/O.
"""

from dataclasses import dataclass, field
from typing import Final

WINDOW_MAX: Final = 64  # the cloud holds at most 64 batches ahead of its chain
RESENDS_MAX: Final = 1_000_000  # go-back-N rounds counted (a counter, not a stop)


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

    def __post_init__(self) -> None:
        assert 1 <= self.window <= WINDOW_MAX and self.ack_timeout_ms > 0

    def plan(self, unacked: list[int], *, now_ms: int) -> list[int]:
        assert unacked == sorted(unacked) and len(unacked) <= self.window
        pending = set(unacked)
        self.sent = {n: t for n, t in self.sent.items() if n in pending}
        first = unacked[0] if unacked else None
        if first != self.first_unacked:
            self.first_unacked, self.progress_ms = first, now_ms
        elif first is not None and first in self.sent:
            if now_ms - self.progress_ms >= self.ack_timeout_ms:
                self.sent.clear()  # no ack moved: go back to the first unacked
                self.resends = min(self.resends + 1, RESENDS_MAX)
        out = [n for n in unacked if n not in self.sent]
        for n in out:
            self.sent[n] = now_ms
        if first is not None and first in out:
            self.progress_ms = now_ms
        return out

    def reset(self) -> None:
        """After a reconnect: everything unacked is sent again."""
        self.sent.clear()

    def failed(self, number: int) -> None:
        """Publishing ``number`` failed: it is sent again at the next plan."""
        self.sent.pop(number, None)
