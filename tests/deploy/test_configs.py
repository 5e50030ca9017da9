"""The shipped configs as an operator uses them: the fog example with `broker.url` set passes
`fogpay fog check-config` without the embedded broker's password files; both Mosquitto files
dropped into conf.d start through Debian's stock mosquitto.conf (no duplicate key) and let the
accounts of fogpay.acl in and nobody else."""

import asyncio
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import pytest

from tests.conftest import free_port, mosquitto_passwd_path, require_mosquitto, wait_port
from tests.deploy.test_install import DEBIAN_STOCK_MOSQUITTO_CONF

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
FOGPAY = Path(sys.executable).parent / "fogpay"
STOCK_KEYS = ("pid_file", "persistence", "persistence_location", "log_dest", "include_dir")
TLS_LINES = ("listener 8883", "certfile", "keyfile", "cafile", "tls_version")


def example_config(tmp_path: Path, *, url: bool) -> Path:
    text = (DEPLOY / "fog.example.toml").read_text()
    text = text.replace("/etc/fogpay/", f"{tmp_path}/").replace("/var/lib/fogpay/", f"{tmp_path}/")
    if url:
        text = text.replace('# url = "mqtt://fog-a:PASSWORD@', 'url = "mqtt://fog-a:secret@')
    subprocess.run([str(FOGPAY), "keys", "new", str(tmp_path / "fog.key")], check=True, timeout=60)
    path = tmp_path / "fog.toml"
    path.write_text(text)
    return path


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        # the broker is not running here: config and database are what these tests are about
        [str(FOGPAY), "fog", "check-config", "--skip-broker", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_example_with_a_broker_url_needs_no_password_files(tmp_path: Path) -> None:
    path = example_config(tmp_path, url=True)
    done = check_config(path)
    assert (done.returncode, done.stderr) == (0, ""), done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == [
        "ok",
        "config",
        str(path) + ":",
        "fog",
        "fog-a,",
        "key",
        f"{tmp_path}/fog.key,",
        "external",
        "broker",
    ]
    assert lines[1].startswith(f"ok   database  {tmp_path}/fog.sqlite")


def test_the_embedded_broker_still_needs_its_password_files(tmp_path: Path) -> None:
    done = check_config(example_config(tmp_path, url=False))
    assert done.returncode == 2
    assert done.stderr.startswith("fogpay: fog check-config: config: ")
    assert "broker.password_file: " in done.stderr and "No such file or directory" in done.stderr


@pytest.mark.parametrize("name", ["fogpay-pi.conf", "fogpay-server.conf"])
def test_the_mosquitto_files_repeat_no_key_of_the_stock_config(name: str) -> None:
    keys = {
        line.split()[0]
        for line in (DEPLOY / "mosquitto" / name).read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert keys.isdisjoint(STOCK_KEYS)


def stock_root(tmp_path: Path, name: str, port: int) -> Path:
    """A Debian-like /etc/mosquitto under tmp_path: the stock main file (paths moved), our
    file in conf.d (listener on 127.0.0.1:port, TLS lines out), the ACL, a password file."""
    etc = tmp_path / "etc/mosquitto"
    (etc / "conf.d").mkdir(parents=True)
    for d in ("run/mosquitto", "var/lib/mosquitto", "var/log/mosquitto"):
        (tmp_path / d).mkdir(parents=True)
    lines = []
    for line in (DEPLOY / "mosquitto" / name).read_text().splitlines():
        if line.startswith(TLS_LINES):
            continue
        if line.startswith("listener 1883"):
            line = f"listener {port} 127.0.0.1"
        lines.append(line.replace("/etc/mosquitto/", f"{etc}/"))
    (etc / "conf.d/fogpay.conf").write_text("\n".join(lines) + "\n")
    shutil.copy(DEPLOY / "mosquitto/fogpay.acl", etc / "fogpay.acl")
    passwd = mosquitto_passwd_path()
    assert passwd is not None
    (etc / "fogpay.passwd").touch(mode=0o600)
    for user, password in (("fog-a", "fog-pw"), ("issuer", "issuer-pw")):
        cmd = [passwd, "-b", str(etc / "fogpay.passwd"), user, password]
        subprocess.run(cmd, check=True, timeout=30)
    text = DEBIAN_STOCK_MOSQUITTO_CONF
    for d in ("/run/mosquitto/", "/var/lib/mosquitto/", "/var/log/mosquitto/", "/etc/mosquitto/"):
        text = text.replace(d, f"{tmp_path}{d}")
    # as root, mosquitto drops to user "mosquitto", which cannot enter pytest's tmp dirs
    if os.geteuid() == 0:
        text += "user root\n"
    (etc / "mosquitto.conf").write_text(text)
    return etc / "mosquitto.conf"


@pytest.fixture(params=["fogpay-pi.conf", "fogpay-server.conf"])
def stock_broker(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[int]:
    """Mosquitto from the stock main config with our file in conf.d; checks its log after."""
    binary = require_mosquitto()
    port = free_port()
    main = stock_root(tmp_path, request.param, port)
    log = tmp_path / "stderr.log"
    with log.open("wb") as out:
        process = subprocess.Popen([binary, "-c", str(main)], stdout=out, stderr=out)
    try:
        try:
            wait_port("127.0.0.1", port, process=process)
        except TimeoutError:
            raise AssertionError(log.read_text()) from None
        yield port
    finally:
        process.terminate()
        process.wait(timeout=10)
    text = log.read_text() + (tmp_path / "var/log/mosquitto/mosquitto.log").read_text()
    assert "Duplicate" not in text and "Error" not in text, text
    # the stock file's persistence is on: the retained message was saved at shutdown
    assert (tmp_path / "var/lib/mosquitto/mosquitto.db").exists()


@pytest.mark.mosquitto
async def test_mosquitto_starts_from_the_stock_config_with_our_file_in_conf_d(
    stock_broker: int,
) -> None:
    port = stock_broker
    async with asyncio.timeout(20):
        # the issuer's retained trust material reaches the fog's account
        async with aiomqtt.Client(
            "127.0.0.1", port, username="issuer", password="issuer-pw"
        ) as issuer:
            await issuer.publish("fogpay/1/trust/fog/fog-a", b"x", qos=1, retain=True)
        async with aiomqtt.Client("127.0.0.1", port, username="fog-a", password="fog-pw") as fog:
            await fog.subscribe("fogpay/1/trust/#", qos=1)
            message = await anext(fog.messages)
            assert (str(message.topic), message.payload) == ("fogpay/1/trust/fog/fog-a", b"x")
        # a wrong password is refused (allow_anonymous false, the password file is used)
        with pytest.raises(aiomqtt.MqttError):
            async with aiomqtt.Client("127.0.0.1", port, username="fog-a", password="wrong"):
                pass
