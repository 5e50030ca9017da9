"""TCP_NODELAY on every device client: read back with getsockopt on the client's socket,
connected to a real broker on 127.0.0.1 (Nagle plus delayed ACKs cost a payment ~35 ms)."""

import contextlib
import socket
from collections.abc import AsyncIterator

import aiomqtt

from edge.device import DeviceSession, client_socket
from fogpay.demo import mqtt_client
from fogpay.edge_cli import connected
from fogpay.provision import BrokerAddress
from tests.conftest import BrokerEndpoint

FOG_KEY = bytes(32 * [7])


def nodelay(client: aiomqtt.Client) -> int:
    sock = client_socket(client)
    assert sock is not None, "client not connected"
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


@contextlib.asynccontextmanager
async def plain(broker: BrokerEndpoint) -> AsyncIterator[aiomqtt.Client]:
    async with aiomqtt.Client(broker.host, broker.port, timeout=10) as c:
        yield c


async def test_a_plain_client_has_nagle_on(amqtt_broker: BrokerEndpoint) -> None:
    """The baseline the other tests would fall back to: the kernel default is Nagle on."""
    async with plain(amqtt_broker) as c:
        assert nodelay(c) == 0


async def test_broker_address_clients_set_nodelay(amqtt_broker: BrokerEndpoint) -> None:
    address = BrokerAddress(amqtt_broker.host, amqtt_broker.port)
    async with address.client(identifier="nodelay-test") as c:
        assert nodelay(c) != 0


async def test_edge_cli_clients_set_nodelay(amqtt_broker: BrokerEndpoint) -> None:
    """``fogpay edge pay`` and ``edge simulate`` connect through ``connected``."""
    async with connected(BrokerAddress(amqtt_broker.host, amqtt_broker.port), "pay") as c:
        assert nodelay(c) != 0


async def test_demo_device_client_sets_nodelay(amqtt_broker: BrokerEndpoint) -> None:
    async with mqtt_client(BrokerAddress(amqtt_broker.host, amqtt_broker.port), "devices") as c:
        assert nodelay(c) != 0


async def test_device_session_sets_nodelay_on_any_client(amqtt_broker: BrokerEndpoint) -> None:
    """A client made elsewhere, without the option, gets it when a session takes it over."""
    async with plain(amqtt_broker) as c:
        assert nodelay(c) == 0
        async with DeviceSession(c, fog_id="fog-nd", fog_key=FOG_KEY, wildcard=True):
            assert nodelay(c) != 0
