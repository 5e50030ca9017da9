"""Reading a running daemon's metrics endpoint over 127.0.0.1, as Prometheus would."""

import asyncio
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Final

from prometheus_client.parser import text_string_to_metric_families

HTTP_TIMEOUT_S: Final = 10.0
WAIT_TIMEOUT_S: Final = 20.0
POLL_S: Final = 0.05

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def get_sync(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as r:
            return int(r.status), r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


async def get(url: str) -> tuple[int, bytes]:
    return await asyncio.to_thread(get_sync, url)


def parse(text: str) -> Samples:
    """Every sample by (name, sorted labels)."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def scrape(base: str) -> Samples:
    status, body = await get(base + "/metrics")
    assert status == 200, (status, body[:200])
    return parse(body.decode())


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


async def wait_scrape(base: str, predicate: Callable[[Samples], bool]) -> Samples:
    """Scrape until ``predicate`` holds (bounded); returns the samples that satisfied it."""
    async with asyncio.timeout(WAIT_TIMEOUT_S):
        while True:
            samples = await scrape(base)
            if predicate(samples):
                return samples
            await asyncio.sleep(POLL_S)


async def wait_status(url: str, status: int) -> bytes:
    async with asyncio.timeout(WAIT_TIMEOUT_S):
        while True:
            got, body = await get(url)
            if got == status:
                return body
            await asyncio.sleep(POLL_S)


ROOT: Final = Path(__file__).resolve().parents[2]
SUFFIXES: Final = ("_total", "_bucket", "_count", "_sum")


def undocumented(samples: Samples, doc: str) -> list[str]:
    """Metric names in ``samples`` that ``docs/<doc>`` does not name (as `name`)."""
    text = (ROOT / "docs" / doc).read_text()
    names = set()
    for name, _ in samples:
        for suffix in SUFFIXES:
            if name.endswith(suffix) and f"`{name.removesuffix(suffix)}`" in text:
                name = name.removesuffix(suffix)
                break
        names.add(name)
    return sorted(n for n in names if f"`{n}`" not in text)
