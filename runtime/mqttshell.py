"""One MQTT shell: connect (TCP_NODELAY), subscribe, serve a session, reconnect with jitter.

Every long-lived client of ours has the same outer loop: make an aiomqtt client, connect,
subscribe with a deadline, hand the connected client to the caller's session, and when the
connection drops (``aiomqtt.MqttError``) back off with a capped, jittered delay
(``runtime.mqttloop.reconnect_delay_s``) and do it again, until told to stop or a bound of
consecutive failures is passed (then the error is raised: systemd restarts the process).
``serve`` is that loop, with the settings spelled out once in ``ClientSettings`` (``tls``:
``mqtts://``: a CA file, the host checked against the certificate, a client certificate);
the fog daemon, the cloud service and the mirror use it. ``Publisher`` is the bounded publish
queue on a connected client (the fog's receipts and uplink, the cloud's retained answers);
``client_for`` makes every client of the project, the device tools' too (TCP_NODELAY).

A session is the caller's: it reads ``client.messages`` (``runtime.mqttloop.read_until_stopped``)
and publishes with its own deadlines; returning from it ends ``serve``. Sessions are clean
(``clean_session=True``): what matters survives in the applications' own retransmission.
"""

import asyncio
import secrets
import socket
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Final

import aiomqtt

from protocol.errors import FogpayError
from runtime.mqttloop import reconnect_delay_s, sleep_or_stop
from runtime.tlsconf import TlsSettings

# Nagle's algorithm holds small packets back waiting for an ACK: a receipt or a PUBACK would
# wait for the peer's delayed ACK (up to 40 ms on Linux) under light load.
TCP_NODELAY_OPTION: Final = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
QOS: Final = 1
MQTTS_PORT_DEFAULT: Final = 8883
# OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH / _IP_ADDRESS_MISMATCH (ssl.SSLCertVerificationError)
_NAME_MISMATCH_CODES: Final = frozenset({62, 64})


class _ClosingSSLSocket(ssl.SSLSocket):
    """paho leaves the socket of a failed handshake (a refused certificate) open until the
    garbage collector finds it: close it where the handshake fails."""

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except BaseException:
            self.close()
            raise


def tls_context(tls: TlsSettings) -> ssl.SSLContext:
    """A client context for ``tls``: verify the chain and the name, TLS 1.2 at least; raises
    OSError / ssl.SSLError when a file does not load."""
    ctx = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=None if tls.ca_file is None else str(tls.ca_file)
    )
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.sslsocket_class = _ClosingSSLSocket
    if tls.cert_file is not None and tls.key_file is not None:
        ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    return ctx


class BrokerTlsError(FogpayError):
    """The broker's certificate was refused (wrong CA, wrong name): retrying cannot help.
    The message is one line: ``broker mqtts://HOST:PORT: TLS: <why>``."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientSettings:
    hostname: str
    port: int
    identifier_prefix: str  # a random suffix follows: a guessed id cannot take a session over
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    keepalive_s: int = 30
    connect_timeout_s: float = 5.0
    subscribe_timeout_s: float = 5.0
    inflight_max: int = 1000  # QoS 1 messages of ours in flight
    incoming_max: int = 10_000  # messages aiomqtt queues for the reader
    pending_calls_threshold: int = 512  # aiomqtt warns past this many calls in flight
    failures_max: int = 1000  # consecutive failed connections; then MqttError is raised
    tls: TlsSettings | None = None  # None: plain MQTT (loopback); set: mqtts://

    @property
    def url(self) -> str:
        """``mqtt(s)://host:port`` (no credentials): for log lines and errors."""
        host = f"[{self.hostname}]" if ":" in self.hostname else self.hostname
        return f"{'mqtts' if self.tls else 'mqtt'}://{host}:{self.port}"

    def __post_init__(self) -> None:
        assert 0 < self.port < 65_536 and self.failures_max >= 0
        assert self.connect_timeout_s > 0 and self.subscribe_timeout_s > 0


def client_for(settings: ClientSettings, *, identifier: str | None = None) -> aiomqtt.Client:
    """A new, unconnected client with the settings (and TCP_NODELAY); ``identifier`` replaces
    the random one (a tool that names its session). A TLS file that does not load raises
    ``BrokerTlsError``."""
    context = None
    if settings.tls is not None:
        try:
            context = tls_context(settings.tls)
        except (OSError, ssl.SSLError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise BrokerTlsError(f"broker {settings.url}: TLS: {why}") from exc
    client = aiomqtt.Client(
        hostname=settings.hostname,
        port=settings.port,
        username=settings.username,
        password=settings.password,
        identifier=identifier or f"{settings.identifier_prefix}-{secrets.token_hex(8)}",
        clean_session=True,
        keepalive=settings.keepalive_s,
        timeout=settings.connect_timeout_s,
        max_inflight_messages=settings.inflight_max,
        max_queued_incoming_messages=settings.incoming_max,
        socket_options=(TCP_NODELAY_OPTION,),
        tls_context=context,
    )
    client.pending_calls_threshold = settings.pending_calls_threshold
    return client


def tls_failure(exc: BaseException, settings: ClientSettings) -> BrokerTlsError | None:
    """The one-line error for a certificate the client refused (anywhere in ``exc``'s causes),
    or None when ``exc`` is something else (a refused connection, a lost one)."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, ssl.SSLCertVerificationError):
            tls = settings.tls
            if cause.verify_code in _NAME_MISMATCH_CODES:
                why = f"name {settings.hostname} does not match the certificate"
            else:
                ca = tls.ca_file if tls and tls.ca_file else "the system's CAs"
                why = f"certificate not trusted by CA {ca} ({cause.verify_message})"
            return BrokerTlsError(f"broker {settings.url}: TLS: {why}")
        cause = cause.__cause__ or cause.__context__
    # aiomqtt 2 flattens some errors into MqttError(str(exc)): read its text as a fallback
    text = str(exc)
    if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
        if "mismatch" in text.lower():
            return BrokerTlsError(
                f"broker {settings.url}: TLS: name {settings.hostname} does not match the"
                " certificate"
            )
        ca = settings.tls.ca_file if settings.tls and settings.tls.ca_file else "system CAs"
        return BrokerTlsError(f"broker {settings.url}: TLS: certificate not trusted by CA {ca}")
    return None


async def connect_client(client: aiomqtt.Client, settings: ClientSettings) -> None:
    """``await client.__aenter__()``, a refused certificate raised as ``BrokerTlsError``."""
    try:
        await client.__aenter__()
    except aiomqtt.MqttError as exc:
        refused = tls_failure(exc, settings)
        if refused is not None:
            raise refused from exc
        raise


async def serve(
    settings: ClientSettings,
    filters: Sequence[str],
    *,
    stopping: asyncio.Event,
    session: Callable[[aiomqtt.Client], Awaitable[None]],
    lost: Callable[[aiomqtt.MqttError, float], Awaitable[None]],
) -> None:
    """Connect, subscribe to ``filters`` (QoS 1), run ``session(client)``; on a lost or
    failed connection call ``lost(error, delay_s)`` and try again after ``delay_s`` (unless
    stopping). Returns when a session returns or when stopping; raises the last
    ``MqttError`` after ``failures_max`` consecutive failures."""
    failures = 0
    while not stopping.is_set():
        client = client_for(settings)
        try:
            async with client:
                failures = 0
                async with asyncio.timeout(settings.subscribe_timeout_s):
                    await client.subscribe([(f, QOS) for f in filters])
                await session(client)
                return
        except aiomqtt.MqttError as exc:
            refused = tls_failure(exc, settings)
            if refused is not None:  # a wrong CA or name: no retry fixes a config
                raise refused from exc
            failures += 1
            if failures > settings.failures_max:
                raise
            delay = reconnect_delay_s(failures)
            await lost(exc, delay)
            await sleep_or_stop(stopping, delay)


class Publisher:
    """The shell's bounded publish queue on one connected client: QoS 1 publishes, at most
    ``in_flight_max`` waiting for their PUBACK at once (a caller past that waits its turn:
    the backpressure reaches the producer instead of piling up in aiomqtt), each with its own
    deadline. ``peak`` is the most that were in flight at once (for tests and stats)."""

    def __init__(self, client: aiomqtt.Client, *, in_flight_max: int, timeout_s: float) -> None:
        assert in_flight_max >= 1 and timeout_s > 0
        self._client = client
        self._slots = asyncio.Semaphore(in_flight_max)
        self._timeout_s = timeout_s
        self._in_flight = 0
        self.peak = 0

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """Raises ``aiomqtt.MqttError`` (a lost connection, a deadline passed)."""
        async with self._slots:
            self._in_flight += 1
            self.peak = max(self.peak, self._in_flight)
            try:
                await self._client.publish(
                    topic, payload, qos=QOS, retain=retain, timeout=self._timeout_s
                )
            finally:
                self._in_flight -= 1

    async def publish_all(
        self, items: Sequence[tuple[str, bytes]], *, retain: bool = False
    ) -> list[BaseException | None]:
        """Publish every item (within the bound); per item None (acknowledged) or the error."""
        results = await asyncio.gather(
            *(self.publish(topic, payload, retain=retain) for topic, payload in items),
            return_exceptions=True,
        )
        return [r if isinstance(r, BaseException) else None for r in results]
