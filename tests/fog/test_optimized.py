"""The fog under ``python -O`` (or PYTHONOPTIMIZE=1 in a unit's environment) records what it
authorizes, as without it.

``-O`` strips ``assert`` statements. The group's log INSERT used to sit inside one
(``fog/group.py``), so an optimized fog signed ok receipts for intents it never wrote to its
log and drew nothing on the lease: the simulator under ``-O`` showed "receipt held, but not in
the fog's file" in every seed. The money checks of a group are plain ``raise``s now.
"""

import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Final

ROOT: Final = Path(__file__).resolve().parents[2]
PAYMENTS: Final = 3
AMOUNT: Final = 1_000_000

SCRIPT: Final = f"""
import sys
from pathlib import Path
from tests.fog.world import World
if __debug__:
    sys.exit("not optimized")
w = World(Path(sys.argv[1]))
owner = w.owner()
dev = w.device(owner)
w.lease()
statuses = [w.pay(dev, seq, {AMOUNT}).status for seq in range(1, {PAYMENTS + 1})]
w.store.close()
print(",".join(statuses))
"""


def test_an_optimized_fog_logs_and_draws_what_it_authorizes(tmp_path: Path) -> None:
    db = tmp_path / "fog.db"
    done = subprocess.run(
        [sys.executable, "-O", "-c", SCRIPT, str(db)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.split() == [",".join(["ok"] * PAYMENTS)]
    conn = sqlite3.connect(db)
    try:
        logged = conn.execute("SELECT count(*), sum(amount_micros) FROM log").fetchone()
        drawn = conn.execute("SELECT sum(drawn_micros) FROM leases").fetchone()
    finally:
        conn.close()
    assert logged == (PAYMENTS, PAYMENTS * AMOUNT)
    assert drawn == (PAYMENTS * AMOUNT,)
