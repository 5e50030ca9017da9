"""The fog's resident memory, process by process: idle, then with 10,000 bound devices.

    .venv/bin/python bench/memory.py [--json] [--no-crowd] [--fog-toml LINES]
                                     [--fog-broker-toml LINES] [--keep DIR]

Starts ``fogpay fog run`` with its embedded amqtt broker (the default of ``fogpay sandbox``:
the broker in a child process, the core in another), waits until it is connected, and reads
every process of the fog from /proc: RSS (what issue 15's bar counts), PSS (shared pages
divided among the processes sharing them) and USS (pages of that process alone), from
``/proc/PID/smaps_rollup``. Then the same with a database of 10,000 bound devices and 1,000
owners (one lease each; built as ``bench/fog.py`` builds it), idle after start and again after
every device paid once, as fast as receipts come back (at most ``PAY_S_MAX``; the fog's caches
then hold them all; ``paid`` says how many did); the larger total is the figure
``rss_mb_10k_devices`` of ``bench/fog.py``.

``--fog-toml``/``--fog-broker-toml`` add lines to the fog's configuration (A/B runs: e.g.
``--fog-broker-toml 'process = false'``; the one-process fog: ``--fog-toml 'store_process =
false' --fog-broker-toml $'process = false\nhandoff = true'``). The machine is shared: run the
variants back to back.
"""

import argparse
import asyncio
import contextlib
import importlib.util
import json
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE))
sys.path.insert(0, str(_HERE.parent))

import loadgen  # noqa: E402  (found through the path above)

_spec = importlib.util.spec_from_file_location("bench_fog", _HERE / "fog.py")
assert _spec is not None and _spec.loader is not None
bench_fog = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_fog)

SETTLE_S = 2.0
PAY_WINDOW = 1000  # intents outstanding while the crowd pays
PAY_S_MAX = 120.0  # bounded: on a loaded machine not every device may have paid by then


def _name(pid: int) -> str:
    """What the process is: the fog's daemon, its core child or its broker child."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    words = [a.decode(errors="replace") for a in argv if a]
    if "-m" in words:
        return words[words.index("-m") + 1]  # fog.storeproc, fog.brokerchild
    return "daemon" if any(w.endswith("fogpay") for w in words) else " ".join(words[:2])


def breakdown(pids: list[int]) -> list[dict[str, Any]]:
    """Every process of ``pids`` and their descendants: name, pid, RSS, PSS, USS (MB)."""
    out = []
    for top in pids:
        for pid in bench_fog._tree(top):
            fields: dict[str, int] = {}
            try:
                for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
                    key, value = line.split(":", 1)
                    fields[key] = int(value.split()[0])
            except (OSError, ValueError):
                continue  # gone meanwhile
            uss = fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)
            out.append(
                {
                    "process": _name(pid),
                    "pid": pid,
                    "rss_mb": round(fields.get("Rss", 0) / 1024, 1),
                    "pss_mb": round(fields.get("Pss", 0) / 1024, 1),
                    "uss_mb": round(uss / 1024, 1),
                }
            )
    return out


def totals(rows: list[dict[str, Any]]) -> dict[str, float]:
    return {k: round(sum(r[k] for r in rows), 1) for k in ("rss_mb", "pss_mb", "uss_mb")}


def measure(world: Any, d: Path, *, crowd: bool, devices: int, owners: int) -> dict[str, Any]:
    d.mkdir(parents=True)
    password = secrets.token_hex(8)
    port = bench_fog.free_port()
    db = d / "fog.sqlite"
    shots: list[loadgen.Shot] = []
    if crowd:
        shots = bench_fog.provision_crowd(world, db, devices, owners)
    else:
        world.provision(db)
    cfg = world.fog_config(db, broker_url=None, port=port, password=password)
    fog_run = [str(bench_fog.VENV_BIN / "fogpay"), "fog", "run", "--config", str(cfg)]
    out: dict[str, Any] = {}
    with bench_fog.process(fog_run, d / "fog.log") as p:
        bench_fog.wait_port(port)
        bench_fog.wait_fog_ready(d / "fog.log", p)
        time.sleep(SETTLE_S)
        out["idle"] = breakdown([p.pid])
        if shots:
            paid = asyncio.run(
                loadgen.run(
                    "127.0.0.1",
                    port,
                    bench_fog.FOG_ID,
                    shots,
                    rate=None,  # as fast as receipts come back, so that every device pays
                    window=PAY_WINDOW,
                    duration_s=PAY_S_MAX,
                    username="device",
                    password=password,
                )
            )
            time.sleep(1.0)
            out["after_paying"] = breakdown([p.pid])
            out["statuses"] = dict(paid.statuses)
            out["paid"] = {"sent": paid.sent, "received": paid.received}
    return out


def show(title: str, rows: list[dict[str, Any]]) -> str:
    lines = [f"{title}:", f"  {'process':<16}{'pid':>8}{'RSS MB':>9}{'PSS MB':>9}{'USS MB':>9}"]
    for r in rows:
        lines.append(
            f"  {r['process']:<16}{r['pid']:>8}{r['rss_mb']:>9}{r['pss_mb']:>9}{r['uss_mb']:>9}"
        )
    t = totals(rows)
    lines.append(f"  {'all':<16}{'':>8}{t['rss_mb']:>9}{t['pss_mb']:>9}{t['uss_mb']:>9}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--no-crowd", action="store_true", help="only the idle fog")
    ap.add_argument("--devices", type=int, default=bench_fog.CROWD_DEVICES)
    ap.add_argument("--owners", type=int, default=bench_fog.CROWD_OWNERS)
    ap.add_argument("--fog-toml", default="", metavar="LINES")
    ap.add_argument("--fog-broker-toml", default="", metavar="LINES")
    ap.add_argument("--keep", metavar="DIR", help="work in DIR and keep it")
    args = ap.parse_args()
    with contextlib.ExitStack() as stack:
        if args.keep:
            tmp = Path(args.keep)
            tmp.mkdir(parents=True, exist_ok=False)
        else:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fogpay-mem-")))
        world = bench_fog.World(tmp, 20)
        world.fog_toml = args.fog_toml
        world.fog_broker_toml = args.fog_broker_toml
        idle = measure(world, tmp / "idle", crowd=False, devices=0, owners=0)["idle"]
        crowd: dict[str, Any] = {}
        if not args.no_crowd:
            crowd = measure(
                world, tmp / "crowd", crowd=True, devices=args.devices, owners=args.owners
            )
    summary: dict[str, Any] = {"rss_mb_idle": totals(idle)["rss_mb"], "idle": idle}
    if crowd:
        summary["rss_mb_10k_devices"] = max(
            totals(crowd["idle"])["rss_mb"], totals(crowd["after_paying"])["rss_mb"]
        )
        summary["crowd"] = crowd
    if args.json:
        print(json.dumps(summary))
        return 0
    print(show("idle", idle))
    if crowd:
        print(show(f"{args.devices} devices, {args.owners} owners, idle", crowd["idle"]))
        print(show("after every device paid once", crowd["after_paying"]))
        print(f"  statuses: {crowd['statuses']}; {crowd['paid']}")
    print()
    print(f"rss_mb_idle {summary['rss_mb_idle']} (bar < 60)", end="")
    if crowd:
        print(f"; rss_mb_10k_devices {summary['rss_mb_10k_devices']} (bar < 80)")
    else:
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
