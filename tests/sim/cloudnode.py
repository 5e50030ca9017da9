"""The simulated cloud: the real ``CloudCore`` over the real SQLite store, in the run's one
event loop. Each call is awaited to completion before the simulation takes its next step, so
the run stays deterministic (aiosqlite's thread is only ever asked one thing at a time).

A crash closes the store and drops the core: every handler that returned had committed; no
handler is ever interrupted halfway (the durability model is the transaction boundary).
"""

from pathlib import Path

import nacl.signing

from cloud.backends import open_store
from cloud.core import CloudCore
from cloud.ingest import IngestOutcome
from cloud.leases import LeasePolicy
from cloud.store import Store, Tx
from protocol import topics
from protocol.errors import TopicError
from protocol.topics import Kind
from tests.sim.scheduler import Scheduler

Publish = list[tuple[str, bytes]]


class CloudNode:
    def __init__(
        self,
        *,
        path: Path,
        issuer: nacl.signing.SigningKey,
        policy: LeasePolicy,
        sched: Scheduler,
    ) -> None:
        self.path, self.issuer, self.policy, self._sched = path, issuer, policy, sched
        self.store: Store | None = None
        self.core: CloudCore | None = None
        self.starts = 0
        self.relayed = 0  # relayed batches ingested
        self.held_booked = 0  # records booked from devices' held uploads
        self.transfers = 0  # peer transfers the cloud recorded (first copy of each)
        self.recalls = 0  # rbal the cloud published (docs/protocol.md 18.5)
        self.once: Publish = []  # not retained: the rbal of the last lease request

    @property
    def up(self) -> bool:
        return self.core is not None

    def clock(self) -> int:
        return self._sched.now_ms

    async def start(self) -> Publish:
        """Open the store and build the core; returns what the service publishes at start."""
        self.store = await open_store(f"sqlite://{self.path}")
        self.core = CloudCore(
            store=self.store, issuer=self.issuer, clock=self.clock, policy=self.policy
        )
        self.starts += 1
        return await self.core.retained()

    async def crash(self) -> None:
        assert self.store is not None
        await self.store.close()
        self.store, self.core = None, None

    async def transact(self, fn: object) -> object:
        assert self.store is not None
        return await self.store.transact(fn)  # type: ignore[arg-type]

    async def handle(self, topic: str, payload: bytes) -> tuple[str, Publish]:
        """One message off ``fogpay/1/up/+/...``: (a word for the trace, what to publish)."""
        assert self.core is not None
        try:
            kind = topics.parse(topic).kind
        except TopicError:
            return "bad_topic", []
        if kind is Kind.BATCH:
            out: IngestOutcome = await self.core.ingest_batch(payload)
            return f"batch {out.number} {out.status}", list(out.publish)
        if kind is Kind.RELAY:  # another fog's batch, relayed by a replica holder: the
            # cloud's relay ingest (a BatchArrived with relayed_by, docs/protocol.md 17.8)
            carrier = topics.parse(topic).fog_id
            out = await self.core.ingest_batch(payload, topic=topic, relayed_by=carrier)
            self.relayed += 1
            return f"relayed batch {out.number} {out.status}", list(out.publish)
        if kind is Kind.HELD_RECORDS:  # a device hands in the receipts it holds (17.7)
            device = topics.parse(topic).key
            assert device is not None
            judged, published = await self.core.held_upload(payload, device)
            self.held_booked += judged.booked
            word = (
                f"held refused={judged.refused} booked={judged.booked} "
                f"already={judged.already} rejected={judged.rejected}"
            )
            return word, [(p.topic, p.payload) for p in published]
        if kind is Kind.LEASE_REQUEST:
            pub, self.once = await self.core.lease_request_both(payload)
            self.recalls += len(self.once)
            if not pub:
                asked = f"; rbal to {len(self.once)}" if self.once else ""
                return f"lreq unanswered{asked}", pub
            return f"lease {pub[0][0].rsplit('/', 1)[-1][:8]} granted (or granted again)", pub
        if kind is Kind.TRANSFER:  # a peer transfer, from its giver or its receiver (18.2)
            pub = await self.core.transfer(payload)
            self.transfers += len(pub)
            return f"xfer {'recorded' if pub else 'duplicate or refused'}", pub
        if kind is Kind.LEASE_REPORT:
            pub = await self.core.lease_report(payload)
            return f"lrep cleared={len(pub)}", pub
        return "ignored", []


async def read(store: Store, sql: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    async def q(tx: Tx) -> list[tuple[object, ...]]:
        return [tuple(r) for r in await tx.fetchall(sql, params)]

    rows: list[tuple[object, ...]] = await store.transact(q)
    return rows
