"""TLS settings of an MQTT client (``mqtts://``), as plain data: the fog's and the cloud's
config modules hold them without loading ssl, sockets or asyncio (the fog's sans-IO core
imports its config); ``runtime.mqttshell.tls_context`` makes the SSL context from them."""

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True, kw_only=True)
class TlsSettings:
    """``mqtts://``: the server's certificate must chain to ``ca_file`` (the system's CAs when
    None) and name the host we connect to (the URL's host: a DNS name or an IP address in
    the certificate's subjectAltName); ``cert_file``/``key_file`` is our client certificate
    when the broker asks for one. TLS 1.2 at least."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    def __post_init__(self) -> None:
        assert (self.cert_file is None) == (self.key_file is None), "cert_file with key_file"
