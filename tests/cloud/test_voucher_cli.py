"""``fogpay cloud voucher return-expired`` and the escrow in ``fogpay cloud owner show``
(docs/protocol.md 18.3), over a real SQLite file and a real PostgreSQL database: a voucher past
its ``na`` + grace is listed, then its unspent escrow returned to its owner, once; the ledger
still checks."""

import asyncio
import time
from pathlib import Path

from cloud.backends import open_store
from cloud.core import CloudCore
from cloud.ingest import Status
from cloud.leases import LeasePolicy
from protocol.batch import decode_record
from protocol.codec import pack
from protocol.held import encode_held
from protocol.signing import open_envelope, seal_signed
from protocol.voucher import (
    VOUCHER_GRACE_MS,
    VOUCHER_LIFE_MS,
    VOUCHER_PAYEE,
    Payment,
    Voucher,
    voucher_for,
)
from runtime.keyfile import load_key_file
from tests.cloud.test_cli import Cli, cli  # noqa: F401 (the fixture)
from tests.cloud.world import World

VOUCHER = 50_000


def test_expired_escrow_returns_to_its_owner_once(cli: Cli, tmp_path: Path) -> None:  # noqa: F811
    cli.run("init")
    # long ago: the world (owner, fog, device, lease) as it was, a voucher bought and spent
    t = time.time_ns() // 1_000_000 - VOUCHER_LIFE_MS - VOUCHER_GRACE_MS - 3_600_000

    async def back_then() -> int:
        store = await open_store(cli.store)
        try:
            w = World(store, issuer=load_key_file(tmp_path / "issuer.key"), now=t)
            await w.owner("alice")
            fog = await w.fog("fog-a")
            device = await w.device("alice")
            lease_id = (await w.lease("alice", "fog-a", 1_000_000)).lease.lease_id
            core = CloudCore(store=store, issuer=w.issuer, clock=w.clock, policy=LeasePolicy())
            record = fog.authorize(
                device, seq=1, lease_id=lease_id, amount=VOUCHER, payee=VOUCHER_PAYEE, t=t
            )
            assert (await core.ingest_batch(fog.cut([record], t=t))).status == Status.BOOKED
            vch = voucher_for(*decode_record(record), fog.key)
            assert vch is not None
            v = open_envelope(vch, Voucher).msg
            pay = seal_signed(
                Payment(
                    voucher_id=v.voucher_id,
                    seq=1,
                    payee_id="pad-2",
                    amount_micros=20_000,
                    spent_micros=20_000,
                    time_ms=t + 1_000,
                ),
                device,
            )
            judged, _ = await core.held_upload(encode_held([pack([vch, pay.raw])]), bytes(32))
            return judged.booked
        finally:
            await store.close()

    assert asyncio.run(back_then()) == 1
    shown = cli.run("owner", "show", "alice")["vouchers"]
    assert (shown["spent_micros"], shown["returnable_micros"]) == (20_000, 30_000)
    listed = cli.run("voucher", "return-expired")
    assert listed["returned"] is False and listed["by_owner"] == {"alice": {"EUR": 30_000}}
    assert cli.run("owner", "show", "alice")["vouchers"]["returned_micros"] == 0
    done = cli.run("voucher", "return-expired", "--yes")
    assert [x["returned_micros"] for x in done["vouchers"]] == [30_000]
    assert cli.run("voucher", "return-expired", "--yes")["vouchers"] == []  # once
    shown = cli.run("owner", "show", "alice")["vouchers"]
    assert (shown["returnable_micros"], shown["returned_micros"]) == (0, 30_000)
    check = cli.run("check")
    assert check["ledger_ok"] and check["ok"], check
