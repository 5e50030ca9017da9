"""Fuzz a RUNNING fog (``python -m fog``, with its store process) through Mosquitto on
127.0.0.1: garbage on its intent, trust, lease and ack topics and on topics that do not
parse, interleaved with valid payments.

Four bound devices: A and B pay validly between chunks of garbage (one intent each, the same
bytes again on silence, as a device does); C and D only ever get garbage on their topics; U
is a key without a binding. What the garbage is (``tests/faults/mutate.py``): mutations of
intents A and B had authorized (bit flips, truncations, extensions, type swaps, huge lengths)
and of C's and D's intents for another fog, bodies with a duplicate key signed with the
device's key, validly signed intents with one field wrong (other fog, other currency, over
the binding's limit, a stale time, a used sequence with other content, U's intent, A's
intent on B's topic), replays of authorized intents byte for byte, random bytes and random
msgpack values; on trust, lease and ack topics mutated trust material, random bytes and a
validly signed binding by a key that is no owner's.

Checked: the fog never exits; every payload on one of its intent topics is answered on that
topic's receipt topic (spec section 6: malformed with ``i`` = SHA-256 of the payload,
otherwise the intent id), declined, except a replay, which gets the stored receipt byte for
byte; the valid payments all get ok receipts; the fog's rows change by exactly the valid
payments (``log`` gains exactly them, ``leases`` drew exactly their sum, ``devices`` of C, D
and U unchanged, ``trust`` unchanged); the RSS of the fog's process tree, sampled after each
chunk, is reported (first, last, peak).
"""

import asyncio
import hashlib
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import aiomqtt
import msgpack

from protocol import topics
from protocol.errors import Declined
from protocol.messages import ZERO_KEY, Binding, Intent, Receipt
from protocol.signing import message_id, open_envelope, seal, split_envelope
from tests.conftest import MosquittoProcess, start_mosquitto
from tests.faults import mutate as mu
from tests.faults.decoders import envelope
from tests.integration.devices import (
    FAR_FUTURE_MS,
    Device,
    Issuer,
    Wallet,
    new_key,
    now_ms,
    publish_retained,
    wallet,
    write_fog_files,
)

FOG: Final = "fog-z"
CHUNK: Final = 200  # garbage payloads published at once; then their answers are awaited
ANSWER_TIMEOUT_S: Final = 30.0
RETRANSMIT_S: Final = 0.5
ATTEMPTS_MAX: Final = 40
EXIT_TIMEOUT_S: Final = 20.0
TX_MAX: Final = 1_000_000
LEASE_MICROS: Final = 10**12
PAY_MICROS: Final = 100
LIMITS: Final = (
    "[policy]\nrate_per_s = 100000\nrate_burst = 100000\n"
    "[batch]\nrecords_max = 16\n[uplink]\nenabled = false\n"
)
INTENT_SHARE: Final = 0.75
TRUST_SHARE: Final = 0.15  # the rest goes to topics that do not parse


@dataclass
class FogFigures:
    garbage: int = 0
    answerable: int = 0
    answered: int = 0
    unanswered: int = 0
    not_answerable: int = 0  # trust/lease/ack topics and topics that do not parse
    valid_paid: int = 0
    ops: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)  # of the garbage's receipts
    wrong_answers: list[str] = field(default_factory=list)
    state_errors: list[str] = field(default_factory=list)
    rss_kib: list[int] = field(default_factory=list)  # fog + children, after each chunk
    fog_exited: bool = False
    inert_bindings_stored: int = 0
    rogue_binding_inert: bool = True  # C over its real limit is still declined limit_tx
    seconds: float = 0.0
    counters: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        rss = self.rss_kib or [0]
        return {
            "garbage_payloads": self.garbage,
            "answerable": self.answerable,
            "answered": self.answered,
            "unanswered": self.unanswered,
            "not_answerable": self.not_answerable,
            "valid_payments": self.valid_paid,
            "fog_exited": self.fog_exited,
            "inert_bindings_stored": self.inert_bindings_stored,
            "rogue_binding_inert": self.rogue_binding_inert,
            "wrong_answers": len(self.wrong_answers),
            "state_errors": self.state_errors,
            "rss_kib_first": rss[0],
            "rss_kib_last": rss[-1],
            "rss_kib_peak": max(rss),
            "rss_samples": len(self.rss_kib),
            # at 0, 25, 50, 75 and 100 % of the run: flat, or growing all along
            "rss_kib_quartiles": [rss[(len(rss) - 1) * q // 4] for q in range(5)],
            "seconds": round(self.seconds, 1),
            "ops": dict(sorted(self.ops.items())),
            "receipt_reasons": dict(sorted(self.reasons.items())),
            "first_wrong_answers": self.wrong_answers[:20],
        }


def tree_rss_kib(pid: int) -> int:
    """VmRSS of ``pid`` and its children (the store process), in KiB."""
    pids = [pid]
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == str(pid):
            pids.append(int(stat.parent.name))
    total = 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


def expected_id(payload: bytes) -> tuple[bytes, str | None]:
    """The ``i`` of the fog's receipt for ``payload`` on an intent topic (spec section 6 and
    docs/protocol.md section 6): the intent id, or SHA-256 of the payload when malformed;
    and the reason the decoders alone decide (malformed, bad_signature), else None."""
    try:
        return open_envelope(payload, Intent).id, None
    except Declined as exc:
        if exc.reason == "bad_signature":
            env = split_envelope(payload, bytes_max=Intent.ENVELOPE_BYTES_MAX)
            return message_id(Intent.TYPE, env.body), "bad_signature"
        return hashlib.sha256(payload).digest(), "malformed"


@dataclass
class Scene:
    issuer: Issuer
    a: Device
    b: Device
    c: Device
    d: Device
    u: Device  # no binding
    trust: list[tuple[str, bytes]]
    paid: list[tuple[Device, bytes, bytes]] = field(default_factory=list)  # intent, receipt

    @property
    def bound(self) -> list[Device]:
        return [self.a, self.b, self.c, self.d]


def scene() -> Scene:
    issuer = Issuer()
    a, b, c, d, u = (Device(FOG) for _ in range(5))
    trust = [issuer.owner_credential(), issuer.lease(FOG, LEASE_MICROS)]
    trust += [
        issuer.binding(x.public, tx_max_micros=TX_MAX, day_max_micros=10**12) for x in (a, b, c, d)
    ]
    return Scene(issuer, a, b, c, d, u, trust)


def wrong_field(rng: random.Random, s: Scene) -> tuple[str, bytes, str]:
    """A validly signed intent with one thing wrong; (topic, payload, what)."""
    dev = rng.choice([s.a, s.b])
    seq = dev.seq + rng.randint(1, 1000)
    what = rng.choice(
        ["wrong_fog", "currency", "limit_tx", "stale_time", "seq_conflict", "unknown", "topic"]
    )
    topic = dev.intent_topic
    if what == "wrong_fog":
        payload = dev.intent(PAY_MICROS, seq=seq, fog_id="fog-other")
    elif what == "currency":
        payload = dev.intent(PAY_MICROS, seq=seq, currency="GBP")
    elif what == "limit_tx":
        payload = dev.intent(TX_MAX + rng.randint(1, 10**6), seq=seq)
    elif what == "stale_time":
        payload = dev.intent(PAY_MICROS, seq=seq, time_ms=now_ms() - rng.choice((1, -1)) * 10**6)
    elif what == "seq_conflict" and s.paid:
        paid_dev, paid, _ = rng.choice(s.paid)
        q = open_envelope(paid, Intent).msg.seq
        payload = paid_dev.intent(PAY_MICROS + 1, seq=q)
        topic = paid_dev.intent_topic
    elif what == "unknown":
        payload = s.u.intent(PAY_MICROS, seq=rng.randint(1, 10**6))
        topic = s.u.intent_topic
    else:  # A's intent on B's topic and the other way round
        other = s.b if dev is s.a else s.a
        payload = dev.intent(PAY_MICROS, seq=seq)
        topic = other.intent_topic
        what = "topic"
    return topic, payload, f"resigned_{what}"


def intent_garbage(rng: random.Random, s: Scene) -> tuple[str, bytes, str]:
    roll = rng.random()
    if roll < 0.15:
        return wrong_field(rng, s)
    if roll < 0.22 and s.paid:
        dev, paid, _ = rng.choice(s.paid)
        return dev.intent_topic, paid, "replay"
    dev = rng.choice(s.bound)
    if dev in (s.a, s.b) and s.paid:
        base = rng.choice([p for d, p, _ in s.paid if d is dev] or [s.paid[0][1]])
    else:  # C and D: never a payload that could pay, even unchanged
        base = dev.intent(PAY_MICROS, seq=rng.randint(1, 10**6), fog_id="fog-other")
    if roll < 0.30:
        _, body, _, _ = msgpack.unpackb(base)
        fields = msgpack.unpackb(body)
        fields["f"] = "fog-other"  # the duplicate is the fault; the rest would be declined
        return dev.intent_topic, envelope("intent", mu.dup_key_map(rng, fields), dev.key), "dup_key"
    op, payload = mu.mutate(rng, base)
    return dev.intent_topic, payload, op


def trust_garbage(rng: random.Random, s: Scene) -> tuple[str, bytes, str]:
    if rng.random() < 0.1:  # validly signed, by a key that is no owner's
        rogue = new_key()
        msg = Binding(
            device=s.c.public,
            owner_id=s.issuer.owner_id,
            not_before_ms=0,
            not_after_ms=FAR_FUTURE_MS,
            currency="EUR",
            tx_max_micros=10**12,
            day_max_micros=10**12,
        )
        return topics.bind_topic(s.c.public), seal(msg, rogue), "rogue_binding"
    topic, base = rng.choice(s.trust)
    if rng.random() < 0.2:
        topic = topics.ack_topic(FOG)
    op, payload = mu.mutate(rng, base)
    if not payload:  # an empty retained lease payload is the cloud closing it: not garbage
        payload = b"\x00"
    return topic, payload, f"trust_{op}"


BAD_TOPICS: Final = (
    f"fogpay/1/{FOG}/intent/{'A' * 64}",
    f"fogpay/1/{FOG}/intent/{'0' * 63}",
    f"fogpay/1/{FOG}/intent/{'0' * 64}/x",
    f"fogpay/1/{FOG}/intent/",
    f"fogpay/1/{FOG}/lease/{'g' * 32}",
    "fogpay/1/trust/bind/zz",
    "fogpay/1/trust/owner/",
)


def bad_topic_garbage(rng: random.Random, s: Scene) -> tuple[str, bytes, str]:
    _, base = rng.choice(s.trust)
    return rng.choice(BAD_TOPICS), rng.choice([base, s.a.intent(1, seq=1)]), "bad_topic"


def snapshot(db: Path) -> dict[str, Any]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return {
            "log": {
                bytes(i): (n, bytes(r))
                for n, i, r in con.execute("SELECT n, intent_id, receipt FROM log")
            },
            "drawn": con.execute("SELECT coalesce(sum(drawn_micros), 0) FROM leases").fetchone()[0],
            "devices": {
                bytes(d): (q, day, m)
                for d, q, day, m in con.execute(
                    "SELECT device, seq_last, day, day_micros FROM devices"
                )
            },
            "trust": sorted(bytes(i) for (i,) in con.execute("SELECT id FROM trust")),
            # what trust is worth: bindings signed by their owner's key, and the rest
            "effective": sorted(
                bytes(i)
                for (i,) in con.execute(
                    "SELECT b.id FROM bindings b JOIN owners o "
                    "ON o.owner_id = b.owner_id AND o.key = b.signer "
                    "UNION ALL SELECT id FROM owners UNION ALL SELECT id FROM fogs "
                    "UNION ALL SELECT id FROM leases UNION ALL SELECT id FROM revocations"
                )
            ),
            "inert_bindings": con.execute(
                "SELECT count(*) FROM bindings b WHERE NOT EXISTS (SELECT 1 FROM owners o "
                "WHERE o.owner_id = b.owner_id AND o.key = b.signer)"
            ).fetchone()[0],
        }
    finally:
        con.close()


def start_fog(config: Path, log: Path) -> "subprocess.Popen[bytes]":
    out = log.open("ab")
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "fog", "--config", str(config)], stdout=out, stderr=out
        )
    finally:
        out.close()


async def pay(w: Wallet, s: Scene, dev: Device) -> None:
    """One valid payment, the same bytes again on silence or a transient decline."""
    intent = dev.intent(PAY_MICROS)
    for _ in range(ATTEMPTS_MAX):
        raw = await w.pay_until_answered(
            dev, intent, timeout_s=RETRANSMIT_S, attempts_max=ATTEMPTS_MAX
        )
        receipt = open_envelope(raw, Receipt).msg
        if receipt.ok:
            s.paid.append((dev, intent, raw))
            w._by_id.pop(receipt.intent_id, None)  # replays are counted from here on
            return
        if receipt.reason is None or not receipt.reason.transient:
            raise AssertionError(f"valid payment declined: {receipt.reason}")
        await asyncio.sleep(0.05)
    raise AssertionError("valid payment never authorized")


async def wait_answers(w: Wallet, sent: Counter[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(len(w.raw_for(i)) >= n for i, n in sent.items()):
            return
        await asyncio.sleep(0.01)


def check_answers(
    fig: FogFigures,
    w: Wallet,
    s: Scene,
    sent: Counter[bytes],
    replays: Counter[bytes],
    decoded: dict[bytes, str],
    ops: dict[bytes, set[str]],
) -> None:
    """Each id answered as often as sent; malformed and bad_signature payloads declined so
    (a malformed one with zero ``d`` and ``q = 0``); an ok receipt only for a replay, and then
    the stored one byte for byte (a mutation of a paid intent with a broken signature shares
    its intent id, and is declined)."""
    stored = {open_envelope(p, Intent).id: r for _, p, r in s.paid}
    for i, n in sent.items():
        got = w.raw_for(i)
        fig.answered += min(n, len(got))
        fig.unanswered += max(0, n - len(got))
        oks = 0
        for raw in got:
            r = open_envelope(raw, Receipt).msg
            if r.ok:
                oks += 1
                if raw != stored.get(i):
                    fig.wrong_answers.append(f"ok receipt, not a stored one: {i.hex()[:16]}")
                fig.reasons["ok_replay"] += 1
            else:
                fig.reasons[str(r.reason)] += 1
                want = decoded.get(i)
                if want is not None and r.reason != want:
                    fig.wrong_answers.append(f"{r.reason} for a {want} payload {i.hex()[:16]}")
                if r.reason == "malformed" and (r.device, r.seq) != (ZERO_KEY, 0):
                    fig.wrong_answers.append("malformed receipt with d or q set")
        if oks != replays[i]:
            fig.wrong_answers.append(
                f"{replays[i]} replays, {oks} ok receipts: {i.hex()[:16]} {sorted(ops[i])}"
            )


async def run(directory: Path, count: int, *, seed: int = 1) -> FogFigures:
    """``count`` garbage payloads (``random.Random(seed)``) against a fog process."""
    rng = random.Random(seed)
    fig = FogFigures()
    s = scene()
    broker: MosquittoProcess = start_mosquitto(directory)
    port = broker.endpoint.port
    config = write_fog_files(
        directory,
        fog_id=FOG,
        issuer_key=s.issuer.public,
        broker=f'url = "{broker.endpoint.url}"',
        extra=LIMITS,
    )
    db = directory / "fog.sqlite"
    log = directory / "fog.log"
    started = time.perf_counter()
    fog = start_fog(config, log)
    try:
        await publish_retained("127.0.0.1", port, s.trust)
        async with wallet("127.0.0.1", port, FOG) as w:
            for dev in (s.a, s.b):  # warm up: trust loaded, one payment each
                await pay(w, s, dev)
            before = snapshot(db)
            fig.rss_kib.append(tree_rss_kib(fog.pid))
            async with aiomqtt.Client("127.0.0.1", port, max_inflight_messages=1000) as pub:
                pub.pending_calls_threshold = CHUNK * 2
                done = 0
                while done < count:
                    n = min(CHUNK, count - done)
                    await chunk(fig, rng, s, w, pub, n)
                    done += n
                    await pay(w, s, rng.choice([s.a, s.b]))
                    fig.rss_kib.append(tree_rss_kib(fog.pid))
                    if fog.poll() is not None:
                        fig.fog_exited = True
                        break
            fig.valid_paid = len(s.paid)
            after = snapshot(db)
            over = s.c.intent(TX_MAX + 1)  # within a rogue binding's limit, not C's own
            r = open_envelope(
                await w.pay_until_answered(s.c, over, timeout_s=RETRANSMIT_S, attempts_max=20),
                Receipt,
            ).msg
            fig.rogue_binding_inert = r.reason == "limit_tx"
        check_state(fig, s, before, after)
        fig.fog_exited = fig.fog_exited or fog.poll() is not None
    finally:
        fig.seconds = time.perf_counter() - started
        if fog.poll() is None:
            fog.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(fog.wait, EXIT_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                fog.kill()
                fog.wait()
        broker.stop()
    fig.counters = fog_counters(log)
    return fig


async def chunk(fig: FogFigures, rng: random.Random, s: Scene, w: Wallet, pub: Any, n: int) -> None:
    sent: Counter[bytes] = Counter()
    replays: Counter[bytes] = Counter()
    decoded: dict[bytes, str] = {}
    ops: dict[bytes, set[str]] = {}
    paid = {open_envelope(p, Intent).id for _, p, _ in s.paid}
    sends = []
    for _ in range(n):
        roll = rng.random()
        if roll < INTENT_SHARE:
            topic, payload, op = intent_garbage(rng, s)
            i, reason = expected_id(payload)
            if reason is not None:
                decoded[i] = reason
            sent[i] += 1
            # a replay is what opens as an authorized intent: the replay operator's payloads,
            # and a mutation that gave the same bytes back (a byte set to its own value...)
            replays[i] += reason is None and i in paid
            ops.setdefault(i, set()).add(op)
            fig.answerable += 1
        else:
            maker = trust_garbage if roll < INTENT_SHARE + TRUST_SHARE else bad_topic_garbage
            topic, payload, op = maker(rng, s)
            fig.not_answerable += 1
        fig.ops[op] += 1
        fig.garbage += 1
        sends.append(pub.publish(topic, payload, qos=1, timeout=ANSWER_TIMEOUT_S))
    await asyncio.gather(*sends)
    await wait_answers(w, sent, ANSWER_TIMEOUT_S)
    check_answers(fig, w, s, sent, replays, decoded, ops)
    for i in sent:  # forget them: the next chunk may send the same ids again
        w._by_id.pop(i, None)


def check_state(fig: FogFigures, s: Scene, before: dict[str, Any], after: dict[str, Any]) -> None:
    paid_ids = {open_envelope(p, Intent).id for _, p, _ in s.paid}
    new = set(after["log"]) - set(before["log"])
    warmup = set(before["log"])
    if new != paid_ids - warmup:
        fig.state_errors.append(
            f"log gained {len(new)} rows, valid payments {len(paid_ids - warmup)}"
        )
    for i, (n, r) in before["log"].items():
        if after["log"].get(i) != (n, r):
            fig.state_errors.append(f"log row {n} changed")
    ns = sorted(n for n, _ in after["log"].values())
    if ns != list(range(1, len(ns) + 1)):
        fig.state_errors.append("log indexes not consecutive")
    drawn = after["drawn"] - before["drawn"]
    if drawn != PAY_MICROS * len(new):
        fig.state_errors.append(f"leases drew {drawn}, valid payments {PAY_MICROS * len(new)}")
    for dev in (s.c, s.d, s.u):
        if before["devices"].get(dev.public) != after["devices"].get(dev.public):
            fig.state_errors.append("a garbage-only device's row changed")
    if before["effective"] != after["effective"]:
        fig.state_errors.append(
            "owners, fogs, leases, revocations or owner-signed bindings changed"
        )
    # a binding signed by another key than its owner's is stored (any key may sign one; its
    # worth is decided when used, fog/trustdb.py) but is inert: the only rows garbage may add
    added = len(after["trust"]) - len(before["trust"])
    fig.inert_bindings_stored = after["inert_bindings"] - before["inert_bindings"]
    if added != fig.inert_bindings_stored:
        fig.state_errors.append(f"trust rows +{added}, inert bindings +{fig.inert_bindings_stored}")


def fog_counters(log: Path) -> dict[str, int]:
    """The counters of the fog's last fog_stats or fog_stopped line."""
    import json

    last: dict[str, int] = {}
    for line in log.read_text().splitlines():
        if not line.startswith("{"):
            continue
        e = json.loads(line)
        if e.get("event") in ("fog_stats", "fog_stopped"):
            last = {k: v for k, v in e.items() if isinstance(v, int) and not isinstance(v, bool)}
    return last
