"""Counters of the cloud service: every refusal and alarm counts (exported by the shell)."""

from collections import Counter
from dataclasses import dataclass, field


@dataclass(slots=True)
class Metrics:
    counters: Counter[str] = field(default_factory=Counter)

    def inc(self, name: str, n: int = 1) -> None:
        self.counters[name] += n

    def get(self, name: str) -> int:
        return self.counters[name]
