"""The whole pipeline in one test: a cloud (real SQLite or PostgreSQL store, CloudCore,
CloudService) and fogs (real FogDaemon, in-process or as a subprocess) on one real broker;
devices registered with the cloud, whose trust material reaches the fogs only through the
cloud's retained publications. Nothing of ours is replaced."""

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nacl.signing

from cloud import ledger, registry
from cloud.core import CloudCore
from cloud.leases import LeasePolicy
from cloud.proof import build_proof, verify_proof
from cloud.service import CloudService, wall_ms
from cloud.store import Store, Tx
from protocol.signing import public_key
from runtime.keyfile import write_key_file
from tests.cloud.world import World, new_key
from tests.conftest import BrokerEndpoint
from tests.integration.devices import Device

FOG_EXTRA = """
[batch]
records_max = 16
age_ms = 100

[policy]
rate_per_s = 1000
rate_burst = 1000

[uplink]
window = 8
ack_timeout_ms = 1500

[lease]
request_below_micros = 1000
request_micros = 50000
request_timeout_ms = 1000
report_retry_ms = 300
check_interval_ms = 100
"""


@dataclass
class Pipeline:
    store: Store
    broker: BrokerEndpoint
    directory: Path
    policy: LeasePolicy = field(default_factory=lambda: LeasePolicy(20_000, 100_000, 3_600_000))
    world: World = field(init=False)
    fog_keys: dict[str, nacl.signing.SigningKey] = field(default_factory=dict)
    fog_broker: BrokerEndpoint | None = None  # the fogs' and devices' broker, if not the cloud's

    def __post_init__(self) -> None:
        self.world = World(self.store, now=wall_ms())

    @property
    def edge(self) -> BrokerEndpoint:
        """The broker fogs and devices use."""
        return self.fog_broker or self.broker

    @property
    def issuer(self) -> bytes:
        return public_key(self.world.issuer)

    def core(self) -> CloudCore:
        return CloudCore(
            store=self.store, issuer=self.world.issuer, clock=wall_ms, policy=self.policy
        )

    def service(self, core: CloudCore | None = None) -> CloudService:
        return CloudService(
            core=core or self.core(),
            broker_host=self.broker.host,
            broker_port=self.broker.port,
            username=self.broker.username,
            password=self.broker.password,
            store=self.store,
            stats_s=1.0,
        )

    async def owner(self, owner_id: str, limit: int) -> None:
        self.world.now = wall_ms()
        await self.world.owner(owner_id, limit=limit)

    async def fog(self, fog_id: str, *, extra: str = FOG_EXTRA) -> Path:
        """Register a fog with the cloud and write its key and config; returns the config."""
        key = new_key()
        self.fog_keys[fog_id] = key
        d = self.directory / fog_id
        d.mkdir()
        write_key_file(d / "fog.key", key)
        now = wall_ms()
        await self.store.transact(
            lambda tx: registry.add_fog(
                tx, self.world.issuer, fog_id=fog_id, key=public_key(key), now_ms=now - 1000
            )
        )
        config = d / "fog.toml"
        config.write_text(
            f'fog_id = "{fog_id}"\nkey_file = "{d / "fog.key"}"\n'
            f'issuer_key = "{self.issuer.hex()}"\ndb = "{d / "fog.sqlite"}"\n'
            f"stats_interval_s = 0.5\n{extra}\n"
            f'[broker]\nurl = "{self.edge.url}"\n'
        )
        return config

    async def device(self, owner_id: str, fog_id: str) -> Device:
        self.world.now = wall_ms()
        key = await self.world.device(owner_id)
        return Device(fog_id, key=key)

    async def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        async def q(tx: Tx) -> list[Any]:
            return list(await tx.fetchall(sql, params))

        rows: list[Any] = await self.store.transact(q)
        return rows

    async def booked(self, intent_ids: list[bytes]) -> dict[bytes, int]:
        """How many transfers each intent id has in the ledger."""
        rows = await self.query("SELECT intent_id FROM transfers")
        counts: dict[bytes, int] = {}
        for (i,) in rows:
            counts[bytes(i)] = counts.get(bytes(i), 0) + 1
        return {i: counts.get(i, 0) for i in intent_ids}

    async def check_books(self, intent_ids: list[bytes], *, proofs: int = 3) -> None:
        """The ledger balances, every receipt is booked exactly once, and inclusion proofs
        of some of them verify with only the issuer's public key."""
        check = await self.store.transact(ledger.check)
        assert check.ok, check
        booked = await self.booked(intent_ids)
        assert all(n == 1 for n in booked.values()), {k.hex()[:8]: n for k, n in booked.items()}
        total = await self.query("SELECT COUNT(*) FROM transfers")
        assert total[0][0] == len(intent_ids)
        for intent_id in intent_ids[:proofs]:
            proof = await self.store.transact(lambda tx, i=intent_id: build_proof(tx, i))
            assert proof is not None
            verified = verify_proof(json.dumps(proof), self.issuer)
            assert verified.batch is not None

    async def exposure(self, owner_id: str) -> int:
        from cloud.leases import exposure

        n: int = await self.store.transact(lambda tx: exposure(tx, owner_id))
        return n


async def wait_until(
    probe: Callable[[], Awaitable[bool]], *, timeout_s: float = 20.0, poll_s: float = 0.05
) -> None:
    """Poll the async ``probe`` until true; TimeoutError after ``timeout_s``."""
    async with asyncio.timeout(timeout_s):
        while not await probe():  # noqa: ASYNC110 (the store has no event to await)
            await asyncio.sleep(poll_s)


CLI_TIMEOUT_S = 60.0


async def return_leases(config: Path, *args: str) -> bytes:
    """``fogpay fog return-leases --config CONFIG ARGS...`` in a process of its own, against
    the fog's database (also while the fog runs); its stdout. It must exit 0."""
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "fogpay.cli", "fog", "return-leases", "--config", str(config)),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(CLI_TIMEOUT_S):
        out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return out
