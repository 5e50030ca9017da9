"""Trust material: verified before it is believed, stored durably, in any order."""

import msgpack
import pytest

from protocol.messages import FogCredential, Lease, OwnerCredential, Revocation
from protocol.reasons import Reason
from protocol.signing import public_key, seal
from tests.fog.world import DAY_MS, NOW, World, key

IDENTITY_POINT = (1).to_bytes(32, "little")  # small order: refused as a key


def test_binding_before_its_owner_credential(world: World) -> None:
    owner = key()
    dev = key()
    world.trust("bind", world.binding(owner, public_key(dev)))
    world.lease()
    assert world.pay(dev, 1).reason is Reason.UNKNOWN_DEVICE
    cred = OwnerCredential(
        owner_id="acme", key=public_key(owner), not_before_ms=0, not_after_ms=NOW + DAY_MS
    )
    world.trust("owner", seal(cred, world.issuer))
    assert world.pay(dev, 1).status == "ok"


def test_revocation_before_the_binding_it_revokes(world: World) -> None:
    owner_key = key()
    dev = key()
    world.revoke(public_key(dev), signer=owner_key)  # an owner key the fog has never seen
    cred = OwnerCredential(
        owner_id="acme", key=public_key(owner_key), not_before_ms=0, not_after_ms=NOW + DAY_MS
    )
    world.trust("owner", seal(cred, world.issuer))
    world.trust("bind", world.binding(owner_key, public_key(dev)))
    world.lease()
    assert world.pay(dev, 1).reason is Reason.REVOKED


def test_duplicates_are_idempotent(world: World) -> None:
    owner = world.owner()
    env = world.binding(owner, public_key(key()))
    first = world.store.put_trust("bind", env, now_ms=NOW)
    second = world.store.put_trust("bind", env, now_ms=NOW + 1)
    assert (first.status, second.status) == ("accepted", "duplicate")
    assert first.msg_id == second.msg_id
    assert [t for t, _ in world.store.trust_envelopes()] == ["owner", "bind"]
    assert world.store.counters()["trust_duplicate"] == 1


def _refused(world: World, msg_type: str, env: bytes) -> Reason | None:
    before = world.store.trust_envelopes()
    out = world.store.put_trust(msg_type, env, now_ms=NOW)
    assert out.status == "refused" and out.detail
    assert world.store.trust_envelopes() == before
    return out.reason


def test_refused_material(world: World) -> None:
    owner = world.owner()
    stranger = key()
    cred = OwnerCredential(owner_id="x", key=public_key(key()), not_before_ms=0, not_after_ms=NOW)
    assert _refused(world, "owner", seal(cred, stranger)) is Reason.BAD_SIGNATURE
    assert (
        _refused(
            world,
            "lease",
            seal(
                Lease(
                    lease_id=bytes(16),
                    owner_id="acme",
                    fog_id="fog-1",
                    amount_micros=1,
                    currency="EUR",
                    not_after_ms=NOW + 1,
                ),
                owner,
            ),
        )
        is Reason.BAD_SIGNATURE
    )
    assert _refused(world, "lease", world.lease_envelope(fog_id="fog-2")) is Reason.WRONG_FOG
    assert _refused(world, "lease", world.lease_envelope(na=NOW - 1)) is Reason.EXPIRED
    bad_key = OwnerCredential(owner_id="x", key=IDENTITY_POINT, not_before_ms=0, not_after_ms=NOW)
    assert _refused(world, "owner", seal(bad_key, world.issuer)) is Reason.MALFORMED
    assert _refused(world, "bind", world.binding(owner, IDENTITY_POINT)) is Reason.MALFORMED
    assert _refused(world, "bind", world.binding(owner, public_key(key()), na=NOW - 1)) is (
        Reason.EXPIRED
    )
    assert _refused(world, "owner", world.binding(owner, public_key(key()))) is Reason.MALFORMED
    assert _refused(world, "gossip", world.binding(owner, public_key(key()))) is Reason.MALFORMED
    assert _refused(world, "revoke", b"\x94\x01") is Reason.MALFORMED
    revoke_bad = Revocation(key=IDENTITY_POINT, time_ms=NOW, reason="x")
    assert _refused(world, "revoke", seal(revoke_bad, world.issuer)) is Reason.MALFORMED
    t, body, signer, sig = msgpack.unpackb(world.lease_envelope())
    tampered = msgpack.packb([t, body, signer, sig[:-1] + bytes([sig[-1] ^ 1])])
    assert _refused(world, "lease", tampered) is Reason.BAD_SIGNATURE
    assert world.store.counters()["trust_refused"] == 12


def test_lease_id_reused_with_other_terms_is_refused(world: World) -> None:
    world.owner()
    lid = b"L" * 16
    world.trust("lease", world.lease_envelope(amount=1_000_000, lease_id=lid))
    again = world.lease_envelope(amount=9_000_000, lease_id=lid)
    assert _refused(world, "lease", again) is Reason.MALFORMED
    assert world.drawn()[lid] == (1_000_000, 0)


def test_newer_binding_replaces_older(world: World) -> None:
    owner = world.owner()
    dev = key()
    world.trust("bind", world.binding(owner, public_key(dev), tx=5_000_000, nb=NOW - 2 * DAY_MS))
    world.lease()
    assert world.pay(dev, 1, 4_000_000).status == "ok"
    world.trust("bind", world.binding(owner, public_key(dev), tx=1_000_000, nb=NOW - DAY_MS))
    assert world.pay(dev, 2, 4_000_000).reason is Reason.LIMIT_TX
    # sequence and day totals belong to the device, not the binding
    assert world.pay(dev, 1, 1).reason is Reason.SEQ_CONFLICT


def test_future_binding_does_not_displace_the_valid_one(world: World) -> None:
    owner = world.owner()
    dev = key()
    world.trust("bind", world.binding(owner, public_key(dev), currency="EUR"))
    world.trust("bind", world.binding(owner, public_key(dev), currency="USD", nb=NOW + DAY_MS))
    world.lease()
    world.lease(currency="USD")
    assert world.pay(dev, 1).status == "ok"
    later = NOW + DAY_MS
    assert world.pay(dev, 2, now_ms=later, t=later).reason is Reason.CURRENCY
    assert world.pay(dev, 2, now_ms=later, t=later, currency="USD").status == "ok"


def test_impostor_binding_does_not_displace(world: World) -> None:
    owner = world.owner()
    dev = key()
    world.trust("bind", world.binding(owner, public_key(dev), nb=NOW - 2 * DAY_MS))
    world.trust("bind", world.binding(key(), public_key(dev), tx=1, nb=NOW - DAY_MS))
    world.lease()
    assert world.pay(dev, 1, 2_000_000).status == "ok"


def test_revocation_arriving_later_stops_new_intents_only(world: World) -> None:
    owner = world.owner()
    dev = world.device(owner)
    world.lease()
    assert world.pay(dev, 1).status == "ok"
    log_before = [r for r in world.money_dump() if r[0] == "log"]
    world.revoke(public_key(dev))
    assert world.pay(dev, 2).reason is Reason.REVOKED
    assert [r for r in world.money_dump() if r[0] == "log"] == log_before


def test_owner_key_rotation_revoking_the_old_key(world: World) -> None:
    old = world.owner("acme")
    new = world.owner("acme")
    dev_old = world.device(old, "acme")
    dev_new = world.device(new, "acme")
    world.lease()
    world.revoke(public_key(old))
    assert world.pay(dev_old, 1).reason is Reason.REVOKED
    assert world.pay(dev_new, 1).status == "ok"
    # the new key may revoke its own device; the old (revoked) key's devices stay revoked
    world.revoke(public_key(dev_new), signer=new)
    assert world.pay(dev_new, 2).reason is Reason.REVOKED


def test_renewed_owner_credential_keeps_devices_valid(world: World) -> None:
    owner = world.owner("acme", na=NOW + 1000)
    dev = world.device(owner, "acme")
    world.lease(na=NOW + DAY_MS)
    later = NOW + 5000
    assert world.pay(dev, 1, now_ms=later, t=later).reason is Reason.EXPIRED
    cred = OwnerCredential(
        owner_id="acme", key=public_key(owner), not_before_ms=NOW, not_after_ms=NOW + DAY_MS
    )
    world.trust("owner", seal(cred, world.issuer))
    assert world.pay(dev, 1, now_ms=later, t=later).status == "ok"


@pytest.mark.parametrize("msg_type", ["owner", "fog", "bind", "revoke", "lease"])
def test_every_type_round_trips_through_trust_envelopes(world: World, msg_type: str) -> None:
    owner = world.owner()
    envs = {
        "owner": seal(
            OwnerCredential(
                owner_id="b", key=public_key(key()), not_before_ms=0, not_after_ms=NOW + 1
            ),
            world.issuer,
        ),
        "fog": seal(
            FogCredential(
                fog_id="fog-1", key=public_key(world.fog_key), not_before_ms=0, not_after_ms=NOW + 1
            ),
            world.issuer,
        ),
        "bind": world.binding(owner, public_key(key())),
        "revoke": seal(Revocation(key=public_key(key()), time_ms=0, reason="lost"), owner),
        "lease": world.lease_envelope(),
    }
    world.trust(msg_type, envs[msg_type])
    world.reopen()
    assert world.store.trust_envelopes()[-1] == (msg_type, envs[msg_type])
