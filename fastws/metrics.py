"""Prometheus exposition at ``GET /metrics`` on the WebSocket port.

Nothing here runs per message.  The frame-level counters live in the engine
(``hub.stats()``: plain C integers bumped by ``_core``), handshake results
are counted by ``Server`` (one dict increment per handshake), and this module
reads them only when Prometheus scrapes, through a custom collector on a
registry of our own (two servers in one process do not collide).

Exported (``{...}`` are labels)::

    websocket_connections_total{region,server_id}        gauge   open connections
    websocket_message_latency_ms                         histogram  buckets 1..1000 ms
    websocket_messages_total{direction=inbound|outbound} counter
    websocket_bytes_total{direction=inbound|outbound}    counter  bytes on the wire
    websocket_handshakes_total{result="101"|"400"|...}   counter  HTTP status of the upgrade
    websocket_closes_total{code}                         counter  close code of every closed connection
    websocket_dropped_messages_total{reason,priority}    counter  delivery-policy drops
    websocket_slow_consumer_closes_total                 counter
    websocket_timeouts_total{kind=handshake|ping|idle}   counter  connections closed by a timer
    websocket_queued_bytes                               gauge    output queued, all connections
    websocket_queued_bytes_max                           gauge    output queued, largest connection
    websocket_rooms                                      gauge    rooms with local members
    websocket_broker_publishes_total                     counter
    websocket_broker_failures_total                      counter
    websocket_broker_reconnects_total                    counter
    websocket_event_loop_lag_seconds                     gauge    worst lag over the last 5 s
    fastws_info{version,engine,region,server_id}         gauge    1
    process_*                                            prometheus_client's process collector

Where each number comes from, so another component can feed it:

* ``server.hub.stats()`` -> dict with ``connections, messages_in,
  messages_out, bytes_in, bytes_out, closes ({code: n}), dropped
  ({(reason, priority): n}), slow_consumer_closes, queued_bytes_total,
  queued_bytes_max`` and, optionally, ``latency_ms_buckets`` (non-cumulative
  counts per bucket of :data:`LATENCY_BUCKETS_MS` plus one for +Inf) with
  ``latency_ms_sum``.  A hub without ``stats()`` yields the connection count
  only.
* ``server.hub.handshake_timeouts``, ``ping_timeouts``, ``idle_timeouts``.
* ``server.handshakes`` -> {HTTP status: n}.
* ``server.rooms`` -> ``len()`` is the number of rooms with local members.
* ``server.broker`` -> ``stats()`` returns ``publishes, failures, reconnects``.
"""

from __future__ import annotations

import socket

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.utils import floatToGoString
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

#: The article's latency buckets, milliseconds.
LATENCY_BUCKETS_MS = (1, 5, 10, 25, 50, 100, 250, 500, 1000)
PRIORITY_NAMES = {0: "low", 1: "normal", 2: "high"}
#: The classic text format every Prometheus version reads (what generate_latest writes).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_HUB_DEFAULTS = {
    "connections": 0, "messages_in": 0, "messages_out": 0, "bytes_in": 0, "bytes_out": 0,
    "closes": {}, "dropped": {}, "slow_consumer_closes": 0,
    "queued_bytes_total": 0, "queued_bytes_max": 0,
}


def snapshot(server) -> dict:
    """Every number the metrics and the stats page show, read once (O(connections))."""
    hub = server.hub
    if hub is None:
        stats = {}
    elif hasattr(hub, "stats"):
        stats = hub.stats()
    else:
        stats = {"connections": len(hub.connections)}
    snap = dict(_HUB_DEFAULTS)
    snap.update(stats)
    snap["handshakes"] = dict(getattr(server, "handshakes", {}))
    snap["timeouts"] = {kind: getattr(hub, kind + "_timeouts", 0) for kind in ("handshake", "ping", "idle")}
    rooms = getattr(server, "rooms", None)
    try:
        snap["rooms"] = len(rooms) if rooms is not None else 0
    except TypeError:
        snap["rooms"] = 0
    broker = getattr(server, "broker", None)
    bstats = broker.stats() if broker is not None and hasattr(broker, "stats") else {}
    for key in ("publishes", "failures", "reconnects"):
        snap["broker_" + key] = bstats.get(key, 0)
    health = getattr(server, "health", None)
    snap["loop_lag"] = health.monitor.lag if health is not None else 0.0
    snap["dropped_total"] = sum(snap["dropped"].values())
    return snap


class FastwsCollector:
    """Reads :func:`snapshot` at scrape time and yields the metric families."""

    def __init__(self, server) -> None:
        self.server = server
        c = server.config
        self.region = c.region
        self.server_id = c.server_id or socket.gethostname()

    def describe(self):
        return []  # generated at scrape time; nothing to check at registration

    def collect(self):
        from . import __version__, core

        s = snapshot(self.server)
        info = GaugeMetricFamily("fastws_info", "fastws build and identity",
                                 labels=["version", "engine", "region", "server_id"])
        info.add_metric([__version__, core.IMPLEMENTATION, self.region, self.server_id], 1)
        yield info

        g = GaugeMetricFamily("websocket_connections_total", "Open WebSocket connections",
                              labels=["region", "server_id"])
        g.add_metric([self.region, self.server_id], s["connections"])
        yield g

        buckets = s.get("latency_ms_buckets")
        cumulative, acc = [], 0
        for i, le in enumerate(LATENCY_BUCKETS_MS + (float("inf"),)):
            acc += buckets[i] if buckets else 0
            cumulative.append((floatToGoString(le), acc))   # "1.0" ... "+Inf", as Histogram writes them
        yield HistogramMetricFamily("websocket_message_latency_ms",
                                    "Time from a message's arrival to its reply being written, ms",
                                    buckets=cumulative, sum_value=s.get("latency_ms_sum", 0.0))

        m = CounterMetricFamily("websocket_messages", "WebSocket messages", labels=["direction"])
        m.add_metric(["inbound"], s["messages_in"])
        m.add_metric(["outbound"], s["messages_out"])
        yield m

        b = CounterMetricFamily("websocket_bytes", "Bytes read from / written to WebSocket connections",
                                labels=["direction"])
        b.add_metric(["inbound"], s["bytes_in"])
        b.add_metric(["outbound"], s["bytes_out"])
        yield b

        h = CounterMetricFamily("websocket_handshakes", "Opening handshakes by HTTP status "
                                "(101 = upgraded)", labels=["result"])
        for status, n in sorted(s["handshakes"].items()):
            h.add_metric([str(status)], n)
        yield h

        cl = CounterMetricFamily("websocket_closes", "Closed connections by close code", labels=["code"])
        for code, n in sorted(s["closes"].items()):
            cl.add_metric([str(code)], n)
        yield cl

        d = CounterMetricFamily("websocket_dropped_messages", "Messages dropped by the delivery "
                                "policy", labels=["reason", "priority"])
        for (reason, prio), n in sorted(s["dropped"].items()):
            d.add_metric([str(reason), PRIORITY_NAMES.get(prio, str(prio))], n)
        yield d

        t = CounterMetricFamily("websocket_timeouts", "Connections closed by a timer", labels=["kind"])
        for kind, n in s["timeouts"].items():
            t.add_metric([kind], n)
        yield t

        yield CounterMetricFamily("websocket_slow_consumer_closes", "Connections closed as slow "
                                  "consumers", value=s["slow_consumer_closes"])
        yield GaugeMetricFamily("websocket_queued_bytes", "Output bytes queued on all connections",
                                value=s["queued_bytes_total"])
        yield GaugeMetricFamily("websocket_queued_bytes_max", "Output bytes queued on the most "
                                "backed-up connection", value=s["queued_bytes_max"])
        yield GaugeMetricFamily("websocket_rooms", "Rooms with local members", value=s["rooms"])
        yield CounterMetricFamily("websocket_broker_publishes", "Messages published to the broker",
                                  value=s["broker_publishes"])
        yield CounterMetricFamily("websocket_broker_failures", "Broker operations that failed",
                                  value=s["broker_failures"])
        yield CounterMetricFamily("websocket_broker_reconnects", "Reconnections to the broker",
                                  value=s["broker_reconnects"])
        yield GaugeMetricFamily("websocket_event_loop_lag_seconds", "Worst event-loop lag over "
                                "the last 5 seconds", value=s["loop_lag"])


class Metrics:
    """The /metrics endpoint of one server."""

    def __init__(self, server) -> None:
        self.registry = CollectorRegistry(auto_describe=False)   # ours, not the global one
        self.registry.register(FastwsCollector(server))
        ProcessCollector(registry=self.registry)                 # process_resident_memory_bytes, fds, cpu
        if ("GET", "/metrics") not in server.http_routes:   # the app's own route wins
            server.add_http_route("GET", "/metrics", self.handle)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def handle(self, request):
        return 200, self.render(), CONTENT_TYPE, [("Cache-Control", "no-store")]
