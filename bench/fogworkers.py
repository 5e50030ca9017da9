"""The fog's core with 0, 1, 2, 4 verify workers: CPU per intent by process, and the core's
critical path (issue 15: "the fog able to use a 4-core Pi's cores ... CPU per intent shown flat
as workers grow").

    .venv/bin/python bench/fogworkers.py [--workers 0,1,2,4] [--intents 6000] [--rounds 2]

No broker, no MQTT: the core in its child process, pipelined (``fog/storeproc.py``, as the
daemon runs it with Mosquitto), and ``verify_workers`` children (``fog/verifyproc.py``), fed
by a processor in this process that groups what is queued as the daemon does (up to 256, 8
groups unanswered), sends each group to the workers and hands it to the core, in order, once
they answered. Every intent is queued at once (saturation); each run gets a fresh database.

Printed per worker count: intents/s here (on this machine's cores, shared by everything), and
CPU microseconds per intent of each role, from /proc: the processor (this process: what the
daemon's loop adds), the core's process, the workers together, and the total. The core is one
process, so its CPU per intent bounds the fog's rate whatever the cores (``core bound/s`` =
1e6 / core us); the workers take the intent's signature check off it. "Flat as workers grow"
is the total column: what each worker count costs in all.
"""

import argparse
import asyncio
import collections
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import importlib.util

from fog.core import Close, FogOutput, Intents, Receipt
from fog.store import Arrival
from fog.verifyproc import VerifyPool

_spec = importlib.util.spec_from_file_location("bench_fog", Path(__file__).parent / "fog.py")
assert _spec is not None and _spec.loader is not None
bench_fog = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_fog)  # bench/fog.py: World (keys, provisioning)
_spec = importlib.util.spec_from_file_location("storepipe", Path(__file__).parent / "storepipe.py")
assert _spec is not None and _spec.loader is not None
storepipe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(storepipe)  # bench/storepipe.py: start_core

INFLIGHT_MAX = 8  # fog/daemon.py PIPELINE_GROUPS_MAX
GROUP_MAX = 256  # fog/daemon.py GROUP_MAX
DEVICES = 200


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def self_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


async def run(world: "bench_fog.World", db: Path, workers: int, count: int) -> dict[str, Any]:
    core = await storepipe.start_core(world, db, pipelined=True)
    pool = await asyncio.to_thread(VerifyPool.start, workers) if workers else None
    if pool is not None:
        await pool.open()
    arrivals = [Arrival(bytes.fromhex(s.device_hex), s.payload) for s in world.shots(count)]
    statuses: collections.Counter[str] = collections.Counter()
    handed: collections.deque[tuple[list[Arrival], asyncio.Future[list[bool]] | None]]
    handed = collections.deque()
    answers: set[asyncio.Task[list[FogOutput]]] = set()

    def note(task: "asyncio.Task[list[FogOutput]]") -> None:
        answers.discard(task)
        for o in task.result():
            if isinstance(o, Receipt):
                statuses[o.outcome.status] += 1

    async def feed() -> None:  # groups to the core in the order they formed
        now = int(time.time() * 1000)
        while handed:
            group, verdicts = handed.popleft()
            if verdicts is not None:
                marks = await verdicts
                group = [
                    Arrival(a.topic_device, a.payload, verified=True) if ok else a
                    for a, ok in zip(group, marks, strict=True)
                ]
            while len(answers) >= INFLIGHT_MAX:
                await asyncio.wait(answers, return_when=asyncio.FIRST_COMPLETED)
            task = asyncio.ensure_future(core.ahandle(Intents(arrivals=tuple(group), now_ms=now)))
            answers.add(task)
            task.add_done_callback(note)

    workers_pids = pool.pids if pool is not None else []
    cpu0 = (self_cpu_s(), proc_cpu_s(core.pid), sum(proc_cpu_s(p) for p in workers_pids))
    t0 = time.perf_counter()
    try:
        for i in range(0, count, GROUP_MAX):
            group = arrivals[i : i + GROUP_MAX]
            verdicts = (
                asyncio.ensure_future(pool.verdicts([a.payload for a in group]))
                if pool is not None
                else None
            )
            handed.append((group, verdicts))
        await feed()
        while answers:
            await asyncio.wait(answers)
        elapsed = time.perf_counter() - t0
        cpu1 = (self_cpu_s(), proc_cpu_s(core.pid), sum(proc_cpu_s(p) for p in workers_pids))
    finally:
        await core.ahandle(Close(now_ms=0))
        if pool is not None:
            await pool.aclose()
    loop_us, core_us, workers_us = ((b - a) / count * 1e6 for a, b in zip(cpu0, cpu1, strict=True))
    return {
        "workers": workers,
        "per_s": round(count / elapsed),
        "cpu_us_processor": round(loop_us, 1),
        "cpu_us_core": round(core_us, 1),
        "cpu_us_workers": round(workers_us, 1),
        "cpu_us_total": round(loop_us + core_us + workers_us, 1),
        "core_bound_per_s": round(1e6 / core_us) if core_us else None,
        "statuses": dict(statuses),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", default="0,1,2,4")
    ap.add_argument("--intents", type=int, default=6000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dir", default=tempfile.gettempdir())
    args = ap.parse_args()
    counts = [int(w) for w in args.workers.split(",")]
    results: dict[int, list[dict[str, Any]]] = {w: [] for w in counts}
    with tempfile.TemporaryDirectory(prefix="fogpay-fogworkers-", dir=args.dir) as tmp:
        world = bench_fog.World(Path(tmp), DEVICES)
        for r in range(args.rounds):  # alternated: a busy moment of the machine hits all
            for w in counts:
                db = Path(tmp) / f"fog-{r}-{w}.sqlite"
                results[w].append(asyncio.run(run(world, db, w, args.intents)))
                with contextlib.suppress(OSError):
                    for suffix in ("", "-wal", "-shm"):
                        Path(str(db) + suffix).unlink()
    print(f"{os.cpu_count()} cores; {args.intents:,} intents per run, medians of {args.rounds}")
    head = f"{'workers':>7} {'intents/s':>10} {'processor':>10} {'core':>7} {'workers':>8}"
    print(head + f" {'total':>7} {'core bound/s':>13}  (CPU us per intent)  statuses")
    for w in counts:
        rs = results[w]

        def med(key: str, rs: list[dict[str, Any]] = rs) -> float:
            return statistics.median(float(x[key]) for x in rs)

        print(
            f"{w:>7} {med('per_s'):>10,.0f} {med('cpu_us_processor'):>10.1f}"
            f" {med('cpu_us_core'):>7.1f} {med('cpu_us_workers'):>8.1f}"
            f" {med('cpu_us_total'):>7.1f} {med('core_bound_per_s'):>13,.0f}"
            f"  {rs[-1]['statuses']}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
