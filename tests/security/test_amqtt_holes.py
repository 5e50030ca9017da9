"""amqtt 0.12.1's holes, each against a real amqtt broker on 127.0.0.1: the stock ``Broker``
shows the hole (so the test can fail), ``fog.brokerauth.HardenedBroker`` (what the fog runs)
closes it. Accounts: the operator ``fog`` and two devices A and B from an accounts file."""

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from amqtt.broker import Broker

from fog import brokerauth
from fog.broker import amqtt_config
from fog.config import BrokerConfig
from tests.conftest import free_port

KEY_A = "aa" * 32
KEY_B = "bb" * 32
PW = {"fog": "op-secret", KEY_A: "pw-a", KEY_B: "pw-b"}
BOUND_S = 10.0


def write_accounts(path: Path, devices: dict[str, str]) -> None:
    accounts = {
        k: {"role": brokerauth.ROLE_DEVICE, "sha256": brokerauth.digest(pw)}
        for k, pw in devices.items()
    }
    path.write_text(json.dumps({"accounts": accounts}))


@pytest.fixture(params=["stock", "hardened"])
async def broker(request: Any, tmp_path: Path) -> AsyncIterator[tuple[str, int]]:
    accounts = tmp_path / "accounts.json"
    write_accounts(accounts, {KEY_A: PW[KEY_A], KEY_B: PW[KEY_B]})
    port = free_port()
    config = BrokerConfig(
        host="127.0.0.1", port=port, password=PW["fog"], accounts_file=str(accounts)
    )
    cls = Broker if request.param == "stock" else brokerauth.HardenedBroker
    b = cls(amqtt_config(config))
    await b.start()
    try:
        yield request.param, port
    finally:
        await b.shutdown()


def client(port: int, user: str, *, password: str | None = None, **kw: Any) -> aiomqtt.Client:
    pw = PW[user] if password is None else password
    return aiomqtt.Client("127.0.0.1", port, username=user, password=pw, **kw)


def receipt(key: str) -> str:
    return f"fogpay/1/f/receipt/{key}"


async def test_retained_messages_on_connect_respect_the_acl(broker: tuple[str, int]) -> None:
    kind, port = broker
    async with client(port, "fog", identifier="op", clean_session=False) as op:
        await op.subscribe("fogpay/1/#", qos=1)  # a subscription of another client
        await op.publish(receipt(KEY_A), b"A's receipt", qos=1, retain=True)
        await op.publish(receipt(KEY_B), b"B's own", qos=1, retain=True)
        got: list[tuple[str, bytes]] = []
        async with client(port, KEY_B, identifier="dev-b") as b:
            await b.subscribe(receipt(KEY_B), qos=1)
            async with asyncio.timeout(BOUND_S):
                async for m in b.messages:  # CONNECT-time retained come before the SUBACK's
                    got.append((str(m.topic), bytes(m.payload)))
                    if m.payload == b"B's own":
                        break
    leaked = [t for t, _ in got if t == receipt(KEY_A)]
    if kind == "stock":
        assert leaked, "amqtt 0.12.1 sends other clients' retained matches past the ACL"
    else:
        assert leaked == []


async def _wait_for(c: aiomqtt.Client, payload: bytes) -> bool:
    async with asyncio.timeout(BOUND_S):
        async for m in c.messages:
            if m.payload == payload:
                return True
    return False


async def _still_served(port: int, a: aiomqtt.Client, marker: bytes) -> bool:
    """Does A's connection still get what the operator sends to its receipt topic?"""
    try:
        async with client(port, "fog", identifier="op2") as op:
            await op.publish(receipt(KEY_A), marker, qos=1)
        return await _wait_for(a, marker)
    except (aiomqtt.MqttError, TimeoutError):
        return False


async def test_a_failed_login_under_a_client_id_leaves_its_session_alone(
    broker: tuple[str, int],
) -> None:
    kind, port = broker
    async with client(port, KEY_A, identifier="dev-a") as a:
        await a.subscribe(receipt(KEY_A), qos=1)
        with pytest.raises(aiomqtt.MqttCodeError):
            async with client(port, KEY_A, identifier="dev-a", password="wrong"):
                pass
        served = await _still_served(port, a, b"after a failed login")
    assert served is (kind == "hardened")


async def test_another_account_cannot_take_a_client_id_over(broker: tuple[str, int]) -> None:
    kind, port = broker
    async with client(port, KEY_A, identifier="dev-a") as a:
        await a.subscribe(receipt(KEY_A), qos=1)
        if kind == "hardened":
            with pytest.raises(aiomqtt.MqttCodeError) as refused:
                async with client(port, KEY_B, identifier="dev-a"):
                    pass
            assert "identifier" in str(refused.value.rc)  # CONNACK 2, identifier rejected
        else:
            async with client(port, KEY_B, identifier="dev-a"):
                pass  # B holds A's session now
        served = await _still_served(port, a, b"after a takeover attempt")
    assert served is (kind == "hardened")


async def test_a_denied_publish_closes_the_connection_and_goes_nowhere(
    broker: tuple[str, int],
) -> None:
    kind, port = broker
    others = "fogpay/1/f/intent/" + KEY_B
    async with client(port, "fog", identifier="op") as op:
        await op.subscribe("fogpay/1/f/intent/+", qos=1)
        closed = False
        async with client(port, KEY_A, identifier="dev-a") as a:
            await a.subscribe(receipt(KEY_A), qos=1)
            await a.publish(others, b"forged", qos=1)  # amqtt PUBACKs before its ACL check
            try:
                await op.publish(receipt(KEY_A), b"still there?", qos=1)
                closed = not await _wait_for(a, b"still there?")
            except (aiomqtt.MqttError, TimeoutError):
                closed = True
        async with client(port, KEY_A, identifier="dev-a2") as a2:
            await a2.publish("fogpay/1/f/intent/" + KEY_A, b"own", qos=1)
        async with asyncio.timeout(BOUND_S):
            async for m in op.messages:
                assert m.payload != b"forged"
                if m.payload == b"own":
                    break
    assert closed is (kind == "hardened")


async def test_what_a_client_sent_before_disconnecting_is_delivered(
    broker: tuple[str, int],
) -> None:
    """Hole 5: a tool publishes trust messages (QoS 1, each acknowledged) and disconnects at
    once; amqtt's client loop took one queued message per turn and dropped the rest when the
    DISCONNECT came first."""
    kind, port = broker
    n = 200
    lost = []
    for attempt in range(2):
        topic = f"fogpay/1/trust/owner/o{attempt}"
        got = 0
        async with client(port, "fog", identifier=f"sub{attempt}") as sub:
            await sub.subscribe(f"{topic}/#", qos=1)
            async with client(
                port, "fog", identifier=f"pub{attempt}", max_inflight_messages=n
            ) as pub:
                await asyncio.gather(*(pub.publish(f"{topic}/{i}", b"x", qos=1) for i in range(n)))
            # every PUBLISH was acknowledged; the publisher has disconnected
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    async for _ in sub.messages:
                        got += 1
                        if got == n:
                            break
        lost.append(n - got)
    if kind == "stock":
        assert sum(lost) > 0, "amqtt 0.12.1 drops what was still queued at the DISCONNECT"
    else:
        assert lost == [0, 0]
