"""``fogpay demo``: the main job of the README. Replaced as the fog and the cloud land."""

import argparse


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("demo", help="run a cloud, a fog and simulated devices; print a summary")
    p.add_argument("--out", default="demo-out", help="directory for the demo's output")
    p.add_argument("--seconds", type=float, default=10.0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    print("fogpay demo: not yet: the fog daemon and the cloud aggregator are not built yet")
    return 0
