"""Config loading (one line naming the key) and the embedded broker's authentication."""

import asyncio
import os
import socket
from pathlib import Path

import aiomqtt
import pytest
import structlog.testing

from fog.broker import BrokerProcess, BrokerStartError, EmbeddedBroker
from fog.config import BrokerConfig, ConfigError, load_config
from protocol.signing import public_key
from tests.conftest import process_running
from tests.integration.devices import new_key

ISSUER = public_key(new_key()).hex()


def write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "fog.toml"
    path.write_text(body)
    return path


BASE = f'fog_id = "fog-1"\nkey_file = "fog.key"\nissuer_key = "{ISSUER}"\ndb = "fog.sqlite"\n'


def test_minimal_config_has_documented_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, BASE), env={})
    assert config.fog_id == "fog-1"
    assert config.key_file == tmp_path / "fog.key"  # relative to the config file
    assert config.db == tmp_path / "fog.sqlite"
    assert config.broker.embedded and config.broker.host == "127.0.0.1"
    assert config.broker.port == 1883
    assert (config.batch.records_max, config.batch.age_ms) == (256, 1000)
    assert config.policy.clock_skew_ms == 300_000
    assert config.verify_workers == 0  # the core verifies (fog/verifyproc.py)


@pytest.mark.parametrize(
    ("body", "key"),
    [
        (BASE.replace('"fog-1"', '"Fog 1"'), "fog_id"),
        (BASE.replace('"fog-1"', '"trust"'), "fog_id"),
        (BASE.replace(ISSUER, "zz"), "issuer_key"),
        (BASE.replace(ISSUER, "00" * 32), "issuer_key"),  # small order: refused
        (BASE.replace('db = "fog.sqlite"\n', ""), "db"),
        (BASE + "colour = 1\n", "colour"),
        (BASE + "[broker]\nport = 70000\n", "broker.port"),
        (BASE + '[broker]\nhost = "0.0.0.0"\n', "broker.host"),
        (BASE + '[broker]\nurl = "http://x:1"\n', "broker.url"),
        (BASE + '[broker]\ndevice_username = "fog"\n', "broker.device_username"),
        (BASE + '[broker]\npassword_file = "missing"\n', "broker.password_file"),
        (BASE + "[broker]\nprocess = true\nhandoff = true\n", "broker.handoff"),  # in its child
        (
            BASE + '[broker]\nurl = "mqtt://127.0.0.1:1883"\nprocess = false\nhandoff = true\n',
            "broker.handoff",
        ),
        (BASE + "[batch]\nrecords_max = 5000\n", "batch.records_max"),
        (BASE + "[policy]\nrate_per_s = 0\n", "policy.rate_per_s"),
        (BASE + "verify_workers = -1\n", "verify_workers"),
        (BASE + "verify_workers = 65\n", "verify_workers"),
        (BASE + 'verify_workers = "2"\n', "verify_workers"),
        (BASE + "[batch\n", "invalid TOML"),
    ],
)
def test_bad_config_fails_with_one_line_naming_the_key(tmp_path: Path, body: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, body), env={})
    message = str(info.value)
    assert key in message
    assert "\n" not in message


def test_env_overrides_and_password_file(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("s3cret\n")
    os.chmod(tmp_path / "pw", 0o600)
    path = write(tmp_path, BASE + '[broker]\npassword_file = "pw"\n')
    config = load_config(path, env={"FOGPAY_FOG_BROKER_PORT": "1999", "FOGPAY_FOG_DB": "/x.db"})
    assert config.broker.password == "s3cret"
    assert "s3cret" not in repr(config)
    assert config.broker.port == 1999
    assert config.db == Path("/x.db")
    with pytest.raises(ConfigError, match="FOGPAY_FOG_BROKER_PORT"):
        load_config(path, env={"FOGPAY_FOG_BROKER_PORT": "x"})


@pytest.mark.parametrize("kind", [EmbeddedBroker, BrokerProcess])
async def test_embedded_broker_accepts_accounts_and_refuses_others(
    kind: type[EmbeddedBroker | BrokerProcess],
) -> None:
    broker = kind(BrokerConfig(port=0, password="fog-pw", device_password="dev-pw"))
    await broker.start()
    try:
        assert broker.port > 0
        for user, pw in (("fog", "fog-pw"), ("device", "dev-pw")):
            async with aiomqtt.Client(
                "127.0.0.1", broker.port, username=user, password=pw, timeout=5
            ) as client:
                await client.publish("fogpay/1/x", b"1", qos=1, timeout=5)
        for user, pw in (("fog", "dev-pw"), ("device", None), (None, None), ("eve", "fog-pw")):
            with pytest.raises(aiomqtt.MqttError):
                async with aiomqtt.Client(
                    "127.0.0.1", broker.port, username=user, password=pw, timeout=5
                ):
                    pass
    finally:
        await broker.stop()


@pytest.mark.parametrize("kind", [EmbeddedBroker, BrokerProcess])
async def test_a_broker_allowed_beyond_loopback_warns_at_start(
    kind: type[EmbeddedBroker | BrokerProcess],
) -> None:
    config = BrokerConfig(port=0, password="a", device_password="b", allow_public_bind=True)
    broker = kind(config)  # bound to 127.0.0.1 all the same: tests stay on loopback
    with structlog.testing.capture_logs() as logs:
        await broker.start()
    try:
        events = [e["event"] for e in logs]
        assert events.count("broker_public_bind_forced") == 1 and "broker_started" in events
    finally:
        await broker.stop()


async def test_broker_process_refuses_a_port_in_use_with_its_reason() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        broker = BrokerProcess(BrokerConfig(port=port, password="a", device_password="b"))
        with pytest.raises(BrokerStartError, match="in use"):
            await broker.start()
        assert broker.pid is None  # nothing left running


async def test_broker_process_exits_when_its_fog_goes() -> None:
    """A SIGKILLed fog closes the broker's stdin: the broker shuts down by itself."""
    broker = BrokerProcess(BrokerConfig(port=0, password="a", device_password="b"))
    await broker.start()
    proc = broker._proc
    assert proc is not None and proc.stdin is not None and process_running(proc.pid)
    proc.stdin.close()
    async with asyncio.timeout(15):
        assert await proc.wait() == 0
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", broker.port), timeout=1).close()


def test_deploy_example_config_loads_and_documents_every_key(tmp_path: Path) -> None:
    root = Path(__file__).parents[2]
    text = (root / "deploy" / "fog.example.toml").read_text()
    text = text.replace("/etc/fogpay/", f"{tmp_path}/").replace("/var/lib/fogpay/", f"{tmp_path}/")
    for name in ("broker.password", "device.password"):
        (tmp_path / name).write_text(f"{name}-secret\n")
    config = load_config(write(tmp_path, text), env={})
    assert config.fog_id == "fog-a" and config.broker.embedded
    assert config.broker.password == "broker.password-secret"
    assert config.broker.device_password == "device.password-secret"
    doc = (root / "docs" / "fog.md").read_text()
    keys = ["fog_id", "key_file", "issuer_key", "db", "stats_interval_s", "log_level"]
    keys += [f"broker.{k}" for k in ("url", "host", "port", "username", "password")]
    keys += [f"broker.{k}" for k in ("password_file", "device_username", "device_password")]
    keys += ["broker.device_password_file", "broker.allow_public_bind"]
    keys += ["batch.records_max", "batch.age_ms", "policy.clock_skew_ms", "policy.rate_per_s"]
    keys += ["policy.rate_burst"]
    missing = [k for k in keys if f"`{k}`" not in doc]
    assert not missing
