"""``fogpay`` console script.

Each package contributes its subcommands through a module with
``register(subparsers) -> None``; every subparser sets ``func(args) -> int``. Keeping the
dispatcher this thin lets protocol/, edge/, fog/ and cloud/ own their commands.
"""

import argparse
import importlib
import sys
from collections.abc import Sequence

COMMAND_MODULES = (
    "fogpay.keys_cli",
    "fogpay.provision",
    "fog.cli",
    "fogpay.edge_cli",
    "cloud.cli_commands",
    "fogpay.sandbox",
    "fogpay.demo",
    "fogpay.status",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fogpay",
        description="fogpay: machine-to-machine micropayments at the edge "
        "(devices, fog, cloud, settlement).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:  # a real missing dependency inside the module
                raise
            continue
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    rc: int = args.func(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
