"""protocol/transfer.py (docs/protocol.md 18.2): the ``xreq`` and ``xfer`` messages decode
strictly, the transfer id is the request's, and the topics parse to their kinds."""

import hashlib

import pytest

from protocol import topics, transfer
from protocol.codec import pack
from protocol.errors import Declined, TopicError
from protocol.reasons import Reason
from protocol.signing import open_envelope, public_key, seal
from protocol.topics import Kind, Topic
from protocol.transfer import Transfer, TransferRequest
from protocol.vectors import key

LEASE = bytes(range(16))


def request(**kw: object) -> TransferRequest:
    fields: dict[str, object] = {
        "fog_id": "fog-b",
        "giver_id": "fog-a",
        "owner_id": "acme",
        "currency": "EUR",
        "amount_micros": 5_000_000,
        "time_ms": 1_790_000_000_000,
    }
    return TransferRequest(**(fields | kw))  # type: ignore[arg-type]


def test_a_request_and_its_transfer_round_trip_and_the_id_is_the_requests() -> None:
    receiver, giver = key("fog"), key("issuer")  # two fixed keys
    wire = seal(request(), receiver)
    signed = open_envelope(wire, TransferRequest, signer=public_key(receiver))
    assert signed.msg == request()
    xid = transfer.transfer_id(signed.id)
    assert xid == hashlib.sha256(b"fogpay/1/xid\x00" + signed.id).digest()[:16]
    assert transfer.transfer_id(signed.id) == xid  # the same request: the same transfer
    assert (
        transfer.transfer_id(open_envelope(seal(request(time_ms=2), receiver), TransferRequest).id)
        != xid
    )
    x = Transfer(
        transfer_id=xid,
        lease_id=LEASE,
        fog_id="fog-a",
        receiver_id="fog-b",
        owner_id="acme",
        currency="EUR",
        amount_micros=2_500_000,
        not_after_ms=1_790_003_600_000,
        time_ms=1_790_000_000_500,
    )
    got = open_envelope(seal(x, giver), Transfer, signer=public_key(giver))
    assert got.msg == x and got.msg.transfer_id == xid


@pytest.mark.parametrize(
    ("name", "body"),
    [
        ("ask_itself", {"f": "fog-a", "g": "fog-a", "o": "acme", "c": "EUR", "a": 1, "t": 1}),
        ("amount_zero", {"f": "fog-b", "g": "fog-a", "o": "acme", "c": "EUR", "a": 0, "t": 1}),
        ("time_zero", {"f": "fog-b", "g": "fog-a", "o": "acme", "c": "EUR", "a": 1, "t": 0}),
        ("giver_reserved", {"f": "fog-b", "g": "gossip", "o": "acme", "c": "EUR", "a": 1, "t": 1}),
        (
            "unknown_key",
            {"f": "fog-b", "g": "fog-a", "o": "acme", "c": "EUR", "a": 1, "t": 1, "x": 1},
        ),
    ],
)
def test_bad_requests_are_malformed(name: str, body: dict[str, object]) -> None:
    from protocol.vectors import signed_envelope

    with pytest.raises(Declined) as info:
        open_envelope(signed_envelope("xreq", pack(body), "fog"), TransferRequest)
    assert info.value.reason is Reason.MALFORMED, name


def test_the_topics_parse_to_their_kinds() -> None:
    assert transfer.request_topic("fog-a") == "fogpay/1/gossip/fog-a/xreq"
    assert transfer.transfer_topic("fog-b") == "fogpay/1/gossip/fog-b/xfer"
    assert transfer.transfer_up_topic("fog-b") == "fogpay/1/up/fog-b/xfer"
    assert transfer.sub_lease_topic("fog-b", LEASE) == f"fogpay/1/fog-b/lease/{LEASE.hex()}"
    assert topics.parse(transfer.request_topic("fog-a")) == Topic(Kind.GOSSIP_XREQ, fog_id="fog-a")
    assert topics.parse(transfer.transfer_topic("fog-b")) == Topic(Kind.GOSSIP_XFER, fog_id="fog-b")
    assert topics.parse(transfer.transfer_up_topic("fog-b")) == Topic(Kind.TRANSFER, fog_id="fog-b")
    assert topics.parse(transfer.sub_lease_topic("fog-b", LEASE)).lease_id == LEASE
    assert transfer.TRANSFER_REQUEST_TOPIC_LEVEL in topics.GOSSIP_LEVELS
    assert transfer.TRANSFER_TOPIC_LEVEL in topics.GOSSIP_LEVELS
    with pytest.raises(TopicError):
        topics.parse("fogpay/1/gossip/fog-a/xfers")
    with pytest.raises(ValueError):
        transfer.transfer_up_topic("gossip")
