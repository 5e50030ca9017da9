"""SIGKILL a real second process mid-group: the group is one transaction, durable on return."""

import subprocess
import sys
from pathlib import Path

import msgpack
import nacl.signing

from fog.store import Arrival
from protocol.messages import Receipt
from protocol.signing import open_envelope, public_key
from tests.fog.world import NOW, World

ROOT = Path(__file__).resolve().parents[2]
CHILD_TIMEOUT_S = 60
Group = list[tuple[bytes, bytes]]


def prepare(world: World, devices: int, amount: int) -> list[nacl.signing.SigningKey]:
    owner = world.owner()
    world.lease(amount=amount)
    return [world.device(owner) for _ in range(devices)]


def spawn(world: World, mode: str, groups: list[Group]) -> subprocess.Popen[str]:
    world.store.close()
    spec = {
        "db": str(world.path),
        "fog_id": world.fog_id,
        "fog_seed": bytes(world.fog_key),
        "issuer": public_key(world.issuer),
        "mode": mode,
        "groups": groups,
    }
    spec_path = world.path.with_suffix(".spec")
    spec_path.write_bytes(msgpack.packb(spec, use_bin_type=True))
    return subprocess.Popen(
        [sys.executable, "-m", "tests.fog.crash_child", str(spec_path)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )


def run_to_death(world: World, mode: str, groups: list[Group]) -> list[tuple[str, bytes]]:
    child = spawn(world, mode, groups)
    out, _ = child.communicate(timeout=CHILD_TIMEOUT_S)
    assert child.returncode == -9
    world.store = world.open()
    return [(s, bytes.fromhex(h)) for s, h in (line.split() for line in out.splitlines())]


def group(world: World, devs: list[nacl.signing.SigningKey], seq: int, amount: int) -> Group:
    return [(public_key(d), world.intent(d, seq, amount)) for d in devs]


def test_killed_at_commit_leaves_nothing(world: World) -> None:
    devs = prepare(world, 5, 10_000_000)
    g = group(world, devs, 1, 1_000_000)
    before = world.money_dump()
    published = run_to_death(world, "kill_at_commit", [g])
    assert published == []  # no receipt left: the group never committed
    assert world.money_dump() == before
    out = world.store.process([Arrival(d, p) for d, p in g], now_ms=NOW)
    assert [o.log_index for o in out] == [1, 2, 3, 4, 5]  # authorized once, now


def test_killed_after_commit_keeps_every_published_receipt(world: World) -> None:
    devs = prepare(world, 4, 10_000_000)
    groups = [group(world, devs, q, 1_000_000) for q in (1, 2, 3)]
    published = run_to_death(world, "kill_after", groups)
    assert [s for s, _ in published] == ["ok"] * 10 + ["declined"] * 2
    flat = [a for g in groups for a in g]
    again = world.store.process([Arrival(d, p) for d, p in flat], now_ms=NOW + 1)
    for (status, receipt), o in zip(published, again, strict=True):
        if status == "ok":
            assert o.replay and o.receipt == receipt
        else:
            assert not o.replay and o.reason is not None
    assert world.drawn() == {bytes(15) + b"\x01": (10_000_000, 10_000_000)}


def test_killed_at_random_points_loses_no_receipt_and_never_overdraws(world: World) -> None:
    devs = prepare(world, 8, 50_000_000)
    groups = [group(world, devs, q, 700_000) for q in range(1, 13)]
    child = spawn(world, "loop", groups)
    assert child.stdout is not None
    published: list[tuple[str, bytes]] = []
    for _ in range(5 * 8):  # kill somewhere in the middle of the run
        line = child.stdout.readline()
        if not line:
            break
        status, receipt = line.split()
        published.append((status, bytes.fromhex(receipt)))
    child.kill()
    child.communicate(timeout=CHILD_TIMEOUT_S)
    world.store = world.open()
    ok = [r for s, r in published if s == "ok"]
    assert len(ok) == len(published) == 40
    flat = [a for g in groups for a in g]
    again = world.store.process([Arrival(d, p) for d, p in flat], now_ms=NOW + 1)
    replayed = {o.receipt for o in again if o.replay}
    assert set(ok) <= replayed  # every receipt that left is in the log, byte for byte
    receipts = [open_envelope(o.receipt, Receipt).msg for o in again if o.status == "ok"]
    assert sorted(r.log_index or 0 for r in receipts) == list(range(1, len(receipts) + 1))
    assert len({(r.device, r.seq) for r in receipts}) == len(receipts)
    [(amount, drawn)] = world.drawn().values()
    assert drawn == 700_000 * len(receipts) <= amount


def test_killed_at_seal_commit_seals_nothing_half_way(world: World) -> None:
    devs = prepare(world, 5, 10_000_000)
    published = run_to_death(world, "kill_at_seal_commit", [group(world, devs, 1, 1_000_000)])
    assert len(published) == 5
    assert world.store.unacked_batches() == []
    sealed = world.store.seal_due(now_ms=NOW, records_max=2, age_ms=0)
    assert [(b.number, b.first_index) for b in sealed] == [(1, 1), (2, 3), (3, 5)]
