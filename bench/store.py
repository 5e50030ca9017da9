"""Micro-benchmark of FogStore.process and seal_due on a real SQLite file.

Not a test. Real SQLite file (WAL, synchronous=FULL) in a temporary directory on the disk of
``--dir`` (default: the system's temp dir); intents are signed before the clock starts, so
the figure is verify + authorize + sign receipt + durable commit. For each group size: the
authorized intents per second (wall), wall and CPU microseconds per intent, SQL statements per
intent (counted on a further set of groups with the connection's trace callback, outside the
timed part), and the floor: the CPU per intent of verifying it and signing its receipt alone.
Then the time ``seal_due`` takes for full batches of ``--batch`` records.

    .venv/bin/python bench/store.py [--intents 2048] [--groups 1,2,4,...,256] [--repeat 3]
                                    [--dir PATH]

Each figure is the best of ``--repeat`` runs (the machine is shared: the best is the least
disturbed).
"""

import sys
from pathlib import Path

# The project before bench/ on the path: bench/fog.py would shadow the fog package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import tempfile
import time
from dataclasses import dataclass

import nacl.signing

from fog.authorize import Policy
from fog.store import Arrival, FogStore
from protocol.messages import Binding, Intent, Lease, OwnerCredential, Receipt
from protocol.signing import open_envelope, public_key, seal

NOW = 1_790_000_000_000
DEVICES = 100
GROUPS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
TRACED_INTENTS = 512  # processed after the timed part, with statements counted
SEAL_BATCH = 256


@dataclass
class Figures:
    group: int
    rate_per_s: float
    wall_us: float
    cpu_us: float
    statements: float  # per intent, BEGIN/COMMIT included


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


def feed(store: FogStore, arrivals: list[Arrival], group: int) -> None:
    for k in range(0, len(arrivals), group):
        out = store.process(arrivals[k : k + group], now_ms=NOW)
        assert all(o.status == "ok" for o in out), out[0].reason


def count_statements(store: FogStore, arrivals: list[Arrival], group: int) -> float:
    count = 0

    def trace(_statement: str) -> None:
        nonlocal count
        count += 1

    conn = store._conn  # the bench only: statements counted on the store's own connection
    conn.set_trace_callback(trace)
    try:
        feed(store, arrivals, group)
    finally:
        conn.set_trace_callback(None)
    return count / len(arrivals)


def run(directory: str | None, group: int, intents: int) -> Figures:
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        store, arrivals = prepare(Path(tmp) / "fog.db", intents + TRACED_INTENTS)
        timed, traced = arrivals[:intents], arrivals[intents:]
        wall, cpu = time.perf_counter(), time.process_time()
        feed(store, timed, group)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        statements = count_statements(store, traced, group)
        store.close()
    return Figures(group, intents / wall, wall / intents * 1e6, cpu / intents * 1e6, statements)


def floor_us(intents: int) -> float:
    """CPU per intent of the cryptography alone: verify the intent, sign an ok receipt."""
    dev, fog = nacl.signing.SigningKey.generate(), nacl.signing.SigningKey.generate()
    payloads = [
        seal(
            Intent(
                device=public_key(dev),
                fog_id="bench",
                seq=k + 1,
                payee_id="p",
                amount_micros=1000,
                currency="EUR",
                time_ms=NOW,
            ),
            dev,
        )
        for k in range(intents)
    ]
    cpu = time.process_time()
    for p in payloads:
        s = open_envelope(p, Intent)
        r = Receipt(
            intent_id=s.id,
            device=s.msg.device,
            seq=s.msg.seq,
            status="ok",
            log_index=1,
            lease_id=bytes(16),
            time_ms=NOW,
        )
        seal(r, fog)
    return (time.process_time() - cpu) / intents * 1e6


def seal_ms(directory: str | None, batch: int, batches: int) -> tuple[float, float]:
    """(wall ms, CPU ms) of seal_due per full batch of ``batch`` records."""
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        store, arrivals = prepare(Path(tmp) / "fog.db", batch * batches)
        feed(store, arrivals, 256)
        wall, cpu = time.perf_counter(), time.process_time()
        sealed = []
        for _ in range(batches):
            sealed += store.seal_due(now_ms=NOW, records_max=batch, age_ms=10**9)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        assert [len(b.records) for b in sealed] == [batch] * batches
        store.close()
    return wall / batches * 1e3, cpu / batches * 1e3


def cpu_of(f: Figures | tuple[float, float]) -> float:
    return f.cpu_us if isinstance(f, Figures) else f[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--intents", type=int, default=2048)
    parser.add_argument("--groups", default=",".join(map(str, GROUPS)))
    parser.add_argument("--batch", type=int, default=SEAL_BATCH)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    print(f"{args.intents} intents from {DEVICES} devices, FULL sync, one group per process()")
    print("group  intents/s  wall us/intent  cpu us/intent  statements/intent")
    for group in map(int, args.groups.split(",")):
        f = min((run(args.dir, group, args.intents) for _ in range(args.repeat)), key=cpu_of)
        print(
            f"{f.group:>5}  {f.rate_per_s:9.0f}  {f.wall_us:14.0f}  {f.cpu_us:13.0f}"
            f"  {f.statements:17.2f}"
        )
    floor = min(floor_us(1000) for _ in range(args.repeat))
    print(f"floor (verify intent + sign receipt): {floor:.0f} us CPU/intent")
    wall, cpu = min((seal_ms(args.dir, args.batch, 4) for _ in range(args.repeat)), key=cpu_of)
    print(f"seal_due, batch of {args.batch} records: {wall:.1f} ms wall, {cpu:.1f} ms CPU")


if __name__ == "__main__":
    main()
