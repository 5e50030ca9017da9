"""The demo's pictures, pure: latency bins, the terminal histogram, the lease drawdown
series, and the HTML page (escaped, self-contained)."""

import io
import re
import xml.etree.ElementTree as ET

from rich.console import Console

from fogpay import demo_cast as cast
from fogpay import demo_setup as setup
from fogpay.demo_live import plain_line, showing
from fogpay.demo_pay import Outcomes, Paid
from fogpay.demo_report import (
    LATENCY_EDGES_MS,
    Draw,
    LeaseRow,
    drawdowns,
    histogram_svg,
    html_report,
    latency_bins,
    terminal_histogram,
)

SVG = "{http://www.w3.org/2000/svg}"
L1, L2 = b"\x01" * 16, b"\x02" * 16


def test_latency_bins_count_every_value_once_at_the_right_edge() -> None:
    bins = latency_bins([0, 1000, 1001, 9_999, 10_000, 10_001, 4_000_000_000])
    assert len(bins) == len(LATENCY_EDGES_MS) + 1 and sum(b["count"] for b in bins) == 7
    by_label = {(b["lo_ms"], b["hi_ms"]): b["count"] for b in bins}
    assert by_label[(0, 1)] == 2  # 0 and exactly 1 ms: upper edges are inclusive
    assert by_label[(1, 1.5)] == 1
    assert by_label[(8, 10)] == 2  # 9.999 and 10.000
    assert by_label[(10, 12)] == 1
    assert by_label[(LATENCY_EDGES_MS[-1], None)] == 1  # the open last bin


def test_terminal_histogram_trims_empty_edges_and_scales_to_the_largest() -> None:
    bins = latency_bins([5_500] * 10 + [7_500] * 5 + [250_000])
    lines = terminal_histogram(bins, width=10).splitlines()
    assert lines[0].split()[0] == "5-6" and lines[-1].split()[0] == "200-300"
    assert lines[0].endswith("█" * 10 + " 10") and "█" * 5 + " " * 6 + "5" in lines[2]
    assert sum(int(line.rsplit(" ", 1)[1]) for line in lines) == 16
    assert terminal_histogram(latency_bins([])) == "(no ok payments)"


def test_drawdown_follows_grants_draws_and_expiry() -> None:
    owner = cast.PAYERS[0]
    leases = [
        LeaseRow(lease_id=L1, owner_id=owner.owner_id, currency=owner.currency,
                 amount_micros=20_000_000, granted_ms=1_000, not_after_ms=5_000),
        LeaseRow(lease_id=L2, owner_id=owner.owner_id, currency=owner.currency,
                 amount_micros=50_000_000, granted_ms=3_000, not_after_ms=60_000),
    ]  # fmt: skip
    draws = [
        Draw(at_ms=2_000, owner_id=owner.owner_id, lease_id=L1, amount_micros=4_000_000),
        Draw(at_ms=5_000, owner_id=owner.owner_id, lease_id=L1, amount_micros=1_000_000),
        Draw(at_ms=6_000, owner_id=owner.owner_id, lease_id=L2, amount_micros=10_000_000),
        Draw(at_ms=6_000, owner_id="someone-else", lease_id=L2, amount_micros=7),
    ]
    (d,) = drawdowns(leases, draws, end_ms=8_000)
    assert d.owner_id == owner.owner_id and d.leases == 2
    assert d.points == [
        (1_000, 20_000_000, 0),
        (2_000, 16_000_000, 4_000_000),
        (3_000, 66_000_000, 4_000_000),
        (5_000, 65_000_000, 5_000_000),  # a draw at the expiry millisecond still counts
        (5_000, 50_000_000, 5_000_000),  # then L1's 15 left are gone with it
        (6_000, 40_000_000, 15_000_000),
        (8_000, 40_000_000, 15_000_000),
    ]
    assert d.drawn_micros == 15_000_000


def _summary(note: str) -> dict[str, object]:
    return {
        "fog_id": "depot<fog>",
        "devices": 1,
        "seconds": 1.0,
        "period_id": "P1",
        "ok": True,
        "authorized": 3,
        "declined": 0,
        "batches": 1,
        "batches_sealed": 1,
        "latency_ms": {"p50": 9.0, "p99": 30.0, "max": 30.0},
        "latency_histogram": latency_bins([9_000, 9_000, 30_000]),
        "leases": {},
        "lines": [
            {
                "line_id": "P1-C1",
                "kind": "charge",
                "owner_id": "o",
                "amount": "1.00",
                "currency": "EUR",
                "receipts": 3,
                "rail": "manual",
                "note": note,
            },
        ],
        "invariants": {"payments_authorized": True},
    }


def test_the_page_escapes_what_it_shows_and_stays_well_formed() -> None:
    page = html_report(_summary("</td><script>alert(1)</script>"), [], t0_ms=0, end_ms=1)
    assert "<script" not in page and "&lt;script&gt;" in page and "depot&lt;fog&gt;" in page
    root = ET.fromstring(page.split("\n", 1)[1])
    bars = root.findall(f".//{SVG}rect[@class='bar']")
    assert sum(int(b.attrib["data-count"]) for b in bars) == 3


def test_histogram_svg_marks_p50_and_p99() -> None:
    svg = histogram_svg(latency_bins([9_000] * 98 + [30_000] * 2), 9.0, 30.0)
    root = ET.fromstring(svg)
    labels = [t.text for t in root.iter(f"{SVG}text")]
    assert "p50 9.0 ms" in labels and "p99 30.0 ms" in labels
    assert next(int(r.attrib["data-count"]) for r in root.iter(f"{SVG}rect")) == 98


def test_a_p99_in_the_last_bar_keeps_its_label_inside_the_chart() -> None:
    """The demo's p99 often falls in its last bar: its label then ends at the line instead
    of starting there (it ran off the right edge), and sits below p50's."""
    svg = histogram_svg(latency_bins([9_000] * 98 + [250_000] * 2), 9.0, 250.0)
    root = ET.fromstring(svg)
    width = float(root.attrib["width"])
    p50, p99 = (t for t in root.iter(f"{SVG}text") if (t.text or "").startswith("p"))
    assert p99.text == "p99 250.0 ms" and p99.attrib["text-anchor"] == "end"
    assert float(p99.attrib["x"]) < width
    assert p50.attrib["text-anchor"] == "start" and float(p50.attrib["y"]) < float(p99.attrib["y"])


def test_demo_leases_cover_the_schedule_without_waiting() -> None:
    """The demo's lease settings against its own (seeded) schedule: every owner's opening
    half second fits its first lease, and no owner draws in any half second as much as the
    room under which the fog asks for a top-up (a lease round is at most 0.25 s, a request
    and its answer a few ms here)."""
    plan = list(cast.plan_payments(cast.PERIOD_SECONDS_DEFAULT))
    owner = {d.name: d.group.owner_id for d in cast.devices()}
    limit = {o.owner_id: o.limit_micros for o in cast.PAYERS}
    for o in cast.PAYERS:
        mine = [p for p in plan if owner[p.device] == o.owner_id]
        opening = sum(p.amount_micros for p in mine if p.offset_s < 0.5)
        assert opening <= min(setup.FIRST_LEASE_MICROS, limit[o.owner_id])
        for start in (n / 20 for n in range(int(cast.PERIOD_SECONDS_DEFAULT * 20))):
            window = sum(p.amount_micros for p in mine if start <= p.offset_s < start + 0.5)
            assert window < setup.LEASES.request_below_micros, (o.owner_id, start)
    # four live leases (the cloud's cap per fog and owner) reach the largest credit limit
    assert setup.FIRST_LEASE_MICROS + 3 * setup.TOP_UP_MICROS >= max(limit.values())
    assert setup.LEASE_POLICY.request_micros_max >= setup.LEASES.request_micros


def _outcomes() -> Outcomes:
    o = Outcomes()
    o.by_status.update({"ok": 2, "declined": 1})
    for us, device in ((8_000, "anna-car-01"), (12_000, "oliver-car-01")):
        o.latency.record(us)
        o.paid.append(Paid(0, device, 1_000_000, us))
        o.drawn[device] += 1_000_000
    return o


def test_plain_progress_line() -> None:
    line = plain_line(_outcomes(), elapsed_s=2.04, seconds=10)
    assert line.startswith("[  2.0/10 s] 3 paid: 2 ok, 1 declined, 0 failed, 0 skipped;")
    assert re.search(r"p50 8\.\d ms  p99 12\.\d ms$", line)


async def test_progress_degrades_to_plain_lines_off_a_terminal() -> None:
    stream = io.StringIO()
    async with showing(_outcomes(), seconds=10, planned=5, console=Console(file=stream)):
        pass
    (line,) = stream.getvalue().splitlines()  # the final state, once
    assert line.startswith("[  0.0/10 s] 3 paid: 2 ok") and "\x1b[" not in line


async def test_progress_on_a_terminal_is_a_live_panel() -> None:
    stream = io.StringIO()
    console = Console(file=stream, force_terminal=True, width=120)
    async with showing(_outcomes(), seconds=10, planned=5, console=console):
        pass
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", stream.getvalue())
    assert "fogpay demo" in text and "3 of 5 paid: 2 ok, 1 declined" in text
    assert re.search(r"anna .* 1\.00 of 40\.00 EUR", text)
    assert re.search(r"oliver .* 1\.00 of 20\.00 GBP", text)
