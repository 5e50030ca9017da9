"""Device state without a network: key file, sequence reservation, receipts."""

import json
import stat
from pathlib import Path

import nacl.signing
import pytest

from edge.device import KEY_FILE, RECEIPTS_FILE, SEQ_FILE, Device, DeviceStateError, answers
from protocol.errors import Declined
from protocol.messages import Receipt
from protocol.reasons import Reason
from protocol.signing import Signed, open_envelope, public_key, seal_signed

FOG = nacl.signing.SigningKey(bytes(range(32)))
FOG_PUB = public_key(FOG)
NOW_MS = 1_790_000_000_000


def open_device(path: Path, **kw: object) -> Device:
    return Device.open(path, fog_id="fog-1", fog_key=FOG_PUB, clock=lambda: NOW_MS, **kw)  # type: ignore[arg-type]


def receipt_for(
    intent: Signed, key: nacl.signing.SigningKey = FOG, **kw: object
) -> Signed[Receipt]:
    fields = dict(
        intent_id=intent.id,
        device=intent.msg.device,
        seq=intent.msg.seq,
        status="ok",
        log_index=1,
        lease_id=bytes(16),
        time_ms=NOW_MS,
    )
    fields.update(kw)
    return seal_signed(Receipt(**fields), key)  # type: ignore[arg-type]


def test_key_file_is_private_and_stable(tmp_path: Path) -> None:
    d = open_device(tmp_path / "dev")
    mode = stat.S_IMODE((tmp_path / "dev" / KEY_FILE).stat().st_mode)
    assert mode == 0o600
    assert open_device(tmp_path / "dev").public_key == d.public_key
    assert open_device(tmp_path / "other").public_key != d.public_key


def test_intent_is_signed_by_the_device(tmp_path: Path) -> None:
    d = open_device(tmp_path)
    intent = d.new_intent("shop-1", 1_250, "EUR", memo=b"session-9")
    opened = open_envelope(intent.raw, type(intent.msg))
    assert opened.msg == intent.msg
    assert (opened.msg.seq, opened.msg.time_ms, opened.msg.fog_id) == (1, NOW_MS, "fog-1")
    assert opened.signer == d.public_key


def test_seq_is_durable_before_use_and_never_reused_after_reboot(tmp_path: Path) -> None:
    d = open_device(tmp_path, seq_block=4)
    qs = [d.new_intent("shop", 1, "EUR").msg.seq for _ in range(5)]
    assert qs == [1, 2, 3, 4, 5]
    # the reservation on disk covers every q handed out
    assert int((tmp_path / SEQ_FILE).read_text()) >= 5
    rebooted = open_device(tmp_path, seq_block=4)  # crash: in-memory state lost
    q = rebooted.new_intent("shop", 1, "EUR").msg.seq
    assert q > 5
    assert q == 9  # the rest of the block (6..8) is skipped, never reused


def test_seq_block_of_one_writes_every_time(tmp_path: Path) -> None:
    d = open_device(tmp_path, seq_block=1)
    for expected in (1, 2, 3):
        assert d.new_intent("shop", 1, "EUR").msg.seq == expected
        assert int((tmp_path / SEQ_FILE).read_text()) == expected
    assert open_device(tmp_path, seq_block=1).new_intent("shop", 1, "EUR").msg.seq == 4


def test_invalid_intent_consumes_no_seq(tmp_path: Path) -> None:
    d = open_device(tmp_path, seq_block=1)
    with pytest.raises(Declined) as err:
        d.new_intent("Not A Payee", 1, "EUR")
    assert err.value.reason is Reason.MALFORMED
    with pytest.raises(Declined):
        d.new_intent("shop", 0, "EUR")
    assert not (tmp_path / SEQ_FILE).exists()
    assert d.new_intent("shop", 1, "EUR").msg.seq == 1


def test_check_receipt_accepts_only_the_fogs_answer_to_this_intent(tmp_path: Path) -> None:
    d = open_device(tmp_path)
    intent = d.new_intent("shop", 10, "EUR")
    other = d.new_intent("shop", 10, "EUR")
    good = receipt_for(intent)
    assert d.check_receipt(good.raw, intent) == good
    assert answers(good, intent)
    forger = nacl.signing.SigningKey.generate()
    assert d.check_receipt(receipt_for(intent, forger).raw, intent) is None
    assert d.check_receipt(receipt_for(other).raw, intent) is None
    assert d.check_receipt(receipt_for(intent, seq=intent.msg.seq + 1).raw, intent) is None
    assert d.check_receipt(b"\x94garbage", intent) is None


def test_receipts_are_stored_once_and_survive_reopen(tmp_path: Path) -> None:
    d = open_device(tmp_path)
    intent = d.new_intent("shop", 10, "EUR")
    receipt = receipt_for(intent)
    d.store_receipt(receipt)
    d.store_receipt(receipt)  # retransmission: same receipt again
    lines = (tmp_path / RECEIPTS_FILE).read_text().splitlines()
    assert len(lines) == 1
    assert "shop" not in lines[0] and json.loads(lines[0])["i"] == intent.id.hex()
    reopened = open_device(tmp_path)
    assert [r.raw for r in reopened.receipts()] == [receipt.raw]
    reopened.store_receipt(receipt)
    assert len((tmp_path / RECEIPTS_FILE).read_text().splitlines()) == 1


def test_torn_last_receipt_line_is_skipped(tmp_path: Path) -> None:
    d = open_device(tmp_path)
    first = receipt_for(d.new_intent("shop", 10, "EUR"))
    d.store_receipt(first)
    with open(tmp_path / RECEIPTS_FILE, "a") as f:
        f.write('{"i": "ab')  # crash in the middle of an append
    reopened = open_device(tmp_path)
    assert [r.raw for r in reopened.receipts()] == [first.raw]


def test_declined_receipts_are_not_stored(tmp_path: Path) -> None:
    d = open_device(tmp_path)
    intent = d.new_intent("shop", 10, "EUR")
    declined = receipt_for(
        intent, status="declined", reason=Reason.LIMIT_TX, log_index=None, lease_id=None
    )
    with pytest.raises(AssertionError):
        d.store_receipt(declined)


def test_bad_state_is_refused_not_guessed(tmp_path: Path) -> None:
    with pytest.raises(DeviceStateError):
        Device.open(tmp_path, fog_id="fog-1", fog_key=bytes(32))  # small-order fog key
    open_device(tmp_path)
    (tmp_path / SEQ_FILE).write_text("12x\n")
    with pytest.raises(DeviceStateError):
        open_device(tmp_path)
