"""``python -m tests.sim --seeds N --start S [--fogs F] [--steps K] [--without FAULTS]
[--plant BUG] [-v]``

Runs seeds S..S+N-1 and ends with the line ``N seeds, V violations, ...``. A failing seed
prints the command that replays it and the last events before its violation, then shrinks
it: each fault of its mix is switched off in turn while the seed still fails, then the
fewest chaos-phase steps that still fail are searched (``--no-shrink`` skips this); the
smaller replay's command and last events follow. ``-v`` prints every event as it runs.
"""

import argparse
import dataclasses
import sys
import time
from collections.abc import Iterator
from typing import Final

from tests.sim.faults import FAULTS
from tests.sim.planted import BUGS, config_for, planted
from tests.sim.simulation import (
    FOGS_DEFAULT,
    STEPS_DEFAULT,
    Result,
    SimConfig,
    Simulation,
    quiet_logs,
    run,
    run_many,
)

SHRINK_RUNS_MAX: Final = 16  # binary search over the steps


def replay_command(seed: int, config: SimConfig, plant: str | None) -> str:
    extra = f" --fogs {config.fogs}" if config.fogs != FOGS_DEFAULT else ""
    extra += f" --steps {config.steps}" if config.steps != STEPS_DEFAULT else ""
    extra += f" --without {','.join(config.without)}" if config.without else ""
    extra += "" if config.strict_leases else " --lenient-leases"
    extra += "" if config.clones else " --no-clones"
    extra += "" if config.budget else " --no-budget"
    planted_replicas = config_for(plant, SimConfig()).replicas
    extra += f" --replicas {config.replicas}" if config.replicas != planted_replicas else ""
    extra += f" --plant {plant}" if plant else ""
    return f"python -m tests.sim --seeds 1 --start {seed}{extra} -v"


def report(result: Result, *, config: SimConfig, plant: str | None, out: list[str]) -> None:
    out.append(f"seed {result.seed}: VIOLATION at step {result.step}: {result.violations[0]}")
    out.append(f"  faults: {result.mix}")
    out.append(f"  set-up: {result.setup}")
    out.append(f"  replay: {replay_command(result.seed, config, plant)}")
    out.append(f"  last {len(result.trace)} events:")
    out.extend(f"    {line}" for line in result.trace)


def shrink(seed: int, config: SimConfig, failed: Result) -> tuple[SimConfig, Result]:
    """A smaller failing replay of ``seed``: each fault of its mix switched off in turn
    while it still fails, then the fewest chaos steps (binary search) that still fail."""
    best = failed
    mix = Simulation.mix_of(seed, config)
    for name in FAULTS:
        if not mix.has(name):
            continue
        trial = dataclasses.replace(config, without=(*config.without, name))
        r = run(seed, trial)
        if not r.ok:
            config, best = trial, r
    lo, hi = 1, config.steps
    for _ in range(SHRINK_RUNS_MAX):
        if lo >= hi:
            break
        mid = (lo + hi) // 2
        r = run(seed, dataclasses.replace(config, steps=mid))
        if r.ok:
            lo = mid + 1
        else:
            hi, best = mid, r
    return dataclasses.replace(config, steps=hi), best


def summary(results: list[Result]) -> str:
    totals: dict[str, int] = {}
    for r in results:
        for k, v in r.stats.items():
            totals[k] = totals.get(k, 0) + v
    bad = sum(1 for r in results if not r.ok)
    crashes = totals.get("fog_crashes", 0) + totals.get("cloud_crashes", 0)
    at_risk = max((r.stats.get("records_at_risk_max", 0) for r in results), default=0)
    revocation = sorted(ms for r in results for ms in r.samples.get("revocation_ms", []))
    t = totals.get
    return (
        f"{len(results)} seeds, {bad} violations, {t('payments', 0)} payments, "
        f"{t('receipts_ok', 0)} ok receipts, {crashes} crashes, "
        f"{t('partitions', 0)} partitions, {t('net_dropped', 0)} dropped, "
        f"{t('leases_stranded', 0)} leases stranded, "
        f"{t('steps', 0)} steps; federation: "
        f"{t('disk_losses', 0)} disks lost, {t('fogs_restored', 0)} fogs "
        f"restored ({t('records_restored', 0)} records), "
        f"{t('fogs_dead', 0)} unrecoverable ({t('replicated_of_dead_fogs', 0)} of their "
        "replicated records beyond the lost chain head, in no device's hands), "
        f"{t('held_uploads', 0)} held uploads ({t('held_booked', 0)} records booked from them), "
        f"{t('relayed_batches', 0)} relayed batches, "
        f"{t('leases_closed_by_operator', 0)} leases closed by close-leases, "
        f"{t('peer_partitions', 0)} peer partitions, "
        f"records at risk max {at_risk}; "
        f"clones: {sum(1 for r in results if 'clone_receipts_ok' in r.stats)} seeds, "
        f"{t('clone_payments', 0)} payments, {t('clone_collisions', 0)} ok at a used q, "
        f"cloned_key at fogs {t('cloned_key_at_fogs', 0)} / cloud {t('cloned_key_at_cloud', 0)}; "
        f"revocation to the last fog: {len(revocation)} revocations, "
        f"max {max(revocation, default=0)} ms, median {_median(revocation)} ms; "
        f"budget: {t('seeds_transfers', 0)} seeds with peer transfers, "
        f"{t('transfers', 0)} transfers, {t('returns', 0)} leases returned early "
        f"({t('returns_operator', 0)} by the operator, {t('recalls', 0)} asked back by the cloud, "
        f"{t('budget_returned_micros', 0)} micros back), "
        f"{t('vouchers', 0)} vouchers, {t('d2d_booked', 0)} d2d payments booked, "
        f"{t('double_spends', 0)} double spends caught, "
        f"{t('records_rejected_sublease', 0)} records refused on a sub-lease not yet known"
    )


def _median(xs: list[int]) -> int:
    if not xs:
        return 0
    m = len(xs) // 2
    return xs[m] if len(xs) % 2 else (xs[m - 1] + xs[m]) // 2


def _results(
    seeds: range, config: SimConfig, args: argparse.Namespace, jobs: int
) -> Iterator[Result]:
    if jobs > 1:
        yield from run_many(seeds, config, jobs=jobs)
        return
    for seed in seeds:
        echo = print if args.verbose else None
        if echo is not None:
            print(f"== seed {seed}")
        with planted(args.plant):
            yield run(seed, config, echo=echo)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.sim", description=__doc__)
    p.add_argument("--seeds", type=int, default=100)
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--fogs", type=int, default=FOGS_DEFAULT)
    p.add_argument("--steps", type=int, default=STEPS_DEFAULT, help="chaos-phase events")
    p.add_argument(
        "--without", default="", help=f"faults to switch off, comma-separated: {','.join(FAULTS)}"
    )
    p.add_argument("--plant", choices=sorted(BUGS), help="run with a known bug planted")
    p.add_argument(
        "--lenient-leases",
        dest="strict_leases",
        action="store_false",
        help="a lease the cloud granted and its fog never stored, open after the heal, is only "
        "counted (leases stranded), not a violation",
    )
    p.add_argument(
        "--replicas",
        type=int,
        default=2,
        help="peers each fog replicates a batch to (k, at most fogs - 1); 0: no federation",
    )
    p.add_argument(
        "--no-clones",
        dest="clones",
        action="store_false",
        help="no seed clones a device key (by default a quarter of the seeds do)",
    )
    p.add_argument(
        "--no-budget",
        dest="budget",
        action="store_false",
        help="no early returns, peer transfers or vouchers (docs/protocol.md 18; by default "
        "a share of the seeds has each)",
    )
    p.add_argument("--no-shrink", action="store_true", help="do not shrink a failing seed")
    p.add_argument("--jobs", type=int, default=1, help="processes to spread the seeds over")
    p.add_argument("-v", "--verbose", action="store_true", help="print every event")
    args = p.parse_args(argv)
    if args.seeds < 1 or args.fogs < 1 or args.steps < 1:
        p.error("--seeds, --fogs and --steps must be >= 1")
    without = tuple(w for w in args.without.split(",") if w)
    if any(w not in FAULTS for w in without):
        p.error(f"--without takes {','.join(FAULTS)}")
    quiet_logs()
    config = SimConfig(
        fogs=args.fogs,
        steps=args.steps,
        without=without,
        strict_leases=args.strict_leases,
        replicas=args.replicas,
        clones=args.clones,
        budget=args.budget,
    )
    config = config_for(args.plant, config)
    results = []
    started = time.perf_counter()
    seeds = range(args.start, args.start + args.seeds)
    if args.verbose or args.plant:  # one process: echo in order; a plant lives in this one
        jobs = 1
    else:
        jobs = max(1, args.jobs)
    for seed, result in zip(seeds, _results(seeds, config, args, jobs), strict=True):
        results.append(result)
        if result.ok:
            continue
        lines: list[str] = []
        report(result, config=config, plant=args.plant, out=lines)
        if not args.no_shrink and not args.verbose:
            with planted(args.plant):
                smaller, small = shrink(seed, config, result)
            if smaller != config:
                lines.append("  shrunk:")
                report(small, config=smaller, plant=args.plant, out=lines)
        print("\n".join(lines), flush=True)
    elapsed = time.perf_counter() - started
    print(f"{summary(results)}, {elapsed:.1f} s")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
