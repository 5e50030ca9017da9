"""Optional modules a long-lived daemon process does without, to keep its memory down.

structlog imports rich when it is installed (fogpay installs it for the demo's live panel),
for the console renderer's exception formatting: 3.8 MB of resident memory per process
(bench/memory.py). Our log chains format exceptions themselves (``format_exc_info`` before
the renderer, ``runtime.logs``), so a daemon never uses it. ``skip_unused`` marks such
modules absent (``sys.modules[name] = None``: importing them raises ImportError, which is
how structlog learns rich is not there); call it first thing in a process's entry point,
before anything imports structlog, and only in processes that never draw with rich (the
fog's daemon and its broker child, not ``fogpay demo``).
"""

import sys
from typing import Final

UNUSED_IN_DAEMONS: Final = ("rich",)


def skip_unused() -> None:
    """Mark ``UNUSED_IN_DAEMONS`` absent in this process, unless already imported."""
    for name in UNUSED_IN_DAEMONS:
        if name not in sys.modules:
            sys.modules[name] = None  # type: ignore[assignment]  # import raises ImportError
