"""Readiness (``GET /health``), liveness (``GET /livez``) and the checks registry.

``/health`` answers 200 with JSON ``{status, connections, memory, checks}``
when every check passes and 503 when one fails, so a load balancer stops
sending new clients to a node that is draining, whose loop is lagging, whose
memory is over its limit or whose broker is unreachable.  ``/livez`` answers
200 as long as the event loop runs, draining or not: an orchestrator restarts
a process only when it is stuck, never because it is shutting down cleanly.

Checks are a registry that other parts add to::

    node.health.add_check("broker", broker.ping)   # the broker, once it exists

A check is ``fn() -> bool | (bool, detail)`` or an ``async`` function
returning the same; an exception or a timeout counts as a failure.  The
text of a detail is shown with the password of any URL in it masked
(:func:`fastws.config.mask_url`).  Built-in
checks: ``draining`` (always), ``loop_lag`` (``health_max_loop_lag``),
``memory`` (``health_max_memory``).

:class:`LoopMonitor` measures event-loop lag with one repeating timer (four
wake-ups a second, nothing per connection or per message); the metrics and
the stats page read it too.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import resource
from bisect import bisect_left
from collections import deque

from .config import mask_url

log = logging.getLogger("fastws")

CHECK_TIMEOUT = 2.0  # seconds an async check may take before it counts as failed
JSON = "application/json"
NO_CACHE = [("Cache-Control", "no-store")]

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """Resident memory of this process, bytes (peak RSS where /proc is missing)."""
    try:
        with open("/proc/self/statm", "rb") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


#: Upper bounds (ms) of the latency histogram (+Inf is implied).
LATENCY_BUCKETS_MS = (1, 5, 10, 25, 50, 100, 250, 500, 1000)


class LoopMonitor:
    """Event-loop lag: how late a timer due every ``interval`` seconds fires.

    ``lag`` is the largest lateness over the last ``window`` seconds, so a
    stall shows in /health and /metrics for a while after it ended.

    Every sample also goes into a histogram (``latency_ms_buckets``, one
    non-cumulative count per bucket of :data:`LATENCY_BUCKETS_MS` plus +Inf,
    and ``latency_ms_sum``) exported as ``websocket_message_latency_ms``: the
    lateness of a timer is the time an event that became ready at that moment
    waits before the loop gets to it, i.e. how long a message that has just
    arrived waits before the server can read and answer it.  It is sampled
    (``1/interval`` times a second), never measured per message, so it costs
    nothing on the hot path."""

    def __init__(self, loop, interval: float = 0.25, window: float = 5.0) -> None:
        self.loop = loop
        self.interval = interval
        self._samples = deque(maxlen=max(1, int(window / interval)))
        self._due = 0.0
        self._handle = None
        self.latency_ms_buckets = [0] * (len(LATENCY_BUCKETS_MS) + 1)
        self.latency_ms_sum = 0.0

    def start(self) -> None:
        if self._handle is None:
            self._due = self.loop.time() + self.interval
            self._handle = self.loop.call_at(self._due, self._tick)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _tick(self) -> None:
        now = self.loop.time()
        late = max(0.0, now - self._due)
        self._samples.append(late)
        ms = late * 1000.0
        self.latency_ms_sum += ms
        i = bisect_left(LATENCY_BUCKETS_MS, ms)   # le semantics: ms <= bound
        self.latency_ms_buckets[i] += 1
        self._due = now + self.interval
        self._handle = self.loop.call_at(self._due, self._tick)

    @property
    def lag(self) -> float:
        """Seconds: the worst lag seen over the window (0.0 before the first tick)."""
        return max(self._samples, default=0.0)


def _masked(detail):
    """``detail`` with the password of every URL in its text masked (an
    exception text may quote a broker URL), through dicts and lists."""
    if isinstance(detail, str):
        return mask_url(detail)
    if isinstance(detail, dict):
        return {k: _masked(v) for k, v in detail.items()}
    if isinstance(detail, (list, tuple)):
        return [_masked(v) for v in detail]
    return detail


class Health:
    """The checks registry and the /health and /livez handlers of one node."""

    def __init__(self, node) -> None:
        self.node = node                            # the fastws Node it watches
        self.checks: dict[str, object] = {}           # name -> check function
        self.monitor = LoopMonitor(node.loop)      # event-loop lag, also read by metrics
        c = node.config
        self.add_check("draining", self._check_draining)
        if c.health_max_loop_lag > 0:
            self.add_check("loop_lag", self._check_loop_lag)
        if c.health_max_memory > 0:
            self.add_check("memory", self._check_memory)

    # -- the registry -----------------------------------------------------------

    def add_check(self, name: str, fn) -> None:
        """Register ``fn`` (sync or async; -> bool or (bool, detail)) as ``name``."""
        if not callable(fn):
            raise TypeError(f"health check {name!r} must be callable, got {fn!r}")
        self.checks[name] = fn

    def remove_check(self, name: str) -> None:
        self.checks.pop(name, None)

    async def run_checks(self) -> tuple[bool, dict]:
        """Run every check; (all passed, {name: {"ok": bool, "detail": ...}})."""
        results = {}
        for name, fn in list(self.checks.items()):
            try:
                outcome = fn()
                if inspect.isawaitable(outcome):
                    outcome = await asyncio.wait_for(outcome, CHECK_TIMEOUT)
            except asyncio.TimeoutError:
                outcome = (False, f"no answer within {CHECK_TIMEOUT:g}s")
            except Exception as exc:  # a failing check is a result, not a crash
                outcome = (False, f"{type(exc).__name__}: {exc}")
            ok, detail = outcome if isinstance(outcome, tuple) else (bool(outcome), None)
            results[name] = {"ok": bool(ok), "detail": _masked(detail)}
        return all(r["ok"] for r in results.values()), results

    # -- built-in checks ----------------------------------------------------------

    def _check_draining(self):
        draining = self.node.draining
        return (not draining, "draining: not taking new connections" if draining else "accepting")

    def _check_loop_lag(self):
        lag, limit = self.monitor.lag, self.node.config.health_max_loop_lag
        return (lag <= limit, {"lag_ms": round(lag * 1000, 3), "threshold_ms": round(limit * 1000, 3)})

    def _check_memory(self):
        rss, limit = rss_bytes(), self.node.config.health_max_memory
        return (rss <= limit, {"rss_bytes": rss, "limit_bytes": limit})

    # -- lifecycle and HTTP ----------------------------------------------------------

    def start(self) -> None:
        self.monitor.start()
        if self.node.config.health:
            self.node.routes.add("GET", "/health", self.handle_health)   # the app's own route wins
            self.node.routes.add("GET", "/livez", self.handle_livez)   # the app's own route wins

    def stop(self) -> None:
        self.monitor.stop()

    async def handle_health(self, request):
        ok, checks = await self.run_checks()
        hub = self.node.hub
        body = {
            "status": "healthy" if ok else ("draining" if self.node.draining
                                              else "unhealthy"),
            "region": self.node.config.region,
            "connections": len(hub.connections) if hub is not None else 0,
            "memory": {"rss_bytes": rss_bytes(), "limit_bytes": self.node.config.health_max_memory},
            "loop_lag_ms": round(self.monitor.lag * 1000, 3),
            "checks": checks,
        }
        return (200 if ok else 503), json.dumps(body).encode(), JSON, NO_CACHE

    def handle_livez(self, request):
        return 200, b'{"status": "alive"}', JSON, NO_CACHE
