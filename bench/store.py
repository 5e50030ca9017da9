"""Micro-benchmark of FogStore.process: authorized intents per second for groups of 1, 10, 100.

Not a test. Real SQLite file (WAL, synchronous=FULL) in a temporary directory on the disk of
``--dir`` (default: the system's temp dir); intents are signed before the clock starts, so
the figure is verify + authorize + sign receipt + durable commit.

    .venv/bin/python bench/store.py [--intents 2000] [--dir PATH]
"""

import sys
from pathlib import Path

# The project before bench/ on the path: bench/fog.py would shadow the fog package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import tempfile
import time
from pathlib import Path

import nacl.signing

from fog.authorize import Policy
from fog.store import Arrival, FogStore
from protocol.messages import Binding, Intent, Lease, OwnerCredential
from protocol.signing import public_key, seal

NOW = 1_790_000_000_000
DEVICES = 100
GROUPS = (1, 10, 100)


def prepare(path: Path, intents: int) -> tuple[FogStore, list[Arrival]]:
    issuer, fog, owner = (nacl.signing.SigningKey.generate() for _ in range(3))
    store = FogStore.open(
        path,
        fog_id="bench",
        fog_key=fog,
        issuer_key=public_key(issuer),
        policy=Policy(rate_per_s=1e9, rate_burst=10**9),
    )
    cred = OwnerCredential(
        owner_id="o", key=public_key(owner), not_before_ms=0, not_after_ms=2 * NOW
    )
    assert store.put_trust("owner", seal(cred, issuer), now_ms=NOW).status == "accepted"
    lease = Lease(
        lease_id=bytes(16),
        owner_id="o",
        fog_id="bench",
        amount_micros=2**53,
        currency="EUR",
        not_after_ms=2 * NOW,
    )
    assert store.put_trust("lease", seal(lease, issuer), now_ms=NOW).status == "accepted"
    devs = [nacl.signing.SigningKey.generate() for _ in range(DEVICES)]
    for d in devs:
        b = Binding(
            device=public_key(d),
            owner_id="o",
            not_before_ms=0,
            not_after_ms=2 * NOW,
            currency="EUR",
            tx_max_micros=10**9,
            day_max_micros=2**53,
        )
        assert store.put_trust("bind", seal(b, owner), now_ms=NOW).status == "accepted"
    arrivals = []
    for k in range(intents):
        d = devs[k % DEVICES]
        i = Intent(
            device=public_key(d),
            fog_id="bench",
            seq=k // DEVICES + 1,
            payee_id="p",
            amount_micros=1000,
            currency="EUR",
            time_ms=NOW,
        )
        arrivals.append(Arrival(public_key(d), seal(i, d)))
    return store, arrivals


def run(directory: str | None, group: int, intents: int) -> float:
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        store, arrivals = prepare(Path(tmp) / "fog.db", intents)
        start = time.perf_counter()
        for k in range(0, len(arrivals), group):
            out = store.process(arrivals[k : k + group], now_ms=NOW)
            assert all(o.status == "ok" for o in out), out[0].reason
        elapsed = time.perf_counter() - start
        store.close()
    return intents / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--intents", type=int, default=2000)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    for group in GROUPS:
        rate = run(args.dir, group, args.intents)
        print(f"group {group:>3}: {rate:8.0f} intents/s  ({args.intents} intents, FULL sync)")


if __name__ == "__main__":
    main()
