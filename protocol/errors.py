"""Expected, handled failures. Bugs are AssertionError, never these."""

from protocol.reasons import Reason


class FogpayError(Exception):
    """Base of every operating error the protocol raises."""


class Declined(FogpayError):
    """A message is refused with a stable reason code; callers branch on ``.reason``."""

    def __init__(self, reason: Reason, detail: str = "") -> None:
        super().__init__(f"{reason} {detail}".strip())
        self.reason = reason
        self.detail = detail


class TopicError(FogpayError):
    """A topic string does not match any topic of spec section 8."""
