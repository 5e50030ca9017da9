"""Fog throughput and latency against a do-nothing responder, on the same broker, same run.

    .venv/bin/python bench/fog.py [--json] [--devices 200] [--seconds 6] [--brokers mosquitto,amqtt]
                                  [--targets responder,fog] [--rounds 1] [--keep DIR]

For each broker (Mosquitto subprocess; the fog's embedded amqtt), two targets answer intents
published by this process (the load generator, bench/loadgen.py): (a) the real fog daemon as a
subprocess (`fogpay fog run`), its SQLite file provisioned with an issuer, an owner, the
devices' bindings and one large lease; (b) bench/responder.py, which answers every intent with
a fixed payload. Each target gets a paced phase (1,000 intents/s offered: p50/p99 latency) and
a saturation phase (a window of outstanding intents: sustained receipts/s), and its CPU time
per intent is read from /proc (all its processes; "main": the process started, without the
fog's store process), with the whole machine's CPU per intent and how many cores were busy
while saturated (/proc/stat). From those the table's budget line says what a ratio of 0.8
asks: the fog's own CPU per intent it may use, and cores as busy as in the responder's run (a
durable fog waits on fsync; the responder never does). The single-core Ed25519 verify rate is
measured in the same run.
For the fog, the paced phase is also read from the fog's side: its ``fog_stats`` lines (one a
second here) time each answer from the moment the fog read the intent to the moment it handed
the receipt back, and each store call (verify, authorize, durable commit, sign); the table's
second line per fog gives the p99 of each, median and worst over the 1-s windows inside the
phase, which tells a slow disk (store calls) from a busy machine (the rest).
With ``--rounds N`` each target is measured N times, alternating (each time on a fresh broker
and, for the fog, a fresh database), and the medians are reported with every round's ratio:
this 2-core machine is shared, and one run's ratio ranged 0.57-0.91 from run to run.
All traffic stays on 127.0.0.1.
"""

import argparse
import asyncio
import collections
import contextlib
import datetime
import json
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nacl.signing

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import loadgen

from fog.authorize import Policy
from fog.store import FogStore
from protocol import topics
from protocol.messages import Binding, Intent, Lease, OwnerCredential
from protocol.signing import public_key, seal, signing_input, verify
from runtime.keyfile import write_key_file

FOG_ID = "bench-fog"
OWNER_ID = "bench-owner"
PAYEE_ID = "bench-payee"
FAR_MS = 4_102_444_800_000
AMOUNT_MICROS = 1_000
PACED_RATE_PER_S = 1000.0
READY_S_MAX = 20.0
WINDOW = 400
STATS_INTERVAL_S = 1
TARGETS = ("responder", "fog")
VENV_BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_port(port: int, deadline_s: float = READY_S_MAX) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port}")


def _tree(pid: int) -> list[int]:
    """pid and its descendants (the fog's store runs in a child process)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                todo.extend(int(c) for c in task.read_text().split())
    return out


def cpu_s(pid: int, *, tree: bool = True, only: str | None = None) -> float:
    """User + system CPU seconds of ``pid`` (and its descendants: the fog's store process,
    its verify workers), as /proc has them now; ``only``: the descendants whose command line
    holds that string (``fog.verifychild``: the verify workers)."""
    total = 0
    for p in _tree(pid) if tree else [pid]:
        with contextlib.suppress(OSError):
            if only is not None and only.encode() not in Path(f"/proc/{p}/cmdline").read_bytes():
                continue
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


VERIFY_WORKER = "fog.verifychild"  # the verify workers' command line (fog/verifychild.py)
FSYNC_SECONDS = 2.0
FSYNC_RATE_PER_S = 200  # about the fog's group commits at 1,000 intents/s
FSYNC_BLOCK = b"\0" * 4096


def fsync_floor(directory: Path, seconds: float = FSYNC_SECONDS) -> dict[str, float]:
    """The disk's fsync latency in ``directory`` (where the fog's database is), measured in
    the same run just before the fog's paced phase: 4 KiB written in place and fsynced,
    ``FSYNC_RATE_PER_S`` times a second (bench/fsync.py does the same at length). A receipt
    leaves after its group's commit is on disk: this is the floor of the fog's latency."""
    fd, path = tempfile.mkstemp(dir=directory, prefix="fsync-floor-")
    latencies: list[float] = []
    try:
        end = time.monotonic() + seconds
        for i in range(int(seconds * FSYNC_RATE_PER_S)):  # bounded in count and in time
            if time.monotonic() > end:
                break
            os.pwrite(fd, FSYNC_BLOCK, (i % 256) * len(FSYNC_BLOCK))
            t = time.perf_counter()
            os.fsync(fd)
            latencies.append((time.perf_counter() - t) * 1000)
            time.sleep(max(0.0, 1 / FSYNC_RATE_PER_S - (time.perf_counter() - t)))
    finally:
        os.close(fd)
        os.unlink(path)
    latencies.sort()
    return {
        "fsync_p50_ms": round(latencies[len(latencies) // 2], 2),
        "fsync_p99_ms": round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))], 2),
    }


def rss_mb(pids: list[int]) -> float:
    """Resident memory of ``pids`` and all their descendants (VmRSS summed), in MB."""
    total_kb = 0
    for top in pids:
        for pid in _tree(top):
            try:
                with open(f"/proc/{pid}/status") as f:
                    for line in f:
                        if line.startswith("VmRSS:"):
                            total_kb += int(line.split()[1])
            except OSError:
                continue  # gone meanwhile
    return round(total_kb / 1024, 1)


def machine_cpu_s() -> tuple[float, float]:
    """(busy, all) CPU seconds of the whole machine so far, summed over its cores, from the
    first line of /proc/stat (idle and iowait are not busy)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    tick = os.sysconf("SC_CLK_TCK")
    return (sum(fields) - idle) / tick, sum(fields) / tick


@contextlib.contextmanager
def process(cmd: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "wb") as out:
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        yield p
    finally:
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def mosquitto_conf(directory: Path, port: int) -> Path:
    conf = directory / "mosquitto.conf"
    lines = [
        f"listener {port} 127.0.0.1",
        "allow_anonymous true",
        "set_tcp_nodelay true",
        "max_queued_messages 100000",
        "max_inflight_messages 0",
        "persistence false",
        "log_type error",
    ]
    if os.geteuid() == 0:
        lines.append("user root")
    conf.write_text("\n".join(lines) + "\n")
    return conf


class World:
    """Keys, provisioning and pre-signed intents for one run."""

    def __init__(self, directory: Path, devices: int) -> None:
        self.dir = directory
        self.issuer = nacl.signing.SigningKey.generate()
        self.owner = nacl.signing.SigningKey.generate()
        self.fog_key = nacl.signing.SigningKey.generate()
        self.devices = [nacl.signing.SigningKey.generate() for _ in range(devices)]
        self.next_seq = 1
        self.db_dir: Path | None = None  # --db-dir: where the fog's SQLite files go
        self.fog_toml = ""  # --fog-toml: top-level lines added to the fog's config
        self.fog_broker_toml = ""  # --fog-broker-toml: lines added to its [broker] table

    def provision(self, db: Path) -> None:
        store = FogStore.open(
            db,
            fog_id=FOG_ID,
            fog_key=self.fog_key,
            issuer_key=public_key(self.issuer),
            policy=Policy(),
        )
        now = int(time.time() * 1000)
        try:
            owner = OwnerCredential(
                owner_id=OWNER_ID, key=public_key(self.owner), not_before_ms=0, not_after_ms=FAR_MS
            )
            store.put_trust("owner", seal(owner, self.issuer), now_ms=now)
            for d in self.devices:
                b = Binding(
                    device=public_key(d),
                    owner_id=OWNER_ID,
                    not_before_ms=0,
                    not_after_ms=FAR_MS,
                    currency="EUR",
                    tx_max_micros=10**9,
                    day_max_micros=2**53,
                )
                store.put_trust("bind", seal(b, self.owner), now_ms=now)
            lease = Lease(
                lease_id=secrets.token_bytes(16),
                owner_id=OWNER_ID,
                fog_id=FOG_ID,
                amount_micros=2**53,
                currency="EUR",
                not_after_ms=FAR_MS,
            )
            outcome = store.put_trust("lease", seal(lease, self.issuer), now_ms=now)
            assert outcome.status == "accepted", outcome
        finally:
            store.close()

    def shots(self, count: int) -> list[loadgen.Shot]:
        """``count`` intents, round-robin over the devices, with fresh sequence numbers."""
        now = int(time.time() * 1000)
        out = []
        for i in range(count):
            d = self.devices[i % len(self.devices)]
            dev = public_key(d)
            intent = Intent(
                device=dev,
                fog_id=FOG_ID,
                seq=self.next_seq + i // len(self.devices),
                payee_id=PAYEE_ID,
                amount_micros=AMOUNT_MICROS,
                currency="EUR",
                time_ms=now,
            )
            out.append(loadgen.Shot(topics.intent_topic(FOG_ID, dev), seal(intent, d), dev.hex()))
        self.next_seq += count // len(self.devices) + 1
        return out

    def fog_config(self, db: Path, *, broker_url: str | None, port: int, password: str) -> Path:
        key_file = self.dir / f"fog-{secrets.token_hex(4)}.key"
        write_key_file(key_file, self.fog_key)
        broker = (
            f'url = "{broker_url}"'
            if broker_url
            else (
                f'host = "127.0.0.1"\nport = {port}\npassword = "{password}"\n'
                f'device_password = "{password}"'
            )
        )
        text = f"""fog_id = "{FOG_ID}"
key_file = "{key_file}"
issuer_key = "{public_key(self.issuer).hex()}"
db = "{db}"
log_level = "info"
stats_interval_s = {STATS_INTERVAL_S}
{self.fog_toml}
[broker]
{broker}
{self.fog_broker_toml}
[batch]
records_max = 256
age_ms = 1000
[policy]
rate_per_s = 100000
rate_burst = 100000
"""
        path = self.dir / f"fog-{secrets.token_hex(4)}.toml"
        path.write_text(text)
        return path


def verify_rate(seconds: float = 1.0) -> float:
    key = nacl.signing.SigningKey.generate()
    msg = signing_input("intent", b"x" * 120)
    sig = key.sign(msg).signature
    pk = public_key(key)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(200):
            assert verify(pk, msg, sig)
        n += 200
    return n / (time.perf_counter() - start)


def set_paced_rate(rate: float) -> None:
    global PACED_RATE_PER_S
    PACED_RATE_PER_S = rate


def measure(
    world: World, pid: int, port: int, seconds: float, creds: tuple[str | None, str | None]
) -> dict[str, Any]:
    user, password = creds
    paced_shots = world.shots(int(PACED_RATE_PER_S * seconds) + 10)
    paced_from = time.time()
    paced = asyncio.run(
        loadgen.run(
            "127.0.0.1",
            port,
            FOG_ID,
            paced_shots,
            rate=PACED_RATE_PER_S,
            window=WINDOW * 10,
            duration_s=seconds,
            username=user,
            password=password,
        )
    )
    paced_to = time.time()
    sat_shots = world.shots(60_000)
    spy = os.environ.get("FOGPAY_BENCH_PYSPY")  # a file: py-spy the target while saturated
    profiler = (
        subprocess.Popen(
            [
                str(VENV_BIN / "py-spy"),
                "record",
                "-f",
                "raw",
                "-r",
                "200",
                "-d",
                str(int(seconds)),
                "-p",
                str(pid),
                "-o",
                f"{spy}.{pid}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        if spy
        else None
    )
    cpu0, own0, machine0 = cpu_s(pid), cpu_s(pid, tree=False), machine_cpu_s()
    workers0 = cpu_s(pid, only=VERIFY_WORKER)
    sat = asyncio.run(
        loadgen.run(
            "127.0.0.1",
            port,
            FOG_ID,
            sat_shots,
            rate=None,
            window=WINDOW,
            duration_s=seconds,
            username=user,
            password=password,
        )
    )
    cpu1, own1, machine1 = cpu_s(pid), cpu_s(pid, tree=False), machine_cpu_s()
    workers1 = cpu_s(pid, only=VERIFY_WORKER)
    busy, every = (b - a for a, b in zip(machine0, machine1, strict=True))
    if profiler is not None:
        profiler.wait(30)
    return {
        "per_s": round(sat.per_s, 1),
        "p50_ms_at_1000": round(paced.percentile_ms(50), 2),
        "p99_ms_at_1000": round(paced.percentile_ms(99), 2),
        "max_ms_at_1000": round(max(paced.latencies_ms, default=float("nan")), 2),
        "paced_sent": paced.sent,
        "paced_received": paced.received,
        "cpu_us_per_intent": round((cpu1 - cpu0) / max(1, sat.received) * 1e6, 1),
        # the target's own process (the fog: event loop, MQTT; with store_process the store's
        # CPU is the difference)
        "cpu_us_per_intent_main": round((own1 - own0) / max(1, sat.received) * 1e6, 1),
        # the fog's verify workers (verify_workers > 0): the core's process is the rest
        "cpu_us_per_intent_workers": round((workers1 - workers0) / max(1, sat.received) * 1e6, 1),
        # the whole machine while saturated: load generator, broker and target together, and
        # how many of the cores were busy (idle time is the pipeline waiting, e.g. on fsync)
        "machine_us_per_intent": round(busy / max(1, sat.received) * 1e6, 1),
        "cores_busy": round(busy / every * (os.cpu_count() or 1), 2) if every else 0.0,
        "statuses": dict(paced.statuses + sat.statuses),
        "paced_window": (paced_from, paced_to),
    }


def wait_fog_ready(log: Path, proc: subprocess.Popen[bytes]) -> None:
    end = time.monotonic() + READY_S_MAX
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"fog exited: {log.read_text()[-2000:]}")
        if b"broker_connected" in log.read_bytes():
            time.sleep(0.5)  # subscriptions follow the connection
            return
        time.sleep(0.05)
    raise RuntimeError(f"fog not ready: {log.read_text()[-2000:]}")


CROWD_DEVICES = 10_000
CROWD_OWNERS = 1_000
CROWD_RATE_PER_S = 2_000.0


def provision_crowd(
    world: World, db: Path, devices: int = CROWD_DEVICES, owners: int = CROWD_OWNERS
) -> list[loadgen.Shot]:
    """A fog database with ``devices`` bound devices of ``owners`` owners (one lease each),
    built on tmpfs when there is one (11,000 trust messages, one commit each) and copied into
    place; the shots pay once with every device."""
    shm = Path("/dev/shm")
    scratch = Path(tempfile.mkdtemp(dir=shm if shm.is_dir() else db.parent, prefix="crowd-"))
    keys = [nacl.signing.SigningKey.generate() for _ in range(owners)]
    crowd = [nacl.signing.SigningKey.generate() for _ in range(devices)]
    now = int(time.time() * 1000)
    try:
        store = FogStore.open(
            scratch / "fog.sqlite",
            fog_id=FOG_ID,
            fog_key=world.fog_key,
            issuer_key=public_key(world.issuer),
            policy=Policy(),
        )
        try:
            for i, key in enumerate(keys):
                cred = OwnerCredential(
                    owner_id=f"owner-{i}", key=public_key(key), not_before_ms=0, not_after_ms=FAR_MS
                )
                store.put_trust("owner", seal(cred, world.issuer), now_ms=now)
                lease = Lease(
                    lease_id=secrets.token_bytes(16),
                    owner_id=f"owner-{i}",
                    fog_id=FOG_ID,
                    amount_micros=10**12,
                    currency="EUR",
                    not_after_ms=FAR_MS,
                )
                store.put_trust("lease", seal(lease, world.issuer), now_ms=now)
            for j, d in enumerate(crowd):
                b = Binding(
                    device=public_key(d),
                    owner_id=f"owner-{j % owners}",
                    not_before_ms=0,
                    not_after_ms=FAR_MS,
                    currency="EUR",
                    tx_max_micros=10**9,
                    day_max_micros=2**53,
                )
                store.put_trust("bind", seal(b, keys[j % owners]), now_ms=now)
        finally:
            store.close()
        shutil.copy(scratch / "fog.sqlite", db)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    shots = []
    for d in crowd:
        dev = public_key(d)
        intent = Intent(
            device=dev,
            fog_id=FOG_ID,
            seq=1,
            payee_id=PAYEE_ID,
            amount_micros=AMOUNT_MICROS,
            currency="EUR",
            time_ms=now,
        )
        shots.append(loadgen.Shot(topics.intent_topic(FOG_ID, dev), seal(intent, d), dev.hex()))
    return shots


def measure_crowd(kind: str, world: World, d: Path) -> dict[str, Any]:
    """Resident memory of the fog (all its processes; with Mosquitto, the broker's too) with
    10,000 bound devices and 1,000 owners: idle after start, and after every device paid
    once (the fog's caches then hold them all). The larger is the figure."""
    d.mkdir(parents=True)
    password = secrets.token_hex(8)
    port = free_port()
    db = (world.db_dir or d) / f"crowd-{kind}.sqlite"
    shots = provision_crowd(world, db)
    with contextlib.ExitStack() as stack:
        pids: list[int] = []
        if kind == "mosquitto":
            conf = mosquitto_conf(d, port)
            broker = stack.enter_context(process([MOSQUITTO, "-c", str(conf)], d / "mosquitto.log"))
            pids.append(broker.pid)
            wait_port(port)
            cfg = world.fog_config(db, broker_url=f"mqtt://127.0.0.1:{port}", port=0, password="")
            user: str | None = None
            pw: str | None = None
        else:
            cfg = world.fog_config(db, broker_url=None, port=port, password=password)
            user, pw = "device", password
        fog_run = [str(VENV_BIN / "fogpay"), "fog", "run", "--config", str(cfg)]
        p = stack.enter_context(process(fog_run, d / "fog.log"))
        pids.append(p.pid)
        if kind == "amqtt":
            wait_port(port)
        wait_fog_ready(d / "fog.log", p)
        time.sleep(2.0)
        idle = rss_mb(pids)
        paid = asyncio.run(
            loadgen.run(
                "127.0.0.1",
                port,
                FOG_ID,
                shots,
                rate=CROWD_RATE_PER_S,
                window=WINDOW * 10,
                duration_s=len(shots) / CROWD_RATE_PER_S + 1,
                username=user,
                password=pw,
            )
        )
        time.sleep(1.0)
        after = rss_mb(pids)
    return {
        "rss_mb_10k_idle": idle,
        "rss_mb_10k_after_paying": after,
        "rss_mb_10k_devices": max(idle, after),
        "crowd_statuses": dict(paid.statuses),
    }


def measure_target(kind: str, target: str, world: World, seconds: float, d: Path) -> dict[str, Any]:
    """One measurement of one target on a fresh broker (and, for the fog, a fresh database)."""
    d.mkdir(parents=True)
    password = secrets.token_hex(8)
    port = free_port()
    responder = [sys.executable, "bench/responder.py", "--port", str(port), "--fog-id", FOG_ID]
    fog_run = [str(VENV_BIN / "fogpay"), "fog", "run", "--config"]
    with contextlib.ExitStack() as stack:
        broker_pids: list[int] = []
        if kind == "mosquitto":
            conf = mosquitto_conf(d, port)
            mq = stack.enter_context(process([MOSQUITTO, "-c", str(conf)], d / "mosquitto.log"))
            broker_pids.append(mq.pid)
            wait_port(port)
            creds: tuple[str | None, str | None] = (None, None)
        else:
            creds = ("device", password)
        if target == "responder":
            if kind == "amqtt":  # a standalone amqtt broker configured as the fog's
                broker = [sys.executable, "bench/amqtt_broker.py", "--port", str(port)]
                stack.enter_context(process([*broker, "--password", password], d / "amqtt.log"))
                wait_port(port)
                responder += ["--username", "fog", "--password", password]
            p = stack.enter_context(process(responder, d / "responder.log"))
            time.sleep(1.0)
            return measure(world, p.pid, port, seconds, creds)
        db = (world.db_dir or d) / f"fog-{d.parent.name}-{d.name}.sqlite"
        world.provision(db)
        floor = fsync_floor(db.parent)  # the disk under the database, this run
        if kind == "mosquitto":
            url = f"mqtt://127.0.0.1:{port}"
            cfg = world.fog_config(db, broker_url=url, port=0, password="")
        else:  # the embedded broker: its CPU is inside the fog's process
            cfg = world.fog_config(db, broker_url=None, port=port, password=password)
        p = stack.enter_context(process([*fog_run, str(cfg)], d / "fog.log"))
        if kind == "amqtt":
            wait_port(port)
        wait_fog_ready(d / "fog.log", p)
        time.sleep(1.0)
        idle = rss_mb([p.pid, *broker_pids])  # every process of the fog, and its broker
        result = measure(world, p.pid, port, seconds, creds)
    side = fog_side(d / "fog.log", *result["paced_window"])  # the fog has stopped
    return {**result, **side, **floor, "rss_mb_idle": idle}


def fog_side(log: Path, start: float, end: float) -> dict[str, float]:
    """p99 of the fog's answer and store times (fog_stats), median and worst over the 1-s
    windows wholly inside [start, end] (a line reports the interval that ends at its time)."""
    windows = []
    for line in log.read_text().splitlines():
        if '"fog_stats"' not in line:
            continue
        e = json.loads(line)
        at = datetime.datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00")).timestamp()
        if start + STATS_INTERVAL_S <= at <= end and e.get("answer_ms_n") and e.get("store_ms_n"):
            windows.append((e["answer_ms_p99"], e["store_ms_p99"]))
    if not windows:
        return {}
    answer, store = zip(*windows, strict=True)
    return {
        "fog_answer_p99_ms_median": statistics.median(answer),
        "fog_answer_p99_ms_worst": max(answer),
        "fog_store_p99_ms_median": statistics.median(store),
        "fog_store_p99_ms_worst": max(store),
    }


def run_broker(
    kind: str,
    world: World,
    seconds: float,
    targets: frozenset[str] = frozenset(TARGETS),
    rounds: int = 1,
) -> dict[str, Any]:
    """``rounds`` measurements of each target, alternating (responder, fog, responder, ...)
    so that a slow spell of this shared machine hits both; the medians are reported."""
    runs: dict[str, list[dict[str, Any]]] = {t: [] for t in TARGETS if t in targets}
    for r in range(rounds):
        for target in runs:
            d = world.dir / kind / f"{target}-{r + 1}"
            runs[target].append(measure_target(kind, target, world, seconds, d))
    out: dict[str, Any] = {t: median_run(rs) for t, rs in runs.items()}
    if len(runs) == len(TARGETS):
        pairs = zip(runs["fog"], runs["responder"], strict=True)
        out["ratios"] = [round(f["per_s"] / max(1.0, q["per_s"]), 3) for f, q in pairs]
    return out


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of each figure over the rounds; statuses summed; per-round throughputs."""
    out: dict[str, Any] = {}
    for key, value in runs[0].items():
        if isinstance(value, int | float):
            out[key] = round(statistics.median(r[key] for r in runs), 2)
    statuses: collections.Counter[str] = collections.Counter()
    for r in runs:
        statuses.update(r["statuses"])
    out["statuses"] = dict(statuses)
    out["rounds_per_s"] = [r["per_s"] for r in runs]
    return out


def table(verify_per_s: float, runs: dict[str, dict[str, Any]]) -> str:
    rows = [
        f"Ed25519 verify, one core: {verify_per_s:,.0f}/s",
        "",
        f"{'broker':10} {'target':10} {'intents/s':>10} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'max ms':>8} {'cpu us/int':>10} {'(main)':>7} {'(workers)':>9}  statuses",
    ]
    for broker, targets in runs.items():
        for target in (t for t in TARGETS if t in targets):
            r = targets[target]
            rows.append(
                f"{broker:10} {target:10} {r['per_s']:>10,.0f} {r['p50_ms_at_1000']:>8} "
                f"{r['p99_ms_at_1000']:>8} {r['max_ms_at_1000']:>8} "
                f"{r['cpu_us_per_intent']:>10} {r['cpu_us_per_intent_main']:>7}"
                f" {r.get('cpu_us_per_intent_workers', 0.0):>9}  {r['statuses']}"
            )
            if "fog_answer_p99_ms_median" in r:
                rows.append(
                    f"{'':10} {'':10} fog's own p99 at {PACED_RATE_PER_S:,.0f}/s, per 1-s window "
                    "(median / worst):"
                    f" answer {r['fog_answer_p99_ms_median']} / {r['fog_answer_p99_ms_worst']} ms,"
                    f" store call {r['fog_store_p99_ms_median']} / {r['fog_store_p99_ms_worst']} ms"
                )
        if "ratios" not in targets:
            continue
        ratio = targets["fog"]["per_s"] / max(1.0, targets["responder"]["per_s"])
        rounds = targets["ratios"]
        rows.append(
            f"{broker:10} fog/responder throughput ratio: {ratio:.2f} of the medians (target"
            f" >= 0.8); per round: {', '.join(f'{x:.2f}' for x in rounds)}"
        )
        rows.append(budget(broker, targets["responder"], targets["fog"]))
        if len(rounds) > 1:
            rows.append(
                f"{broker:10} per-round figures are medians of {len(rounds)} rounds; "
                f"fog intents/s per round: {targets['fog']['rounds_per_s']}, responder: "
                f"{targets['responder']['rounds_per_s']}"
            )
    return "\n".join(rows)


def summary_run(broker: str, r: dict[str, Any]) -> dict[str, Any]:
    """One broker's figures in the shape of issue 15's ``--json``."""
    fog, responder, crowd = r.get("fog", {}), r.get("responder", {}), r.get("crowd", {})
    return {
        "broker": "amqtt" if broker == "amqtt" else broker,
        "fog_per_s": fog.get("per_s"),
        "responder_per_s": responder.get("per_s"),
        "p50_ms_at_1000": fog.get("p50_ms_at_1000"),
        "p99_ms_at_1000": fog.get("p99_ms_at_1000"),
        "fsync_p50_ms": fog.get("fsync_p50_ms"),
        "fsync_p99_ms": fog.get("fsync_p99_ms"),
        "rss_mb_idle": fog.get("rss_mb_idle"),
        "rss_mb_10k_devices": crowd.get("rss_mb_10k_devices"),
    }


def _ratio(value: float | None, floor: float | None) -> str:
    if value is None or floor is None or not floor:
        return "-"
    return f"{value / floor:.2f}"


def floors_table(summary: dict[str, Any]) -> str:
    """Each figure beside its floor, measured in the same run, and the bar of issue 15."""
    rows = [
        f"{'broker':10} {'figure':24} {'value':>9} {'floor':>9} {'ratio':>6}  bar",
    ]
    for r in summary["runs"]:
        b = r["broker"]
        p50, p99 = r["p50_ms_at_1000"], r["p99_ms_at_1000"]
        f50, f99 = r["fsync_p50_ms"], r["fsync_p99_ms"]
        lines = [
            ("throughput /s", r["fog_per_s"], r["responder_per_s"], ">= 0.80 of the responder"),
            (
                f"p50 ms at {PACED_RATE_PER_S:,.0f}/s",
                p50,
                f50,
                f"<= fsync p50 + 2 = {_plus(f50, 2)}",
            ),
            (
                f"p99 ms at {PACED_RATE_PER_S:,.0f}/s",
                p99,
                f99,
                f"<= fsync p99 + 5 = {_plus(f99, 5)}",
            ),
            ("RSS MB idle", r["rss_mb_idle"], 60.0, "< 60 (all processes)"),
            ("RSS MB 10k devices", r["rss_mb_10k_devices"], 80.0, "< 80"),
        ]
        for name, value, floor, bar in lines:
            ratio = _ratio(value, floor)
            rows.append(f"{b:10} {name:24} {_fmt(value):>9} {_fmt(floor):>9} {ratio:>6}  {bar}")
    return "\n".join(rows)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:,.1f}"


def _plus(x: float | None, y: float) -> str:
    return "-" if x is None else f"{x + y:.1f}"


def budget(broker: str, responder: dict[str, Any], fog: dict[str, Any]) -> str:
    """What a ratio of 0.8 asks of the fog, from the same run's figures.

    Saturated, a target's rate is (cores busy) / (machine CPU per intent), and the machine's
    CPU per intent is the target's own plus the load generator's and the broker's (``rest``:
    the responder run's machine figure less the responder's own). So the ratio is
    (fog's cores busy / responder's) x (responder's machine CPU / fog's), and with the cores
    as busy in both runs it reaches 0.8 when the fog's own CPU per intent is at most
    1.25 x (responder's own + rest) - rest."""
    rest = responder["machine_us_per_intent"] - responder["cpu_us_per_intent"]
    allowed = 1.25 * responder["machine_us_per_intent"] - rest
    return (
        f"{broker:10} for 0.8 the fog may use {allowed:.0f} us CPU per intent (loader + broker:"
        f" {rest:.0f} us) with the cores as busy as in the responder's run: it used"
        f" {fog['cpu_us_per_intent']:.0f} us, with {fog['cores_busy']} cores busy against the"
        f" responder's {responder['cores_busy']}"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--devices", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=6.0, help="per phase")
    ap.add_argument("--brokers", default="mosquitto,amqtt")
    ap.add_argument(
        "--targets", default=",".join(TARGETS), help="measure only some (the ratio needs both)"
    )
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure each target this many times, alternating; report medians",
    )
    ap.add_argument(
        "--db-dir",
        metavar="DIR",
        help="put the fog's SQLite files in DIR (e.g. /dev/shm: a diagnostic of what the "
        "disk's fsync costs; not durable, not the figure to report)",
    )
    ap.add_argument(
        "--fog-toml",
        default="",
        metavar="LINES",
        help="top-level lines for the fog's config, e.g. 'store_process = false' (A/B runs)",
    )
    ap.add_argument(
        "--fog-broker-toml",
        default="",
        metavar="LINES",
        help="lines for the fog config's [broker] table, e.g. 'process = false'",
    )
    ap.add_argument(
        "--no-crowd",
        action="store_true",
        help="skip the memory run with 10,000 bound devices and 1,000 owners",
    )
    ap.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (logs, databases)")
    ap.add_argument(
        "--paced-rate",
        type=float,
        default=PACED_RATE_PER_S,
        metavar="R",
        help="intents/s offered in the paced phase (default 1,000, the issue's bar; lower: an "
        "A/B of latency on a machine too busy to serve 1,000/s; the *_at_1000 figures are then "
        "at R)",
    )
    args = ap.parse_args()
    set_paced_rate(args.paced_rate)
    with contextlib.ExitStack() as stack:
        if args.keep:
            tmp = args.keep
            Path(tmp).mkdir(parents=True, exist_ok=False)
        else:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="fogpay-bench-"))
        world = World(Path(tmp), args.devices)
        world.fog_toml = args.fog_toml
        world.fog_broker_toml = args.fog_broker_toml
        if args.db_dir:
            world.db_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=args.db_dir)))
        verify_per_s = verify_rate()
        targets = frozenset(args.targets.split(","))
        if not targets <= set(TARGETS):
            ap.error(f"--targets: choose from {', '.join(TARGETS)}")
        if args.rounds < 1:
            ap.error("--rounds: at least 1")
        runs = {
            b: run_broker(b, world, args.seconds, targets, args.rounds)
            for b in args.brokers.split(",")
        }
        if "fog" in targets and not args.no_crowd:
            for b in runs:
                runs[b]["crowd"] = measure_crowd(b, world, world.dir / b / "crowd")
    summary = {
        "verify_per_s": round(verify_per_s),
        "runs": [summary_run(b, r) for b, r in runs.items()],
    }
    if args.json:
        print(json.dumps({**summary, "detail": runs}))
    else:
        print(table(verify_per_s, runs))
        print()
        print(floors_table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
