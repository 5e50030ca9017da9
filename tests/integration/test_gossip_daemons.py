"""Two fog daemons gossiping through a real broker (docs/protocol.md 17.4, 17.5): one amqtt
broker both fogs connect to (``broker.url``), real SQLite, real keys. What fog-a authorizes
reaches fog-b as a ``seen`` (a clone's second use of the q is declined stale there), and a
revocation fog-a receives from a peer reaches fog-b through fog-a alone (it is never
published on the retained trust topic both fogs read)."""

from pathlib import Path

import pytest

from protocol import topics
from protocol.messages import FogCredential
from protocol.reasons import Reason
from protocol.signing import public_key, seal
from runtime.keyfile import load_key_file
from tests.conftest import BrokerEndpoint
from tests.integration.devices import (
    FAR_FUTURE_MS,
    Device,
    Issuer,
    publish_retained,
    wallet,
    write_fog_files,
)
from tests.integration.fogrun import running_fog, wait_counter


def fog_files(
    tmp_path: Path, fog_id: str, peer: str, issuer: Issuer, broker: str, *, child: bool
) -> Path:
    directory = tmp_path / fog_id
    directory.mkdir()
    extra = (
        f"store_process = {'true' if child else 'false'}\n"
        f'[federation]\npeers = ["{peer}"]\nseen_every_ms = 50\n'
    )
    return write_fog_files(
        directory,
        fog_id=fog_id,
        issuer_key=issuer.public,
        broker=f'url = "{broker}"',
        extra=extra,
    )


def credential(issuer: Issuer, fog_id: str, config: Path) -> tuple[str, bytes]:
    key = load_key_file(config.parent / "fog.key")
    cred = FogCredential(
        fog_id=fog_id, key=public_key(key), not_before_ms=0, not_after_ms=FAR_FUTURE_MS
    )
    return topics.fog_topic(fog_id), seal(cred, issuer.key)


@pytest.mark.parametrize("child", [True, False], ids=["store-process", "store-thread"])
async def test_seen_and_a_revocation_travel_between_two_fog_daemons(
    tmp_path: Path, amqtt_broker: BrokerEndpoint, child: bool
) -> None:
    issuer = Issuer()
    config_a = fog_files(tmp_path, "fog-a", "fog-b", issuer, amqtt_broker.url, child=child)
    config_b = fog_files(tmp_path, "fog-b", "fog-a", issuer, amqtt_broker.url, child=child)
    at_a = Device("fog-a")
    at_b = Device("fog-b", key=at_a.key)  # the same key, paying at the other fog
    async with running_fog(config_a) as fog_a, running_fog(config_b) as fog_b:
        items = [
            issuer.owner_credential(),
            credential(issuer, "fog-a", config_a),
            credential(issuer, "fog-b", config_b),
            issuer.binding(at_a.public),
            issuer.lease("fog-a", 5_000_000),
            issuer.lease("fog-b", 5_000_000),
        ]
        await publish_retained(amqtt_broker.host, amqtt_broker.port, items)
        for fog in (fog_a, fog_b):
            await wait_counter(fog, "fog_accepted", 2)
            await wait_counter(fog, "bind_accepted")
            await wait_counter(fog, "lease_accepted")
        async with (
            wallet(amqtt_broker.host, amqtt_broker.port, "fog-a") as wa,
            wallet(amqtt_broker.host, amqtt_broker.port, "fog-b") as wb,
        ):
            assert (await wa.pay(at_a, at_a.intent(100_000, seq=1))).ok
            await wait_counter(fog_b, "seen_accepted")  # fog-a's seen reached fog-b
            stale = await wb.pay(at_b, at_b.intent(100_000, seq=1))  # same q, other intent
            assert stale.reason is Reason.STALE
            assert (await wb.pay(at_b, at_b.intent(100_000, seq=2))).ok
            await wait_counter(fog_a, "seen_accepted")  # and fog-b's reached fog-a
            assert (await wa.pay(at_a, at_a.intent(100_000, seq=2))).reason is Reason.STALE

            # a revocation handed to fog-a by a peer (fog-c, say): fog-a passes it on
            _, revocation = issuer.revocation(at_a.public)
            await wa.client.publish(
                topics.gossip_topic("fog-a", "revoke"), revocation, qos=1, retain=False
            )
            await wait_counter(fog_b, "revoke_accepted")
            await wait_counter(fog_a, "revoke_duplicate")  # fog-b passed it back: it stops
            assert (await wb.pay(at_b, at_b.intent(100_000, seq=3))).reason is Reason.REVOKED
            assert (await wa.pay(at_a, at_a.intent(100_000, seq=4))).reason is Reason.REVOKED
        assert fog_a.counters.get("gossip_revoke_sent", 0) == 1
        assert fog_b.counters.get("gossip_revoke_sent", 0) == 1
        assert fog_a.counters.get("revoke_accepted", 0) == 1
