"""Provisioning builders (pure) and the key/provisioning CLI without a broker."""

import json
import stat
from pathlib import Path

import nacl.signing
import pytest

from fogpay.cli import main
from fogpay.provision import (
    ISSUER_SEED_FILE,
    BrokerAddress,
    ProvisionError,
    Validity,
    binding_body,
    device_binding,
    fog_credential,
    lease,
    make_binding,
    owner_credential,
    parse_broker_url,
    revocation,
)
from protocol import topics
from protocol.messages import Binding, FogCredential, Lease, OwnerCredential, Revocation
from protocol.signing import open_envelope, possession_proof, public_key
from runtime.keyfile import load_key_file

NOW = 1_790_000_000_000
VALID = Validity(NOW - 1, NOW + 86_400_000)
# A small-order point (order 8 torsion): refused as a device, owner or fog key.
SMALL_ORDER = bytes.fromhex("c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a")


def key() -> nacl.signing.SigningKey:
    return nacl.signing.SigningKey.generate()


def test_owner_and_fog_credentials_verify_under_the_issuer() -> None:
    issuer, owner, fog = key(), key(), key()
    pub = owner_credential(issuer, owner_id="acme", owner_key=public_key(owner), validity=VALID)
    opened = open_envelope(pub.payload, OwnerCredential, signer=public_key(issuer))
    assert opened.msg.key == public_key(owner) and pub.topic == topics.owner_topic("acme")
    assert pub.summary["id"] == opened.id.hex()
    pub = fog_credential(issuer, fog_id="fog-1", fog_key=public_key(fog), validity=VALID)
    assert (
        open_envelope(pub.payload, FogCredential, signer=public_key(issuer)).msg.fog_id == "fog-1"
    )
    assert pub.topic == "fogpay/1/trust/fog/fog-1"


def test_small_order_keys_are_refused() -> None:
    issuer, owner = key(), key()
    with pytest.raises(ProvisionError):
        owner_credential(issuer, owner_id="acme", owner_key=SMALL_ORDER, validity=VALID)
    binding = make_binding(
        SMALL_ORDER, owner_id="acme", currency="EUR", tx_max_micros=1, day_max_micros=1,
        validity=VALID,
    )  # fmt: skip
    with pytest.raises(ProvisionError):
        device_binding(owner, binding, proof=bytes(64))


def _binding(device: nacl.signing.SigningKey, **kw: object) -> Binding:
    fields: dict = dict(
        owner_id="acme", currency="EUR", tx_max_micros=500, day_max_micros=5_000, validity=VALID
    )
    fields.update(kw)
    return make_binding(public_key(device), **fields)


def test_binding_needs_the_devices_proof_over_these_exact_fields() -> None:
    owner, device, impostor = key(), key(), key()
    binding = _binding(device, payees=["shop-1", "shop-2"])
    proof = possession_proof(device, binding_body(binding))
    pub = device_binding(owner, binding, proof=proof)
    opened = open_envelope(pub.payload, Binding, signer=public_key(owner))
    assert opened.msg == binding and opened.msg.payees == ("shop-1", "shop-2")
    assert pub.topic == topics.bind_topic(public_key(device))
    with pytest.raises(ProvisionError):  # someone else's signature
        device_binding(owner, binding, proof=possession_proof(impostor, binding_body(binding)))
    other = _binding(device, tx_max_micros=501)  # proof over different fields
    with pytest.raises(ProvisionError):
        device_binding(owner, other, proof=proof)


def test_revocation_and_lease() -> None:
    issuer, device = key(), key()
    pub = revocation(issuer, key=public_key(device), reason="stolen", time_ms=NOW)
    r = open_envelope(pub.payload, Revocation, signer=public_key(issuer)).msg
    assert (r.reason, r.time_ms, pub.topic) == ("stolen", NOW, topics.revoke_topic(r.key))
    pubs = [
        lease(
            issuer,
            owner_id="acme",
            fog_id="fog-1",
            amount_micros=10**9,
            currency="JPY",
            not_after_ms=NOW,
        )
        for _ in range(2)
    ]
    leases = [open_envelope(p.payload, Lease, signer=public_key(issuer)).msg for p in pubs]
    assert leases[0].lease_id != leases[1].lease_id  # random ids
    assert pubs[0].topic == topics.lease_topic("fog-1", leases[0].lease_id)


def test_broker_urls() -> None:
    assert parse_broker_url("mqtt://dev:p%40ss@127.0.0.1:1884") == BrokerAddress(
        "127.0.0.1", 1884, "dev", "p@ss"
    )
    assert parse_broker_url("127.0.0.1:1999") == BrokerAddress("127.0.0.1", 1999)
    assert parse_broker_url("mqtt://[::1]").port == 1883
    for bad in ("http://127.0.0.1", "mqtt://", "mqtt://h:notaport"):
        with pytest.raises(ProvisionError):
            parse_broker_url(bad)


def test_validity_backdates_a_little_and_refuses_nonsense() -> None:
    v = Validity.days(1, now=NOW)
    assert v.not_before_ms < NOW < v.not_after_ms == NOW + 86_400_000
    with pytest.raises(ProvisionError):
        Validity.days(0, now=NOW)


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[dict]]:
    rc = main(list(argv))
    out = capsys.readouterr().out
    return rc, [json.loads(line) for line in out.splitlines()]


def test_cli_offline_chain_prints_ids_never_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, [init] = _run(capsys, "issuer", "init", "--dir", str(tmp_path / "iss"))
    seed_file = tmp_path / "iss" / ISSUER_SEED_FILE
    assert rc == 0 and stat.S_IMODE(seed_file.stat().st_mode) == 0o600
    issuer = load_key_file(seed_file)
    assert init["issuer_key"] == public_key(issuer).hex()
    assert main(["issuer", "init", "--dir", str(tmp_path / "iss")]) == 2  # never overwrites
    capsys.readouterr()
    rc, [dev] = _run(capsys, "keys", "new", str(tmp_path / "dev.key"))
    assert rc == 0
    rc, [owner] = _run(
        capsys, "owner", "add", "--issuer-key", str(seed_file), "--owner-id", "acme",
        "--owner-key", str(tmp_path / "owner.key"),
    )  # fmt: skip
    assert rc == 0 and owner["published"] is False
    env = bytes.fromhex(owner["envelope"])
    assert open_envelope(env, OwnerCredential, signer=public_key(issuer)).msg.owner_id == "acme"
    rc, [bind] = _run(
        capsys, "device", "bind", "--owner-key", str(tmp_path / "owner.key"),
        "--owner-id", "acme", "--device-key", str(tmp_path / "dev.key"), "--currency", "EUR",
        "--tx-max", "1000", "--day-max", "9000", "--payee", "shop-1",
    )  # fmt: skip
    assert rc == 0 and bind["device"] == dev["public_key"]
    secrets = [(tmp_path / name).read_text().strip() for name in ("owner.key", "dev.key")] + [
        seed_file.read_text().strip()
    ]
    printed = json.dumps([init, dev, owner, bind])
    assert not any(s in printed for s in secrets)


def test_cli_remote_device_binding_with_its_proof(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main(["keys", "new", str(tmp_path / "owner.key")])
    main(["keys", "new", str(tmp_path / "dev.key")])
    dev_pub = json.loads(capsys.readouterr().out.splitlines()[1])["public_key"]
    fields = ["--owner-id", "acme", "--currency", "EUR", "--tx-max", "10", "--day-max", "99"]
    window = ["--not-before", str(NOW), "--not-after", str(NOW + 1000)]
    rc, [proof] = _run(
        capsys, "keys", "prove", "--device-key", str(tmp_path / "dev.key"), *fields, *window
    )
    assert rc == 0
    owner_args = ["device", "bind", "--owner-key", str(tmp_path / "owner.key"), *fields, *window]
    rc, [bind] = _run(capsys, *owner_args, "--device-pub", dev_pub, "--proof", proof["proof"])
    assert rc == 0 and bind["device"] == dev_pub
    bad_proof = bytes(64).hex()
    assert main([*owner_args, "--device-pub", dev_pub, "--proof", bad_proof]) == 2
    assert "proof of possession" in capsys.readouterr().err
    # a proof for other fields does not carry over
    other = [*owner_args[:-1], str(NOW + 2000)]
    assert main([*other, "--device-pub", dev_pub, "--proof", proof["proof"]]) == 2


def test_cli_certify_fog_and_refuse_bad_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main(["issuer", "init", "--dir", str(tmp_path)])
    capsys.readouterr()
    seed_file = str(tmp_path / ISSUER_SEED_FILE)
    fog = public_key(key()).hex()
    rc, [cred] = _run(
        capsys, "issuer", "certify-fog", "--issuer-key", seed_file, "--fog-id", "fog-9",
        "--fog-pub", fog, "--days", "2",
    )  # fmt: skip
    assert rc == 0 and cred["topic"] == "fogpay/1/trust/fog/fog-9" and cred["key"] == fog
    msg = open_envelope(bytes.fromhex(cred["envelope"]), FogCredential).msg
    assert msg.not_after_ms - msg.not_before_ms == 2 * 86_400_000 + 60_000
    bad = ["issuer", "certify-fog", "--issuer-key", seed_file, "--fog-id", "fog-9"]
    assert main([*bad, "--fog-pub", SMALL_ORDER.hex()]) == 2
    assert main([*bad[:-1], "Trust", "--fog-pub", fog]) == 2  # not a fog_id
    tmp_path.joinpath("loose.key").write_text(load_key_file(seed_file).encode().hex())
    tmp_path.joinpath("loose.key").chmod(0o644)
    assert main([*bad[:3], str(tmp_path / "loose.key"), *bad[4:], "--fog-pub", fog]) == 2
