"""Conventions every ``fogpay`` command follows (fog, cloud, edge, keys, provisioning, sandbox,
demo): exit codes, the one-line error, ``--config`` and ``--json``.

Exit codes: 0 done; 1 the command ran and failed or was refused (broker or database
unreachable, a payment declined, a ledger that does not balance); 2 the command line or the
configuration is wrong (argparse's own code for usage errors), so fixing the invocation, the
config file or a file it names is what helps. An error is one line on stderr,
``fogpay: <what>: <why>``, never a traceback: tracebacks are for bugs.
"""

import argparse
import json
import sys
from typing import Any, Final, TextIO

from protocol.errors import FogpayError
from runtime.keyfile import KeyFileError

EXIT_OK: Final = 0
EXIT_FAILURE: Final = 1
EXIT_USAGE: Final = 2
PROG: Final = "fogpay"


class UsageError(FogpayError):
    """The command line or the configuration is wrong (exit 2). The message is
    ``<what>: <why>``."""


def error_line(what: str, why: object = None) -> str:
    """``fogpay: <what>: <why>`` on one line (newlines in a library's message are folded)."""
    text = what if why is None else f"{what}: {why}"
    return f"{PROG}: {' '.join(text.split())}"


def fail(
    what: str, why: object = None, *, code: int = EXIT_FAILURE, stream: TextIO | None = None
) -> int:
    """Print the one error line and return ``code`` (the command returns it)."""
    print(error_line(what, why), file=stream or sys.stderr)
    return code


def describe(exc: BaseException) -> str:
    """An operating error's message, made readable: an OSError as ``<file>: <strerror>``
    rather than ``[Errno 2] ...``, a silent one (TimeoutError) by its kind."""
    if isinstance(exc, TimeoutError) and not str(exc):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename}: {exc.strerror}" if exc.filename is not None else exc.strerror
    return str(exc) or type(exc).__name__


def exit_code(exc: BaseException, usage: tuple[type[BaseException], ...] = ()) -> int:
    """2 for a usage or configuration error (``UsageError``, a key file, a named file that
    cannot be read or written, and the caller's own ``usage`` types), otherwise 1."""
    if isinstance(exc, (UsageError, KeyFileError, *usage)):
        return EXIT_USAGE
    if isinstance(exc, OSError) and not isinstance(exc, TimeoutError) and exc.filename is not None:
        return EXIT_USAGE
    return EXIT_FAILURE


def report(what: str, exc: BaseException, usage: tuple[type[BaseException], ...] = ()) -> int:
    """Print ``fogpay: <what>: <why>`` for an operating error and return its exit code."""
    return fail(what, describe(exc), code=exit_code(exc, usage))


def config_option(help_: str) -> argparse.ArgumentParser:
    """A parent parser holding ``--config``, added both to a command group and to each of its
    subcommands, so ``fogpay fog --config F run`` and ``fogpay fog run --config F`` are the
    same. ``default=SUPPRESS``: a subcommand that was not given it leaves the group's value
    alone (argparse copies every attribute a subparser set onto the parent namespace)."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--config", default=argparse.SUPPRESS, metavar="FILE", help=help_)
    return parent


def json_option() -> argparse.ArgumentParser:
    """A parent parser holding ``--json`` (print the command's data as JSON)."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--json", action="store_true", default=False, help="print the result as JSON"
    )
    return parent


def print_json(obj: Any) -> None:
    """The command's data on stdout: indented, keys sorted (stable for diffs and jq)."""
    print(json.dumps(obj, indent=2, sort_keys=True))
