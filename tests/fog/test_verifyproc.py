"""The verify workers (fog/verifyproc.py) as real child processes: one verdict per payload,
in the order given whatever the slicing; a worker that dies costs only its slice's marks (the
core then checks those itself); close ends every worker."""

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator

import msgpack
import nacl.signing
import pytest

from fog.verifychild import verdict_bytes
from fog.verifyproc import SLICE_MIN, VerifyPool
from protocol.limits import INTENT_ENVELOPE_BYTES_MAX
from protocol.messages import Intent
from protocol.signing import seal
from tests.integration.devices import Device

EXIT_WAIT_S = 10.0


@pytest.fixture
async def pool() -> AsyncIterator[VerifyPool]:
    p = VerifyPool.start(2)
    try:
        await p.open()
        yield p
    finally:
        await p.aclose()


def forged(device: Device) -> bytes:
    """An intent naming ``device`` as d, sealed by another key: its signature verifies by its
    signer (a worker's True), and the core declines it because the signer is not d."""
    other = nacl.signing.SigningKey.generate()
    intent = Intent(
        device=device.public,
        fog_id=device.fog_id,
        seq=device.seq + 1,
        payee_id="shop",
        amount_micros=100,
        currency="EUR",
        time_ms=1,
    )
    return seal(intent, other)


def payloads_and_truth() -> tuple[list[bytes], list[bool]]:
    devices = [Device("fog-v") for _ in range(3)]
    out: list[tuple[bytes, bool]] = []
    for k in range(40):
        d = devices[k % 3]
        if k % 7 == 3:
            out.append((forged(d), True))
        elif k % 11 == 5:
            out.append((b"\x94junk", False))  # not an envelope
        elif k % 13 == 6:
            raw = d.intent(100)
            out.append((raw[:-1] + bytes([raw[-1] ^ 1]), False))  # a bit of the signature
        else:
            out.append((d.intent(100 + k), True))
    out.append((b"\x00" * (INTENT_ENVELOPE_BYTES_MAX + 1), False))  # past an intent's size
    return [p for p, _ in out], [t for _, t in out]


async def test_one_verdict_per_payload_in_order(pool: VerifyPool) -> None:
    payloads, truth = payloads_and_truth()
    assert 0 < sum(truth) < len(truth)
    assert await pool.verdicts(payloads) == truth  # sliced over both workers
    for size in (1, SLICE_MIN - 1, SLICE_MIN, SLICE_MIN * 2 + 1):  # one slice, then two
        assert await pool.verdicts(payloads[:size]) == truth[:size]
    assert await pool.verdicts([]) == []
    assert pool.lost() == [] and pool.alive == 2


def test_the_child_answer_is_one_byte_per_payload() -> None:
    payloads, truth = payloads_and_truth()
    assert verdict_bytes(payloads[:-1]) == bytes(truth[:-1])
    assert verdict_bytes([1, None, "x"]) == b"\x00\x00\x00"  # not bytes: not verified
    with pytest.raises(ValueError):
        verdict_bytes({"a": 1})


async def test_a_worker_killed_costs_its_slice_only_and_is_reported_once(pool: VerifyPool) -> None:
    payloads, truth = payloads_and_truth()
    victim, survivor = pool.pids
    os.kill(victim, signal.SIGKILL)
    got = await pool.verdicts(payloads)
    # the dead worker's slice is unmarked (False): the core checks those; no True is invented
    assert all(t or not g for g, t in zip(got, truth, strict=True))
    assert pool.lost() == [victim] and pool.lost() == []
    assert pool.alive == 1 and pool.pids == [survivor]
    assert await pool.verdicts(payloads) == truth  # the survivor takes every slice
    os.kill(survivor, signal.SIGKILL)
    assert await pool.verdicts(payloads) == [False] * len(payloads)
    assert pool.lost() == [survivor] and pool.alive == 0
    assert await pool.verdicts(payloads) == [False] * len(payloads)  # none left: never raises


async def test_nonsense_sent_to_a_worker_ends_it_and_close_ends_the_rest() -> None:
    pool = VerifyPool.start(3)
    try:
        await pool.open()
        pids = pool.pids
        # a frame that is not a list of payloads: the worker exits, the pool drops it
        worker = pool._workers[0]  # the frame path itself is under test here
        assert worker.channel is not None
        body = msgpack.packb({"not": "a list"})
        answer = worker.channel.send(len(body).to_bytes(4, "big") + body)
        with pytest.raises(Exception, match="verify worker gone"):
            await answer
        assert worker.proc.wait(EXIT_WAIT_S) == 0
        payloads, truth = payloads_and_truth()
        assert await pool.verdicts(payloads) == truth  # the two others
        assert pool.lost() == [pids[0]] and pool.alive == 2
    finally:
        await pool.aclose()
    deadline = time.monotonic() + EXIT_WAIT_S
    for pid in pids:  # every child exited (reaped by close)
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError(f"verify worker {pid} still running")
