"""structlog configuration shared by the daemons: JSON lines in production, one event per line.

Configure once in ``__main__`` (``configure(json=True)``); modules take ``structlog.get_logger()``
and bind context (fog_id, device, intent, owner). Never log private keys or whole payloads.
"""

import logging
import sys
from typing import Any

import structlog


def configure(*, json: bool = True, level: str = "info", stream: Any = None) -> None:
    """JSON to stdout (journald) with ISO UTC timestamps, or a console renderer for humans."""
    renderer: Any = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stdout),
        cache_logger_on_first_use=False,
    )


def short(key: bytes) -> str:
    """A key or id as the 16 hex characters logs carry (never a private key)."""
    return key.hex()[:16]


def route_stdlib_logging(*, json: bool, stream: Any = None) -> None:
    """amqtt and aiomqtt log through the standard library: render their warnings as our
    JSON lines too, so journald sees one format (their chatter below WARNING is dropped)."""
    renderer: Any = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processor=renderer,
            foreign_pre_chain=[
                structlog.stdlib.add_log_level,
                structlog.stdlib.add_logger_name,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
