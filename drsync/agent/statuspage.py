"""The status page an agent serves next to /metrics: plain HTML and an inline SVG chart, no JavaScript.

:func:`render` is pure: it turns the agent's status document (the same one
served as /status.json) into a page, so tests can call it directly and the
browser test checks what an operator actually sees.
"""

from __future__ import annotations

import html
import time
from typing import Any

from drsync.agent.roles import format_span
from drsync.units import human_size

CHART_W, CHART_H = 720, 180


def _e(v: Any) -> str:
    return html.escape("-" if v is None or v == "" else str(v))


def _when(ts: float | None, now: float) -> str:
    if not ts:
        return "-"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts))
    return f"{stamp} UTC ({format_span(max(0.0, now - ts))} ago)"


def _lag(v: float | None) -> str:
    return "-" if v is None else format_span(v)


def _size(n: Any) -> str:
    return human_size(n) if isinstance(n, (int, float)) else "-"


def chart_span(points: list[tuple[float, float | None]], now: float, window_s: float) -> float:
    """The time the chart shows: ``window_s``, or less for a younger history (at least a minute)."""
    pts = [t for t, v in points if v is not None and t >= now - window_s]
    return min(window_s, max(now - min(pts), 60.0)) if pts else window_s


def lag_chart(points: list[tuple[float, float | None]], now: float, window_s: float) -> str:
    """An SVG polyline of lag over the last ``window_s`` seconds (or since the first sample). Pure."""
    pts = [(t, v) for t, v in points if v is not None and t >= now - window_s]
    if not pts:
        return '<p class="muted" id="lag-chart-empty">no lag samples yet</p>'
    span = chart_span(points, now, window_s)  # a young agent's history fills the chart, not a sliver
    top = max(max(v for _, v in pts) * 1.1, 1.0)
    xy = [((t - (now - span)) / span * CHART_W, CHART_H - v / top * CHART_H) for t, v in pts]
    coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in xy)
    dots = "".join(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="#0969da"/>' for x, y in xy[-200:])
    return (f'<svg id="lag-chart" width="{CHART_W}" height="{CHART_H + 20}" role="img" '
            f'aria-label="replication lag over the last {format_span(span)}">'
            f'<rect x="0" y="0" width="{CHART_W}" height="{CHART_H}" fill="#f6f8fa" stroke="#d0d7de"/>'
            f'<polyline fill="none" stroke="#0969da" stroke-width="2" points="{coords}"/>{dots}'
            f'<text x="4" y="14" font-size="12">max {_e(format_span(top))}</text>'
            f'<text x="4" y="{CHART_H + 16}" font-size="12">{_e(format_span(span))} ago</text>'
            f'<text x="{CHART_W - 30}" y="{CHART_H + 16}" font-size="12">now</text></svg>')


def render(doc: dict[str, Any], now: float | None = None) -> str:
    now = time.time() if now is None else now
    rows = "".join(
        f'<tr class="agent" data-agent="{_e(a.get("name"))}"><td>{_e(a.get("name"))}</td>'
        f'<td class="role role-{_e(a.get("role"))}">{_e(a.get("role"))}</td><td>{_e(a.get("address"))}</td>'
        f'<td>{_e(a.get("epoch"))}</td><td class="lag">{_e(_lag(a.get("lag_s")))}</td>'
        f'<td>{_e(a.get("applied_snapshot"))}</td></tr>' for a in doc.get("agents", []))
    snaps = "".join(
        f'<tr><td>{_e(s.get("id"))}</td><td>{_e(s.get("kind"))}</td><td>{_e(_when(s.get("captured_at"), now))}</td>'
        f'<td>{_e(s.get("files"))}</td><td>{_e(_size(s.get("bytes")))}</td></tr>' for s in doc.get("snapshots", []))
    ships = "".join(
        f'<tr class="{"ok" if c.get("ok") else "bad"}"><td>{_e(_when(c.get("at"), now))}</td>'
        f'<td>{_e(c.get("snapshot"))}</td><td>{_e(c.get("summary"))}</td></tr>' for c in doc.get("cycles", []))
    drills = "".join(
        f'<tr class="drill {"ok" if d.get("passed") else "bad"}"><td>{_e(d.get("agent"))}</td>'
        f'<td>{_e(d.get("number"))}</td>'
        f'<td>{_e(_when(d.get("started_at"), now))}</td><td>{"passed" if d.get("passed") else "FAILED"}</td>'
        f'<td>{_e(_lag(d.get("rpo_s")))}</td><td>{_e(d.get("rto_s"))}s</td>'
        f'<td>{_e("; ".join(s["name"] + ": " + s["detail"] for s in d.get("steps", []) if not s.get("passed")))}'
        f'</td></tr>' for d in reversed(doc.get("drills", [])))
    primary = doc.get("primary") or "none"
    hold = doc.get("apply_hold") or {}
    held = ""
    if hold:
        lines = ([f"applies held by an operator since {_when(hold.get('operator_since'), now)} "
                  f"(drsync apply --resume lifts it)"] if hold.get("operator_hold") else [])
        lines += [str(hold["message"])] if hold.get("snapshot") and hold.get("message") else []
        lines += [str(hold["flagged_message"])] if hold.get("flagged") and hold.get("flagged_message") else []
        title = "Applies held on this standby." if hold.get("held") else "Mass change on this standby."
        held = f'<p id="apply-hold" class="held"><b>{title}</b> {"<br>".join(_e(x) for x in lines)}</p>'
    busy = doc.get("maintenance")
    maintenance = f'<p id="maintenance">Maintenance in progress: {_e(busy)}</p>' if busy else ""
    window = float(doc.get("lag_window_s", 6 * 3600))
    history = [(p[0], p[1]) for p in doc.get("lag_history", [])]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="10">
<title>drsync {_e(doc.get("group"))}: {_e(doc.get("agent"))}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; color: #1f2328; }}
table {{ border-collapse: collapse; margin-bottom: 1.5em; }}
td, th {{ border-bottom: 1px solid #d0d7de; padding: 0.3em 0.8em; text-align: left; font-size: 14px; }}
.role-primary {{ font-weight: bold; color: #1a7f37; }} .bad td {{ color: #cf222e; }} .muted {{ color: #656d76; }}
.summary > span {{ margin-right: 2em; }}
.held {{ background: #fff8c5; border: 1px solid #d4a72c; padding: 0.6em 1em; }}
</style></head><body>
<h1>drsync group <span id="group">{_e(doc.get("group"))}</span></h1>
<p class="summary"><span>primary: <b id="primary">{_e(primary)}</b></span>
<span>epoch: <b id="epoch">{_e(doc.get("epoch"))}</b></span>
<span>this agent: <b id="agent">{_e(doc.get("agent"))}</b> (<span id="role">{_e(doc.get("role"))}</span>)</span>
<span>ZooKeeper: <b id="zookeeper">{_e(doc.get("zookeeper"))}</b></span></p>
{held}
{maintenance}
<h2>Agents</h2>
<table id="agents"><tr><th>agent</th><th>role</th><th>address</th><th>epoch</th><th>lag</th><th>applied snapshot</th>
</tr>{rows}</table>
<h2 id="lag-heading">Replication lag, last {_e(format_span(chart_span(history, now, window)))}</h2>
<p>now: <b id="lag-now">{_e(_lag(doc.get("lag_s")))}</b>; replication mode: <span id="replication-mode">{
    _e((doc.get("replication") or {}).get("mode"))}: {_e((doc.get("replication") or {}).get("captures"))}</span></p>
{lag_chart(history, now, window)}
<h2>Last snapshots</h2>
<table id="snapshots"><tr><th>id</th><th>kind</th><th>captured</th><th>files</th><th>bytes</th></tr>{snaps}</table>
<h2>Last shipments</h2>
<table id="shipments"><tr><th>when</th><th>snapshot</th><th>outcome</th></tr>{ships}</table>
<h2>Drills</h2>
<table id="drills"><tr><th>standby</th><th>#</th><th>when</th><th>result</th><th>RPO</th><th>RTO</th><th>problems</th>
</tr>{drills}
</table>
<p class="muted">generated {_e(_when(now, now))}; JSON at <a href="status.json">status.json</a>, metrics at
<a href="metrics">metrics</a></p>
</body></html>
"""
