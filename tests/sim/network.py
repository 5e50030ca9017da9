"""The simulated network: links that drop, delay, duplicate and reorder messages; partitions
between a fog and the cloud; and the broker's retained topics.

Every message is the real MQTT payload on its real topic (``protocol.topics``); the network
only decides whether, when and how often it arrives. A message in flight is lost if, when it
would arrive, its sender or its destination is down or its link is cut (a TCP connection
dying with the crash or the partition). Retained messages (what the cloud publishes:
credentials, bindings, revocations, leases, acks) are kept as a broker keeps them and sent
again to a fog whenever it (re)subscribes: after a restart and when its partition heals.
"""

import random
from collections.abc import Callable
from typing import Final

from protocol import topics
from protocol.errors import TopicError
from protocol.topics import Kind
from tests.sim.faults import FaultMix
from tests.sim.scheduler import Scheduler

CLOUD: Final = "cloud"
LATENCY_MS: Final = 5  # every hop takes at least this long
TRUST_KINDS: Final = {Kind.TRUST_OWNER, Kind.TRUST_FOG, Kind.TRUST_BIND, Kind.TRUST_REVOKE}

Deliver = Callable[[str, str, bytes], object]  # (destination, topic, payload)


def label(topic: str) -> str:
    """A short name for a topic in a trace line."""
    levels = topic.split("/")
    if levels[2] == "gossip":
        return levels[4]
    return (
        levels[-2]
        if levels[-2] in ("intent", "receipt", "lease", "bind", "revoke")
        else (levels[-1] if levels[2] == "up" else levels[3])
    )


class Network:
    def __init__(
        self,
        sched: Scheduler,
        rng: random.Random,
        mix: FaultMix,
        fog_ids: list[str],
        deliver: Deliver,
    ) -> None:
        self._sched, self._rng, self.mix = sched, rng, mix
        self._fog_ids = fog_ids
        self._deliver = deliver
        self.down: set[str] = set()
        self.cut: set[str] = set()  # fogs whose link to the cloud is cut
        self.peer_cut: set[frozenset[str]] = set()  # fog-to-fog links cut (both ways)
        # bumped when a fog's disk (and the broker on it, with its queues) is lost: what was
        # in flight from or to it then never arrives
        self.epoch: dict[str, int] = {}
        self.retained: dict[str, bytes] = {}
        self.counts: dict[str, int] = {"sent": 0, "dropped": 0, "duplicated": 0}

    def blocked(self, src: str, dst: str) -> bool:
        if dst in self.down or src in self.down:
            return True
        if frozenset((src, dst)) in self.peer_cut:
            return True
        return (src == CLOUD and dst in self.cut) or (dst == CLOUD and src in self.cut)

    def send(self, src: str, dst: str, topic: str, payload: bytes, *, local: bool = False) -> None:
        """``local``: between a device and its fog (the fog's own broker), never cut."""
        self.counts["sent"] += 1
        mix = self.mix
        if self.blocked(src, dst) or self._rng.random() < (mix.device_drop if local else mix.drop):
            self.counts["dropped"] += 1
            return
        copies = 1
        if self._rng.random() < mix.duplicate:
            copies = 2
            self.counts["duplicated"] += 1
        epochs = (self.epoch.get(src, 0), self.epoch.get(dst, 0))
        for _ in range(copies):
            delay = LATENCY_MS + self._rng.randint(0, mix.delay_ms_max)
            what = f"deliver {src}->{dst} {label(topic)}"
            self._sched.after(delay, what, lambda: self._arrive(src, dst, topic, payload, epochs))

    def _arrive(
        self, src: str, dst: str, topic: str, payload: bytes, epochs: tuple[int, int]
    ) -> object:
        if self.blocked(src, dst) or epochs != (self.epoch.get(src, 0), self.epoch.get(dst, 0)):
            self.counts["dropped"] += 1
            return None
        return self._deliver(dst, topic, payload)

    # ---- the broker's retained topics -----------------------------------------------------

    def subscribers(self, topic: str) -> list[str]:
        """The fogs subscribed to ``topic`` (trust: every fog; lease and ack: the one named)."""
        try:
            parsed = topics.parse(topic)
        except TopicError:
            return []
        if parsed.kind in TRUST_KINDS:
            return list(self._fog_ids)
        if parsed.kind is Kind.ACK:  # its fog, and every fog with peers (ACK_FILTER)
            return list(self._fog_ids)
        if parsed.kind is Kind.LEASE and parsed.fog_id in self._fog_ids:
            assert parsed.fog_id is not None
            return [parsed.fog_id]
        return []

    def publish_retained(self, items: list[tuple[str, bytes]]) -> None:
        """The cloud publishes retained (an empty payload clears the topic)."""
        for topic, payload in items:
            if payload:
                self.retained[topic] = payload
            else:
                self.retained.pop(topic, None)
            for fog_id in self.subscribers(topic):
                self.send(CLOUD, fog_id, topic, payload)

    def resubscribe(self, fog_id: str) -> None:
        """``fog_id`` subscribed again: the broker sends it every retained message it matches."""

        # the daemon subscribes its trust filter before its lease filter (fog/daemon.py), so
        # a broker sends the retained credentials first: a peer's sub-lease on a lease topic
        # is checked against the giver's credential (docs/protocol.md 18.2)
        def order(item: tuple[str, bytes]) -> tuple[bool, str]:
            return (topics.parse(item[0]).kind not in TRUST_KINDS, item[0])

        for topic, payload in sorted(self.retained.items(), key=order):
            if fog_id in self.subscribers(topic):
                self.send(CLOUD, fog_id, topic, payload)
