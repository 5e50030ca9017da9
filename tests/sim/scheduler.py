"""The virtual clock and the event queue: the only notion of time in a simulated run.

Events are kept in a heap ordered by (virtual time, insertion number), so two events at the
same millisecond run in the order they were scheduled: a run is a pure function of its seed.
Nothing here reads the wall clock or sleeps.
"""

import heapq
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

T0_MS: Final = 1_790_000_000_000  # virtual time 0 (a fixed "now"; the wall clock is never read)
EVENTS_QUEUED_MAX: Final = 200_000  # a run that queues more has a runaway loop: a sim bug


@dataclass(order=True, slots=True)
class Event:
    at_ms: int
    order: int
    what: str = field(compare=False)  # short label for traces ("deliver fog-1 lease", ...)
    run: Callable[[], object] = field(compare=False, repr=False)


class Scheduler:
    def __init__(self) -> None:
        self.now_ms = T0_MS
        self._heap: list[Event] = []
        self._order = 0

    def at(self, at_ms: int, what: str, run: Callable[[], object]) -> None:
        assert at_ms >= self.now_ms, (at_ms, self.now_ms)
        assert len(self._heap) < EVENTS_QUEUED_MAX, "event queue runaway"
        self._order += 1
        heapq.heappush(self._heap, Event(at_ms, self._order, what, run))

    def after(self, delay_ms: int, what: str, run: Callable[[], object]) -> None:
        self.at(self.now_ms + max(0, delay_ms), what, run)

    def pop(self) -> Event | None:
        """The next event, with the clock advanced to it; None when nothing is queued."""
        if not self._heap:
            return None
        event = heapq.heappop(self._heap)
        self.now_ms = event.at_ms
        return event

    def pending(self) -> int:
        return len(self._heap)
