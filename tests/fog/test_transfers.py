"""Peer transfers between two real FogCores on SQLite files (docs/protocol.md 18.2): a fog
whose cloud does not answer asks its peer; the peer debits its lease durably before the
``xfer`` leaves; the receiver draws on the sub-lease; a duplicated transfer credits once; the
giver's report counts what it gave and every ``xfer`` goes up before that report."""

import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import nacl.signing
import pytest

from fog.authorize import Policy
from fog.config import BatchConfig, FederationConfig, LeaseConfig, UplinkConfig
from fog.core import (
    Connected,
    CoreConfig,
    FogCore,
    FogOutput,
    Intents,
    LeaseReport,
    LeaseRequest,
    Publish,
    Receipt,
    Tick,
    TrustLoaded,
    TrustMessage,
)
from fog.store import Arrival
from protocol import topics
from protocol.leasing import LeaseReport as LeaseReportMsg
from protocol.messages import Binding, FogCredential, Intent, Lease, OwnerCredential
from protocol.messages import Receipt as ReceiptMsg
from protocol.reasons import Reason
from protocol.signing import open_envelope, public_key, seal
from protocol.transfer import Transfer, TransferRequest, transfer_id
from tests.fog.world import DAY_MS, NOW, key

T = TypeVar("T")
LEASE_ID = bytes(range(16))
REQUEST_TIMEOUT_MS = 1_000


def of(outputs: list[FogOutput], kind: type[T]) -> list[T]:
    return [o for o in outputs if isinstance(o, kind)]


def published(outputs: list[FogOutput], level: str) -> list[Publish]:
    return [p for p in of(outputs, Publish) if p.topic.endswith("/" + level)]


@dataclass
class Pair:
    """Fog ``a`` holds acme's lease; fog ``b`` holds none and its cloud does not answer."""

    tmp: Path
    transfers: bool = True
    issuer: nacl.signing.SigningKey = field(default_factory=key)
    owner: nacl.signing.SigningKey = field(default_factory=key)
    device: nacl.signing.SigningKey = field(default_factory=key)
    keys: dict[str, nacl.signing.SigningKey] = field(default_factory=dict)
    cores: dict[str, FogCore] = field(default_factory=dict)
    seq: int = 0

    def __post_init__(self) -> None:
        trust = [
            (
                topics.owner_topic("acme"),
                seal(
                    OwnerCredential(
                        owner_id="acme",
                        key=public_key(self.owner),
                        not_before_ms=NOW - DAY_MS,
                        not_after_ms=NOW + 365 * DAY_MS,
                    ),
                    self.issuer,
                ),
            ),
            (
                topics.bind_topic(public_key(self.device)),
                seal(
                    Binding(
                        device=public_key(self.device),
                        owner_id="acme",
                        not_before_ms=NOW - DAY_MS,
                        not_after_ms=NOW + 365 * DAY_MS,
                        currency="EUR",
                        tx_max_micros=5_000_000,
                        day_max_micros=50_000_000,
                    ),
                    self.owner,
                ),
            ),
        ]
        for fog_id in ("fog-a", "fog-b"):
            self.keys[fog_id] = key()
            cred = FogCredential(
                fog_id=fog_id,
                key=public_key(self.keys[fog_id]),
                not_before_ms=NOW - DAY_MS,
                not_after_ms=NOW + 365 * DAY_MS,
            )
            trust.append((topics.fog_topic(fog_id), seal(cred, self.issuer)))
        for fog_id, peer in (("fog-a", "fog-b"), ("fog-b", "fog-a")):
            config = CoreConfig(
                fog_id=fog_id,
                issuer_key=public_key(self.issuer),
                policy=Policy(rate_burst=10_000, rate_per_s=10_000.0),
                batch=BatchConfig(records_max=256, age_ms=1_000, keep_acked_ms=0),
                uplink=UplinkConfig(window=4, ack_timeout_ms=10_000),
                lease=LeaseConfig(
                    request_timeout_ms=REQUEST_TIMEOUT_MS,
                    check_interval_ms=100,
                    renew_before_ms=0,
                    peer_transfers=self.transfers,
                ),
                federation=FederationConfig(peers=(peer,)),
            )
            core = FogCore.open(
                self.tmp / f"{fog_id}.sqlite", config=config, fog_key=self.keys[fog_id]
            )
            self.cores[fog_id] = core
            for topic, payload in trust:
                core.handle(TrustMessage(topic=topic, payload=payload, now_ms=NOW))
            core.handle(Connected(now_ms=NOW))
        lease = Lease(
            lease_id=LEASE_ID,
            owner_id="acme",
            fog_id="fog-a",
            amount_micros=10_000_000,
            currency="EUR",
            not_after_ms=NOW + 60_000,
        )
        self.cores["fog-a"].handle(
            TrustMessage(
                topic=topics.lease_topic("fog-a", LEASE_ID),
                payload=seal(lease, self.issuer),
                now_ms=NOW,
            )
        )

    def intent(self, amount: int, fog_id: str = "fog-b") -> bytes:
        self.seq += 1
        i = Intent(
            device=public_key(self.device),
            fog_id=fog_id,
            seq=self.seq,
            payee_id="shop",
            amount_micros=amount,
            currency="EUR",
            time_ms=NOW,
        )
        return seal(i, self.device)

    def pay(self, fog_id: str, payload: bytes, now: int) -> Receipt:
        arrival = Arrival(public_key(self.device), payload)
        [r] = of(self.cores[fog_id].handle(Intents(arrivals=(arrival,), now_ms=now)), Receipt)
        return r

    def deliver(self, to: str, p: Publish, now: int) -> list[FogOutput]:
        return self.cores[to].handle(TrustMessage(topic=p.topic, payload=p.payload, now_ms=now))

    def drawn(self, fog_id: str) -> dict[bytes, tuple[int, int]]:
        conn = sqlite3.connect(self.tmp / f"{fog_id}.sqlite")
        try:
            rows = conn.execute("SELECT lease_id, amount_micros, drawn_micros FROM leases")
            return {bytes(r[0]): (r[1], r[2]) for r in rows}
        finally:
            conn.close()

    def ask(self) -> tuple[bytes, Publish]:
        """b declines, asks the cloud (silence), declines again after the request timed out:
        asks its peer. Returns the declined intent and the xreq."""
        b = self.cores["fog-b"]
        payload = self.intent(2_000)
        assert self.pay("fog-b", payload, NOW).outcome.reason is Reason.INSUFFICIENT_BUDGET
        assert of(b.handle(Tick(now_ms=NOW)), LeaseRequest)  # to the cloud, which is silent
        assert published(b.handle(Tick(now_ms=NOW + 10)), "xreq") == []  # not yet stalled
        b.handle(Tick(now_ms=NOW + REQUEST_TIMEOUT_MS + 1))  # the request is resent: stalled
        assert self.pay("fog-b", payload, NOW + REQUEST_TIMEOUT_MS + 2).outcome.reason is (
            Reason.INSUFFICIENT_BUDGET
        )
        [xreq] = published(b.handle(Tick(now_ms=NOW + REQUEST_TIMEOUT_MS + 3)), "xreq")
        assert xreq.topic == topics.gossip_topic("fog-a", "xreq")
        return payload, xreq


@pytest.fixture
def pair(tmp_path: Path) -> Pair:
    return Pair(tmp_path)


def test_a_fog_cut_off_borrows_from_its_peer_and_pays_on_the_sub_lease(pair: Pair) -> None:
    payload, xreq = pair.ask()
    request = open_envelope(xreq.payload, TransferRequest, signer=public_key(pair.keys["fog-b"]))
    assert (request.msg.owner_id, request.msg.amount_micros) == ("acme", 10_000_000)
    now = NOW + 2_000
    out = pair.deliver("fog-a", xreq, now)
    assert [t.status for t in of(out, TrustLoaded)] == ["accepted"]
    [to_b] = [p for p in published(out, "xfer") if "/gossip/" in p.topic]
    [up] = [p for p in published(out, "xfer") if "/up/" in p.topic]
    assert to_b.payload == up.payload and up.topic == "fogpay/1/up/fog-a/xfer"
    xfer = open_envelope(to_b.payload, Transfer, signer=public_key(pair.keys["fog-a"])).msg
    assert xfer.transfer_id == transfer_id(request.id)
    assert (xfer.lease_id, xfer.amount_micros, xfer.not_after_ms) == (
        LEASE_ID,
        5_000_000,  # half the giver's room: 10,000,000 / 2
        NOW + 60_000,
    )
    # debited durably before it left: the giver's lease has only the rest
    assert pair.drawn("fog-a")[LEASE_ID] == (10_000_000, 5_000_000)
    out = pair.deliver("fog-b", to_b, now)
    assert [t.status for t in of(out, TrustLoaded)] == ["accepted"]
    assert [p.topic for p in published(out, "xfer")] == ["fogpay/1/up/fog-b/xfer"]
    ok = pair.pay("fog-b", payload, now + 1)  # the device retransmits: paid on the sub-lease
    assert ok.outcome.status == "ok"
    receipt = open_envelope(ok.outcome.receipt, ReceiptMsg).msg
    assert receipt.lease_id == xfer.transfer_id
    # duplicated (and again from the cloud's retained copy): credited once
    assert [t.status for t in of(pair.deliver("fog-b", to_b, now + 2), TrustLoaded)] == [
        "duplicate"
    ]
    retained = Publish(topic=topics.lease_topic("fog-b", xfer.transfer_id), payload=to_b.payload)
    assert [t.status for t in of(pair.deliver("fog-b", retained, now + 3), TrustLoaded)] == [
        "duplicate"
    ]
    assert pair.drawn("fog-b") == {xfer.transfer_id: (5_000_000, 2_000)}
    # the same request again: the same transfer, no second debit
    again = pair.deliver("fog-a", xreq, now + 4)
    assert [t.status for t in of(again, TrustLoaded)] == ["duplicate"]
    assert {p.payload for p in published(again, "xfer")} == {to_b.payload}
    assert pair.drawn("fog-a")[LEASE_ID] == (10_000_000, 5_000_000)
    # the receiver cannot overspend the sub-lease: 5,000,000 at most
    for amount in (5_000_000, 2_998_000):
        r = pair.pay("fog-b", pair.intent(amount), now + 5)
        assert r.outcome.reason is (None if amount < 5_000_000 else Reason.INSUFFICIENT_BUDGET)
    assert pair.drawn("fog-b")[xfer.transfer_id] == (5_000_000, 3_000_000)


def test_both_reports_reconcile_and_the_xfer_goes_up_before_the_giver_s_report(
    pair: Pair,
) -> None:
    payload, xreq = pair.ask()
    now = NOW + 2_000
    [to_b] = [p for p in published(pair.deliver("fog-a", xreq, now), "xfer") if "gossip" in p.topic]
    pair.deliver("fog-b", to_b, now)
    assert pair.pay("fog-b", payload, now).outcome.status == "ok"
    assert pair.pay("fog-a", pair.intent(1_000, "fog-a"), now).outcome.status == "ok"
    late = NOW + 61_000  # both leases expired
    out = pair.cores["fog-a"].handle(Tick(now_ms=late))
    kinds = [o.topic.rsplit("/", 1)[-1] for o in out if isinstance(o, Publish | LeaseReport)]
    assert kinds.index("xfer") < kinds.index("lrep")
    [report] = of(out, LeaseReport)
    msg = open_envelope(report.payload, LeaseReportMsg).msg
    assert (msg.lease_id, msg.drawn_micros) == (LEASE_ID, 5_000_000 + 1_000)  # given + drawn
    [sub] = of(pair.cores["fog-b"].handle(Tick(now_ms=late)), LeaseReport)
    xfer = open_envelope(to_b.payload, Transfer).msg
    msg = open_envelope(sub.payload, LeaseReportMsg).msg
    assert (msg.lease_id, msg.drawn_micros, msg.fog_id) == (xfer.transfer_id, 2_000, "fog-b")
    # the giver's report resends carry its transfers again
    resent = pair.cores["fog-a"].handle(Tick(now_ms=late + 5_001))
    assert published(resent, "xfer") and of(resent, LeaseReport)


def test_refused_transfers_change_nothing(pair: Pair, tmp_path: Path) -> None:
    _, xreq = pair.ask()
    stranger = key()
    forged = seal(open_envelope(xreq.payload, TransferRequest).msg, stranger)
    out = pair.deliver("fog-a", Publish(topic=xreq.topic, payload=forged), NOW + 2_000)
    assert [t.status for t in of(out, TrustLoaded)] == ["refused"] and not published(out, "xfer")
    assert pair.drawn("fog-a")[LEASE_ID] == (10_000_000, 0)
    # an xfer for another fog, or not signed by the giver's credential, is refused
    [to_b] = [
        p
        for p in published(pair.deliver("fog-a", xreq, NOW + 2_000), "xfer")
        if "gossip" in p.topic
    ]
    forged_x = seal(open_envelope(to_b.payload, Transfer).msg, stranger)
    out = pair.deliver("fog-b", Publish(topic=to_b.topic, payload=forged_x), NOW + 2_001)
    assert [t.status for t in of(out, TrustLoaded)] == ["refused"]
    assert pair.drawn("fog-b") == {}
    # a fog that does not take part ignores both
    (tmp_path / "off").mkdir()
    off = Pair(tmp_path / "off", transfers=False)
    assert off.deliver("fog-a", xreq, NOW) == []
    assert off.deliver("fog-b", to_b, NOW) == []


def test_a_transfer_that_arrives_expired_is_reported_unused(pair: Pair) -> None:
    _, xreq = pair.ask()
    [to_b] = [
        p
        for p in published(pair.deliver("fog-a", xreq, NOW + 2_000), "xfer")
        if "gossip" in p.topic
    ]
    out = pair.deliver("fog-b", to_b, NOW + 61_000)  # past the parent's na
    assert [(t.status, t.reason) for t in of(out, TrustLoaded)] == [("refused", Reason.EXPIRED)]
    [report] = of(out, LeaseReport)
    msg = open_envelope(report.payload, LeaseReportMsg).msg
    assert (msg.lease_id, msg.drawn_micros, msg.last_batch) == (
        open_envelope(to_b.payload, Transfer).msg.transfer_id,
        0,
        0,
    )
    kinds = [o.topic.rsplit("/", 1)[-1] for o in out if isinstance(o, Publish | LeaseReport)]
    assert kinds == ["xfer", "lrep"]  # the cloud learns the transfer before its report


def test_the_clouds_copy_of_a_transfer_from_an_unknown_giver_is_reported_unused(
    tmp_path: Path,
) -> None:
    """The receiver does not hold the giver's fog credential (yet) when both copies of an
    ``xfer`` arrive: it refuses both, and reports the cloud's retained copy unused, or the
    cloud would keep the sub-lease's budget in escrow for good (found by tests/sim)."""
    pair = Pair(tmp_path)
    _, xreq = pair.ask()
    [to_b] = [
        p
        for p in published(pair.deliver("fog-a", xreq, NOW + 2_000), "xfer")
        if "gossip" in p.topic
    ]
    xfer = open_envelope(to_b.payload, Transfer).msg
    (tmp_path / "late").mkdir()
    late = Pair(tmp_path / "late")  # its fog-b knows another fog-a key: fog-a's is unknown
    b = late.cores["fog-b"]
    # the gossip copy: refused, nothing stored, nothing reported (the cloud may not hold it)
    out = b.handle(TrustMessage(topic=to_b.topic, payload=to_b.payload, now_ms=NOW + 2_001))
    assert [(t.status, t.reason) for t in of(out, TrustLoaded)] == [
        ("refused", Reason.BAD_SIGNATURE)
    ]
    assert of(out, LeaseReport) == [] and published(out, "xfer") == []
    # the cloud's retained copy on fog-b's lease topic: refused, and reported unused at once
    retained = topics.lease_topic("fog-b", xfer.transfer_id)
    out = b.handle(TrustMessage(topic=retained, payload=to_b.payload, now_ms=NOW + 2_002))
    assert [(t.status, t.reason) for t in of(out, TrustLoaded)] == [
        ("refused", Reason.BAD_SIGNATURE)
    ]
    [report] = of(out, LeaseReport)
    msg = open_envelope(report.payload, LeaseReportMsg, signer=public_key(late.keys["fog-b"])).msg
    assert (msg.lease_id, msg.drawn_micros, msg.last_batch, msg.fog_id) == (
        xfer.transfer_id,
        0,
        0,
        "fog-b",
    )
    # once reported, never drawn: a later copy is refused, and not reported twice
    out = b.handle(TrustMessage(topic=retained, payload=to_b.payload, now_ms=NOW + 2_003))
    assert [t.status for t in of(out, TrustLoaded)] == ["refused"] and not of(out, LeaseReport)
    assert xfer.transfer_id not in late.drawn("fog-b")
