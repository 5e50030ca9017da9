"""Broker accounts and roles on both brokers, made from the cloud's registry.

- The embedded broker (``fog.brokerauth.HardenedBroker`` as the fog runs it) and Mosquitto
  with the shipped ``fogpay-server.conf`` + ``fogpay.acl``: per role, allowed and denied
  publish and subscribe.
- A real cloud store: a device's account appears when its binding is registered and
  disappears when it is revoked (``cloud.accounts.AccountSync`` writing the amqtt accounts
  file, and ``sync_once`` writing Mosquitto's password file and sending it SIGHUP).
"""

import asyncio
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import nacl.signing
import pytest

from cloud import registry
from cloud.accounts import AccountSync, AccountTargets, sync_once
from cloud.sqlitestore import SqliteStore
from cloud.store import Tx
from fog.broker import EmbeddedBroker
from fog.config import BrokerConfig
from fogpay.provision import Validity, binding_body, make_binding
from protocol.login import account_digest, device_password, device_username
from protocol.signing import possession_proof, public_key, seal_signed
from tests.conftest import free_port, launch_mosquitto
from tests.integration.test_fog_mosquitto import deploy_conf, password_file

SECRET = bytes(range(32))
OPERATOR_PW = "operator-pw"
BOUND_S = 10.0
FOG = "fog-a"


def now_ms() -> int:
    return int(time.time() * 1000)


def intent(fog: str, key: str) -> str:
    return f"fogpay/1/{fog}/intent/{key}"


def receipt(fog: str, key: str) -> str:
    return f"fogpay/1/{fog}/receipt/{key}"


class World:
    """A cloud store with an owner; devices bound (with proofs) and revoked for real."""

    def __init__(self, store: SqliteStore) -> None:
        self.store = store
        self.issuer = nacl.signing.SigningKey.generate()
        self.owner = nacl.signing.SigningKey.generate()

    async def setup(self) -> None:
        async def fn(tx: Tx) -> None:
            await registry.add_owner(
                tx,
                self.issuer,
                owner_id="alice",
                key=public_key(self.owner),
                limit_micros=1_000_000,
                currency="EUR",
                funding_ref="",
                now_ms=now_ms() - 60_000,
            )

        await self.store.transact(fn)

    async def bind(self, device: nacl.signing.SigningKey) -> None:
        b = make_binding(
            public_key(device),
            owner_id="alice",
            currency="EUR",
            tx_max_micros=1000,
            day_max_micros=10_000,
            validity=Validity.days(1, now=now_ms()),
        )
        proof = possession_proof(device, binding_body(b))
        envelope = seal_signed(b, self.owner).raw

        async def fn(tx: Tx) -> None:
            await registry.bind_device(tx, envelope, proof, now_ms=now_ms())

        await self.store.transact(fn)

    async def revoke(self, device: nacl.signing.SigningKey) -> None:
        async def fn(tx: Tx) -> None:
            await registry.issuer_revoke(
                tx, self.issuer, public_key(device), reason="stolen", now_ms=now_ms()
            )

        await self.store.transact(fn)


def login(device: nacl.signing.SigningKey) -> tuple[str, str]:
    key = public_key(device)
    return device_username(key), device_password(SECRET, key)


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    store = await SqliteStore.open(str(tmp_path / "cloud.sqlite"))
    w = World(store)
    await w.setup()
    try:
        yield w
    finally:
        await store.close()


def amqtt_targets(tmp_path: Path) -> AccountTargets:
    fixed = {"operator": {"role": "operator", "sha256": account_digest(OPERATOR_PW)}}
    return AccountTargets(amqtt_file=tmp_path / "accounts.json", amqtt_fixed=fixed)


@pytest.fixture
async def embedded(tmp_path: Path) -> AsyncIterator[int]:
    config = BrokerConfig(
        host="127.0.0.1",
        port=free_port(),
        password="fog-pw",
        accounts_file=str(tmp_path / "accounts.json"),
        process=False,
    )
    broker = EmbeddedBroker(config)
    await broker.start()
    try:
        yield broker.port
    finally:
        await broker.stop()


def client(port: int, user: str, password: str, **kw: Any) -> aiomqtt.Client:
    return aiomqtt.Client("127.0.0.1", port, username=user, password=password, **kw)


async def first_of(c: aiomqtt.Client, wanted: set[bytes]) -> list[bytes]:
    """Messages until one of ``wanted`` arrives (bounded); all of them, in order."""
    got: list[bytes] = []
    async with asyncio.timeout(BOUND_S):
        async for m in c.messages:
            got.append(bytes(m.payload))
            if got[-1] in wanted:
                return got
    return got


def suback(code: object) -> int:
    """A SUBACK return code as an int (aiomqtt gives an int or a paho ReasonCode)."""
    value = getattr(code, "value", code)
    assert isinstance(value, int)
    return value


async def can_login(port: int, user: str, password: str) -> bool:
    try:
        async with client(port, user, password):
            return True
    except aiomqtt.MqttCodeError:
        return False


async def check_device_rights(
    port: int,
    a: tuple[str, str],
    b_key: str,
    op: tuple[str, str],
    fog: str,
    held_op: tuple[str, str] | None = None,
) -> None:
    """Device A: its own intent goes through, B's does not; it reads its own receipts and
    trust, never B's receipts. ``op`` is an account that may write receipts and trust and
    read intents; ``held_op`` one that reads held records and writes their answers (default
    ``op``)."""
    a_key = a[0]
    async with client(port, *op, identifier="op") as o:
        await o.subscribe(intent(fog, "+"), qos=1)
        # reads: A subscribes to every receipt of the fog, to B's and to its own; only its own
        # reach it (the embedded broker refuses the first two, Mosquitto filters deliveries)
        async with client(port, *a, identifier="a-read") as dev:
            await dev.subscribe(receipt(fog, "+"), qos=1)
            await dev.subscribe(receipt(fog, b_key), qos=1)
            await dev.subscribe(receipt(fog, a_key), qos=1)
            await o.publish(receipt(fog, b_key), b"B's receipt", qos=1)
            await o.publish(receipt(fog, a_key), b"A's receipt", qos=1)
            got = await first_of(dev, {b"A's receipt"})
            assert got == [b"A's receipt"]
        # writes: B's intent and a trust topic never arrive; A's own does
        try:
            async with client(port, *a, identifier="a-write") as dev:
                await dev.publish(intent(fog, b_key), b"forged", qos=1)
                await dev.publish(f"fogpay/1/trust/bind/{b_key}", b"forged trust", qos=1)
        except aiomqtt.MqttError:
            pass  # the embedded broker closes a connection at a denied publish
        async with client(port, *a, identifier="a-write2") as dev:
            await dev.publish(intent(fog, a_key), b"A's intent", qos=1)
        assert await first_of(o, {b"A's intent"}) == [b"A's intent"]
    # held receipts (docs/protocol.md 17.7): A hands in its own and reads its own answers only
    async with client(port, *(held_op or op), identifier="op-held") as o:
        await o.subscribe("fogpay/1/held/+/records", qos=1)
        async with client(port, *a, identifier="a-held") as dev:
            await dev.subscribe(f"fogpay/1/held/{b_key}/ack", qos=1)
            await dev.subscribe(f"fogpay/1/held/{a_key}/ack", qos=1)
            await o.publish(f"fogpay/1/held/{b_key}/ack", b"B's hack", qos=1)
            await o.publish(f"fogpay/1/held/{a_key}/ack", b"A's hack", qos=1)
            assert await first_of(dev, {b"A's hack"}) == [b"A's hack"]
        try:
            async with client(port, *a, identifier="a-held-forge") as dev:
                await dev.publish(f"fogpay/1/held/{b_key}/records", b"forged held", qos=1)
        except aiomqtt.MqttError:
            pass  # the embedded broker closes a connection at a denied publish
        async with client(port, *a, identifier="a-held-own") as dev:
            await dev.publish(f"fogpay/1/held/{a_key}/records", b"A's held", qos=1)
        assert await first_of(o, {b"A's held"}) == [b"A's held"]


async def test_roles_on_the_embedded_broker(tmp_path: Path, world: World, embedded: int) -> None:
    a, b = nacl.signing.SigningKey.generate(), nacl.signing.SigningKey.generate()
    for d in (a, b):
        await world.bind(d)
    await sync_once(world.store, SECRET, amqtt_targets(tmp_path), now_ms=now_ms())
    await check_device_rights(embedded, login(a), login(b)[0], ("operator", OPERATOR_PW), FOG)
    # a device may subscribe to trust (SUBACK granted) but not to everything
    async with client(embedded, *login(a)) as dev:
        granted = await dev.subscribe("fogpay/1/trust/#", qos=1)
        denied = await dev.subscribe("fogpay/1/#", qos=1)
    assert [suback(g) for g in granted] == [1]
    assert [suback(g) for g in denied] == [0x80]
    # wrong passwords and unknown accounts are refused
    assert not await can_login(embedded, login(a)[0], login(b)[1])
    assert not await can_login(embedded, "operator", "nope")
    assert not await can_login(embedded, "device", "")


@pytest.mark.mosquitto
async def test_roles_on_mosquitto_with_the_shipped_acl(tmp_path: Path, world: World) -> None:
    a, b = nacl.signing.SigningKey.generate(), nacl.signing.SigningKey.generate()
    for d in (a, b):
        await world.bind(d)
    base = password_file(tmp_path, {FOG: "fog-pw", "issuer": "issuer-pw"})
    passwd = tmp_path / "fogpay.passwd"
    targets = AccountTargets(mosquitto_passwd=passwd, mosquitto_base=base)
    await sync_once(world.store, SECRET, targets, now_ms=now_ms())
    port = free_port()
    broker = launch_mosquitto(
        tmp_path, port, deploy_conf("fogpay-server.conf", tmp_path, port, passwd)
    )
    try:
        issuer = ("issuer", "issuer-pw")  # it reads held records and answers them
        await check_device_rights(port, login(a), login(b)[0], (FOG, "fog-pw"), FOG, issuer)
        assert not await can_login(port, login(a)[0], login(b)[1])
        # the issuer may publish trust; a device's trust write never reaches a reader
        async with client(port, *login(b), identifier="b") as reader:
            await reader.subscribe("fogpay/1/trust/#", qos=1)
            async with client(port, *login(a), identifier="a") as dev:
                await dev.publish("fogpay/1/trust/owner/x", b"forged", qos=1)
            async with client(port, "issuer", "issuer-pw") as issuer:
                await issuer.publish("fogpay/1/trust/owner/x", b"issuer's", qos=1)
            assert await first_of(reader, {b"issuer's"}) == [b"issuer's"]
    finally:
        broker.stop()


async def wait_login(port: int, user: str, password: str, *, want: bool) -> None:
    """Until a login succeeds (``want``) or is refused: bounded in time."""
    async with asyncio.timeout(BOUND_S):
        for _ in range(int(BOUND_S / 0.05)):
            if await can_login(port, user, password) is want:
                return
            await asyncio.sleep(0.05)
    raise AssertionError(f"login of {user[:16]} never became {want}")


async def test_embedded_accounts_follow_registration_and_revocation(
    tmp_path: Path, world: World, embedded: int
) -> None:
    sync = AccountSync(
        store=world.store, secret=SECRET, targets=amqtt_targets(tmp_path), clock=now_ms
    )
    ready = asyncio.Event()
    task = asyncio.create_task(sync.run(ready=ready))
    try:
        await asyncio.wait_for(ready.wait(), BOUND_S)
        device = nacl.signing.SigningKey.generate()
        user, pw = login(device)
        assert not await can_login(embedded, user, pw)
        await world.bind(device)
        await wait_login(embedded, user, pw, want=True)
        async with client(embedded, "operator", OPERATOR_PW, identifier="op") as o:
            await o.subscribe(intent(FOG, "+"), qos=1)
            async with client(embedded, user, pw, identifier="dev") as dev:
                await dev.publish(intent(FOG, user), b"before", qos=1)
                assert await first_of(o, {b"before"}) == [b"before"]
                await world.revoke(device)
                await wait_login(embedded, user, pw, want=False)
                # the open connection lost its rights too
                try:
                    await dev.publish(intent(FOG, user), b"after", qos=1)
                except aiomqtt.MqttError:
                    pass
            async with client(embedded, "operator", OPERATOR_PW, identifier="op2") as o2:
                await o2.publish(intent(FOG, "f" * 64), b"sentinel", qos=1)
            assert await first_of(o, {b"sentinel"}) == [b"sentinel"]
    finally:
        await sync.stop()
        await asyncio.wait_for(task, BOUND_S)


@pytest.mark.mosquitto
async def test_mosquitto_accounts_follow_registration_and_revocation(
    tmp_path: Path, world: World
) -> None:
    base = password_file(tmp_path, {FOG: "fog-pw", "issuer": "issuer-pw"})
    passwd = tmp_path / "fogpay.passwd"
    pid_file = tmp_path / "mosquitto.pid"
    targets = AccountTargets(
        mosquitto_passwd=passwd, mosquitto_base=base, mosquitto_pid_file=pid_file
    )
    first = AccountTargets(mosquitto_passwd=passwd, mosquitto_base=base)  # nothing to reload
    await sync_once(world.store, SECRET, first, now_ms=now_ms())
    port = free_port()
    broker = launch_mosquitto(
        tmp_path, port, deploy_conf("fogpay-server.conf", tmp_path, port, passwd)
    )
    pid_file.write_text(f"{broker.process.pid}\n")
    try:
        device = nacl.signing.SigningKey.generate()
        user, pw = login(device)
        assert not await can_login(port, user, pw)
        await world.bind(device)
        await sync_once(world.store, SECRET, targets, now_ms=now_ms())
        await wait_login(port, user, pw, want=True)
        await world.revoke(device)
        await sync_once(world.store, SECRET, targets, now_ms=now_ms())
        await wait_login(port, user, pw, want=False)
        assert await can_login(port, FOG, "fog-pw")  # the base accounts stay
    finally:
        broker.stop()


def test_the_sandbox_gives_each_bound_device_its_own_login(tmp_path: Path) -> None:
    """``fogpay sandbox`` as a process: a device bound with the CLI pays through its own
    login (``fogpay sandbox credentials``); once revoked, that login is refused."""
    from dataclasses import replace

    from edge.device import Device
    from fogpay.provision import BrokerAddress
    from fogpay.sandbox import SANDBOX_JSON, SandboxInfo
    from tests.edge.test_sandbox_process import (
        broker_url,
        cli,
        pay,
        provision,
        start_sandbox,
        stop_sandbox,
    )

    directory, work, log = tmp_path / "sbx", tmp_path / "work", tmp_path / "sandbox.log"
    work.mkdir()
    proc = start_sandbox(directory, log)
    try:
        info = SandboxInfo.load(directory / SANDBOX_JSON)
        assert info.broker.username == "operator"
        device = Device.open(work / "dev", fog_id=info.fog_id, fog_key=info.fog_key)
        login = cli("sandbox", "credentials", "--dir", str(directory), "--device", device.key_hex)
        assert login[0]["username"] == device.key_hex and len(login[0]["password"]) == 22
        port = info.broker.port
        assert not asyncio.run(can_login(port, login[0]["username"], login[0]["password"]))
        provision(directory, work, info, device)
        asyncio.run(wait_login(port, login[0]["username"], login[0]["password"], want=True))
        own = replace(
            info,
            broker=BrokerAddress("127.0.0.1", port, login[0]["username"], login[0]["password"]),
        )
        receipt = asyncio.run(pay(own, device, 10_000))
        assert receipt.msg.ok and receipt.signer == info.fog_key
        cli(
            "device", "revoke", "--signer-key", str(work / "owner.key"),
            "--key", device.key_hex, "--reason", "stolen", "--broker", broker_url(info),
        )  # fmt: skip
        asyncio.run(wait_login(port, login[0]["username"], login[0]["password"], want=False))
    finally:
        assert stop_sandbox(proc) == 0


def test_the_login_golden_vector_of_docs_protocol() -> None:
    password = device_password(bytes(range(32)), bytes.fromhex("aa" * 32))
    assert password == "yCZOC8CWDXRFYT6oWpUxCQ"
    digest = "3239c6bf7e479cf4d6bf6c82fa5c35b67f84d5372092773270a41f7a7e5b30c0"
    assert account_digest(password) == digest
    assert device_password(bytes(32), bytes.fromhex("aa" * 32)) != password


def run_cli(cmd: list[str]) -> "subprocess.CompletedProcess[str]":
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)


async def test_the_cloud_cli_writes_the_account_files(tmp_path: Path, world: World) -> None:
    """``fogpay cloud accounts sync|login`` over the same store, as an operator runs them."""
    import json
    import sys

    device = nacl.signing.SigningKey.generate()
    await world.bind(device)
    secret_file = tmp_path / "login.secret"
    secret_file.write_text(SECRET.hex() + "\n")
    base = tmp_path / "base.passwd"
    base.write_text("issuer:$7$101$x$y\n")
    store = f"sqlite://{tmp_path / 'cloud.sqlite'}"
    fogpay = [sys.executable, "-m", "fogpay.cli", "cloud"]
    common = ["--store", store, "--login-secret-file", str(secret_file)]
    sync = [*fogpay, "accounts", "sync", *common, "--mosquitto-base", str(base)]
    sync += ["--mosquitto-passwd", str(tmp_path / "out.passwd")]
    sync += ["--amqtt-file", str(tmp_path / "accounts.json")]
    key_hex = public_key(device).hex()
    done = await asyncio.to_thread(run_cli, sync)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"devices": 1}
    lines = (tmp_path / "out.passwd").read_text().splitlines()
    assert lines[0] == "issuer:$7$101$x$y" and lines[1].startswith(f"{key_hex}:$7$101$")
    accounts = json.loads((tmp_path / "accounts.json").read_text())["accounts"]
    assert accounts[key_hex]["sha256"] == account_digest(login(device)[1])
    login_cmd = [*fogpay, "accounts", "login", key_hex, *common]
    done = await asyncio.to_thread(run_cli, login_cmd)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"username": key_hex, "password": login(device)[1]}
    bad = [*fogpay, "accounts", "login", "zz", *common]
    done = await asyncio.to_thread(run_cli, bad)
    assert done.returncode == 2 and done.stderr.startswith("fogpay: ")


async def test_the_legacy_shared_device_account_has_a_devices_rights_only(tmp_path: Path) -> None:
    """``broker.device_password`` (the demo's shared account): intents and receipts of any
    device, trust read-only; never trust, leases or acks, so a device holding it cannot
    publish an owner credential the cloud never registered."""
    config = BrokerConfig(
        host="127.0.0.1",
        port=free_port(),
        password="fog-pw",
        device_password="dev-pw",
        process=False,
    )
    broker = EmbeddedBroker(config)
    await broker.start()
    fog, key = FOG, "ab" * 32
    forged = {b"forged trust", b"forged lease", b"forged ack"}
    try:
        async with client(broker.port, "fog", "fog-pw", identifier="op") as op:
            await op.subscribe("fogpay/1/#", qos=1)
            for topic, payload in (
                (f"fogpay/1/trust/owner/{'cd' * 32}", b"forged trust"),
                (f"fogpay/1/{fog}/lease/{'00' * 16}", b"forged lease"),
                (f"fogpay/1/{fog}/ack", b"forged ack"),
            ):
                try:
                    async with client(broker.port, "device", "dev-pw") as dev:
                        await dev.publish(topic, payload, qos=1)
                except aiomqtt.MqttError:
                    pass  # the embedded broker closes a connection at a denied publish
            async with client(broker.port, "device", "dev-pw", identifier="dev-ok") as dev:
                granted = await dev.subscribe(receipt(fog, "+"), qos=1)
                assert [suback(g) for g in granted] == [1]
                await dev.publish(intent(fog, key), b"an intent", qos=1)
            got = await first_of(op, {b"an intent"})
            assert forged.isdisjoint(got) and got[-1] == b"an intent"
    finally:
        await broker.stop()
