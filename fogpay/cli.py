"""``fogpay`` console script.

Each package contributes its subcommands through a module with
``register(subparsers) -> None``; every subparser sets ``func(args) -> int``. Keeping the
dispatcher this thin lets protocol/, edge/, fog/ and cloud/ own their commands.

The conventions every command follows (``runtime.cli``): exit 0 done, 1 failed or refused,
2 usage or configuration error; an error is one line ``fogpay: <what>: <why>`` on stderr.
Commands report their own errors; ``main`` is the net below them for an operating error one
of them let through, so that it too is one line and not a traceback (a bug still is one).
"""

import argparse
import importlib
import importlib.metadata
import sys
from collections.abc import Sequence
from typing import Final

import aiomqtt

from cloud.backends import StoreOpenError as CloudStoreOpenError
from cloud.config import ConfigError as CloudConfigError
from fog.config import ConfigError as FogConfigError
from fog.schema import StoreOpenError as FogStoreOpenError
from protocol.errors import FogpayError
from runtime.cli import fail, report
from runtime.keyfile import KeyFileError

COMMAND_MODULES = (
    "fogpay.keys_cli",
    "fogpay.certs",
    "fogpay.provision",
    "fog.cli",
    "fogpay.edge_cli",
    "cloud.cli_commands",
    "fogpay.sandbox",
    "fogpay.demo",
    "fogpay.status",
)
USAGE_ERRORS: Final = (CloudConfigError, CloudStoreOpenError, FogConfigError, FogStoreOpenError)
OPERATING_ERRORS: Final = (FogpayError, KeyFileError, OSError, aiomqtt.MqttError)
EXIT_INTERRUPTED: Final = 130  # 128 + SIGINT, as a shell reports it


def version() -> str:
    try:
        return importlib.metadata.version("fogpay")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout, not installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fogpay",
        description="fogpay: machine-to-machine micropayments at the edge "
        "(devices, fog, cloud, settlement).",
        epilog="exit codes: 0 done, 1 failed or refused, 2 usage or configuration error",
    )
    parser.add_argument("--version", action="version", version=f"fogpay {version()}")
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
    try:
        rc: int = args.func(args)
    except OPERATING_ERRORS as exc:
        return report(getattr(args, "command_name", args.command), exc, USAGE_ERRORS)
    except KeyboardInterrupt:
        fail(args.command, "interrupted")
        return EXIT_INTERRUPTED
    return rc


if __name__ == "__main__":
    sys.exit(main())
