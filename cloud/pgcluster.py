"""A throwaway PostgreSQL cluster on 127.0.0.1 for tests and benchmarks (not production).

``start_cluster()`` runs Debian's ``initdb`` and ``pg_ctl`` (as the ``postgres`` user when we
are root: PostgreSQL refuses to run as root) in a temporary data directory on a free port,
with trust authentication on loopback only, and returns its DSN; ``stop()`` removes it.
"""

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Final

START_TIMEOUT_S: Final = 60
PG_USER: Final = "postgres"


class ClusterError(RuntimeError):
    pass


def pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Cluster:
    dsn: str
    data_dir: Path
    pg_ctl: str

    def stop(self) -> None:
        _run([self.pg_ctl, "-D", str(self.data_dir), "-m", "immediate", "-w", "stop"], False)
        shutil.rmtree(self.data_dir.parent, ignore_errors=True)


def _as_pg(cmd: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return cmd
    return ["runuser", "-u", PG_USER, "--", *cmd]


def _run(cmd: list[str], check: bool = True) -> None:
    done = subprocess.run(_as_pg(cmd), capture_output=True, text=True, timeout=START_TIMEOUT_S)
    if check and done.returncode != 0:
        raise ClusterError(f"{cmd[0]} failed: {done.stderr.strip()[-400:]}")


def available() -> bool:
    return pg_bin("initdb") is not None and pg_bin("pg_ctl") is not None


def start_cluster(*, fsync: bool = False) -> Cluster:
    initdb, pg_ctl = pg_bin("initdb"), pg_bin("pg_ctl")
    if initdb is None or pg_ctl is None:
        raise ClusterError("initdb/pg_ctl not found (apt-get install postgresql)")
    top = Path(tempfile.mkdtemp(prefix="fogpay-pg-"))
    data = top / "data"
    data.mkdir()
    if os.geteuid() == 0:
        shutil.chown(top, PG_USER)
        shutil.chown(data, PG_USER)
    port = free_port()
    try:
        _run([initdb, "-D", str(data), "-U", PG_USER, "--auth=trust", "-E", "UTF8", "--no-sync"])
        opts = (
            f"-c listen_addresses=127.0.0.1 -p {port} -k {data} -c fsync={'on' if fsync else 'off'}"
        )
        _run([pg_ctl, "-D", str(data), "-o", opts, "-l", str(data / "log"), "-w", "start"])
    except (ClusterError, subprocess.TimeoutExpired):
        shutil.rmtree(top, ignore_errors=True)
        raise
    return Cluster(f"postgresql://{PG_USER}@127.0.0.1:{port}/postgres", data, pg_ctl)
