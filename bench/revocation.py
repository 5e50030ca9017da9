"""How long a revocation takes to reach every fog (docs/protocol.md 17.5), real processes.

A cloud (``fogpay cloud run``) and three fogs (``python -m fog``), each on its own Mosquitto on
127.0.0.1, the fogs' brokers bridged to the cloud's with the shipped bridge
(``deploy/mosquitto/fogpay-bridge.conf``), every fog a peer of the others. fog-c's bridge to
the cloud goes through a TCP proxy that is **cut** once the fogs hold their trust material
and leases; fog-c is joined to fog-b directly (``deploy/mosquitto/fogpay-peer-bridge.conf``,
gossip only), as two fogs of one site whose uplink is down.

Per round, one device (bound to the owner, known to every fog) pays at each fog, a probe
every ``PROBE_S`` with one sequence counter across the fogs; the issuer revokes it
(``fogpay cloud device revoke``, a separate process: the running service publishes the
retained revocation within its refresh, ``REFRESH_S`` = 1 s); the time is taken when the
revocation appears on the cloud's broker (a subscriber there) and when each fog first
declines the device ``revoked``. fog-a and fog-b hear it from the cloud's broker; fog-c only
from a peer: fog-b forwards it on ``gossip/fog-c/revoke`` over the direct bridge.

Prints, per fog, the median and the largest delay from the cloud's publish to the first
``revoked`` decline (ms), and how long the issuer's command took to reach the broker.

    .venv/bin/python bench/revocation.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import aiomqtt
import nacl.signing

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cloud.sqlitestore import SqliteStore
from protocol import topics
from protocol.messages import Receipt
from protocol.reasons import Reason
from protocol.signing import open_envelope, public_key
from tests.conftest import MosquittoProcess, start_mosquitto
from tests.integration.devices import Device, Wallet, intent_id, wallet
from tests.integration.tcpproxy import TcpProxy, tcp_proxy
from tests.pipeline.test_bridge import BRIDGE, PEER_BRIDGE, bridge_for
from tests.pipeline.test_restarts import cloud_config, spawn, terminate
from tests.pipeline.world import FOG_EXTRA, Pipeline

FOGS: Final = ("fog-a", "fog-b", "fog-c")
CUT: Final = "fog-c"  # cut from the cloud; reachable by fog-b over a direct bridge
PEER_OF_CUT: Final = "fog-b"
PROBE_S: Final = 0.02
ANSWER_TIMEOUT_S: Final = 2.0
WARM_TIMEOUT_S: Final = 60.0
ROUND_TIMEOUT_S: Final = 30.0
CLI_TIMEOUT_S: Final = 60.0


@dataclass
class Federation:
    p: Pipeline
    brokers: dict[str, MosquittoProcess]
    proxy: TcpProxy
    cloud_cfg: Path
    probes: list[Probe]
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def log(self, name: str) -> Path:
        return self.p.directory / f"{name}.log"


@dataclass
class Probe:
    """One device key paying at every fog with one sequence counter (the fogs' sequence
    gossip sees one device moving between them, never a reused q)."""

    key: nacl.signing.SigningKey
    seq: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    @property
    def public(self) -> bytes:
        return public_key(self.key)

    def intent(self, fog_id: str) -> tuple[str, bytes]:
        device = Device(fog_id, key=self.key)
        return device.intent_topic, device.intent(1, seq=next(self.seq))


def fog_extra(fog_id: str) -> str:
    peers = ", ".join(f'"{f}"' for f in FOGS if f != fog_id)
    return FOG_EXTRA + f"\n[federation]\npeers = [{peers}]\n"


@contextlib.asynccontextmanager
async def federation(directory: Path, *, devices: int) -> AsyncIterator[Federation]:
    """Brokers, bridges, the proxy, the cloud and the three fogs running, ``devices`` probe
    devices bound to owner alice (nothing paid yet, nothing cut yet)."""
    cloud_dir = directory / "cloud-broker"
    cloud_dir.mkdir()
    cloud = start_mosquitto(cloud_dir)
    brokers = {"cloud": cloud}
    store = await SqliteStore.open(str(directory / "cloud.db"))
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        async with tcp_proxy("127.0.0.1", cloud.endpoint.port) as proxy:
            for fog_id in (PEER_OF_CUT, *(f for f in FOGS if f != PEER_OF_CUT)):
                d = directory / f"{fog_id}-broker"
                d.mkdir()
                port = proxy.port if fog_id == CUT else cloud.endpoint.port
                conf = bridge_for(BRIDGE, fog_id, f"127.0.0.1:{port}", "unused")
                if fog_id == CUT:  # one site with fog-b: gossip straight to its broker
                    peer = f"127.0.0.1:{brokers[PEER_OF_CUT].endpoint.port}"
                    conf += bridge_for(PEER_BRIDGE, fog_id, peer, "unused", PEER_OF_CUT)
                brokers[fog_id] = start_mosquitto(d, extra=conf)
            p = Pipeline(store, cloud.endpoint, directory)
            await p.owner("alice", limit=100_000_000)
            configs = {}
            for fog_id in FOGS:
                configs[fog_id] = await p.fog(fog_id, extra=fog_extra(fog_id))
                text = configs[fog_id].read_text()
                own = brokers[fog_id].endpoint.url
                configs[fog_id].write_text(text.replace(p.broker.url, own))
            probes = [Probe((await p.device("alice", FOGS[0])).key) for _ in range(devices)]
            cfg = cloud_config(p)
            w = Federation(p, brokers, proxy, cfg, probes, procs)
            procs["cloud"] = spawn(
                ["-m", "fogpay.cli", "cloud", "--config", str(cfg), "run"], w.log("cloud")
            )
            for fog_id in FOGS:
                procs[fog_id] = spawn(
                    ["-m", "fog", "--config", str(configs[fog_id])], w.log(fog_id)
                )
            try:
                yield w
            finally:
                codes = {n: terminate(proc) for n, proc in procs.items() if proc.poll() is None}
                assert all(c == 0 for c in codes.values()), codes
    finally:
        await store.close()
        for b in reversed(list(brokers.values())):
            b.stop()


@contextlib.asynccontextmanager
async def wallets(w: Federation) -> AsyncIterator[dict[str, Wallet]]:
    async with contextlib.AsyncExitStack() as stack:
        out = {}
        for fog_id in FOGS:
            port = w.brokers[fog_id].endpoint.port
            out[fog_id] = await stack.enter_async_context(wallet("127.0.0.1", port, fog_id))
        yield out


async def answer(wallet_: Wallet, probe: Probe, fog_id: str) -> Receipt | None:
    topic, raw = probe.intent(fog_id)
    with contextlib.suppress(TimeoutError):
        got = await wallet_.send_raw(topic, raw, intent_id(raw), timeout_s=ANSWER_TIMEOUT_S)
        return open_envelope(got, Receipt).msg
    return None


async def warm_up(w: Federation, ws: dict[str, Wallet]) -> None:
    """Every probe device paid once at every fog: each fog holds its binding and a lease."""
    async with asyncio.timeout(WARM_TIMEOUT_S):
        for probe in w.probes:
            for fog_id in FOGS:
                while True:
                    receipt = await answer(ws[fog_id], probe, fog_id)
                    if receipt is not None and receipt.ok:
                        break
                    reason = None if receipt is None else receipt.reason
                    if reason is not None and not reason.transient:
                        raise AssertionError(f"{fog_id} declined a probe: {reason}")
                    await asyncio.sleep(0.1)


async def until_revoked(ws: dict[str, Wallet], probe: Probe, fog_id: str) -> float:
    """Probe ``fog_id`` until it declines the device ``revoked``; when it did (monotonic)."""
    while True:
        receipt = await answer(ws[fog_id], probe, fog_id)
        if receipt is not None and receipt.reason is Reason.REVOKED:
            return time.monotonic()
        await asyncio.sleep(PROBE_S)


def cli(*args: str) -> tuple[int, str, str]:
    done = subprocess.run(
        [sys.executable, "-m", "fogpay.cli", *args],
        capture_output=True,
        timeout=CLI_TIMEOUT_S,
        check=False,
    )
    return done.returncode, done.stdout.decode(), done.stderr.decode()


@dataclass(frozen=True)
class Round:
    command_to_publish_s: float  # the issuer's command started -> on the cloud's broker
    after_publish_s: dict[str, float]  # per fog: publish -> first `revoked` decline


async def revoke_round(w: Federation, ws: dict[str, Wallet], probe: Probe) -> Round:
    """Revoke ``probe``'s device with the issuer's command and time its arrival everywhere."""
    topic = topics.revoke_topic(probe.public)
    async with (
        aiomqtt.Client("127.0.0.1", w.brokers["cloud"].endpoint.port, timeout=10) as watcher,
        asyncio.timeout(ROUND_TIMEOUT_S),
    ):
        await watcher.subscribe(topic, qos=1)

        async def on_broker() -> float:
            async for message in watcher.messages:
                if str(message.topic) == topic and message.payload:
                    return time.monotonic()
            raise AssertionError("the cloud broker's connection ended")

        probers = {f: asyncio.create_task(until_revoked(ws, probe, f)) for f in FOGS}
        published_at = asyncio.create_task(on_broker())
        tasks = [published_at, *probers.values()]
        try:
            started = time.monotonic()
            code, _, err = await asyncio.to_thread(
                cli, "cloud", "--config", str(w.cloud_cfg), "device", "revoke", probe.public.hex()
            )
            assert code == 0, err
            published = await published_at
            seen = {f: await t for f, t in probers.items()}
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    return Round(published - started, {f: at - published for f, at in seen.items()})


def logged_counter(log: Path, name: str) -> int:
    """The last value of counter ``name`` in the fog's ``fog_stats`` lines (0 if none)."""
    last = 0
    for line in log.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if isinstance(entry, dict) and entry.get("event") == "fog_stats":
                last = int(entry.get(name, 0))
    return last


async def run(directory: Path, rounds: int) -> list[Round]:
    async with federation(directory, devices=rounds) as w, wallets(w) as ws:
        await warm_up(w, ws)
        w.proxy.cut()  # fog-c: no cloud from here on
        return [await revoke_round(w, ws, probe) for probe in w.probes]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5, help="devices revoked, one per round")
    args = ap.parse_args()
    if not 1 <= args.rounds <= 100:
        ap.error("--rounds: 1..100")
    with tempfile.TemporaryDirectory(prefix="fogpay-revocation-") as tmp:
        results = asyncio.run(run(Path(tmp), args.rounds))
    print(f"revocation, {args.rounds} rounds (cloud + 3 fogs, fog-c cut from the cloud):")
    cmd = [r.command_to_publish_s * 1000 for r in results]
    print(
        f"  issuer's command -> cloud broker: median {statistics.median(cmd):.0f} ms, "
        f"max {max(cmd):.0f} ms"
    )
    for fog_id in FOGS:
        ms = [r.after_publish_s[fog_id] * 1000 for r in results]
        how = "through its peer fog-b" if fog_id == CUT else "from the cloud's broker"
        print(
            f"  publish -> {fog_id} declines revoked ({how}): "
            f"median {statistics.median(ms):.0f} ms, max {max(ms):.0f} ms"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
