"""MQTT topics of spec section 8: every topic builds and parses back; malformed levels are
refused with TopicError."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol import leasing, topics, transfer
from protocol.errors import FogpayError, TopicError
from protocol.topics import Kind, Topic
from tests.protocol import strategies as sts
from tests.protocol.common import PROPERTY

DEVICE = bytes(range(32))
HEX = DEVICE.hex()
LEASE = bytes(range(16))


def test_every_topic_of_section_8() -> None:
    cases = {
        topics.intent_topic("fog-1", DEVICE): Topic(Kind.INTENT, fog_id="fog-1", key=DEVICE),
        topics.receipt_topic("fog-1", DEVICE): Topic(Kind.RECEIPT, fog_id="fog-1", key=DEVICE),
        topics.owner_topic("acme"): Topic(Kind.TRUST_OWNER, owner_id="acme"),
        topics.fog_topic("fog-1"): Topic(Kind.TRUST_FOG, fog_id="fog-1"),
        topics.bind_topic(DEVICE): Topic(Kind.TRUST_BIND, key=DEVICE),
        topics.revoke_topic(DEVICE): Topic(Kind.TRUST_REVOKE, key=DEVICE),
        topics.lease_topic("fog-1", LEASE): Topic(Kind.LEASE, fog_id="fog-1", lease_id=LEASE),
        topics.batch_topic("fog-1"): Topic(Kind.BATCH, fog_id="fog-1"),
        topics.ack_topic("fog-1"): Topic(Kind.ACK, fog_id="fog-1"),
        leasing.lease_request_topic("fog-1"): Topic(Kind.LEASE_REQUEST, fog_id="fog-1"),
        leasing.lease_report_topic("fog-1"): Topic(Kind.LEASE_REPORT, fog_id="fog-1"),
    }
    assert list(cases) == [
        f"fogpay/1/fog-1/intent/{HEX}",
        f"fogpay/1/fog-1/receipt/{HEX}",
        "fogpay/1/trust/owner/acme",
        "fogpay/1/trust/fog/fog-1",
        f"fogpay/1/trust/bind/{HEX}",
        f"fogpay/1/trust/revoke/{HEX}",
        f"fogpay/1/fog-1/lease/{LEASE.hex()}",
        "fogpay/1/up/fog-1/batch",
        "fogpay/1/up/fog-1/ack",
        "fogpay/1/up/fog-1/lreq",
        "fogpay/1/up/fog-1/lrep",
    ]
    for topic, want in cases.items():
        assert topics.parse(topic) == want
    federation = {
        topics.relay_topic("fog-1"): Topic(Kind.RELAY, fog_id="fog-1"),
        topics.held_topic(DEVICE): Topic(Kind.HELD_RECORDS, key=DEVICE),
        topics.held_ack_topic(DEVICE): Topic(Kind.HELD_ACK, key=DEVICE),
        transfer.transfer_up_topic("fog-1"): Topic(Kind.TRANSFER, fog_id="fog-1"),
        **{
            topics.gossip_topic("fog-1", level): Topic(Kind("gossip_" + level), fog_id="fog-1")
            for level in topics.GOSSIP_LEVELS
        },
    }
    for topic, want in federation.items():
        assert topics.parse(topic) == want
    assert {t.kind for t in (cases | federation).values()} == set(Kind)


def matches(filt: str, topic: str) -> bool:
    """MQTT topic filter matching (+ one level, # the rest), written from the MQTT spec."""
    f, t = filt.split("/"), topic.split("/")
    for i, level in enumerate(f):
        if level == "#":
            return True
        if i >= len(t) or (level != "+" and level != t[i]):
            return False
    return len(f) == len(t)


def test_filters_match_their_topics_only() -> None:
    intent, receipt = topics.intent_topic("f", DEVICE), topics.receipt_topic("f", DEVICE)
    assert matches(topics.intent_filter("f"), intent)
    assert not matches(topics.intent_filter("f"), receipt)
    assert not matches(topics.intent_filter("g"), intent)
    assert matches(topics.receipt_filter("f"), receipt)
    assert matches(topics.lease_filter("f"), topics.lease_topic("f", LEASE))
    assert matches(topics.TRUST_FILTER, topics.bind_topic(DEVICE))
    assert matches(topics.TRUST_FILTER, topics.owner_topic("o"))
    assert not matches(topics.TRUST_FILTER, intent)
    assert matches(topics.BATCH_FILTER, topics.batch_topic("f"))
    assert not matches(topics.BATCH_FILTER, topics.ack_topic("f"))
    assert matches(topics.LEASE_REQUEST_FILTER, leasing.lease_request_topic("f"))
    assert matches(topics.LEASE_REPORT_FILTER, leasing.lease_report_topic("f"))
    assert not matches(topics.LEASE_REQUEST_FILTER, leasing.lease_report_topic("f"))
    assert not matches(topics.LEASE_REPORT_FILTER, topics.batch_topic("f"))


def test_lease_levels_agree_with_protocol_leasing() -> None:
    assert Kind.LEASE_REQUEST.value == leasing.LEASE_REQUEST_TOPIC_LEVEL
    assert Kind.LEASE_REPORT.value == leasing.LEASE_REPORT_TOPIC_LEVEL


@PROPERTY
@given(fog=sts.fog_ids, owner=sts.ids, key=sts.keys, lease=sts.lease_ids)
def test_build_parse_round_trip(fog: str, owner: str, key: bytes, lease: bytes) -> None:
    assert topics.parse(topics.intent_topic(fog, key)) == Topic(Kind.INTENT, fog_id=fog, key=key)
    assert topics.parse(topics.receipt_topic(fog, key)).key == key
    assert topics.parse(topics.owner_topic(owner)).owner_id == owner
    assert topics.parse(topics.fog_topic(fog)).fog_id == fog
    assert topics.parse(topics.bind_topic(key)).key == key
    assert topics.parse(topics.revoke_topic(key)).key == key
    assert topics.parse(topics.lease_topic(fog, lease)).lease_id == lease
    assert topics.parse(topics.batch_topic(fog)).kind is Kind.BATCH
    assert topics.parse(topics.ack_topic(fog)).kind is Kind.ACK
    assert topics.parse(leasing.lease_request_topic(fog)) == Topic(Kind.LEASE_REQUEST, fog_id=fog)
    assert topics.parse(leasing.lease_report_topic(fog)) == Topic(Kind.LEASE_REPORT, fog_id=fog)


@pytest.mark.parametrize(
    "topic",
    [
        "",
        "fogpay/1",
        "fogpay/2/fog-1/intent/" + HEX,
        "fogpay/1/fog-1/intent/" + HEX.upper(),  # hex must be lowercase
        "fogpay/1/fog-1/intent/" + HEX[:-1],  # 63 characters
        "fogpay/1/fog-1/intent/" + HEX + "0",
        "fogpay/1/fog-1/intent/" + HEX + "/x",
        "fogpay/1/fog-1/intent/" + "g" * 64,
        "fogpay/1/fog-1/intent/+",
        "fogpay/1/fog-1/intent/#",
        "fogpay/1/Fog-1/intent/" + HEX,
        "fogpay/1//intent/" + HEX,
        "fogpay/1/gossip/intent/" + HEX,
        "fogpay/1/fog-1/pay/" + HEX,
        "fogpay/1/trust/owner/Acme",
        "fogpay/1/trust/owner/",
        "fogpay/1/trust/fog/up",
        "fogpay/1/trust/bind/xyz",
        "fogpay/1/trust/revoke/" + HEX[:32],
        "fogpay/1/trust/other/" + HEX,
        "fogpay/1/fog-1/lease/" + HEX,  # 64, a lease id is 32
        "fogpay/1/fog-1/lease/" + LEASE.hex().upper(),
        "fogpay/1/up/fog-1/other",
        "fogpay/1/up/trust/batch",
        "fogpay/1/up/fog-1/batch/x",
        "fogpay/1/up/fog-1/lreq/x",
        "fogpay/1/up/fog-1/LREQ",
        "fogpay/1/up/gossip/lrep",
        "fogpay/1/up//lrep",
        "fogpay/1/fog-1/lreq/" + HEX,
        "/fogpay/1/up/fog-1/batch",
        "fogpay/1/gossip/fog-1/other",
        "fogpay/1/gossip/held/batch",
        "fogpay/1/gossip/fog-1/batch/x",
        "fogpay/1/gossip/fog-1/+",
        "fogpay/1/held/" + HEX + "/other",
        "fogpay/1/held/" + HEX.upper() + "/records",
        "fogpay/1/held/fog-1/records",
        "fogpay/1/up/fog-1/RELAY",
        "fogpay/1/held/intent/" + HEX,
    ],
)
def test_malformed_topics_are_refused(topic: str) -> None:
    with pytest.raises(TopicError):
        topics.parse(topic)


def test_federation_topics_round_trip() -> None:
    for level in topics.GOSSIP_LEVELS:
        parsed = topics.parse(topics.gossip_topic("fog-2", level))
        assert parsed.fog_id == "fog-2" and parsed.kind.value == "gossip_" + level
    assert topics.parse(topics.relay_topic("fog-1")) == topics.Topic(Kind.RELAY, fog_id="fog-1")
    held = topics.parse(topics.held_topic(DEVICE))
    assert held == topics.Topic(Kind.HELD_RECORDS, key=DEVICE)
    assert topics.parse(topics.held_ack_topic(DEVICE)).kind is Kind.HELD_ACK
    with pytest.raises(TopicError):
        topics.gossip_topic("fog-2", "intent")


@pytest.mark.parametrize(
    "fog", ["", "trust", "up", "gossip", "held", "Fog", "a/b", "+", "#", "a" * 64]
)
def test_builders_refuse_invalid_fog_ids(fog: str) -> None:
    for build in (topics.fog_topic, topics.batch_topic, topics.ack_topic, topics.intent_filter):
        with pytest.raises(TopicError):
            build(fog)
    with pytest.raises(TopicError):
        topics.intent_topic(fog, DEVICE)


def test_owner_topic_refuses_invalid_ids_and_topic_error_is_fogpay_error() -> None:
    with pytest.raises(FogpayError):
        topics.owner_topic("a/b")


@PROPERTY
@given(topic=st.text(max_size=200))
def test_random_topics_raise_only_topic_error(topic: str) -> None:
    try:
        parsed = topics.parse(topic)
    except TopicError:
        return
    assert topic.startswith("fogpay/1/") and parsed.kind in set(Kind)
