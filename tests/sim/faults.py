"""Swarm testing: each seed draws its own fault mix (Groce et al., ISSTA 2012).

One seed drops a third of the messages and never crashes anything, another partitions fogs
often and crashes the cloud; every fault is switched off entirely in some seeds, so a bug
that only shows when one fault is absent (or when two meet) is reached too.
"""

import dataclasses
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

# the faults a replay can switch off (``--without``): name -> FaultMix field
FAULTS: Final = {
    "drop": "drop",
    "dup": "duplicate",
    "delay": "delay_ms_max",
    "partition": "partition",
    "fog_crash": "fog_crash",
    "cloud_crash": "cloud_crash",
    "device_drop": "device_drop",
    "peer_partition": "peer_partition",
    "disk_loss": "disk_loss",
}


@dataclass(frozen=True, slots=True)
class FaultMix:
    drop: float  # probability that a message is lost
    duplicate: float  # probability that it arrives twice
    delay_ms_max: int  # extra delay drawn uniformly in [0, delay_ms_max]: reorders
    partition: float  # per fog tick: probability that the fog's uplink is cut
    partition_ms_max: int
    fog_crash: float  # per fog tick: probability that the fog crashes
    cloud_crash: float  # per cloud event: probability that the cloud crashes after it
    down_ms_max: int  # how long a crashed node stays down, at most
    device_drop: float  # loss between devices and their fog (local broker)
    # a cut is seen by the fog (its MQTT client talks to the cloud's broker: Disconnected,
    # then Connected) or not (a bridge between brokers is cut: the fog only misses acks)
    client_partition: bool = False
    peer_partition: float = 0.0  # per fog tick: probability that a link to one peer is cut
    disk_loss: float = 0.0  # per fog tick: probability that the fog's file is destroyed

    @staticmethod
    def draw(rng: random.Random) -> "FaultMix":
        def maybe(p: float, *values: float) -> float:
            return rng.choice(values) if rng.random() < p else 0.0

        return FaultMix(
            drop=maybe(0.6, 0.02, 0.1, 0.3),
            duplicate=maybe(0.5, 0.05, 0.2),
            delay_ms_max=int(maybe(0.6, 200, 2_000, 8_000)),
            partition=maybe(0.5, 0.01, 0.05),
            partition_ms_max=rng.choice((2_000, 10_000, 30_000)),
            fog_crash=maybe(0.5, 0.005, 0.02, 0.05),
            cloud_crash=maybe(0.4, 0.01, 0.05),
            down_ms_max=rng.choice((500, 3_000, 15_000)),
            device_drop=maybe(0.4, 0.05, 0.2),
            client_partition=rng.random() < 0.5,
            peer_partition=maybe(0.4, 0.01, 0.05),
            disk_loss=maybe(0.5, 0.02, 0.05),
        )

    @staticmethod
    def none() -> "FaultMix":
        return FaultMix(0.0, 0.0, 0, 0.0, 0, 0.0, 0.0, 0, 0.0)

    def without(self, names: Sequence[str]) -> "FaultMix":
        """This mix with the faults ``names`` (keys of ``FAULTS``) switched off."""
        off: dict[str, Any] = {FAULTS[n]: 0 for n in names}
        return dataclasses.replace(self, **off)

    def has(self, name: str) -> bool:
        return bool(getattr(self, FAULTS[name]))

    def describe(self) -> str:
        parts = [
            f"drop={self.drop}",
            f"dup={self.duplicate}",
            f"delay<={self.delay_ms_max}ms",
            f"partition={self.partition}",
            f"fog_crash={self.fog_crash}",
            f"cloud_crash={self.cloud_crash}",
            f"device_drop={self.device_drop}",
            f"partition_seen={self.client_partition}",
            f"peer_partition={self.peer_partition}",
            f"disk_loss={self.disk_loss}",
        ]
        return " ".join(parts)
