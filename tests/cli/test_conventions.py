"""The conventions of every command: ``--config`` before or after the subcommand,
``--version``, ``--json``, and ``fog check-config`` checking the database and the broker."""

import importlib.metadata
import json
import socket
from pathlib import Path
from typing import Any

import pytest

from fog.schema import MIGRATIONS, connect, migrate
from tests.cli.conftest import FogFiles, fogpay, one_error_line
from tests.conftest import BrokerEndpoint, free_port


def test_version() -> None:
    done = fogpay("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"fogpay {importlib.metadata.version('fogpay')}"


def test_fog_config_before_and_after_the_subcommand(fog_files: FogFiles) -> None:
    config = str(fog_files.config())
    after = fogpay("fog", "check-config", "--config", config, "--json")
    before = fogpay("fog", "--config", config, "check-config", "--json")
    assert after.returncode == before.returncode == 0, after.stdout + after.stderr
    assert json.loads(after.stdout) == json.loads(before.stdout)
    assert json.loads(after.stdout)["ok"] is True
    # given in both places, the one after the subcommand wins
    other = fog_files.directory / "other.toml"
    other.write_text(Path(config).read_text().replace('"fog-cli"', '"fog-other"'))
    both = fogpay("fog", "--config", config, "check-config", "--config", str(other), "--json")
    assert "fog-other" in json.loads(both.stdout)["checks"][0]["detail"]


def test_cloud_config_before_and_after_the_subcommand(tmp_path: Path) -> None:
    config = tmp_path / "cloud.toml"
    config.write_text(
        f'store = "sqlite://{tmp_path}/books.db"\nissuer_key = "{tmp_path}/issuer.key"\n'
    )
    init = fogpay("cloud", "--config", str(config), "init")
    assert init.returncode == 0, init.stderr
    assert (tmp_path / "books.db").exists() and (tmp_path / "issuer.key").exists()
    after = fogpay("cloud", "check", "--config", str(config))
    before = fogpay("cloud", "--config", str(config), "check")
    assert after.returncode == before.returncode == 0, after.stderr + before.stderr
    assert json.loads(after.stdout) == json.loads(before.stdout)
    assert json.loads(after.stdout)["ok"] is True
    # a leaf command two levels down takes it too, and --store after it overrides the file
    listed = fogpay("cloud", "device", "list", "--config", str(config), "--json")
    assert listed.returncode == 0 and json.loads(listed.stdout) == [], listed.stderr
    elsewhere = fogpay("cloud", "--config", str(config), "check", "--store", "mysql://x")
    one_error_line(elsewhere, 2, "unknown scheme 'mysql'")


def checks(done: Any) -> dict[str, dict[str, Any]]:
    report = json.loads(done.stdout)
    assert report["ok"] is (done.returncode == 0)
    return {c["name"]: c for c in report["checks"]}


def test_check_config_reports_a_new_and_an_existing_database(fog_files: FogFiles) -> None:
    config = str(fog_files.config())
    new = checks(fogpay("fog", "check-config", "--config", config, "--json"))
    assert new["database"]["ok"] is True and "new" in new["database"]["detail"]
    assert not (fog_files.directory / "fog.db").exists()  # checking creates nothing
    assert list(fog_files.directory.glob(".fogpay-check-*")) == []  # the probe is gone
    conn = connect(fog_files.directory / "fog.db")
    migrate(conn)
    conn.close()
    done = fogpay("fog", "check-config", "--config", config)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"schema v{len(MIGRATIONS)}" in done.stdout
    assert [line.split()[:2] for line in done.stdout.splitlines()] == [
        ["ok", "config"],
        ["ok", "database"],
        ["ok", "broker"],
    ]


def test_check_config_fails_a_database_that_is_not_one(fog_files: FogFiles) -> None:
    (fog_files.directory / "fog.db").write_bytes(b"not a database\n" * 100)
    done = fogpay("fog", "check-config", "--config", str(fog_files.config()), "--json")
    assert done.returncode == 2
    found = checks(done)
    assert found["database"]["ok"] is False
    assert "file is not a database" in found["database"]["detail"]
    assert found["config"]["ok"] is True and found["broker"]["ok"] is True
    one_error_line(done, 2, "fog check-config", "database")


def test_check_config_fails_an_embedded_broker_port_in_use(fog_files: FogFiles) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = fog_files.config(broker=f"[broker]\nport = {port}\n")
        done = fogpay("fog", "check-config", "--config", str(config), "--json")
        skipped = fogpay("fog", "check-config", "--config", str(config), "--skip-broker")
    assert done.returncode == 1  # the configuration is fine; something else holds the port
    found = checks(done)
    assert found["broker"]["ok"] is False and f"127.0.0.1:{port}" in found["broker"]["detail"]
    assert found["database"]["ok"] is True
    one_error_line(done, 1, "fog check-config", "broker", "cannot listen")
    assert skipped.returncode == 0, skipped.stdout + skipped.stderr
    assert "skip broker" in " ".join(skipped.stdout.split())


def test_check_config_fails_an_external_broker_nobody_answers(fog_files: FogFiles) -> None:
    url = f"mqtt://127.0.0.1:{free_port()}"
    config = fog_files.config(broker=f'[broker]\nurl = "{url}"\n')
    done = fogpay("fog", "check-config", "--config", str(config), "--json")
    assert done.returncode == 1
    assert checks(done)["broker"]["ok"] is False
    one_error_line(done, 1, "fog check-config", "cannot connect")


@pytest.mark.mosquitto
def test_check_config_connects_to_an_external_broker(
    fog_files: FogFiles, mosquitto_broker: BrokerEndpoint
) -> None:
    config = fog_files.config(broker=f'[broker]\nurl = "{mosquitto_broker.url}"\n')
    done = fogpay("fog", "check-config", "--config", str(config), "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "connected" in checks(done)["broker"]["detail"]


def test_check_config_skips_the_rest_when_the_config_does_not_load(tmp_path: Path) -> None:
    done = fogpay("fog", "check-config", "--config", str(tmp_path / "none.toml"), "--json")
    assert done.returncode == 2
    found = checks(done)
    assert found["config"]["ok"] is False
    assert found["database"]["ok"] is None and found["broker"]["ok"] is None


def test_verify_receipt_json_and_exit_codes(tmp_path: Path) -> None:
    proof = tmp_path / "proof.json"
    proof.write_text("{}")
    done = fogpay("verify-receipt", str(proof), "--issuer", "00" * 32, "--json")
    assert done.returncode == 1
    assert json.loads(done.stdout)["valid"] is False
    missing = fogpay("verify-receipt", str(tmp_path / "none.json"), "--issuer", "00" * 32)
    one_error_line(missing, 2, "verify-receipt", "No such file")


def test_usage_errors_exit_2() -> None:
    assert fogpay("fog", "frobnicate").returncode == 2
    assert fogpay("cloud").returncode == 2
    assert fogpay("edge", "pay").returncode == 2  # --state missing
