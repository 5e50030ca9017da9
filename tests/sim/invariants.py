"""The invariants, checked after every step and at the end, against the real files.

The checker reads every fog's SQLite file and the cloud's through its own read connections
(as an auditor would: nothing in the system under test is asked about itself), plus what the
devices hold. Each check returns violations as one line each; an empty list is a pass.

Safety, after every step:

- per lease: the draws in a fog's log on a lease sum to at most its amount, none is later
  than its expiry, and the lease is one the cloud granted to that fog;
- per owner: outstanding leases (at ``max(amount, drawn)``, drawn as the fogs' logs say) plus
  what was drawn on closed leases stay within the credit limit; and so does the cloud's own
  ``cloud.leases.exposure``;
- no intent booked twice: a transfer per intent id (the key) and per (device, q);
- a fog authorizes nothing for a device after it stored the device's revocation;
- every ok receipt a device holds is in its fog's file, at the log index it names (checked
  when the receipt arrives and again after every restart of that fog);
- the cloud raised no alarm (fork, cloned key, lease overdrawn or drawn late, report
  mismatch) and rejected no record: in a run without attackers each is a bug;
- the ledger sums to zero in every currency and every balance equals its transfers
  (``cloud.ledger.check``).

Budget that moves (docs/protocol.md 18): a lease given back early is never drawn on after;
a sub-lease is credited once, at its ``xfer``'s amount, and drawn within it; the giver's draws
plus what it gave stay within its lease; the bound is 18.4's; a voucher's booked payments
stay within its amount, and a second payment at one (voucher, s) only for a planted double
spender, with its alarm.

Liveness, after the heal phase: every ok receipt a device holds is booked exactly once,
every record of every fog's log is booked, and every lease past its expiry is closed.
"""

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cloud import leases as cloud_leases
from cloud import ledger
from protocol.batch import decode_batch, decode_record
from protocol.messages import Intent
from protocol.signing import message_id, open_envelope, split_envelope
from protocol.transfer import Transfer
from tests.sim.devices import Held, SimDevice

Row = tuple[object, ...]
RACCS_OF_BATCH = "(SELECT count(*) FROM replica_acks a WHERE a.number = batches.number)"


class ReadTx:
    """``cloud.store.Tx`` for reading over a plain sqlite3 connection, so that the cloud's own
    checks (``ledger.check``, ``leases.exposure``) run against the file unchanged."""

    dialect = "sqlite"

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    async def fetchone(self, sql: str, params: Sequence[object] = ()) -> Row | None:
        row: Row | None = self._conn.execute(sql, tuple(params)).fetchone()
        return row

    async def fetchall(self, sql: str, params: Sequence[object] = ()) -> list[Row]:
        return list(self._conn.execute(sql, tuple(params)).fetchall())

    async def execute(self, sql: str, params: Sequence[object] = ()) -> int:
        raise AssertionError("the checker only reads")


@dataclass(frozen=True, slots=True)
class CloudLease:
    owner_id: str
    fog_id: str
    amount_micros: int
    not_after_ms: int
    state: str


@dataclass(frozen=True, slots=True)
class SubLease:
    """A peer transfer (docs/protocol.md 18.2) as its signed ``xfer`` says."""

    giver: str
    receiver: str
    parent: bytes
    owner_id: str
    amount_micros: int
    not_after_ms: int


def _ro(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    return conn


class Checker:
    def __init__(self, *, cloud_path: Path, fog_paths: dict[str, Path], limits: dict[str, int]):
        self._cloud = _ro(cloud_path)
        self._fogs = {f: _ro(p) for f, p in fog_paths.items()}
        self._limits = limits
        self.leases: dict[bytes, CloudLease] = {}
        self._lease_booked: dict[bytes, int] = {}  # lease_id -> booked draws (read with the leases)
        # per fog: lease_id -> (drawn, last at_ms, records) from its log
        self._draws: dict[str, dict[bytes, tuple[int, int, int]]] = {f: {} for f in fog_paths}
        self._racced: dict[bytes, str] = {}  # intent id -> origin: a peer acked its batch
        self.lost_fogs: set[str] = set()  # fogs that lost their file (then restored or dead)
        self._lost_before: dict[str, int] = {}
        self.dead_fogs: set[str] = set()
        self.lost_receipts: set[bytes] = set()  # held receipts whose record a disk took
        self.bound_max: int = 0
        self.at_risk_max = 0  # records in no safe batch at one fog, the most seen
        self.replicas = 1  # k: peers that must hold a batch (set by the simulation)
        self.federation = True  # the fogs have peers (replica tables exist)
        self.replicated_of_dead = 0  # records of dead fogs' replicas nobody could book
        self.clone_keys: set[bytes] = set()  # devices whose key a clone uses (set by the sim)
        # peer transfers (18.2): every xfer seen in a fog's file (given or received), what
        # each fog's file says it gave per parent (never shrinks), and what the cloud knows
        self.subs: dict[bytes, SubLease] = {}
        self._given_fog: dict[bytes, int] = {}
        self._given_cloud: dict[bytes, int] = {}
        self._cloud_subs: set[bytes] = set()
        self._subs_received: set[bytes] = set()  # seen in a receiver's file (transfers_in)
        self.double_spenders: set[bytes] = set()  # payers that copy their voucher state
        self.double_spends_caught = 0
        self.sub_rejected: set[bytes] = set()  # intents refused: drawn on an unknown sub-lease
        self.sub_rejected_leases: set[bytes] = set()  # their sub-leases: in escrow for good
        self.force_closed: set[bytes] = set()  # leases the operator's close-leases closed
        self.dead_unbooked = 0  # micros a dead fog drew that no path could book (the most)
        self.d2d_booked = 0
        # early returns (18.1): lease -> (fog, amount, drawn when retired, at fog ms)
        self.returned: dict[bytes, tuple[str, int, int, int]] = {}

    # ---- disk loss (tests/sim/restore.py) --------------------------------------------------

    def racced(self, fog_id: str, number: int) -> None:
        """A peer acked batch ``number`` of ``fog_id``: its records reached a peer."""
        conn = self._fogs.get(fog_id)
        if conn is None:
            return
        for (intent_id,) in conn.execute(
            "SELECT l.intent_id FROM log l JOIN batches b ON l.n >= b.first_index AND "
            "l.n < b.first_index + b.count WHERE b.number = ?",
            (number,),
        ):
            self._racced[bytes(intent_id)] = fog_id

    def disk_lost(self, fog_id: str, *, before_ms: int) -> None:
        """``fog_id``'s file is gone; receipts it signed up to ``before_ms`` (its clock) may
        name records it lost."""
        self._fogs.pop(fog_id).close()
        self.lost_fogs.add(fog_id)
        self._lost_before[fog_id] = before_ms

    def dead(self, fog_id: str) -> None:
        self.dead_fogs.add(fog_id)

    def restored(self, fog_id: str, path: Path) -> None:
        self._fogs[fog_id] = _ro(path)

    def close(self) -> None:
        self._cloud.close()
        for conn in self._fogs.values():
            conn.close()

    # ---- fogs ---------------------------------------------------------------------------

    def fog(self, fog_id: str, revoked_at: dict[bytes, int]) -> list[str]:
        conn = self._fogs.get(fog_id)
        if conn is None:
            return []
        out = []
        draws = {
            bytes(lid): (int(s), int(t), int(c))
            for lid, s, t, c in conn.execute(
                "SELECT lease_id, SUM(amount_micros), MAX(at_ms), COUNT(*) FROM log "
                "GROUP BY lease_id"
            )
        }
        # records of closed leases may be pruned: what was drawn on a lease never shrinks
        seen = self._draws[fog_id]
        for lease_id, (d, t, c) in seen.items():
            if lease_id not in draws or draws[lease_id][0] < d:
                draws[lease_id] = (d, t, c)
        self._draws[fog_id] = draws
        out.extend(self._transfers_at(fog_id, conn))
        out.extend(self._returns_at(fog_id, conn, draws))
        for lease_id, (drawn, last_ms, _) in sorted(draws.items()):
            lease = self.leases.get(lease_id)
            tag = f"{fog_id} lease {lease_id.hex()[:8]}"
            sub = self.subs.get(lease_id)
            if sub is not None and sub.receiver == fog_id:  # a sub-lease (18.2)
                parent = self.leases.get(sub.parent)
                if parent is None or parent.fog_id != sub.giver:
                    out.append(f"{tag}: sub-lease of {sub.parent.hex()[:8]}, not {sub.giver}'s")
                if lease is not None and (lease.fog_id, lease.amount_micros) != (
                    fog_id,
                    sub.amount_micros,
                ):
                    out.append(f"{tag}: the cloud's sub-lease is {lease}, the xfer says {sub}")
                if drawn > sub.amount_micros:
                    out.append(f"{tag}: drawn {drawn} > sub-lease amount {sub.amount_micros}")
                if last_ms > sub.not_after_ms:
                    out.append(f"{tag}: drawn at {last_ms} > sub-lease expiry {sub.not_after_ms}")
                continue
            given = self._given_fog.get(lease_id, 0)
            if lease is not None and given and drawn + given > lease.amount_micros:
                out.append(f"{tag}: drawn {drawn} + given {given} > amount {lease.amount_micros}")
            if lease is None:
                out.append(f"{tag}: drawn on, but the cloud never granted it")
            elif lease.fog_id != fog_id:
                out.append(f"{tag}: drawn on, but granted to {lease.fog_id}")
            else:
                if drawn > lease.amount_micros:
                    out.append(f"{tag}: drawn {drawn} > amount {lease.amount_micros}")
                if last_ms > lease.not_after_ms:
                    out.append(f"{tag}: drawn at {last_ms} > expiry {lease.not_after_ms}")
        (at_risk,) = conn.execute(
            "SELECT (SELECT coalesce(max(n), 0) FROM log) - (SELECT coalesce(max(first_index + "
            "count) - 1, 0) FROM batches) + (SELECT coalesce(sum(count), 0) FROM batches WHERE "
            "acked = 0 AND " + (RACCS_OF_BATCH if self.federation else "0") + " < ?)",
            (self.replicas,),
        ).fetchone()
        self.at_risk_max = max(self.at_risk_max, int(at_risk))
        for device, at_ms in revoked_at.items():
            row = conn.execute("SELECT MAX(at_ms) FROM log WHERE device = ?", (device,)).fetchone()
            if row[0] is not None and int(row[0]) > at_ms:
                out.append(
                    f"{fog_id}: authorized device {device.hex()[:8]} at {row[0]} after storing "
                    f"its revocation at {at_ms}"
                )
        return out

    def _transfers_at(self, fog_id: str, conn: sqlite3.Connection) -> list[str]:
        """Read the fog's transfers (18.2): a sub-lease is credited once, at its amount."""
        out = []
        for x, env, amount in conn.execute(
            "SELECT t.transfer_id, t.envelope, l.amount_micros FROM transfers_in t "
            "LEFT JOIN leases l ON l.lease_id = t.transfer_id"
        ):
            sub = self._sub(bytes(x), bytes(env))
            self._subs_received.add(bytes(x))
            if sub.receiver != fog_id:
                out.append(f"{fog_id}: holds sub-lease {bytes(x).hex()[:8]} for {sub.receiver}")
            if amount is not None and int(amount) != sub.amount_micros:
                out.append(
                    f"{fog_id}: sub-lease {bytes(x).hex()[:8]} credited {amount}, "
                    f"its xfer moved {sub.amount_micros}"
                )
        given: dict[bytes, int] = {}
        for x, env in conn.execute("SELECT transfer_id, envelope FROM transfers_out"):
            sub = self._sub(bytes(x), bytes(env))
            given[sub.parent] = given.get(sub.parent, 0) + sub.amount_micros
        for parent, g in given.items():
            self._given_fog[parent] = max(g, self._given_fog.get(parent, 0))
        return out

    def _sub(self, x: bytes, env: bytes) -> SubLease:
        sub = self.subs.get(x)
        if sub is None:
            t = open_envelope(env, Transfer).msg
            sub = SubLease(
                t.fog_id, t.receiver_id, t.lease_id, t.owner_id, t.amount_micros, t.not_after_ms
            )
            self.subs[x] = sub
        return sub

    def _returns_at(
        self, fog_id: str, conn: sqlite3.Connection, draws: dict[bytes, tuple[int, int, int]]
    ) -> list[str]:
        """A lease given back early (18.1) is never drawn on after its return."""
        out = []
        for lid, amount, drawn, at_ms in conn.execute(
            "SELECT lease_id, amount_micros, drawn_micros, at_ms FROM lease_returns"
        ):
            lease_id = bytes(lid)
            self.returned[lease_id] = (fog_id, int(amount), int(drawn), int(at_ms))
            now_drawn, last_ms, _ = draws.get(lease_id, (0, 0, 0))
            now_drawn += self._given_fog.get(lease_id, 0)
            tag = f"{fog_id} lease {lease_id.hex()[:8]}"
            if now_drawn > int(drawn):
                out.append(f"{tag}: drawn {now_drawn} after its return at {drawn}")
            if last_ms > int(at_ms):
                out.append(f"{tag}: drawn at {last_ms}, returned at {at_ms}")
        return out

    def unsealed(self, fog_id: str) -> int:
        """Log records of ``fog_id`` in no sealed batch yet."""
        conn = self._fogs[fog_id]
        row = conn.execute(
            "SELECT (SELECT coalesce(max(n), 0) FROM log) - "
            "(SELECT coalesce(max(first_index + count) - 1, 0) FROM batches)"
        ).fetchone()
        return max(0, int(row[0]))

    def receipts_durable(self, fog_id: str, held: Sequence[Held]) -> list[str]:
        """Every ok receipt of ``fog_id`` a device holds is a record in the fog's file (a fog
        that lost its disk lost those of its records no peer held: counted)."""
        conn = self._fogs.get(fog_id)
        if conn is None:
            return []
        out = []
        for h in held:
            if h.intent_id in self.lost_receipts:
                continue
            row = conn.execute("SELECT n FROM log WHERE intent_id = ?", (h.intent_id,)).fetchone()
            if row is None and self.booked(h.intent_id):
                continue  # pruned after the cloud acked it
            lost = h.time_ms <= self._lost_before.get(fog_id, -1)
            if lost and (row is None or int(row[0]) != h.log_index):
                self.lost_receipts.add(h.intent_id)  # authorized before the disk died
            elif row is None:
                out.append(f"{fog_id}: receipt n={h.log_index} held, but not in the fog's file")
            elif int(row[0]) != h.log_index:
                out.append(f"{fog_id}: receipt n={h.log_index} held, file says n={row[0]}")
        return out

    def booked(self, intent_id: bytes) -> bool:
        sql = "SELECT 1 FROM transfers WHERE intent_id = ?"
        return self._cloud.execute(sql, (intent_id,)).fetchone() is not None

    def cloned_alarm(self, device: bytes) -> bool:
        """The cloud raised ``cloned_key`` for ``device``."""
        sql = "SELECT 1 FROM alarms WHERE kind = 'cloned_key' AND subject = ?"
        return self._cloud.execute(sql, (device.hex(),)).fetchone() is not None

    def holds_unretired(self, fog_id: str, lease_id: bytes) -> bool:
        """``fog_id``'s file holds ``lease_id`` and its restore did not retire it."""
        conn = self._fogs.get(fog_id)
        if conn is None:
            return False
        held = conn.execute("SELECT 1 FROM leases WHERE lease_id = ?", (lease_id,)).fetchone()
        retired = conn.execute(
            "SELECT 1 FROM lease_reports WHERE lease_id = ? AND drawn_micros < 0", (lease_id,)
        ).fetchone()
        return held is not None and retired is None

    # ---- cloud ----------------------------------------------------------------------------

    async def cloud(self) -> list[str]:
        conn = self._cloud
        self.leases = {
            bytes(r[0]): CloudLease(r[1], r[2], int(r[3]), int(r[4]), r[5])
            for r in conn.execute(
                "SELECT lease_id, owner_id, fog_id, amount_micros, not_after_ms, state FROM leases"
            )
        }
        self._lease_booked = {
            bytes(lid): int(a)
            for lid, a in conn.execute(
                "SELECT lease_id, SUM(amount_micros) FROM transfers GROUP BY lease_id"
            )
        }
        self._given_cloud = {}
        self._cloud_subs = set()
        for x, parent, amount in conn.execute(
            "SELECT transfer_id, parent_id, amount_micros FROM peer_transfers"
        ):
            self._cloud_subs.add(bytes(x))
            p = bytes(parent)
            self._given_cloud[p] = self._given_cloud.get(p, 0) + int(amount)
        out = []
        parents = {p.hex() for p in self._given_fog}
        clones = {k.hex() for k in self.clone_keys}
        alarmed = set()
        sub_rejected = self._rejected_on_subleases()
        for kind, subject, fog_id, detail in conn.execute(
            "SELECT kind, subject, fog_id, detail FROM alarms ORDER BY kind, subject"
        ):
            if kind == "record_rejected" and any(i.hex() in detail for i in sub_rejected):
                continue  # 18.2's known gap: a record drawn on a sub-lease, before its xfer
            if kind == "cloned_key" and subject in clones:  # a cloned key, caught
                alarmed.add(subject)
                continue
            if kind == "voucher_double_spent" and bytes.fromhex(subject) in self.double_spenders:
                continue  # a planted double spend, caught (18.3)
            stuck = {x.hex() for x in self.sub_rejected_leases}
            if kind == "lease_report_mismatch" and subject in parents | stuck:
                continue  # a parent's report before its xfer (18.2): closes when it arrives
            out.append(f"cloud: alarm {kind} from {fog_id} on {subject[:16]}: {detail}")
        # one intent per (device, q), except a cloned key's, which the cloud books and alarms
        for dseq, n in conn.execute(
            "SELECT dseq, COUNT(*) FROM transfers GROUP BY dseq HAVING COUNT(*) > 1"
        ):
            if bytes(dseq)[:32].hex() not in alarmed:
                out.append(f"cloud: {n} intents booked at one (device, q) {bytes(dseq).hex()[:12]}")
        for fog_id, number, position, reason, intent_id in conn.execute(
            "SELECT fog_id, number, position, reason, intent_id FROM rejected "
            "ORDER BY fog_id, number"
        ):
            if intent_id is not None and bytes(intent_id) in sub_rejected:
                continue
            out.append(f"cloud: rejected {fog_id} batch {number} record {position}: {reason}")
        out.extend(self._vouchers())
        tx = ReadTx(conn)
        check = await ledger.check(tx)  # type: ignore[arg-type]
        if not check.ok:
            out.append(f"cloud: ledger does not balance: {check.sums} {check.mismatched[:3]}")
        for owner_id, limit in sorted(self._limits.items()):
            exposure = await cloud_leases.exposure(tx, owner_id)  # type: ignore[arg-type]
            if exposure > limit:
                out.append(f"cloud: owner {owner_id} exposure {exposure} > limit {limit}")
        return out

    def _rejected_on_subleases(self) -> set[bytes]:
        """Records the cloud refused ``unknown_lease`` because they drew on a sub-lease
        whose ``xfer`` had not reached it yet (the fog sends the ``xfer`` up before its
        batches, but this network loses and reorders single messages): docs/protocol.md 18.2
        says an operator re-books them; the simulator counts them and leaves them out of the
        liveness checks."""
        out = set()
        for (intent_id,) in self._cloud.execute(
            "SELECT intent_id FROM rejected WHERE reason = 'unknown_lease' AND intent_id IS "
            "NOT NULL"
        ):
            i = bytes(intent_id)
            for fconn in self._fogs.values():
                row = fconn.execute("SELECT lease_id FROM log WHERE intent_id = ?", (i,)).fetchone()
                if row is not None and bytes(row[0]) in self.subs:
                    out.add(i)
                    self.sub_rejected_leases.add(bytes(row[0]))
        self.sub_rejected |= out
        return out

    def _vouchers(self) -> list[str]:
        """18.3: what is booked against a voucher never exceeds it, and a second payment at
        one (voucher, s) is booked only for a double spender, with its alarm."""
        conn, out = self._cloud, []
        for vid, amount, spent, paid in conn.execute(
            "SELECT v.voucher_id, v.amount_micros, v.spent_micros, (SELECT coalesce(sum("
            "p.amount_micros), 0) FROM voucher_payments p WHERE p.voucher_id = v.voucher_id) "
            "FROM vouchers v"
        ):
            tag = f"cloud: voucher {bytes(vid).hex()[:8]}"
            if int(paid) > int(amount):
                out.append(f"{tag}: booked {paid} > its amount {amount}")
            if int(paid) != int(spent):
                out.append(f"{tag}: payments {paid}, spent {spent}")
        for vid, seq, n, device in conn.execute(
            "SELECT p.voucher_id, p.seq, COUNT(*), v.device FROM voucher_payments p JOIN "
            "vouchers v ON v.voucher_id = p.voucher_id GROUP BY p.voucher_id, p.seq, v.device "
            "HAVING COUNT(*) > 1"
        ):
            alarm = conn.execute(
                "SELECT 1 FROM alarms WHERE kind = 'voucher_double_spent' AND subject = ?",
                (bytes(device).hex(),),
            ).fetchone()
            if bytes(device) not in self.double_spenders or alarm is None:
                out.append(
                    f"cloud: voucher {bytes(vid).hex()[:8]}: {n} payments booked at s={seq}"
                    + ("" if alarm else ", no alarm")
                )
        return out

    def d2d_settled(self, devices: Sequence[SimDevice], double: set[bytes]) -> list[str]:
        """After the heal: every payment a payee accepted is booked once, or refused
        ``voucher_overspent`` when its payer double-spent; a double spend that reached the
        cloud (two accepted payments at one (voucher, s)) raised ``voucher_double_spent`` and
        revoked the payer's device."""
        conn, out = self._cloud, []
        booked = {
            bytes(p): int(a)
            for p, a in conn.execute("SELECT payment_id, amount_micros FROM voucher_payments")
        }
        payer_of = {s.payment_id: d for d in devices for s in d.d2d_signed}
        at: dict[tuple[bytes, int], set[bytes]] = {}
        for d in devices:
            for s in d.d2d_signed:
                at.setdefault((s.voucher_id, s.seq), set()).add(s.payment_id)
        accepted = {pid for d in devices for pid in d.d2d_in}
        for d in devices:
            for pid in d.d2d_in:
                payer = payer_of.get(pid)
                fault = d.faults.get(pid)
                if pid in booked:
                    continue
                if payer is not None and payer.public in double and fault == "voucher_overspent":
                    continue  # the loss of the payee that handed in last
                out.append(f"{d.name}: d2d payment {pid.hex()[:8]} never booked ({fault})")
        for d in devices:
            if d.public not in double:
                continue
            spent_twice = any(
                len(pids & accepted) > 1
                for (v, _), pids in at.items()
                if payer_of.get(next(iter(pids))) is d
            )
            if not spent_twice:
                continue
            alarm = conn.execute(
                "SELECT 1 FROM alarms WHERE kind = 'voucher_double_spent' AND subject = ?",
                (d.public.hex(),),
            ).fetchone()
            revoked = conn.execute(
                "SELECT 1 FROM revocations WHERE key = ?", (d.public,)
            ).fetchone()
            if alarm is None or revoked is None:
                out.append(f"{d.name}: spent a voucher twice, alarm {alarm}, revoked {revoked}")
            else:
                self.double_spends_caught += 1
        self.d2d_booked = len(booked)
        return out

    def owners(self) -> list[str]:
        """Ground truth across all fogs: outstanding + drawn within each owner's limit."""
        drawn: dict[bytes, int] = {}
        for per_fog in self._draws.values():
            for lease_id, (d, _, _) in per_fog.items():
                drawn[lease_id] = drawn.get(lease_id, 0) + d
        total: dict[str, int] = {}
        for lease_id, lease in self.leases.items():
            d = drawn.get(lease_id, 0)
            a = lease.amount_micros - self._given_cloud.get(lease_id, 0)  # 18.2: moved away
            held = max(a, d) if lease.state == cloud_leases.STATE_OPEN else d
            total[lease.owner_id] = total.get(lease.owner_id, 0) + held
        out = [
            f"owner {o}: leases outstanding + drawn {t} > limit {self._limits[o]}"
            for o, t in sorted(total.items())
            if t > self._limits[o]
        ]
        return out + self.bound(drawn)

    def bound(self, drawn: dict[bytes, int]) -> list[str]:
        """The partition bound (docs/protocol.md 17.9), its lease term: per owner, what the
        fogs authorized that the cloud has not booked is at most the sum over the owner's
        open leases of max(0, amount - booked). Draws on a closed lease are all booked (a
        lease closes when its report's u equals the booked draws)."""
        unbooked: dict[str, int] = {}
        term: dict[str, int] = {}
        for lease_id, lease in self.leases.items():
            booked = self._lease_booked.get(lease_id, 0)
            o = lease.owner_id
            lost = max(0, drawn.get(lease_id, 0) - booked)
            if lease_id in self.force_closed:
                # closed by close-leases after the devices' uploads: what the lost disk took
                # (or a dead fog drew beyond its lost chain head) with the receipt lost on
                # the local link, which no path can book, is counted, not a violation
                self.dead_unbooked = max(self.dead_unbooked, lost)
                continue
            unbooked[o] = unbooked.get(o, 0) + lost
            if lease.state == cloud_leases.STATE_OPEN:  # 18.4: a parent less what it gave
                given = self._given_cloud.get(lease_id, 0)
                term[o] = term.get(o, 0) + max(0, lease.amount_micros - given - booked)
        for x, sub in self.subs.items():  # drawn on sub-leases the cloud does not know yet
            if x not in self.leases:
                o = sub.owner_id
                unbooked[o] = unbooked.get(o, 0) + drawn.get(x, 0)
        out = []
        for o, u in sorted(unbooked.items()):
            self.bound_max = max(self.bound_max, u)
            if u > term.get(o, 0):
                out.append(f"owner {o}: authorized, not booked {u} > bound {term.get(o, 0)}")
        return out

    # ---- after the heal phase --------------------------------------------------------------

    def converged(self, devices: Sequence[SimDevice], *, now_ms: int) -> list[str]:
        """After the heal and the devices' held uploads: every ok receipt a device holds is
        booked (once: the intent id is the transfers' key), with its fog and amount, whatever
        path brought it (its fog's batch, a relay, the device's upload); every record of every
        fog's log is booked from its fog's chain (batch number > 0: an upload does not excuse
        a batch that never arrived)."""
        conn = self._cloud
        booked = {
            bytes(i): (f, int(a), int(b))
            for i, f, a, b in conn.execute(
                "SELECT intent_id, fog_id, amount_micros, number FROM transfers"
            )
        }
        out = []
        for dev in devices:
            for h in dev.held.values():
                b = booked.get(h.intent_id)
                fault = dev.faults.get(h.intent_id)
                if b is None and h.intent_id in self.sub_rejected:
                    continue
                if b is None:
                    why = f" (upload refused: {fault})" if fault else ""
                    out.append(
                        f"{dev.name}: ok receipt {h.fog_id} n={h.log_index} never booked{why}"
                    )
                elif b[:2] != (h.fog_id, h.amount_micros):
                    out.append(f"{dev.name}: receipt {h.fog_id} n={h.log_index} booked as {b}")
        for fog_id, fconn in sorted(self._fogs.items()):  # pruned records were acked
            for n, intent_id in fconn.execute("SELECT n, intent_id FROM log ORDER BY n"):
                got = booked.get(bytes(intent_id))
                if got is None and bytes(intent_id) in self.sub_rejected:
                    continue
                if got is None:
                    out.append(f"{fog_id}: log record n={n} never booked")
                elif got[2] == 0 and bytes(intent_id) not in self.sub_rejected:
                    out.append(f"{fog_id}: log record n={n} booked only from a device's upload")
        # what reached a peer is never lost: acked by a peer, or held as a replica
        replicated = dict(self._racced)
        for fconn in self._fogs.values() if self.federation else ():
            for origin, wire in fconn.execute("SELECT origin, wire FROM replicas"):
                for intent_id in _intent_ids(bytes(wire)):
                    replicated.setdefault(intent_id, str(origin))
        for intent_id, origin in sorted(replicated.items()):
            if intent_id in booked:
                continue
            if origin in self.dead_fogs:  # beyond its lost chain head: devices upload those
                self.replicated_of_dead += 1
                continue
            out.append(f"{origin}: record {intent_id.hex()[:8]} reached a peer, never booked")
        for x, sub in sorted(self.subs.items()):  # 18.2: the cloud reconciled every transfer
            if x not in self._cloud_subs and sub.giver in self.lost_fogs:
                # ... that reached anyone: a giver whose disk went before any copy of its xfer
                # arrived (the copies in flight dropped) took the transfer with it; no fog can
                # draw on it, and the parent closes at its booked draws (seed 170027)
                if x not in self._subs_received:
                    continue
            if x not in self._cloud_subs:
                out.append(f"cloud: transfer {x.hex()[:8]} {sub.giver}->{sub.receiver} unknown")
        for lease_id, (fog_id, _, drawn, _) in sorted(self.returned.items()):  # 18.1
            lease = self.leases.get(lease_id)
            row = self._cloud.execute(
                "SELECT reported_micros FROM leases WHERE lease_id = ?", (lease_id,)
            ).fetchone()
            if lease is None or lease.state == cloud_leases.STATE_OPEN:
                out.append(f"{fog_id}: lease {lease_id.hex()[:8]} returned, open at the cloud")
            elif fog_id not in self.lost_fogs and (row is None or row[0] != drawn):
                out.append(
                    f"{fog_id}: lease {lease_id.hex()[:8]} returned at {drawn}, closed at "
                    f"{None if row is None else row[0]}"
                )
        for lease_id in self.stranded(now_ms=now_ms, known=True, exempt=False):
            lease = self.leases[lease_id]
            out.append(f"cloud: lease {lease_id.hex()[:8]} of {lease.fog_id} expired, open")
        return out

    def budget_returned(self) -> int:
        """Micros given back early (18.1) and closed at the cloud: amount - drawn."""
        total = 0
        for lease_id, (_, amount, drawn, _) in self.returned.items():
            lease = self.leases.get(lease_id)
            if lease is not None and lease.state != cloud_leases.STATE_OPEN:
                total += max(0, amount - drawn)
        return total

    def transfers_at_cloud(self) -> int:
        return len(self._cloud_subs)

    def stranded(self, *, now_ms: int, known: bool, exempt: bool) -> list[bytes]:
        """Expired leases still open at the cloud, whose fog holds them (``known``: the fog
        should have reported them) or never stored them (it got the lease only after its
        expiry, and a fog refuses expired material: nothing will ever report it).
        ``exempt``: before the operator's close-leases, the leases of a dead fog and those
        a restore retired are left out (no fog will report them); after it, none is."""
        out = []
        for lease_id, lease in sorted(self.leases.items()):
            if lease.state != cloud_leases.STATE_OPEN or lease.not_after_ms >= now_ms:
                continue
            if lease_id in self.sub_rejected_leases:
                continue  # its report names a draw the cloud refused: escrow, for an operator
            fconn = self._fogs.get(lease.fog_id)
            if fconn is None or lease.fog_id in self.dead_fogs:
                if not exempt and not known:
                    out.append(lease_id)  # close-leases should have closed it
                continue
            retired = fconn.execute(
                "SELECT 1 FROM lease_reports WHERE lease_id = ? AND drawn_micros < 0",
                (lease_id,),
            ).fetchone()
            if retired is not None:
                if not exempt and not known:
                    out.append(lease_id)  # close-leases should have closed it
                continue  # retired by a restore: the cloud closes it from booked evidence
            row = fconn.execute("SELECT 1 FROM leases WHERE lease_id = ?", (lease_id,)).fetchone()
            if (row is not None) == known:
                out.append(lease_id)
        return out


def _intent_ids(wire: bytes) -> list[bytes]:
    """The intent ids of a batch's records (the wire was verified before it was stored)."""
    _, records = decode_batch(wire)
    out = []
    for record in records:
        intent_env, _ = decode_record(record)
        env = split_envelope(intent_env, bytes_max=Intent.ENVELOPE_BYTES_MAX)
        out.append(message_id(Intent.TYPE, env.body))
    return out
