"""The fog's vouchers (fog/vouchers.py, docs/protocol.md 18.3) against a real fog daemon (its
embedded broker, real SQLite): the SDK obtains a voucher for an intent to the reserved payee
``voucher``; a retransmission of that intent brings the stored receipt and the same voucher
bytes again; an ordinary payment brings no voucher; a payment signed against the voucher
passes the payee's check under the issuer key."""

import dataclasses
from pathlib import Path

import nacl.signing

from edge.device import Device
from edge.voucher import Payee, Payer
from fogpay.provision import BrokerAddress, Validity, fog_credential, now_ms, publish_retained
from protocol import topics
from protocol.batch import decode_record
from protocol.messages import Intent
from protocol.signing import open_envelope, public_key
from protocol.voucher import Voucher
from tests.edge.fogtools import DEV_PW, FOG_ID, FOG_PW, client, embedded_fog, fog_key, observing
from tests.edge.fogtools import provision as provision_devices
from tests.integration.fogrun import running_fog, wait_counter

ALLOWANCE = 400_000  # within the binding's tx limit (tests/edge/fogtools.py)


async def test_voucher_from_a_real_fog_and_its_replay(tmp_path: Path) -> None:
    issuer = nacl.signing.SigningKey.generate()
    async with running_fog(embedded_fog(tmp_path, issuer)) as fog:
        broker = BrokerAddress("127.0.0.1", fog.broker_port, "device", DEV_PW)
        payer_dev = Device.open(tmp_path / "payer", fog_id=FOG_ID, fog_key=fog_key(tmp_path))
        await provision_devices(fog, broker, issuer, [payer_dev])
        operator = dataclasses.replace(broker, username=fog.config.broker.username, password=FOG_PW)
        cred = fog_credential(
            issuer,
            fog_id=FOG_ID,
            fog_key=fog_key(tmp_path),
            validity=Validity.days(30, now=now_ms()),
        )
        await publish_retained(operator, [cred])
        payer = Payer(payer_dev)
        async with client(broker) as c:
            held = await payer.obtain(c, ALLOWANCE, "EUR", payees=["pad-2"], timeout_s=5)
        v = held.voucher.msg
        assert (v.amount_micros, v.currency, v.payees, v.fog_id) == (
            ALLOWANCE,
            "EUR",
            ("pad-2",),
            FOG_ID,
        )
        assert held.voucher.signer == fog_key(tmp_path) and v.device == payer_dev.public_key
        await wait_counter(fog, "voucher_published")
        [record] = payer_dev.held_records()  # the voucher intent's receipt, held for upload
        intent_env, _ = decode_record(record)
        assert open_envelope(intent_env, Intent).id == v.voucher_id

        # the same intent bytes again: the stored receipt, then the same voucher, byte for byte
        topic = topics.receipt_topic(FOG_ID, payer_dev.public_key)
        async with observing(broker, topic) as obs, client(broker) as c:
            await c.publish(topics.intent_topic(FOG_ID, payer_dev.public_key), intent_env, qos=1)
            await obs.wait_count(2)
            assert obs.payloads[1] == held.voucher.raw
            assert open_envelope(obs.payloads[1], Voucher).msg == v

        # an ordinary payment brings a receipt and nothing else
        async with observing(broker, topic) as obs, client(broker) as c:
            receipt = await payer_dev.pay(c, "shop-1", 1_000, "EUR", timeout_s=5)
            assert receipt.msg.ok
            await wait_counter(fog, "receipt_published", 3)
        assert fog.counters.get("voucher_published") == 2  # the first and the replay

        bundle = payer.pay("pad-2", 150_000)
        pad = Device.open(tmp_path / "pad", fog_id=FOG_ID, fog_key=fog_key(tmp_path))
        checked = Payee(pad, payee_id="pad-2", issuer_key=public_key(issuer)).accept(bundle)
        assert checked.payment.msg.spent_micros == 150_000
