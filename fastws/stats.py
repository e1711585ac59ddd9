"""The live stats page: ``GET /stats`` (HTML) and ``GET /stats.json`` (its data).

Off by default (``--stats``) and protected by ``--stats-token``, given as
``?token=...`` or ``Authorization: Bearer ...``.  A sampler reads
:func:`fastws.metrics.snapshot` every ``stats_interval`` seconds and keeps
``stats_window`` seconds of history in memory (a bounded deque); the page
shows the current numbers (rendered by the server, so they show without
JavaScript too) and redraws them and their sparklines from ``/stats.json``
every interval.  The page loads nothing from elsewhere.
"""

from __future__ import annotations

import hmac
import html
import json
import time
from collections import deque

from .metrics import snapshot

HTML = "text/html; charset=utf-8"
JSON = "application/json"
HEADERS = [
    ("Cache-Control", "no-store"),
    ("Referrer-Policy", "no-referrer"),              # the token may be in the URL
    ("X-Content-Type-Options", "nosniff"),
    ("Content-Security-Policy", "default-src 'none'; script-src 'unsafe-inline'; "
     "style-src 'unsafe-inline'; connect-src 'self'"),
]

#: (key in /stats.json "now", label) of the numbers on the page, in order.
FIGURES = [
    ("connections", "connections"),
    ("rooms", "rooms"),
    ("in_rate", "messages in /s"),
    ("out_rate", "messages out /s"),
    ("messages_in", "messages in (total)"),
    ("messages_out", "messages out (total)"),
    ("dropped_total", "dropped (total)"),
    ("slow_consumer_closes", "slow-consumer closes"),
    ("queued_bytes_total", "queued bytes"),
    ("queued_bytes_max", "queued bytes, largest connection"),
    ("loop_lag_ms", "event-loop lag (ms)"),
]
#: The series drawn as sparklines (keys of a history row).
SERIES = ["connections", "in_rate", "out_rate", "dropped_total", "queued_bytes_total"]


class StatsPage:
    """Samples the node's numbers and serves /stats and /stats.json."""

    def __init__(self, node) -> None:
        c = node.config
        self.node = node                        # whose numbers are shown
        self.token = c.stats_token.encode()       # compared in constant time
        self.interval = c.stats_interval          # seconds between samples
        self.history = deque(maxlen=int(c.stats_window / c.stats_interval) + 1)  # bounded
        self._last = None                         # previous snapshot, for rates
        self._handle = None
        node.routes.add("GET", "/stats", self.handle_page)   # the app's own route wins
        node.routes.add("GET", "/stats.json", self.handle_json)   # the app's own route wins

    # -- sampling ----------------------------------------------------------------

    def start(self) -> None:
        self._sample()

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _sample(self) -> None:
        self.history.append(self._row(self._current()))
        self._handle = self.node.loop.call_later(self.interval, self._sample)

    def _current(self) -> dict:
        """The snapshot with rates since the previous sample."""
        snap = snapshot(self.node)
        now = time.time()
        snap["t"] = now
        last = self._last
        if last is not None and now > last["t"]:
            dt = now - last["t"]
            snap["in_rate"] = max(0.0, (snap["messages_in"] - last["messages_in"]) / dt)
            snap["out_rate"] = max(0.0, (snap["messages_out"] - last["messages_out"]) / dt)
        else:
            snap["in_rate"] = snap["out_rate"] = 0.0
        snap["loop_lag_ms"] = round(snap["loop_lag"] * 1000, 1)
        self._last = snap
        return snap

    @staticmethod
    def _row(snap: dict) -> list:
        return [round(snap["t"], 3)] + [round(snap[k], 2) for k in SERIES]

    def data(self) -> dict:
        """What /stats.json returns: the numbers now, and the history."""
        snap = snapshot(self.node)
        last = self._last or {}
        now = {key: snap.get(key, last.get(key, 0)) for key, _ in FIGURES}
        now["in_rate"] = round(last.get("in_rate", 0.0), 2)
        now["out_rate"] = round(last.get("out_rate", 0.0), 2)
        now["loop_lag_ms"] = round(snap["loop_lag"] * 1000, 1)
        return {"now": now, "interval": self.interval, "series": ["t"] + SERIES,
                "history": list(self.history)}

    # -- HTTP ----------------------------------------------------------------------

    def _authorized(self, request) -> bool:
        given = request.query.get("token", "")
        auth = request.header("authorization") or ""
        if auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        return hmac.compare_digest(given.encode(), self.token)

    def handle_json(self, request):
        if not self._authorized(request):
            return 401, b"stats: a valid token is required\n", "text/plain; charset=utf-8", HEADERS
        return 200, json.dumps(self.data()).encode(), JSON, HEADERS

    def handle_page(self, request):
        if not self._authorized(request):
            return 401, b"stats: a valid token is required\n", "text/plain; charset=utf-8", HEADERS
        d = self.data()
        cards = "\n".join(
            f'<div class="card"><div class="v" id="{key}">{html.escape(_fmt(d["now"][key]))}</div>'
            f'<div class="k">{html.escape(label)}</div></div>'
            for key, label in FIGURES
        )
        charts = "\n".join(
            f'<div class="chart"><div class="k">{html.escape(dict(FIGURES)[s])}'
            f'<span class="max" id="max-{s}"></span></div>'
            f'<svg id="chart-{s}" viewBox="0 0 300 60" preserveAspectRatio="none"></svg></div>'
            for s in SERIES
        )
        page = _PAGE.replace("{{CARDS}}", cards).replace("{{CHARTS}}", charts)
        page = page.replace("{{DATA}}", json.dumps(d).replace("</", "<\\/"))
        page = page.replace("{{WINDOW}}", f"{self.node.config.stats_window:g}")
        return 200, page.encode(), HTML, HEADERS


def _fmt(v) -> str:
    if isinstance(v, float) and not v.is_integer():
        return f"{v:.2f}"
    return str(int(v))


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>fastws stats</title>
<style>
body { font: 14px system-ui, sans-serif; margin: 24px; color: #1d2330; background: #f6f7f9; }
h1 { font-size: 20px; margin: 0 0 4px; }
.sub { color: #667; margin-bottom: 16px; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(160px, 1fr)); gap: 10px; }
.card, .chart { background: #fff; border: 1px solid #dde1e7; border-radius: 6px; padding: 10px 12px; }
.v { font-size: 22px; font-weight: 600; font-variant-numeric: tabular-nums; }
.k { color: #667; font-size: 12px; }
.charts { display: grid; grid-template-columns: repeat(auto-fill, minmax(280px, 1fr)); gap: 10px; margin-top: 16px; }
.max { float: right; }
svg { width: 100%; height: 60px; }
polyline { fill: none; stroke: #2f6fde; stroke-width: 1.5; vector-effect: non-scaling-stroke; }
</style></head>
<body>
<h1>fastws</h1>
<div class="sub">live numbers of this process, last {{WINDOW}} s &middot;
<span id="updated">server-rendered</span></div>
<div class="cards">
{{CARDS}}
</div>
<div class="charts">
{{CHARTS}}
</div>
<script>
"use strict";
const token = new URLSearchParams(location.search).get("token") || "";
function fmt(v) { return Number.isInteger(v) ? String(v) : v.toFixed(2); }
function draw(d) {
  for (const [k, v] of Object.entries(d.now)) {
    const el = document.getElementById(k);
    if (el) el.textContent = fmt(v);
  }
  d.series.slice(1).forEach((name, i) => {
    const svg = document.getElementById("chart-" + name);
    if (!svg) return;
    const pts = d.history.map(r => [r[0], r[i + 1]]);
    if (pts.length < 2) { svg.innerHTML = ""; return; }
    const t0 = pts[0][0], t1 = pts[pts.length - 1][0] || t0 + 1;
    const max = Math.max(1, ...pts.map(p => p[1]));
    document.getElementById("max-" + name).textContent = "max " + fmt(Math.max(...pts.map(p => p[1])));
    const xy = pts.map(p => ((p[0] - t0) / (t1 - t0 || 1) * 300).toFixed(1) + "," +
                            (58 - p[1] / max * 56).toFixed(1)).join(" ");
    svg.innerHTML = '<polyline points="' + xy + '"/>';
  });
}
async function refresh() {
  try {
    const r = await fetch("stats.json?token=" + encodeURIComponent(token), {cache: "no-store"});
    if (r.ok) {
      draw(await r.json());
      document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
    }
  } catch (e) { document.getElementById("updated").textContent = "offline"; }
}
const initial = {{DATA}};
draw(initial);
setInterval(refresh, 1000 * initial.interval);
refresh();
</script>
</body></html>
"""
