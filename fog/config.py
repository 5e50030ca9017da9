"""The fog daemon's configuration: one frozen dataclass, parsed once from TOML and environment.

``load_config(path)`` reads a TOML file (tomllib), applies the few environment overrides that
deployment tools set (``ENV_OVERRIDES``), checks every value and returns a ``FogConfig``. A bad
config raises ``ConfigError`` whose message is one line naming the key, so a daemon fails at
start, not at the first intent. Every key is documented in ``docs/fog.md`` and in
``deploy/fog.example.toml``.
"""

import ipaddress
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import unquote, urlsplit

from protocol import limits
from protocol.errors import FogpayError
from protocol.messages import is_fog_id
from protocol.signing import is_valid_public_key
from runtime.listen import ListenError, parse_listen
from runtime.tlsconf import TlsSettings

DEFAULT_BROKER_HOST: Final = "127.0.0.1"
DEFAULT_BROKER_PORT: Final = 1883
DEFAULT_BATCH_RECORDS: Final = 256
DEFAULT_BATCH_AGE_MS: Final = 1000
DEFAULT_KEEP_ACKED_MS: Final = 7 * 86_400_000  # a week: far past any device's retransmissions
KEEP_ACKED_MS_MAX: Final = 3650 * 86_400_000
DEFAULT_RATE_PER_S: Final = 20
DEFAULT_RATE_BURST: Final = 40
DEFAULT_STATS_INTERVAL_S: Final = 60.0
PORT_MAX: Final = 65535
BATCH_AGE_MS_MAX: Final = 3_600_000
RATE_PER_S_MAX: Final = 100_000
SECRET_CHARS_MAX: Final = 256
USERNAME_CHARS_MAX: Final = 64
DEFAULT_MQTTS_PORT: Final = 8883
# a batch (protocol.limits.BATCH_WIRE_BYTES_MAX) plus its topic and MQTT header
DEFAULT_PACKET_BYTES_MAX: Final = limits.BATCH_WIRE_BYTES_MAX + 4096
PACKET_BYTES_MAX: Final = 256 * 1024 * 1024 - 1  # MQTT's own bound on a packet
PACKET_BYTES_MIN: Final = 4096
DEFAULT_BROKER_INFLIGHT_MAX: Final = 256
BROKER_INFLIGHT_MAX: Final = 65_535
VERIFY_WORKERS_MAX: Final = 64  # verify_workers (fog/verifyproc.py)
PACKETS_PER_S_MAX: Final = 1_000_000

# Environment variables that override a TOML key (systemd EnvironmentFile, containers).
ENV_OVERRIDES: Final[Mapping[str, tuple[str, ...]]] = {
    "FOGPAY_FOG_DB": ("db",),
    "FOGPAY_FOG_KEY_FILE": ("key_file",),
    "FOGPAY_FOG_BROKER_URL": ("broker", "url"),
    "FOGPAY_FOG_BROKER_PORT": ("broker", "port"),
    "FOGPAY_FOG_BROKER_PASSWORD": ("broker", "password"),
    "FOGPAY_FOG_LOG_LEVEL": ("log_level",),
}
LOG_LEVELS: Final = frozenset({"debug", "info", "warning", "error"})


class ConfigError(FogpayError):
    """A configuration value is missing or wrong; the message names the key."""


@dataclass(frozen=True, slots=True, kw_only=True)
class BrokerConfig:
    """Where the fog's MQTT traffic goes.

    ``url`` unset: the fog starts an embedded amqtt broker on ``host:port`` (port 0 picks a
    free port) with two accounts: the fog's own (``username``/``password``) and one shared by
    devices (``device_username``/``device_password``). ``url`` set: the fog connects to that
    broker (Mosquitto in production) with the credentials in the URL.
    """

    url: str | None = None
    host: str = DEFAULT_BROKER_HOST
    port: int = DEFAULT_BROKER_PORT
    username: str = "fog"
    password: str = field(default="", repr=False)
    device_username: str = "device"
    device_password: str = field(default="", repr=False)
    allow_public_bind: bool = False
    # the embedded broker's accounts file (fog.brokerauth; written by cloud.accounts), or ""
    accounts_file: str = ""
    # the embedded broker in a child process (python -m fog.brokerchild) rather than on the fog's
    # event loop: amqtt costs more CPU per message than the fog's own client
    process: bool = True
    # intents handed from the embedded broker (on the fog's event loop) straight to the fog's
    # queue, and receipts straight back into it, past the fog's own MQTT client
    # (fog.broker.FogBroker); needs process = false
    handoff: bool = False
    # TLS for the fog's own connection to ``url`` when it is mqtts:// (paths as str: the
    # config travels to the broker process as JSON)
    ca_file: str | None = None  # the broker's CA; None: the system's CAs
    cert_file: str | None = None  # a client certificate, when the broker asks for one
    key_file: str | None = None
    # the embedded broker's TLS listener (devices beyond loopback): None: none; 0: a free port
    tls_port: int | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_ca_file: str | None = None  # set: clients must present a certificate from this CA
    # abuse limits of the embedded broker, per connection: a packet longer than this closes
    # the connection; QoS 1 PUBLISHes read and not yet acknowledged (more: reading pauses)
    packet_bytes_max: int = DEFAULT_PACKET_BYTES_MAX
    inflight_max: int = DEFAULT_BROKER_INFLIGHT_MAX
    # packets a second read from one connection other than the fog's own (0: no limit; a
    # gateway carrying many devices on one connection needs room for all of them)
    packets_per_s: int = 0

    @property
    def embedded(self) -> bool:
        return self.url is None


@dataclass(frozen=True, slots=True, kw_only=True)
class BatchConfig:
    records_max: int = DEFAULT_BATCH_RECORDS
    age_ms: int = DEFAULT_BATCH_AGE_MS
    # log records acked by the cloud (and of closed leases) are deleted once this old;
    # 0: never
    keep_acked_ms: int = DEFAULT_KEEP_ACKED_MS


@dataclass(frozen=True, slots=True, kw_only=True)
class PolicyConfig:
    clock_skew_ms: int = limits.CLOCK_SKEW_MS_MAX
    rate_per_s: int = DEFAULT_RATE_PER_S
    rate_burst: int = DEFAULT_RATE_BURST


DEFAULT_UPLINK_WINDOW: Final = 8
DEFAULT_ACK_TIMEOUT_MS: Final = 10_000
UPLINK_WINDOW_MAX: Final = 64  # the cloud holds at most 64 batches ahead of its chain
TIMEOUT_MS_MAX: Final = 3_600_000
DEFAULT_REQUEST_BELOW_MICROS: Final = 1_000_000
DEFAULT_REQUEST_MICROS: Final = 10_000_000
DEFAULT_REQUEST_TIMEOUT_MS: Final = 5_000
DEFAULT_REQUEST_ATTEMPTS: Final = 5
REQUEST_ATTEMPTS_MAX: Final = 100
DEFAULT_REPORT_RETRY_MS: Final = 5_000
DEFAULT_LEASE_CHECK_MS: Final = 1_000
DEFAULT_BACKLOG_ALARM_RECORDS: Final = 100_000
BACKLOG_ALARM_RECORDS_MAX: Final = 2**40
DEFAULT_RENEW_BEFORE_MS: Final = 300_000
DEFAULT_RECALL_IDLE_MS: Final = 10_000  # lease.recall_idle_ms (18.5)
RETURN_IDLE_MS_MAX: Final = 7 * 86_400_000  # lease.return_idle_ms: a week at most


@dataclass(frozen=True, slots=True, kw_only=True)
class UplinkConfig:
    """``[uplink]``: batches to the cloud, acks back (fog/uplink.py)."""

    enabled: bool = True  # false: no batch, lreq or lrep leaves this fog
    window: int = DEFAULT_UPLINK_WINDOW  # unacked batches in flight
    ack_timeout_ms: int = DEFAULT_ACK_TIMEOUT_MS  # no ack moved: send from the first unacked
    # alarm uplink_backlog past this many unacked records (0: off; docs/protocol.md 17.6)
    backlog_alarm_records: int = DEFAULT_BACKLOG_ALARM_RECORDS


@dataclass(frozen=True, slots=True, kw_only=True)
class LeaseConfig:
    """``[lease]``: lease requests and reports to the cloud (fog/leasing.py)."""

    request_below_micros: int = DEFAULT_REQUEST_BELOW_MICROS  # top up under this room
    request_micros: int = DEFAULT_REQUEST_MICROS  # a top-up asks for this much
    request_timeout_ms: int = DEFAULT_REQUEST_TIMEOUT_MS  # resend an unanswered request
    request_attempts_max: int = DEFAULT_REQUEST_ATTEMPTS  # sends of one request
    report: bool = True  # report expired leases (lrep) so their unused credit returns
    report_retry_ms: int = DEFAULT_REPORT_RETRY_MS  # first resend delay, doubling to 5 min
    check_interval_ms: int = DEFAULT_LEASE_CHECK_MS  # how often expiry and resends are checked
    # ask an owner's next lease when its live leases all expire within this (0: off; 17.6)
    renew_before_ms: int = DEFAULT_RENEW_BEFORE_MS
    # give back (report early) the leases of an owner that drew nothing for this long (0: off;
    # docs/protocol.md 18.1)
    return_idle_ms: int = 0
    return_on_stop: bool = False  # give back every live lease at a graceful stop (18.1)
    # the cloud asks (rbal) for an owner's leases back: given if the owner drew nothing here
    # for this long (0: never give; docs/protocol.md 18.5)
    recall_idle_ms: int = DEFAULT_RECALL_IDLE_MS
    # ask peers (federation.peers) for part of their lease while the cloud does not answer,
    # and give to peers that ask (docs/protocol.md 18.2)
    peer_transfers: bool = False


FEDERATION_PEERS_MAX: Final = 32
REPLICAS_MAX: Final = 8
DEFAULT_REPLICAS: Final = 2
DEFAULT_RELAY_AFTER_MS: Final = 30_000
DEFAULT_REPLICA_KEEP_MS: Final = 900_000  # > the clock window, so a restore sees every replay
DEFAULT_REPLICA_BYTES_MAX: Final = 256 * 1024 * 1024
DEFAULT_SEEN_EVERY_MS: Final = 500


@dataclass(frozen=True, slots=True, kw_only=True)
class FederationConfig:
    """``[federation]``: the fog's peers (docs/protocol.md section 17). No peers: the fog is
    alone with its cloud, as before the federation."""

    peers: tuple[str, ...] = ()  # peer fog_ids, in the order replicas are placed
    replicas: int = DEFAULT_REPLICAS  # k: peers that must hold a batch before it is safe
    relay_after_ms: int = DEFAULT_RELAY_AFTER_MS  # a held replica the cloud lacks goes up then
    replica_keep_ms: int = DEFAULT_REPLICA_KEEP_MS  # kept this long after the cloud's ack
    replica_bytes_max: int = DEFAULT_REPLICA_BYTES_MAX  # replicas of others, on this disk
    seen_every_ms: int = DEFAULT_SEEN_EVERY_MS  # (device, q, intent) authorized, to every peer


DEFAULT_METRICS_LISTEN: Final = "127.0.0.1:9464"


@dataclass(frozen=True, slots=True, kw_only=True)
class MetricsConfig:
    """``[metrics]``: Prometheus ``/metrics``, ``/healthz`` and ``/readyz`` over HTTP
    (fog/metrics.py). Off by default: several fogs in one process (tests, demo) would
    collide on one port; the sandbox and production configs turn it on."""

    enabled: bool = False
    host: str = "127.0.0.1"  # from ``listen = "HOST:PORT"`` (an IPv6 host in brackets)
    port: int = 9464  # 0: a free port (logged in ``metrics_listening``)


@dataclass(frozen=True, slots=True, kw_only=True)
class FogConfig:
    fog_id: str
    key_file: Path
    issuer_key: bytes
    db: Path
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    uplink: UplinkConfig = field(default_factory=UplinkConfig)
    lease: LeaseConfig = field(default_factory=LeaseConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    stats_interval_s: float = DEFAULT_STATS_INTERVAL_S
    log_level: str = "info"
    # true: the store (verify, SQLite, sign) runs in a child process (fog/storeproc.py), off
    # the event loop's GIL; false: on a thread of the daemon's process
    store_process: bool = True
    # true: the pipelined group commit (fog/pipeline.py): the next group is decided while the
    # previous one's WAL syncs; false: each COMMIT syncs (synchronous=FULL) before the next
    store_pipeline: bool = True
    # > 0: that many verify worker processes check the intents' signatures before the core
    # decides (fog/verifyproc.py: the core's largest single cost, on other cores of a Pi)
    verify_workers: int = 0


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    """A parsed ``mqtt://user:pass@host:port`` or ``mqtts://`` URL."""

    host: str
    port: int
    username: str | None
    password: str | None
    tls: bool = False


def broker_tls(broker: BrokerConfig) -> TlsSettings:
    """The fog's client TLS settings for an ``mqtts://`` ``broker.url``."""
    return TlsSettings(
        ca_file=None if broker.ca_file is None else Path(broker.ca_file),
        cert_file=None if broker.cert_file is None else Path(broker.cert_file),
        key_file=None if broker.key_file is None else Path(broker.key_file),
    )


def parse_broker_url(url: str, *, key: str = "broker.url") -> BrokerAddress:
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts"):
        raise ConfigError(
            f"{key}: scheme must be mqtt:// or mqtts:// (got {parts.scheme or 'none'!r})"
        )
    tls = parts.scheme == "mqtts"
    try:
        port = parts.port or (DEFAULT_MQTTS_PORT if tls else DEFAULT_BROKER_PORT)
    except ValueError:
        raise ConfigError(f"{key}: invalid port") from None
    if not parts.hostname:
        raise ConfigError(f"{key}: missing host")
    user = unquote(parts.username) if parts.username is not None else None
    password = unquote(parts.password) if parts.password is not None else None
    return BrokerAddress(parts.hostname, port, user, password, tls)


def load_config(path: str | Path, *, env: Mapping[str, str] | None = None) -> FogConfig:
    """Read ``path`` (TOML), apply environment overrides, validate; raises ConfigError."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"config: cannot read {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config: {path}: invalid TOML: {exc}") from exc
    apply_env(raw, os.environ if env is None else env)
    return config_from_dict(raw, base=path.parent)


def apply_env(raw: dict[str, Any], env: Mapping[str, str]) -> None:
    for name, keys in ENV_OVERRIDES.items():
        if name not in env:
            continue
        table = raw
        for key in keys[:-1]:
            table = table.setdefault(key, {})
        value: Any = env[name]
        if keys[-1] == "port":
            try:
                value = int(value)
            except ValueError:
                raise ConfigError(f"{name}: not an integer") from None
        table[keys[-1]] = value


def config_from_dict(raw: Mapping[str, Any], *, base: Path = Path(".")) -> FogConfig:
    """Build and validate a FogConfig from parsed TOML; relative paths resolve from ``base``."""
    _no_unknown(
        raw,
        "",
        {"fog_id", "key_file", "issuer_key", "db", "broker", "batch", "policy"}
        | {"stats_interval_s", "log_level", "uplink", "lease", "store_process", "metrics"}
        | {"federation", "store_pipeline", "verify_workers"},
    )
    fog_id = _str(raw, "fog_id")
    if not is_fog_id(fog_id):
        raise ConfigError("fog_id: must match ^[a-z0-9][a-z0-9._-]{0,62}$ and not be reserved")
    level = _str(raw, "log_level", "info")
    if level not in LOG_LEVELS:
        raise ConfigError(f"log_level: one of {sorted(LOG_LEVELS)}")
    return FogConfig(
        fog_id=fog_id,
        key_file=_path(raw, "key_file", base),
        issuer_key=_issuer_key(raw),
        db=_path(raw, "db", base),
        broker=(broker := _broker(_table(raw, "broker"), base)),
        batch=_batch(_table(raw, "batch")),
        policy=_policy(_table(raw, "policy")),
        uplink=_uplink(_table(raw, "uplink")),
        lease=_lease(_table(raw, "lease")),
        metrics=_metrics(_table(raw, "metrics")),
        federation=_federation(_table(raw, "federation"), fog_id),
        stats_interval_s=_number(raw, "stats_interval_s", DEFAULT_STATS_INTERVAL_S, 0.1, 86_400),
        log_level=level,
        # default: the store in its own process, except with the embedded broker's hand-off,
        # where the whole fog is one process (41 MB idle; docs/performance.md)
        store_process=_bool(raw, "store_process", not broker.handoff, key="store_process"),
        store_pipeline=_bool(raw, "store_pipeline", True, key="store_pipeline"),
        verify_workers=_int(raw, "verify_workers", 0, 0, VERIFY_WORKERS_MAX, key="verify_workers"),
    )


def _issuer_key(raw: Mapping[str, Any]) -> bytes:
    text = _str(raw, "issuer_key")
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise ConfigError("issuer_key: not hex") from None
    if not is_valid_public_key(key):
        raise ConfigError("issuer_key: not a valid 32-byte Ed25519 public key")
    return key


def _broker(raw: Mapping[str, Any], base: Path) -> BrokerConfig:
    known = {"url", "host", "port", "username", "password", "password_file"}
    known |= {"device_username", "device_password", "device_password_file", "allow_public_bind"}
    known |= {
        "process",
        "handoff",
        "accounts_file",
        "ca_file",
        "cert_file",
        "key_file",
        "tls_port",
        "tls_cert_file",
    }
    known |= {"tls_key_file", "tls_ca_file", "packet_bytes_max", "inflight_max", "packets_per_s"}
    _no_unknown(raw, "broker.", known)
    url = raw.get("url")
    if url is not None:
        if type(url) is not str or not url:
            raise ConfigError("broker.url: must be a non-empty string")
        parse_broker_url(url)
    host = _str(raw, "host", DEFAULT_BROKER_HOST, key="broker.host")
    allow_public = _bool(raw, "allow_public_bind", False, key="broker.allow_public_bind")
    if url is None and not allow_public and not _is_loopback(host):
        raise ConfigError(
            "broker.host: the embedded broker binds loopback only;"
            " set broker.allow_public_bind = true to force it (not recommended)"
        )
    username = _username(raw, "username", "fog")
    device_username = _username(raw, "device_username", "device")
    if device_username == username:
        raise ConfigError("broker.device_username: must differ from broker.username")
    # The passwords are the embedded broker's accounts: with `url` the account is in the URL,
    # and the password files need not exist (a fog on Mosquitto has none).
    embedded = url is None
    # the embedded broker's default (issue 15, docs/performance.md): on the fog's event loop,
    # handing intents to the fog and receipts back without a second MQTT connection
    process = _bool(raw, "process", False, key="broker.process")
    handoff = _bool(raw, "handoff", embedded and not process, key="broker.handoff")
    if handoff and (not embedded or process):
        raise ConfigError(
            "broker.handoff: needs the embedded broker on the fog's event loop"
            " (no broker.url, broker.process = false)"
        )
    return BrokerConfig(
        url=url,
        host=host,
        port=_int(raw, "port", DEFAULT_BROKER_PORT, 0, PORT_MAX, key="broker.port"),
        username=username,
        password=_secret(raw, "password", base) if embedded else "",
        device_username=device_username,
        device_password=_secret(raw, "device_password", base) if embedded else "",
        allow_public_bind=allow_public,
        process=process,
        handoff=handoff,
        accounts_file=str(_path(raw, "accounts_file", base)) if "accounts_file" in raw else "",
        **_broker_tls(raw, base, url),
        packet_bytes_max=_int(
            raw,
            "packet_bytes_max",
            DEFAULT_PACKET_BYTES_MAX,
            PACKET_BYTES_MIN,
            PACKET_BYTES_MAX,
            key="broker.packet_bytes_max",
        ),
        inflight_max=_int(
            raw,
            "inflight_max",
            DEFAULT_BROKER_INFLIGHT_MAX,
            1,
            BROKER_INFLIGHT_MAX,
            key="broker.inflight_max",
        ),
        packets_per_s=_int(
            raw, "packets_per_s", 0, 0, PACKETS_PER_S_MAX, key="broker.packets_per_s"
        ),
    )


def _file(raw: Mapping[str, Any], name: str, base: Path) -> str | None:
    """A readable file named by ``broker.<name>`` (relative to the config), or None."""
    if raw.get(name) is None:
        return None
    path = _path(raw, name, base)
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise ConfigError(f"broker.{name}: {path}: {exc.strerror}") from exc
    return str(path)


def _broker_tls(raw: Mapping[str, Any], base: Path, url: str | None) -> dict[str, Any]:
    """The TLS keys: the client side (``ca_file``... for an ``mqtts://`` url) and the embedded
    broker's TLS listener (``tls_*``)."""
    out: dict[str, Any] = {n: _file(raw, n, base) for n in ("ca_file", "cert_file", "key_file")}
    if (out["cert_file"] is None) != (out["key_file"] is None):
        raise ConfigError("broker.cert_file: give cert_file and key_file together")
    if url is not None and not parse_broker_url(url).tls and any(out.values()):
        raise ConfigError("broker.ca_file: TLS files need an mqtts:// broker.url")
    listener = {n: _file(raw, n, base) for n in ("tls_cert_file", "tls_key_file", "tls_ca_file")}
    port = raw.get("tls_port")
    if port is not None:
        port = _int(raw, "tls_port", 0, 0, PORT_MAX, key="broker.tls_port")
        if url is not None:
            raise ConfigError("broker.tls_port: only for the embedded broker (no broker.url)")
        if listener["tls_cert_file"] is None or listener["tls_key_file"] is None:
            raise ConfigError("broker.tls_port: needs broker.tls_cert_file and tls_key_file")
    elif any(listener.values()):
        raise ConfigError("broker.tls_cert_file: set broker.tls_port for a TLS listener")
    return {**out, **listener, "tls_port": port}


def _batch(raw: Mapping[str, Any]) -> BatchConfig:
    _no_unknown(raw, "batch.", {"records_max", "age_ms", "keep_acked_ms"})
    return BatchConfig(
        records_max=_int(
            raw,
            "records_max",
            DEFAULT_BATCH_RECORDS,
            1,
            limits.BATCH_RECORDS_MAX,
            key="batch.records_max",
        ),
        age_ms=_int(raw, "age_ms", DEFAULT_BATCH_AGE_MS, 1, BATCH_AGE_MS_MAX, key="batch.age_ms"),
        keep_acked_ms=_int(
            raw,
            "keep_acked_ms",
            DEFAULT_KEEP_ACKED_MS,
            0,
            KEEP_ACKED_MS_MAX,
            key="batch.keep_acked_ms",
        ),
    )


def _policy(raw: Mapping[str, Any]) -> PolicyConfig:
    _no_unknown(raw, "policy.", {"clock_skew_ms", "rate_per_s", "rate_burst"})
    return PolicyConfig(
        clock_skew_ms=_int(
            raw,
            "clock_skew_ms",
            limits.CLOCK_SKEW_MS_MAX,
            0,
            24 * 3_600_000,
            key="policy.clock_skew_ms",
        ),
        rate_per_s=_int(
            raw, "rate_per_s", DEFAULT_RATE_PER_S, 1, RATE_PER_S_MAX, key="policy.rate_per_s"
        ),
        rate_burst=_int(
            raw, "rate_burst", DEFAULT_RATE_BURST, 1, RATE_PER_S_MAX, key="policy.rate_burst"
        ),
    )


def _uplink(raw: Mapping[str, Any]) -> UplinkConfig:
    _no_unknown(raw, "uplink.", {"enabled", "window", "ack_timeout_ms", "backlog_alarm_records"})
    return UplinkConfig(
        enabled=_bool(raw, "enabled", True, key="uplink.enabled"),
        window=_int(
            raw, "window", DEFAULT_UPLINK_WINDOW, 1, UPLINK_WINDOW_MAX, key="uplink.window"
        ),
        ack_timeout_ms=_int(
            raw,
            "ack_timeout_ms",
            DEFAULT_ACK_TIMEOUT_MS,
            100,
            TIMEOUT_MS_MAX,
            key="uplink.ack_timeout_ms",
        ),
        backlog_alarm_records=_int(
            raw,
            "backlog_alarm_records",
            DEFAULT_BACKLOG_ALARM_RECORDS,
            0,
            BACKLOG_ALARM_RECORDS_MAX,
            key="uplink.backlog_alarm_records",
        ),
    )


def _federation(raw: Mapping[str, Any], fog_id: str) -> FederationConfig:
    known = {"peers", "replicas", "relay_after_ms", "replica_keep_ms", "replica_bytes_max"}
    _no_unknown(raw, "federation.", known | {"seen_every_ms"})
    peers = raw.get("peers", [])
    if not isinstance(peers, list) or len(peers) > FEDERATION_PEERS_MAX:
        raise ConfigError(f"federation.peers: a list of at most {FEDERATION_PEERS_MAX} fog_ids")
    for peer in peers:
        if not is_fog_id(peer) or peer == fog_id:
            raise ConfigError(f"federation.peers: {peer!r} is not another fog's fog_id")
    if len(set(peers)) != len(peers):
        raise ConfigError("federation.peers: a peer is listed twice")

    def ms(name: str, default: int, low: int = 10) -> int:
        return _int(raw, name, default, low, TIMEOUT_MS_MAX, key=f"federation.{name}")

    return FederationConfig(
        peers=tuple(peers),
        replicas=_int(
            raw, "replicas", DEFAULT_REPLICAS, 0, REPLICAS_MAX, key="federation.replicas"
        ),
        relay_after_ms=ms("relay_after_ms", DEFAULT_RELAY_AFTER_MS),
        replica_keep_ms=ms("replica_keep_ms", DEFAULT_REPLICA_KEEP_MS, 0),
        replica_bytes_max=_int(
            raw,
            "replica_bytes_max",
            DEFAULT_REPLICA_BYTES_MAX,
            1024 * 1024,
            2**40,
            key="federation.replica_bytes_max",
        ),
        seen_every_ms=ms("seen_every_ms", DEFAULT_SEEN_EVERY_MS),
    )


def _lease(raw: Mapping[str, Any]) -> LeaseConfig:
    known = {"request_below_micros", "request_micros", "request_timeout_ms"}
    known |= {"request_attempts_max", "report", "report_retry_ms", "check_interval_ms"}
    known |= {"renew_before_ms", "return_idle_ms", "return_on_stop", "peer_transfers"}
    known |= {"recall_idle_ms"}
    _no_unknown(raw, "lease.", known)

    def ms(name: str, default: int) -> int:
        return _int(raw, name, default, 10, TIMEOUT_MS_MAX, key=f"lease.{name}")

    amount_max = limits.AMOUNT_MICROS_MAX
    return LeaseConfig(
        request_below_micros=_int(
            raw,
            "request_below_micros",
            DEFAULT_REQUEST_BELOW_MICROS,
            0,
            amount_max,
            key="lease.request_below_micros",
        ),
        request_micros=_int(
            raw,
            "request_micros",
            DEFAULT_REQUEST_MICROS,
            1,
            amount_max,
            key="lease.request_micros",
        ),
        request_timeout_ms=ms("request_timeout_ms", DEFAULT_REQUEST_TIMEOUT_MS),
        request_attempts_max=_int(
            raw,
            "request_attempts_max",
            DEFAULT_REQUEST_ATTEMPTS,
            1,
            REQUEST_ATTEMPTS_MAX,
            key="lease.request_attempts_max",
        ),
        report=_bool(raw, "report", True, key="lease.report"),
        report_retry_ms=ms("report_retry_ms", DEFAULT_REPORT_RETRY_MS),
        check_interval_ms=ms("check_interval_ms", DEFAULT_LEASE_CHECK_MS),
        renew_before_ms=_int(
            raw,
            "renew_before_ms",
            DEFAULT_RENEW_BEFORE_MS,
            0,
            TIMEOUT_MS_MAX,
            key="lease.renew_before_ms",
        ),
        return_idle_ms=_int(
            raw, "return_idle_ms", 0, 0, RETURN_IDLE_MS_MAX, key="lease.return_idle_ms"
        ),
        return_on_stop=_bool(raw, "return_on_stop", False, key="lease.return_on_stop"),
        recall_idle_ms=_int(
            raw,
            "recall_idle_ms",
            DEFAULT_RECALL_IDLE_MS,
            0,
            RETURN_IDLE_MS_MAX,
            key="lease.recall_idle_ms",
        ),
        peer_transfers=_bool(raw, "peer_transfers", False, key="lease.peer_transfers"),
    )


def _metrics(raw: Mapping[str, Any]) -> MetricsConfig:
    _no_unknown(raw, "metrics.", {"enabled", "listen"})
    listen = _str(raw, "listen", DEFAULT_METRICS_LISTEN, key="metrics.listen")
    try:
        host, port = parse_listen(listen)
    except ListenError as exc:
        raise ConfigError(f"metrics.listen: {exc}") from None
    return MetricsConfig(
        enabled=_bool(raw, "enabled", False, key="metrics.enabled"), host=host, port=port
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _no_unknown(raw: Mapping[str, Any], prefix: str, known: set[str]) -> None:
    for key in raw:
        if key not in known:
            raise ConfigError(f"{prefix}{key}: unknown key")


def _table(raw: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: must be a table")
    return value


def _str(raw: Mapping[str, Any], name: str, default: str | None = None, *, key: str = "") -> str:
    key = key or name
    value = raw.get(name, default)
    if value is None:
        raise ConfigError(f"{key}: missing")
    if type(value) is not str or not value:
        raise ConfigError(f"{key}: must be a non-empty string")
    return value


def _int(raw: Mapping[str, Any], name: str, default: int, lo: int, hi: int, *, key: str) -> int:
    value = raw.get(name, default)
    if type(value) is not int or not lo <= value <= hi:
        raise ConfigError(f"{key}: must be an integer in [{lo}, {hi}]")
    return value


def _number(raw: Mapping[str, Any], name: str, default: float, lo: float, hi: float) -> float:
    value = raw.get(name, default)
    if type(value) not in (int, float) or not lo <= value <= hi:
        raise ConfigError(f"{name}: must be a number in [{lo}, {hi}]")
    return float(value)


def _bool(raw: Mapping[str, Any], name: str, default: bool, *, key: str) -> bool:
    value = raw.get(name, default)
    if type(value) is not bool:
        raise ConfigError(f"{key}: must be true or false")
    return value


def _path(raw: Mapping[str, Any], name: str, base: Path) -> Path:
    path = Path(_str(raw, name))
    return path if path.is_absolute() else base / path


def _username(raw: Mapping[str, Any], name: str, default: str) -> str:
    value = _str(raw, name, default, key=f"broker.{name}")
    if len(value) > USERNAME_CHARS_MAX or ":" in value:
        raise ConfigError(f"broker.{name}: at most {USERNAME_CHARS_MAX} characters, no ':'")
    return value


def _secret(raw: Mapping[str, Any], name: str, base: Path) -> str:
    """A password given inline or, better, in ``<name>_file`` (first line, file mode 0600)."""
    inline, file_key = raw.get(name), f"{name}_file"
    if inline is not None and file_key in raw:
        raise ConfigError(f"broker.{name}: give {name} or {file_key}, not both")
    if file_key in raw:
        path = _path(raw, file_key, base)
        try:
            lines = path.read_text().splitlines()
        except OSError as exc:
            raise ConfigError(f"broker.{file_key}: {path}: {exc.strerror}") from exc
        inline = lines[0].strip() if lines else ""
        key = f"broker.{file_key}"
    else:
        key = f"broker.{name}"
    if inline is None:
        return ""
    if type(inline) is not str or len(inline) > SECRET_CHARS_MAX:
        raise ConfigError(f"{key}: must be a string of at most {SECRET_CHARS_MAX} characters")
    return inline
