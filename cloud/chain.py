"""A fog's batch chain on the cloud's side: where a verified batch fits (pure).

Spec section 7: batch ``b`` of a fog is booked only after ``b - 1``, and only if its ``h`` is
the id of the header booked as ``b - 1`` and its ``s`` continues the log. ``step`` says what
a verified batch is against the chain booked so far:

- ``DUPLICATE``: a batch already booked (same number, same header id): answered with the
  current ack, nothing changes;
- ``FORK``: it contradicts the chain (another header booked at its number; or ``h``/``s``
  not continuing it): refused, and a ``chain_fork`` alarm;
- ``HOLD``: from the future (a gap before it): stored, not booked, until the gap fills;
- ``TOO_FAR``: more than ``HELD_BATCHES_MAX`` ahead: refused (``rate_limited``) until the gap
  fills;
- ``LINK``: the next one: book it.
"""

import enum
from dataclasses import dataclass
from typing import Final

from cloud.verify import CheckedHeader
from protocol.messages import ZERO_HASH

HELD_BATCHES_MAX: Final = 64  # per fog: a gap longer than this is refused until it fills


@dataclass(frozen=True, slots=True)
class Chain:
    """The last batch booked of a fog, with all before it (the ack names it)."""

    number: int = 0
    header_id: bytes = ZERO_HASH
    next_index: int = 1  # the log index the next batch must start at

    def after(self, h: CheckedHeader) -> "Chain":
        assert h.number == self.number + 1 and h.first_index == self.next_index
        return Chain(h.number, h.header_id, h.first_index + h.count)


class Step(enum.Enum):
    DUPLICATE = "duplicate"
    FORK = "fork"
    HOLD = "hold"
    TOO_FAR = "too_far"
    LINK = "link"


def step(h: CheckedHeader, chain: Chain, booked_id: bytes | None) -> tuple[Step, str]:
    """Where ``h`` fits on ``chain``; ``booked_id``: the header id booked at ``h.number``
    when ``h.number <= chain.number`` (None otherwise). Returns the step and, for a fork,
    what contradicts the chain."""
    if h.number <= chain.number:
        if booked_id == h.header_id:
            return Step.DUPLICATE, ""
        return Step.FORK, "another header already booked at this number"
    if h.number > chain.number + 1:
        if h.number - chain.number > HELD_BATCHES_MAX:
            return Step.TOO_FAR, "batch: too far ahead of the chain"
        return Step.HOLD, ""
    if h.prev_id != chain.header_id or h.first_index != chain.next_index:
        return Step.FORK, "h or s does not continue the chain"
    return Step.LINK, ""
