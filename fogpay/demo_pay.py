"""The demo's devices paying through the fog: the planned payments (``demo_cast``) go out on
one MQTT connection (``DeviceSession``, one wildcard receipt subscription), each at its
offset, and every outcome is counted. A device still busy with its previous payment (waiting
for a lease) skips its next planned one (counted ``skipped``), so nothing piles up.

A transient decline (``insufficient_budget`` while the fog waits for its next lease,
``rate_limited``...) is answered as the protocol allows: the same intent bytes are sent again
after a pause, a bounded number of times; those resends are counted apart, and only the
final outcome of each payment counts as ok or declined. A device pays one payment at a time
(its lock is held across resends), so its intents reach the fog in ``q`` order.
"""

import asyncio
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

import aiomqtt

from edge.device import Device, DeviceSession, PaymentDeclined, PaymentTimeout
from edge.simulate import LatencyHistogram
from fogpay.demo_cast import Planned
from protocol.errors import Declined

PAID_KEPT_MAX: Final = 100_000  # ok payments remembered for the report (600 s x 40/s fit)
PAY_TIMEOUT_S: Final = 3.0
RETRANSMITS_MAX: Final = 3  # same bytes again after a timeout (edge SDK)
TRANSIENT_RESENDS_MAX: Final = 20  # 3 s of resends: a lease request and its answer fit
TRANSIENT_PAUSE_S: Final = 0.15


@dataclass(frozen=True, slots=True)
class Paid:
    """An ok payment, as the demo saw it (for the live display and the report's histogram)."""

    at_ms: int  # wall clock when its receipt was verified and stored
    device: str
    amount_micros: int
    latency_us: int


@dataclass(slots=True)
class Outcomes:
    """Final outcome of every payment, plus the transient declines that were resent."""

    by_status: Counter[str] = field(default_factory=Counter)  # ok, declined, timeout, error
    by_reason: Counter[str] = field(default_factory=Counter)  # final decline reasons
    resent: Counter[str] = field(default_factory=Counter)  # transient reasons, resent
    skipped: int = 0  # planned while the device was still busy with its previous payment
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    paid: list[Paid] = field(default_factory=list)  # the first PAID_KEPT_MAX ok payments
    drawn: Counter[str] = field(default_factory=Counter)  # micros of ok payments per device
    started_ms: int = 0  # wall clock when the first payment was due

    @property
    def sent(self) -> int:
        return sum(self.by_status.values())


async def _settle(
    session: DeviceSession, device: Device, planned: Planned, outcomes: Outcomes
) -> tuple[str, str | None]:
    """Send one planned payment until it is final; returns (status, reason)."""
    try:
        intent = device.new_intent(
            planned.payee_id,
            planned.amount_micros,
            planned.currency,
            memo=planned.memo or None,
        )
    except Declined as exc:
        return "error", str(exc.reason)
    for attempt in range(TRANSIENT_RESENDS_MAX + 1):
        try:
            await session.send(device, intent, timeout_s=PAY_TIMEOUT_S, retries_max=RETRANSMITS_MAX)
            return "ok", None
        except PaymentDeclined as exc:
            if not exc.reason.transient or attempt == TRANSIENT_RESENDS_MAX:
                return "declined", str(exc.reason)
            outcomes.resent[str(exc.reason)] += 1
            await asyncio.sleep(TRANSIENT_PAUSE_S)
        except PaymentTimeout:
            return "timeout", None
        except aiomqtt.MqttError as exc:
            return "error", type(exc).__name__
    raise AssertionError("unreachable: the last attempt returns")


async def pay_one(
    session: DeviceSession,
    device: Device,
    lock: asyncio.Lock,
    planned: Planned,
    outcomes: Outcomes,
) -> None:
    async with lock:
        start = time.perf_counter_ns()
        status, reason = await _settle(session, device, planned, outcomes)
    outcomes.by_status[status] += 1
    if status == "declined" and reason is not None:
        outcomes.by_reason[reason] += 1
    if status == "ok":
        latency_us = (time.perf_counter_ns() - start) // 1000
        outcomes.latency.record(latency_us)
        outcomes.drawn[planned.device] += planned.amount_micros
        if len(outcomes.paid) < PAID_KEPT_MAX:
            at_ms = time.time_ns() // 1_000_000
            outcomes.paid.append(Paid(at_ms, planned.device, planned.amount_micros, latency_us))


async def run_payments(
    session: DeviceSession,
    devices: dict[str, Device],
    plan: Iterable[Planned],
    outcomes: Outcomes | None = None,
    sessions: Mapping[str, DeviceSession] | None = None,
) -> Outcomes:
    """Send each planned payment at its offset (seconds from now); wait for every outcome
    (each is bounded by its timeouts and resends). Counts go into ``outcomes`` as they
    happen (a live display may read them meanwhile). ``sessions`` maps a device name to the
    session of its fog (several fogs); otherwise every device pays on ``session``."""
    outcomes = Outcomes() if outcomes is None else outcomes
    locks = {name: asyncio.Lock() for name in devices}
    start = time.monotonic()
    outcomes.started_ms = time.time_ns() // 1_000_000
    async with asyncio.TaskGroup() as tg:
        for planned in plan:
            delay = planned.offset_s - (time.monotonic() - start)
            if delay > 0:
                await asyncio.sleep(delay)
            device, lock = devices[planned.device], locks[planned.device]
            if lock.locked():
                outcomes.skipped += 1  # a device pays one payment at a time; no backlog
                continue
            tg.create_task(
                pay_one(
                    session if sessions is None else sessions[planned.device],
                    device,
                    lock,
                    planned,
                    outcomes,
                ),
                name="demo.pay",
            )
    return outcomes
