"""Federation gossip between real FogCores (docs/protocol.md 17.4-17.6): two or three cores,
each on its own SQLite file, one issuer; what one core publishes to a peer's gossip topic is
handed to that peer as its input, as a broker would. No broker, no loop, no mocks."""

import itertools
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, TypeVar

import nacl.signing
import pytest

from fog.authorize import Policy
from fog.config import BatchConfig, FederationConfig, LeaseConfig, UplinkConfig
from fog.core import (
    Alarm,
    Connected,
    CoreConfig,
    Disconnected,
    FogCore,
    FogOutput,
    Intents,
    LeaseRequest,
    Publish,
    Receipt,
    Tick,
    TrustLoaded,
    TrustMessage,
)
from fog.peers import SEEN_ROUND_ENTRIES_MAX
from fog.store import Arrival
from protocol import topics
from protocol.gossip import Seen, SeenEntry
from protocol.leasing import LeaseRequest as LeaseRequestMsg
from protocol.messages import (
    Binding,
    FogCredential,
    Intent,
    Lease,
    OwnerCredential,
    Revocation,
)
from protocol.reasons import Reason
from protocol.signing import open_envelope, public_key, seal
from tests.fog.world import DAY_MS, NOW

T = TypeVar("T")
SEEN_EVERY_MS: Final = 500
HOUR_MS: Final = 3_600_000


def key() -> nacl.signing.SigningKey:
    return nacl.signing.SigningKey.generate()


def of(outputs: Iterable[FogOutput], kind: type[T]) -> list[T]:
    return [o for o in outputs if isinstance(o, kind)]


def alarms(outputs: Iterable[FogOutput], event: str) -> list[Alarm]:
    return [a for a in of(outputs, Alarm) if a.event == event]


@dataclass
class Federation:
    """Fogs of one issuer, each a FogCore on its own file; ``peers``: who gossips to whom."""

    tmp: Path
    peers: dict[str, tuple[str, ...]]
    issuer: nacl.signing.SigningKey = field(default_factory=key)
    owner_key: nacl.signing.SigningKey = field(default_factory=key)
    now: int = NOW
    mono: int = 1_000_000
    uplink: UplinkConfig = field(default_factory=UplinkConfig)
    lease: LeaseConfig = field(default_factory=lambda: LeaseConfig(renew_before_ms=0))
    lease_life_ms: int = DAY_MS  # of the lease each fog is given at the start
    keys: dict[str, nacl.signing.SigningKey] = field(default_factory=dict)
    cores: dict[str, FogCore] = field(default_factory=dict)
    trust: list[tuple[str, bytes]] = field(default_factory=list)
    _lease_ids: "itertools.count[int]" = field(default_factory=lambda: itertools.count(1))

    def __post_init__(self) -> None:
        owner = OwnerCredential(
            owner_id="acme",
            key=public_key(self.owner_key),
            not_before_ms=NOW - DAY_MS,
            not_after_ms=NOW + 365 * DAY_MS,
        )
        self.trust.append((topics.owner_topic("acme"), seal(owner, self.issuer)))
        for fog_id in self.peers:
            self.keys[fog_id] = key()
            cred = FogCredential(
                fog_id=fog_id,
                key=public_key(self.keys[fog_id]),
                not_before_ms=NOW - DAY_MS,
                not_after_ms=NOW + 365 * DAY_MS,
            )
            self.trust.append((topics.fog_topic(fog_id), seal(cred, self.issuer)))
        for fog_id in self.peers:
            self.open(fog_id)
            self.give(fog_id, self.lease_for(fog_id, na=NOW + self.lease_life_ms))

    def config(self, fog_id: str) -> CoreConfig:
        return CoreConfig(
            fog_id=fog_id,
            issuer_key=public_key(self.issuer),
            policy=Policy(rate_burst=10_000, rate_per_s=10_000.0),
            batch=BatchConfig(records_max=256, age_ms=1_000, keep_acked_ms=0),
            uplink=self.uplink,
            lease=self.lease,
            federation=FederationConfig(peers=self.peers[fog_id], seen_every_ms=SEEN_EVERY_MS),
        )

    def open(self, fog_id: str) -> FogCore:
        core = FogCore.open(
            self.tmp / f"{fog_id}.sqlite", config=self.config(fog_id), fog_key=self.keys[fog_id]
        )
        self.cores[fog_id] = core
        for topic, payload in self.trust:
            self.input(fog_id, TrustMessage(topic=topic, payload=payload, now_ms=self.now))
        self.input(fog_id, Connected(now_ms=self.now, mono_ms=self.mono))
        return core

    def restart(self, fog_id: str) -> FogCore:
        """A crash: the core's store is closed with no further input (nothing flushed)."""
        self.cores[fog_id].store.close()
        return self.open(fog_id)

    def input(self, fog_id: str, event: object) -> list[FogOutput]:
        return self.cores[fog_id].handle(event)  # type: ignore[arg-type]

    def give(self, fog_id: str, item: tuple[str, bytes]) -> list[FogOutput]:
        return self.input(fog_id, TrustMessage(topic=item[0], payload=item[1], now_ms=self.now))

    def lease_for(
        self, fog_id: str, amount: int = 500_000_000, na: int | None = None
    ) -> tuple[str, bytes]:
        lease_id = next(self._lease_ids).to_bytes(16, "big")
        lease = Lease(
            lease_id=lease_id,
            owner_id="acme",
            fog_id=fog_id,
            amount_micros=amount,
            currency="EUR",
            not_after_ms=NOW + DAY_MS if na is None else na,
        )
        return topics.lease_topic(fog_id, lease_id), seal(lease, self.issuer)

    def device(self) -> nacl.signing.SigningKey:
        dev = key()
        b = Binding(
            device=public_key(dev),
            owner_id="acme",
            not_before_ms=NOW - DAY_MS,
            not_after_ms=NOW + 365 * DAY_MS,
            currency="EUR",
            tx_max_micros=5_000_000,
            day_max_micros=500_000_000,
        )
        item = (topics.bind_topic(public_key(dev)), seal(b, self.owner_key))
        self.trust.append(item)
        for fog_id in self.cores:
            self.give(fog_id, item)
        return dev

    def revocation(self, k: bytes) -> tuple[str, bytes]:
        r = Revocation(key=k, time_ms=self.now, reason="cloned")
        return topics.revoke_topic(k), seal(r, self.issuer)

    def pay(
        self, fog_id: str, dev: nacl.signing.SigningKey, seq: int, amount: int = 1_000_000
    ) -> Receipt:
        intent = Intent(
            device=public_key(dev),
            fog_id=fog_id,
            seq=seq,
            payee_id="shop",
            amount_micros=amount,
            currency="EUR",
            time_ms=self.now,
        )
        arrival = Arrival(public_key(dev), seal(intent, dev))
        out = self.input(fog_id, Intents(arrivals=(arrival,), now_ms=self.now, mono_ms=self.mono))
        (receipt,) = of(out, Receipt)
        return receipt

    def tick(self, fog_id: str, ms: int = SEEN_EVERY_MS) -> list[FogOutput]:
        self.now += ms
        self.mono += ms
        return self.input(fog_id, Tick(now_ms=self.now, mono_ms=self.mono))

    def deliver(self, outputs: Iterable[FogOutput], *, drop: Iterable[str] = ()) -> list[FogOutput]:
        """Hand every gossip Publish to the fog it names (not those in ``drop``), and what
        they publish in turn, until nothing is left (bounded); all outputs, in order."""
        pending = [o for o in outputs if isinstance(o, Publish)]
        seen: list[FogOutput] = []
        for _ in range(1_000):
            if not pending:
                return seen
            p = pending.pop(0)
            parsed = topics.parse(p.topic)
            assert parsed.fog_id is not None
            if parsed.fog_id in drop or parsed.fog_id not in self.cores:
                continue
            out = self.give(parsed.fog_id, (p.topic, p.payload))
            seen.extend(out)
            pending.extend(of(out, Publish))
        raise AssertionError("gossip did not settle")

    def gossip(self, *fog_ids: str) -> list[FogOutput]:
        """One seen round at each of ``fog_ids``, delivered."""
        out: list[FogOutput] = []
        for fog_id in fog_ids:
            out.extend(self.deliver(self.tick(fog_id)))
        return out

    def close(self) -> None:
        for core in self.cores.values():
            core.store.close()


@pytest.fixture
def two(tmp_path: Path) -> Iterable[Federation]:
    f = Federation(tmp_path, {"fog-a": ("fog-b",), "fog-b": ("fog-a",)})
    yield f
    f.close()


@pytest.fixture
def three(tmp_path: Path) -> Iterable[Federation]:
    """A line: fog-a - fog-b - fog-c (fog-a and fog-c do not talk to each other)."""
    f = Federation(
        tmp_path, {"fog-a": ("fog-b",), "fog-b": ("fog-a", "fog-c"), "fog-c": ("fog-b",)}
    )
    yield f
    f.close()


def seen_of(outputs: Iterable[FogOutput], to: str) -> list[Seen]:
    return [
        open_envelope(p.payload, Seen).msg
        for p in of(outputs, Publish)
        if p.topic == topics.gossip_topic(to, "seen")
    ]


# ---- sequence gossip ---------------------------------------------------------------------------


def test_a_seen_names_what_was_authorized_to_every_peer_once(three: Federation) -> None:
    dev = three.device()
    intents = [three.pay("fog-b", dev, q).outcome.intent_id for q in (1, 2, 3)]
    out = three.tick("fog-b")
    to_a, to_c = seen_of(out, "fog-a"), seen_of(out, "fog-c")
    assert to_a == to_c and len(to_a) == 1
    assert to_a[0].fog_id == "fog-b"
    assert list(to_a[0].entries) == [
        SeenEntry(public_key(dev), q, i) for q, i in zip((1, 2, 3), intents, strict=True)
    ]
    three.deliver(out)
    assert seen_of(three.tick("fog-b"), "fog-a") == []  # nothing new: nothing sent
    three.pay("fog-b", dev, 4)
    (again,) = seen_of(three.tick("fog-b"), "fog-a")
    assert [e.seq for e in again.entries] == [4]


def test_a_clone_paying_at_two_fogs_at_one_q_is_found_and_suspended_at_both(
    two: Federation,
) -> None:
    dev = two.device()
    other = two.device()
    assert two.pay("fog-a", dev, 5).outcome.status == "ok"  # the clone, at fog-a
    assert two.pay("fog-b", dev, 5).outcome.status == "ok"  # the original, before any seen
    assert two.pay("fog-b", other, 1).outcome.status == "ok"
    sent = two.tick("fog-a")
    out_b = two.deliver(sent)  # fog-a's seen reaches fog-b
    (alarm,) = alarms(out_b, "cloned_key")
    assert public_key(dev).hex()[:16] in alarm.error and "q 5" in alarm.error
    out_a = two.deliver(two.tick("fog-b"))  # and fog-b's reaches fog-a
    assert len(alarms(out_a, "cloned_key")) == 1
    for fog_id in ("fog-a", "fog-b"):  # suspended at both: declined revoked, whatever q
        assert two.pay(fog_id, dev, 100).outcome.reason is Reason.REVOKED
        assert two.pay(fog_id, other, 50).outcome.status == "ok"  # only that device
        (suspended,) = two.cores[fog_id].store.suspended_devices()
        assert suspended[:2] == (public_key(dev), 5)
    again = two.deliver(sent)  # the same seen again (a resend) finds nothing new
    assert alarms(again, "cloned_key") == [] and of(again, TrustLoaded)[0].status == "accepted"


def test_a_clone_seen_first_is_declined_stale_at_the_second_fog(two: Federation) -> None:
    dev = two.device()
    assert two.pay("fog-a", dev, 7).outcome.status == "ok"
    two.gossip("fog-a")
    late = two.pay("fog-b", dev, 7)  # the other copy of the key, with the same q
    assert late.outcome.reason is Reason.STALE
    assert two.pay("fog-b", dev, 6).outcome.reason is Reason.STALE
    assert two.pay("fog-b", dev, 8).outcome.status == "ok"  # a fresh q is not stale


def test_two_peers_reporting_one_q_with_two_intents_is_a_clone_at_a_third(
    three: Federation,
) -> None:
    dev = three.device()
    three.pay("fog-a", dev, 3)
    three.pay("fog-c", dev, 3)
    out = three.gossip("fog-a", "fog-c")  # both reach fog-b, which holds neither
    assert len(alarms(out, "cloned_key")) == 1
    assert three.pay("fog-b", dev, 9).outcome.reason is Reason.REVOKED


def test_a_device_moving_between_fogs_is_never_wrongly_stale(three: Federation) -> None:
    dev = three.device()
    q = 0
    for fog_id in ("fog-a", "fog-b", "fog-c", "fog-b", "fog-a", "fog-a", "fog-c"):
        for _ in range(3):
            q += 1
            assert three.pay(fog_id, dev, q).outcome.status == "ok", (fog_id, q)
        three.gossip(*three.cores)
    # late and repeated seens (a resend after a crash) change nothing
    for fog_id in three.cores:
        three.cores[fog_id].handle(Disconnected(now_ms=three.now, mono_ms=three.mono))
        three.input(fog_id, Connected(now_ms=three.now, mono_ms=three.mono))
    out = three.gossip(*three.cores)
    assert alarms(out, "cloned_key") == []
    for fog_id in three.cores:
        q += 1
        assert three.pay(fog_id, dev, q).outcome.status == "ok"
        three.gossip(*three.cores)


def test_a_fog_that_has_not_heard_authorizes_the_next_q(two: Federation) -> None:
    """Gossip lost (fog-b dropped it): the device moving on is still served, and the
    marks catch up with the next seen."""
    dev = two.device()
    two.pay("fog-a", dev, 1)
    two.deliver(two.tick("fog-a"), drop=["fog-b"])
    assert two.pay("fog-b", dev, 2).outcome.status == "ok"
    assert two.pay("fog-a", dev, 3).outcome.status == "ok"  # fog-a has not heard of q 2
    two.gossip("fog-a", "fog-b")
    assert two.pay("fog-b", dev, 3).outcome.reason is Reason.STALE


def test_a_seen_not_signed_by_a_fog_credential_changes_nothing(two: Federation) -> None:
    dev = two.device()
    entry = SeenEntry(public_key(dev), 99, bytes(32))
    topic = topics.gossip_topic("fog-b", "seen")
    cases = {
        "stranger key": seal(Seen(fog_id="fog-a", entries=(entry,), time_ms=two.now), key()),
        "unknown fog": seal(Seen(fog_id="fog-z", entries=(entry,), time_ms=two.now), key()),
        "own fog_id": seal(
            Seen(fog_id="fog-b", entries=(entry,), time_ms=two.now), two.keys["fog-b"]
        ),
        "garbage": b"\x94junk",
    }
    for name, payload in cases.items():
        (loaded,) = of(two.give("fog-b", (topic, payload)), TrustLoaded)
        assert (loaded.msg_type, loaded.status) == ("seen", "refused"), name
    to_other = seal(Seen(fog_id="fog-a", entries=(entry,), time_ms=two.now), two.keys["fog-a"])
    assert two.give("fog-b", (topics.gossip_topic("fog-c", "seen"), to_other)) == []
    assert two.pay("fog-b", dev, 1).outcome.status == "ok"  # no mark was stored


def test_marks_and_suspensions_survive_a_restart(two: Federation) -> None:
    dev, clone = two.device(), two.device()
    two.pay("fog-a", dev, 10)
    two.pay("fog-a", clone, 1)
    two.pay("fog-b", clone, 1)
    two.gossip("fog-a")
    two.restart("fog-b")
    assert two.pay("fog-b", dev, 10).outcome.reason is Reason.STALE
    assert two.pay("fog-b", clone, 2).outcome.reason is Reason.REVOKED
    assert two.pay("fog-b", dev, 11).outcome.status == "ok"


def test_a_crash_resends_the_last_round_and_never_skips(two: Federation) -> None:
    dev = two.device()
    two.pay("fog-a", dev, 1)
    first = seen_of(two.tick("fog-a"), "fog-b")  # handed out; the cursor is not moved yet
    two.restart("fog-a")  # before the next round: that round may not have left
    again = seen_of(two.tick("fog-a"), "fog-b")
    assert (
        [e.seq for s in first for e in s.entries]
        == [e.seq for s in again for e in s.entries]
        == [1]
    )
    two.pay("fog-a", dev, 2)
    nxt = seen_of(two.tick("fog-a"), "fog-b")  # the previous round is now the cursor
    assert [e.seq for s in nxt for e in s.entries] == [2]
    two.restart("fog-a")
    assert [e.seq for s in seen_of(two.tick("fog-a"), "fog-b") for e in s.entries] == [2]


def test_a_long_backlog_goes_out_in_rounds_of_bounded_messages(two: Federation) -> None:
    devs = [two.device() for _ in range(4)]
    total = SEEN_ROUND_ENTRIES_MAX + 100
    arrivals = []
    for n in range(total):
        dev = devs[n % 4]
        intent = Intent(
            device=public_key(dev),
            fog_id="fog-a",
            seq=n // 4 + 1,
            payee_id="shop",
            amount_micros=1,
            currency="EUR",
            time_ms=two.now,
        )
        arrivals.append(Arrival(public_key(dev), seal(intent, dev)))
    for k in range(0, total, 256):
        two.input("fog-a", Intents(arrivals=tuple(arrivals[k : k + 256]), now_ms=two.now))
    first = seen_of(two.tick("fog-a"), "fog-b")
    assert sum(len(s.entries) for s in first) == SEEN_ROUND_ENTRIES_MAX
    assert all(len(s.entries) <= 128 for s in first)
    second = seen_of(two.tick("fog-a", 1), "fog-b")  # more was waiting: the next tick
    assert sum(len(s.entries) for s in second) == 100


# ---- revocation gossip -------------------------------------------------------------------------


def test_a_revocation_reaching_fog_a_reaches_fog_c_through_fog_b(three: Federation) -> None:
    dev = three.device()
    for fog_id in three.cores:
        assert (
            three.pay(fog_id, dev, {"fog-a": 1, "fog-b": 2, "fog-c": 3}[fog_id]).outcome.status
            == "ok"
        )
    revocation = three.revocation(public_key(dev))
    first = three.give("fog-a", revocation)  # from the cloud's retained topic
    assert [p.topic for p in of(first, Publish)] == [topics.gossip_topic("fog-b", "revoke")]
    assert all(p.payload == revocation[1] for p in of(first, Publish))  # byte for byte
    after = three.deliver(first)
    statuses = [(t.msg_type, t.status) for t in of(after, TrustLoaded)]
    # fog-b accepts and passes it to fog-a (duplicate: stops) and fog-c (accepts, passes it
    # back to fog-b: duplicate, stops)
    assert statuses.count(("revoke", "accepted")) == 2
    assert statuses.count(("revoke", "duplicate")) == 2
    for fog_id, q in (("fog-a", 10), ("fog-b", 11), ("fog-c", 12)):
        assert three.pay(fog_id, dev, q).outcome.reason is Reason.REVOKED


def test_a_revocation_refused_or_not_ours_is_not_passed_on(two: Federation) -> None:
    dev = two.device()
    out = two.give("fog-a", (topics.gossip_topic("fog-a", "revoke"), b"\x94junk"))
    assert of(out, Publish) == [] and of(out, TrustLoaded)[0].status == "refused"
    revocation = two.revocation(public_key(dev))[1]
    assert two.give("fog-a", (topics.gossip_topic("fog-b", "revoke"), revocation)) == []
    assert two.pay("fog-a", dev, 1).outcome.status == "ok"


# ---- long outages (17.6) -------------------------------------------------------------------


def test_uplink_backlog_alarm_is_raised_once(tmp_path: Path) -> None:
    f = Federation(tmp_path, {"fog-a": ()}, uplink=UplinkConfig(backlog_alarm_records=5))
    try:
        dev = f.device()
        f.input("fog-a", Disconnected(now_ms=f.now, mono_ms=f.mono))  # cut off: nothing acked
        for q in range(1, 6):
            f.pay("fog-a", dev, q)
        assert alarms(f.tick("fog-a", 1_000), "uplink_backlog") == []  # 5: not over 5
        f.pay("fog-a", dev, 6)
        (raised,) = alarms(f.tick("fog-a", 1_000), "uplink_backlog")
        assert "6 unacked records" in raised.error
        f.pay("fog-a", dev, 7)
        assert alarms(f.tick("fog-a", 1_000), "uplink_backlog") == []  # raised once
    finally:
        f.close()


def test_uplink_backlog_clears_when_acks_come(tmp_path: Path) -> None:
    f = Federation(tmp_path, {"fog-a": ()}, uplink=UplinkConfig(backlog_alarm_records=2))
    try:
        dev = f.device()
        for q in range(1, 5):
            f.pay("fog-a", dev, q)
        out = f.tick("fog-a", 2_000)  # seals the four records, counts 4 > 2
        assert len(alarms(out, "uplink_backlog")) == 1
        conn = sqlite3.connect(tmp_path / "fog-a.sqlite")
        conn.execute("UPDATE batches SET acked = 1")
        conn.commit()
        conn.close()
        (cleared,) = alarms(f.tick("fog-a", 1_000), "uplink_backlog_cleared")
        assert "0 unacked records" in cleared.error
    finally:
        f.close()


def test_backlog_alarm_off_with_zero(tmp_path: Path) -> None:
    f = Federation(tmp_path, {"fog-a": ()}, uplink=UplinkConfig(backlog_alarm_records=0))
    try:
        dev = f.device()
        for q in range(1, 5):
            f.pay("fog-a", dev, q)
        assert alarms(f.tick("fog-a", 2_000), "uplink_backlog") == []
    finally:
        f.close()


def test_the_next_lease_is_asked_before_the_live_one_expires(tmp_path: Path) -> None:
    f = Federation(
        tmp_path,
        {"fog-a": ()},
        lease=LeaseConfig(request_below_micros=0, renew_before_ms=300_000),
        lease_life_ms=HOUR_MS,
    )
    try:
        dev = f.device()
        assert f.pay("fog-a", dev, 1).outcome.status == "ok"
        assert of(f.tick("fog-a", 1_000), LeaseRequest) == []  # an hour left: nothing asked
        f.now += HOUR_MS - 300_000 - 2_000  # within renew_before_ms of na
        assert f.pay("fog-a", dev, 2).outcome.status == "ok"
        (asked,) = of(f.tick("fog-a", 1_000), LeaseRequest)
        msg = open_envelope(asked.payload, LeaseRequestMsg).msg
        assert (msg.owner_id, msg.amount_micros) == ("acme", f.lease.request_micros)
        f.now += 302_000  # no answer came (cut off): past na nothing is drawn
        assert f.pay("fog-a", dev, 3).outcome.reason is Reason.INSUFFICIENT_BUDGET
    finally:
        f.close()


def test_a_lease_shorter_than_the_window_is_not_renewed_ahead(tmp_path: Path) -> None:
    """A 60 s lease lives inside the 5 min window from the start: renewing it ahead would
    ask for a lease at every draw; top-ups on room still work as before."""
    f = Federation(
        tmp_path,
        {"fog-a": ()},
        lease=LeaseConfig(request_below_micros=0, renew_before_ms=300_000),
        lease_life_ms=60_000,
    )
    try:
        dev = f.device()
        for q in range(1, 4):
            assert f.pay("fog-a", dev, q).outcome.status == "ok"
            assert of(f.tick("fog-a", 1_000), LeaseRequest) == []
    finally:
        f.close()


def test_renewal_off_with_zero(tmp_path: Path) -> None:
    f = Federation(
        tmp_path,
        {"fog-a": ()},
        lease=LeaseConfig(request_below_micros=0, renew_before_ms=0),
        lease_life_ms=HOUR_MS,
    )
    try:
        dev = f.device()
        f.now += HOUR_MS - 60_000
        assert f.pay("fog-a", dev, 1).outcome.status == "ok"
        assert of(f.tick("fog-a", 1_000), LeaseRequest) == []
    finally:
        f.close()


def test_records_learnt_from_a_replica_feed_the_same_marks(two: Federation) -> None:
    """``FogStore.note_peer_marks``: what a replica holder verified of another fog's batch
    (docs/protocol.md 17.2) counts as that fog's seen."""
    dev, clone = two.device(), two.device()
    ok = two.pay("fog-b", clone, 4).outcome
    store = two.cores["fog-b"].store
    raised, clones, collisions = store.note_peer_marks(
        "fog-a",
        [SeenEntry(public_key(dev), 9, bytes(32)), SeenEntry(public_key(clone), 4, bytes(32))],
        now_ms=two.now,
    )
    assert (raised, collisions) == (2, 1) and ok.status == "ok"
    assert [c.device for c in clones] == [public_key(clone)]
    assert two.pay("fog-b", dev, 9).outcome.reason is Reason.STALE
    assert two.pay("fog-b", dev, 10).outcome.status == "ok"
    assert two.pay("fog-b", clone, 5).outcome.reason is Reason.REVOKED


def test_a_seen_keeps_what_groups_cached_of_other_devices_valid(two: Federation) -> None:
    """A seen forgets only the devices it names: the others' cached state stays right."""
    named, other = two.device(), two.device()
    for q in (1, 2):
        assert two.pay("fog-b", other, q).outcome.status == "ok"  # cached at fog-b
    two.pay("fog-a", named, 5)
    two.gossip("fog-a")
    assert two.pay("fog-b", other, 2).outcome.reason is Reason.SEQ_CONFLICT  # its own q 2
    assert two.pay("fog-b", other, 3).outcome.status == "ok"
    assert two.pay("fog-b", named, 5).outcome.reason is Reason.STALE


def test_peer_reports_are_pruned_after_their_keep_time_the_marks_stay(
    three: Federation,
) -> None:
    dev = three.device()
    three.pay("fog-a", dev, 3)
    three.gossip("fog-a")  # fog-b holds fog-a's report of (d, 3)
    three.tick("fog-b", HOUR_MS + 1_000)  # past the keep time: pruned at that tick
    conn = sqlite3.connect(three.tmp / "fog-b.sqlite")
    try:
        assert conn.execute("SELECT count(*) FROM peer_seen").fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM peer_seq").fetchone()[0] == 1
    finally:
        conn.close()
    assert three.pay("fog-b", dev, 3).outcome.reason is Reason.STALE  # the mark stays
