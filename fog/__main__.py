"""``python -m fog --config FILE`` is ``fogpay fog run --config FILE``."""

from runtime.lean import skip_unused

skip_unused()  # before fog.cli imports structlog (runtime.lean)

import argparse  # noqa: E402
import sys  # noqa: E402

from fog import cli  # noqa: E402


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m fog")
    cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["fog", "run", *argv])
    rc: int = args.func(args)
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
