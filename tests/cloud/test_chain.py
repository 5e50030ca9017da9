"""The chain step (pure): where a verified batch fits on a fog's chain, spec section 7."""

import pytest

from cloud.chain import HELD_BATCHES_MAX, Chain, Step, step
from cloud.verify import CheckedHeader

A, B, C = bytes([1]) * 32, bytes([2]) * 32, bytes([3]) * 32


def header(
    number: int, prev_id: bytes, first_index: int, count: int = 5, hid: bytes = C
) -> CheckedHeader:
    return CheckedHeader("fog-a", number, prev_id, first_index, count, bytes(32), 0, hid, A, b"")


CHAIN = Chain(number=3, header_id=B, next_index=16)  # batches 1..3 booked, log 1..15


@pytest.mark.parametrize(
    ("h", "booked_id", "want"),
    [
        (header(4, B, 16), None, Step.LINK),
        (header(4, A, 16), None, Step.FORK),  # h is not the id booked as 3
        (header(4, B, 17), None, Step.FORK),  # s leaves a hole in the log
        (header(4, B, 15), None, Step.FORK),  # s overlaps the log
        (header(3, A, 11, hid=B), B, Step.DUPLICATE),
        (header(3, A, 11, hid=C), B, Step.FORK),  # another header at a booked number
        (header(1, bytes(32), 1, hid=C), A, Step.FORK),
        (header(5, C, 21), None, Step.HOLD),
        (header(3 + HELD_BATCHES_MAX, C, 99), None, Step.HOLD),
        (header(4 + HELD_BATCHES_MAX, C, 99), None, Step.TOO_FAR),
    ],
)
def test_step(h: CheckedHeader, booked_id: bytes | None, want: Step) -> None:
    assert step(h, CHAIN, booked_id)[0] is want


def test_a_fork_says_what_contradicts_the_chain() -> None:
    assert step(header(4, A, 16), CHAIN, None)[1] == "h or s does not continue the chain"
    assert step(header(2, A, 6), CHAIN, B)[1] == "another header already booked at this number"


def test_the_first_batch_links_on_the_empty_chain_and_the_chain_moves_past_it() -> None:
    first = header(1, bytes(32), 1, count=7)
    assert step(first, Chain(), None)[0] is Step.LINK
    assert Chain().after(first) == Chain(1, C, 8)
    with pytest.raises(AssertionError):
        CHAIN.after(first)  # only the next batch moves a chain
