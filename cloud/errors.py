"""Operating errors of the cloud (bugs are AssertionError)."""

from protocol.errors import FogpayError


class RegistryError(FogpayError):
    """A registry command is refused (unknown owner, key already used, bad proof...)."""
