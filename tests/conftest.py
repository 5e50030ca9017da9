"""Shared fixtures: real MQTT brokers on 127.0.0.1 and a free port.

- ``amqtt_broker``: an in-process amqtt broker (anonymous access, explicit plugin set so
  amqtt 0.12's deprecated default set stays off).
- ``mosquitto_broker``: a Mosquitto subprocess (``/usr/sbin/mosquitto``) with a generated
  config: anonymous access, ``set_tcp_nodelay true``, raised queue limits, no persistence.
  Tests using it should carry ``@pytest.mark.mosquitto``.

Services: a test marked ``mosquitto`` or ``postgres`` is skipped when the service is not
installed, with one reason saying how to get it, and the run ends with one summary line per
missing service. Under CI (``CI=true``) it fails instead: CI installs both (``.ci/run``).
``FOGPAY_TEST_MOSQUITTO`` names the mosquitto binary when it is not on PATH, /usr/sbin or
/usr/local/sbin (a path that does not exist: treated as not installed).

Both yield a ``BrokerEndpoint``; ``start_mosquitto`` is there for tests that need extra
config lines (ACLs, passwords) or to restart a broker.
"""

import asyncio
import gc
import os
import shutil
import socket
import subprocess
import warnings
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import pytest

from fog.brokerauth import DeliverBeforeDisconnect

SBIN_DIRS: Final = ("/usr/local/sbin", "/usr/sbin")  # Debian's mosquitto; not on a user's PATH
MOSQUITTO_ENV: Final = "FOGPAY_TEST_MOSQUITTO"
MOSQUITTO_MISSING: Final = (
    "mosquitto not installed: run `sudo apt-get install mosquitto` or `sudo make services`"
)
POSTGRES_MISSING: Final = (
    "PostgreSQL not installed: run `sudo apt-get install postgresql` or `sudo make services`"
    " (or set FOGPAY_TEST_PG_DSN)"
)
BROKER_START_TIMEOUT_S: Final = 10.0
BROKER_STOP_TIMEOUT_S: Final = 5.0


@dataclass(frozen=True, slots=True)
class BrokerEndpoint:
    host: str
    port: int
    username: str | None = None
    password: str | None = None

    @property
    def url(self) -> str:
        auth = f"{self.username}:{self.password}@" if self.username else ""
        return f"mqtt://{auth}{self.host}:{self.port}"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def process_running(pid: int) -> bool:
    """``pid`` runs (a zombie waiting to be reaped has exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def under_ci() -> bool:
    """CI must not skip what it should test: a missing service fails there."""
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _search_path(*extra: str) -> str:
    return os.pathsep.join([os.environ.get("PATH", ""), *extra])


def mosquitto_path() -> str | None:
    override = os.environ.get(MOSQUITTO_ENV)
    if override is not None:
        return override if os.access(override, os.X_OK) else None
    return shutil.which("mosquitto", path=_search_path(*SBIN_DIRS))


def mosquitto_passwd_path() -> str | None:
    """``mosquitto_passwd`` (same Debian package: /usr/bin), only when mosquitto is there."""
    binary = mosquitto_path()
    if binary is None:
        return None
    return shutil.which("mosquitto_passwd", path=_search_path(str(Path(binary).parent)))


def mosquitto_available() -> bool:
    return mosquitto_path() is not None and mosquitto_passwd_path() is not None


def postgres_available() -> bool:
    from cloud import pgcluster

    return bool(os.environ.get("FOGPAY_TEST_PG_DSN")) or pgcluster.available()


_skipped_for: dict[str, int] = {}
SERVICE_REASONS: Final = (MOSQUITTO_MISSING, POSTGRES_MISSING)


def missing_service(reason: str) -> None:
    """Skip the running test for a missing service (counted for the summary line by
    ``pytest_runtest_logreport``), or fail it under CI."""
    if under_ci():
        pytest.fail(f"CI=true: {reason} (.ci/run installs it)")
    pytest.skip(reason)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Count the service skips from the reports: under pytest-xdist (`make test` runs -n 2)
    the tests skip in the workers, and only the reports reach the process that prints the
    summary."""
    if not report.skipped or not isinstance(report.longrepr, tuple):
        return
    message = report.longrepr[2].removeprefix("Skipped: ")
    if message in SERVICE_REASONS:
        _skipped_for[message] = _skipped_for.get(message, 0) + 1


def require_mosquitto() -> str:
    path = mosquitto_path()
    if path is None or mosquitto_passwd_path() is None:
        missing_service(MOSQUITTO_MISSING)
    assert path is not None
    return path


def pytest_runtest_setup(item: pytest.Item) -> None:
    """A test marked ``mosquitto`` or ``postgres`` is skipped (failed under CI) before its
    fixtures run when the service is not installed."""
    for marker, available, reason in (
        ("mosquitto", mosquitto_available, MOSQUITTO_MISSING),
        ("postgres", postgres_available, POSTGRES_MISSING),
    ):
        if item.get_closest_marker(marker) is not None and not available():
            missing_service(reason)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for reason, count in sorted(_skipped_for.items()):
        noun = "test" if count == 1 else "tests"
        terminalreporter.write_line(f"fogpay: {count} {noun} skipped: {reason}", yellow=True)


def wait_port(
    host: str,
    port: int,
    *,
    timeout_s: float = BROKER_START_TIMEOUT_S,
    process: "subprocess.Popen[bytes] | None" = None,
) -> None:
    """Block until ``host:port`` accepts TCP connections (bounded in time); fails at once if
    ``process`` exits first."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if process is not None and process.poll() is not None:
                raise TimeoutError(f"process exited with {process.returncode}") from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listening on {host}:{port}") from None
            time.sleep(0.02)


@dataclass
class MosquittoProcess:
    endpoint: BrokerEndpoint
    process: subprocess.Popen[bytes]
    conf: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=BROKER_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=BROKER_STOP_TIMEOUT_S)


def start_mosquitto(
    directory: Path, *, port: int | None = None, extra: str = "", anonymous: bool = True
) -> MosquittoProcess:
    """Start Mosquitto on 127.0.0.1:``port`` (free port by default) with a config in
    ``directory``; ``extra`` lines are appended (password_file, acl_file...)."""
    port = port or free_port()
    text = (
        f"listener {port} 127.0.0.1\n"
        f"allow_anonymous {'true' if anonymous else 'false'}\n"
        "persistence false\n"
        "set_tcp_nodelay true\n"
        "max_queued_messages 100000\n"
        "max_inflight_messages 1000\n"
        "max_packet_size 1048576\n"
        "log_dest stderr\n"
        "log_type error\n"
        "log_type warning\n" + extra
    )
    return launch_mosquitto(directory, port, text)


def launch_mosquitto(directory: Path, port: int, text: str) -> MosquittoProcess:
    """Start Mosquitto with the config ``text`` (which must listen on 127.0.0.1:``port``)."""
    binary = require_mosquitto()
    conf = directory / f"mosquitto-{port}.conf"
    # as root, mosquitto drops to user "mosquitto", which cannot read pytest's tmp dirs
    conf.write_text(text + ("\nuser root\n" if os.geteuid() == 0 else ""))
    log = (directory / f"mosquitto-{port}.log").open("wb")
    process = subprocess.Popen([binary, "-c", str(conf)], stdout=log, stderr=log)
    log.close()
    try:
        wait_port("127.0.0.1", port, process=process)
    except TimeoutError:
        process.kill()
        process.wait()
        raise
    return MosquittoProcess(BrokerEndpoint("127.0.0.1", port), process, conf)


@pytest.fixture
def mosquitto_broker(tmp_path: Path) -> Iterator[BrokerEndpoint]:
    broker = start_mosquitto(tmp_path)
    try:
        yield broker.endpoint
    finally:
        broker.stop()


@pytest.fixture
async def amqtt_broker() -> AsyncIterator[BrokerEndpoint]:
    port = free_port()
    # amqtt's Broker with hole 5 of fog/brokerauth.py closed: what a client sent before its
    # DISCONNECT is delivered (stock amqtt drops it; tools that publish and disconnect lost
    # messages under load)
    broker = DeliverBeforeDisconnect(
        {
            "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
            # explicit plugins: amqtt 0.12's default set warns (DeprecationWarning)
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
            },
        }
    )
    await broker.start()
    try:
        yield BrokerEndpoint("127.0.0.1", port)
    finally:
        async with asyncio.timeout(BROKER_STOP_TIMEOUT_S):
            await broker.shutdown()
        del broker
        # amqtt 0.12 leaves the server side of a connection accepted while it shuts down
        # unclosed (its StreamWriter and socket, allocated in asyncio's _accept_connection);
        # collected later, with this test's loop closed, they failed an unrelated test with
        # ResourceWarnings. Collected here, while the loop runs, and closed quietly.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()
