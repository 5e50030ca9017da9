"""How long fsync takes on the disk holding a directory: the floor under a durable commit.

    .venv/bin/python bench/fsync.py [--dir PATH] [--rate 400] [--seconds 15]

Writes 4 KiB at a time into a scratch file in ``--dir`` (default: the system temp dir, where
bench/fog.py puts the fog's database) and fsyncs after each write, ``--rate`` times a second,
as the fog does for each group of intents (SQLite WAL, synchronous=FULL). Prints the latency
percentiles and every stall over 10 ms with when it happened. A receipt leaves only after its
group's commit is on disk, so an fsync stall of S ms delays every intent arriving meanwhile
by up to S ms: with a stall of ~40 ms every second, ~4% of intents wait over 10 ms whatever
the software does.
"""

import argparse
import os
import tempfile
import time

STALL_MS = 10.0
BLOCK = b"\0" * 4096
BLOCKS = 256  # the file stays 1 MiB: written in place, as a WAL that has reached its size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--rate", type=float, default=400.0, help="fsyncs per second (at most)")
    ap.add_argument("--seconds", type=float, default=15.0)
    args = ap.parse_args()
    fd, path = tempfile.mkstemp(dir=args.dir, prefix="fsync-")
    latencies: list[float] = []
    stalls: list[tuple[float, float]] = []
    start = time.monotonic()
    try:
        for i in range(int(args.rate * args.seconds)):  # bounded in count and in time
            os.pwrite(fd, BLOCK, (i % BLOCKS) * len(BLOCK))
            t = time.perf_counter()
            os.fsync(fd)
            ms = (time.perf_counter() - t) * 1000
            latencies.append(ms)
            if ms > STALL_MS:
                stalls.append((time.monotonic() - start, ms))
            delay = start + (i + 1) / args.rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
    finally:
        os.close(fd)
        os.unlink(path)
    elapsed = time.monotonic() - start
    xs = sorted(latencies)

    def pct(p: float) -> float:
        return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]

    print(
        f"fsync on {args.dir}: {len(xs)} in {elapsed:.1f} s; p50 {pct(50):.2f} ms, p99 "
        f"{pct(99):.2f} ms, p99.9 {pct(99.9):.2f} ms, max {xs[-1]:.1f} ms"
    )
    stalled_ms = sum(ms for _, ms in stalls)
    print(
        f"stalls over {STALL_MS:.0f} ms: {len(stalls)} ({len(stalls) / elapsed:.2f}/s), "
        f"{stalled_ms / elapsed / 10:.1f}% of the time"
    )
    print("  at s: " + ", ".join(f"{t:.1f} ({ms:.0f} ms)" for t, ms in stalls[:40]))


if __name__ == "__main__":
    main()
