"""structlog configuration shared by the daemons: JSON lines in production, one event per line.

Configure once in ``__main__`` (``configure(json=True, component="fog")``); modules take
``structlog.get_logger()`` and bind context (fog_id, device, intent, owner). Never log private
keys or whole payloads.

Every line carries a ``component`` field (``fog``, ``cloud``, ``edge``, ``broker``, ``demo``,
``sandbox``...), so one journal or one ``demo.log`` holding several components can be split.
Its value is, in order: a ``component`` bound with structlog's contextvars (a daemon's
``run()`` binds its own with ``bind_component``: the demo and the sandbox run a fog and a cloud
in one process, each in its own tasks, and asyncio tasks copy the context they start in), else
the ``component`` given to ``configure``. Standard-library lines (amqtt, aiomqtt) get the same,
except amqtt's, which are the embedded broker's (``broker``).
"""

import logging
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any, Final

import structlog

COMPONENT_DEFAULT: Final = "fogpay"
BROKER_LOGGERS: Final = ("amqtt",)  # standard-library loggers whose lines are the broker's


def bind_component(component: str) -> Mapping[str, Any]:
    """Name the component of every line logged from the current context (task) on: call at
    the top of a daemon's ``run()``; tasks it starts inherit it. Returns the tokens for
    ``unbind_component`` (at the end of ``run()``: the caller's task may log on)."""
    return structlog.contextvars.bind_contextvars(component=component)


def unbind_component(tokens: Mapping[str, Any]) -> None:
    structlog.contextvars.reset_contextvars(**tokens)


def _component_adder(default: str) -> Any:
    def add_component(
        logger: Any, method: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        event_dict.setdefault("component", default)
        return event_dict

    return add_component


def _stdlib_component_adder(default: str) -> Any:
    def add_component(
        logger: Any, method: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        record = event_dict.get("_record")
        name = getattr(record, "name", "")
        if any(name == b or name.startswith(b + ".") for b in BROKER_LOGGERS):
            event_dict["component"] = "broker"
        event_dict.setdefault("component", default)
        return event_dict

    return add_component


def configure(
    *,
    json: bool = True,
    level: str = "info",
    stream: Any = None,
    component: str = COMPONENT_DEFAULT,
) -> None:
    """JSON to stdout (journald) with ISO UTC timestamps, or a console renderer for humans;
    ``component``: the ``component`` field of lines whose context binds none."""
    renderer: Any = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            _component_adder(component),
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


def route_stdlib_logging(
    *, json: bool, stream: Any = None, component: str = COMPONENT_DEFAULT
) -> None:
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
                structlog.contextvars.merge_contextvars,
                _stdlib_component_adder(component),
                structlog.stdlib.add_log_level,
                structlog.stdlib.add_logger_name,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
