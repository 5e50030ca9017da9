"""The fog's store path alone, pipelined group commit against a fsync in each COMMIT (A/B).

    .venv/bin/python bench/storepipe.py [--rate 1000] [--seconds 3] [--rounds 2] [--dir DIR]

No broker, no MQTT: the core in its child process (``fog/storeproc.py``, as the daemon runs
it) fed paced intents (``--rate`` a second, round-robin over 200 devices) by a processor
that groups what is queued as the daemon does: ``store_pipeline = false`` waits for a group's
answer before handing over the next; ``true`` hands each group over as it forms (up to 8
unanswered) and the child decides while the previous one syncs. Latency is arrival -> answer
(the receipt may leave), p50/p99; then a saturated phase (everything queued at once) gives
intents/s. The two modes alternate, ``--rounds`` times each, on fresh databases in ``--dir``
(default: the system temp dir, as bench/fog.py), with the disk's fsync floor measured in the
same run (bench/fsync-like: 4 KiB write + fsync, 200/s). What this isolates: the store path's
share of the fog's latency (bench/fog.py measures it end to end through a broker).
"""

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import importlib.util

from fog.config import BatchConfig, UplinkConfig
from fog.core import Close, CoreConfig, Intents, Receipt
from fog.store import Arrival
from fog.storeproc import CoreProcess
from protocol.signing import public_key

_spec = importlib.util.spec_from_file_location("bench_fog", Path(__file__).parent / "fog.py")
assert _spec is not None and _spec.loader is not None
bench_fog = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_fog)  # bench/fog.py: World (keys, provisioning), fsync_floor

INFLIGHT_MAX = 8  # fog/daemon.py PIPELINE_GROUPS_MAX
GROUP_MAX = 256  # fog/daemon.py GROUP_MAX
SATURATED = 6000


async def start_core(world: "bench_fog.World", db: Path, *, pipelined: bool) -> CoreProcess:
    """A provisioned database in ``db`` and the core in its child process over it (no
    uplink: nothing leaves), as the daemon starts it with Mosquitto."""
    config = CoreConfig(
        fog_id=bench_fog.FOG_ID,
        issuer_key=public_key(world.issuer),
        batch=BatchConfig(records_max=256, age_ms=1000),
        uplink=UplinkConfig(enabled=False),
    )
    world.provision(db)
    return await asyncio.to_thread(
        CoreProcess.start, db, config=config, fog_key=world.fog_key, pipelined=pipelined
    )


async def run_mode(
    world: "bench_fog.World", db: Path, *, pipelined: bool, rate: float, seconds: float
) -> dict[str, Any]:
    core = await start_core(world, db, pipelined=pipelined)
    queue: asyncio.Queue[tuple[Arrival, float]] = asyncio.Queue()
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    inflight: set[asyncio.Task[None]] = set()

    async def one_group(group: list[tuple[Arrival, float]]) -> None:
        now = int(time.time() * 1000)
        outs = await core.ahandle(Intents(arrivals=tuple(a for a, _ in group), now_ms=now))
        done = time.perf_counter()
        receipts = [o for o in outs if isinstance(o, Receipt)]
        for (_, t0), r in zip(group, receipts, strict=True):
            latencies.append((done - t0) * 1000)
            statuses[r.outcome.status] = statuses.get(r.outcome.status, 0) + 1

    async def processor(total: int) -> None:
        handed = 0
        while handed < total:
            group = [await queue.get()]
            while len(group) < GROUP_MAX and not queue.empty():
                group.append(queue.get_nowait())
            handed += len(group)
            if not pipelined:
                await one_group(group)
                continue
            if len(inflight) >= INFLIGHT_MAX:
                await asyncio.wait(inflight, return_when=asyncio.FIRST_COMPLETED)
            task = asyncio.create_task(one_group(group))
            inflight.add(task)
            task.add_done_callback(inflight.discard)
        if inflight:
            await asyncio.wait(inflight)

    def arrivals(count: int) -> list[Arrival]:
        return [Arrival(bytes.fromhex(s.device_hex), s.payload) for s in world.shots(count)]

    try:
        paced = arrivals(int(rate * seconds))
        worker = asyncio.create_task(processor(len(paced)))
        start = time.perf_counter()
        for i, a in enumerate(paced):  # bounded in count; paced by the clock
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            queue.put_nowait((a, time.perf_counter()))
        await worker
        paced_lat = sorted(latencies)
        latencies.clear()
        burst = arrivals(SATURATED)
        worker = asyncio.create_task(processor(len(burst)))
        t0 = time.perf_counter()
        for a in burst:
            queue.put_nowait((a, t0))
        await worker
        sat_s = time.perf_counter() - t0
    finally:
        await core.ahandle(Close(now_ms=0))

    def pct(xs: list[float], p: float) -> float:
        return round(xs[min(len(xs) - 1, int(p / 100 * len(xs)))], 2)

    return {
        "pipelined": pipelined,
        "p50_ms": pct(paced_lat, 50),
        "p99_ms": pct(paced_lat, 99),
        "mean_ms": round(statistics.fmean(paced_lat), 2),
        "saturated_per_s": round(SATURATED / sat_s),
        "statuses": statuses,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dir", default=tempfile.gettempdir())
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="fogpay-storepipe-", dir=args.dir) as tmp:
        world = bench_fog.World(Path(tmp), 200)
        floor = bench_fog.fsync_floor(Path(tmp))
        print(
            f"fsync floor on {tmp}: p50 {floor['fsync_p50_ms']} ms, p99 {floor['fsync_p99_ms']} ms"
        )
        print(
            f"{'mode':22} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8} {'saturated/s':>12}"
            f"  at {args.rate:,.0f}/s"
        )
        for r in range(args.rounds):
            for pipelined in (True, False):
                db = Path(tmp) / f"fog-{r}-{pipelined}.sqlite"
                res = asyncio.run(
                    run_mode(world, db, pipelined=pipelined, rate=args.rate, seconds=args.seconds)
                )
                mode = "store_pipeline = " + ("true" if pipelined else "false")
                print(
                    f"{mode:22} {res['p50_ms']:>8} {res['p99_ms']:>8} {res['mean_ms']:>8} "
                    f"{res['saturated_per_s']:>12,}  {res['statuses']}"
                )
        floor = bench_fog.fsync_floor(Path(tmp))
        print(f"fsync floor after: p50 {floor['fsync_p50_ms']} ms, p99 {floor['fsync_p99_ms']} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
