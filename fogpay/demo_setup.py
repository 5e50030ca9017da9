"""The demo's world, provisioned through the real components: the cloud registry registers
the fog, the owners and every device binding (with the device's proof of possession), the
stolen device's owner revokes it, and the fog gets a config that trusts the cloud's issuer.

Nothing is published from here: the registry writes every credential, binding and
revocation to its ``retained`` table, and the cloud's MQTT shell publishes that table.
"""

import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import nacl.signing

from cloud import leases, registry
from cloud.leases import LeasePolicy
from cloud.store import Store, Tx
from edge.device import Device
from fog.config import BatchConfig, BrokerConfig, FogConfig, LeaseConfig
from fogpay import demo_cast as cast
from fogpay.provision import Validity, binding_body, make_binding
from protocol.messages import Binding, Revocation
from protocol.signing import public_key, seal_signed
from runtime.keyfile import new_key_file

HOST: Final = "127.0.0.1"
ISSUER_KEY_FILE: Final = "issuer.key"
FOG_KEY_FILE: Final = "fog.key"
FOG_DB_FILE: Final = "fog.sqlite"
CLOUD_DB_FILE: Final = "cloud.sqlite"
DEVICES_DIR: Final = "devices"
BINDING_DAYS: Final = 30.0
BATCH_RECORDS_MAX: Final = 128
BATCH_AGE_MS: Final = 400  # seal often: the demo waits for every batch to be booked
PASSWORD_BYTES: Final = 18
STOLEN_REASON: Final = "reported stolen"
FOG_USERNAME: Final = "fog"
DEVICE_USERNAME: Final = "device"
# Leases. Nothing should make a device wait for budget. The issuer grants each paying owner
# a first lease of 20 units when it registers the fog (``register_world``): nordfleet's six
# EVs start charging together, up to 4.80 each. The fog tops an owner up when the room left
# on its live leases falls under 30 units: a top-up takes a lease round (<= 0.25 s) plus a
# request and its answer (~0.05 s), and nordfleet's schedule draws up to 20 EUR in half a
# second (tests/demo/test_demo_report.py checks both against the schedule). A top-up asks
# for 50, so four leases (the cloud's cap of live leases per fog and owner: 20 + 50 + 50 +
# 30) reach nordfleet's 150 EUR limit. The fog renews on room only, not ahead of expiry, so
# leases live 30 s: a default run (10 s) sees none expire; a longer one sees them expire,
# reported (lrep) and closed, their unused credit returned. An owner at its credit limit
# (hofer-farm, oliver: their first lease is all of it) has its top-up requests refused,
# logged ``lease_refused`` by the cloud; the fog asks again after its next draws.
BATCH: Final = BatchConfig(records_max=BATCH_RECORDS_MAX, age_ms=BATCH_AGE_MS)
LEASE_MS: Final = 30_000
FIRST_LEASE_MICROS: Final = 20_000_000
TOP_UP_MICROS: Final = 50_000_000
LEASE_POLICY: Final = LeasePolicy(
    initial_micros=FIRST_LEASE_MICROS, request_micros_max=TOP_UP_MICROS, lease_ms=LEASE_MS
)
LEASES: Final = LeaseConfig(
    request_below_micros=30_000_000,
    request_micros=TOP_UP_MICROS,
    request_timeout_ms=500,
    request_attempts_max=2,  # a refused request is forgotten soon, so a new one can follow
    report_retry_ms=500,
    check_interval_ms=200,
)


@dataclass(frozen=True, slots=True)
class Keys:
    issuer: nacl.signing.SigningKey
    fog: nacl.signing.SigningKey
    owners: dict[str, nacl.signing.SigningKey]


def new_keys(out: Path) -> Keys:
    """The issuer's and the fog's keys in key files (0600); owners' keys stay in memory (in
    real life each owner holds its own)."""
    owners = {o.owner_id: nacl.signing.SigningKey.generate() for o in cast.owners()}
    return Keys(new_key_file(out / ISSUER_KEY_FILE), new_key_file(out / FOG_KEY_FILE), owners)


def fog_config(out: Path, keys: Keys) -> FogConfig:
    broker = BrokerConfig(
        host=HOST,
        port=0,
        username=FOG_USERNAME,
        password=secrets.token_urlsafe(PASSWORD_BYTES),
        device_username=DEVICE_USERNAME,
        device_password=secrets.token_urlsafe(PASSWORD_BYTES),
        process=False,  # the embedded broker's defaults (fog/config.py, docs/performance.md):
        handoff=True,  # on the fog's loop, handing intents over inside the broker
    )
    return FogConfig(
        fog_id=cast.FOG_ID,
        key_file=out / FOG_KEY_FILE,
        issuer_key=public_key(keys.issuer),
        db=out / FOG_DB_FILE,
        broker=broker,
        batch=BATCH,
        lease=LEASES,
        store_process=False,  # with the hand-off: the whole fog in one process
    )


def open_devices(out: Path, keys: Keys) -> dict[str, Device]:
    fog_pub = public_key(keys.fog)
    return {
        d.name: Device.open(out / DEVICES_DIR / d.name, fog_id=cast.FOG_ID, fog_key=fog_pub)
        for d in cast.devices()
    }


def _binding(spec: cast.DeviceSpec, device: Device, validity: Validity) -> Binding:
    g = spec.group
    return make_binding(
        device.public_key,
        owner_id=g.owner_id,
        currency=g.currency,
        tx_max_micros=g.tx_max_micros,
        day_max_micros=cast.DAY_MAX_MICROS,
        validity=validity,
        payees=g.payees,
    )


async def register_world(
    store: Store,
    keys: Keys,
    devices: dict[str, Device],
    *,
    now_ms: int,
    fog_id: str = cast.FOG_ID,
    first_leases: bool = True,
) -> None:
    """Fog (``fog_id``, key ``keys.fog``), owners, bindings (with proofs), the stolen device's
    revocation and (``first_leases``) a first lease of every paying owner, in one transaction
    of the cloud's store. (With several fogs, ``demo_fed`` registers the others and grants
    the first leases.)"""
    validity = Validity.days(BINDING_DAYS, now=now_ms)

    async def fn(tx: Tx) -> None:
        await registry.add_fog(
            tx, keys.issuer, fog_id=fog_id, key=public_key(keys.fog), now_ms=now_ms
        )
        for o in cast.owners():
            await registry.add_owner(
                tx,
                keys.issuer,
                owner_id=o.owner_id,
                key=public_key(keys.owners[o.owner_id]),
                limit_micros=o.limit_micros,
                currency=o.currency,
                funding_ref=o.funding_ref,
                name=o.name,
                now_ms=validity.not_before_ms,
            )
        for spec in cast.devices():
            device = devices[spec.name]
            binding = _binding(spec, device, validity)
            proof = device.prove_possession(binding_body(binding))
            envelope = seal_signed(binding, keys.owners[spec.group.owner_id]).raw
            await registry.bind_device(tx, envelope, proof, now_ms=now_ms)
        stolen = devices[cast.STOLEN_DEVICE]
        owner_key = keys.owners[cast.device_spec(cast.STOLEN_DEVICE).group.owner_id]
        revocation = Revocation(key=stolen.public_key, time_ms=now_ms, reason=STOLEN_REASON)
        await registry.revoke(tx, public_key(keys.issuer), seal_signed(revocation, owner_key).raw)
        for o in cast.PAYERS if first_leases else ():
            await leases.grant(
                tx,
                keys.issuer,
                owner_id=o.owner_id,
                fog_id=cast.FOG_ID,
                amount_micros=LEASE_POLICY.initial_micros,
                now_ms=now_ms,
                policy=LEASE_POLICY,
            )

    await store.transact(fn)
