"""``fogpay sandbox --broker mosquitto``: the sandbox's broker is Mosquitto, run as a child
process from the shipped ``deploy/mosquitto/fogpay-server.conf`` and ``fogpay.acl``.

Only what a lab needs moves: both listeners bind 127.0.0.1 on the sandbox's ports, the
``/etc/mosquitto`` paths point into ``DIR/mosquitto/`` and the sandbox's lab certificates
(``DIR/tls``), persistence goes to ``DIR/mosquitto/``, and one ACL block is appended for the
``operator`` account of ``sandbox.json`` (publishes trust and lease topics, reads
everything). Accounts: the fog logs in as its ``fog_id``, the cloud as ``issuer`` (the
shipped ACL's roles), the operator as ``operator``: a base password file
(``DIR/mosquitto/base.passwd``) that ``cloud.accounts`` copies into the password file
before one line per registered device, then SIGHUP to Mosquitto (docs/security.md).
"""

import os
import pwd
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cloud.accounts import AccountTargets, mosquitto_hash
from protocol.errors import FogpayError

MOSQUITTO_DIR: Final = "mosquitto"
CONF_FILE: Final = "mosquitto.conf"
ACL_FILE: Final = "fogpay.acl"
PASSWD_FILE: Final = "fogpay.passwd"
BASE_FILE: Final = "base.passwd"
PID_FILE: Final = "mosquitto.pid"
LOG_FILE: Final = "mosquitto.log"
ISSUER_USERNAME: Final = "issuer"
START_TIMEOUT_S: Final = 15.0
STOP_TIMEOUT_S: Final = 10.0
POLL_S: Final = 0.05
SALT_BYTES: Final = 12
HOST: Final = "127.0.0.1"


def shipped_dir() -> Path:
    """The shipped Mosquitto files: the checkout's ``deploy/mosquitto`` or, in an install,
    ``<prefix>/share/fogpay/deploy/mosquitto``."""
    for candidate in (
        Path(__file__).resolve().parents[1] / "deploy" / "mosquitto",
        Path(sys.prefix) / "share" / "fogpay" / "deploy" / "mosquitto",
    ):
        if (candidate / "fogpay-server.conf").is_file():
            return candidate
    raise FogpayError("the shipped deploy/mosquitto files are not installed")


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/bin")
    if found is None:
        raise FogpayError("--broker mosquitto: the mosquitto program is not installed")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def render_conf(shipped: str, *, directory: Path, port: int, tls_port: int, cert: str) -> str:
    """The shipped server config with its ports on 127.0.0.1 and its paths in DIR."""
    mdir = directory / MOSQUITTO_DIR
    paths = {
        "/etc/mosquitto/fogpay.passwd": str(mdir / PASSWD_FILE),
        "/etc/mosquitto/fogpay.acl": str(mdir / ACL_FILE),
        "/etc/mosquitto/certs/server.crt": str(directory / f"{cert}.pem"),
        "/etc/mosquitto/certs/server.key": str(directory / f"{cert}.key"),
        "/etc/mosquitto/certs/ca.crt": str(directory / "tls" / "ca.pem"),
    }
    lines = []
    for line in shipped.splitlines():
        if line.startswith("listener 1883"):
            line = f"listener {port} {HOST}"
        elif line.startswith("listener 8883"):
            line = f"listener {tls_port} {HOST}"
        for old, new in paths.items():
            line = line.replace(old, new)
        lines.append(line)
    if not any(line.startswith("certfile") for line in lines):
        raise FogpayError("fogpay-server.conf: no TLS listener to run")
    user = pwd.getpwuid(os.geteuid()).pw_name  # as root, Mosquitto would drop to "mosquitto"
    lines += [
        "",
        "# fogpay sandbox: the lines Debian's stock mosquitto.conf would give",
        "persistence true",
        f"persistence_location {mdir}/",
        f"log_dest file {mdir / LOG_FILE}",
        f"user {user}",
    ]
    return "\n".join(lines) + "\n"


def render_acl(shipped: str) -> str:
    return shipped + (
        "\n# --- fogpay sandbox: its operator account (sandbox.json's broker) ---\n"
        "user operator\n"
        "topic readwrite fogpay/1/#\n"
    )


def render_base(accounts: dict[str, str], secret: bytes) -> str:
    """Password lines of the fixed accounts (salts derived: the same input, the same file)."""
    import hashlib
    import hmac

    lines = []
    for user, password in sorted(accounts.items()):
        salt = hmac.new(secret, b"sandbox base salt" + user.encode(), hashlib.sha256).digest()
        lines.append(f"{user}:{mosquitto_hash(password, salt[:SALT_BYTES])}")
    return "\n".join(lines) + "\n"


def account_targets(directory: Path) -> AccountTargets:
    mdir = directory / MOSQUITTO_DIR
    return AccountTargets(
        mosquitto_passwd=mdir / PASSWD_FILE,
        mosquitto_base=mdir / BASE_FILE,
        mosquitto_pid_file=mdir / PID_FILE,
    )


@dataclass(slots=True)
class Mosquitto:
    """A Mosquitto child process for the sandbox (never outliving it: SIGTERM at stop)."""

    process: "subprocess.Popen[bytes]"
    port: int
    tls_port: int
    log: Path

    def stop(self) -> int | None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=STOP_TIMEOUT_S)
        return self.process.returncode


def prepare(
    directory: Path,
    *,
    port: int,
    cert: str,
    accounts: dict[str, str],
    secret: bytes,
) -> tuple[int, int]:
    """Write DIR/mosquitto/ (config, ACL, base password file); returns (port, tls_port)."""
    shipped = shipped_dir()
    mdir = directory / MOSQUITTO_DIR
    mdir.mkdir(mode=0o700, exist_ok=True)
    (mdir / PID_FILE).unlink(missing_ok=True)  # a stale one must not be signalled
    port = port or free_port()
    tls_port = free_port()
    conf = render_conf(
        (shipped / "fogpay-server.conf").read_text(),
        directory=directory,
        port=port,
        tls_port=tls_port,
        cert=cert,
    )
    (mdir / CONF_FILE).write_text(conf)
    (mdir / ACL_FILE).write_text(render_acl((shipped / ACL_FILE).read_text()))
    base = mdir / BASE_FILE
    base.touch(mode=0o600)
    base.write_text(render_base(accounts, secret))
    return port, tls_port


def _with_parent_death(argv: list[str]) -> list[str]:
    """``argv`` under util-linux's ``setpriv --pdeathsig TERM`` when there is one: Mosquitto
    then gets SIGTERM when the thread that started it dies, so a SIGKILLed sandbox leaves no
    Mosquitto holding its ports (no preexec_fn: the sandbox has threads by then)."""
    setpriv = shutil.which("setpriv")
    return argv if setpriv is None else [setpriv, "--pdeathsig", "TERM", *argv]


def start(directory: Path, port: int, tls_port: int) -> Mosquitto:
    """Start Mosquitto (the password file must exist) and wait until both ports answer.
    Call it on the main thread: the child dies with the thread that started it."""
    mdir = directory / MOSQUITTO_DIR
    log = mdir / LOG_FILE
    with (mdir / "mosquitto.out").open("wb") as out:
        process = subprocess.Popen(
            _with_parent_death([mosquitto_binary(), "-c", str(mdir / CONF_FILE)]),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,  # a Ctrl-C reaches only the sandbox, which stops it in order
        )
    (mdir / PID_FILE).write_text(f"{process.pid}\n")
    m = Mosquitto(process, port, tls_port, log)
    deadline = time.monotonic() + START_TIMEOUT_S
    waiting = [port, tls_port]
    while waiting:
        if process.poll() is not None:
            raise FogpayError(f"mosquitto exited {process.returncode} at start (see {log})")
        if time.monotonic() > deadline:
            m.stop()
            raise FogpayError(f"mosquitto: port {waiting[0]} not answering (see {log})")
        try:
            with socket.create_connection((HOST, waiting[0]), timeout=1):
                waiting.pop(0)
        except OSError:
            time.sleep(POLL_S)
    return m
