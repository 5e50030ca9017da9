"""Issue 10: a batch is decoded once in the cloud, and the fog's shell decodes nothing.

Behaviour is tested elsewhere (tests/cloud/test_core.py: the verifier is called once per
batch, and the records table keeps the bytes it handed back); this holds the shape that makes
it true. In the cloud, ``cloud.verify.check_batch`` is the one place a batch's wire is decoded
and its signatures verified: the modules after it on the batch's path (the MQTT shell, the
core, the ingestor, the chain step, the booking plan, the ledger writes) take the decoded,
verified ``CheckedBatch`` and import no decoder. In the fog, the daemon is a shell: the core's
outputs carry everything it logs and publishes (an outcome its currency, ``Sealed`` its
count), so the daemon imports no decoder or verifier either. A module that starts to decode
again (say, to peek at a batch header before queueing it) fails here and should take what it
needs from the verified structure or the topic instead.
"""

import ast
from pathlib import Path
from typing import Final

ROOT: Final = Path(__file__).resolve().parent.parent

# what opens, splits or verifies wire bytes (protocol/: batch, signing, codec; msgpack itself)
DECODERS: Final = {
    "protocol.batch": {"decode_batch", "decode_record"},
    "protocol.signing": {
        "open_envelope",
        "open_message",
        "split_envelope",
        "verify",
        "verify_possession",
    },
    "protocol.codec": {"unpack_strict", "unpack_body"},
}
WHOLE_MODULES: Final = {"msgpack", "protocol.batch", "protocol.codec"}

CLOUD_BATCH_PATH: Final = (
    "cloud/service.py",
    "cloud/core.py",
    "cloud/ingest.py",
    "cloud/chain.py",
    "cloud/booking.py",
    "cloud/ledger.py",
    "cloud/events.py",
)
FOG_SHELL: Final = ("fog/daemon.py",)


def decoders_used(source: str) -> list[str]:
    """The decoders ``source`` imports, by name (``module.name``) or as a whole module."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module in WHOLE_MODULES and node.module not in DECODERS:
                found.append(node.module)
            wanted = DECODERS.get(node.module, set())
            found += [f"{node.module}.{a.name}" for a in node.names if a.name in wanted]
            if node.module == "protocol":  # from protocol import batch / codec / signing
                found += [
                    f"protocol.{a.name}" for a in node.names if f"protocol.{a.name}" in DECODERS
                ]
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name in WHOLE_MODULES | set(DECODERS)]
    return sorted(found)


def test_the_cloud_decodes_a_batch_in_the_verify_step_only() -> None:
    used = {path: decoders_used((ROOT / path).read_text()) for path in CLOUD_BATCH_PATH}
    assert {path: names for path, names in used.items() if names} == {}
    # and the verify step is where the decoding is: the check below is not vacuous
    assert {"protocol.batch.decode_batch", "protocol.signing.open_envelope"} <= set(
        decoders_used((ROOT / "cloud/verify.py").read_text())
    )


def test_the_fog_shell_decodes_and_verifies_nothing() -> None:
    used = {path: decoders_used((ROOT / path).read_text()) for path in FOG_SHELL}
    assert {path: names for path, names in used.items() if names} == {}


def test_the_scan_finds_each_way_of_importing_a_decoder() -> None:
    planted = (
        "import msgpack\n"
        "from protocol.batch import decode_batch, encode_batch\n"
        "from protocol.signing import open_envelope as opened, seal\n"
        "from protocol import codec, topics\n"
        "def f():\n"
        "    from protocol.codec import unpack_strict\n"
    )
    assert decoders_used(planted) == [
        "msgpack",
        "protocol.batch.decode_batch",
        "protocol.codec",
        "protocol.codec.unpack_strict",
        "protocol.signing.open_envelope",
    ]
    assert decoders_used("from protocol.signing import seal_signed\nimport protocol.topics\n") == []
