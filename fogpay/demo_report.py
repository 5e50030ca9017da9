"""The demo's pictures: the answer-latency histogram (terminal and SVG) and each owner's lease
drawdown over time, in ``DIR/report.html``.

``report.html`` is one self-contained file: inline CSS and inline SVG, no script, no font,
no image, no link: it opens offline and shows the same thing everywhere. It is well-formed
XML (XHTML served as HTML), so a test can read its figures back with ``ElementTree``.

The drawdown is read from where it lives, as the summary is: leases (amount, grant time,
expiry) from the cloud's ``leases`` table, draws (amount, lease, owner) from the cloud's
``transfers`` joined by intent id with the time the fog signed into each receipt the devices
hold. For an owner, *room* at time t is what its live leases still allow (each lease from its
grant to its expiry, less its draws until t): the fog's budget for that owner; *drawn* is the
running total. The histogram counts the demo's ok payments, from sealing an intent to its
verified receipt (resends included).
"""

import bisect
import html
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from cloud.store import Store, Tx
from edge.device import Device
from fogpay import demo_cast as cast
from protocol.money import format_micros

# Upper edges of the latency bins, in ms (a 1-1.5-2-3-5-7 ladder: a fog answers in
# milliseconds, a payment that waited for a lease in hundreds); the last bin is open.
LATENCY_EDGES_MS: Final = (
    *(1, 1.5, 2, 3, 4, 5, 6, 7, 8, 10, 12, 15, 20, 25, 30, 40, 50, 70),
    *(100, 150, 200, 300, 500, 700, 1000, 1500, 2000, 3000, 5000),
)
TERMINAL_BAR_CHARS: Final = 40
SERIES_POINTS_MAX: Final = 1500  # per owner in the SVG; more are thinned evenly
CHART_W: Final = 640
CHART_H: Final = 220
MARGIN_L: Final = 64
MARGIN_R: Final = 16
MARGIN_T: Final = 16
MARGIN_B: Final = 36
LABEL_W: Final = 90  # room a 'p99 1234.5 ms' label needs at 11px


def latency_bins(latencies_us: Iterable[int]) -> list[dict[str, Any]]:
    """Counts per bin: ``[{"lo_ms", "hi_ms" (None: open), "count"}]``, every bin, in order."""
    counts = [0] * (len(LATENCY_EDGES_MS) + 1)
    for us in latencies_us:
        counts[bisect.bisect_left(LATENCY_EDGES_MS, us / 1000)] += 1
    lows = (0, *LATENCY_EDGES_MS)
    highs: tuple[float | None, ...] = (*LATENCY_EDGES_MS, None)
    return [
        {"lo_ms": lo, "hi_ms": hi, "count": n}
        for lo, hi, n in zip(lows, highs, counts, strict=True)
    ]


def _trimmed(bins: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """From the first bin with a count to the last one."""
    used = [i for i, b in enumerate(bins) if b["count"]]
    return list(bins[used[0] : used[-1] + 1]) if used else []


def _bin_label(b: dict[str, Any]) -> str:
    return f"{b['lo_ms']:g}-{b['hi_ms']:g} ms" if b["hi_ms"] is not None else f">{b['lo_ms']:g} ms"


def terminal_histogram(bins: Sequence[dict[str, Any]], *, width: int = TERMINAL_BAR_CHARS) -> str:
    """One line per bin (empty edges trimmed): label, bar scaled to the largest, count."""
    rows = _trimmed(bins)
    if not rows:
        return "(no ok payments)"
    top = max(b["count"] for b in rows)
    lines = []
    for b in rows:
        n = b["count"]
        bar = "█" * math.ceil(n / top * width) if n else ""
        lines.append(f"{_bin_label(b):>13} {bar:<{width}} {n}")
    return "\n".join(lines)


# --- drawdown -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class LeaseRow:
    lease_id: bytes
    owner_id: str
    currency: str
    amount_micros: int
    granted_ms: int
    not_after_ms: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Draw:
    at_ms: int
    owner_id: str
    lease_id: bytes
    amount_micros: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Drawdown:
    owner_id: str
    currency: str
    limit_micros: int
    leases: int
    points: list[tuple[int, int, int]]  # (at_ms, room_micros, drawn_micros), time order

    @property
    def drawn_micros(self) -> int:
        return self.points[-1][2] if self.points else 0


def receipt_times(devices: Iterable[Device]) -> dict[bytes, int]:
    """Intent id -> the time the fog signed into its ok receipt, for every receipt held."""
    return {r.msg.intent_id: r.msg.time_ms for d in devices for r in d.receipts() if r.msg.ok}


async def read_ledger(store: Store) -> tuple[list[LeaseRow], list[tuple[bytes, str, bytes, int]]]:
    """The demo fog's leases, and its transfers as (intent_id, owner, lease_id, micros)."""

    async def fn(tx: Tx) -> tuple[list[LeaseRow], list[tuple[bytes, str, bytes, int]]]:
        leases = await tx.fetchall(
            "SELECT lease_id, owner_id, currency, amount_micros, granted_ms, not_after_ms "
            "FROM leases WHERE fog_id = ? ORDER BY granted_ms",
            (cast.FOG_ID,),
        )
        transfers = await tx.fetchall(
            "SELECT intent_id, debit, lease_id, amount_micros FROM transfers WHERE fog_id = ?",
            (cast.FOG_ID,),
        )
        rows = [
            LeaseRow(
                lease_id=bytes(r[0]),
                owner_id=str(r[1]),
                currency=str(r[2]),
                amount_micros=int(r[3]),
                granted_ms=int(r[4]),
                not_after_ms=int(r[5]),
            )
            for r in leases
        ]
        return rows, [(bytes(r[0]), str(r[1]), bytes(r[2]), int(r[3])) for r in transfers]

    result: tuple[list[LeaseRow], list[tuple[bytes, str, bytes, int]]] = await store.transact(fn)
    return result


def draws_from(
    transfers: Iterable[tuple[bytes, str, bytes, int]], times: dict[bytes, int]
) -> list[Draw]:
    """Transfers whose receipt a device holds, timed by that receipt."""
    return [
        Draw(at_ms=times[i], owner_id=owner, lease_id=lease, amount_micros=micros)
        for i, owner, lease, micros in transfers
        if i in times
    ]


def drawdowns(leases: Sequence[LeaseRow], draws: Sequence[Draw], *, end_ms: int) -> list[Drawdown]:
    """Per paying owner (cast order), room and drawn over time, from its first grant to
    ``end_ms``. Pure."""
    out = []
    for owner in cast.PAYERS:
        mine = [x for x in leases if x.owner_id == owner.owner_id]
        if not mine:
            continue
        # events at a time: grants first, then draws, then expiries (a draw at the
        # expiry millisecond was still on a live lease)
        events: list[tuple[int, int, bytes, int]] = [(x.granted_ms, 0, x.lease_id, 0) for x in mine]
        events += [
            (d.at_ms, 1, d.lease_id, d.amount_micros) for d in draws if d.owner_id == owner.owner_id
        ]
        events += [(x.not_after_ms, 2, x.lease_id, 0) for x in mine if x.not_after_ms <= end_ms]
        events.sort()
        amount = {x.lease_id: x.amount_micros for x in mine}
        left: dict[bytes, int] = {}
        drawn = 0
        points = []
        for at, kind, lease, micros in events:
            if kind == 0:
                left[lease] = amount[lease]
            elif kind == 1:
                drawn += micros
                if lease in left:
                    left[lease] -= micros
            else:
                left.pop(lease, None)
            points.append((at, sum(left.values()), drawn))
        if points and points[-1][0] < end_ms:
            points.append((end_ms, points[-1][1], drawn))
        out.append(
            Drawdown(
                owner_id=owner.owner_id,
                currency=owner.currency,
                limit_micros=owner.limit_micros,
                leases=len(mine),
                points=points,
            )
        )
    return out


def _thin(points: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    if len(points) <= SERIES_POINTS_MAX:
        return points
    step = len(points) / (SERIES_POINTS_MAX - 1)
    picked = [points[int(i * step)] for i in range(SERIES_POINTS_MAX - 1)]
    return [*picked, points[-1]]


# --- SVG and HTML ---------------------------------------------------------------------------

CSS: Final = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d2733;
       margin: 2em auto; max-width: 1000px; padding: 0 1em; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { font-size: 1.15em; margin-top: 2em; }
.sub { color: #5b6673; } .figs { display: flex; flex-wrap: wrap; gap: 1em; margin: 1em 0; }
.fig { border: 1px solid #d5dbe1; border-radius: 6px; padding: 0.5em 1em; min-width: 8em; }
.fig b { display: block; font-size: 1.5em; } .ok { color: #1a7f37; } .bad { color: #c62828; }
table { border-collapse: collapse; margin: 0.5em 0; }
td, th { padding: 2px 10px; text-align: left; border-bottom: 1px solid #eef1f4; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
svg { background: #fbfcfd; border: 1px solid #e3e8ed; border-radius: 4px; }
svg text { font: 11px system-ui, sans-serif; fill: #5b6673; }
.bar { fill: #3b82c4; } .p50 { stroke: #1a7f37; } .p99 { stroke: #c77700; }
.room { fill: none; stroke: #3b82c4; stroke-width: 2; }
.drawn { fill: none; stroke: #c77700; stroke-width: 2; }
.limit { stroke: #c62828; stroke-dasharray: 5 4; } .axis { stroke: #9aa5b1; }
.grid { stroke: #eef1f4; } .key { display: inline-block; width: 1.5em; height: 3px;
       vertical-align: middle; margin: 0 0.3em 0 1em; }
"""


def _e(x: object) -> str:
    return html.escape(str(x), quote=True)


def _svg_open(w: int, h: int, label: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
        f'viewBox="0 0 {w} {h}" role="img" aria-label="{_e(label)}">'
    )


def histogram_svg(bins: Sequence[dict[str, Any]], p50_ms: float, p99_ms: float) -> str:
    """Bars per latency bin (empty edges trimmed; equal widths, log-like ladder), with the
    p50 and p99 marked."""
    rows = _trimmed(bins)
    w, h = CHART_W + 200, CHART_H + 40
    if not rows:
        return _svg_open(w, h, "no ok payments") + "<text x='20' y='30'>no ok payments</text></svg>"
    plot_w, plot_h = w - MARGIN_L - MARGIN_R, h - MARGIN_T - MARGIN_B - 20
    top = max(b["count"] for b in rows) * 1.15  # headroom for the p50/p99 labels
    slot = plot_w / len(rows)
    parts = [_svg_open(w, h, "answer latency histogram")]
    base = MARGIN_T + plot_h
    parts.append(
        f'<line class="axis" x1="{MARGIN_L}" y1="{base}" x2="{w - MARGIN_R}" y2="{base}"/>'
    )
    for tick in _ticks(top / 1.15):
        y = base - tick / top * plot_h
        parts.append(
            f'<line class="grid" x1="{MARGIN_L}" y1="{y:.1f}" x2="{w - MARGIN_R}" y2="{y:.1f}"/>'
        )
        parts.append(f'<text x="{MARGIN_L - 6}" y="{y + 4:.1f}" text-anchor="end">{tick:g}</text>')
    for i, b in enumerate(rows):
        x = MARGIN_L + i * slot
        bh = b["count"] / top * plot_h
        label = _bin_label(b)
        parts.append(
            f'<rect class="bar" data-count="{b["count"]}" data-bin="{_e(label)}" '
            f'x="{x + 1:.1f}" y="{base - bh:.1f}" width="{max(slot - 2, 1):.1f}" '
            f'height="{bh:.1f}"><title>{_e(label)}: {b["count"]}</title></rect>'
        )
        if i % max(1, len(rows) // 12) == 0:
            parts.append(
                f'<text x="{x:.1f}" y="{base + 14}" text-anchor="start">{b["lo_ms"]:g}</text>'
            )
    for row, (cls, value) in enumerate((("p50", p50_ms), ("p99", p99_ms))):
        x = MARGIN_L + _slot_position(rows, value) * slot
        # a label near the right edge goes left of its line (it ran off the chart when the
        # p99 fell in the last bar); p99 one line lower, so close p50 and p99 don't overlap
        near_edge = x > w - MARGIN_R - LABEL_W
        lx, anchor = (x - 4, "end") if near_edge else (x + 4, "start")
        parts.append(
            f'<line class="{cls}" x1="{x:.1f}" y1="{MARGIN_T}" x2="{x:.1f}" y2="{base}" '
            f'stroke-width="2"/><text x="{lx:.1f}" y="{MARGIN_T + 12 + 14 * row}" '
            f'text-anchor="{anchor}">{cls} {value:.1f} ms</text>'
        )
    parts.append(
        f'<text x="{MARGIN_L + plot_w / 2:.0f}" y="{h - 8}" text-anchor="middle">'
        "answer latency, ms (bins widen with the value)</text></svg>"
    )
    return "".join(parts)


def _slot_position(rows: Sequence[dict[str, Any]], value_ms: float) -> float:
    """Where ``value_ms`` falls on the bar axis (bin index plus the fraction inside it)."""
    for i, b in enumerate(rows):
        hi = b["hi_ms"]
        if hi is None or value_ms <= hi:
            lo = b["lo_ms"]
            frac = 0.5 if hi is None else (value_ms - lo) / (hi - lo)
            return i + min(max(frac, 0.0), 1.0)
    return float(len(rows))


def _ticks(top: float, n: int = 4) -> list[float]:
    """About ``n`` round tick values from 0 to ``top``."""
    if top <= 0:
        return [0.0]
    raw = top / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    return [i * step for i in range(int(top / step) + 1)]


def drawdown_svg(d: Drawdown, *, t0_ms: int, end_ms: int) -> str:
    """Room on live leases and the running total drawn, in the owner's currency, against
    seconds since the payments started; the credit limit dashed."""
    w, h = CHART_W, CHART_H
    pts = _thin(d.points)
    x_lo = min(pts[0][0], t0_ms) if pts else t0_ms
    span_ms = max(end_ms - x_lo, 1)
    top = max([d.limit_micros, *(p[1] for p in pts), *(p[2] for p in pts), 1])
    plot_w, plot_h = w - MARGIN_L - MARGIN_R, h - MARGIN_T - MARGIN_B

    def x(at: int) -> float:
        return MARGIN_L + (at - x_lo) / span_ms * plot_w

    def y(micros: int) -> float:
        return MARGIN_T + plot_h - micros / top * plot_h

    parts = [_svg_open(w, h, f"lease drawdown of {d.owner_id}")]
    for tick in _ticks(top / 1_000_000):
        ty = y(int(tick * 1_000_000))
        parts.append(
            f'<line class="grid" x1="{MARGIN_L}" y1="{ty:.1f}" x2="{w - MARGIN_R}" y2="{ty:.1f}"/>'
        )
        parts.append(f'<text x="{MARGIN_L - 6}" y="{ty + 4:.1f}" text-anchor="end">{tick:g}</text>')
    before = _ticks((t0_ms - x_lo) / 1000, 2) if x_lo < t0_ms else []
    for tick in [-t for t in before if t > 0] + _ticks((end_ms - t0_ms) / 1000, 6):
        tx = x(t0_ms + int(tick * 1000))
        parts.append(f'<text x="{tx:.1f}" y="{h - 20}" text-anchor="middle">{tick:g}</text>')
    base = MARGIN_T + plot_h
    parts.append(
        f'<line class="axis" x1="{MARGIN_L}" y1="{base}" x2="{w - MARGIN_R}" y2="{base}"/>'
    )
    ly = y(d.limit_micros)
    parts.append(
        f'<line class="limit" x1="{MARGIN_L}" y1="{ly:.1f}" x2="{w - MARGIN_R}" y2="{ly:.1f}"/>'
    )
    for cls, k in (("room", 1), ("drawn", 2)):
        steps = []
        prev: float | None = None
        for p in pts:
            px = x(p[0])
            if prev is not None:
                steps.append(f"{px:.1f},{prev:.1f}")  # step: hold the value until the change
            prev = y(p[k])
            steps.append(f"{px:.1f},{prev:.1f}")
        parts.append(
            f'<polyline class="{cls}" data-owner="{_e(d.owner_id)}" '
            f'data-last-micros="{pts[-1][k] if pts else 0}" points="{" ".join(steps)}"/>'
        )
    parts.append(
        f'<text x="{MARGIN_L + plot_w / 2:.0f}" y="{h - 4}" text-anchor="middle">seconds since '
        f"the payments started; {_e(d.currency)} on the left</text></svg>"
    )
    return "".join(parts)


def _money(micros: int, currency: str) -> str:
    return format_micros(micros, currency)


def _figures(s: dict[str, Any]) -> str:
    lat = s["latency_ms"]
    ok = "ok" if s["ok"] else "bad"
    figs = [
        ("payments ok", s["authorized"]),
        ("declined", s["declined"]),
        ("p50", f"{lat['p50']:.1f} ms"),
        ("p99", f"{lat['p99']:.1f} ms"),
        ("max", f"{lat['max']:.1f} ms"),
        ("batches booked", f"{s['batches']} / {s['batches_sealed']}"),
    ]
    cells = "".join(f'<div class="fig">{_e(k)}<b>{_e(v)}</b></div>' for k, v in figs)
    verdict = "every invariant holds" if s["ok"] else "an invariant FAILED"
    return (
        f'<div class="figs">{cells}<div class="fig">checks<b class="{ok}">{verdict}</b></div></div>'
    )


def _table(head: Sequence[str], rows: Iterable[Sequence[object]], numeric: set[int]) -> str:
    th = "".join(
        f'<th class="{"n" if i in numeric else ""}">{_e(h)}</th>' for i, h in enumerate(head)
    )
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="{"n" if i in numeric else ""}">{_e(c)}</td>' for i, c in enumerate(r)
        )
        + "</tr>"
        for r in rows
    )
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def html_report(s: dict[str, Any], charts: Sequence[Drawdown], *, t0_ms: int, end_ms: int) -> str:
    """The whole report.html (see the module's docstring)."""
    lat = s["latency_ms"]
    owners = []
    for d in charts:
        lease = s["leases"].get(d.owner_id, {})
        owners.append(
            f'<h3 id="owner-{_e(d.owner_id)}">{_e(d.owner_id)}: {d.leases} leases, drawn '
            f"{_e(_money(d.drawn_micros, d.currency))} of a "
            f"{_e(_money(d.limit_micros, d.currency))} credit limit"
            f"{' (' + str(lease.get('closed', 0)) + ' closed)' if lease else ''}</h3>"
            + drawdown_svg(d, t0_ms=t0_ms, end_ms=end_ms)
        )
    lines = [
        (x["line_id"], x["kind"], x["owner_id"], f"{x['amount']} {x['currency']}", x["receipts"],
         x["rail"] + (f" ({x['note']})" if x["note"] else ""))
        for x in s["lines"]
    ]  # fmt: skip
    invariants = [(k, "ok" if v else "FAILED") for k, v in s["invariants"].items()]
    return (
        '<!DOCTYPE html>\n<html xmlns="http://www.w3.org/1999/xhtml" lang="en"><head>'
        '<meta charset="utf-8"/><title>fogpay demo report</title>'
        f"<style>{CSS}</style></head><body>"
        f"<h1>fogpay demo</h1><p class='sub'>{s['devices']} devices at fog {_e(s['fog_id'])}, "
        f"{s['seconds']:g} s of payments, settlement period {_e(s['period_id'])}</p>"
        + _figures(s)
        + "<h2>Answer latency</h2><p class='sub'>Every ok payment, from sealing the intent to "
        "its verified receipt (resends after a transient decline included); "
        f"{s['authorized']} payments, p50 {lat['p50']:.1f} ms, p99 {lat['p99']:.1f} ms.</p>"
        + histogram_svg(s["latency_histogram"], lat["p50"], lat["p99"])
        + "<h2>Lease drawdown</h2><p class='sub'>Per paying owner: "
        "<span class='key' style='background:#3b82c4'></span>room left on its live leases "
        "(the fog's budget: up at a grant, down at each payment, gone at expiry), "
        "<span class='key' style='background:#c77700'></span>drawn in total, "
        "<span class='key' style='background:#c62828'></span>credit limit.</p>"
        + "".join(owners)
        + "<h2>Settlement</h2>"
        + _table(("line", "kind", "owner", "amount", "receipts", "rail"), lines, {3, 4})
        + "<h2>Checks</h2>"
        + _table(("invariant", "result"), invariants, set())
        + "</body></html>\n"
    )
