"""``fogpay status``, run as a real second process against a real fog's and a real cloud
service's metrics endpoints on 127.0.0.1."""

import asyncio
import json
import sys
from pathlib import Path
from typing import Final

import pytest

from cloud.config import MetricsConfig
from cloud.core import CloudCore
from cloud.leases import LeasePolicy
from cloud.service import CloudService
from cloud.sqlitestore import SqliteStore
from fogpay.cli import main
from tests.conftest import free_port
from tests.integration.devices import (
    Device,
    Issuer,
    new_key,
    publish_retained,
    wallet,
    write_fog_files,
)
from tests.integration.fogrun import running_fog, wait_counter
from tests.observe.test_fog_metrics import CREDS, EMBEDDED, FOG, OPERATOR

RUN_TIMEOUT_S: Final = 30.0
LEASE_MICROS: Final = 2_500_000


async def status(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "fogpay.cli",
        "status",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(RUN_TIMEOUT_S):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_status_of_a_fog_by_url_and_by_config(tmp_path: Path) -> None:
    issuer = Issuer()
    port = free_port()
    metrics = f'[metrics]\nenabled = true\nlisten = "127.0.0.1:{port}"\n'
    config = write_fog_files(
        tmp_path, fog_id=FOG, issuer_key=issuer.public, broker=EMBEDDED, extra=metrics
    )
    payer, stranger = Device(FOG), Device(FOG)
    async with running_fog(config) as fog:
        items = [issuer.owner_credential(), issuer.binding(payer.public)]
        items.append(issuer.lease(FOG, LEASE_MICROS))
        await publish_retained("127.0.0.1", fog.broker_port, items, **OPERATOR)
        await wait_counter(fog, "lease_accepted")
        await wait_counter(fog, "bind_accepted")
        async with wallet("127.0.0.1", fog.broker_port, FOG, **CREDS) as w:
            for _ in range(3):
                assert (await w.pay(payer, payer.intent(500_000))).ok
            assert not (await w.pay(stranger, stranger.intent(1))).ok  # unbound device

        rc, out, err = await status("--json", "--url", f"http://127.0.0.1:{port}/metrics")
        assert (rc, err) == (0, "")
        s = json.loads(out)
        assert s["component"] == "fog" and s["fog_id"] == FOG and s["ready"] is True
        assert s["intents"]["ok"] == 3 and s["intents"]["declined"] == 1
        assert list(s["intents"]["declined_by_reason"].values()) == [1]
        assert s["answer_ms"]["n"] == 4 and s["answer_ms"]["p50_le"] > 0
        assert s["answer_ms"]["p50_le"] <= s["answer_ms"]["p99_le"]
        assert s["budget"] == [
            {"owner": "acme", "currency": "EUR", "left_micros": 1_000_000, "leases": 1}
        ]
        assert s["broker_up"] is True

        rc, out, err = await status("--config", str(config))
        assert (rc, err) == (0, "")
        assert f"fog {FOG}  http://127.0.0.1:{port}  ready" in out
        assert "3 ok, 1 declined" in out
        assert "acme" in out and "1.000000 EUR" in out


def test_status_errors_say_why_and_exit_2_or_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def status_here(*args: str) -> tuple[int, str, str]:  # in this process: no daemon needed
        rc = main(["status", *args])
        out, err = capsys.readouterr()
        return rc, out, err

    zero = tmp_path / "zero.toml"
    zero.write_text('fog_id = "x"\n[metrics]\nenabled = true\nlisten = "127.0.0.1:0"\n')
    rc, out, err = status_here("--config", str(zero))
    assert (rc, out) == (2, "") and "port 0" in err and "--url" in err
    off = tmp_path / "off.toml"
    off.write_text('fog_id = "x"\n')
    rc, _, err = status_here("--config", str(off))
    assert rc == 2 and "metrics.enabled is not true" in err
    rc, _, err = status_here("--config", str(tmp_path / "missing.toml"))
    assert rc == 2 and "cannot read" in err
    rc, _, err = status_here("--url", f"http://127.0.0.1:{free_port()}")
    assert rc == 1 and "cannot reach" in err
    rc, _, err = status_here("--url", "/not/a/url")
    assert rc == 2 and "not an http:// URL" in err
    # the one error line of every fogpay command (runtime/cli.py)
    assert err.startswith("fogpay: status: ") and err.count("\n") == 1


async def test_status_of_a_cloud_without_its_broker_is_not_ready(tmp_path: Path) -> None:
    store = await SqliteStore.open(str(tmp_path / "cloud.db"))
    core = CloudCore(store=store, issuer=new_key(), clock=lambda: 0, policy=LeasePolicy())
    service = CloudService(
        core=core,
        broker_host="127.0.0.1",
        broker_port=free_port(),  # nothing there
        store=store,
        metrics=MetricsConfig(enabled=True, host="127.0.0.1", port=0),
    )
    task = asyncio.create_task(service.run())
    try:
        async with asyncio.timeout(RUN_TIMEOUT_S):
            while service.observer.url is None:  # noqa: ASYNC110 (no event for it)
                await asyncio.sleep(0.01)
        rc, out, _ = await status("--json", "--url", service.observer.url)
        s = json.loads(out)
        assert rc == 1 and s["component"] == "cloud"
        assert (s["ready"], s["why"], s["broker_up"]) == (False, ["broker not connected"], False)
        assert s["records"] == {"booked": 0, "rejected": 0} and s["leases_outstanding"] == []
        rc, out, _ = await status("--url", service.observer.url)
        assert rc == 1 and "NOT READY: broker not connected" in out and "0 booked" in out
    finally:
        await service.stop()
        async with asyncio.timeout(RUN_TIMEOUT_S):
            await task
        await store.close()
