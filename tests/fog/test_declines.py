"""Every decline code of spec section 6, reached through FogStore.process with real material."""

import hashlib
from pathlib import Path

import msgpack
import nacl.signing
import pytest

from fog.authorize import Policy
from protocol.codec import pack
from protocol.messages import ZERO_KEY
from protocol.reasons import Reason
from protocol.signing import public_key
from tests.fog.world import DAY_MS, NOW, World, key

Acme = tuple[nacl.signing.SigningKey, nacl.signing.SigningKey]


@pytest.fixture
def acme(world: World) -> Acme:
    owner = world.owner("acme")
    dev = world.device(owner, "acme", pay=("shop", "cafe"), tx=5_000_000, day=8_000_000)
    world.lease("acme", 100_000_000)
    return owner, dev


def test_authorized_receipt_fields(world: World, acme: Acme) -> None:
    _, dev = acme
    o = world.pay(dev, 1, 2_000_000)
    assert (o.status, o.reason, o.log_index, o.seq, o.owner_id) == ("ok", None, 1, 1, "acme")
    assert o.device == public_key(dev) and o.amount_micros == 2_000_000 and not o.replay


@pytest.mark.parametrize(
    "payload",
    [b"", b"\x01\x02", msgpack.packb(["intent", b"x", b"y"]), b"\x94" + b"\xc0" * 4, b"\xff" * 600],
)
def test_malformed(world: World, acme: Acme, payload: bytes) -> None:
    _, dev = acme
    [o] = world.send((dev, payload))
    assert o.reason is Reason.MALFORMED
    assert o.intent_id == hashlib.sha256(payload).digest()
    assert (o.device, o.seq) == (ZERO_KEY, 0)


def test_malformed_trailing_bytes(world: World, acme: Acme) -> None:
    _, dev = acme
    [o] = world.send((dev, world.intent(dev, 1) + b"\x00"))
    assert o.reason is Reason.MALFORMED


def _resign_garbage(envelope: bytes) -> bytes:
    t, body, signer, _ = msgpack.unpackb(envelope)
    return pack([t, body, signer, bytes(64 - 1) + b"\x01"])


def test_bad_signature(world: World, acme: Acme) -> None:
    _, dev = acme
    [o] = world.send((dev, _resign_garbage(world.intent(dev, 1))))
    assert o.reason is Reason.BAD_SIGNATURE
    assert (o.device, o.seq) == (public_key(dev), 1)


def test_bad_signature_signer_not_d(world: World, acme: Acme) -> None:
    _, dev = acme
    other = key()
    t, body, _, _ = msgpack.unpackb(world.intent(dev, 1))
    sig = other.sign(b"fogpay/1/intent\x00" + body).signature
    forged = msgpack.packb([t, body, public_key(other), sig], use_bin_type=True)
    [o] = world.send((dev, forged))
    assert o.reason is Reason.BAD_SIGNATURE


def test_topic_mismatch(world: World, acme: Acme) -> None:
    _, dev = acme
    [o] = world.send((public_key(key()), world.intent(dev, 1)))
    assert o.reason is Reason.TOPIC_MISMATCH


def test_wrong_fog(world: World, acme: Acme) -> None:
    _, dev = acme
    assert world.pay(dev, 1, fog_id="fog-2").reason is Reason.WRONG_FOG


def test_unknown_device_without_binding(world: World, acme: Acme) -> None:
    assert world.pay(key(), 1).reason is Reason.UNKNOWN_DEVICE


def test_unknown_device_without_owner_credential(world: World) -> None:
    ghost_owner = key()  # no credential for "ghost"
    dev = world.device(ghost_owner, "ghost")
    world.lease("ghost")
    assert world.pay(dev, 1).reason is Reason.UNKNOWN_DEVICE


def test_unknown_device_binding_signed_by_other_key(world: World, acme: Acme) -> None:
    impostor = key()  # claims owner acme but is not acme's credential key
    dev = world.device(impostor, "acme")
    assert world.pay(dev, 1).reason is Reason.UNKNOWN_DEVICE


def test_revoked_device_by_issuer(world: World, acme: Acme) -> None:
    _, dev = acme
    world.revoke(public_key(dev))
    assert world.pay(dev, 1).reason is Reason.REVOKED


def test_revoked_device_by_its_owner(world: World, acme: Acme) -> None:
    owner, dev = acme
    world.revoke(public_key(dev), signer=owner)
    assert world.pay(dev, 1).reason is Reason.REVOKED


def test_revocation_by_another_owner_is_not_honoured(world: World, acme: Acme) -> None:
    _, dev = acme
    world.owner("rival")
    world.revoke(public_key(dev), signer=key())
    assert world.pay(dev, 1).status == "ok"


def test_revoked_owner_revokes_its_devices(world: World, acme: Acme) -> None:
    owner, dev = acme
    world.revoke(public_key(owner))
    assert world.pay(dev, 1).reason is Reason.REVOKED


def test_owner_revoking_itself_revokes_its_devices(world: World, acme: Acme) -> None:
    owner, dev = acme
    assert world.pay(dev, 1).status == "ok"
    world.revoke(public_key(owner), signer=owner)  # the owner withdraws (protocol 13.3)
    assert world.pay(dev, 2).reason is Reason.REVOKED


def test_owner_cannot_revoke_another_owner(world: World, acme: Acme) -> None:
    owner, dev = acme
    world.revoke(public_key(owner), signer=key())  # a key that is not this owner's
    assert world.pay(dev, 1).status == "ok"


def test_expired_binding(world: World) -> None:
    owner = world.owner()
    dev = world.device(owner, na=NOW + 1000)
    world.lease(na=NOW + DAY_MS)
    assert world.pay(dev, 1, now_ms=NOW + 1000, t=NOW + 1000).status == "ok"
    assert world.pay(dev, 2, now_ms=NOW + 1001, t=NOW + 1001).reason is Reason.EXPIRED


def test_binding_not_yet_valid(world: World) -> None:
    owner = world.owner()
    dev = world.device(owner, nb=NOW + 1)
    world.lease()
    assert world.pay(dev, 1).reason is Reason.EXPIRED


def test_expired_owner_credential(world: World) -> None:
    owner = world.owner(na=NOW + 5000)
    dev = world.device(owner)
    world.lease()
    assert world.pay(dev, 1, now_ms=NOW + 5001, t=NOW + 5001).reason is Reason.EXPIRED


def test_seq_conflict(world: World, acme: Acme) -> None:
    _, dev = acme
    assert world.pay(dev, 1, 1_000_000).status == "ok"
    assert world.pay(dev, 1, 2_000_000).reason is Reason.SEQ_CONFLICT


def test_stale_sequence(world: World, acme: Acme) -> None:
    _, dev = acme
    assert world.pay(dev, 5).status == "ok"
    assert world.pay(dev, 4).reason is Reason.STALE
    assert world.pay(dev, 6).status == "ok"


@pytest.mark.parametrize("offset", [-300_001, 300_001])
def test_stale_clock(world: World, acme: Acme, offset: int) -> None:
    _, dev = acme
    assert world.pay(dev, 1, t=NOW + offset).reason is Reason.STALE
    assert world.pay(dev, 1, t=NOW + offset // 300_001 * 300_000).status == "ok"


def test_rate_limited(tmp_path: Path) -> None:
    w = World(tmp_path / "fog.db", policy=Policy(rate_per_s=1.0, rate_burst=2))
    owner = w.owner()
    dev = w.device(owner)
    w.lease()
    out = w.send(*[(dev, w.intent(dev, q)) for q in (1, 2, 3)])
    assert [o.reason for o in out] == [None, None, Reason.RATE_LIMITED]
    # one token back a second later: q=3 evaluated afresh
    assert w.pay(dev, 3, now_ms=NOW + 1000).status == "ok"
    w.store.close()


def test_currency(world: World, acme: Acme) -> None:
    _, dev = acme
    world.lease(currency="USD")
    assert world.pay(dev, 1, currency="USD").reason is Reason.CURRENCY


def test_payee_not_allowed(world: World, acme: Acme) -> None:
    _, dev = acme
    assert world.pay(dev, 1, payee="casino").reason is Reason.PAYEE_NOT_ALLOWED
    assert world.pay(dev, 1, payee="cafe").status == "ok"


def test_limit_tx(world: World, acme: Acme) -> None:
    _, dev = acme
    assert world.pay(dev, 1, 5_000_001).reason is Reason.LIMIT_TX
    assert world.pay(dev, 1, 5_000_000).status == "ok"


def test_limit_day_on_the_fogs_utc_day(world: World, acme: Acme) -> None:
    _, dev = acme  # day = 8_000_000
    assert world.pay(dev, 1, 5_000_000).status == "ok"
    assert world.pay(dev, 2, 3_000_001).reason is Reason.LIMIT_DAY
    assert world.pay(dev, 2, 3_000_000).status == "ok"
    assert world.pay(dev, 3, 1).reason is Reason.LIMIT_DAY
    # the device's own clock saying "tomorrow" does not help; the fog's does
    tomorrow = (NOW // DAY_MS + 1) * DAY_MS
    assert world.pay(dev, 3, 1, t=tomorrow + 1).reason is Reason.STALE
    assert world.pay(dev, 3, 5_000_000, now_ms=tomorrow, t=tomorrow).status == "ok"


def test_insufficient_budget(world: World) -> None:
    owner = world.owner()
    dev = world.device(owner)
    assert world.pay(dev, 1).reason is Reason.INSUFFICIENT_BUDGET  # no lease at all
    world.lease(amount=999_999)
    world.lease(currency="USD", amount=10_000_000)
    world.owner("other")
    world.lease("other", amount=10_000_000)
    assert world.pay(dev, 1).reason is Reason.INSUFFICIENT_BUDGET
    world.lease(amount=1_000_000, na=NOW + 10)
    assert world.pay(dev, 1, now_ms=NOW + 11, t=NOW).reason is Reason.INSUFFICIENT_BUDGET
    assert world.pay(dev, 1, now_ms=NOW + 10, t=NOW).status == "ok"


def test_every_reason_is_reachable_here() -> None:
    """Guard: this module has a test per reason (a new reason needs one)."""
    names = {n for n in globals() if n.startswith("test_")}
    for reason in Reason:
        assert any(str(reason) in n for n in names), reason


def test_precedence(world: World) -> None:
    """Several rules broken at once: the first in section 6's order wins."""
    owner = world.owner()
    dev = world.device(owner, tx=10, pay=("shop",))
    world.revoke(public_key(dev))
    # wrong fog and revoked and over limit: wrong_fog
    assert world.pay(dev, 1, 11, fog_id="fog-9", payee="x").reason is Reason.WRONG_FOG
    # revoked and stale and over limit: revoked
    assert world.pay(dev, 1, 11, t=0, payee="x").reason is Reason.REVOKED
    # topic mismatch beats a bad amount of everything after it
    [o] = world.send((public_key(key()), world.intent(dev, 1, 11, fog_id="fog-9")))
    assert o.reason is Reason.TOPIC_MISMATCH


def test_stale_before_currency_and_limits(world: World, acme: Acme) -> None:
    _, dev = acme
    assert world.pay(dev, 3).status == "ok"
    assert world.pay(dev, 2, 9_999_999, currency="USD", payee="x").reason is Reason.STALE
