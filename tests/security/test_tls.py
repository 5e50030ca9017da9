"""mqtts:// end to end: the fog's embedded broker with its TLS listener and a device paying
through it; the cloud service over TLS to Mosquitto started from the shipped server config
with certificates from ``fogpay certs``; a wrong CA or a wrong name gives one line, exit 1."""

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import nacl.signing
import pytest

from cloud.backends import open_store
from cloud.core import CloudCore
from cloud.leases import LeasePolicy
from cloud.service import CloudService, wall_ms
from edge.device import Device
from fogpay.certs import issue, make_ca
from fogpay.provision import BrokerAddress
from fogpay.sandbox import SANDBOX_JSON, SandboxInfo
from protocol.signing import public_key
from runtime.mqttshell import BrokerTlsError
from runtime.tlsconf import TlsSettings
from tests.conftest import (
    MosquittoProcess,
    free_port,
    launch_mosquitto,
    mosquitto_passwd_path,
    require_mosquitto,
)
from tests.edge.fogtools import DEV_PW, FOG_ID, FOG_PW, fog_key, provision
from tests.integration.devices import write_fog_files
from tests.integration.fogrun import running_fog

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
CLI_TIMEOUT_S = 60


@pytest.fixture
def issuer() -> nacl.signing.SigningKey:
    return nacl.signing.SigningKey.generate()


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    """A lab CA with a server certificate for localhost / 127.0.0.1, a server certificate
    for another name only, and a second, unrelated CA."""
    d = tmp_path / "pki"
    make_ca(d)
    issue(d, "localhost", server=True, ips=("127.0.0.1",))
    issue(d, "elsewhere.example", server=True)
    make_ca(tmp_path / "other")
    return d


def tls_fog(tmp_path: Path, issuer: nacl.signing.SigningKey, pki: Path, name: str) -> Path:
    broker = (
        f'port = 0\npassword = "{FOG_PW}"\ndevice_password = "{DEV_PW}"\n'
        f'tls_port = 0\ntls_cert_file = "{pki / name}.pem"\ntls_key_file = "{pki / name}.key"\n'
    )
    return write_fog_files(tmp_path, fog_id=FOG_ID, issuer_key=public_key(issuer), broker=broker)


async def test_a_device_pays_over_the_embedded_brokers_tls_listener(
    tmp_path: Path, issuer: nacl.signing.SigningKey, pki: Path
) -> None:
    async with running_fog(tls_fog(tmp_path, issuer, pki, "localhost")) as fog:
        port = fog.broker_tls_port
        assert port is not None and port != fog.broker_port
        tls = TlsSettings(ca_file=pki / "ca.pem")
        broker = BrokerAddress("127.0.0.1", port, "device", DEV_PW, tls)
        device = Device.open(tmp_path / "dev", fog_id=FOG_ID, fog_key=fog_key(tmp_path))
        await provision(fog, broker, issuer, [device])
        client = broker.client()
        async with asyncio.timeout(10):
            await broker.connect(client)
        try:
            receipt = await device.pay(client, "shop-1", 1_250, "EUR", timeout_s=5)
        finally:
            await client.__aexit__(None, None, None)
        assert receipt.msg.ok and receipt.msg.log_index == 1
        # plain MQTT on the TLS port gets no CONNACK (refused, or no answer at all)
        with pytest.raises((aiomqtt.MqttError, TimeoutError)):
            async with asyncio.timeout(10):
                async with aiomqtt.Client(
                    "127.0.0.1", port, username="device", password=DEV_PW, timeout=3
                ):
                    pass
        # a client trusting another CA is refused with the one-line reason
        other = BrokerAddress(
            "127.0.0.1", port, "device", DEV_PW, TlsSettings(ca_file=tmp_path / "other/ca.pem")
        )
        with pytest.raises(BrokerTlsError, match="certificate not trusted by CA"):
            async with asyncio.timeout(10):
                await other.connect(other.client())


def fog_run(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fogpay.cli", "fog", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
    )


def one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in done.stderr.splitlines() if line.startswith("fogpay:")]
    assert done.returncode == 1, (done.returncode, done.stderr[-2000:])
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    return lines[0]


async def test_wrong_ca_and_wrong_name_are_one_line_and_exit_1(
    tmp_path: Path, issuer: nacl.signing.SigningKey, pki: Path
) -> None:
    server = tmp_path / "server"
    server.mkdir()
    async with running_fog(tls_fog(server, issuer, pki, "elsewhere.example")) as fog:
        port = fog.broker_tls_port
        url = f"mqtts://{FOG_ID}:{FOG_PW}@127.0.0.1:{port}"
        wrong_ca, wrong_name = tmp_path / "wrong-ca", tmp_path / "wrong-name"
        for d in (wrong_ca, wrong_name):
            d.mkdir()
        other_ca = tmp_path / "other/ca.pem"
        a = write_fog_files(
            wrong_ca,
            fog_id="fog-b",
            issuer_key=public_key(issuer),
            broker=f'url = "{url}"\nca_file = "{other_ca}"\n',
        )
        b = write_fog_files(
            wrong_name,
            fog_id="fog-b",
            issuer_key=public_key(issuer),
            broker=f'url = "{url}"\nca_file = "{pki / "ca.pem"}"\n',
        )
        done_a, done_b = await asyncio.gather(
            asyncio.to_thread(fog_run, a), asyncio.to_thread(fog_run, b)
        )
    line = one_error_line(done_a)
    assert line.startswith(f"fogpay: fog run: broker mqtts://127.0.0.1:{port}: TLS: "), line
    assert f"certificate not trusted by CA {other_ca}" in line
    assert FOG_PW not in line
    line = one_error_line(done_b)
    assert "TLS: name 127.0.0.1 does not match the certificate" in line, line


def shipped_server_mosquitto(tmp_path: Path, pki: Path) -> tuple[MosquittoProcess, int]:
    """Mosquitto from deploy/mosquitto/fogpay-server.conf as shipped, its TLS listener kept:
    only the ports (127.0.0.1, free) and the /etc paths move; a password file for the
    issuer account."""
    require_mosquitto()
    etc = tmp_path / "etc"
    (etc / "certs").mkdir(parents=True)
    for src, dst in (("localhost.pem", "server.crt"), ("localhost.key", "server.key")):
        (etc / "certs" / dst).write_bytes((pki / src).read_bytes())
    (etc / "certs/ca.crt").write_bytes((pki / "ca.pem").read_bytes())
    (etc / "fogpay.acl").write_text((DEPLOY / "mosquitto/fogpay.acl").read_text())
    passwd = mosquitto_passwd_path()
    assert passwd is not None
    (etc / "fogpay.passwd").touch(mode=0o600)
    subprocess.run(
        [passwd, "-b", str(etc / "fogpay.passwd"), "issuer", "issuer-pw"], check=True, timeout=30
    )
    plain, tls = free_port(), free_port()
    lines = []
    for line in (DEPLOY / "mosquitto/fogpay-server.conf").read_text().splitlines():
        if line.startswith("listener 1883"):
            line = f"listener {plain} 127.0.0.1"
        elif line.startswith("listener 8883"):
            line = f"listener {tls} 127.0.0.1"
        lines.append(line.replace("/etc/mosquitto/", f"{etc}/"))
    assert any(line.startswith("certfile") for line in lines), "the shipped TLS listener"
    proc = launch_mosquitto(tmp_path, plain, "\nlog_dest stderr\n" + "\n".join(lines) + "\n")
    return proc, tls


@pytest.fixture
def server_mosquitto(tmp_path: Path, pki: Path) -> Iterator[int]:
    """The shipped server config running; its TLS port."""
    proc, tls = shipped_server_mosquitto(tmp_path, pki)
    try:
        yield tls
    finally:
        proc.stop()


@pytest.mark.mosquitto
async def test_the_cloud_service_runs_over_mqtts_to_the_shipped_mosquitto(
    tmp_path: Path, pki: Path, server_mosquitto: int
) -> None:
    port = server_mosquitto
    store = await open_store(f"sqlite://{tmp_path / 'cloud.db'}")
    try:
        core = CloudCore(
            store=store,
            issuer=nacl.signing.SigningKey.generate(),
            clock=wall_ms,
            policy=LeasePolicy(),
        )

        def service(ca: Path) -> CloudService:
            return CloudService(
                core=core,
                broker_host="127.0.0.1",
                broker_port=port,
                username="issuer",
                password="issuer-pw",
                store=store,
                tls=TlsSettings(ca_file=ca),
            )

        svc = service(pki / "ca.pem")
        ready = asyncio.Event()
        task = asyncio.create_task(svc.run(ready=ready))
        try:
            async with asyncio.timeout(20):
                await ready.wait()
        finally:
            await svc.stop()
            async with asyncio.timeout(20):
                await task
        # the same service trusting another CA: refused at once, one line, no retry loop
        with pytest.raises(BrokerTlsError, match="certificate not trusted by CA"):
            async with asyncio.timeout(20):
                await service(tmp_path / "other/ca.pem").run()
    finally:
        await store.close()


async def test_the_sandbox_advertises_its_tls_listener_and_it_answers(tmp_path: Path) -> None:
    from tests.edge.test_sandbox_process import start_sandbox, stop_sandbox

    directory = tmp_path / "sb"
    proc = start_sandbox(directory, tmp_path / "sandbox.log")
    try:
        info = SandboxInfo.load(directory / SANDBOX_JSON)
        assert info.tls is not None and info.tls["host"] == "127.0.0.1"
        assert info.tls["port"] != info.broker.port
        ca = directory / info.tls["ca_file"]
        assert (ca.parent / "ca.key").stat().st_mode & 0o077 == 0
        b = info.broker
        secure = BrokerAddress(
            info.tls["host"], info.tls["port"], b.username, b.password, TlsSettings(ca_file=ca)
        )
        client = secure.client()
        async with asyncio.timeout(10):
            await secure.connect(client)
        await client.__aexit__(None, None, None)
    finally:
        assert stop_sandbox(proc) == 0
