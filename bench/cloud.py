"""Cloud ingest benchmark: pre-built batches into SQLite and PostgreSQL.

    .venv/bin/python bench/cloud.py                       # 40,000 records, both stores
    .venv/bin/python bench/cloud.py --records 200000 --stores sqlite
    .venv/bin/python bench/cloud.py --pg-dsn postgresql://...   # an existing server

Builds signed batches as a fog would (spec section 7: real device and fog signatures, RFC
9162 roots), then hands them to ``CloudCore.handle(BatchArrived(...))`` (the typed entry
point that the MQTT shell's ``ingest_batch`` wraps) over a fresh store: the records' Ed25519
checks (two per record) run in a ``ProcessPoolExecutor`` of ``--workers`` processes, ahead
of the booking, which stays in this process (one transaction per batch, durable before its
ack). It prints records/s, the single-core Ed25519 verify rate measured
in the same run (before, and again after each store's ingest: the target uses the best), and
the target (issue 15): ingest >= 0.75 x (verify rate / 2 per record) x cores used, then the CPU
per record that target leaves (1.33 x 2 verifies, everything included) against what the run spent.
Without ``--pg-dsn`` a throwaway PostgreSQL cluster is started (fsync on) if initdb exists.
A second floor, before and after the runs: every core verifying at once (one process each,
started together), summed; each run's ``ratio_to_all_cores_verify`` is its records/s over
half the better of the two (``verify_all_cores_per_s`` in ``--json``). On a machine whose
cores slow each other it is below cores x the single-core rate.

Partitions (``--partitions 1,2``, PostgreSQL only; cloud/partition.py): for each P, a fresh
schema with ``--fogs`` fogs, and P ingest processes, each with ``cores // P`` verify workers
(at least 1), each booking the batches of its partition's fogs (``partition_of``), round
robin over its fogs, exactly as ``fogpay cloud run --partition i/P`` would, minus MQTT. Wall
time from a common start to the last commit; records/s, records/s per core (the machine's
cores: every run keeps them all busy) and CPU per record of all ingest processes and their
workers (the PostgreSQL server not counted). ``--owners shared``: one paying owner whose
devices pay at every fog (its account row is updated by every partition: the worst case);
``per-fog`` (default): each fog's payers are its own.
"""

import argparse
import asyncio
import json
import multiprocessing
import os
import resource
import secrets
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import nacl.signing

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cloud import ledger, pgcluster, registry
from cloud.core import CloudCore
from cloud.events import BatchArrived, BatchJudged, Status
from cloud.leases import LeasePolicy, grant
from cloud.partition import partition_of
from cloud.pgstore import PgStore
from cloud.sqlitestore import SqliteStore
from cloud.store import Store, Tx
from cloud.verify import CheckedBatch, check_batch
from protocol import limits
from protocol.signing import open_envelope, possession_proof, verify_signed
from runtime import logs
from tests.cloud.world import T0, FogLog, World

DEVICES = 500
TARGET = 0.75  # of the crypto bound (issue 15; issue 10 asked 0.8)
VERIFY_SAMPLE = 2000
VERIFY_ROUNDS = 3


def verify_rate() -> float:
    """Single-core libsodium verifies per second, made as the cloud's verify workers make
    them (``protocol.signing.verify_signed``: libsodium's ``crypto_sign_open`` called
    directly, back to back; PyNaCl's ``crypto_sign_open`` wrapper, which ``verify`` uses, is
    1 us a verify slower): the best of a few rounds, so a moment of contention on a shared
    machine does not lower the target."""
    key = nacl.signing.SigningKey.generate()
    msgs = [secrets.token_bytes(120) for _ in range(64)]
    signed = [key.sign(m).signature + m for m in msgs] * (VERIFY_SAMPLE // 64 + 1)
    signed = signed[:VERIFY_SAMPLE]
    keys = [bytes(key.verify_key)] * VERIFY_SAMPLE
    best = float("inf")
    for _ in range(VERIFY_ROUNDS):
        start = time.perf_counter()
        verified = verify_signed(keys, signed)
        best = min(best, time.perf_counter() - start)
        assert all(verified)
    return VERIFY_SAMPLE / best


ALL_CORES_S = 1.5  # each process verifies this long, all starting at once


def _verify_for(start_at: float, seconds: float) -> float:
    """In a child: verifies a second from ``start_at`` (wall clock) for ``seconds``."""
    key = nacl.signing.SigningKey.generate()
    msgs = [secrets.token_bytes(120) for _ in range(64)]
    signed = [key.sign(m).signature + m for m in msgs] * 4
    keys = [bytes(key.verify_key)] * len(signed)
    time.sleep(max(0.0, start_at - time.time()))
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:  # bounded in time
        verify_signed(keys, signed)
        done += len(signed)
    return done / (time.perf_counter() - t0)


def verify_rate_all_cores(cores: int) -> float:
    """Verifies per second of ``cores`` processes verifying at the same time, summed: what the
    machine's cores deliver together. On a machine whose cores slow each other (shared
    caches, a host's hyperthreads, a frequency that drops when more cores are busy) it is
    less than ``cores`` x the single-core rate the issue's bound multiplies."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=cores, mp_context=context) as pool:
        list(pool.map(time.sleep, [0.0] * cores))  # started and imported before the clock
        start_at = time.time() + 0.5
        return sum(pool.map(_verify_for, [start_at] * cores, [ALL_CORES_S] * cores))


async def populate(world: World, devices: list[nacl.signing.SigningKey]) -> bytes:
    await world.owner("payer", limit=limits.AMOUNT_MICROS_MAX)
    await world.owner("payee", limit=0)
    await world.fog("fog-bench")
    from protocol.messages import Binding

    async def bind_all(tx: Tx) -> None:
        for d in devices:
            env = world.binding("payer", d)
            proof = possession_proof(d, open_envelope(env, Binding).body)
            await registry.bind_device(tx, env, proof, now_ms=world.now)

    await world.tx(bind_all)

    async def lease(tx: Tx) -> bytes:
        g = await grant(
            tx,
            world.issuer,
            owner_id="payer",
            fog_id="fog-bench",
            amount_micros=10**15,
            now_ms=world.now,
            policy=LeasePolicy(request_micros_max=10**15),
        )
        return g.lease.lease_id

    lease_id: bytes = await world.tx(lease)
    return lease_id


def build_batches(
    fog: FogLog, devices: list[nacl.signing.SigningKey], lease_id: bytes, n: int, size: int
) -> list[bytes]:
    batches, seq = [], [0] * len(devices)
    for start in range(0, n, size):
        records = []
        for i in range(start, min(n, start + size)):
            d = i % len(devices)
            seq[d] += 1
            records.append(
                fog.authorize(
                    devices[d],
                    seq=seq[d],
                    lease_id=lease_id,
                    amount=1_000 + i % 7,
                    payee="payee",
                    t=T0,
                )
            )
        batches.append(fog.cut(records))
    return batches


async def ingest_all(
    store: Store, world: World, batches: list[bytes], pool: ProcessPoolExecutor | None
) -> float:
    loop = asyncio.get_running_loop()
    futures: dict[int, asyncio.Future[CheckedBatch]] = {}
    if pool is not None:
        for wire in batches:  # verification runs ahead of booking, in the pool
            futures[id(wire)] = loop.run_in_executor(pool, check_batch, wire)

    async def verifier(wire: bytes) -> CheckedBatch:
        if pool is None:
            return check_batch(wire)
        return await futures[id(wire)]

    core = CloudCore(
        store=store,
        issuer=world.issuer,
        clock=world.clock,
        policy=LeasePolicy(),
        verifier=verifier,
    )
    start = time.perf_counter()
    for wire in batches:
        judged = (await core.handle(BatchArrived(wire=wire, now_ms=world.now)))[0]
        assert isinstance(judged, BatchJudged) and judged.status is Status.BOOKED, judged
    return time.perf_counter() - start


def say(args: argparse.Namespace, text: str) -> None:
    """The readable lines: on stdout, or on stderr under ``--json`` (stdout is the object)."""
    print(text, file=sys.stderr if args.json else sys.stdout)


async def run_store(
    name: str, store: Store, args: argparse.Namespace, rate: float
) -> dict[str, object]:
    world = World(store)
    devices = [nacl.signing.SigningKey.generate() for _ in range(DEVICES)]
    lease_id = await populate(world, devices)
    t = time.perf_counter()
    batches = build_batches(world.fogs["fog-bench"], devices, lease_id, args.records, args.batch)
    built = time.perf_counter() - t
    workers = args.workers
    children, main_cpu = _children_cpu(), time.process_time()
    with ProcessPoolExecutor(max_workers=workers) if workers > 0 else _null() as pool:
        elapsed = await ingest_all(store, world, batches, pool)
        main_cpu = time.process_time() - main_cpu
    children = _children_cpu() - children  # the workers, once they have exited
    # The target uses the best verify rate seen before or right after this ingest: on a shared
    # machine one slow moment before the run must not make the target easier (it once read
    # 13,159/s against 18,224/s a minute earlier).
    before, after = rate, verify_rate()
    rate = max(before, after)
    check = await store.transact(ledger.check)
    assert check.ok and check.transfers == args.records, check
    per_s = args.records / elapsed
    cores = max(1, workers)
    target = TARGET * (rate / 2) * cores
    say(
        args,
        f"{name:8s} {args.records:>8,} records in {elapsed:6.2f} s = {per_s:>9,.0f} records/s "
        f"(built in {built:.1f} s; {workers} verify workers) | target {TARGET} x {rate:,.0f}/2 x "
        f"{cores} = {target:,.0f} records/s: {'met' if per_s >= target else 'NOT met'}"
        f" (verify rate: the best of {before:,.0f}/s before and {after:,.0f}/s after)",
    )
    us = 1e6 / args.records
    say(
        args,
        f"{'':8s} CPU per record: verify workers {children * us:.1f} us, this process "
        f"{main_cpu * us:.1f} us (2 verifies: {2e6 / rate:.1f} us"
        f"{'; the PostgreSQL server not counted' if name == 'postgres' else ''})",
    )
    # With every core used busy, records/s = cores / (CPU per record): the target allows
    # cores / target = (1 / TARGET) x 2 verifies of CPU per record, all work included.
    allowed, verifies = cores * 1e6 / target, 2e6 / rate
    spent = (children + main_cpu) * us
    say(
        args,
        f"{'':8s} budget: the target allows {allowed:.1f} us CPU per record on {cores} cores"
        f" ({1 / TARGET:.2f} x 2 verifies): {allowed - verifies:.1f} us besides the verifies;"
        f" this run spent {spent:.1f} us, {spent - verifies:.1f} us besides them",
    )
    # one ingest process over the store: partitions by fog across processes are not built yet
    return {
        "store": name,
        "partitions": 1,
        "ingest_per_s": round(per_s),
        "verify_per_s": round(rate),
        "target_per_s": round(target),
    }


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


async def main(args: argparse.Namespace) -> None:
    logs.configure(json=True, level="warning")  # one batch_ingested line per batch otherwise
    rate = verify_rate()
    cores = os.cpu_count() or 1
    together = verify_rate_all_cores(cores)
    say(
        args,
        f"single-core Ed25519 verify: {rate:,.0f}/s (libsodium, called as the verify workers "
        f"call it); cpus: {cores}; all {cores} verifying at once: {together:,.0f}/s in all "
        f"({together / cores / rate:.2f} of the single-core rate each)",
    )
    runs: list[dict[str, object]] = []
    try:
        await measure_stores(args, rate, runs)
    finally:
        together_after = verify_rate_all_cores(cores)
        best = max(together, together_after)
        for run in runs:  # a second floor: what the cores deliver together, same run
            per_s = float(str(run["ingest_per_s"]))
            run["ratio_to_all_cores_verify"] = round(per_s / (best / 2), 3)
        say(
            args,
            f"all cores verifying at once: {together:,.0f}/s before, {together_after:,.0f}/s "
            "after; ingest / (that / 2 signatures): "
            + ", ".join(f"{r['store']} {r['ratio_to_all_cores_verify']}" for r in runs),
        )
        if args.json:
            print(
                json.dumps(
                    {
                        "verify_per_s": round(rate),
                        "cores": cores,
                        "verify_all_cores_per_s": round(best),
                        "runs": runs,
                    }
                )
            )


def _partition_child(
    dsn: str,
    issuer: bytes,
    wires: list[bytes],
    workers: int,
    start: "multiprocessing.synchronize.Event",
    finish: "multiprocessing.synchronize.Event",
    ready: "multiprocessing.queues.Queue[object]",
) -> None:
    """One partition's ingest process: its own store pool, core and verify workers."""
    asyncio.run(_partition_ingest(dsn, issuer, wires, workers, start, finish, ready))


async def _partition_ingest(
    dsn: str,
    issuer: bytes,
    wires: list[bytes],
    workers: int,
    start: "multiprocessing.synchronize.Event",
    finish: "multiprocessing.synchronize.Event",
    ready: "multiprocessing.queues.Queue[object]",
) -> None:
    logs.configure(json=True, level="warning")
    store = await PgStore.open(dsn)
    # spawn: the workers are this process's children, so RUSAGE_CHILDREN counts their CPU;
    # a pool started, warmed and stopped first says what starting one costs (imports), which
    # is taken off the measured pool's CPU
    context = multiprocessing.get_context("spawn")
    warmup = _children_cpu()
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as empty:
        list(empty.map(abs, range(workers)))
    warmup = 2 * _children_cpu() - warmup  # the baseline to subtract after the real pool
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=context)
    try:
        list(pool.map(abs, range(workers)))  # the workers up before the clock starts
        clock_ms = [T0]
        core = CloudCore(
            store=store,
            issuer=nacl.signing.SigningKey(issuer),
            clock=lambda: clock_ms[0],
            policy=LeasePolicy(),
            verifier=_AheadVerifier(pool),
        )
        ready.put("ready")
        await asyncio.get_running_loop().run_in_executor(None, start.wait)
        cpu = time.process_time()
        verifier = core._ingestor._verifier  # the bench's own verifier
        assert isinstance(verifier, _AheadVerifier)
        for wire in wires:
            verifier.ahead(wire)
        for wire in wires:
            judged = (await core.handle(BatchArrived(wire=wire, now_ms=T0)))[0]
            assert isinstance(judged, BatchJudged) and judged.status is Status.BOOKED, judged
        done = time.perf_counter()
        cpu = time.process_time() - cpu
        pool.shutdown(wait=True)
        ready.put((done, cpu, _children_cpu() - warmup))
        # the store stays open until the parent has read the server's CPU (its sessions
        # are counted only while they live)
        await asyncio.get_running_loop().run_in_executor(None, finish.wait, 60)
    finally:
        pool.shutdown(wait=True)
        await store.close()


class _AheadVerifier:
    """Every batch's verification submitted at once (the service's prefetch does it as
    batches are queued), awaited in booking order."""

    def __init__(self, pool: ProcessPoolExecutor) -> None:
        self._pool = pool
        self._futures: dict[int, asyncio.Future[CheckedBatch]] = {}

    def ahead(self, wire: bytes) -> None:
        loop = asyncio.get_running_loop()
        self._futures[id(wire)] = loop.run_in_executor(self._pool, check_batch, wire)

    async def __call__(self, wire: bytes) -> CheckedBatch:
        future = self._futures.pop(id(wire), None)
        if future is None:
            return check_batch(wire)
        return await future


async def fleet(store: Store, args: argparse.Namespace) -> tuple[World, dict[str, list[bytes]]]:
    """``--fogs`` fogs with ``--records`` records in all, in batches of ``--batch``."""
    world = World(store)
    await world.owner("payee", limit=0)
    shared = args.owners == "shared"
    per_fog = max(1, DEVICES // args.fogs)
    owner_of = {}
    for k in range(args.fogs):
        owner_of[k] = "payer" if shared else f"payer-{k}"
        if not shared or k == 0:
            await world.owner(owner_of[k], limit=limits.AMOUNT_MICROS_MAX)
    devices = {
        k: [nacl.signing.SigningKey.generate() for _ in range(per_fog)] for k in range(args.fogs)
    }
    from protocol.messages import Binding

    async def bind_all(tx: Tx) -> None:
        for k, keys in devices.items():
            for d in keys:
                env = world.binding(owner_of[k], d)
                proof = possession_proof(d, open_envelope(env, Binding).body)
                await registry.bind_device(tx, env, proof, now_ms=world.now)

    await world.tx(bind_all)
    wires: dict[str, list[bytes]] = {}
    for k in range(args.fogs):
        fog_id = f"fog-bench-{k}"
        log = await world.fog(fog_id)

        async def lease(tx: Tx, owner: str = owner_of[k], fog_id: str = fog_id) -> bytes:
            g = await grant(
                tx,
                world.issuer,
                owner_id=owner,
                fog_id=fog_id,
                amount_micros=10**15,
                now_ms=world.now,
                policy=LeasePolicy(request_micros_max=10**15),
            )
            return g.lease.lease_id

        lease_id: bytes = await world.tx(lease)
        wires[fog_id] = build_batches(
            log, devices[k], lease_id, args.records // args.fogs, args.batch
        )
    return world, wires


async def run_partitions(
    dsn: str, partitions: int, args: argparse.Namespace, rate: float
) -> dict[str, object]:
    """P ingest processes over one PostgreSQL schema (see the module docstring)."""
    import asyncpg

    schema = f"bench_{secrets.token_hex(4)}"
    conn = await asyncpg.connect(dsn)
    await conn.execute(f"CREATE SCHEMA {schema}")
    await conn.close()
    sep = "&" if "?" in dsn else "?"
    schema_dsn = f"{dsn}{sep}search_path={schema}"
    try:
        store = await PgStore.open(schema_dsn)
        try:
            world, wires = await fleet(store, args)
        finally:
            await store.close()
        cores = os.cpu_count() or 1
        workers = max(1, cores // partitions)
        shares: list[list[bytes]] = [[] for _ in range(partitions)]
        by_partition: dict[int, list[list[bytes]]] = {i: [] for i in range(partitions)}
        for fog_id, fog_wires in wires.items():
            by_partition[partition_of(fog_id, partitions)].append(fog_wires)
        for i, fogs in by_partition.items():  # round robin over the partition's fogs
            for column in range(max((len(f) for f in fogs), default=0)):
                shares[i].extend(f[column] for f in fogs if column < len(f))
        total = sum(len(w) for w in wires.values())
        records = args.records // args.fogs * args.fogs
        context = multiprocessing.get_context("spawn")
        start, finish, ready = context.Event(), context.Event(), context.Queue()
        issuer = bytes(world.issuer)
        procs = [
            context.Process(
                target=_partition_child,
                args=(schema_dsn, issuer, shares[i], workers, start, finish, ready),
            )
            for i in range(partitions)
        ]
        for proc in procs:
            proc.start()
        for _ in procs:
            assert ready.get(timeout=120) == "ready"
        server = _postgres_cpu({})
        began = time.perf_counter()
        start.set()
        results = [ready.get(timeout=600) for _ in procs]
        server = _postgres_cpu(server)
        finish.set()
        for proc in procs:
            proc.join(timeout=60)
        elapsed = max(float(r[0]) for r in results) - began
        booking_cpu = sum(float(r[1]) for r in results)
        verify_cpu = sum(float(r[2]) for r in results)
        cpu = booking_cpu + verify_cpu
        store = await PgStore.open(schema_dsn)
        try:
            check = await store.transact(ledger.check)
            booked = await store.transact(lambda tx: tx.fetchone("SELECT COUNT(*) FROM batches"))
        finally:
            await store.close()
        assert check.ok and check.transfers == records, check
        assert booked is not None and int(booked[0]) == total
    finally:
        conn = await asyncpg.connect(dsn)
        await conn.execute(f"DROP SCHEMA {schema} CASCADE")
        await conn.close()
    server_s = sum(server.values()) / os.sysconf("SC_CLK_TCK")
    per_s = records / elapsed
    rate = max(rate, verify_rate())  # the best seen: a busy moment must not ease the bound
    target = TARGET * (rate / 2) * cores
    say(
        args,
        f"postgres P={partitions} ({workers} verify workers each, {args.fogs} fogs, owners "
        f"{args.owners}): {records:,} records in {elapsed:6.2f} s = {per_s:>9,.0f} records/s, "
        f"{per_s / cores:,.0f}/s per core ({cores} cores) | crypto bound {rate / 2 * cores:,.0f}"
        f"/s: {per_s / (rate / 2 * cores):.2f} (target {TARGET}: "
        f"{'met' if per_s >= target else 'NOT met'}) | CPU per record {cpu * 1e6 / records:.1f} us"
        f" (verify workers {verify_cpu * 1e6 / records:.1f} us, booking processes "
        f"{booking_cpu * 1e6 / records:.1f} us; 2 verifies {2e6 / rate:.1f} us; the PostgreSQL "
        f"server {server_s * 1e6 / records:.1f} us, if on this machine)",
    )
    return {
        "store": "postgres",
        "partitions": partitions,
        "ingest_per_s": round(per_s),
        "per_core_per_s": round(per_s / cores),
        "cpu_us_per_record": round(cpu * 1e6 / records, 1),
        "owners": args.owners,
        "server_cpu_us_per_record": round(server_s * 1e6 / records, 1),
    }


def _postgres_cpu(before: dict[int, int]) -> dict[int, int]:
    """CPU ticks of every ``postgres`` process on this machine (the server under test when
    it runs here; none otherwise), from /proc; with ``before``, each process's ticks since
    (a process that started since: all of them)."""
    total: dict[int, int] = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        name, rest = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :]
        if name.startswith("postgres"):
            fields = rest.split()
            ticks = int(fields[11]) + int(fields[12])  # utime, stime
            total[int(pid)] = ticks - before.get(int(pid), 0)
    return total


async def measure_stores(
    args: argparse.Namespace, rate: float, runs: list[dict[str, object]]
) -> None:
    if "sqlite" in args.stores:
        with tempfile.TemporaryDirectory() as d:
            store = await SqliteStore.open(f"{d}/cloud.db")
            try:
                runs.append(await run_store("sqlite", store, args, rate))
            finally:
                await store.close()
    if "postgres" in args.stores:
        cluster = None
        dsn = args.pg_dsn or os.environ.get("FOGPAY_TEST_PG_DSN")
        if dsn is None:
            if not pgcluster.available():
                say(args, "postgres: skipped (no --pg-dsn and no initdb)")
                return
            cluster = pgcluster.start_cluster(fsync=True)
            dsn = cluster.dsn
        try:
            if args.partitions:
                for partitions in args.partitions:
                    runs.append(await run_partitions(dsn, partitions, args, rate))
            else:
                pg = await PgStore.open(dsn, schema=None)
                try:
                    runs.append(await run_store("postgres", pg, args, rate))
                finally:
                    await pg.close()
        finally:
            if cluster is not None:
                cluster.stop()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, default=40_000)
    p.add_argument("--batch", type=int, default=2048, help="records per batch (1 MiB fits ~2,500)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="0: verify inline")
    p.add_argument("--stores", default="sqlite,postgres")
    p.add_argument("--pg-dsn")
    p.add_argument(
        "--partitions",
        type=lambda t: [int(x) for x in t.split(",")],
        help="PostgreSQL: P ingest processes for each P listed (e.g. 1,2); unset: in-process",
    )
    p.add_argument("--fogs", type=int, default=8, help="fogs (with --partitions)")
    p.add_argument("--owners", choices=("per-fog", "shared"), default="per-fog")
    p.add_argument("--json", action="store_true", help="print one JSON object (issue 15's shape)")
    asyncio.run(main(p.parse_args()))
