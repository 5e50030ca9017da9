"""``fogpay COMMAND`` imports the module of that command alone (fogpay/cli.py ``COMMANDS``):
the map must name every command each module registers, and the fog's daemon must not carry
the cloud's or the demo's modules."""

import argparse
import importlib
import json
import subprocess
import sys

from fogpay.cli import COMMAND_MODULES, COMMANDS, build_parser


def test_the_map_names_every_command_of_every_module() -> None:
    registered = {}
    for name in COMMAND_MODULES:
        sub = argparse.ArgumentParser().add_subparsers()
        importlib.import_module(name).register(sub)
        registered.update(dict.fromkeys(sub.choices, name))
    assert registered == COMMANDS


def test_a_known_command_builds_its_own_parser_only() -> None:
    parser = build_parser(["fog", "run", "--config", "x.toml"])
    choices = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(choices.choices) == {"fog"}
    everything = build_parser(["--help"])
    choices = next(a for a in everything._actions if isinstance(a, argparse._SubParsersAction))
    assert set(choices.choices) == set(COMMANDS)


def test_fog_run_imports_neither_the_cloud_nor_the_demo() -> None:
    code = (
        "import json, sys\n"
        "from fogpay.cli import build_parser\n"
        "build_parser(['fog', 'run']).parse_args(['fog', 'run', '--config', 'x'])\n"
        "import fog.daemon\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    tops = set(json.loads(done.stdout))
    assert "fog" in tops
    # nor amqtt: the embedded broker runs in its own process by default (fog.brokerproc)
    assert not tops & {"cloud", "edge", "asyncpg", "cryptography", "amqtt"}, tops


def test_a_daemon_without_rich_still_logs_exceptions_in_both_formats() -> None:
    """runtime.lean keeps rich out of the fog's processes; structlog then formats without it,
    and a traceback still reaches the log line, on the console and in JSON."""
    code = (
        "import io, json, sys\n"
        "from runtime.lean import skip_unused\n"
        "skip_unused()\n"
        "import structlog\n"
        "from runtime.logs import configure\n"
        "out = {}\n"
        "for as_json in (False, True):\n"
        "    buf = io.StringIO()\n"
        "    configure(json=as_json, stream=buf)\n"
        "    try:\n"
        "        raise ValueError('boom')\n"
        "    except ValueError:\n"
        "        structlog.get_logger().exception('fog_failed')\n"
        "    out[str(as_json)] = buf.getvalue()\n"
        "out['rich'] = sys.modules.get('rich') is not None\n"
        "print(json.dumps(out))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    out = json.loads(done.stdout)
    assert out["rich"] is False
    assert "fog_failed" in out["False"] and "ValueError: boom" in out["False"]
    line = json.loads(out["True"])
    assert line["event"] == "fog_failed" and "ValueError: boom" in line["exception"]
