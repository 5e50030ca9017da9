"""The fuzz campaign as a command, printing its figures as JSON:

    .venv/bin/python -m tests.faults.fuzz --count 100000 --broker-count 20000 --seed 1

``--count`` payloads against the decoders (fast and reference, ``tests/faults/decoders.py``),
then ``--broker-count`` payloads through Mosquitto against a running fog process
(``tests/faults/fogfuzz.py``; 0 skips it). Exit status 1 if anything failed: a crash, a
disagreement, an unanswered payload, a wrong answer, a state change, the fog exiting.
"""

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path

from tests.faults import decoders, fogfuzz


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.faults.fuzz")
    parser.add_argument("--count", type=int, default=100_000, help="payloads at the decoders")
    parser.add_argument("--broker-count", type=int, default=2_000, help="payloads at the fog")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    out: dict[str, object] = {"seed": args.seed}
    ok = True
    if args.count:
        d = decoders.run(args.count, seed=args.seed).as_dict()
        out["decoders"] = d
        ok = ok and d["crashes"] == 0 and d["disagreements"] == 0
    if args.broker_count:
        with tempfile.TemporaryDirectory(prefix="fogpay-fuzz-") as tmp:
            f = asyncio.run(fogfuzz.run(Path(tmp), args.broker_count, seed=args.seed))
        fd = f.as_dict()
        fd["fog_counters"] = f.counters
        out["fog"] = fd
        ok = ok and fog_ok(f)
    out["ok"] = ok
    print(json.dumps(out, indent=1))
    return 0 if ok else 1


def fog_ok(f: fogfuzz.FogFigures) -> bool:
    return (
        not f.fog_exited
        and f.unanswered == 0
        and f.answered == f.answerable
        and not f.wrong_answers
        and not f.state_errors
        and f.rogue_binding_inert
    )


if __name__ == "__main__":
    sys.exit(main())
