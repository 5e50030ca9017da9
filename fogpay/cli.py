"""``fogpay`` console script.

Each package contributes its subcommands through a module with
``register(subparsers) -> None``; every subparser sets ``func(args) -> int``. Keeping the
dispatcher this thin lets protocol/, edge/, fog/ and cloud/ own their commands.

The conventions every command follows (``runtime.cli``): exit 0 done, 1 failed or refused,
2 usage or configuration error; an error is one line ``fogpay: <what>: <why>`` on stderr.
Commands report their own errors; ``main`` is the net below them for an operating error one
of them let through, so that it too is one line and not a traceback (a bug still is one).

A command imports only its own module (``COMMANDS``): ``fogpay fog run`` is a long-lived
daemon, and importing every command's module (the cloud's, the demo's) cost it 25 MB of
resident memory it never used (bench/memory.py). Without a known command word (``--help``, a
typo) every module is registered, so the help lists them all.
"""

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Final

from protocol.errors import FogpayError
from runtime.cli import fail, report
from runtime.keyfile import KeyFileError
from runtime.lean import skip_unused

# each top-level command word and the module that registers it (tests/cli checks the map
# against what the modules register)
COMMANDS: Final = {
    "keys": "fogpay.keys_cli",
    "certs": "fogpay.certs",
    "issuer": "fogpay.provision",
    "owner": "fogpay.provision",
    "device": "fogpay.provision",
    "lease": "fogpay.provision",
    "fog": "fog.cli",
    "edge": "fogpay.edge_cli",
    "cloud": "cloud.cli_commands",
    "verify-receipt": "cloud.cli_commands",
    "sandbox": "fogpay.sandbox",
    "demo": "fogpay.demo",
    "status": "fogpay.status",
}
COMMAND_MODULES: Final = tuple(dict.fromkeys(COMMANDS.values()))
# (module, class): usage errors (exit 2) and operating errors; looked up among the modules
# imported by the time the error is caught, since a class never imported was never raised
USAGE_ERRORS: Final = (
    ("cloud.config", "ConfigError"),
    ("cloud.backends", "StoreOpenError"),
    ("fog.config", "ConfigError"),
    ("fog.schema", "StoreOpenError"),
)
OPERATING_ERRORS: Final = (("aiomqtt", "MqttError"),)
EXIT_INTERRUPTED: Final = 130  # 128 + SIGINT, as a shell reports it


def _loaded(names: tuple[tuple[str, str], ...]) -> tuple[type[BaseException], ...]:
    return tuple(
        getattr(sys.modules[module], cls) for module, cls in names if module in sys.modules
    )


def version() -> str:
    import importlib.metadata  # only when asked: it costs a daemon 3 MB (email, zipfile...)

    try:
        return importlib.metadata.version("fogpay")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout, not installed
        return "unknown (not installed)"


class _Version(argparse.Action):
    """``--version``, the version looked up only when asked."""

    def __init__(self, option_strings: Sequence[str], dest: str, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        print(f"fogpay {version()}")
        parser.exit()


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser; with ``argv`` whose first word is a command, with that command alone."""
    parser = argparse.ArgumentParser(
        prog="fogpay",
        description="fogpay: machine-to-machine micropayments at the edge "
        "(devices, fog, cloud, settlement).",
        epilog="exit codes: 0 done, 1 failed or refused, 2 usage or configuration error",
    )
    parser.add_argument("--version", action=_Version, help="show the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    first = next((a for a in argv if not a.startswith("-")), None) if argv else None
    modules = (COMMANDS[first],) if first in COMMANDS else COMMAND_MODULES
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:  # a real missing dependency inside the module
                raise
            continue
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    if next((a for a in words if not a.startswith("-")), None) == "fog":
        skip_unused()  # the fog's commands draw nothing with rich (runtime.lean)
    parser = build_parser(words)
    args = parser.parse_args(words)
    try:
        rc: int = args.func(args)
    except (FogpayError, KeyFileError, OSError) as exc:
        return _report(args, exc)
    except Exception as exc:  # an operating error of a library the command used (aiomqtt)
        if not isinstance(exc, _loaded(OPERATING_ERRORS)):
            raise
        return _report(args, exc)
    except KeyboardInterrupt:
        fail(args.command, "interrupted")
        return EXIT_INTERRUPTED
    return rc


def _report(args: argparse.Namespace, exc: BaseException) -> int:
    return report(getattr(args, "command_name", args.command), exc, _loaded(USAGE_ERRORS))


if __name__ == "__main__":
    sys.exit(main())
