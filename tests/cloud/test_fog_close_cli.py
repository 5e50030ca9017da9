"""``fogpay cloud fog close-leases`` and the partition bound in ``fogpay cloud owner show``
(docs/cloud.md), over a real SQLite file and a real PostgreSQL database: a lost fog's leases
close at their booked draws, their retained topics go, the unused part returns to the owner,
and a draw that arrives later is still booked, on the closed lease."""

import time
from pathlib import Path

from protocol.messages import Binding
from protocol.signing import open_envelope, possession_proof, public_key, seal
from tests.cloud.test_cli import Cli, cli  # noqa: F401 (the fixture)
from tests.cloud.world import FogLog, new_key

LIMIT = 5_000_000
DAY = 10_000_000


def setup(cli: Cli) -> tuple[FogLog, object, int]:  # noqa: F811
    cli.run("init")
    alice, fog_key, device = new_key(), new_key(), new_key()
    for owner, key, limit in (("alice", alice, LIMIT), ("shop", new_key(), 0)):
        cli.run(
            "owner", "add", owner, "--key", public_key(key).hex(), "--limit", str(limit),
            "--currency", "EUR", "--funding", f"card:tok_{owner}",
        )  # fmt: skip
    cli.run("fog", "add", "fog-a", "--key", public_key(fog_key).hex())
    t = time.time_ns() // 1_000_000
    binding = seal(
        Binding(
            device=public_key(device),
            owner_id="alice",
            not_before_ms=t - 10**9,
            not_after_ms=t + 10**12,
            currency="EUR",
            tx_max_micros=10**6,
            day_max_micros=DAY,
        ),
        alice,
    )
    proof = possession_proof(device, open_envelope(binding, Binding).body)
    cli.run("device", "bind", "--binding", binding.hex(), "--proof", proof.hex())
    return FogLog("fog-a", fog_key), device, t


def test_close_leases_of_a_lost_fog(cli: Cli, tmp_path: Path) -> None:  # noqa: F811
    fog, device, t = setup(cli)
    lease = cli.run("lease", "grant", "alice", "fog-a", "2000000")
    lease_id = bytes.fromhex(lease["lease_id"])
    records = [
        fog.authorize(device, seq=q, lease_id=lease_id, amount=12_345, payee="shop", t=t)  # type: ignore[arg-type]
        for q in (1, 2, 3)
    ]
    (tmp_path / "b1").write_bytes(fog.cut(records, t=t))
    cli.run("ingest", str(tmp_path / "b1"))
    shown = cli.run("owner", "show", "alice")
    # by hand: lease term 2,000,000 - 3 x 12,345; day term 1 fog x 1 device x 10 EUR x D,
    # D = floor(1 h / 1 day) + 2 = 2
    assert shown["partition_bound"] == {
        "micros": 2_000_000 - 37_035,
        "lease_term_micros": 1_962_965,
        "day_term_micros": 1 * DAY * 2,
        "days": 2,
        "fogs": 1,
        "devices": 1,
        "lease_life_ms": 3_600_000,
    }
    assert shown["exposure_micros"] == 2_000_000

    # without --yes: shown, nothing closed
    dry = cli.run("fog", "close-leases", "fog-a")
    assert dry["closed"] is False and dry["returned"] == {"alice": {"EUR": 1_962_965}}
    assert cli.run("lease", "list", "alice")[0]["state"] == "open"
    out = cli.run("fog", "close-leases", "fog-a", "--yes", process=True)
    assert out["closed"] is True
    [closed] = out["leases"]
    assert (closed["lease_id"], closed["drawn_micros"], closed["returned_micros"]) == (
        lease["lease_id"],
        37_035,
        1_962_965,
    )
    [listed] = cli.run("lease", "list", "alice")
    assert (listed["state"], listed["reported_micros"]) == ("closed", 37_035)
    shown = cli.run("owner", "show", "alice")
    assert shown["exposure_micros"] == 37_035  # booked draws on a closed lease, unsettled
    assert shown["partition_bound"]["micros"] == 0  # no open lease: nothing unseen
    assert cli.run("fog", "close-leases", "fog-a", "--yes")["leases"] == []  # idempotent

    # a draw that reaches the cloud later (a relay, an upload) is booked on the closed lease
    late = fog.authorize(device, seq=4, lease_id=lease_id, amount=1_000, payee="shop", t=t)  # type: ignore[arg-type]
    (tmp_path / "b2").write_bytes(fog.cut([late], t=t))
    assert cli.run("ingest", str(tmp_path / "b2"))[0]["booked"] == 1
    assert cli.run("lease", "list", "alice")[0]["drawn_micros"] == 38_035
    assert cli.run("owner", "show", "alice")["exposure_micros"] == 38_035
    assert cli.run("alarms") == []  # before na: not late
    assert cli.run("check")["ok"]


def test_close_leases_of_an_unknown_fog_is_one_line(cli: Cli) -> None:  # noqa: F811
    cli.run("init")
    err = cli.run("fog", "close-leases", "fog-z", "--yes", rc=1)
    assert "no fog 'fog-z'" in err
