"""The pipeline's configuration keys: fog ``[uplink]`` and ``[lease]``, cloud ``[service]``;
defaults as documented, and a bad value fails with one line naming the key."""

from pathlib import Path

import pytest

from cloud import config as cloud_config
from cloud.service import broker_address
from fog.config import ConfigError, load_config
from protocol.signing import public_key
from tests.integration.devices import new_key

ISSUER = public_key(new_key()).hex()
BASE = f'fog_id = "fog-1"\nkey_file = "fog.key"\nissuer_key = "{ISSUER}"\ndb = "fog.sqlite"\n'


def fog_config(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "fog.toml"
    path.write_text(BASE + body)
    return path


def test_fog_defaults(tmp_path: Path) -> None:
    c = load_config(fog_config(tmp_path, ""), env={})
    assert (c.uplink.enabled, c.uplink.window, c.uplink.ack_timeout_ms) == (True, 8, 10_000)
    lease = c.lease
    assert (lease.request_below_micros, lease.request_micros) == (1_000_000, 10_000_000)
    assert (lease.request_timeout_ms, lease.request_attempts_max) == (5_000, 5)
    assert (lease.report, lease.report_retry_ms, lease.check_interval_ms) == (True, 5_000, 1_000)


def test_fog_keys_are_read(tmp_path: Path) -> None:
    body = (
        "[uplink]\nenabled = false\nwindow = 3\nack_timeout_ms = 2000\n"
        "[lease]\nrequest_below_micros = 0\nrequest_micros = 7\nrequest_timeout_ms = 50\n"
        "request_attempts_max = 2\nreport = false\nreport_retry_ms = 60\ncheck_interval_ms = 70\n"
    )
    c = load_config(fog_config(tmp_path, body), env={})
    assert (c.uplink.enabled, c.uplink.window, c.uplink.ack_timeout_ms) == (False, 3, 2000)
    assert (c.lease.request_below_micros, c.lease.request_micros) == (0, 7)
    assert (c.lease.request_timeout_ms, c.lease.request_attempts_max) == (50, 2)
    assert (c.lease.report, c.lease.report_retry_ms, c.lease.check_interval_ms) == (False, 60, 70)


@pytest.mark.parametrize(
    ("body", "key"),
    [
        ("[uplink]\nwindow = 0\n", "uplink.window"),
        ("[uplink]\nwindow = 65\n", "uplink.window"),
        ("[uplink]\nenabled = 1\n", "uplink.enabled"),
        ("[uplink]\nack_timeout_ms = 10\n", "uplink.ack_timeout_ms"),
        ("[uplink]\nspeed = 1\n", "uplink.speed"),
        ("[lease]\nrequest_micros = 0\n", "lease.request_micros"),
        ("[lease]\nrequest_below_micros = -1\n", "lease.request_below_micros"),
        ("[lease]\nrequest_attempts_max = 0\n", "lease.request_attempts_max"),
        ('[lease]\nreport = "yes"\n', "lease.report"),
        ("[lease]\ncheck_interval_ms = 1\n", "lease.check_interval_ms"),
        ("[lease]\nother = 1\n", "lease.other"),
        ("uplink = 3\n", "uplink"),
    ],
)
def test_fog_bad_values_name_the_key(tmp_path: Path, body: str, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(fog_config(tmp_path, body), env={})
    assert str(err.value).startswith(key)
    assert "\n" not in str(err.value)


def cloud(tmp_path: Path, body: str) -> cloud_config.CloudConfig:
    path = tmp_path / "cloud.toml"
    path.write_text(body)
    return cloud_config.load(str(path))


def test_cloud_service_defaults_keys_and_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FOGPAY_CLOUD_BROKER_URL", raising=False)
    assert cloud(tmp_path, "").service == cloud_config.ServiceConfig()
    c = cloud(
        tmp_path,
        '[service]\nbroker_url = "mqtt://u:p%40ss@10.0.0.1:1999"\n'
        "verify_workers = 0\nstats_interval_s = 5\n",
    )
    assert (c.service.verify_workers, c.service.stats_interval_s) == (0, 5)
    assert broker_address(c.service.broker_url) == {
        "broker_host": "10.0.0.1",
        "broker_port": 1999,
        "username": "u",
        "password": "p@ss",
    }
    monkeypatch.setenv("FOGPAY_CLOUD_BROKER_URL", "mqtt://127.0.0.1:1884")
    assert cloud(tmp_path, "").service.broker_url == "mqtt://127.0.0.1:1884"


@pytest.mark.parametrize(
    ("body", "key"),
    [
        ('[service]\nbroker_url = "http://x"\n', "service.broker_url"),
        ("[service]\nverify_workers = -1\n", "service.verify_workers"),
        ("[service]\nstats_interval_s = 0\n", "service.stats_interval_s"),
        ("[service]\nother = 1\n", "service"),
        ("service = 1\n", "service"),
    ],
)
def test_cloud_bad_values_name_the_key(
    tmp_path: Path, body: str, key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FOGPAY_CLOUD_BROKER_URL", raising=False)
    with pytest.raises(cloud_config.ConfigError) as err:
        cloud(tmp_path, body)
    assert str(err.value).startswith(key)


ROOT = Path(__file__).parents[2]


def test_every_key_is_in_the_examples_and_documented() -> None:
    from fog.config import LeaseConfig, UplinkConfig

    doc = (ROOT / "docs" / "pipeline.md").read_text()
    fog_example = (ROOT / "deploy" / "fog.example.toml").read_text()
    cloud_example = (ROOT / "deploy" / "cloud.example.toml").read_text()
    keys = [f"uplink.{k}" for k in UplinkConfig.__dataclass_fields__]
    keys += [f"lease.{k}" for k in LeaseConfig.__dataclass_fields__]
    cloud_keys = [f"service.{k}" for k in cloud_config.ServiceConfig.__dataclass_fields__]
    assert [k for k in keys + cloud_keys if f"`{k}`" not in doc] == []
    assert [k for k in keys if f"\n{k.split('.')[1]} = " not in fog_example] == []
    assert [k for k in cloud_keys if f"\n{k.split('.')[1]} = " not in cloud_example] == []


def test_the_cloud_example_config_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FOGPAY_CLOUD_BROKER_URL", raising=False)
    c = cloud_config.load(str(ROOT / "deploy" / "cloud.example.toml"))
    assert c.service.verify_workers == 2 and c.service.broker_url.startswith("mqtt://issuer:")
    assert broker_address(c.service.broker_url)["username"] == "issuer"
