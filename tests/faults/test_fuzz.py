"""The fuzz campaign, small (the long run is ``python -m tests.faults.fuzz``; figures in
docs/reliability.md): decoders never crash and the fast paths agree with the reference; a
running fog answers every payload on its intent topics, declines all garbage, replays
stored receipts byte for byte, keeps its rows unchanged by garbage, and keeps running."""

import os
from pathlib import Path

import pytest

from tests.faults import decoders, fogfuzz
from tests.faults.fuzz import fog_ok

DECODER_COUNT = int(os.environ.get("FOGPAY_FUZZ_DECODERS", "10000"))
BROKER_COUNT = int(os.environ.get("FOGPAY_FUZZ_BROKER", "2000"))
RSS_GROWTH_KIB_MAX = 32 * 1024  # flat memory: far less than this over a short run


def test_decoders_survive_mutated_and_random_payloads() -> None:
    fig = decoders.run(DECODER_COUNT, seed=11)
    d = fig.as_dict()
    assert d["crashes"] == 0, d["first_crashes"]
    assert d["disagreements"] == 0, d["first_disagreements"]
    assert fig.payloads == DECODER_COUNT
    # every operator ran, and some payloads still opened: the mutations are not all noise
    assert set(fig.ops) >= {"flip", "truncate", "extend", "type_swap", "huge_length", "dup_key"}
    assert any(k.endswith(":ok") for k in fig.verdicts)
    assert any(k.endswith(":bad_signature") for k in fig.verdicts)


@pytest.mark.mosquitto
async def test_running_fog_answers_garbage_and_keeps_its_state(tmp_path: Path) -> None:
    fig = await fogfuzz.run(tmp_path, BROKER_COUNT, seed=12)
    d = fig.as_dict()
    assert not fig.fog_exited
    assert fig.answerable > 0 and fig.answered == fig.answerable, d
    assert fig.wrong_answers == [], d["first_wrong_answers"]
    assert fig.state_errors == []
    assert fig.rogue_binding_inert
    assert fig.valid_paid >= 2 + BROKER_COUNT // fogfuzz.CHUNK
    assert {"malformed", "bad_signature", "wrong_fog", "ok_replay"} <= set(fig.reasons)
    assert fig.rss_kib[-1] - fig.rss_kib[0] < RSS_GROWTH_KIB_MAX, fig.rss_kib
    assert fog_ok(fig)
