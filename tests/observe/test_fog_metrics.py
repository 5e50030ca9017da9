"""The fog's /metrics, /healthz and /readyz, scraped over 127.0.0.1 from a real FogDaemon (real
brokers, real SQLite, the store in its own process): counters move with payments, the budget
gauge is what the store holds, acks empty the backlog, readiness follows the broker."""

import asyncio
import json
import signal
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Final

import pytest
from amqtt.broker import Broker

from fog.config import load_config
from fog.daemon import FogDaemon
from protocol import topics
from protocol.messages import Ack
from protocol.signing import seal
from runtime.listen import ListenError
from tests.conftest import free_port
from tests.integration.devices import Device, Issuer, publish_retained, wallet, write_fog_files
from tests.integration.fogrun import running_fog, wait_counter
from tests.observe.scrape import get, scrape, undocumented, value, wait_scrape, wait_status

FOG = "fog-m"
FOG_PW = "fog-secret"
DEV_PW = "device-secret"
EMBEDDED = f'port = 0\npassword = "{FOG_PW}"\ndevice_password = "{DEV_PW}"\n'
CREDS = {"username": "device", "password": DEV_PW}
OPERATOR = {"username": "fog", "password": FOG_PW}  # trust and acks: a device may not
METRICS = '[metrics]\nenabled = true\nlisten = "127.0.0.1:0"\n'
LEASE_MICROS: Final = 1_000_000
PAID_MICROS: Final = 100_000
PAYMENTS: Final = 5
PROCESS_TIMEOUT_S: Final = 30.0


def _lease_room(db: Path) -> int:
    """What the store holds (read beside the running fog: WAL)."""
    con = sqlite3.connect(db)
    try:
        row = con.execute(
            "SELECT sum(amount_micros - drawn_micros) FROM leases WHERE owner_id = 'acme'"
        ).fetchone()
        return int(row[0])
    finally:
        con.close()


def _header_id(db: Path, number: int) -> bytes:
    con = sqlite3.connect(db)
    try:
        row = con.execute("SELECT header_id FROM batches WHERE number = ?", (number,)).fetchone()
        return bytes(row[0])
    finally:
        con.close()


async def test_payments_budget_backlog_and_acks_show_in_the_metrics(tmp_path: Path) -> None:
    issuer = Issuer()
    extra = METRICS + "[batch]\nrecords_max = 4\nage_ms = 50\n[uplink]\nack_timeout_ms = 200\n"
    config = write_fog_files(
        tmp_path, fog_id=FOG, issuer_key=issuer.public, broker=EMBEDDED, extra=extra
    )
    payer, spender = Device(FOG), Device(FOG)
    async with running_fog(config) as fog:
        base = fog.observer.url
        assert base is not None and base.startswith("http://127.0.0.1:")
        assert (await get(base + "/healthz"))[0] == 200
        status, body = await get(base + "/readyz")
        assert (status, json.loads(body)) == (200, {"ready": True})
        before = await scrape(base)
        assert value(before, "fogpay_fog_intents_total", status="ok", reason="") == 0
        assert value(before, "fogpay_fog_answer_seconds_count") == 0
        assert value(before, "fogpay_fog_broker_up") == 1
        assert value(before, "fogpay_fog_info", fog_id=FOG) == 1

        items = [issuer.owner_credential(), issuer.binding(payer.public)]
        items += [issuer.binding(spender.public), issuer.lease(FOG, LEASE_MICROS)]
        await publish_retained("127.0.0.1", fog.broker_port, items, **OPERATOR)
        await wait_counter(fog, "lease_accepted")
        await wait_counter(fog, "bind_accepted", 2)
        async with wallet("127.0.0.1", fog.broker_port, FOG, **CREDS) as w:
            for _ in range(PAYMENTS):
                assert (await w.pay(payer, payer.intent(PAID_MICROS))).ok
            declined = await w.pay(spender, spender.intent(2_000_000))  # over tx_max
            assert not declined.ok
            first = payer.intent(PAID_MICROS, seq=PAYMENTS + 1)
            assert (await w.pay(payer, first)).ok
            assert (await w.pay(payer, first)).ok  # a retransmission: replayed

        paid = (PAYMENTS + 1) * PAID_MICROS
        # sealed by size (4) or age (50 ms): how many batches depends on the timing
        # (and a receipt is counted published once the broker acked it: maybe after it arrived)
        s = await wait_scrape(
            base,
            lambda s: (
                value(s, "fogpay_fog_unsealed_records") == 0
                and value(s, "fogpay_fog_events_total", event="receipt_published") == PAYMENTS + 3
            ),
        )
        sealed = int(value(s, "fogpay_fog_batches_sealed") or 0)
        assert sealed >= 2
        assert value(s, "fogpay_fog_intents_total", status="ok", reason="") == PAYMENTS + 1
        assert value(s, "fogpay_fog_intents_total", status="replayed", reason="") == 1
        assert value(s, "fogpay_fog_intents_total", status="declined", reason="limit_tx") == 1
        assert value(s, "fogpay_fog_answer_seconds_count") == PAYMENTS + 3
        assert value(s, "fogpay_fog_answer_seconds_bucket", le="+Inf") == PAYMENTS + 3
        assert (value(s, "fogpay_fog_answer_seconds_sum") or 0) > 0
        left = value(s, "fogpay_fog_budget_left_micros", owner="acme", currency="EUR")
        assert left == LEASE_MICROS - paid == _lease_room(tmp_path / "fog.sqlite")
        assert value(s, "fogpay_fog_leases_live", owner="acme", currency="EUR") == 1
        assert value(s, "fogpay_fog_unacked_batches") == sealed
        assert value(s, "fogpay_fog_store_read_ok") == 1
        assert value(s, "fogpay_fog_events_total", event="receipt_published") == PAYMENTS + 3

        # no cloud answers: once the oldest batch is older than ack_timeout_ms, uplink is down
        s = await wait_scrape(base, lambda s: value(s, "fogpay_fog_uplink_up") == 0)
        assert (value(s, "fogpay_fog_unacked_oldest_age_seconds") or 0) >= 0.2

        # the cloud's ack for batch 1, then for the last: the backlog empties, uplink is up
        for acks, number in enumerate((1, sealed), start=1):
            header_id = _header_id(tmp_path / "fog.sqlite", number)
            ack = seal(Ack(fog_id=FOG, number=number, header_id=header_id), issuer.key)
            await publish_retained(
                "127.0.0.1", fog.broker_port, [(topics.ack_topic(FOG), ack)], **OPERATOR
            )
            # the database moves first, the daemon's counter once the store call returned
            s = await wait_scrape(
                base,
                lambda s, n=number, a=acks: (
                    value(s, "fogpay_fog_unacked_batches") == sealed - n
                    and value(s, "fogpay_fog_events_total", event="batch_acked") == a
                ),
            )
        assert value(s, "fogpay_fog_uplink_up") == 1
        assert value(s, "fogpay_fog_unacked_oldest_age_seconds") == 0
        assert value(s, "fogpay_fog_events_total", event="batch_acked") == 2
        assert undocumented(s, "fog.md") == []


async def test_readyz_follows_the_broker(tmp_path: Path) -> None:
    port = free_port()

    def broker() -> Broker:
        return Broker(
            {
                "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
                "plugins": {
                    "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
                },
            }
        )

    first = broker()
    await first.start()
    config = write_fog_files(
        tmp_path,
        fog_id=FOG,
        issuer_key=Issuer().public,
        broker=f'url = "mqtt://127.0.0.1:{port}"',
        extra=METRICS,
    )
    async with running_fog(config) as fog:
        base = fog.observer.url
        assert base is not None
        assert (await get(base + "/readyz"))[0] == 200
        await first.shutdown()
        body = await wait_status(base + "/readyz", 503)
        assert json.loads(body) == {"ready": False, "why": ["broker not connected"]}
        s = await scrape(base)
        assert value(s, "fogpay_fog_broker_up") == 0 and value(s, "fogpay_fog_ready") == 0
        assert (await get(base + "/healthz"))[0] == 200  # alive all along
        second = broker()
        await second.start()
        try:
            await wait_status(base + "/readyz", 200)
            s = await scrape(base)
            assert value(s, "fogpay_fog_broker_up") == 1 and value(s, "fogpay_fog_ready") == 1
        finally:
            await fog.stop()  # before the broker goes: no reconnect loop at teardown
            await second.shutdown()


async def test_off_by_default_and_a_taken_port_fails_the_start(tmp_path: Path) -> None:
    issuer = Issuer()
    plain = write_fog_files(tmp_path, fog_id=FOG, issuer_key=issuer.public, broker=EMBEDDED)
    assert FogDaemon(load_config(plain)).observer.url is None
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_fog_files(
            tmp_path,
            fog_id=FOG,
            issuer_key=issuer.public,
            broker=EMBEDDED,
            extra=f'[metrics]\nenabled = true\nlisten = "127.0.0.1:{port}"\n',
        )
        daemon = FogDaemon(load_config(config))
        with pytest.raises(ListenError, match=r"^metrics\.listen: cannot listen on 127\.0\.0\.1"):
            await daemon.run()


async def test_a_fog_process_serves_metrics_and_every_log_line_names_its_component(
    tmp_path: Path,
) -> None:
    config = write_fog_files(
        tmp_path, fog_id=FOG, issuer_key=Issuer().public, broker=EMBEDDED, extra=METRICS
    )
    log = tmp_path / "fog.log"
    proc = _start_fog(config, log)
    try:
        url = await _listening_url(log, proc)
        await wait_status(url + "/readyz", 200)
        s = await scrape(url)
        assert value(s, "fogpay_fog_broker_up") == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, PROCESS_TIMEOUT_S) == 0
    lines = _lines(log, strict=True)
    assert {e["component"] for e in lines} <= {"fog", "broker"}
    events = {e["event"]: e["component"] for e in lines}
    assert events["fog_starting"] == events["metrics_listening"] == events["fog_stopped"] == "fog"


async def _listening_url(log: Path, proc: "subprocess.Popen[bytes]") -> str:
    async with asyncio.timeout(PROCESS_TIMEOUT_S):
        while True:
            assert proc.poll() is None, _lines(log)
            for event in _lines(log):
                if event.get("event") == "metrics_listening":
                    return str(event["url"])
            await asyncio.sleep(0.05)


def _start_fog(config: Path, log: Path) -> "subprocess.Popen[bytes]":
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "fog", "--config", str(config)], stdout=out, stderr=out
        )


def _lines(log: Path, *, strict: bool = False) -> list[dict[str, object]]:
    """The JSON lines (``strict``: every line must be one; else a line being written is
    skipped)."""
    return [json.loads(x) for x in log.read_text().splitlines() if strict or x.endswith("}")]


async def test_a_fog_without_uplink_has_no_uplink_gauge(tmp_path: Path) -> None:
    extra = METRICS + "[uplink]\nenabled = false\n"
    config = write_fog_files(
        tmp_path, fog_id=FOG, issuer_key=Issuer().public, broker=EMBEDDED, extra=extra
    )
    async with running_fog(config) as fog:
        assert fog.observer.url is not None
        s = await scrape(fog.observer.url)
        assert value(s, "fogpay_fog_uplink_up") is None
        assert value(s, "fogpay_fog_broker_up") == 1 and value(s, "fogpay_fog_store_read_ok") == 1
        assert value(s, "fogpay_fog_unacked_batches") == 0
