"""Ordinary mistakes get one clear line and the right exit code, never a traceback or a hang
(issue 14): each runs the real command line in a second process."""

import sqlite3
import sys
from pathlib import Path

import pytest

from fog.schema import MIGRATIONS, connect, migrate
from tests.cli.conftest import FogFiles, fogpay, one_error_line, unwritable

NOT_A_DATABASE = b"this is a text file, not a SQLite database\n" * 40


def test_fog_database_that_is_not_a_database(fog_files: FogFiles) -> None:
    (fog_files.directory / "fog.db").write_bytes(NOT_A_DATABASE)
    config = fog_files.config()
    done = fogpay("fog", "run", "--config", str(config))
    one_error_line(done, 2, "fog run", "fog.db", "file is not a database")
    assert (fog_files.directory / "fog.db").read_bytes() == NOT_A_DATABASE  # left alone


def test_fog_database_in_an_unwritable_directory(fog_files: FogFiles) -> None:
    locked = fog_files.directory / "locked"
    locked.mkdir()
    config = fog_files.config(db="locked/fog.db")
    with unwritable(locked):
        done = fogpay("fog", "run", "--config", str(config))
        check = fogpay("fog", "check-config", "--config", str(config))
    one_error_line(done, 2, "fog run", "locked/fog.db", "not writable")
    assert not (locked / "fog.db").exists()
    assert check.returncode == 2, check.stdout + check.stderr
    assert "fail database" in " ".join(check.stdout.split()), check.stdout


def test_fog_database_in_a_directory_that_does_not_exist(fog_files: FogFiles) -> None:
    config = fog_files.config(db="missing/fog.db")
    done = fogpay("fog", "run", "--config", str(config))
    one_error_line(done, 2, "fog run", "missing", "does not exist")


def test_cloud_store_that_is_not_a_database_does_not_hang(tmp_path: Path) -> None:
    # It used to hang for ever: the failed open left aiosqlite's worker thread running.
    # fogpay() gives the process 60 s; it must exit well within that with one line.
    (tmp_path / "notadb").write_bytes(NOT_A_DATABASE)
    done = fogpay("cloud", "--store", "sqlite://notadb", "check", cwd=tmp_path)
    one_error_line(done, 2, "cloud check", "notadb", "file is not a database")
    assert (tmp_path / "notadb").read_bytes() == NOT_A_DATABASE


def test_cloud_store_in_a_directory_that_does_not_exist(tmp_path: Path) -> None:
    done = fogpay("cloud", "--store", f"sqlite://{tmp_path}/missing/cloud.db", "check")
    one_error_line(done, 2, "cloud check", "does not exist")


@pytest.mark.parametrize("url", ["mysql://x", "sqlite3://cloud.db", "http://127.0.0.1/db"])
def test_unknown_store_scheme_is_refused_with_the_known_ones(tmp_path: Path, url: str) -> None:
    done = fogpay("cloud", "--store", url, "check", cwd=tmp_path)
    scheme = url.split("://")[0]
    one_error_line(done, 2, f"unknown scheme {scheme!r}", "sqlite://", "postgresql://")
    assert list(tmp_path.iterdir()) == []  # not taken as a SQLite path: nothing created


def test_postgres_store_without_asyncpg_says_how_to_install_it(tmp_path: Path) -> None:
    # A process where asyncpg cannot be imported, as on an install without the extra.
    code = (
        "import sys; sys.modules['asyncpg'] = None; from fogpay.cli import main; "
        "sys.exit(main(sys.argv[1:]))"
    )
    url = "postgresql://fogpay@127.0.0.1:5432/fogpay"
    done = fogpay("cloud", "--store", url, "check", cwd=tmp_path, code=code)
    line = one_error_line(done, 2, "cloud check", "PostgreSQL support needs asyncpg")
    assert line.endswith("pip install 'fogpay[postgres]'"), line
    assert "ModuleNotFoundError" not in line


def test_postgres_store_that_refuses_the_connection(tmp_path: Path) -> None:
    from tests.conftest import free_port  # nothing listens there

    url = f"postgresql://fogpay:secret-pw@127.0.0.1:{free_port()}/fogpay"
    done = fogpay("cloud", "--store", url, "check", cwd=tmp_path)
    # a server that does not answer is a runtime failure (1), as a broker that is not there
    line = one_error_line(done, 1, "cloud check", "127.0.0.1")
    assert "secret-pw" not in line  # the password never reaches the error line


@pytest.mark.parametrize("sandbox", ["/nonexistent", "/nonexistent/sandbox.json", "EMPTY"])
def test_edge_pay_with_a_sandbox_that_is_not_there(tmp_path: Path, sandbox: str) -> None:
    if sandbox == "EMPTY":
        sandbox = str(tmp_path)  # a directory without sandbox.json
    done = fogpay("edge", "pay", "--sandbox", sandbox, "--state", str(tmp_path / "dev"))
    one_error_line(done, 2, "edge pay", f"--sandbox {sandbox}")


def test_edge_pay_to_a_broker_that_is_not_there_is_a_runtime_failure(tmp_path: Path) -> None:
    from tests.conftest import free_port
    from tests.integration.devices import new_key

    fog_key = bytes(new_key().verify_key).hex()
    broker = f"mqtt://127.0.0.1:{free_port()}"
    args = ("--broker", broker, "--fog-id", "fog-1", "--fog-key", fog_key)
    done = fogpay("edge", "pay", *args, "--state", str(tmp_path / "dev"), "--retries", "0")
    one_error_line(done, 1, "edge pay", "refused")


def test_config_errors_exit_2_on_the_fog_and_on_the_cloud(
    fog_files: FogFiles, tmp_path: Path
) -> None:
    fog_bad = fog_files.config()
    fog_bad.write_text(fog_bad.read_text().replace('"fog-cli"', '"Not A Fog Id"'))
    one_error_line(fogpay("fog", "run", "--config", str(fog_bad)), 2, "fog_id")
    one_error_line(fogpay("fog", "check-config", "--config", "/nonexistent.toml"), 2)
    cloud_bad = tmp_path / "cloud.toml"
    cloud_bad.write_text('store = "sqlite://cloud.db"\ncolour = "blue"\n')
    one_error_line(fogpay("cloud", "--config", str(cloud_bad), "check"), 2, "colour")
    done = fogpay("cloud", "--config", "/nonexistent.toml", "check")
    one_error_line(done, 2, "config /nonexistent.toml", "No such file")


def test_fog_needs_a_config(tmp_path: Path) -> None:
    one_error_line(fogpay("fog", "run"), 2, "--config FILE is required")
    one_error_line(fogpay("fog", "check-config"), 2, "--config FILE is required")


def test_fog_refuses_a_database_of_a_newer_schema(fog_files: FogFiles) -> None:
    conn = connect(fog_files.directory / "fog.db")
    migrate(conn)
    conn.execute("UPDATE schema_version SET version = ?", (len(MIGRATIONS) + 1,))
    conn.close()
    done = fogpay("fog", "run", "--config", str(fog_files.config()))
    one_error_line(done, 2, "fog run", "newer than this fogpay")
    conn = sqlite3.connect(fog_files.directory / "fog.db")
    assert conn.execute("SELECT version FROM schema_version").fetchone() == (
        len(MIGRATIONS) + 1,
    )  # not migrated down or touched
    conn.close()


def test_provisioning_publish_to_no_broker_is_a_runtime_failure(tmp_path: Path) -> None:
    from tests.conftest import free_port

    done = fogpay("issuer", "init", "--dir", str(tmp_path))
    assert done.returncode == 0, done.stderr
    issuer = str(tmp_path / "issuer.seed")
    args = ["--issuer-key", issuer, "--owner-id", "o-1", "--owner-key", str(tmp_path / "o.key")]
    broker = f"mqtt://127.0.0.1:{free_port()}"
    one_error_line(fogpay("owner", "add", *args, "--broker", broker), 1, "owner add")
    # the same command with a bad argument is a usage error
    one_error_line(fogpay("owner", "add", *args, "--broker", "http://x"), 2, "owner add", "mqtt://")


def test_key_file_mistakes_are_usage_errors(tmp_path: Path) -> None:
    key = tmp_path / "k.key"
    assert fogpay("keys", "new", str(key)).returncode == 0
    one_error_line(fogpay("keys", "new", str(key)), 2, "keys new", "refusing to overwrite")
    key.chmod(0o644)
    one_error_line(fogpay("keys", "show", str(key)), 2, "keys show", "must be 0600")
    one_error_line(fogpay("keys", "show", str(tmp_path / "none")), 2, "No such file")


def test_the_python_dash_m_fog_entry_point_reports_the_same_way(fog_files: FogFiles) -> None:
    (fog_files.directory / "fog.db").write_bytes(NOT_A_DATABASE)
    config = fog_files.config()
    import subprocess

    done = subprocess.run(
        [sys.executable, "-m", "fog", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    one_error_line(done, 2, "fog run", "file is not a database")


def test_sandbox_and_demo_usage_errors(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("a file where a directory should be\n")
    done = fogpay("sandbox", "--dir", str(tmp_path / "file"))
    one_error_line(done, 2, "sandbox", "file")
    one_error_line(fogpay("demo", "--seconds", "0"), 2, "demo", "--seconds")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "keep.txt").write_text("not the demo's\n")
    one_error_line(fogpay("demo", "--out", str(theirs), "--seconds", "1"), 2, "demo")
    assert (theirs / "keep.txt").read_text() == "not the demo's\n"


def test_cloud_option_values_that_do_not_parse_name_the_option(tmp_path: Path) -> None:
    store = ("--store", f"sqlite://{tmp_path}/cloud.db", "--issuer-key", str(tmp_path / "i.key"))
    assert fogpay("cloud", *store, "init").returncode == 0
    owner = ("owner", "add", "o-1", "--limit", "1", "--currency", "EUR", "--funding", "f")
    done = fogpay("cloud", *store, *owner, "--key", "zz")
    one_error_line(done, 2, "cloud owner add", "--key: not hex")
    done = fogpay("cloud", *store, "settle", "--until", "someday")
    one_error_line(done, 2, "cloud settle", "someday")
    done = fogpay("cloud", *store, "owner", "show", "o-1")  # well formed, refused: exit 1
    one_error_line(done, 1, "cloud owner show", "no owner 'o-1'")


def test_fog_run_with_its_broker_port_taken_is_a_runtime_failure(fog_files: FogFiles) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = fog_files.config(broker=f"[broker]\nport = {port}\n")
        done = fogpay("fog", "run", "--config", str(config))
    one_error_line(done, 1, "fog run", f"127.0.0.1:{port}", "address already in use")


def test_fog_return_leases_mistakes(fog_files: FogFiles) -> None:
    config = fog_files.config()
    one_error_line(fogpay("fog", "return-leases"), 2, "fog return-leases", "--config")
    one_error_line(fogpay("fog", "return-leases", "--config", str(config)), 2, "no such database")
    (fog_files.directory / "fog.db").write_bytes(b"")  # an empty file: SQLite, no tables
    one_error_line(fogpay("fog", "return-leases", "--config", str(config)), 2, "not a fog database")
