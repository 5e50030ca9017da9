"""A fog store in a second process, killed with SIGKILL at a chosen point (tests/fog/test_crash.py).

Usage: python -m tests.fog.crash_child SPEC_FILE. The spec (msgpack) names the database, the
keys, the mode and the groups of arrivals. Receipts are written to stdout, one hex line per
outcome, only after ``process`` returned: what a daemon would have published.

Modes: ``kill_at_commit`` SIGKILLs the process when SQLite starts the group's COMMIT (through
the connection's trace callback: real I/O, our code untouched); ``kill_after`` after the
groups' receipts are out, without close; ``loop`` runs until the parent kills it;
``kill_at_seal_commit`` processes, then dies at the COMMIT of the first sealed batch.
"""

import os
import signal
import sys

import msgpack
import nacl.signing

from fog.authorize import Policy
from fog.store import Arrival, FogStore

NOW = 1_790_000_000_000 + 12 * 3_600_000


def die_at_commit(statement: str) -> None:
    if statement.strip().upper() == "COMMIT":
        os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    with open(sys.argv[1], "rb") as f:
        spec = msgpack.unpackb(f.read())
    store = FogStore.open(
        spec["db"],
        fog_id=spec["fog_id"],
        fog_key=nacl.signing.SigningKey(spec["fog_seed"]),
        issuer_key=spec["issuer"],
        policy=Policy(rate_burst=10_000, rate_per_s=10_000.0),
    )
    mode = spec["mode"]
    if mode == "kill_at_commit":
        store._conn.set_trace_callback(die_at_commit)
    for group in spec["groups"]:
        arrivals = [Arrival(d, p) for d, p in group]
        for o in store.process(arrivals, now_ms=NOW):
            sys.stdout.write(f"{o.status} {o.receipt.hex()}\n")
        sys.stdout.flush()
    if mode == "kill_at_seal_commit":
        store._conn.set_trace_callback(die_at_commit)
        store.seal_due(now_ms=NOW, records_max=2, age_ms=0)
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    main()
