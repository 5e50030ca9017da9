"""``python -m fog --config FILE`` is ``fogpay fog run --config FILE``."""

import sys

from fogpay.cli import main

if __name__ == "__main__":
    sys.exit(main(["fog", "run", *sys.argv[1:]]))
