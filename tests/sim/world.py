"""Who exists in a run: the issuer, owners with credit limits, fogs, devices with bindings.

Every key comes from the seed's generator, and they are registered with the cloud through
``cloud.registry`` exactly as the operator's CLI does; the fogs learn them only from the
cloud's retained publications, carried by the simulated network.
"""

import random
from dataclasses import dataclass, field

import nacl.signing

from cloud import registry
from cloud.store import Tx
from protocol.messages import Binding
from protocol.signing import open_envelope, possession_proof, public_key, seal
from tests.sim.devices import SimDevice

DAY_MS = 86_400_000


def key_from(rng: random.Random) -> nacl.signing.SigningKey:
    return nacl.signing.SigningKey(rng.randbytes(32))


@dataclass(frozen=True, slots=True)
class OwnerSpec:
    owner_id: str
    key: nacl.signing.SigningKey
    currency: str
    limit_micros: int


@dataclass(slots=True)
class Cast:
    issuer: nacl.signing.SigningKey
    owners: list[OwnerSpec]
    fog_keys: dict[str, nacl.signing.SigningKey]
    devices: list[SimDevice] = field(default_factory=list)
    tx_max_micros: int = 0
    day_max_micros: int = 0

    @staticmethod
    def draw(rng: random.Random, *, fogs: int, initial_micros: int) -> "Cast":
        issuer = key_from(rng)
        owners = []
        for i in range(rng.randint(2, 3)):
            currency = "USD" if i == 2 else "EUR"
            # a few initial leases' worth: owners run short of credit in some seeds
            limit = initial_micros * rng.choice((2, 3, 5, 10))
            owners.append(OwnerSpec(f"owner-{i}", key_from(rng), currency, limit))
        fog_keys = {f"fog-{i}": key_from(rng) for i in range(fogs)}
        cast = Cast(issuer, owners, fog_keys)
        cast.tx_max_micros = initial_micros // 4
        cast.day_max_micros = initial_micros * 20
        names = sorted(fog_keys)
        for o in owners:
            for j in range(rng.randint(1, 3)):
                at = rng.sample(names, rng.randint(1, len(names)))
                cast.devices.append(
                    SimDevice(f"{o.owner_id}/dev-{j}", key_from(rng), o.owner_id, o.currency, at)
                )
        return cast

    def owner(self, owner_id: str) -> OwnerSpec:
        return next(o for o in self.owners if o.owner_id == owner_id)

    async def register(self, tx: Tx, *, now_ms: int) -> None:
        """Fogs, owners and bindings, as the operator's CLI registers them."""
        for fog_id, key in sorted(self.fog_keys.items()):
            await registry.add_fog(
                tx, self.issuer, fog_id=fog_id, key=public_key(key), now_ms=now_ms
            )
        for o in self.owners:
            await registry.add_owner(
                tx,
                self.issuer,
                owner_id=o.owner_id,
                key=public_key(o.key),
                limit_micros=o.limit_micros,
                currency=o.currency,
                funding_ref=f"mandate-{o.owner_id}",
                now_ms=now_ms,
            )
        for dev in self.devices:
            binding = Binding(
                device=dev.public,
                owner_id=dev.owner_id,
                not_before_ms=now_ms,
                not_after_ms=now_ms + DAY_MS,
                currency=dev.currency,
                tx_max_micros=self.tx_max_micros,
                day_max_micros=self.day_max_micros,
            )
            env = seal(binding, self.owner(dev.owner_id).key)
            proof = possession_proof(dev.key, open_envelope(env, Binding).body)
            await registry.bind_device(tx, env, proof, now_ms=now_ms)
