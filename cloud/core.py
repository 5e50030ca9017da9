"""The cloud's message handlers behind one object: what the MQTT shell calls.

Each handler takes a payload's bytes as they came off the broker and returns what to publish
(``(topic, payload)``, retained; an empty payload clears a retained topic). Bad input never
raises and never changes state: it is counted (``Metrics``), logged with its reason code,
and answered with nothing.

| topic (subscribed) | handler |
| --- | --- |
| ``fogpay/1/up/+/batch`` | ``ingest_batch`` |
| ``fogpay/1/up/+/lreq`` | ``lease_request`` |
| ``fogpay/1/up/+/lrep`` | ``lease_report`` |
| (at start) | ``retained``: every credential, binding, revocation, lease and ack |
"""

from collections.abc import Callable

import nacl.signing
import structlog

from cloud import leases, registry
from cloud.ingest import Ingestor, IngestOutcome, Verifier, verify_inline
from cloud.leases import LeasePolicy
from cloud.metrics import Metrics
from cloud.store import Store, Tx
from protocol.errors import Declined

log = structlog.get_logger()
Publish = list[tuple[str, bytes]]


class CloudCore:
    def __init__(
        self,
        *,
        store: Store,
        issuer: nacl.signing.SigningKey,
        clock: Callable[[], int],
        policy: LeasePolicy,
        verifier: Verifier = verify_inline,
        metrics: Metrics | None = None,
    ) -> None:
        self.metrics = metrics or Metrics()
        self._store, self._issuer, self._clock, self._policy = store, issuer, clock, policy
        self._ingestor = Ingestor(
            store=store, issuer=issuer, clock=clock, verifier=verifier, metrics=self.metrics
        )

    async def ingest_batch(self, wire: bytes) -> IngestOutcome:
        return await self._ingestor.ingest_batch(wire)

    async def lease_request(self, wire: bytes) -> Publish:
        async def fn(tx: Tx) -> leases.Granted | None:
            return await leases.handle_request(
                tx, self._issuer, wire, now_ms=self._clock(), policy=self._policy
            )

        try:
            granted = await self._store.transact(fn)
        except Declined as exc:
            self.metrics.inc(f"lreq_refused_{exc.reason}")
            log.warning("lease_request_refused", reason=str(exc.reason))
            return []
        if granted is None:
            self.metrics.inc("lreq_no_credit")
            return []
        self.metrics.inc("lease_granted")
        lease = granted.lease
        log.info(
            "lease_granted",
            fog_id=lease.fog_id,
            owner=lease.owner_id,
            lease=lease.lease_id.hex(),
            amount_micros=lease.amount_micros,
        )
        return [(granted.topic, granted.envelope)]

    async def lease_report(self, wire: bytes) -> Publish:
        try:
            cleared = await self._store.transact(lambda tx: leases.handle_report(tx, wire))
        except Declined as exc:
            self.metrics.inc(f"lrep_refused_{exc.reason}")
            log.warning("lease_report_refused", reason=str(exc.reason))
            return []
        self.metrics.inc("lrep_accepted")
        return [(topic, b"") for topic in cleared]

    async def retained(self) -> Publish:
        return await self._store.transact(registry.retained)
