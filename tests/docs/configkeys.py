"""The configuration keys the parsers accept, found by asking the parsers themselves.

Fog (``fog.config.config_from_dict``): it refuses an unknown key with ``"<key>: unknown
key"``. Every string literal of ``fog/config.py`` and every field of its dataclasses is tried
as a top-level key and inside every table the parser takes; a key is accepted when the parser
says anything but "unknown key" about it (the probe's value is deliberately of no valid type).

Cloud (``cloud.config.load``): the top level refuses unknown keys the same way; each table is
a dataclass built with ``cls(**table)``, so its keys are exactly that dataclass's fields
(``[lease]``: ``LeasePolicy``, ``[service]``: ``ServiceConfig``, ``[rails.creditor]``:
``CreditorConfig``, ``[rails.debtor]``: ``DebtorConfig``).
"""

import ast
import copy
import dataclasses
import tempfile
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import nacl.signing

from cloud import config as cloud_config
from fog import config as fog_config
from fog.config import ConfigError, FogConfig, config_from_dict

ROOT: Final = Path(__file__).parents[2]
FOG_BASE: Final[dict[str, Any]] = {
    "fog_id": "fog-docs",
    "key_file": "fog.key",
    "issuer_key": bytes(nacl.signing.SigningKey.generate().verify_key).hex(),
    "db": "fog.db",
}
NOT_A_VALUE: Final = object()  # no parser takes it: a known key fails on its type
# cloud tables -> the dataclass each is built from (``rails`` is a table of two tables)
CLOUD_TABLES: Final = {
    "lease": "lease",
    "service": "service",
    "rails.creditor": "creditor",
    "rails.debtor": "debtor",
}
# ``[metrics]`` (fog and cloud): ``listen = "HOST:PORT"`` is parsed into two fields, host and port
METRICS_KEYS: Final = ("metrics.enabled", "metrics.listen")


def _listen(metrics: Any) -> str:
    host = f"[{metrics.host}]" if ":" in metrics.host else metrics.host
    return f"{host}:{metrics.port}"


def _literals(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {
        n.value
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value.isidentifier()
    }


def _fog_fields(cls: type, prefix: str = "") -> set[str]:
    out = set()
    for f in dataclasses.fields(cls):
        kind = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(kind):
            out |= _fog_fields(kind, f"{f.name}.")  # type: ignore[arg-type]
        out.add(prefix + f.name)
    return out


def _fog_parse(raw: dict[str, Any]) -> FogConfig:
    with tempfile.TemporaryDirectory() as tmp:
        return config_from_dict(raw, base=Path(tmp))


def fog_accepts(key: str) -> bool:
    raw = copy.deepcopy(FOG_BASE)
    *tables, name = key.split(".")
    table = raw
    for t in tables:
        table = table.setdefault(t, {})
    table[name] = NOT_A_VALUE
    try:
        _fog_parse(raw)
    except ConfigError as exc:
        return str(exc) != f"{key}: unknown key"
    return True


def fog_keys() -> set[str]:
    """Every key ``fog.toml`` may hold, tables excluded (``broker``, ``lease``...)."""
    candidates = _literals(ROOT / "fog" / "config.py") | {
        k.rsplit(".", 1)[-1] for k in _fog_fields(FogConfig)
    }
    top = {c for c in candidates if fog_accepts(c)}
    tables = set()
    for t in top:
        raw = copy.deepcopy(FOG_BASE) | {t: {}}
        try:
            _fog_parse(raw)
        except ConfigError:
            continue
        tables.add(t)
    nested = {f"{t}.{c}" for t in tables for c in candidates if fog_accepts(f"{t}.{c}")}
    return (top - tables) | nested


def fog_default(key: str) -> Any:
    """What the parser puts in place of an absent key (``KeyError``: required, no default;
    ``AttributeError``: a key with no attribute of its own, like ``broker.password_file``)."""
    if key in FOG_BASE:
        raw = {k: v for k, v in FOG_BASE.items() if k != key}
        try:
            _fog_parse(raw)
        except ConfigError as exc:
            if str(exc).startswith(f"{key}:"):
                raise KeyError(key) from None
        raise AssertionError(f"{key}: the parser takes a config without it")
    value: Any = _fog_parse(copy.deepcopy(FOG_BASE))
    if key == "metrics.listen":
        return _listen(value.metrics)
    for part in key.split("."):
        value = getattr(value, part)
    return list(value) if isinstance(value, tuple) else value  # a TOML array


def _cloud_class(table: str) -> type:
    hints = typing.get_type_hints(cloud_config.CloudConfig)
    kind = hints[CLOUD_TABLES[table]]
    for arg in typing.get_args(kind) or (kind,):
        if dataclasses.is_dataclass(arg):
            return arg  # type: ignore[return-value]
    raise AssertionError(table)


def _cloud_load(text: str) -> Any:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cloud.toml"
        path.write_text(text)
        return cloud_config.load(str(path))


def cloud_accepts_top(key: str) -> bool:
    try:
        _cloud_load(f"{key} = 1\n")
    except cloud_config.ConfigError as exc:
        return not str(exc).startswith("unknown key")
    except Exception:  # the parser took the key and then choked on the value
        return True
    return True


def cloud_keys() -> set[str]:
    top = {c for c in _literals(ROOT / "cloud" / "config.py") if cloud_accepts_top(c)}
    tables = {t.split(".")[0] for t in CLOUD_TABLES}
    keys = top - tables
    for table in CLOUD_TABLES:
        keys |= {f"{table}.{f.name}" for f in dataclasses.fields(_cloud_class(table))}
    if "metrics" in keys:  # a table of its own keys, not a dataclass built from the table
        keys = (keys - {"metrics"}) | set(METRICS_KEYS)
    return keys


def cloud_default(key: str) -> Any:
    """The default of a cloud key; KeyError if the key is required in its table."""
    table, _, name = key.rpartition(".")
    if not table:
        return getattr(cloud_config.load(None), name)
    if key in METRICS_KEYS:
        metrics = cloud_config.load(None).metrics
        return _listen(metrics) if name == "listen" else metrics.enabled
    f = {f.name: f for f in dataclasses.fields(_cloud_class(table))}[name]
    if f.default is not dataclasses.MISSING:
        return f.default
    factory: Callable[[], Any] | Any = f.default_factory
    if factory is not dataclasses.MISSING:
        return factory()
    raise KeyError(key)


def fog_env_overrides() -> dict[str, tuple[str, ...]]:
    return dict(fog_config.ENV_OVERRIDES)
