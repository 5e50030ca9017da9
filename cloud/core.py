"""The cloud's decisions behind one typed entry point: ``CloudCore.handle(input) -> outputs``.

The inputs and outputs are two closed sets of frozen dataclasses (``cloud.events``): a
batch, a lease request or report that arrived, or a wish for the retained state, in; what to
publish, the alarms raised, and what became of each message, out. The core reads no clock
(time comes in with each input) and opens no socket: it decides, and keeps its state in the
store through the ``Store``/``Tx`` interface (``cloud.store``), one transaction per input
(or per batch, when a batch releases held ones), committed before the outputs are returned.
Bad input never raises and never changes state: it is counted (``Metrics``), logged with its
reason code, and answered with a ``BatchJudged``/``LeaseAnswered`` that says so.

- ``BatchArrived``: ``cloud.ingest.Ingestor``; ``BatchJudged``, ``Publish`` (the ack,
  revocations of suspended devices, lease clearings), ``AlarmRaised``;
- ``LeaseRequestArrived``: ``cloud.leases.handle_request``; ``LeaseAnswered``, ``Publish``
  (the lease);
- ``LeaseReportArrived``: ``cloud.leases.handle_report``; ``LeaseAnswered``, ``Publish``
  (clearings);
- ``RetainedWanted``: ``cloud.registry.retained``; a ``Publish`` per retained topic;
- ``HeldArrived``: ``cloud.held.HeldBooker``; ``HeldJudged``, the ``hack`` (a ``Publish``
  not retained), ``AlarmRaised``, ``Publish`` (revocations, clearings). A relayed batch is a
  ``BatchArrived`` with ``relayed_by``.

The async methods ``ingest_batch(wire)``, ``lease_request(wire)``, ``lease_report(wire)`` and
``retained()`` are thin wrappers for callers that hold a clock (the MQTT shell, the
simulator, tests): each stamps its input with ``clock()`` and turns the outputs back into
what it always returned (an ``IngestOutcome``; a list of ``(topic, payload)`` retained).
"""

from collections.abc import Callable

import nacl.signing
import structlog

from cloud import events, leases, registry, transfers
from cloud.events import (
    BatchArrived,
    HeldArrived,
    HeldJudged,
    Input,
    LeaseAnswered,
    LeaseReportArrived,
    LeaseRequestArrived,
    Output,
    RetainedWanted,
    TransferArrived,
)
from cloud.held import HeldBooker
from cloud.ingest import Ingestor, IngestOutcome, Verifier, verify_inline
from cloud.leases import LeasePolicy
from cloud.metrics import Metrics
from cloud.store import Store, Tx
from protocol.errors import Declined

log = structlog.get_logger()
Publish = list[tuple[str, bytes]]  # (topic, payload) retained: what the wrappers return


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
        """``clock`` only stamps the wrappers' inputs; ``handle`` reads no clock."""
        self.metrics = metrics or Metrics()
        self._store, self._issuer, self._clock, self._policy = store, issuer, clock, policy
        self._ingestor = Ingestor(
            store=store, issuer=issuer, clock=clock, verifier=verifier, metrics=self.metrics
        )
        self._held = HeldBooker(store=store, issuer=issuer, metrics=self.metrics)

    @property
    def owns(self) -> Callable[[str], bool] | None:
        """Which fogs this core books (None: all): the service's partitions (cloud/partition.py)."""
        return self._ingestor.owns

    @owns.setter
    def owns(self, owns: Callable[[str], bool] | None) -> None:
        self._ingestor.owns = owns

    async def handle(self, event: Input) -> list[Output]:
        """Decide on one input; every output is durable when this returns."""
        match event:
            case BatchArrived():
                return await self._ingestor.handle(event)
            case LeaseRequestArrived():
                return await self._lease_request(event)
            case LeaseReportArrived():
                return await self._lease_report(event)
            case RetainedWanted():
                rows = await self._store.transact(registry.retained)
                return [events.Publish(topic=t, payload=p) for t, p in rows]
            case HeldArrived():
                return await self._held.handle(event)
            case TransferArrived():
                return await self._transfer(event)
        raise AssertionError(f"not a cloud input: {event!r}")  # mypy: the match is exhaustive

    # ---- the wrappers: same meaning as ever -------------------------------------------

    async def ingest_batch(
        self, wire: bytes, *, topic: str | None = None, relayed_by: str | None = None
    ) -> IngestOutcome:
        event = BatchArrived(wire=wire, now_ms=self._clock(), topic=topic, relayed_by=relayed_by)
        return IngestOutcome.of(await self.handle(event))

    async def held_upload(
        self, payload: bytes, device: bytes
    ) -> tuple[HeldJudged, list[events.Publish]]:
        """A device's held payload: what became of it, and what to publish (the ``hack``
        last, not retained; revocations and clearings retained)."""
        outputs = await self.handle(
            HeldArrived(payload=payload, device=device, now_ms=self._clock())
        )
        [judged] = [o for o in outputs if isinstance(o, HeldJudged)]
        return judged, [o for o in outputs if isinstance(o, events.Publish)]

    async def lease_request(self, wire: bytes) -> Publish:
        return _published(await self.handle(LeaseRequestArrived(wire=wire, now_ms=self._clock())))

    async def lease_request_both(self, wire: bytes) -> tuple[Publish, Publish]:
        """(retained, not retained): the lease granted, and the recalls (18.5) if not."""
        out = await self.handle(LeaseRequestArrived(wire=wire, now_ms=self._clock()))
        once = [(o.topic, o.payload) for o in out if isinstance(o, events.Publish) and not o.retain]
        return _published(out), once

    async def lease_report(self, wire: bytes) -> Publish:
        return _published(await self.handle(LeaseReportArrived(wire=wire, now_ms=self._clock())))

    async def transfer(self, wire: bytes) -> Publish:
        return _published(await self.handle(TransferArrived(wire=wire, now_ms=self._clock())))

    async def retained(self) -> Publish:
        return _published(await self.handle(RetainedWanted()))

    # ---- lease messages ---------------------------------------------------------------

    async def _lease_request(self, event: LeaseRequestArrived) -> list[Output]:
        async def fn(tx: Tx) -> tuple[leases.Granted | None, list[tuple[str, bytes]]]:
            granted = await leases.handle_request(
                tx, self._issuer, event.wire, now_ms=event.now_ms, policy=self._policy
            )
            if granted is not None:
                return granted, []
            recalled = await leases.recalls(
                tx, self._issuer, event.wire, now_ms=event.now_ms, policy=self._policy
            )
            return None, recalled

        try:
            granted, recalled = await self._store.transact(fn)
        except Declined as exc:
            self.metrics.inc(f"lreq_refused_{exc.reason}")
            log.warning("lease_request_refused", reason=str(exc.reason))
            return [LeaseAnswered(kind="lreq", result="refused", reason=exc.reason)]
        if granted is None:
            self.metrics.inc("lreq_no_credit")
            self.metrics.inc("lease_recalls", len(recalled))
            # rebalancing (18.5): asks to fogs holding the owner's idle leases, NOT retained
            # (a retained one would replace the lease on its topic)
            return [
                LeaseAnswered(kind="lreq", result="no_credit"),
                *(events.Publish(topic=t, payload=p, retain=False) for t, p in recalled),
            ]
        self.metrics.inc("lease_granted")
        lease = granted.lease
        log.info(
            "lease_granted",
            fog_id=lease.fog_id,
            owner=lease.owner_id,
            lease=lease.lease_id.hex(),
            amount_micros=lease.amount_micros,
        )
        return [
            LeaseAnswered(kind="lreq", result="granted", lease_id=lease.lease_id),
            events.Publish(topic=granted.topic, payload=granted.envelope),
        ]

    async def _lease_report(self, event: LeaseReportArrived) -> list[Output]:
        try:
            cleared = await self._store.transact(
                lambda tx: leases.handle_report(tx, event.wire, now_ms=event.now_ms)
            )
        except Declined as exc:
            self.metrics.inc(f"lrep_refused_{exc.reason}")
            log.warning("lease_report_refused", reason=str(exc.reason))
            return [LeaseAnswered(kind="lrep", result="refused", reason=exc.reason)]
        self.metrics.inc("lrep_accepted")
        answered = LeaseAnswered(kind="lrep", result="accepted")
        return [answered, *(events.Publish(topic=t, payload=b"") for t in cleared)]

    async def _transfer(self, event: TransferArrived) -> list[Output]:
        """A peer transfer: the sub-lease recorded and published retained to its receiver,
        the parent closed if its report waited for it (docs/protocol.md 18.2)."""
        try:
            published = await self._store.transact(
                lambda tx: transfers.handle_transfer(tx, event.wire, now_ms=event.now_ms)
            )
        except Declined as exc:
            self.metrics.inc(f"xfer_refused_{exc.reason}")
            log.warning("transfer_refused", reason=str(exc.reason), detail=exc.detail[:200])
            return [LeaseAnswered(kind="xfer", result="refused", reason=exc.reason)]
        self.metrics.inc("xfer_accepted" if published else "xfer_duplicate")
        answered = LeaseAnswered(kind="xfer", result="accepted")
        return [answered, *(events.Publish(topic=t, payload=p) for t, p in published)]


def _published(outputs: list[Output]) -> Publish:
    """What to publish retained (the wrappers' callers publish everything they get retained;
    ``handle`` gives the not-retained ones too, ``Publish.retain`` False)."""
    return [(o.topic, o.payload) for o in outputs if isinstance(o, events.Publish) and o.retain]
