"""``fogpay certs``: a small private CA and server/client certificates for labs and tests.

``certs ca DIR`` writes ``DIR/ca.pem`` and ``DIR/ca.key``; ``certs server DIR --name HOST
[--ip ADDR]`` and ``certs client DIR --name NAME`` write ``DIR/NAME.pem`` and ``DIR/NAME.key``
signed by that CA. Keys are ECDSA P-256, written 0600 and never overwritten; certificates
are valid for ``--days`` (default 825). A server certificate names its host in the
subjectAltName (DNS for a name, IP for ``--ip``), which is what clients check; a client
certificate carries the clientAuth usage. Production keeps its own PKI: this is a lab tool.
"""

import argparse
import datetime
import ipaddress
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from protocol.errors import FogpayError
from runtime.cli import EXIT_USAGE, describe, fail, json_option

CA_CERT: Final = "ca.pem"
CA_KEY: Final = "ca.key"
DAYS_DEFAULT: Final = 825
DAYS_MAX: Final = 3650
NAME_CHARS_MAX: Final = 253


class CertsError(FogpayError):
    """A certificate could not be made (a file exists, the CA is missing, a bad name)."""


@dataclass(frozen=True, slots=True)
class Issued:
    cert_file: Path
    key_file: Path


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise CertsError(f"{path}: exists (never overwritten)") from None
    with os.fdopen(fd, "wb") as f:
        f.write(pem)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    try:
        with path.open("xb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
    except FileExistsError:
        raise CertsError(f"{path}: exists (never overwritten)") from None


def _check_name(name: str) -> None:
    if not name or len(name) > NAME_CHARS_MAX or "/" in name or name.startswith("."):
        raise CertsError(f"--name: {name!r} is not a host or client name")
    if name == CA_CERT.removesuffix(".pem"):
        raise CertsError("--name: 'ca' is the CA's own file name")


def make_ca(directory: Path, *, days: int = DAYS_DEFAULT, name: str = "fogpay lab CA") -> Issued:
    """A self-signed CA (path length 0) in ``directory`` (created 0700 if missing)."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    cert_file, key_file = directory / CA_CERT, directory / CA_KEY
    if cert_file.exists() or key_file.exists():
        raise CertsError(f"{directory}: a CA is there already (never overwritten)")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_key(key_file, key)
    _write_cert(cert_file, cert)
    return Issued(cert_file, key_file)


def _load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate((directory / CA_CERT).read_bytes())
        key = serialization.load_pem_private_key((directory / CA_KEY).read_bytes(), None)
    except FileNotFoundError as exc:
        raise CertsError(f"{exc.filename}: no CA here (run fogpay certs ca {directory})") from None
    except ValueError as exc:
        raise CertsError(f"{directory}: the CA files do not load: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertsError(f"{directory / CA_KEY}: not an EC key")
    return cert, key


def issue(
    directory: Path,
    name: str,
    *,
    server: bool,
    ips: tuple[str, ...] = (),
    days: int = DAYS_DEFAULT,
) -> Issued:
    """A certificate for ``name`` signed by the CA in ``directory``: for a server, ``name``
    (and every address of ``ips``) goes into the subjectAltName; for a client, the common
    name is the client's name."""
    _check_name(name)
    ca_cert, ca_key = _load_ca(directory)
    try:
        addresses = [ipaddress.ip_address(ip) for ip in ips]
    except ValueError as exc:
        raise CertsError(f"--ip: {exc}") from None
    cert_file, key_file = directory / f"{name}.pem", directory / f"{name}.key"
    if cert_file.exists() or key_file.exists():
        raise CertsError(f"{cert_file}: exists (never overwritten)")
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(min(now + datetime.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if server:
        alt: list[x509.GeneralName] = [x509.IPAddress(a) for a in addresses]
        try:
            ipaddress.ip_address(name)
            alt.insert(0, x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt.insert(0, x509.DNSName(name))
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    _write_key(key_file, key)
    _write_cert(cert_file, cert)
    return Issued(cert_file, key_file)


# --- the command line -----------------------------------------------------------------------


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    certs = sub.add_parser("certs", help="a lab CA and TLS certificates for brokers and clients")
    cmds = certs.add_subparsers(dest="certs_command", required=True, metavar="COMMAND")
    data = [json_option()]  # the output is JSON already
    p = cmds.add_parser("ca", help="create DIR/ca.pem and DIR/ca.key (0600)", parents=data)
    p.add_argument("dir", type=Path)
    p.add_argument("--days", type=int, default=DAYS_DEFAULT)
    p.set_defaults(func=cmd_ca)
    p = cmds.add_parser("server", help="DIR/NAME.pem, DIR/NAME.key for a broker", parents=data)
    p.add_argument("dir", type=Path)
    p.add_argument("--name", required=True, help="the host name clients connect to")
    p.add_argument("--ip", action="append", default=[], help="an address clients use (repeat)")
    p.add_argument("--days", type=int, default=DAYS_DEFAULT)
    p.set_defaults(func=cmd_server)
    p = cmds.add_parser("client", help="DIR/NAME.pem, DIR/NAME.key for a client", parents=data)
    p.add_argument("dir", type=Path)
    p.add_argument("--name", required=True)
    p.add_argument("--days", type=int, default=DAYS_DEFAULT)
    p.set_defaults(func=cmd_client)


def _days(args: argparse.Namespace) -> int:
    days: int = args.days
    if not 1 <= days <= DAYS_MAX:
        raise CertsError(f"--days: 1 to {DAYS_MAX}")
    return days


def _done(what: str, issued: Issued) -> int:
    print(json.dumps({"certs": what, "cert": str(issued.cert_file), "key": str(issued.key_file)}))
    return 0


def cmd_ca(args: argparse.Namespace) -> int:
    try:
        return _done("ca", make_ca(args.dir, days=_days(args)))
    except (CertsError, OSError) as exc:
        return fail("certs ca", describe(exc), code=EXIT_USAGE)


def cmd_server(args: argparse.Namespace) -> int:
    try:
        issued = issue(args.dir, args.name, server=True, ips=tuple(args.ip), days=_days(args))
    except (CertsError, OSError) as exc:
        return fail("certs server", describe(exc), code=EXIT_USAGE)
    return _done("server", issued)


def cmd_client(args: argparse.Namespace) -> int:
    try:
        issued = issue(args.dir, args.name, server=False, days=_days(args))
    except (CertsError, OSError) as exc:
        return fail("certs client", describe(exc), code=EXIT_USAGE)
    return _done("client", issued)
