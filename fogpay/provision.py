"""Provisioning: the issuer's and owners' signed messages, and the thin layer that publishes them.

The builders are pure: they take keys and fields and return a :class:`Publication` (the
spec's topic, the envelope bytes, and a printable summary with ids in hex and never a private
key). ``publish_retained`` sends publications to a broker, retained with QoS 1, as spec
section 8 wants for trust and lease topics. The CLI commands (``fogpay issuer init``,
``issuer certify-fog``, ``owner add``, ``device bind``, ``device revoke``, ``lease grant``)
are a few lines each over these two layers. They are for a fog without a cloud
(``uplink.enabled = false``): where a cloud runs, it is the one writer of trust
(docs/protocol.md 15.1: only its broker account may publish the trust and lease topics) and
owners, bindings, revocations and leases go through its registry (``fogpay cloud owner add``,
``device bind``, ``device revoke --envelope``, ``lease grant``); a fog that acts on anything
else raises ``record_rejected`` alarms at the cloud.

Proof of possession (spec section 3 leaves it to us): the device signs
``b"fogpay/1/pop\\x00" + binding body`` with its own key (``protocol.signing.possession_proof``).
Binding bodies are canonical (fields in table order, shortest msgpack encodings), so a device
that knows the binding's fields can compute the body and its proof before the owner signs.
"""

import argparse
import asyncio
import json
import os
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qs, unquote, urlsplit

import aiomqtt
import nacl.signing

from protocol import limits, topics
from protocol.errors import Declined, FogpayError
from protocol.messages import (
    Binding,
    FogCredential,
    Lease,
    OwnerCredential,
    Revocation,
    encode_body,
)
from protocol.signing import (
    Signed,
    is_valid_public_key,
    possession_proof,
    public_key,
    seal_signed,
    verify_possession,
)
from runtime.cli import report
from runtime.keyfile import KeyFileError, load_key_file, new_key_file
from runtime.mqttshell import ClientSettings, client_for, connect_client
from runtime.tlsconf import TlsSettings

ISSUER_SEED_FILE: Final = "issuer.seed"
VALIDITY_DAYS_DEFAULT: Final = 365
CLOCK_SLACK_MS: Final = 60_000  # nb is backdated a little so that a slow fog clock accepts it
DAY_MS: Final = 86_400_000
PUBLISH_TIMEOUT_S: Final = 10.0
CONNECT_TIMEOUT_S: Final = 10.0
MQTT_PORT_DEFAULT: Final = 1883
MQTTS_PORT_DEFAULT: Final = 8883


class ProvisionError(FogpayError):
    """A provisioning request is refused (bad key, failed proof, bad URL)."""


@dataclass(frozen=True, slots=True)
class Publication:
    """One retained message to publish, and what to print about it."""

    topic: str
    payload: bytes
    summary: dict[str, Any] = field(default_factory=dict)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class Validity:
    not_before_ms: int
    not_after_ms: int

    @classmethod
    def days(cls, days: float, *, now: int) -> "Validity":
        if days <= 0:
            raise ProvisionError(f"validity must be positive, got {days} days")
        return cls(max(0, now - CLOCK_SLACK_MS), now + int(days * DAY_MS))


def _publication(topic: str, signed: Signed[Any], **summary: Any) -> Publication:
    info = {"type": signed.msg.TYPE, "topic": topic, "id": signed.id.hex(), **summary}
    return Publication(topic, signed.raw, info)


def _check_key(key: bytes, what: str) -> None:
    if not is_valid_public_key(key):
        raise ProvisionError(
            f"{what}: not a valid Ed25519 public key (small-order or non-canonical)"
        )


def owner_credential(
    issuer: nacl.signing.SigningKey, *, owner_id: str, owner_key: bytes, validity: Validity
) -> Publication:
    _check_key(owner_key, "owner key")
    msg = OwnerCredential(
        owner_id=owner_id,
        key=owner_key,
        not_before_ms=validity.not_before_ms,
        not_after_ms=validity.not_after_ms,
    )
    signed = seal_signed(msg, issuer)
    return _publication(topics.owner_topic(owner_id), signed, owner=owner_id, key=owner_key.hex())


def fog_credential(
    issuer: nacl.signing.SigningKey, *, fog_id: str, fog_key: bytes, validity: Validity
) -> Publication:
    _check_key(fog_key, "fog key")
    msg = FogCredential(
        fog_id=fog_id,
        key=fog_key,
        not_before_ms=validity.not_before_ms,
        not_after_ms=validity.not_after_ms,
    )
    signed = seal_signed(msg, issuer)
    return _publication(topics.fog_topic(fog_id), signed, fog=fog_id, key=fog_key.hex())


def binding_body(binding: Binding) -> bytes:
    """The body bytes the owner will sign: what the device's proof of possession covers."""
    return encode_body(binding)


def device_binding(
    owner: nacl.signing.SigningKey, binding: Binding, *, proof: bytes
) -> Publication:
    """Owner-signed binding, published only once the device's proof of possession verifies."""
    _check_key(binding.device, "device key")
    signed = seal_signed(binding, owner)
    if not verify_possession(binding.device, signed.body, proof):
        raise ProvisionError("device proof of possession does not verify")
    return _publication(
        topics.bind_topic(binding.device),
        signed,
        device=binding.device.hex(),
        owner=binding.owner_id,
        currency=binding.currency,
        tx_max_micros=binding.tx_max_micros,
        day_max_micros=binding.day_max_micros,
    )


def revocation(
    signer: nacl.signing.SigningKey, *, key: bytes, reason: str, time_ms: int
) -> Publication:
    signed = seal_signed(Revocation(key=key, time_ms=time_ms, reason=reason), signer)
    return _publication(topics.revoke_topic(key), signed, key=key.hex(), reason=reason)


def lease(
    issuer: nacl.signing.SigningKey,
    *,
    owner_id: str,
    fog_id: str,
    amount_micros: int,
    currency: str,
    not_after_ms: int,
    lease_id: bytes | None = None,
) -> Publication:
    lid = secrets.token_bytes(limits.LEASE_ID_BYTES) if lease_id is None else lease_id
    msg = Lease(
        lease_id=lid,
        owner_id=owner_id,
        fog_id=fog_id,
        amount_micros=amount_micros,
        currency=currency,
        not_after_ms=not_after_ms,
    )
    signed = seal_signed(msg, issuer)
    return _publication(
        topics.lease_topic(fog_id, lid),
        signed,
        lease=lid.hex(),
        owner=owner_id,
        fog=fog_id,
        amount_micros=amount_micros,
        currency=currency,
    )


# --- the thin publishing layer ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    host: str
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: TlsSettings | None = None  # mqtts://: the CA (and client certificate) to use

    @property
    def url(self) -> str:
        """``mqtt(s)://host:port``, no credentials (for messages)."""
        return self.settings().url

    def settings(self, identifier_prefix: str = "fogpay-tool") -> ClientSettings:
        return ClientSettings(
            hostname=self.host,
            port=self.port,
            identifier_prefix=identifier_prefix,
            username=self.username,
            password=self.password,
            connect_timeout_s=PUBLISH_TIMEOUT_S,
            tls=self.tls,
        )

    def client(self, *, identifier: str | None = None) -> aiomqtt.Client:
        """An aiomqtt client for this broker through ``runtime.mqttshell.client_for`` (TCP_NODELAY,
        TLS when mqtts://); connect it with ``connect`` for the one-line TLS error."""
        return client_for(self.settings(), identifier=identifier)

    async def connect(self, client: aiomqtt.Client) -> None:
        """Connect ``client`` (made by ``client``); a refused certificate raises
        ``BrokerTlsError`` (``broker mqtts://...: TLS: ...``)."""
        await connect_client(client, self.settings())


URL_TLS_KEYS: Final = ("ca_file", "cert_file", "key_file")


def parse_broker_url(url: str) -> BrokerAddress:
    """``mqtt://user:pass@host:port`` (user, pass and port optional), ``host:port``, or
    ``mqtts://...?ca_file=PATH[&cert_file=PATH&key_file=PATH]`` (TLS; port 8883 by default;
    no ca_file: the system's CAs)."""
    parts = urlsplit(url if "://" in url else f"mqtt://{url}")
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise ProvisionError(
            f"broker URL must be mqtt:// or mqtts://[user:pass@]host[:port], got {_redacted(url)!r}"
        )
    tls_on = parts.scheme == "mqtts"
    try:
        port = parts.port or (MQTTS_PORT_DEFAULT if tls_on else MQTT_PORT_DEFAULT)
    except ValueError as exc:
        raise ProvisionError(f"broker URL: bad port in {_redacted(url)!r}") from exc
    query = parse_qs(parts.query, strict_parsing=False)
    unknown = set(query) - set(URL_TLS_KEYS)
    if unknown:
        raise ProvisionError(f"broker URL: unknown parameter {sorted(unknown)[0]!r}")
    files = {k: Path(v[-1]) for k, v in query.items()}
    if files and not tls_on:
        raise ProvisionError("broker URL: ca_file, cert_file and key_file need mqtts://")
    if ("cert_file" in files) != ("key_file" in files):
        raise ProvisionError("broker URL: give cert_file and key_file together")
    tls = TlsSettings(**files) if tls_on else None
    user = unquote(parts.username) if parts.username is not None else None
    password = unquote(parts.password) if parts.password is not None else None
    return BrokerAddress(parts.hostname, port, user, password, tls)


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return url.replace(f":{parts.password}@", ":***@", 1)


async def publish_retained(broker: BrokerAddress, pubs: Iterable[Publication]) -> None:
    """Publish each message retained with QoS 1; returns once the broker acknowledged all."""
    async with asyncio.timeout(CONNECT_TIMEOUT_S):
        client = broker.client()
        await broker.connect(client)
    try:
        for pub in pubs:
            await client.publish(pub.topic, pub.payload, qos=1, retain=True)
    finally:
        await client.__aexit__(None, None, None)


def emit(pubs: Iterable[Publication], broker_url: str | None) -> int:
    """Publish (when a broker is given) and print one JSON line per message."""
    pubs = list(pubs)
    if broker_url is not None:
        asyncio.run(publish_retained(parse_broker_url(broker_url), pubs))
    for pub in pubs:
        info = dict(pub.summary, published=broker_url is not None, envelope=pub.payload.hex())
        print(json.dumps(info, sort_keys=True))
    return 0


# --- CLI ----------------------------------------------------------------------------------


def load_or_create_key(path: Path) -> nacl.signing.SigningKey:
    return load_key_file(path) if path.exists() else new_key_file(path)


def _hex_key(text: str) -> bytes:
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise argparse.ArgumentTypeError("not hex") from None
    if len(key) != limits.KEY_BYTES:
        raise argparse.ArgumentTypeError(f"must be {limits.KEY_BYTES} bytes of hex")
    return key


def _hex_bytes(text: str) -> bytes:
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise argparse.ArgumentTypeError("not hex") from None


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--broker", help="mqtt://[user:pass@]127.0.0.1:PORT (omit to only print)")
    p.add_argument("--days", type=float, default=VALIDITY_DAYS_DEFAULT, help="validity")
    p.add_argument("--json", action="store_true", help="accepted: the output is JSON lines")
    p.set_defaults(command_name=p.prog.split(" ", 1)[-1])


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    _register_issuer(sub)
    _register_owner(sub)
    _register_device(sub)
    _register_lease(sub)


def _register_issuer(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    issuer = sub.add_parser("issuer", help="issuer key and fog credentials")
    cmds = issuer.add_subparsers(dest="issuer_command", required=True, metavar="COMMAND")
    p = cmds.add_parser("init", help=f"write DIR/{ISSUER_SEED_FILE} (hex seed, 0600)")
    p.add_argument("--dir", required=True, type=Path)
    p.add_argument("--json", action="store_true", help="accepted: the output is JSON")
    p.set_defaults(func=cmd_issuer_init)
    p = cmds.add_parser("certify-fog", help="issuer signs a fog credential")
    p.add_argument("--issuer-key", required=True, type=Path)
    p.add_argument("--fog-id", required=True)
    p.add_argument("--fog-pub", required=True, type=_hex_key, help="fog public key (hex)")
    _common(p)
    p.set_defaults(func=cmd_certify_fog)


def _register_owner(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    owner = sub.add_parser("owner", help="owner credentials")
    cmds = owner.add_subparsers(dest="owner_command", required=True, metavar="COMMAND")
    p = cmds.add_parser("add", help="issuer signs an owner credential")
    p.add_argument("--issuer-key", required=True, type=Path)
    p.add_argument("--owner-id", required=True)
    p.add_argument("--owner-key", required=True, type=Path, help="created if missing")
    _common(p)
    p.set_defaults(func=cmd_owner_add)


def _register_device(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    device = sub.add_parser("device", help="device bindings and revocations")
    cmds = device.add_subparsers(dest="device_command", required=True, metavar="COMMAND")
    p = cmds.add_parser("bind", help="owner signs a binding; the device's proof is checked")
    p.add_argument("--owner-key", required=True, type=Path)
    p.add_argument("--owner-id", required=True)
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--device-key", type=Path, help="the device's key file (local device)")
    who.add_argument("--device-pub", type=_hex_key, help="remote device's public key (hex)")
    p.add_argument("--proof", type=_hex_bytes, help="with --device-pub: its possession proof")
    p.add_argument("--not-before", type=int, help="binding nb (ms); needed with --proof")
    p.add_argument("--not-after", type=int, help="binding na (ms); needed with --proof")
    p.add_argument("--currency", required=True)
    p.add_argument("--tx-max", required=True, type=int, help="micros per intent")
    p.add_argument("--day-max", required=True, type=int, help="micros per UTC day")
    p.add_argument("--payee", action="append", help="allowed payee_id (repeat; default any)")
    _common(p)
    p.set_defaults(func=cmd_device_bind)
    p = cmds.add_parser("revoke", help="issuer or owner revokes a key")
    p.add_argument("--signer-key", required=True, type=Path, help="issuer or owner key file")
    p.add_argument("--key", required=True, type=_hex_key, help="revoked public key (hex)")
    p.add_argument("--reason", default="revoked")
    _common(p)
    p.set_defaults(func=cmd_device_revoke)


def _register_lease(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    lease_p = sub.add_parser("lease", help="credit leases")
    cmds = lease_p.add_subparsers(dest="lease_command", required=True, metavar="COMMAND")
    p = cmds.add_parser("grant", help="issuer signs a lease of an owner's budget for a fog")
    p.add_argument("--issuer-key", required=True, type=Path)
    p.add_argument("--owner-id", required=True)
    p.add_argument("--fog-id", required=True)
    p.add_argument("--amount", required=True, type=int, help="micros")
    p.add_argument("--currency", required=True)
    _common(p)
    p.set_defaults(func=cmd_lease_grant)


def _fail(what: str, exc: Exception) -> int:
    """One line; 2 for a refused argument (a bad key, proof, field or URL, a key file, a
    field the message refuses as malformed), 1 when the broker cannot be reached or does not
    acknowledge (runtime.cli)."""
    return report(what, exc, (ProvisionError, Declined))


def cmd_issuer_init(args: argparse.Namespace) -> int:
    path = Path(args.dir) / ISSUER_SEED_FILE
    try:
        os.makedirs(args.dir, exist_ok=True)
        key = new_key_file(path)
    except (OSError, KeyFileError) as exc:
        return _fail("issuer init", exc)
    print(json.dumps({"issuer_key": public_key(key).hex(), "seed_file": str(path)}))
    return 0


def _run(build: Any, args: argparse.Namespace) -> int:
    try:
        return emit(build(), args.broker)
    except (FogpayError, KeyFileError, aiomqtt.MqttError, TimeoutError, OSError) as exc:
        return _fail(args.command_name, exc)


def cmd_certify_fog(args: argparse.Namespace) -> int:
    def build() -> list[Publication]:
        validity = Validity.days(args.days, now=now_ms())
        issuer = load_key_file(args.issuer_key)
        return [fog_credential(issuer, fog_id=args.fog_id, fog_key=args.fog_pub, validity=validity)]

    return _run(build, args)


def cmd_owner_add(args: argparse.Namespace) -> int:
    def build() -> list[Publication]:
        validity = Validity.days(args.days, now=now_ms())
        issuer = load_key_file(args.issuer_key)
        owner = load_or_create_key(args.owner_key)
        return [
            owner_credential(
                issuer, owner_id=args.owner_id, owner_key=public_key(owner), validity=validity
            )
        ]

    return _run(build, args)


def make_binding(
    device: bytes,
    *,
    owner_id: str,
    currency: str,
    tx_max_micros: int,
    day_max_micros: int,
    validity: Validity,
    payees: Iterable[str] | None = None,
) -> Binding:
    return Binding(
        device=device,
        owner_id=owner_id,
        not_before_ms=validity.not_before_ms,
        not_after_ms=validity.not_after_ms,
        currency=currency,
        tx_max_micros=tx_max_micros,
        day_max_micros=day_max_micros,
        payees=tuple(payees) if payees else None,
    )


def bind_local_device(
    owner: nacl.signing.SigningKey, device: nacl.signing.SigningKey, binding: Binding
) -> Publication:
    """Binding for a device whose key is at hand (sandbox, simulator): it proves possession."""
    assert binding.device == public_key(device)
    return device_binding(owner, binding, proof=possession_proof(device, binding_body(binding)))


def _bind_validity(args: argparse.Namespace) -> Validity:
    if args.not_before is None and args.not_after is None:
        return Validity.days(args.days, now=now_ms())
    if args.not_before is None or args.not_after is None:
        raise ProvisionError("give both --not-before and --not-after")
    return Validity(args.not_before, args.not_after)


def cmd_device_bind(args: argparse.Namespace) -> int:
    def build() -> list[Publication]:
        owner = load_key_file(args.owner_key)
        device = load_key_file(args.device_key) if args.device_key else None
        binding = make_binding(
            public_key(device) if device else args.device_pub,
            owner_id=args.owner_id,
            currency=args.currency,
            tx_max_micros=args.tx_max,
            day_max_micros=args.day_max,
            validity=_bind_validity(args),
            payees=args.payee,
        )
        if device is not None:
            return [bind_local_device(owner, device, binding)]
        if args.proof is None:
            raise ProvisionError("--device-pub needs --proof (and --not-before/--not-after)")
        return [device_binding(owner, binding, proof=args.proof)]

    return _run(build, args)


def cmd_device_revoke(args: argparse.Namespace) -> int:
    def build() -> list[Publication]:
        signer = load_key_file(args.signer_key)
        return [revocation(signer, key=args.key, reason=args.reason, time_ms=now_ms())]

    return _run(build, args)


def cmd_lease_grant(args: argparse.Namespace) -> int:
    def build() -> list[Publication]:
        issuer = load_key_file(args.issuer_key)
        expiry = Validity.days(args.days, now=now_ms()).not_after_ms
        return [
            lease(
                issuer,
                owner_id=args.owner_id,
                fog_id=args.fog_id,
                amount_micros=args.amount,
                currency=args.currency,
                not_after_ms=expiry,
            )
        ]

    return _run(build, args)
