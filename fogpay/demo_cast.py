"""The demo's cast: who pays whom, with what devices, limits and amounts. Pure data.

Owners that pay: a logistics company (EVs and drones, SEPA direct-debit mandate), a farmer
(field sensors, SEPA mandate), a person with a car (card token) and a UK visitor whose car
pays in GBP (card token). Owners that are paid: a charging-station company, a toll operator
and a bandwidth provider (SEPA accounts, no credit). Amounts are realistic micro-payments:
sub-cent bandwidth, tens-of-cents tolls, a few euros of charging.

Declines on purpose, so the summary shows reasons: one EV is reported stolen and revoked by
its owner before the run (``revoked``), one drone tries a toll above its per-payment limit
(``limit_tx``), one sensor tries to pay a charging station outside its pay list
(``payee_not_allowed``). Credit limits are small against the traffic, so a fog lives on a
succession of leases.

``plan_payments`` turns the cast into a deterministic schedule (seeded RNG): which device
pays which purchase at which offset. Nothing here does I/O.
"""

import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

FOG_ID: Final = "depot-fog"
PERIOD_SECONDS_DEFAULT: Final = 10.0
RATE_PER_S: Final = 40.0  # payments per second, all devices together
SEED: Final = 20261127
DAY_MAX_MICROS: Final = 500_000_000  # per device and UTC day: generous, never the limit here

EUR: Final = "EUR"
GBP: Final = "GBP"


@dataclass(frozen=True, slots=True, kw_only=True)
class OwnerSpec:
    owner_id: str
    name: str
    currency: str
    limit_micros: int  # credit limit held by the issuer; payees get 0
    funding_ref: str  # docs/protocol.md section 15 grammar


@dataclass(frozen=True, slots=True, kw_only=True)
class Purchase:
    payee_id: str
    micros_min: int
    micros_max: int
    weight: int = 1
    memo: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceGroup:
    owner_id: str
    kind: str  # "ev", "drone", "sensor", "car": also the device name prefix
    count: int
    currency: str
    tx_max_micros: int
    purchases: tuple[Purchase, ...]
    payees: tuple[str, ...] | None = None  # the binding's pay list (None: any payee)


@dataclass(frozen=True, slots=True, kw_only=True)
class Mistake:
    """A purchase one device attempts once, at the start, that the fog must decline."""

    device: str
    purchase: Purchase
    expect: str  # the reason code the fog must give


PAYEES: Final = (
    OwnerSpec(
        owner_id="voltcharge",
        name="VoltCharge Netz GmbH",
        currency=EUR,
        limit_micros=0,
        funding_ref="sepa:BE68539007547034:",
    ),
    OwnerSpec(
        owner_id="alptoll",
        name="AlpToll S.p.A.",
        currency=EUR,
        limit_micros=0,
        funding_ref="sepa:IT60X0542811101000000123456:",
    ),
    OwnerSpec(
        owner_id="skylink",
        name="SkyLink Bandwidth B.V.",
        currency=EUR,
        limit_micros=0,
        funding_ref="sepa:NL91ABNA0417164300:",
    ),
)

PAYERS: Final = (
    OwnerSpec(
        owner_id="nordfleet",
        name="Nordfleet Logistik GmbH",
        currency=EUR,
        limit_micros=150_000_000,
        funding_ref="sepa:FR1420041010050500013M02606:BNPAFRPP:2025-03-01:NORDFLEET-2025-01",
    ),
    OwnerSpec(
        owner_id="hofer-farm",
        name="Hofer Biohof",
        currency=EUR,
        limit_micros=10_000_000,
        funding_ref="sepa:AT611904300234573201:BKAUATWW:2024-06-15:HOFER-MANDATE-7",
    ),
    OwnerSpec(
        owner_id="anna",
        name="Anna Kowalska",
        currency=EUR,
        limit_micros=40_000_000,
        funding_ref="card:tok_mc_7d2e41a9",
    ),
    OwnerSpec(
        owner_id="oliver",
        name="Oliver Hughes",
        currency=GBP,
        limit_micros=20_000_000,
        funding_ref="card:tok_visa_4f9a2c10",
    ),
)

CHARGE = Purchase(payee_id="voltcharge", micros_min=1_500_000, micros_max=4_800_000, memo="kwh")
TOLL = Purchase(payee_id="alptoll", micros_min=200_000, micros_max=650_000, weight=2, memo="toll")
DRONE_LINK = Purchase(payee_id="skylink", micros_min=1_000, micros_max=9_000, weight=4, memo="mb")
SENSOR_LINK = Purchase(payee_id="skylink", micros_min=400, micros_max=2_000, memo="pkt")

GROUPS: Final = (
    DeviceGroup(
        owner_id="nordfleet",
        kind="ev",
        count=6,
        currency=EUR,
        tx_max_micros=6_000_000,
        purchases=(CHARGE, TOLL),
    ),
    DeviceGroup(
        owner_id="nordfleet",
        kind="drone",
        count=8,
        currency=EUR,
        tx_max_micros=500_000,
        purchases=(
            DRONE_LINK,
            Purchase(payee_id="alptoll", micros_min=100_000, micros_max=300_000),
        ),
    ),
    DeviceGroup(
        owner_id="hofer-farm",
        kind="sensor",
        count=14,
        currency=EUR,
        tx_max_micros=10_000,
        purchases=(SENSOR_LINK,),
        payees=("skylink",),
    ),
    DeviceGroup(
        owner_id="anna",
        kind="car",
        count=1,
        currency=EUR,
        tx_max_micros=8_000_000,
        purchases=(CHARGE, TOLL),
    ),
    DeviceGroup(
        owner_id="oliver",
        kind="car",
        count=1,
        currency=GBP,
        tx_max_micros=2_000_000,
        purchases=(Purchase(payee_id="alptoll", micros_min=300_000, micros_max=900_000),),
    ),
)

STOLEN_DEVICE: Final = "nordfleet-ev-05"  # revoked by its owner before the run
MISTAKES: Final = (
    Mistake(
        device="nordfleet-drone-02",
        purchase=Purchase(payee_id="alptoll", micros_min=800_000, micros_max=800_000),
        expect="limit_tx",
    ),
    Mistake(
        device="hofer-farm-sensor-03",
        purchase=Purchase(payee_id="voltcharge", micros_min=2_000, micros_max=2_000),
        expect="payee_not_allowed",
    ),
)


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceSpec:
    name: str  # also its state directory under DIR/devices/
    group: DeviceGroup


@dataclass(frozen=True, slots=True, kw_only=True)
class Planned:
    offset_s: float
    device: str
    payee_id: str
    amount_micros: int
    currency: str
    memo: bytes


def owners() -> tuple[OwnerSpec, ...]:
    return PAYERS + PAYEES


def devices() -> tuple[DeviceSpec, ...]:
    return tuple(
        DeviceSpec(name=f"{g.owner_id}-{g.kind}-{i:02d}", group=g)
        for g in GROUPS
        for i in range(1, g.count + 1)
    )


def device_spec(name: str) -> DeviceSpec:
    for d in devices():
        if d.name == name:
            return d
    raise AssertionError(f"no device {name!r} in the cast")


def _planned(offset: float, device: DeviceSpec, p: Purchase, rng: random.Random) -> Planned:
    amount = rng.randint(p.micros_min, p.micros_max)
    memo = f"{p.memo}-{rng.randrange(10**6):06d}".encode() if p.memo else b""
    return Planned(
        offset_s=offset,
        device=device.name,
        payee_id=p.payee_id,
        amount_micros=amount,
        currency=device.group.currency,
        memo=memo,
    )


def plan_payments(
    seconds: float, *, rate_per_s: float = RATE_PER_S, seed: int = SEED
) -> Iterator[Planned]:
    """The schedule: the mistakes first, then ``rate_per_s`` payments a second for
    ``seconds``, round-robin over the devices, each a weighted choice of its purchases."""
    assert seconds > 0 and rate_per_s > 0
    rng = random.Random(seed)
    cast = devices()
    by_name = {d.name: d for d in cast}
    for m in MISTAKES:
        yield _planned(0.0, by_name[m.device], m.purchase, rng)
    count = int(seconds * rate_per_s)
    for n in range(count):
        device = cast[n % len(cast)]
        purchases = device.group.purchases
        p = rng.choices(purchases, weights=[x.weight for x in purchases])[0]
        yield _planned(n / rate_per_s, device, p, rng)
