"""Cloud configuration: a frozen dataclass parsed once from TOML and the environment.

```toml
store = "sqlite:///var/lib/fogpay/cloud.db"   # or "postgresql://user@host:5432/fogpay"
issuer_key = "/etc/fogpay/issuer.key"         # keyfile format, mode 0600

[lease]
initial_micros = 10000000
request_micros_max = 100000000
lease_ms = 3600000

[service]          # fogpay cloud run: the MQTT shell (cloud/service.py)
broker_url = "mqtt://issuer:PASSWORD@127.0.0.1:1883"  # or mqtts://...:8883 with:
# ca_file = "/etc/fogpay/tls/ca.pem"       # the broker's CA (unset: the system's CAs)
# cert_file = "/etc/fogpay/tls/cloud.pem"  # a client certificate, with key_file
# key_file = "/etc/fogpay/tls/cloud.key"
verify_workers = 2   # processes verifying batches; 0: in the event loop
stats_interval_s = 60.0
partitions = 0       # 0: this process books every fog, no lock; P >= 1: ingest
                     # partitioned by fog over one PostgreSQL (cloud/partition.py)
partition = 0        # this process's partition (0..P-1); the holder of 0 also takes the
                     # lease requests, reports, transfers and held uploads; -1: a standby
takeover = true      # take over another partition whose process is gone
partition_check_s = 1.0

[metrics]          # Prometheus /metrics, /healthz, /readyz (cloud/metrics.py); off by default
enabled = true
listen = "127.0.0.1:9465"   # port 0: a free port (logged in metrics_listening)

[rails.creditor]   # pain.008: the operator collecting the owners' charges
name = "fogpay operator"
iban = "DE89370400440532013000"
bic = "COBADEFFXXX"
creditor_id = "DE98ZZZ09999999999"

[rails.debtor]     # pain.001: the operator paying the payees
name = "fogpay operator"
iban = "DE89370400440532013000"
```

``FOGPAY_CLOUD_STORE``, ``FOGPAY_CLOUD_ISSUER_KEY`` and ``FOGPAY_CLOUD_BROKER_URL`` override
the file; command-line options override both. A bad value fails at start with one line naming
the key.
"""

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cloud.iso20022 import CreditorConfig, DebtorConfig
from cloud.leases import LeasePolicy
from protocol.errors import FogpayError
from runtime.listen import ListenError, parse_listen
from runtime.tlsconf import TlsSettings

STORE_DEFAULT = "sqlite://cloud.db"
ISSUER_KEY_DEFAULT = "issuer.key"
BROKER_URL_DEFAULT = "mqtt://127.0.0.1:1883"
VERIFY_WORKERS_MAX = 64
STATS_INTERVAL_S_MAX = 86_400.0
PARTITIONS_MAX = 1024
PARTITION_CHECK_S_MIN = 0.05
PARTITION_CHECK_S_MAX = 60.0
METRICS_LISTEN_DEFAULT = "127.0.0.1:9465"


class ConfigError(FogpayError):
    pass


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceConfig:
    """``[service]``: the MQTT shell (``fogpay cloud run``)."""

    broker_url: str = BROKER_URL_DEFAULT  # mqtt[s]://[user:password@]host[:port]
    verify_workers: int = 2  # batch verification processes; 0 verifies in the event loop
    stats_interval_s: float = 60.0
    # mqtts:// only: the broker's CA (unset: the system's CAs) and a client certificate
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    # ingest partitioned by fog (cloud/partition.py): ``partitions`` processes over one
    # PostgreSQL, this one books ``partition`` (-1: none, a standby that only takes over);
    # partitions = 0: no partition lock at all, this process books every fog
    partitions: int = 0
    partition: int = 0
    takeover: bool = True  # also book a partition whose process is gone
    partition_check_s: float = 1.0  # how often the partition locks are checked

    @property
    def partitioned(self) -> bool:
        """Whether this process books under a partition lock (PostgreSQL only)."""
        return self.partitions > 0

    def __post_init__(self) -> None:
        url = self.broker_url
        if not isinstance(url, str) or not url.startswith(("mqtt://", "mqtts://")):
            raise ConfigError("service.broker_url: must be an mqtt:// or mqtts:// URL")
        for name in ("ca_file", "cert_file", "key_file"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ConfigError(f"service.{name}: must be a file name")
        if (self.cert_file is None) != (self.key_file is None):
            raise ConfigError("service.cert_file: give cert_file and key_file together")
        workers = self.verify_workers
        if type(workers) is not int or not 0 <= workers <= VERIFY_WORKERS_MAX:
            raise ConfigError(f"service.verify_workers: an integer in [0, {VERIFY_WORKERS_MAX}]")
        stats = self.stats_interval_s
        if type(stats) not in (int, float) or not 0.1 <= stats <= STATS_INTERVAL_S_MAX:
            raise ConfigError("service.stats_interval_s: a number of seconds in [0.1, 86400]")
        parts = self.partitions
        if type(parts) is not int or not 0 <= parts <= PARTITIONS_MAX:
            raise ConfigError(f"service.partitions: an integer in [0, {PARTITIONS_MAX}]")
        part = self.partition
        if type(part) is not int or not -1 <= part < max(1, parts):
            raise ConfigError("service.partition: an integer in [-1, service.partitions - 1]")
        if type(self.takeover) is not bool:
            raise ConfigError("service.takeover: must be true or false")
        if part < 0 and not self.takeover:
            raise ConfigError("service.partition: a process without one books only by takeover")
        check = self.partition_check_s
        if type(check) not in (int, float) or not (
            PARTITION_CHECK_S_MIN <= check <= PARTITION_CHECK_S_MAX
        ):
            raise ConfigError("service.partition_check_s: a number of seconds in [0.05, 60]")

    def tls(self) -> TlsSettings | None:
        """The client TLS settings for an ``mqtts://`` broker_url (None for mqtt://)."""
        if not self.broker_url.startswith("mqtts://"):
            return None
        return TlsSettings(
            ca_file=None if self.ca_file is None else Path(self.ca_file),
            cert_file=None if self.cert_file is None else Path(self.cert_file),
            key_file=None if self.key_file is None else Path(self.key_file),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class MetricsConfig:
    """``[metrics]``: Prometheus ``/metrics``, ``/healthz`` and ``/readyz`` of ``fogpay cloud
    run`` over HTTP (cloud/metrics.py). Off by default (one port per process)."""

    enabled: bool = False
    host: str = "127.0.0.1"  # from ``listen = "HOST:PORT"`` (an IPv6 host in brackets)
    port: int = 9465  # 0: a free port


@dataclass(frozen=True, slots=True, kw_only=True)
class CloudConfig:
    store: str = STORE_DEFAULT
    issuer_key: Path = Path(ISSUER_KEY_DEFAULT)
    lease: LeasePolicy = field(default_factory=LeasePolicy)
    creditor: CreditorConfig | None = None
    debtor: DebtorConfig | None = None
    service: ServiceConfig = field(default_factory=ServiceConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)


def _section(value: object, key: str, cls: Any) -> Any:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: must be a table")
    try:
        return cls(**value)
    except (TypeError, AssertionError) as exc:
        raise ConfigError(f"{key}: {exc}") from exc


def load(
    path: str | None, *, store: str | None = None, issuer_key: str | None = None
) -> CloudConfig:
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{path}: {exc}") from exc
    unknown = set(data) - {"store", "issuer_key", "lease", "rails", "service", "metrics"}
    if unknown:
        raise ConfigError(f"unknown key {sorted(unknown)[0]!r}")
    rails = data.get("rails", {})
    if not isinstance(rails, dict):
        raise ConfigError("rails: must be a table")
    unknown_rails = set(rails) - {"creditor", "debtor"}
    if unknown_rails:
        raise ConfigError(f"rails.{sorted(unknown_rails)[0]}: unknown table")
    store_url = store or os.environ.get("FOGPAY_CLOUD_STORE") or data.get("store", STORE_DEFAULT)
    key = issuer_key or os.environ.get("FOGPAY_CLOUD_ISSUER_KEY") or data.get("issuer_key")
    if not isinstance(store_url, str):
        raise ConfigError("store: must be a string")
    if not isinstance(key, str | None) or key == "":
        raise ConfigError("issuer_key: must be a file path")
    return CloudConfig(
        store=store_url,
        issuer_key=Path(key or ISSUER_KEY_DEFAULT),
        lease=_section(data.get("lease"), "lease", LeasePolicy) or LeasePolicy(),
        creditor=_section(rails.get("creditor"), "rails.creditor", CreditorConfig),
        debtor=_section(rails.get("debtor"), "rails.debtor", DebtorConfig),
        service=_service(data.get("service")),
        metrics=_metrics(data.get("metrics")),
    )


def _metrics(value: object) -> MetricsConfig:
    if value is None:
        return MetricsConfig()
    if not isinstance(value, dict):
        raise ConfigError("metrics: must be a table")
    unknown = set(value) - {"enabled", "listen"}
    if unknown:
        raise ConfigError(f"metrics.{sorted(unknown)[0]}: unknown key")
    enabled = value.get("enabled", False)
    if type(enabled) is not bool:
        raise ConfigError("metrics.enabled: must be true or false")
    try:
        host, port = parse_listen(value.get("listen", METRICS_LISTEN_DEFAULT))
    except ListenError as exc:
        raise ConfigError(f"metrics.listen: {exc}") from None
    return MetricsConfig(enabled=enabled, host=host, port=port)


def _service(value: object) -> ServiceConfig:
    table = dict(value) if isinstance(value, dict) else value
    if table is None:
        table = {}
    if not isinstance(table, dict):
        raise ConfigError("service: must be a table")
    url = os.environ.get("FOGPAY_CLOUD_BROKER_URL")
    if url:
        table["broker_url"] = url
    service: ServiceConfig = _section(table, "service", ServiceConfig)
    return service
