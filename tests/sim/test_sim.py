"""The simulator: a few hundred seeds pass, a seed replays exactly, and planted bugs are caught.

The seeds run real fog stores and the real cloud core on real SQLite files (``tests/sim``);
nothing of ours is replaced except, in the planted-bug tests, the one function each bug is.
"""

import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import pytest
import structlog

from tests.sim.planted import BUGS, config_for, planted
from tests.sim.simulation import Result, SimConfig, run, run_many

SEEDS_START: Final = 10_000
SEEDS: Final = int(os.environ.get("FOGPAY_SIM_SEEDS", "200"))
JOBS_MAX: Final = 2  # seeds are spread over this many processes (the suite's 2-core budget)
PLANTED_SEEDS_MAX: Final = 40  # a planted bug must be caught within this many seeds
ROOT: Final = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def quiet_logs() -> Iterator[None]:
    """The cores log every lease and batch; thousands of lines per seed only cost time here."""
    saved = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    yield
    structlog.configure(**saved)


def describe(r: Result) -> str:
    return "\n".join(
        [f"seed {r.seed}: {r.violations[0]}", f"faults: {r.mix}", f"set-up: {r.setup}", *r.trace]
    )


def test_a_few_hundred_seeds_keep_every_invariant() -> None:
    config = SimConfig()
    totals: dict[str, int] = {}
    revocation_ms: list[int] = []
    jobs = min(JOBS_MAX, os.cpu_count() or 1)
    for r in run_many(range(SEEDS_START, SEEDS_START + SEEDS), config, jobs=jobs):
        assert r.ok, describe(r)
        for k, v in r.stats.items():
            totals[k] = totals.get(k, 0) + v
        revocation_ms.extend(r.samples.get("revocation_ms", []))
    # the seeds did exercise what they claim to: payments, faults, crashes, revocations, and
    # the federation: disks lost and restored, relays and held uploads booked by the cloud's
    # real paths, leases closed by close-leases, cloned keys paying and caught
    assert totals["receipts_ok"] > SEEDS
    for what in ("fog_crashes", "cloud_crashes", "partitions", "revocations", "net_dropped"):
        assert totals.get(what, 0) > 0, (what, totals)
    for what in (
        "fogs_restored",
        "relayed_batches",
        "held_booked",
        "leases_closed_by_operator",
        "clone_payments",
        "clone_collisions",
        "cloned_key_at_cloud",
        # federation part 2 (docs/protocol.md 18): budget moved between fogs and given back
        "transfers",
        "returns",
        "returns_operator",
        "budget_returned_micros",
        "vouchers",
        "d2d_booked",
        "double_spends",
    ):
        assert totals.get(what, 0) > 0, (what, totals)
    assert revocation_ms, "revocations reached the fogs, and were timed"


def test_a_seed_replays_exactly() -> None:
    config = SimConfig()
    first, again = run(SEEDS_START + 7, config), run(SEEDS_START + 7, config)
    assert first.trace == again.trace and first.stats == again.stats
    other = run(SEEDS_START + 8, config)
    assert other.trace != first.trace


@pytest.mark.parametrize("bug", sorted(BUGS))
def test_a_planted_bug_is_caught(bug: str) -> None:
    config = config_for(bug, SimConfig())
    with planted(bug):
        for seed in range(PLANTED_SEEDS_MAX):
            r = run(seed, config)
            if not r.ok:
                assert r.trace, "a violation comes with the events before it"
                return
    pytest.fail(f"planted bug {bug!r} not caught in {PLANTED_SEEDS_MAX} seeds")


def test_the_command_line_reports_and_replays(tmp_path: Path) -> None:
    def sim(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "tests.sim", *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    ok = sim("--seeds", "2", "--start", "3")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert re.match(r"2 seeds, 0 violations, \d+ payments", ok.stdout.splitlines()[-1])
    assert re.search(r"revocation to the last fog: .* max \d+ ms, median \d+ ms", ok.stdout)
    bad = sim("--seeds", "3", "--start", "0", "--plant", "revocation", "--no-shrink")
    assert bad.returncode == 1
    assert re.search(
        r"replay: python -m tests.sim --seeds 1 --start \d --plant revocation -v", bad.stdout
    )
    assert re.match(r"3 seeds, [123] violations, ", bad.stdout.splitlines()[-1])
