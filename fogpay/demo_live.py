"""What the demo shows while the devices pay: on a terminal, a live panel (rich) redrawn twice
a second: time, payments by outcome, latency so far, and each paying owner's draws against
its credit limit; anywhere else (a pipe, a file, CI), one plain line every two seconds.

The panel reads the demo's ``Outcomes`` as the payments update them; rendering is pure
(``panel``, ``plain_line``) and runs on the event loop between payments, so it needs no lock.
"""

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Final

from rich.console import Console
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from fogpay import demo_cast as cast
from fogpay.demo_pay import Outcomes
from protocol.money import format_minor, minor_unit_micros

LIVE_INTERVAL_S: Final = 0.5
PLAIN_INTERVAL_S: Final = 2.0
BAR_WIDTH: Final = 30


def owner_draws(outcomes: Outcomes) -> Counter[str]:
    """Micros drawn so far per owner (from the devices' ok payments)."""
    out: Counter[str] = Counter()
    for device, micros in outcomes.drawn.items():
        out[cast.device_spec(device).group.owner_id] += micros
    return out


def _latency(outcomes: Outcomes) -> str:
    h = outcomes.latency
    if h.total == 0:
        return "p50 -  p99 -"
    return f"p50 {h.percentile(50) / 1000:.1f} ms  p99 {h.percentile(99) / 1000:.1f} ms"


def plain_line(outcomes: Outcomes, *, elapsed_s: float, seconds: float) -> str:
    s = outcomes.by_status
    return (
        f"[{min(elapsed_s, seconds):5.1f}/{seconds:g} s] {outcomes.sent} paid: {s['ok']} ok, "
        f"{s['declined']} declined, {s['timeout'] + s['error']} failed, {outcomes.skipped} "
        f"skipped; {sum(outcomes.resent.values())} resent; {_latency(outcomes)}"
    )


def _cents(micros: int, currency: str) -> str:
    """Whole minor units, rounded down (a display, not an amount)."""
    unit = minor_unit_micros(currency)
    return format_minor(micros // unit, currency)


def panel(outcomes: Outcomes, *, elapsed_s: float, seconds: float, planned: int) -> Table:
    """The live panel: progress, outcomes, latency, and draws per paying owner."""
    s = outcomes.by_status
    shown = min(elapsed_s, seconds)
    grid = Table.grid(padding=(0, 2))
    top = Table.grid(padding=(0, 1))
    top.add_row(
        ProgressBar(total=seconds, completed=shown, width=BAR_WIDTH),
        Text(f"{shown:4.1f} / {seconds:g} s"),
    )
    grid.add_row(Text("fogpay demo", style="bold"), top)
    counts = Text(f"{outcomes.sent} of {planned} paid: ")
    counts.append(f"{s['ok']} ok", style="green")
    counts.append(", ")
    counts.append(f"{s['declined']} declined", style="yellow")
    failed = s["timeout"] + s["error"]
    counts.append(f", {failed} failed", style="red" if failed else "")
    counts.append(f", {outcomes.skipped} skipped, {sum(outcomes.resent.values())} resent")
    grid.add_row(Text("payments"), counts)
    grid.add_row(Text("latency"), Text(_latency(outcomes)))
    owners = Table.grid(padding=(0, 1))
    drawn = owner_draws(outcomes)
    for o in cast.PAYERS:
        micros = drawn[o.owner_id]
        owners.add_row(
            Text(o.owner_id),
            ProgressBar(
                total=o.limit_micros, completed=min(micros, o.limit_micros), width=BAR_WIDTH
            ),
            Text(f"{_cents(micros, o.currency):>7} of {_cents(o.limit_micros, o.currency)}")
            + Text(f" {o.currency}"),
        )
    grid.add_row(Text("drawn"), owners)
    return grid


@contextlib.asynccontextmanager
async def _ticking(interval_s: float, draw: Callable[[], None]) -> AsyncIterator[None]:
    """Call ``draw`` every ``interval_s`` while the block runs, and once more at its end."""
    done = asyncio.Event()

    async def tick() -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval_s):
                    await done.wait()
            draw()
            if done.is_set():
                return

    task = asyncio.create_task(tick(), name="demo.progress")
    try:
        yield
    finally:
        done.set()
        await task


@contextlib.asynccontextmanager
async def showing(
    outcomes: Outcomes, *, seconds: float, planned: int, console: Console | None = None
) -> AsyncIterator[None]:
    """Show progress while the block runs: live on a terminal, plain lines elsewhere."""
    console = console or Console()
    start = time.monotonic()

    def now() -> dict[str, float]:
        return {"elapsed_s": time.monotonic() - start, "seconds": seconds}

    if not console.is_terminal:

        def line() -> None:  # as is: no wrapping, no markup, flushed for a pipe
            print(plain_line(outcomes, **now()), file=console.file, flush=True)

        async with _ticking(PLAIN_INTERVAL_S, line):
            yield
        return
    first = panel(outcomes, elapsed_s=0.0, seconds=seconds, planned=planned)
    with Live(first, console=console, auto_refresh=False, transient=False) as live:

        def draw() -> None:
            live.update(panel(outcomes, **now(), planned=planned), refresh=True)

        async with _ticking(LIVE_INTERVAL_S, draw):
            yield
