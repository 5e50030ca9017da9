"""``fogpay demo --fogs N [--cut-uplink SECONDS]``: the demo with N fogs, in one process.

The topology is production's (``deploy/mosquitto/fogpay-bridge.conf``, docs/protocol.md
17.10) on embedded brokers: each fog with its own broker (its devices pay there), a **hub**
broker where the cloud's service connects, and a bridge per fog to the hub
(``runtime.bridge``: amqtt has none) carrying what the Mosquitto bridge carries. Each fog's
config names the others as ``federation.peers``; gossip between fogs crosses the hub.

The devices are dealt to the fogs in turn (device ``i`` pays at fog ``i mod N``), so every
fog serves devices of most owners; each paying owner gets a first lease at every fog that
serves one of its devices (its credit split between them). With ``--cut-uplink S``, fog-a's
bridge to the hub is cut (``Bridge.pause``) for S seconds, midway through the payments: fog-a
keeps authorizing on the leases it holds, its batches and lease requests wait in its broker's
bridge queue; then the link heals (``resume``) and everything reconciles.
"""

import asyncio
import contextlib
import secrets
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Final

import nacl.signing
import structlog
from rich.console import Console

from cloud import leases, registry
from cloud.core import CloudCore
from cloud.store import Store, Tx
from edge.device import Device, DeviceSession
from fog.broker import BrokerProcess
from fog.config import BrokerConfig, FederationConfig, FogConfig, UplinkConfig
from fog.daemon import FogDaemon
from fogpay import demo_budget, demo_live
from fogpay import demo_cast as cast
from fogpay import demo_setup as setup
from fogpay.demo_pay import Outcomes, run_payments
from fogpay.demo_run import mqtt_client, now_ms, trust_expected, wait_for
from fogpay.provision import BrokerAddress
from fogpay.running import running, with_ready
from protocol import topics
from protocol.batch import decode_batch
from protocol.errors import FogpayError
from protocol.signing import public_key
from runtime.bridge import Bridge, BridgeConfig, Rule
from runtime.keyfile import new_key_file
from runtime.mqttshell import ClientSettings

log = structlog.get_logger()

FOGS_MAX: Final = 8
FOGS_DIR: Final = "fogs"
HUB_USERNAME: Final = "hub"
# After a cut the fog's unacked batches go up from the bridge's queue at once; this is how
# long the fog waits for an ack before it sends them again (the default, 10 s, is for WANs).
ACK_TIMEOUT_MS: Final = 2_000
REPLICAS_TABLE: Final = "replicas"
# fog-a (the fog whose uplink a cut takes down) lives on small leases of the owners it shares
# with other fogs: a first lease of 5 units, top-ups of 5 when under 2.50. nordfleet's two EVs
# there draw about 4.50 EUR a second, so a cut finds fog-a short of nordfleet's budget within
# about a second, and it borrows from its peer (lease.peer_transfers, docs/protocol.md 18.2)
# instead of declining. Its lease requests are sent three times before they are forgotten, so
# a silent cloud is noticed ("stalled") for longer. The cloud's cap of four live leases per
# fog and owner (20 units here) is silent too: a longer run borrows after it as well.
CUT_FOG_FIRST_MICROS: Final = 5_000_000
CUT_FOG_LEASES: Final = replace(
    setup.LEASES,
    request_below_micros=2_500_000,
    request_micros=5_000_000,
    request_attempts_max=3,
)


def fog_ids(n: int) -> tuple[str, ...]:
    """``fog-a``, ``fog-b``... (one fog keeps the demo's ``depot-fog``)."""
    assert 1 <= n <= FOGS_MAX
    return (cast.FOG_ID,) if n == 1 else tuple(f"fog-{chr(ord('a') + i)}" for i in range(n))


def fog_of(device_index: int, ids: Sequence[str]) -> str:
    return ids[device_index % len(ids)]


def bridge_rules(fog_id: str, peers: Sequence[str]) -> tuple[Rule, ...]:
    """What ``deploy/mosquitto/fogpay-bridge.conf`` carries for ``fog_id``; gossip out only to
    the named peers (disjoint from the gossip in: nothing to echo), acks, trust and leases
    kept retained (amqtt clears the flag on live delivery; the protocol retains them)."""
    return cloud_rules(fog_id) + peer_rules(fog_id, peers)


def cloud_rules(fog_id: str) -> tuple[Rule, ...]:
    """The part of the bridge that reaches the cloud: what ``--cut-uplink`` cuts."""
    root = topics.ROOT
    out = [f"{root}/up/{fog_id}/{k}" for k in ("batch", "lreq", "lrep", "relay", "xfer")]
    out += [f"{root}/held/+/records"]
    return (
        *(Rule(f, "out") for f in out),
        Rule(topics.ACK_FILTER, "in", retain=True),
        Rule(topics.TRUST_FILTER, "in", retain=True),
        Rule(f"{root}/{fog_id}/lease/#", "in", retain=True),
        Rule(f"{root}/held/+/ack", "in"),
    )


def peer_rules(fog_id: str, peers: Sequence[str]) -> tuple[Rule, ...]:
    """The part between the fogs (gossip: replicas, ``xreq``, ``xfer``): a bridge of its own,
    so a cut uplink leaves the fogs in reach of each other (a WAN to the cloud down, the
    fogs' network up), which peer transfers need (docs/protocol.md 18.2)."""
    root = topics.ROOT
    return (
        *(Rule(f"{root}/gossip/{p}/#", "out") for p in peers),
        Rule(f"{root}/gossip/{fog_id}/#", "in"),
    )


@dataclass(slots=True)
class Fog:
    fog_id: str
    key: nacl.signing.SigningKey
    config: FogConfig
    daemon: FogDaemon | None = None
    bridge: Bridge | None = None  # to the hub, toward the cloud: the one a cut pauses
    peer_bridge: Bridge | None = None  # to the hub, toward the other fogs


@dataclass(slots=True)
class Cut:
    """The partition: fog ``fog_id``'s bridge to the hub, down from ``start_ms`` to ``end_ms``
    (wall clock)."""

    fog_id: str
    seconds: float
    start_ms: int = 0
    end_ms: int = 0


@dataclass(slots=True)
class FedResult:
    outcomes: Outcomes
    all_booked: bool
    sealed: int
    fogs: list[Fog]
    cut: Cut | None
    d2d: demo_budget.D2D
    returned: list[bytes]
    bridged: dict[str, dict[str, int]] = field(default_factory=dict)


def make_fogs(out: Path, ids: Sequence[str], keys: setup.Keys) -> list[Fog]:
    """Each fog's directory ``DIR/fogs/FOG_ID/`` (store, key) and config; the first fog's key
    is the demo's ``DIR/fog.key``."""
    fogs = []
    for n, fog_id in enumerate(ids):
        d = out / FOGS_DIR / fog_id
        d.mkdir(mode=0o700, parents=True)
        key_file = out / setup.FOG_KEY_FILE if n == 0 else d / setup.FOG_KEY_FILE
        key = keys.fog if n == 0 else new_key_file(key_file)
        broker = BrokerConfig(
            host=setup.HOST,
            port=0,
            username=setup.FOG_USERNAME,
            password=secrets.token_urlsafe(setup.PASSWORD_BYTES),
            device_username=setup.DEVICE_USERNAME,
            device_password=secrets.token_urlsafe(setup.PASSWORD_BYTES),
        )
        config = FogConfig(
            fog_id=fog_id,
            key_file=key_file,
            issuer_key=public_key(keys.issuer),
            db=d / setup.FOG_DB_FILE,
            broker=broker,
            batch=setup.BATCH,
            lease=replace(setup.LEASES if n > 0 else CUT_FOG_LEASES, peer_transfers=len(ids) > 1),
            uplink=UplinkConfig(ack_timeout_ms=ACK_TIMEOUT_MS),
            federation=FederationConfig(peers=tuple(p for p in ids if p != fog_id)),
        )
        fogs.append(Fog(fog_id, key, config))
    return fogs


def open_devices(out: Path, fogs: Sequence[Fog]) -> dict[str, Device]:
    ids = [f.fog_id for f in fogs]
    keys = {f.fog_id: public_key(f.key) for f in fogs}
    devices = {}
    for i, d in enumerate(cast.devices()):
        fog_id = fog_of(i, ids)
        devices[d.name] = Device.open(
            out / setup.DEVICES_DIR / d.name, fog_id=fog_id, fog_key=keys[fog_id]
        )
    return devices


def first_leases(ids: Sequence[str]) -> list[tuple[str, str, int]]:
    """(owner, fog, amount) of the first leases: at every fog serving one of the owner's
    devices, the policy's first lease or the owner's credit split between those fogs; at most
    CUT_FOG_FIRST_MICROS at the first fog when the owner has others."""
    serving: dict[str, list[str]] = {}
    for i, d in enumerate(cast.devices()):
        fogs = serving.setdefault(d.group.owner_id, [])
        if fog_of(i, ids) not in fogs:
            fogs.append(fog_of(i, ids))
    out = []
    for o in cast.PAYERS:
        fogs = serving.get(o.owner_id, [])
        for fog_id in fogs:
            amount = min(setup.LEASE_POLICY.initial_micros, o.limit_micros // len(fogs))
            if fog_id == ids[0] and len(fogs) > 1:  # the cut fog: small leases (above)
                amount = min(amount, CUT_FOG_FIRST_MICROS)
            out.append((o.owner_id, fog_id, amount))
    return out


async def register_fogs(store: Store, issuer: nacl.signing.SigningKey, fogs: Sequence[Fog]) -> None:
    """The fogs besides the first (``setup.register_world`` registered that one with its
    world) and every first lease."""
    now_ms = time.time_ns() // 1_000_000
    ids = [f.fog_id for f in fogs]

    async def fn(tx: Tx) -> None:
        for f in fogs[1:]:
            await registry.add_fog(
                tx, issuer, fog_id=f.fog_id, key=public_key(f.key), now_ms=now_ms
            )
        for owner_id, fog_id, amount in first_leases(ids):
            await leases.grant(
                tx,
                issuer,
                owner_id=owner_id,
                fog_id=fog_id,
                amount_micros=amount,
                now_ms=now_ms,
                policy=setup.LEASE_POLICY,
            )

    await store.transact(fn)


def hub_config() -> BrokerConfig:
    return BrokerConfig(
        host=setup.HOST,
        port=0,
        username=HUB_USERNAME,
        password=secrets.token_urlsafe(setup.PASSWORD_BYTES),
        device_password="",
    )


def client_settings(port: int, username: str, password: str, name: str) -> ClientSettings:
    return ClientSettings(
        hostname=setup.HOST,
        port=port,
        identifier_prefix=f"fogpay-demo-{name}",
        username=username,
        password=password,
    )


async def cloud_totals(store: Store) -> tuple[int, int]:
    """(batches, records) the cloud has booked, every fog together."""

    async def fn(tx: Tx) -> tuple[int, int]:
        b = await tx.fetchone("SELECT COUNT(*) FROM batches")
        r = await tx.fetchone("SELECT COUNT(*) FROM records")
        assert b is not None and r is not None
        return int(b[0]), int(r[0])

    result: tuple[int, int] = await store.transact(fn)
    return result


async def _cutting(cut: Cut, bridge: Bridge, after_s: float) -> None:
    await asyncio.sleep(after_s)
    bridge.pause()
    cut.start_ms = time.time_ns() // 1_000_000
    log.info("demo_uplink_cut", fog_id=cut.fog_id, seconds=cut.seconds)
    await asyncio.sleep(cut.seconds)
    bridge.resume()
    cut.end_ms = time.time_ns() // 1_000_000
    log.info("demo_uplink_healed", fog_id=cut.fog_id, queued=bridge.queued("remote"))


async def pay_and_book(
    out: Path,
    store: Store,
    issuer: nacl.signing.SigningKey,
    fogs: list[Fog],
    devices: dict[str, Device],
    seconds: float,
    *,
    cut_s: float,
    book_wait_s: float,
    progress: Console | None = None,
) -> FedResult:
    """Hub, fogs, bridges, cloud service and devices: pay (cutting fog-a's uplink midway if
    asked), heal, then wait until every sealed batch of every fog is booked."""
    from cloud.service import CloudService  # the MQTT shell: only when running

    hub_cfg = hub_config()
    hub = BrokerProcess(hub_cfg)
    await hub.start()
    cut = Cut(fogs[0].fog_id, cut_s) if cut_s > 0 else None
    try:
        async with contextlib.AsyncExitStack() as stack:
            for f in fogs:
                f.daemon = FogDaemon(f.config, fog_key=f.key)
                await stack.enter_async_context(
                    running(f"demo.fog.{f.fog_id}", with_ready(f.daemon.run), f.daemon.stop)
                )
                b = f.config.broker
                peers = f.config.federation.peers
                for part, rules in (
                    ("", cloud_rules(f.fog_id)),
                    ("-peers", peer_rules(f.fog_id, peers)),
                ):
                    name = f"{f.fog_id}{part}"
                    bridge = Bridge(
                        BridgeConfig(
                            name=name,
                            local=client_settings(
                                f.daemon.broker_port, b.username, b.password, name
                            ),
                            remote=client_settings(
                                hub.port, hub_cfg.username, hub_cfg.password, f"hub-{name}"
                            ),
                            rules=rules,
                        )
                    )
                    if part:
                        f.peer_bridge = bridge
                    else:
                        f.bridge = bridge
                    await stack.enter_async_context(
                        running(f"demo.bridge.{name}", with_ready(bridge.run), bridge.stop)
                    )
            core = CloudCore(store=store, issuer=issuer, clock=now_ms, policy=setup.LEASE_POLICY)
            service = CloudService(
                core=core,
                broker_host=setup.HOST,
                broker_port=hub.port,
                username=hub_cfg.username,
                password=hub_cfg.password,
                clock=now_ms,
                store=store,
            )
            await stack.enter_async_context(
                running("demo.cloud", with_ready(service.run), service.stop)
            )
            expected = trust_expected() | {"fog_accepted": len(fogs)}
            leases_at = {f.fog_id: 0 for f in fogs}
            for _, fog_id, _ in first_leases([f.fog_id for f in fogs]):
                leases_at[fog_id] += 1

            async def trusted() -> bool:
                for f in fogs:
                    assert f.daemon is not None
                    c = f.daemon.counters
                    want = expected | {"lease_accepted": leases_at[f.fog_id]}
                    if not all(c.get(k, 0) >= v for k, v in want.items()):
                        return False
                return True

            if not await wait_for("fog_trust_loaded", trusted, 20.0):
                raise FogpayError("the fogs did not load the cloud's trust material in time")
            log.info("demo_trust_loaded", fogs=len(fogs))
            sessions: dict[str, DeviceSession] = {}
            for f in fogs:
                assert f.daemon is not None
                account = BrokerAddress(
                    setup.HOST,
                    f.daemon.broker_port,
                    setup.DEVICE_USERNAME,
                    f.config.broker.device_password,
                )
                client = await stack.enter_async_context(
                    mqtt_client(account, f"devices-{f.fog_id}")
                )
                session = DeviceSession(
                    client, fog_id=f.fog_id, fog_key=public_key(f.key), wildcard=True
                )
                sessions[f.fog_id] = await stack.enter_async_context(session)
            by_device = {name: sessions[d.fog_id] for name, d in devices.items()}
            plan = list(cast.plan_payments(seconds))
            outcomes = Outcomes()
            cutter = None
            if cut is not None:
                assert fogs[0].bridge is not None
                after = max(0.0, (seconds - cut.seconds) / 2)
                cutter = asyncio.create_task(_cutting(cut, fogs[0].bridge, after))
            async with demo_live.showing(
                outcomes, seconds=seconds, planned=len(plan), console=progress
            ):
                await run_payments(sessions[fogs[0].fog_id], devices, plan, outcomes, by_device)
            if cutter is not None:
                await cutter  # healed before the books are awaited
            payer = devices[demo_budget.D2D_PAYER]
            payer_fog = next(f for f in fogs if f.fog_id == payer.fog_id)
            assert payer_fog.daemon is not None
            payer_account = BrokerAddress(
                setup.HOST,
                payer_fog.daemon.broker_port,
                setup.DEVICE_USERNAME,
                payer_fog.config.broker.device_password,
            )
            d2d = await demo_budget.obtain_and_pay(
                out, payer_account, payer, public_key(issuer), cast.EUR, outcomes
            )
            log.info("demo_payments_done", sent=outcomes.sent, **dict(outcomes.by_status))

            def totals() -> tuple[int, int]:
                authorized = sealed = 0
                for f in fogs:
                    assert f.daemon is not None
                    authorized += f.daemon.counters.get("intent_authorized", 0)
                    sealed += f.daemon.counters.get("batch_sealed", 0)
                return authorized, sealed

            async def booked() -> bool:
                batches, records = await cloud_totals(store)
                authorized, sealed = totals()
                return records == authorized and batches == sealed

            all_booked = await wait_for("batches_booked", booked, book_wait_s)
            returned = await demo_budget.return_leases([f.config.db for f in fogs])

            async def closed() -> bool:
                return await demo_budget.closed_count(store, returned) == len(returned)

            all_closed = await wait_for("leases_closed", closed, book_wait_s)
            handed_in = await demo_budget.hand_in(d2d, payer_account, public_key(issuer))
            log.info("demo_budget_moved", leases_closed=all_closed, d2d_handed_in=handed_in)
            sealed = totals()[1]
            bridged = {f.fog_id: f.bridge.forwarded for f in fogs if f.bridge is not None}
    finally:
        await hub.stop()
    return FedResult(outcomes, all_booked, sealed, fogs, cut, d2d, returned, bridged)


def offline_authorized(devices: dict[str, Device], cut: Cut | None) -> int:
    """Ok receipts the cut fog signed while its uplink was down (fog time in the window)."""
    if cut is None or cut.end_ms == 0:
        return 0
    return sum(
        1
        for d in devices.values()
        if d.fog_id == cut.fog_id
        for r in d.receipts()
        if r.msg.ok and cut.start_ms <= r.msg.time_ms <= cut.end_ms
    )


def replicated_records(fogs: Sequence[Fog]) -> int:
    """Records of other fogs' batches each fog holds as a replica (its ``replicas`` table, if
    the fog's store has one; 0 otherwise).

    TODO(lead): the table comes with the replica helper's work; this reads it by shape: a
    record-count column (``records``/``record_count``) if there is one, else it decodes the
    ``wire`` column; the origin column is ``origin``/``origin_fog``/``fog_id``/``f``."""
    total = 0
    for f in fogs:
        try:
            total += _replicated_at(f.config.db, f.fog_id)
        except sqlite3.Error as exc:  # a store the fog left unreadable: counted as none
            log.warning("demo_replicas_unread", fog_id=f.fog_id, error=str(exc))
    return total


def _replicated_at(path: Path, fog_id: str) -> int:
    if not path.exists():
        return 0
    total = 0
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        columns = [r[1] for r in db.execute(f"PRAGMA table_info({REPLICAS_TABLE})")]
        if not columns:
            return 0
        origin = next((c for c in ("origin", "origin_fog", "fog_id", "f") if c in columns), None)
        where, params = (f"WHERE {origin} != ?", (fog_id,)) if origin else ("", ())
        count = next((c for c in ("records", "record_count", "n_records") if c in columns), None)
        if count is not None:
            row = db.execute(f"SELECT SUM({count}) FROM {REPLICAS_TABLE} {where}", params)
            return int(row.fetchone()[0] or 0)
        if "wire" in columns:
            for (wire,) in db.execute(f"SELECT wire FROM {REPLICAS_TABLE} {where}", params):
                with contextlib.suppress(FogpayError, ValueError):
                    total += len(decode_batch(bytes(wire))[1])
    return total
