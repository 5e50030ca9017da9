"""``python -m fog.brokerchild ANSWER_FD``: the embedded broker's child process
(``fog.brokerproc.BrokerProcess`` starts it; ``fog.broker._serve_child`` is what it does).
A module of its own so that ``runtime.lean.skip_unused`` runs before ``fog.broker`` imports
structlog."""

from runtime.lean import skip_unused

skip_unused()

import sys  # noqa: E402

from fog.broker import child_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
