"""One seeded run: the cast, the nodes, the network, the scheduler, the invariants.

A run has two phases. **Chaos**: devices pay, fogs tick when their core's ``Wake`` asks
(seal, send batches, ask for and report leases), the cloud answers, and the seed's fault mix
drops, delays, duplicates and reorders messages, cuts fogs off the cloud, and crashes fogs
and the cloud (a crash may come right after a transaction committed and before its outputs
were published). A few devices are revoked by their owners. **Heal**: faults stop, every node
is restarted and reconnected, devices finish what they have in flight and pay no more, and
virtual time passes (fog ticks at least ``heal_tick_ms`` apart) until everything is quiet
(or a bound is hit). Safety invariants are checked after every step; the liveness ones at
the end (``tests/sim/invariants.py``). The first violation stops the run.

Everything random comes from ``random.Random(seed)``: the cast's keys, the fault mix, each
fault, each delay, each payment; even the cloud's lease ids (``os.urandom`` is routed to the
seed's generator for the run). Time is the scheduler's virtual clock. So a seed replays
exactly, and its trace is the same every time.
"""

import asyncio
import contextlib
import dataclasses
import logging
import multiprocessing
import os
import random
import tempfile
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import structlog

from cloud import registry
from cloud.leases import LeasePolicy
from cloud.store import Tx
from fog import restore, returns
from fog.restore import RestoreError
from fog.schema import connect as fog_connect
from fog.store import Arrival
from protocol import topics
from protocol.errors import TopicError
from protocol.messages import Revocation
from protocol.signing import public_key, seal
from protocol.topics import Kind
from protocol.voucher import VOUCHER_PAYEE
from tests.sim.cloudnode import CloudNode
from tests.sim.devices import RETRY_MS, SimDevice
from tests.sim.faults import FaultMix
from tests.sim.fognode import CLOUD, FogNode, FogSettings, Outputs
from tests.sim.invariants import Checker
from tests.sim.network import Network
from tests.sim.restore import close_lost_fog_leases, fetch_all, upload_held
from tests.sim.scheduler import Scheduler
from tests.sim.world import Cast

INITIAL_MICROS: Final = 100_000
TRACE_LINES: Final = 40
THINK_MS_MIN, THINK_MS_MAX = 50, 1_000  # a device's pause between two payments
EVENTS_PER_STEP_MAX: Final = 20
REGISTERED_BEFORE_MS: Final = 5_000  # credentials valid from before the start (and skew)
CHAOS_EVERY_MS: Final = 1_000  # per fog: may it crash or be cut off now
TICK_MS_MAX: Final = 5_000  # the shell's longest sleep when the core asks for no Tick
FOGS_DEFAULT: Final = 3
MAX_SKEW_MS: Final = 2_000  # a fog's clock is at most this far off the simulation's
STEPS_DEFAULT: Final = 300
UPLOAD_RETRY_MS: Final = 3_000  # a device hands in its held receipts again until answered
CLONE_SHARE: Final = 0.25  # seeds with a cloned device key (when --clones is on)
BUDGET_SHARE: Final = 0.35  # seeds with each feature of docs/protocol.md 18 (when --budget)
RETURN_EVERY_MS: Final = 4_000  # per fog: may the operator give its leases back now


@dataclass(frozen=True, slots=True)
class SimConfig:
    fogs: int = FOGS_DEFAULT
    steps: int = STEPS_DEFAULT  # events that did something, in the chaos phase
    heal_steps_max: int = 3_000
    heal_ms_max: int = 1_200_000
    heal_tick_ms: int = 5_000
    mix: FaultMix | None = None  # None: drawn from the seed (swarm testing)
    faults: bool = True  # False: no faults at all (the mix is drawn, then ignored)
    without: tuple[str, ...] = ()  # faults of the drawn mix switched off (faults.FAULTS)
    # a lease its fog never stored and that stays open at the cloud is a violation (off: only
    # counted as "leases stranded"; the fog reports such a lease unused since fog/core.py's
    # _report_unused, see README.md)
    strict_leases: bool = True
    # k: peers each fog replicates a batch to (at most fogs - 1); 0: no federation (each fog
    # alone with the cloud, as before issue 11)
    replicas: int = 2
    # a share of the seeds (CLONE_SHARE) clones one device's key: a second device pays at
    # another fog with the sequence numbers the original used (docs/protocol.md 17.4)
    clones: bool = True
    # federation part 2 (docs/protocol.md 18): a share of the seeds gives leases back early
    # (idle owners, graceful stops, the operator's return-leases), lets fogs move budget by
    # peer transfers, and has devices pay each other offline against vouchers; each feature
    # drawn from the seed's own stream (BUDGET_SHARE), so the other seeds run as before
    budget: bool = True


@dataclass(slots=True)
class Result:
    seed: int
    mix: str
    setup: str = ""
    violations: list[str] = field(default_factory=list)
    step: int = 0
    trace: list[str] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)
    # measurements whose distribution the summary gives (revocation propagation, ms)
    samples: dict[str, list[int]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.violations


class Violation(Exception):
    pass


@contextlib.contextmanager
def seeded_urandom(rng: random.Random) -> Iterator[None]:
    """Route ``os.urandom`` (the cloud draws lease ids from it) to the seed's generator."""
    real = os.urandom
    os.urandom = rng.randbytes
    try:
        yield
    finally:
        os.urandom = real


class Simulation:
    def __init__(
        self,
        seed: int,
        directory: Path,
        config: SimConfig,
        *,
        echo: Callable[[str], None] | None = None,
    ) -> None:
        self.seed, self.config, self._echo = seed, config, echo
        self.rng = random.Random(seed)
        rng = self.rng
        FaultMix.draw(rng)  # drawn even when replaced: the rest of the seed stays the same
        self.mix = self.mix_of(seed, config)
        self.policy = LeasePolicy(
            initial_micros=INITIAL_MICROS,
            request_micros_max=INITIAL_MICROS * 2,
            lease_ms=rng.choice((3_000, 10_000, 30_000)),
        )
        self.cast = Cast.draw(rng, fogs=config.fogs, initial_micros=INITIAL_MICROS)
        self.sched = Scheduler()
        fog_ids = sorted(self.cast.fog_keys)
        self.net = Network(self.sched, rng, self.mix, fog_ids, self._deliver)
        self.cloud = CloudNode(
            path=directory / "cloud.sqlite",
            issuer=self.cast.issuer,
            policy=self.policy,
            sched=self.sched,
        )
        settings = FogSettings(
            records_max=rng.choice((1, 4, 16)),
            age_ms=rng.choice((500, 2_000, 5_000)),
            keep_acked_ms=rng.choice((0, 0, 1_000, 10_000)),
            request_below_micros=INITIAL_MICROS // 5,
            request_micros=INITIAL_MICROS,
        )
        # federation part 2: drawn from a stream of its own, so that a seed without these
        # features runs exactly as it did before them
        self.brng = random.Random(f"budget-{seed}")
        brng, on = self.brng, config.budget
        idle = brng.choice((1_000, 3_000, 8_000)) if on and brng.random() < BUDGET_SHARE else 0
        self.return_on_stop = on and brng.random() < BUDGET_SHARE
        self.operator_returns = on and brng.random() < BUDGET_SHARE
        transfers = on and config.replicas > 0 and config.fogs > 1
        transfers = transfers and brng.random() < BUDGET_SHARE
        settings = dataclasses.replace(
            settings,
            return_idle_ms=idle,
            return_on_stop=self.return_on_stop,
            peer_transfers=transfers,
        )
        issuer = public_key(self.cast.issuer)
        skew = rng.choice((0, 0, 200, 2_000))  # fog clocks off the cloud's by up to this
        self.fogs = {
            f: FogNode(
                fog_id=f,
                key=self.cast.fog_keys[f],
                issuer_key=issuer,
                path=directory / f"{f}.sqlite",
                settings=settings,
                skew_ms=rng.randint(-skew, skew),
                peers=_peers(fog_ids, f) if config.replicas > 0 else (),
                replicas=config.replicas,
            )
            for f in fog_ids
        }
        self.devices = {d.public: d for d in self.cast.devices}
        self.checker: Checker | None = None
        self.chaos = True
        self.step = 0
        self.trace: deque[str] = deque(maxlen=TRACE_LINES)
        self.stats: dict[str, int] = {}
        self._wake_token: dict[str, int] = {}
        self._tick_at: dict[str, int] = {}
        self._tick_token: dict[str, int] = {}
        self.lost: set[str] = set()  # fogs whose file was destroyed, waiting for a restore
        self.dead: set[str] = set()  # fogs whose chain head was lost: down for good
        # (origin, batch) -> holders whose racc the origin took: they hold it durably
        self.held_by: dict[tuple[str, int], set[str]] = {}
        self.restored: set[str] = set()  # fogs restored at least once (their old leases)
        self._uploading: set[str] = set()  # devices with an upload round scheduled
        # revocations: the device key -> when the cloud published it; -> fog -> when stored
        self.revoke_sent: dict[bytes, int] = {}
        self.revoke_stored: dict[bytes, dict[str, int]] = {}
        # a cloned key: the clone (same key as its original), and where each was caught
        self.clones: dict[bytes, SimDevice] = {}
        self.clone_caught: dict[str, int] = {}
        if config.clones and len(fog_ids) > 1 and self.rng.random() < CLONE_SHARE:
            orig = self.rng.choice(sorted(self.devices.values(), key=lambda d: d.name))
            clone = SimDevice(
                f"{orig.name}-clone", orig.key, orig.owner_id, orig.currency, orig.fogs,
                clone_of=orig,
            )  # fmt: skip
            self.clones[orig.public] = clone
        # vouchers (18.3): 1-2 devices obtain vouchers and pay other devices offline; in
        # half of those seeds one of them double-spends (a copy of its voucher state)
        self.voucher_payers: set[str] = set()
        self.double_spenders: set[bytes] = set()
        if config.budget and len(self.devices) > 1 and self.brng.random() < BUDGET_SHARE:
            devs = sorted(self.devices.values(), key=lambda d: d.name)
            payers = self.brng.sample(devs, self.brng.randint(1, min(2, len(devs) - 1)))
            self.voucher_payers = {d.name for d in payers}
            if self.brng.random() < 0.5:
                self.double_spenders.add(payers[0].public)

    def describe(self) -> str:
        """The seed's drawn set-up, for a failure report."""
        s = next(iter(self.fogs.values())).settings
        skews = ",".join(str(n.skew_ms) for n in self.fogs.values())
        owners = ",".join(f"{o.owner_id}:{o.limit_micros}" for o in self.cast.owners)
        return (
            f"lease_ms={self.policy.lease_ms} records_max={s.records_max} age_ms={s.age_ms} "
            f"keep_acked_ms={s.keep_acked_ms} fog_skews_ms={skews} devices={len(self.devices)} "
            f"limits={owners} return_idle_ms={s.return_idle_ms} "
            f"return_on_stop={s.return_on_stop} operator_returns={self.operator_returns} "
            f"peer_transfers={s.peer_transfers}"
        )

    @staticmethod
    def mix_of(seed: int, config: SimConfig) -> FaultMix:
        """The fault mix ``seed`` runs with under ``config`` (drawn first from its generator)."""
        drawn = FaultMix.draw(random.Random(seed))
        mix = config.mix or (drawn if config.faults else FaultMix.none())
        return mix.without(config.without)

    # ---- bookkeeping ------------------------------------------------------------------------

    def count(self, name: str, n: int = 1) -> None:
        self.stats[name] = self.stats.get(name, 0) + n

    def note(self, line: str) -> None:
        t = self.sched.now_ms - self.sched_start
        text = f"#{self.step} t={t}ms {line}"
        self.trace.append(text)
        if self._echo is not None:
            self._echo(text)

    def fail(self, problems: list[str]) -> None:
        if problems:
            raise Violation("; ".join(problems[:5]))

    # ---- the run ----------------------------------------------------------------------------

    async def run(self) -> Result:
        result = Result(self.seed, self.mix.describe(), self.describe())
        try:
            with seeded_urandom(random.Random(self.rng.getrandbits(64))):
                await self._run()
        except Violation as v:
            result.violations.append(str(v))
        finally:
            if self.checker is not None:
                self.checker.close()
            for node in self.fogs.values():
                if node.up:
                    node.crash()
            if self.cloud.up:
                await self.cloud.crash()
        result.step, result.trace = self.step, list(self.trace)
        result.stats = dict(self.stats)
        result.stats["steps"] = self.step
        result.stats["receipts_ok"] = sum(len(d.held) for d in self.devices.values())
        result.stats.update({f"net_{k}": v for k, v in self.net.counts.items()})
        result.stats["relayed_batches"] = self.cloud.relayed
        result.stats["held_booked"] = self.cloud.held_booked
        result.samples["revocation_ms"] = self.revocation_times()
        return result

    def revocation_times(self) -> list[int]:
        """Per owner revocation: from the cloud's retained publish to the last fog that
        stored it (from the cloud, or from a peer's gossip), in virtual ms."""
        return [
            max(stored.values()) - self.revoke_sent[key]
            for key, stored in sorted(self.revoke_stored.items())
            if key in self.revoke_sent and stored
        ]

    async def _run(self) -> None:
        self.sched_start = self.sched.now_ms
        now = self.sched.now_ms
        await self.cloud.start()
        await self.cloud.transact(
            lambda tx: self.cast.register(tx, now_ms=now - REGISTERED_BEFORE_MS)
        )
        started = {f: node.start(now_ms=now, connected=True) for f, node in self.fogs.items()}
        self.checker = Checker(
            cloud_path=self.cloud.path,
            fog_paths={f: n.path for f, n in self.fogs.items()},
            limits={o.owner_id: o.limit_micros for o in self.cast.owners},
        )
        self.checker.replicas = max(1, min(self.config.replicas, len(self.fogs) - 1))
        self.checker.federation = self.config.replicas > 0 and len(self.fogs) > 1
        self.checker.clone_keys = set(self.clones)
        self.checker.double_spenders = set(self.double_spenders)
        assert self.cloud.core is not None
        self.net.publish_retained(await self.cloud.core.retained())
        for f, out in started.items():
            self._after_fog(f, out)
        self._schedule_start()
        await self._loop(self.config.steps)
        await self._heal()

    def _schedule_start(self) -> None:
        rng = self.rng
        for f in self.fogs:
            self.sched.after(rng.randint(0, CHAOS_EVERY_MS), f"chaos {f}", self._chaos(f))
        for dev in self.devices.values():
            self._wake(dev, rng.randint(0, 2_000))
        for clone in self.clones.values():
            self._wake(clone, rng.randint(2_000, 6_000))
        if self.operator_returns:
            for f in self.fogs:
                at = self.brng.randint(1_000, RETURN_EVERY_MS)
                self.sched.after(at, f"return-leases {f}", self._operator_return(f))
        for _ in range(rng.choice((0, 0, 1, 2))):
            dev = rng.choice(sorted(self.devices.values(), key=lambda d: d.name))
            self.sched.after(rng.randint(1_000, 10_000), f"revoke {dev.name}", self._revoker(dev))

    async def _loop(self, steps: int, *, until: Callable[[], bool] | None = None) -> None:
        """Run events until ``steps`` of them did something (a tick with nothing to do, a
        stale wake-up do not count; every event is numbered in the trace), the queue is
        empty, or ``until()`` (asked every 25 events) is true. Bounded: at most
        ``EVENTS_PER_STEP_MAX`` events per step."""
        done = 0
        for _ in range(steps * EVENTS_PER_STEP_MAX):
            if done >= steps:
                return
            event = self.sched.pop()
            if event is None:
                return
            self.step += 1
            try:
                outcome = event.run()
                if isinstance(outcome, Awaitable):
                    outcome = await outcome
            except Violation:
                self.note(f"{event.what}: VIOLATION")
                raise
            except Exception as exc:  # a handler of the system under test raised: a bug
                self.note(f"{event.what}: raised {type(exc).__name__}")
                raise Violation(f"{event.what} raised {type(exc).__name__}: {exc}") from exc
            if outcome is not None:
                done += 1
                self.note(f"{event.what}: {outcome}")
            if until is not None and self.step % 25 == 0 and until():
                return

    # ---- heal -------------------------------------------------------------------------------

    async def _heal(self) -> None:
        self.chaos = False
        self.net.mix = FaultMix.none()
        self.note("heal: faults off, every node up and connected")
        if not self.cloud.up:
            await self._cloud_restart()
        self.net.peer_cut.clear()
        for f, node in self.fogs.items():
            if f in self.dead:
                continue
            if f in self.lost:
                self._restore(f)
            elif not node.up:
                self._fog_restart(f)
            elif f in self.net.cut:
                self._fog_heal(f)
            else:
                self.net.resubscribe(f)
        end_ms = self.sched.now_ms + self.config.heal_ms_max
        self.sched.at(end_ms, "heal: time is up", lambda: None)
        await self._loop(self.config.heal_steps_max, until=lambda: self._quiet(end_ms))
        assert self.checker is not None
        # every device hands in the ok receipts the cloud has not booked (17.7): those whose
        # records a fog lost with its disk, or that only a dead fog's replicas held
        for dev in self._all_devices():
            unbooked = [h for h in dev.held.values() if not self.checker.booked(h.intent_id)]
            self.count("receipts_uploaded_at_heal", len(unbooked))
            upload_held(self, dev, unbooked)
        await self._loop(self.config.heal_steps_max, until=lambda: self._quiet(end_ms))
        # the operator closes what no fog will report (close-leases): a dead fog's leases,
        # and the leases a restore retired, now that every receipt is in
        for fog_id in sorted(self.dead | self.restored):
            await close_lost_fog_leases(self, fog_id)
        await self._loop(self.config.heal_steps_max, until=lambda: self._quiet(end_ms))
        now = self.sched.now_ms
        self.fail(await self.checker.cloud())
        self.fail(self.checker.converged(self._all_devices(), now_ms=now))
        self.fail(self._clones_caught())
        self.fail(self.checker.d2d_settled(self._all_devices(), self.double_spenders))
        self.count("held_uploads", sum(d.uploads for d in self._all_devices()))
        self.count("replicated_of_dead_fogs", self.checker.replicated_of_dead)
        self.count("unbooked_max_micros", self.checker.bound_max)
        self.count("records_at_risk_max", self.checker.at_risk_max)
        self.count("transfers", self.checker.transfers_at_cloud())
        self.count("vouchers", sum(len(d.vouchers) for d in self.devices.values()))
        self.count("d2d_booked", self.checker.d2d_booked)
        self.count("records_rejected_sublease", len(self.checker.sub_rejected))
        self.count("dead_unbooked_micros_max", self.checker.dead_unbooked)
        self.count("double_spends", self.checker.double_spends_caught)
        self.count("seeds_vouchers", int(bool(self.voucher_payers)))
        self.count("returns", len(self.checker.returned))
        self.count("recalls", self.cloud.recalls)
        self.count("budget_returned_micros", self.checker.budget_returned())
        self.count("seeds_transfers", int(self.fogs[next(iter(self.fogs))].settings.peer_transfers))
        stranded = self.checker.stranded(now_ms=now, known=False, exempt=False)
        self.count("leases_stranded", len(stranded))
        if self.config.strict_leases:
            self.fail(
                [
                    f"cloud: lease {x.hex()[:8]} expired, open, never held by its fog"
                    for x in stranded
                ]
            )

    def _all_devices(self) -> list[SimDevice]:
        return [*self.devices.values(), *self.clones.values()]

    def _clones_caught(self) -> list[str]:
        """A cloned key that got ok receipts at one (device, q) from two fogs was caught:
        ``cloned_key`` at a fog or at the cloud (and nothing booked twice: checked always)."""
        out = []
        for key, clone in sorted(self.clones.items()):
            orig = self.devices[key]
            mine = {h.seq: h.intent_id for h in orig.held.values()}
            both = [h for h in clone.held.values() if mine.get(h.seq, h.intent_id) != h.intent_id]
            self.count("clone_receipts_ok", len(clone.held))
            self.count("clone_collisions", len(both))
            assert self.checker is not None
            at_cloud = self.checker.cloned_alarm(key)
            self.count("cloned_key_at_cloud", int(at_cloud))
            if both and not at_cloud and not self.clone_caught.get(key.hex()):
                out.append(f"{clone.name}: {len(both)} ok at a used (device, q), not caught")
        self.count("cloned_key_at_fogs", sum(self.clone_caught.values()))
        return out

    def _quiet(self, end_ms: int) -> bool:
        if self.sched.now_ms >= end_ms:
            return True
        if any(d.inflight is not None or d.to_upload for d in self._all_devices()):
            return False
        fogs = [n for f, n in self.fogs.items() if f not in self.dead]
        if not all(n.up and n.idle() and self._sealed_all(n) for n in fogs):
            return False
        assert self.checker is not None
        now = self.sched.now_ms
        live = [
            x for x in self.checker.leases.values() if x.state == "open" and x.not_after_ms >= now
        ]
        return not live and not self.checker.stranded(now_ms=now, known=True, exempt=True)

    def _sealed_all(self, node: FogNode) -> bool:
        assert self.checker is not None
        return self.checker.unsealed(node.fog_id) == 0

    # ---- events: fogs -------------------------------------------------------------------------

    def _want_tick(self, fog_id: str, at_ms: int) -> None:
        """The core asked for a Tick by ``at_ms`` (its ``Wake``); the shell keeps the earliest.
        In the heal phase ticks are spaced out (a slow shell), which only delays things."""
        now = self.sched.now_ms
        at = max(at_ms, now if self.chaos else now + self.config.heal_tick_ms)
        pending = self._tick_at.get(fog_id)
        if pending is not None and now <= pending <= at:
            return
        self._tick_at[fog_id] = at
        token = self._tick_token[fog_id] = self._tick_token.get(fog_id, 0) + 1

        def tick() -> object:
            if self._tick_token[fog_id] != token:
                return None  # superseded by an earlier wake-up
            del self._tick_at[fog_id]
            node = self.fogs[fog_id]
            if not node.up:
                return None  # the restart asks again
            out = node.tick(now_ms=self.sched.now_ms)
            if out.wake_ms is None:  # the shell's longest sleep
                out.wake_ms = self.sched.now_ms + TICK_MS_MAX
            self._after_fog(fog_id, out)
            return ", ".join(out.words) or None

        self.sched.at(at, f"tick {fog_id}", tick)

    def _chaos(self, fog_id: str) -> Callable[[], object]:
        def chaos() -> object:
            if not self.chaos:
                return None
            self.sched.after(CHAOS_EVERY_MS, f"chaos {fog_id}", chaos)
            rng, mix = self.rng, self.mix
            if self.fogs[fog_id].up and rng.random() < mix.fog_crash:
                if self.return_on_stop and self.brng.random() < 0.5:
                    return self._graceful_stop(fog_id)
                self._fog_crash(fog_id)
                return "crashed"
            if fog_id not in self.net.cut and rng.random() < mix.partition:
                return self._fog_cut(fog_id)
            if rng.random() < mix.peer_partition:
                return self._peer_cut(fog_id)
            if self.fogs[fog_id].up and not self.lost | self.dead and rng.random() < mix.disk_loss:
                return self._disk_loss(fog_id)
            return None

        return chaos

    def _fog_cut(self, fog_id: str) -> str:
        self.net.cut.add(fog_id)
        self.count("partitions")
        node = self.fogs[fog_id]
        if self.mix.client_partition and node.up:
            self._after_fog(fog_id, node.disconnected(now_ms=self.sched.now_ms))
        heal_in = self.rng.randint(100, max(100, self.mix.partition_ms_max))
        self.sched.after(heal_in, f"heal {fog_id}", lambda: self._fog_heal(fog_id))
        return "cut off from the cloud"

    def _peer_cut(self, fog_id: str) -> str | None:
        node = self.fogs[fog_id]
        if not node.peers:
            return None
        peer = self.rng.choice(node.peers)
        link = frozenset((fog_id, peer))
        if link in self.net.peer_cut:
            return None
        self.net.peer_cut.add(link)
        self.count("peer_partitions")
        heal_in = self.rng.randint(100, max(100, self.mix.partition_ms_max))
        self.sched.after(heal_in, f"heal {fog_id}-{peer}", lambda: self._peer_heal(link))
        return f"link to {peer} cut"

    def _peer_heal(self, link: frozenset[str]) -> str | None:
        if link not in self.net.peer_cut:
            return None
        self.net.peer_cut.discard(link)
        return "fog-to-fog link back"

    def _disk_loss(self, fog_id: str) -> str:
        """The fog's file is destroyed (an SD card died): the fog is down until restored
        from its peers (``_restore``)."""
        self.fogs[fog_id].crash()
        self.fogs[fog_id].destroy()
        self.net.down.add(fog_id)
        self.net.epoch[fog_id] = self.net.epoch.get(fog_id, 0) + 1
        self.lost.add(fog_id)
        self.count("disk_losses")
        for holders in self.held_by.values():  # the replicas it held are gone with it
            holders.discard(fog_id)
        assert self.checker is not None
        self.checker.disk_lost(fog_id, before_ms=self.sched.now_ms + MAX_SKEW_MS)
        down = self.rng.randint(50, max(50, self.mix.down_ms_max))
        self.sched.after(down, f"restore {fog_id}", lambda: self._restore(fog_id))
        return "disk destroyed"

    def _restore(self, fog_id: str) -> str | None:
        """``fogpay fog restore``: fetch from every peer, import, continue. An operator waits
        until every peer is reachable (a peer cut off may hold the newest batches)."""
        if fog_id not in self.lost:
            return None
        node = self.fogs[fog_id]
        reachable = all(
            self.fogs[p].up and frozenset((fog_id, p)) not in self.net.peer_cut for p in node.peers
        )
        if not reachable:
            self.sched.after(1_000, f"restore {fog_id}", lambda: self._restore(fog_id))
            return "restore waits for its peers"
        now = self.sched.now_ms
        per_peer = {p: fetch_all(self.fogs[p], fog_id, node.key, now_ms=now) for p in node.peers}
        wires = [w for p in node.peers for w in per_peer[p]]
        ack = self.net.retained.get(topics.ack_topic(fog_id))
        self.fail(self._fetched_all(fog_id, per_peer, ack))
        retired = [
            parsed.lease_id
            for t in self.net.retained
            if (parsed := topics.parse(t)).kind is Kind.LEASE
            and parsed.fog_id == fog_id
            and parsed.lease_id is not None
        ]
        self.lost.discard(fog_id)
        assert self.checker is not None
        try:
            got = node.restore(wires, ack, retired, now_ms=now)
        except RestoreError as exc:
            self.dead.add(fog_id)
            self.count("fogs_dead")
            self.checker.dead(fog_id)
            for dev in self._all_devices():  # its receipts the cloud lacks: handed in
                upload_held(self, dev, [h for h in dev.held.values() if h.fog_id == fog_id])
            return f"not restored: {exc}"
        self.count("fogs_restored")
        self.restored.add(fog_id)
        self.count("records_restored", got)
        self.checker.restored(fog_id, node.path)
        held = [h for d in self._all_devices() for h in d.held.values() if h.fog_id == fog_id]
        self.fail(self.checker.receipts_durable(fog_id, held))  # (notes the lost ones)
        for dev in self._all_devices():  # its fog was lost: what the cloud lacks, handed in
            # (the records the disk took, and those the restored fog's batches will bring
            # too: booked once whichever path comes first)
            booked = self.checker.booked
            mine = [h for h in dev.held.values() if h.fog_id == fog_id]
            upload_held(self, dev, [h for h in mine if not booked(h.intent_id)])
        self.net.down.discard(fog_id)
        cut = fog_id in self.net.cut
        out = node.start(now_ms=now, connected=not (cut and self.mix.client_partition))
        if not cut:
            self.net.resubscribe(fog_id)
        self._after_fog(fog_id, out)
        return f"restored from its peers: {got} records"

    def _fetched_all(
        self, fog_id: str, per_peer: dict[str, list[bytes]], ack: bytes | None
    ) -> list[str]:
        """A racc is a promise: every batch a peer acked comes back to a fetch from it,
        unless the peer pruned it after the cloud's ack (it then keeps a newer one of the
        origin) or lost its own disk since."""
        acked = restore.cloud_ack_number(ack, fog_id=fog_id, issuer=public_key(self.cast.issuer))
        out = []
        for peer, wires in sorted(per_peer.items()):
            fetched = {restore.batch_number(w) for w in wires}
            promised = [
                n for (f, n), holders in self.held_by.items() if f == fog_id and peer in holders
            ]
            if not promised:
                continue
            missing = [n for n in sorted(promised) if n not in fetched and n > acked]
            if missing or max(fetched, default=0) < max(promised):
                out.append(
                    f"{fog_id}: {peer} acked batches {sorted(promised)[-8:]} (cloud ack "
                    f"{acked}), its fetch returned {sorted(fetched)[-8:]}"
                )
        self.held_by = {k: v for k, v in self.held_by.items() if k[0] != fog_id}
        return out

    def _fog_crash(self, fog_id: str) -> None:
        self.fogs[fog_id].crash()
        self.net.down.add(fog_id)
        self.count("fog_crashes")
        down = self.rng.randint(50, max(50, self.mix.down_ms_max))
        self.sched.after(down, f"restart {fog_id}", lambda: self._fog_restart(fog_id))

    def _graceful_stop(self, fog_id: str) -> str:
        """A graceful stop with ``lease.return_on_stop`` (18.1): every live lease retired,
        the last records sealed, what can leave sent; then the fog is down as after a crash."""
        node = self.fogs[fog_id]
        out = node.return_leases(now_ms=self.sched.now_ms, cause="shutdown")
        self._after_fog(fog_id, out, may_crash=False)
        if node.up:
            self._fog_crash(fog_id)
        return "stopped gracefully: " + (", ".join(out.words) or "nothing to give back")

    def _operator_return(self, fog_id: str) -> Callable[[], object]:
        """``fogpay fog return-leases [--owner O]``: the store function the command calls,
        through its own connection to the fog's file (the running core sees the commit at
        its next group, a stopped fog reports at its start)."""

        def give_back() -> object:
            if not self.chaos:
                return None
            self.sched.after(RETURN_EVERY_MS, f"return-leases {fog_id}", give_back)
            node = self.fogs[fog_id]
            if fog_id in self.lost or fog_id in self.dead or self.brng.random() < 0.6:
                return None
            owners = None
            if self.brng.random() < 0.5:
                owners = [self.brng.choice(self.cast.owners).owner_id]
            conn = fog_connect(node.path)
            try:
                retired = returns.retire(
                    conn,
                    now_ms=self.sched.now_ms + node.skew_ms,
                    reason="operator",
                    owner_ids=owners,
                )
            finally:
                conn.close()
            if not retired:
                return None
            self.count("returns_operator", len(retired))
            return f"operator gave back {len(retired)} leases" + (
                f" of {owners[0]}" if owners else ""
            )

        return give_back

    def _fog_restart(self, fog_id: str) -> str | None:
        node = self.fogs[fog_id]
        if node.up or fog_id in self.lost or fog_id in self.dead:
            return None
        cut = fog_id in self.net.cut
        out = node.start(
            now_ms=self.sched.now_ms, connected=not (cut and self.mix.client_partition)
        )
        self.net.down.discard(fog_id)
        held = [h for d in self._all_devices() for h in d.held.values() if h.fog_id == fog_id]
        assert self.checker is not None
        self.fail(self.checker.receipts_durable(fog_id, held))
        if not cut:
            self.net.resubscribe(fog_id)
        self._after_fog(fog_id, out)
        return f"restarted from its file ({len(held)} receipts held by devices: all in it)"

    def _fog_heal(self, fog_id: str) -> str | None:
        if fog_id not in self.net.cut:
            return None
        self.net.cut.discard(fog_id)
        node = self.fogs[fog_id]
        if node.up:
            if self.mix.client_partition:
                self._after_fog(fog_id, node.connected(now_ms=self.sched.now_ms))
            self.net.resubscribe(fog_id)  # (re)subscribed: the retained messages again
        return "link to the cloud back"

    def _after_fog(self, fog_id: str, out: Outputs, *, may_crash: bool = True) -> None:
        """Check the fog's file; maybe crash before its outputs leave; else send them."""
        node = self.fogs[fog_id]
        for alarm in out.alarms:
            key = next((k for k in self.clones if alarm.startswith(_cloned(k))), None)
            if key is None:
                raise Violation(f"{fog_id} core alarm: {'; '.join(out.alarms)}")
            self.clone_caught[key.hex()] = self.clone_caught.get(key.hex(), 0) + 1
        assert self.checker is not None
        for number, holder in out.racced:  # what reached a peer must be booked in the end
            self.checker.racced(fog_id, number)
            self.held_by[(fog_id, number)] = self.held_by.get((fog_id, number), set()) | {holder}
        self.fail(self.checker.fog(fog_id, node.revoked_at))
        self.fail(self.checker.owners())
        crash = may_crash and self.chaos and out.sends
        if crash and self.rng.random() < self.mix.fog_crash / 2:
            self._fog_crash(fog_id)  # committed, and then the power went: nothing published
            self.note(f"{fog_id} crashed before publishing {len(out.sends)} messages")
            return
        for dst, topic, payload in out.sends:
            if dst == CLOUD:
                self.net.send(fog_id, CLOUD, topic, payload)
            elif dst in self.fogs:  # gossip to a peer, over the fog-to-fog link
                self.net.send(fog_id, dst, topic, payload)
            else:
                device = topics.parse(topic).key
                assert device is not None
                self.net.send(fog_id, self.devices[device].name, topic, payload, local=True)
        if out.wake_ms is not None:
            self._want_tick(fog_id, out.wake_ms)

    # ---- events: deliveries -------------------------------------------------------------------

    def _deliver(self, dst: str, topic: str, payload: bytes) -> object:
        if dst == CLOUD:
            return self._at_cloud(topic, payload)
        if dst in self.fogs:
            return self._at_fog(dst, topic, payload)
        return self._at_device(topic, payload)

    def _at_fog(self, fog_id: str, topic: str, payload: bytes) -> object:
        node = self.fogs[fog_id]
        now = self.sched.now_ms
        try:
            parsed = topics.parse(topic)
        except TopicError:
            return "bad topic"
        if parsed.kind is Kind.INTENT:
            assert parsed.key is not None
            out = node.intents([Arrival(parsed.key, payload)], now_ms=now)
            self._after_fog(fog_id, out)
            o = out.outcomes[0]
            return f"{o.status} {o.reason or ''}".strip() + (" replay" if o.replay else "")
        known = set(node.revoked_at)
        out = node.message(topic, payload, now_ms=now)
        for key in set(node.revoked_at) - known:  # stored now (from the cloud or a peer)
            self.revoke_stored.setdefault(key, {}).setdefault(fog_id, now)
        self._after_fog(fog_id, out)
        return ", ".join(out.words) or "ignored"

    def _at_device(self, topic: str, payload: bytes) -> object:
        parsed = topics.parse(topic)
        assert parsed.key is not None
        if parsed.kind is Kind.HELD_ACK:  # the cloud's answer to a held upload
            issuer = public_key(self.cast.issuer)
            devs = [self.devices[parsed.key]]
            if parsed.key in self.clones:
                devs.append(self.clones[parsed.key])
            return "; ".join(f"{d.name} {d.hack(issuer, payload)}" for d in devs)
        words = [self._receipt_at(self.devices[parsed.key], parsed, payload)]
        if parsed.key in self.clones:  # the clone listens on the same topic (same key)
            words.append(self._receipt_at(self.clones[parsed.key], parsed, payload))
        return "; ".join(words)

    def _receipt_at(self, dev: SimDevice, parsed: topics.Topic, payload: bytes) -> str:
        assert parsed.fog_id is not None
        fog_key = public_key(self.cast.fog_keys[parsed.fog_id])
        had = dev.inflight
        credential = self.net.retained.get(topics.fog_topic(parsed.fog_id), b"")
        word = dev.receipt(parsed.fog_id, fog_key, payload, credential)
        if word.startswith("ok"):
            n = int(word[5:])
            held = [h for h in dev.held.values() if (h.fog_id, h.log_index) == (parsed.fog_id, n)]
            assert self.checker is not None
            self.fail(self.checker.receipts_durable(parsed.fog_id, held))
        if had is not None and dev.inflight is None:
            self._wake(dev, self.rng.randint(THINK_MS_MIN, THINK_MS_MAX))
        return f"{dev.name} {word}"

    async def _at_cloud(self, topic: str, payload: bytes) -> object:
        self.cloud.once = []
        word, publish = await self.cloud.handle(topic, payload)
        for t, p in self.cloud.once:  # rbal (18.5): not retained, to the lease's fog
            fog_id = topics.parse(t).fog_id
            assert fog_id is not None
            self.net.send(CLOUD, fog_id, t, p)
        for t, p in [x for x in publish if topics.parse(x[0]).kind is Kind.HELD_ACK]:
            publish.remove((t, p))  # not retained: to the device that uploaded (QoS 1)
            device = topics.parse(t).key
            assert device is not None
            self.net.send(CLOUD, self.devices[device].name, t, p)
        assert self.checker is not None
        self.fail(await self.checker.cloud())
        self.fail(self.checker.owners())
        if self.chaos and self.rng.random() < self.mix.cloud_crash:
            if publish and self.rng.random() < 0.5:
                await self._cloud_crash()
                return f"{word}; cloud crashed before publishing {len(publish)}"
            self.net.publish_retained(publish)
            await self._cloud_crash()
            return f"{word}; cloud crashed"
        self.net.publish_retained(publish)
        return word

    async def _cloud_crash(self) -> None:
        await self.cloud.crash()
        self.net.down.add(CLOUD)
        self.count("cloud_crashes")
        down = self.rng.randint(50, max(50, self.mix.down_ms_max))
        self.sched.after(down, "restart cloud", self._cloud_restart)

    async def _cloud_restart(self) -> str | None:
        if self.cloud.up:
            return None
        retained = await self.cloud.start()
        self.net.down.discard(CLOUD)
        self.net.publish_retained(retained)  # the service publishes its retained state
        return f"restarted from its file ({len(retained)} retained)"

    # ---- events: devices and owners -------------------------------------------------------------

    def _wake(self, dev: SimDevice, delay_ms: int) -> None:
        token = self._wake_token.get(dev.name, 0) + 1
        self._wake_token[dev.name] = token

        def wake() -> object:
            if self._wake_token[dev.name] != token:
                return None  # superseded by a later wake-up
            return self._device_act(dev)

        self.sched.after(delay_ms, f"wake {dev.name}", wake)

    def _device_act(self, dev: SimDevice) -> object:
        if dev.inflight is not None:
            sent = dev.retry()
            if sent is None:
                self.count("payments_given_up")
                if self.chaos:
                    self._wake(dev, self.rng.randint(THINK_MS_MIN, THINK_MS_MAX))
                return "gave up"
            self.net.send(dev.name, dev.inflight.fog_id, *sent, local=True)
            self._wake(dev, RETRY_MS)
            return "retransmit"
        if not self.chaos:
            return None
        fog_id = self.rng.choice(dev.fogs)
        amount = self.rng.randint(1, self.cast.tx_max_micros // 1_000) * 1_000
        payee = self.rng.choice(("payee-a", "payee-b"))
        if dev.clone_of is not None:  # a clone replays the original's latest q elsewhere
            return self._clone_pays(dev, dev.clone_of, amount, payee)
        if dev.name in self.voucher_payers:
            word = self._voucher_act(dev, fog_id)
            if word is not None:
                return word
        topic, raw = dev.pay(fog_id, amount, payee, now_ms=self.sched.now_ms)
        self.count("payments")
        self.net.send(dev.name, fog_id, topic, raw, local=True)
        self._wake(dev, RETRY_MS)
        return f"pays {amount} at {fog_id} q={dev.seq}"

    def _voucher_act(self, dev: SimDevice, fog_id: str) -> str | None:
        """A voucher payer (18.3): pays another device offline against a voucher it holds,
        or asks its fog for a voucher (an intent to the reserved payee), or pays as usual
        (None)."""
        brng, now = self.brng, self.sched.now_ms
        if dev.vouchers and brng.random() < 0.6:
            payees = [d for d in sorted(self.devices.values(), key=lambda d: d.name) if d != dev]
            payee = brng.choice(payees)
            amount = brng.randint(1, 8) * 1_000
            bundle = dev.pay_d2d(payee, amount, now_ms=now)
            if bundle is not None:
                self.count("d2d_signed")
                self._hand_over(bundle, payee)
                word = f"pays {payee.name} {amount} offline"
                if dev.public in self.double_spenders and brng.random() < 0.5:
                    # a copied state: the payer's voucher file as it was before this payment
                    last = dev.d2d_signed[-1]
                    v = dev.vouchers[last.voucher_id]
                    v.seq, v.spent_micros = v.seq - 1, v.spent_micros - amount
                    other = brng.choice(payees)
                    again = dev.pay_d2d(other, amount, now_ms=now, voucher_id=v.voucher_id)
                    if again is not None:
                        self.count("double_spends_planted")
                        self._hand_over(again, other)
                        word += f", and again at s={v.seq} to {other.name} (double spend)"
                self._wake(dev, self.rng.randint(THINK_MS_MIN, THINK_MS_MAX))
                return word
        if all(v.amount_micros - v.spent_micros < 8_000 for v in dev.vouchers.values()):
            if brng.random() < 0.3:
                amount = brng.randint(10, self.cast.tx_max_micros // 1_000) * 1_000
                topic, raw = dev.pay(fog_id, amount, VOUCHER_PAYEE, now_ms=now)
                self.count("voucher_intents")
                self.net.send(dev.name, fog_id, topic, raw, local=True)
                self._wake(dev, RETRY_MS)
                return f"asks a voucher of {amount} at {fog_id} q={dev.seq}"
        return None

    def _hand_over(self, bundle: bytes, payee: SimDevice) -> None:
        """The bundle goes to the payee over a local channel (NFC, BLE): no network."""
        issuer = public_key(self.cast.issuer)

        def accept() -> object:
            word = payee.accept(bundle, issuer_key=issuer, now_ms=self.sched.now_ms)
            self._upload(payee)  # hands in through the held path (17.7) when it can
            return f"{payee.name} {word}"

        self.sched.after(self.brng.randint(1, 200), f"bundle to {payee.name}", accept)

    def _clone_pays(self, clone: SimDevice, orig: SimDevice, amount: int, payee: str) -> object:
        """The clone pays with the sequence number its original used last, at another fog
        of the device's if it has one."""
        used = {p.seq: p.fog_id for p in orig.sent.values()}
        if orig.seq == 0 or orig.seq <= clone.seq:
            self._wake(clone, self.rng.randint(THINK_MS_MIN, 3 * THINK_MS_MAX))
            return None
        others = [f for f in clone.fogs if f != used.get(orig.seq)] or clone.fogs
        fog_id = self.rng.choice(others)
        topic, raw = clone.pay_again(fog_id, orig.seq, amount, payee, now_ms=self.sched.now_ms)
        self.count("clone_payments")
        self.net.send(clone.name, fog_id, topic, raw, local=True)
        self._wake(clone, RETRY_MS)
        return f"{clone.name} pays {amount} at {fog_id} q={clone.seq} (used by its original)"

    def _upload(self, dev: SimDevice) -> None:
        """Schedule ``dev``'s next round of held uploads (one at a time per device)."""
        if dev.name in self._uploading or not dev.to_upload:
            return
        self._uploading.add(dev.name)

        def round_() -> object:
            self._uploading.discard(dev.name)
            if not dev.to_upload:
                return None
            payloads = dev.held_payloads()
            for payload in payloads:  # to the cloud's broker (or over any fog's bridge)
                self.net.send(dev.name, CLOUD, topics.held_topic(dev.public), payload)
            dev.uploads += len(payloads)
            self._upload(dev)
            return f"{dev.name} hands in {len(dev.to_upload)} held receipts"

        self.sched.after(UPLOAD_RETRY_MS if dev.uploads else 100, f"upload {dev.name}", round_)

    def _revoker(self, dev: SimDevice) -> Callable[[], Awaitable[object]]:
        async def revoke() -> object:
            if not self.cloud.up:
                return "cloud down: not revoked"
            owner = self.cast.owner(dev.owner_id)
            rev = Revocation(key=dev.public, time_ms=self.sched.now_ms, reason="lost")
            env = seal(rev, owner.key)
            issuer = public_key(self.cast.issuer)

            async def apply(tx: Tx) -> object:
                return await registry.revoke(tx, issuer, env)

            await self.cloud.transact(apply)
            dev.revoked_ms = self.sched.now_ms
            self.revoke_sent.setdefault(dev.public, self.sched.now_ms)
            self.count("revocations")
            self.net.publish_retained([(topics.revoke_topic(dev.public), env)])
            return "revoked by its owner"

        return revoke


def _cloned(key: bytes) -> str:
    """How a fog core's ``cloned_key`` alarm begins for ``key`` (fog.peers.Clone.describe)."""
    return f"cloned_key: device {key.hex()[:16]}"


def _peers(fog_ids: list[str], fog_id: str) -> tuple[str, ...]:
    """The other fogs, starting after ``fog_id`` (so each fog's first choices differ)."""
    i = fog_ids.index(fog_id)
    return tuple(fog_ids[i + 1 :] + fog_ids[:i])


def run(seed: int, config: SimConfig, *, echo: Callable[[str], None] | None = None) -> Result:
    """One seed in its own event loop and its own files (on /dev/shm when there is one: the
    durability model is the transaction boundary, not the disk, so tmpfs loses nothing)."""
    base = "/dev/shm" if Path("/dev/shm").is_dir() else None
    with tempfile.TemporaryDirectory(prefix="fogpay-sim-", dir=base) as d:
        return asyncio.run(Simulation(seed, Path(d), config, echo=echo).run())


def quiet_logs() -> None:
    """The cores log every lease and batch through structlog: thousands of lines per seed
    that only cost time here."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))


def _run_one(args: tuple[int, SimConfig]) -> Result:
    return run(*args)


def run_many(seeds: Sequence[int], config: SimConfig, *, jobs: int = 1) -> Iterator[Result]:
    """``run`` for each seed, in order; ``jobs`` > 1 spreads them over that many processes
    (each seed is still one deterministic run: only the wall time changes)."""
    if jobs <= 1:
        for seed in seeds:
            yield run(seed, config)
        return
    ctx = multiprocessing.get_context("spawn")  # no fork of a process with threads
    with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=quiet_logs) as pool:
        yield from pool.map(_run_one, [(seed, config) for seed in seeds], chunksize=4)
