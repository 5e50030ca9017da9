"""protocol/ is sans-IO: importing it must not import asyncio or any I/O library of ours."""

import json
import subprocess
import sys


def test_protocol_imports_no_asyncio() -> None:
    code = (
        "import sys, json, protocol, protocol.merkle, protocol.topics, protocol.money, "
        "protocol.batch, protocol.signing, protocol.codec, protocol.vectors\n"
        "bad = [m for m in ('asyncio', 'aiomqtt', 'amqtt', 'aiosqlite', 'structlog', "
        "'fog', 'cloud', 'edge') if m in sys.modules]\n"
        "print(json.dumps(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert json.loads(out.stdout) == []
