"""Open a cloud store by URL: the one place that knows both backends (``cloud.store`` only
defines the interface they share, so neither backend imports its opener).

It is also the seam where a store that cannot be opened becomes one ``StoreOpenError`` line
(the file is not a database, its directory is missing, PostgreSQL refuses the connection,
asyncpg is not installed) instead of a library's exception, and where an unknown URL scheme
is refused with the list of known ones rather than taken as a file name.
"""

import sqlite3
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

from cloud.store import Store
from protocol.errors import FogpayError
from runtime.cli import describe

SQLITE_SCHEMES: Final = ("sqlite",)
POSTGRES_SCHEMES: Final = ("postgresql", "postgres")
KNOWN_SCHEMES: Final = ", ".join(f"{s}://" for s in (*SQLITE_SCHEMES, *POSTGRES_SCHEMES))
ASYNCPG_MISSING: Final = "PostgreSQL support needs asyncpg: pip install 'fogpay[postgres]'"


class StoreOpenError(FogpayError):
    """The store named by the configuration cannot be opened (a configuration problem: the
    command line tools exit 2). The message is ``store <where>: <why>``."""


class StoreUnavailableError(FogpayError):
    """The store's server does not answer (refused, unreachable, timed out): a runtime
    failure, not a configuration one (the command line tools exit 1; systemd restarts the
    service). The message is ``store <where>: <why>``."""


def store_kind(url: str) -> str:
    """``"sqlite"`` or ``"postgresql"``; raises StoreOpenError for any other scheme. A URL
    without ``://`` is a SQLite file path."""
    if "://" not in url:
        return "sqlite"
    scheme = url.split("://", 1)[0].lower()
    if scheme in SQLITE_SCHEMES:
        return "sqlite"
    if scheme in POSTGRES_SCHEMES:
        return "postgresql"
    raise StoreOpenError(
        f"store {scheme}://...: unknown scheme {scheme!r} (known: {KNOWN_SCHEMES})"
    )


def redacted(url: str) -> str:
    """The URL without its password (for error lines and logs)."""
    if store_kind(url) == "sqlite":
        return url
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


async def open_store(url: str) -> Store:
    """``sqlite:///path/to/cloud.db`` (or a plain path) or ``postgresql://...``."""
    if store_kind(url) == "postgresql":
        return await _open_postgres(url)
    from cloud.sqlitestore import SqliteStore

    path = url.removeprefix("sqlite://")
    try:
        return await SqliteStore.open(path)
    except sqlite3.Error as exc:
        raise StoreOpenError(f"store {path}: {_sqlite_why(path, exc)}") from None


def _sqlite_why(path: str, exc: sqlite3.Error) -> str:
    directory = Path(path).parent
    if not directory.is_dir():
        return f"directory {directory} does not exist"
    if Path(path).is_dir():
        return "is a directory"
    return str(exc)


async def _open_postgres(url: str) -> Store:
    try:
        from cloud.pgstore import PgStore
    except ModuleNotFoundError as exc:
        if exc.name != "asyncpg":
            raise
        raise StoreOpenError(f"store {redacted(url)}: {ASYNCPG_MISSING}") from None
    import asyncpg

    try:
        return await PgStore.open(url)
    except OSError as exc:  # refused, unreachable, and TimeoutError (connect timeout)
        raise StoreUnavailableError(f"store {redacted(url)}: {describe(exc)}") from None
    except (ValueError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        # ValueError: the DSN; PostgresError: e.g. no such database or role, wrong password
        raise StoreOpenError(f"store {redacted(url)}: {describe(exc)}") from None
