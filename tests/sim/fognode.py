"""One simulated fog: the real ``fog.core.FogCore`` over its real ``FogStore`` file.

This is the ONE adapter between the simulation and the fog: it plays the daemon's shell.
Inputs go in with ``now_ms`` from the virtual clock (``mono_ms`` is left out: the core then
times its resends on ``now_ms``, and the virtual clock never steps back); outputs come back
sorted for the simulation: messages to send (receipts to devices; batches, lease requests
and reports to the cloud), the earliest ``Wake`` the core asked for, and words for the trace.
An ``Alarm`` (a part of the core failed at its seam) is returned too: in a run without disk
errors every one is a bug, and the simulation reports it as a violation.

A crash drops every object (the store's connection, the core's memory: uplink window, lease
requests and reports in flight, notes, rate buckets); a restart reopens the core from its
file, as systemd restarting the daemon would.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import nacl.signing

from fog import core, restore
from fog.authorize import Policy
from fog.config import BatchConfig, FederationConfig, LeaseConfig, UplinkConfig
from fog.core import CoreConfig, FogCore, FogInput
from fog.replicas import ReplicaEvent
from fog.store import Arrival, FogStore, Outcome
from protocol import topics
from protocol.errors import TopicError
from protocol.messages import Revocation
from protocol.signing import open_message, public_key
from protocol.voucher import voucher_for
from tests.sim.network import label

DEVICE: Final = "device"  # outbox destination: the device named by the receipt topic
CLOUD: Final = "cloud"
Send = tuple[str, str, bytes]  # (destination, topic, payload)


@dataclass(frozen=True, slots=True)
class FogSettings:
    """What ``fog.toml`` would say ([batch], [uplink], [lease], [policy]), sized for the sim."""

    records_max: int = 4
    age_ms: int = 2_000
    keep_acked_ms: int = 0  # 0: never prune
    window: int = 4
    ack_timeout_ms: int = 3_000
    request_below_micros: int = 20_000
    request_micros: int = 100_000
    request_timeout_ms: int = 2_000
    request_attempts_max: int = 3
    report_retry_ms: int = 500
    check_interval_ms: int = 1_000
    relay_after_ms: int = 5_000
    replica_keep_ms: int = 10_000
    return_idle_ms: int = 0  # 18.1: give back an idle owner's leases (0: off)
    return_on_stop: bool = False  # 18.1: give back every live lease at a graceful stop
    peer_transfers: bool = False  # 18.2: ask peers for budget while the cloud is silent
    policy: Policy = field(default_factory=lambda: Policy(rate_per_s=50.0, rate_burst=50))

    def core_config(
        self, fog_id: str, issuer_key: bytes, peers: tuple[str, ...] = (), replicas: int = 2
    ) -> CoreConfig:
        return CoreConfig(
            fog_id=fog_id,
            issuer_key=issuer_key,
            policy=self.policy,
            batch=BatchConfig(
                records_max=self.records_max, age_ms=self.age_ms, keep_acked_ms=self.keep_acked_ms
            ),
            uplink=UplinkConfig(window=self.window, ack_timeout_ms=self.ack_timeout_ms),
            lease=LeaseConfig(
                request_below_micros=self.request_below_micros,
                request_micros=self.request_micros,
                request_timeout_ms=self.request_timeout_ms,
                request_attempts_max=self.request_attempts_max,
                report_retry_ms=self.report_retry_ms,
                check_interval_ms=self.check_interval_ms,
                return_idle_ms=self.return_idle_ms,
                return_on_stop=self.return_on_stop,
                peer_transfers=self.peer_transfers,
            ),
            federation=FederationConfig(
                peers=peers,
                replicas=min(replicas, len(peers)),
                relay_after_ms=self.relay_after_ms,
                replica_keep_ms=self.replica_keep_ms,
            ),
        )


@dataclass(slots=True)
class Outputs:
    sends: list[Send] = field(default_factory=list)
    wake_ms: int | None = None
    words: list[str] = field(default_factory=list)
    alarms: list[str] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)
    racced: list[tuple[int, str]] = field(default_factory=list)  # (our batch, its holder)


class FogNode:
    def __init__(
        self,
        *,
        fog_id: str,
        key: nacl.signing.SigningKey,
        issuer_key: bytes,
        path: Path,
        settings: FogSettings,
        skew_ms: int = 0,
        peers: tuple[str, ...] = (),
        replicas: int = 2,
    ) -> None:
        """``skew_ms``: this fog's clock minus the simulation's (every ``now_ms`` given to a
        method is the simulation's; the core sees its own clock, and ``Outputs.wake_ms`` is
        given back in the simulation's time)."""
        self.fog_id, self.path, self.settings = fog_id, path, settings
        self.skew_ms = skew_ms
        self._key = key
        self.peers = peers
        self._config = settings.core_config(fog_id, issuer_key, peers, replicas)
        self.core: FogCore | None = None
        self.revoked_at: dict[bytes, int] = {}  # key -> when this fog accepted its revocation
        self.starts = 0
        self.last_fetched = 0  # the last batch number a fetch to this fog was answered with

    @property
    def up(self) -> bool:
        return self.core is not None

    # ---- life -----------------------------------------------------------------------------

    def start(self, *, now_ms: int, connected: bool) -> Outputs:
        """Open the core from its file; ``connected``: its MQTT client is up at once."""
        self.core = FogCore.open(self.path, config=self._config, fog_key=self._key)
        self.starts += 1
        return self.connected(now_ms=now_ms) if connected else Outputs()

    def crash(self) -> None:
        """Drop everything in memory; committed transactions stay in the file."""
        assert self.core is not None
        self.core.store.close()
        self.core = None

    def destroy(self) -> None:
        """The disk is gone: the file and its WAL are deleted (the fog is down)."""
        assert self.core is None
        for suffix in ("", "-wal", "-shm"):
            Path(f"{self.path}{suffix}").unlink(missing_ok=True)
        self.revoked_at.clear()

    def restore(
        self, wires: list[bytes], ack: bytes | None, retired: list[bytes], *, now_ms: int
    ) -> int:
        """``fogpay fog restore``: a new file with the batches of ours the peers held (raises
        ``fog.restore.RestoreError`` if the chain head is lost); the records imported."""
        assert self.core is None and not self.path.exists()
        fog_ms = now_ms + self.skew_ms
        cfg = self._config
        acked = restore.cloud_ack_number(ack, fog_id=self.fog_id, issuer=cfg.issuer_key)
        plan = restore.plan(
            wires, fog_id=self.fog_id, fog_public=public_key(self._key), cloud_acked=acked
        )
        store = FogStore.open(
            self.path,
            fog_id=self.fog_id,
            fog_key=self._key,
            issuer_key=cfg.issuer_key,
            policy=cfg.policy,
        )
        try:
            return restore.import_into(
                store.connection, plan, retired_leases=retired, now_ms=fog_ms
            )
        finally:
            store.close()

    @property
    def key(self) -> nacl.signing.SigningKey:
        return self._key

    def connected(self, *, now_ms: int) -> Outputs:
        return self._handle(core.Connected(now_ms=now_ms + self.skew_ms))

    def disconnected(self, *, now_ms: int) -> Outputs:
        return self._handle(core.Disconnected(now_ms=now_ms + self.skew_ms))

    # ---- inputs -----------------------------------------------------------------------------

    def intents(self, arrivals: list[Arrival], *, now_ms: int) -> Outputs:
        out = self._handle(core.Intents(arrivals=tuple(arrivals), now_ms=now_ms + self.skew_ms))
        # the daemon's shell (fog/daemon.py _publish_one): after the ok receipt of a voucher
        # intent, the vch on the same topic (docs/protocol.md 18.3)
        receipts = [i for i, (dst, _, _) in enumerate(out.sends) if dst == DEVICE]
        vchs = []
        for i, a, o in zip(receipts, arrivals, out.outcomes, strict=True):
            vch = voucher_for(a.payload, o.receipt, self._key) if o.status == "ok" else None
            if vch is not None:
                vchs.append((i + 1, (DEVICE, out.sends[i][1], vch)))
        for at, send in reversed(vchs):
            out.sends.insert(at, send)
        return out

    def message(self, topic: str, payload: bytes, *, now_ms: int) -> Outputs:
        fog_ms = now_ms + self.skew_ms
        out = self._handle(core.TrustMessage(topic=topic, payload=payload, now_ms=fog_ms))
        try:
            parsed: topics.Topic | None = topics.parse(topic)
        except TopicError:
            parsed = None
        if not out.words and not payload:
            out.words.append("cleared (nothing to close)")
        if parsed is not None and parsed.lease_id is not None:  # name the lease in the trace
            out.words = [f"lease {parsed.lease_id.hex()[:8]}: {w}" for w in out.words]
        if "revoke accepted" in out.words and parsed is not None:
            key = parsed.key
            if parsed.kind is topics.Kind.GOSSIP_REVOKE:  # a peer's, byte for byte (17.5)
                key = open_message(payload, Revocation)[0].key
            if key is not None:
                self.revoked_at.setdefault(key, fog_ms)  # fog time, as the log's at_ms
        return out

    def return_leases(self, *, now_ms: int, cause: str, owner_id: str | None = None) -> Outputs:
        """Give back the live leases (18.1): a graceful stop (``shutdown``) or the operator."""
        fog_ms = now_ms + self.skew_ms
        return self._handle(core.ReturnLeases(now_ms=fog_ms, owner_id=owner_id, cause=cause))

    def tick(self, *, now_ms: int) -> Outputs:
        return self._handle(core.Tick(now_ms=now_ms + self.skew_ms))

    def _handle(self, event: FogInput) -> Outputs:
        assert self.core is not None
        out = Outputs()
        for o in self.core.handle(event):
            match o:
                case core.Receipt():
                    out.sends.append((DEVICE, o.topic, o.payload))
                    out.outcomes.append(o.outcome)
                case core.BatchSend() | core.LeaseRequest() | core.LeaseReport():
                    out.sends.append((CLOUD, o.topic, o.payload))
                    out.words.append(_describe(o))
                case core.Wake():
                    at = o.mono_ms - self.skew_ms
                    out.wake_ms = at if out.wake_ms is None else min(out.wake_ms, at)
                case core.TrustLoaded():
                    word = f"{o.msg_type or 'message'} {o.status}"
                    refused = o.status == "refused"
                    if o.msg_type in ("seen", "xreq", "xfer") and refused:  # say why
                        word += f" ({o.reason}: {o.detail})"
                    out.words.append(word)
                case core.LeaseClosed():
                    out.words.append("lease closed")
                case core.Sealed():
                    out.words.append(f"sealed batch {o.number} ({o.records} records)")
                case core.Pruned():
                    out.words.append(f"pruned {o.records}")
                case core.Alarm():
                    out.alarms.append(f"{o.event}: {o.error}")
                case core.Publish():  # gossip to a peer, or a relay to the cloud
                    parsed = topics.parse(o.topic)
                    # up/{x}/relay and up/{x}/xfer go to the cloud; gossip/{to}/... to fog to
                    up = parsed.kind in (topics.Kind.RELAY, topics.Kind.TRANSFER)
                    dst = CLOUD if up else parsed.fog_id
                    assert dst is not None
                    out.sends.append((dst, o.topic, o.payload))
                    out.words.append(f"{label(o.topic)} to {dst}")
                case ReplicaEvent():
                    if o.event == "replica_acked":
                        out.racced.append((o.number, o.origin))  # origin: the holder here
                    if o.event == "replica_fetched":
                        self.last_fetched = o.number
                    transient = o.event == "replica_refused" and "unknown fog" in o.detail
                    if o.event in ("replica_fork", "replica_full", "replica_refused") and not (
                        transient
                    ):
                        out.alarms.append(f"{o.event}: {o.origin} {o.number} {o.detail}")
                    elif o.event != "replica_duplicate":
                        out.words.append(f"{o.event} {o.origin} {o.number}")
                case core.Counters():
                    pass
        return out

    # ---- for the simulation's quiet test --------------------------------------------------

    def idle(self) -> bool:
        """Nothing left to send up: every sealed batch acked, every report cleared."""
        assert self.core is not None
        store = self.core.store
        return not store.unacked_numbers(1) and not store.lease_reports_open()


def _describe(o: core.BatchSend | core.LeaseRequest | core.LeaseReport) -> str:
    if isinstance(o, core.BatchSend):
        return f"send batch {o.number}"
    if isinstance(o, core.LeaseRequest):
        return f"{'resend' if o.resend else 'send'} lreq {o.owner_id}"
    return f"{'resend' if o.resend else 'send'} lrep {o.lease_id.hex()[:8]}"
