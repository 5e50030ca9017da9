"""``python -m tests.sim --seeds N --start S [--fogs F] [--steps K] [-v]``

Runs seeds S..S+N-1 and ends with the line ``N seeds, V violations, ...``. A failing seed
prints the command that replays it and the last events before its violation; ``-v`` prints
every event of every seed as it runs.
"""

import argparse
import logging
import sys
import time

import structlog

from tests.sim.planted import BUGS, planted
from tests.sim.simulation import FOGS_DEFAULT, STEPS_DEFAULT, Result, SimConfig, run


def quiet_logs() -> None:
    """The system under test logs through structlog: keep the simulator's output readable."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))


def report(result: Result, *, fogs: int, steps: int, plant: str | None, out: list[str]) -> None:
    extra = f" --fogs {fogs}" if fogs != FOGS_DEFAULT else ""
    extra += f" --steps {steps}" if steps != STEPS_DEFAULT else ""
    extra += f" --plant {plant}" if plant else ""
    out.append(f"seed {result.seed}: VIOLATION at step {result.step}: {result.violations[0]}")
    out.append(f"  faults: {result.mix}")
    out.append(f"  replay: python -m tests.sim --seeds 1 --start {result.seed}{extra} -v")
    out.append(f"  last {len(result.trace)} events:")
    out.extend(f"    {line}" for line in result.trace)


def summary(results: list[Result]) -> str:
    totals: dict[str, int] = {}
    for r in results:
        for k, v in r.stats.items():
            totals[k] = totals.get(k, 0) + v
    bad = sum(1 for r in results if not r.ok)
    crashes = totals.get("fog_crashes", 0) + totals.get("cloud_crashes", 0)
    return (
        f"{len(results)} seeds, {bad} violations, {totals.get('payments', 0)} payments, "
        f"{totals.get('receipts_ok', 0)} ok receipts, {crashes} crashes, "
        f"{totals.get('partitions', 0)} partitions, {totals.get('net_dropped', 0)} dropped, "
        f"{totals.get('leases_stranded', 0)} leases stranded, "
        f"{totals.get('steps', 0)} steps"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.sim", description=__doc__)
    p.add_argument("--seeds", type=int, default=100)
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--fogs", type=int, default=FOGS_DEFAULT)
    p.add_argument("--steps", type=int, default=STEPS_DEFAULT, help="chaos-phase events")
    p.add_argument("--plant", choices=sorted(BUGS), help="run with a known bug planted")
    p.add_argument("-v", "--verbose", action="store_true", help="print every event")
    args = p.parse_args(argv)
    if args.seeds < 1 or args.fogs < 1 or args.steps < 1:
        p.error("--seeds, --fogs and --steps must be >= 1")
    quiet_logs()
    config = SimConfig(fogs=args.fogs, steps=args.steps)
    results = []
    started = time.perf_counter()
    for seed in range(args.start, args.start + args.seeds):
        echo = print if args.verbose else None
        if echo is not None:
            print(f"== seed {seed}")
        with planted(args.plant):
            result = run(seed, config, echo=echo)
        results.append(result)
        if not result.ok:
            lines: list[str] = []
            report(result, fogs=args.fogs, steps=args.steps, plant=args.plant, out=lines)
            print("\n".join(lines), flush=True)
    elapsed = time.perf_counter() - started
    print(f"{summary(results)}, {elapsed:.1f} s")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
