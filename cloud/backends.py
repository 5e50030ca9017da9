"""Open a cloud store by URL: the one place that knows both backends (``cloud.store`` only
defines the interface they share, so neither backend imports its opener)."""

from cloud.store import Store


async def open_store(url: str) -> Store:
    """``sqlite:///path/to/cloud.db`` (or a plain path) or ``postgresql://...``."""
    if url.startswith(("postgresql://", "postgres://")):
        from cloud.pgstore import PgStore

        return await PgStore.open(url)
    from cloud.sqlitestore import SqliteStore

    path = url.removeprefix("sqlite://")
    return await SqliteStore.open(path)
