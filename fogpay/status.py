"""``fogpay status [--json] (--url URL | --config FILE)``: one screen about a running fog or cloud.

Reads the daemon's metrics endpoint (``[metrics]``, docs/fog.md and docs/cloud.md "Metrics")
over HTTP: ``/metrics`` for the figures and ``/readyz`` for readiness; it never touches the
daemon's database or broker. ``--config`` finds the endpoint in the daemon's TOML file
(``[metrics] listen``; a wildcard host is reached on loopback; port 0 is picked at start, so
such a config needs ``--url``, printed in the daemon's ``metrics_listening`` line).

Figures are totals since the daemon started (counters reset at a restart; the budget, the
backlog and leases outstanding are read from the store at each scrape). Latency percentiles
come from the exported histogram: the upper edge of the bucket holding the percentile, so
"p50 <= 12.2 ms" is exact as a bound and within about 50% as a value.

Exit status: 0 ready, 1 not ready or unreachable (the summary is printed when reachable),
2 usage or configuration error.
"""

import argparse
import json
import math
import tomllib
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Final

from prometheus_client.parser import text_string_to_metric_families

from runtime.cli import EXIT_FAILURE, EXIT_USAGE, fail
from runtime.listen import ListenError, parse_listen, url_host

HTTP_TIMEOUT_S: Final = 5.0
BODY_BYTES_MAX: Final = 16 * 1024 * 1024
BUDGET_ROWS_SHOWN: Final = 20  # on screen; --json has all

Samples = list[tuple[str, dict[str, str], float]]


class StatusError(Exception):
    """The endpoint cannot be read (exit 1)."""


class UsageError(Exception):
    """The command line or the config file is wrong (exit 2)."""


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser(
        "status", help="one-screen summary of a running fog or cloud, from its metrics endpoint"
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="the metrics endpoint, e.g. http://127.0.0.1:9464")
    where.add_argument("--config", type=Path, help="the daemon's TOML ([metrics] listen)")
    p.add_argument("--json", action="store_true", help="the summary as JSON")
    p.set_defaults(func=cmd_status)


def cmd_status(args: argparse.Namespace) -> int:
    try:
        base = args.url.rstrip("/").removesuffix("/metrics") if args.url else url_of(args.config)
        summary = read_status(base)
    except UsageError as exc:
        return fail("status", exc, code=EXIT_USAGE)
    except StatusError as exc:
        return fail("status", exc, code=EXIT_FAILURE)
    print(json.dumps(summary, indent=2, sort_keys=True) if args.json else render(summary))
    return 0 if summary["ready"] else 1


def url_of(config: Path) -> str:
    """The endpoint a fog or cloud config file names (``[metrics] listen``)."""
    try:
        raw = tomllib.loads(config.read_text())
    except OSError as exc:
        raise UsageError(f"cannot read {config}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{config}: invalid TOML: {exc}") from None
    metrics = raw.get("metrics", {})
    if not isinstance(metrics, dict) or metrics.get("enabled") is not True:
        raise UsageError(f"{config}: metrics.enabled is not true (no endpoint to read)")
    default = "127.0.0.1:9464" if "fog_id" in raw else "127.0.0.1:9465"
    try:
        host, port = parse_listen(metrics.get("listen", default))
    except ListenError as exc:
        raise UsageError(f"{config}: metrics.listen: {exc}") from None
    if port == 0:
        raise UsageError(
            f"{config}: metrics.listen port 0 is picked at start: pass --url "
            "(the daemon logs it in metrics_listening)"
        )
    return f"http://{url_host(host)}:{port}"


def fetch(url: str) -> tuple[int, bytes]:
    if not url.startswith(("http://", "https://")):
        raise UsageError(f"{url}: not an http:// URL")
    try:
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as r:
            return int(r.status), r.read(BODY_BYTES_MAX)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(BODY_BYTES_MAX)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise StatusError(f"cannot reach {url}: {reason}") from None


def read_status(base: str) -> dict[str, Any]:
    status, body = fetch(base + "/metrics")
    if status != 200:
        raise StatusError(f"{base}/metrics answered {status}")
    samples = parse(body)
    ready_status, ready_body = fetch(base + "/readyz")
    try:
        why = json.loads(ready_body).get("why", []) if ready_status != 200 else []
    except (ValueError, AttributeError):
        why = [f"/readyz answered {ready_status}"]
    names = {name for name, _, _ in samples}
    if any(n.startswith("fogpay_fog_") for n in names):
        summary = fog_summary(samples)
    elif any(n.startswith("fogpay_cloud_") for n in names):
        summary = cloud_summary(samples)
    else:
        raise StatusError(f"{base}/metrics: not a fogpay fog or cloud")
    return {"url": base, "ready": ready_status == 200, "why": why} | summary


def parse(body: bytes) -> Samples:
    try:
        families = list(text_string_to_metric_families(body.decode("utf-8")))
    except (ValueError, UnicodeDecodeError) as exc:
        raise StatusError(f"unreadable metrics: {exc}") from None
    return [(s.name, dict(s.labels), float(s.value)) for f in families for s in f.samples]


def _one(samples: Samples, name: str, **labels: str) -> float | None:
    for n, lab, v in samples:
        if n == name and all(lab.get(k) == x for k, x in labels.items()):
            return v
    return None


def _int(samples: Samples, name: str, **labels: str) -> int:
    v = _one(samples, name, **labels)
    return 0 if v is None else int(v)


def _by(samples: Samples, name: str, label: str, **labels: str) -> dict[str, int]:
    return {
        lab[label]: int(v)
        for n, lab, v in samples
        if n == name and all(lab.get(k) == x for k, x in labels.items())
    }


def percentile_ms(samples: Samples, name: str, p: float) -> float | None:
    """The upper edge (ms) of the bucket holding the ``p``-th percentile (nearest rank);
    None without samples or when it is beyond the last finite edge."""
    buckets = sorted(
        (float(lab["le"]), v) for n, lab, v in samples if n == name + "_bucket" and "le" in lab
    )
    total = buckets[-1][1] if buckets else 0.0
    if total <= 0:
        return None
    rank = max(1, math.ceil(p / 100 * total))
    for le, count in buckets:
        if count >= rank:
            return None if math.isinf(le) else round(le * 1000, 3)
    return None


def fog_summary(s: Samples) -> dict[str, Any]:
    fog_id = next((lab["fog_id"] for n, lab, _ in s if n == "fogpay_fog_info"), "?")
    declined = _by(s, "fogpay_fog_intents_total", "reason", status="declined")
    budget = [
        {"owner": lab["owner"], "currency": lab["currency"], "left_micros": int(v)}
        | {
            "leases": _int(
                s, "fogpay_fog_leases_live", owner=lab["owner"], currency=lab["currency"]
            )
        }
        for n, lab, v in s
        if n == "fogpay_fog_budget_left_micros"
    ]
    uplink = _one(s, "fogpay_fog_uplink_up")
    return {
        "component": "fog",
        "fog_id": fog_id,
        "intents": {
            "ok": _int(s, "fogpay_fog_intents_total", status="ok"),
            "replayed": _int(s, "fogpay_fog_intents_total", status="replayed"),
            "declined": sum(declined.values()),
            "declined_by_reason": declined,
            "dropped": _int(s, "fogpay_fog_intents_dropped_total"),
        },
        "answer_ms": {
            "n": _int(s, "fogpay_fog_answer_seconds_count"),
            "p50_le": percentile_ms(s, "fogpay_fog_answer_seconds", 50),
            "p99_le": percentile_ms(s, "fogpay_fog_answer_seconds", 99),
        },
        "backlog": {
            "unacked_batches": _int(s, "fogpay_fog_unacked_batches"),
            "oldest_unacked_age_s": _one(s, "fogpay_fog_unacked_oldest_age_seconds"),
            "unsealed_records": _int(s, "fogpay_fog_unsealed_records"),
            "batches_sealed": _int(s, "fogpay_fog_batches_sealed"),
        },
        "broker_up": _one(s, "fogpay_fog_broker_up") == 1,
        "uplink_up": None if uplink is None else uplink == 1,
        "budget": budget,
        "alarms": {k: v for k, v in _by(s, "fogpay_fog_alarms_total", "kind").items() if v},
        "store_read_ok": _one(s, "fogpay_fog_store_read_ok") == 1,
    }


def cloud_summary(s: Samples) -> dict[str, Any]:
    leases = [
        {"fog_id": lab["fog_id"], "currency": lab["currency"], "leases": int(v)}
        | {
            "micros": _int(
                s,
                "fogpay_cloud_leases_outstanding_micros",
                fog_id=lab["fog_id"],
                currency=lab["currency"],
            )
        }
        for n, lab, v in s
        if n == "fogpay_cloud_leases_outstanding"
    ]
    return {
        "component": "cloud",
        "batches": _by(s, "fogpay_cloud_batches_total", "status"),
        "refused_by_reason": _by(s, "fogpay_cloud_batches_refused_total", "reason"),
        "records": {
            "booked": _int(s, "fogpay_cloud_records_booked_total"),
            "rejected": _int(s, "fogpay_cloud_records_rejected_total"),
        },
        "alarms": _by(s, "fogpay_cloud_alarms_total", "kind"),
        "alarms_recorded": _by(s, "fogpay_cloud_alarms_recorded", "kind"),
        "lease_requests": {
            "granted": _int(s, "fogpay_cloud_lease_requests_total", outcome="granted"),
            "no_credit": _int(s, "fogpay_cloud_lease_requests_total", outcome="no_credit"),
            "refused": sum(
                _by(s, "fogpay_cloud_lease_requests_total", "reason", outcome="refused").values()
            ),
        },
        "leases_outstanding": leases,
        "broker_up": _one(s, "fogpay_cloud_broker_up") == 1,
        "queued": _by(s, "fogpay_cloud_queued", "queue"),
        "store_read_ok": _one(s, "fogpay_cloud_store_read_ok") == 1,
    }


def money(micros: int, currency: str) -> str:
    sign = "-" if micros < 0 else ""
    m = abs(micros)
    return f"{sign}{m // 1_000_000}.{m % 1_000_000:06d} {currency}"


def _state(up: bool | None) -> str:
    return {True: "up", False: "DOWN", None: "off"}[up]


def render(summary: dict[str, Any]) -> str:
    ready = "ready" if summary["ready"] else "NOT READY: " + ", ".join(summary["why"])
    if summary["component"] == "fog":
        return _render_fog(summary, ready)
    return _render_cloud(summary, ready)


def _render_fog(s: dict[str, Any], ready: str) -> str:
    i, a, b = s["intents"], s["answer_ms"], s["backlog"]
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(i["declined_by_reason"].items()))
    p50 = "-" if a["p50_le"] is None else f"<= {a['p50_le']} ms"
    p99 = "-" if a["p99_le"] is None else f"<= {a['p99_le']} ms"
    age = b["oldest_unacked_age_s"]
    lines = [
        f"fog {s['fog_id']}  {s['url']}  {ready}",
        f"broker     {_state(s['broker_up'])}    uplink {_state(s['uplink_up'])}",
        f"intents    {i['ok']} ok, {i['declined']} declined, {i['replayed']} replayed, "
        f"{i['dropped']} dropped" + (f"  ({reasons})" if reasons else ""),
        f"answer     p50 {p50}  p99 {p99}  ({a['n']} answers since start)",
        f"backlog    {b['unacked_batches']} unacked batches"
        + (f", oldest {age:.1f} s" if b["unacked_batches"] and age is not None else "")
        + f"; {b['unsealed_records']} records not sealed; {b['batches_sealed']} sealed",
    ]
    budget = s["budget"]
    if not s["store_read_ok"]:
        lines.append("budget     (the store could not be read)")
    elif not budget:
        lines.append("budget     no leases")
    for n, row in enumerate(budget[:BUDGET_ROWS_SHOWN]):
        head = "budget     " if n == 0 else "           "
        left = money(row["left_micros"], row["currency"])
        lines.append(f"{head}{row['owner']:<20} {left:>20}  ({row['leases']} live leases)")
    if len(budget) > BUDGET_ROWS_SHOWN:
        lines.append(f"           ... {len(budget) - BUDGET_ROWS_SHOWN} more (--json)")
    if s["alarms"]:
        lines.append("alarms     " + ", ".join(f"{k} {v}" for k, v in sorted(s["alarms"].items())))
    return "\n".join(lines)


def _render_cloud(s: dict[str, Any], ready: str) -> str:
    b, r, q = s["batches"], s["records"], s["queued"]
    refused = ", ".join(f"{k} {v}" for k, v in sorted(s["refused_by_reason"].items()))
    lr = s["lease_requests"]
    lines = [
        f"cloud  {s['url']}  {ready}",
        f"broker     {_state(s['broker_up'])}    queued: "
        + ", ".join(f"{k} {v}" for k, v in sorted(q.items())),
        "batches    "
        + ", ".join(f"{k} {v}" for k, v in sorted(b.items()))
        + (f"  ({refused})" if refused else ""),
        f"records    {r['booked']} booked, {r['rejected']} rejected",
        f"leases     requests: {lr['granted']} granted, {lr['no_credit']} no credit, "
        f"{lr['refused']} refused",
    ]
    for row in s["leases_outstanding"]:
        amount = money(row["micros"], row["currency"])
        lines.append(f"           {row['fog_id']:<20} {row['leases']} open, {amount:>20}")
    alarms = s["alarms_recorded"] or s["alarms"]
    if alarms:
        lines.append("alarms     " + ", ".join(f"{k} {v}" for k, v in sorted(alarms.items())))
    return "\n".join(lines)
