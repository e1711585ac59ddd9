"""Prometheus exposition at ``GET /metrics`` on the WebSocket port.

Nothing here runs per message.  The frame-level counters live in the engine
(``hub.stats()``: plain C integers bumped by ``_core``), handshake results
are counted by ``Server`` (one dict increment per handshake), and this module
reads them only when Prometheus scrapes, through a custom collector on a
registry of our own (two servers in one process do not collide).

Exported (``{...}`` are labels)::

    websocket_connections_total{region,server_id}        gauge   open connections
    websocket_message_latency_ms                         histogram  buckets 1..1000 ms (see below)
    websocket_delivery_latency_seconds{route}            histogram  arrival (or publish) -> write, per
                                                                  connection written, per route (see below)
    websocket_rate_limited_total{kind=messages|bytes}    counter  connections closed over their rate limit
    websocket_messages_total{direction=inbound|outbound} counter
    websocket_bytes_total{direction=inbound|outbound}    counter  bytes on the wire
    websocket_handshakes_total{result="101"|"400"|...}   counter  HTTP status of the upgrade
    websocket_closes_total{code}                         counter  close code of every closed connection:
                                                                  1000..1015, else "3xxx", "4xxx", "other"
    websocket_dropped_messages_total{reason,priority}    counter  delivery-policy drops
    websocket_slow_consumer_closes_total                 counter
    websocket_timeouts_total{kind=handshake|ping|idle}   counter  connections closed by a timer
    websocket_queued_bytes                               gauge    output queued, all connections
    websocket_queued_bytes_max                           gauge    output queued, largest connection
    websocket_rooms                                      gauge    rooms with local members
    websocket_broker_publishes_total                     counter
    websocket_broker_failures_total                      counter
    websocket_broker_reconnects_total                    counter
    websocket_room_refusals_total{reason=limit|name|denied|rate}
                                                         counter  joins/publishes refused (RoomLimitError,
                                                                  RoomNameError, RoomDeniedError)
    websocket_auth_failures_total{reason=missing|malformed|expired|invalid}
                                                         counter  upgrades refused by a verifier
                                                                  (fastws.auth.TokenAuth as on_connect)
    websocket_broker_subscription_failures_total{op=subscribe|unsubscribe}
                                                         counter  failed broker (un)subscribe calls (retried)
    websocket_broker_subscriptions_failing               gauge    room keys waiting for a retry
    websocket_event_loop_lag_seconds                     gauge    worst lag over the last 5 s
    fastws_info{version,engine,region,server_id}         gauge    1
    fastws_region_peer_up{region,peer}                   gauge    with --region-peers (fastws.regions):
    fastws_region_queued{region,peer}                    gauge      the peer answers; its outbox length
    fastws_region_forwarded_total{region,peer}           counter    messages moved to the peer
    fastws_region_dropped_total{region,peer,reason}      counter    reason=length|age|local: never silent
    fastws_region_received_total{region,origin}          counter    delivered here from another region
    fastws_region_inbound_total{region,outcome}          counter    duplicates|redirected|undeliverable
    fastws_region_directory_lookups_total{region,result} counter    result=cached|asked
    fastws_region_users{region}                          gauge      users bound on this node
    process_*                                            prometheus_client's process collector

``websocket_message_latency_ms`` is the time a message that has just arrived
waits before the server can read and answer it, i.e. the event loop's
queueing delay: :class:`fastws.health.LoopMonitor` schedules a timer four
times a second and records how late it runs (uvloop's clock has 1 ms
resolution, so most samples of an idle loop land in the 1 ms bucket).  It is
sampled, not measured per message: it costs nothing on the hot path, and its
``_count`` grows by 4 a second whether or not messages flow.  A hub whose
``stats()`` returns ``latency_ms_buckets`` (per-message timing in ``_core``)
takes precedence.

``websocket_delivery_latency_seconds`` is timed in the hub, per connection
written (buckets of ``fastws.core.DELIVERY_LATENCY_BUCKETS``, counts kept in
C): from the start of the read that brought a message to the write of the
reply queued while handling it, or, for frames queued otherwise (a publish,
a broadcast, a send from a task or a timer), from the moment the first
frame of that loop iteration was queued to the write of each connection in
the iteration's flush.  Frames held back by a connection that cannot keep
up are not in it (they show in the queued-bytes gauges and the drops).  One
histogram per ``route`` label: the path of a ``fastws.App`` route
(``route="/chat"``; ``"*"`` for the catch-all route), ``"asgi"`` for every
connection of the ASGI front (its paths are per connection, so one label);
the first 63 labels of a process get their own series, later ones share
``route="other"``.  There is no unlabeled total: ``sum without (route)``
gives it.

With ``--workers N`` (the supervisor sets ``FASTWS_METRICS_DIR`` and each
worker ``FASTWS_WORKER``) every worker writes its snapshot to
``$FASTWS_METRICS_DIR/worker-<i>.json`` once a second, and whichever worker
answers a scrape adds up its own live snapshot and the latest snapshot of
every other live worker: counters, ``connections``, queued bytes, rooms and
the latency histogram are summed, ``queued_bytes_max`` and the loop lag are
the worst worker's.  Per-worker values are exported as extra families with a
``worker`` label (``websocket_worker_connections``,
``websocket_worker_messages_total``, ``websocket_worker_event_loop_lag_seconds``,
``fastws_worker_snapshot_age_seconds``) plus ``fastws_workers``; the totals
above carry no ``worker`` label, so ``sum()`` over them never double-counts.
Other workers' numbers are up to ~1 s old; a restarted worker starts its
counters from zero (Prometheus' ``rate()`` treats that as a counter reset);
``process_*`` describe the answering process only.  ``websocket_rooms`` is
the sum of each worker's local rooms (a room with members on two workers
counts twice).

Where each number comes from, so another component can feed it:

* ``node.hub.stats()`` -> dict with ``connections, messages_in,
  messages_out, bytes_in, bytes_out, closes ({code: n}), dropped
  ({(reason, priority): n}), slow_consumer_closes, queued_bytes_total,
  queued_bytes_max``, ``delivery_latency`` (route label -> ``{"buckets":
  non-cumulative counts per bucket of DELIVERY_LATENCY_BUCKETS plus +Inf,
  "sum": seconds, "count": n}``) and, optionally, ``latency_ms_buckets``
  (non-cumulative counts per bucket of :data:`LATENCY_BUCKETS_MS` plus one
  for +Inf) with ``latency_ms_sum``.  A hub without ``stats()`` yields the
  connection count only.
* ``node.hub.handshake_timeouts``, ``ping_timeouts``, ``idle_timeouts``.
* ``node.handshakes`` -> {HTTP status: n}.
* ``node.rooms`` -> ``len()`` is the number of rooms with local members;
  ``refused`` the refusals by reason.
* ``node.auth_failures()`` -> {reason: n} of the routes' verifiers.
* ``node.broker`` -> ``stats()`` returns ``publishes, failures, reconnects``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from . import core
from .health import LATENCY_BUCKETS_MS  # histogram bounds, ms; re-exported
from .version import __version__

#: Environment variable naming the directory of the workers' metric snapshots
#: (set by the supervisor of ``--workers N``, inherited by every worker).
METRICS_DIR_ENV = "FASTWS_METRICS_DIR"


def worker_metrics_file(directory: str, index) -> str:
    """Where worker ``index`` writes its metric snapshot."""
    return os.path.join(directory, f"worker-{index}.json")

log = logging.getLogger("fastws")

#: Seconds between two snapshots a worker writes for the others (``--workers N``).
WRITE_INTERVAL = 1.0
PRIORITY_NAMES = {0: "low", 1: "normal", 2: "high"}
#: The classic text format every Prometheus version reads (what generate_latest writes).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_HUB_DEFAULTS = {
    "connections": 0, "messages_in": 0, "messages_out": 0, "bytes_in": 0, "bytes_out": 0,
    "closes": {}, "dropped": {}, "slow_consumer_closes": 0,
    "queued_bytes_total": 0, "queued_bytes_max": 0, "delivery_latency": {},
}


def close_label(code) -> str:
    """The ``code`` label of ``websocket_closes_total``: the registered codes
    1000..1015 as themselves; a client picks any code in 3000..4999, so those
    share ``"3xxx"`` / ``"4xxx"`` and anything else is ``"other"`` (at most 19
    series, whatever the clients send)."""
    try:
        n = int(code)
    except (TypeError, ValueError):
        return code if code in ("3xxx", "4xxx") else "other"
    if 1000 <= n <= 1015:
        return str(n)
    if 3000 <= n <= 3999:
        return "3xxx"
    if 4000 <= n <= 4999:
        return "4xxx"
    return "other"


def snapshot(node) -> dict:
    """Every number the metrics and the stats page show, read once (O(connections))."""
    hub = node.hub
    snap = dict(_HUB_DEFAULTS)
    if hub is not None:
        snap.update(hub.stats())
    snap["handshakes"] = dict(node.handshakes)
    fast = hub.fast_upgrades if hub is not None else 0   # upgrades the hub answered in C
    if fast:
        snap["handshakes"][101] = snap["handshakes"].get(101, 0) + fast
    snap["timeouts"] = {kind: getattr(hub, kind + "_timeouts", 0) if hub is not None else 0
                        for kind in ("handshake", "body", "ping", "idle")}
    rooms = node.rooms
    snap["rooms"] = len(rooms) if rooms is not None else 0
    bstats = node.broker.stats() if node.broker is not None else {}
    for key in ("publishes", "failures", "reconnects"):
        snap["broker_" + key] = bstats.get(key, 0)
    refused = rooms.refused if rooms is not None else {}
    snap["room_refusals_limit"] = refused.get("limit", 0)
    snap["room_refusals_name"] = refused.get("name", 0)
    snap["room_refusals_denied"] = refused.get("denied", 0)
    snap["room_refusals_rate"] = refused.get("rate", 0)
    snap["auth_failures"] = node.auth_failures()
    subs = node.bridge.subscription_state() if node.bridge is not None else {}
    snap["broker_subscribe_failures"] = subs.get("subscribe_failures", 0)
    snap["broker_unsubscribe_failures"] = subs.get("unsubscribe_failures", 0)
    snap["broker_subscriptions_failing"] = subs.get("failing", 0)
    health = node.health
    snap["loop_lag"] = health.monitor.lag if health is not None else 0.0
    if "latency_ms_buckets" not in snap and health is not None:   # sampled loop delay (see above)
        snap["latency_ms_buckets"] = list(health.monitor.latency_ms_buckets)
        snap["latency_ms_sum"] = health.monitor.latency_ms_sum
    snap["dropped_total"] = sum(snap["dropped"].values())
    return snap


# -- aggregation over workers -------------------------------------------------------

_SUMMED = ("connections", "messages_in", "messages_out", "bytes_in", "bytes_out", "slow_consumer_closes",
           "queued_bytes_total", "rooms", "broker_publishes", "broker_failures", "broker_reconnects",
           "room_refusals_limit", "room_refusals_name", "room_refusals_denied", "room_refusals_rate",
           "broker_subscribe_failures",
           "broker_unsubscribe_failures", "broker_subscriptions_failing",
           "dropped_total", "latency_ms_sum")
_WORST = ("queued_bytes_max", "loop_lag")


def portable(snap: dict) -> dict:
    """``snap`` as plain JSON (string keys; ``dropped`` as ``[[reason, priority, n], ...]``)."""
    out = {k: snap.get(k, 0) for k in _SUMMED + _WORST}
    out["closes"] = {str(k): v for k, v in snap.get("closes", {}).items()}
    out["handshakes"] = {str(k): v for k, v in snap.get("handshakes", {}).items()}
    out["timeouts"] = dict(snap.get("timeouts", {}))
    out["auth_failures"] = dict(snap.get("auth_failures", {}))
    out["dropped"] = [[str(r), p, n] for (r, p), n in snap.get("dropped", {}).items()]
    out["latency_ms_buckets"] = list(snap.get("latency_ms_buckets") or [0] * (len(LATENCY_BUCKETS_MS) + 1))
    out["delivery_latency"] = {str(label): {"buckets": list(h["buckets"]), "sum": h["sum"]}
                               for label, h in (snap.get("delivery_latency") or {}).items()}
    out["rate_limited"] = dict(snap.get("rate_limited") or {})
    return out


def merge(snaps: list[dict]) -> dict:
    """One snapshot (the collector's shape) from several :func:`portable` ones."""
    out = {k: 0 for k in _SUMMED}
    out.update({k: 0 for k in _WORST})
    closes, handshakes, timeouts, dropped, auth = {}, {}, {}, {}, {}
    buckets = [0] * (len(LATENCY_BUCKETS_MS) + 1)
    delivery, rate_limited = {}, {}     # delivery: route label -> {"buckets", "sum"}
    width = len(core.DELIVERY_LATENCY_BUCKETS) + 1
    for s in snaps:
        for k in _SUMMED:
            out[k] += s.get(k, 0)
        for k in _WORST:
            out[k] = max(out[k], s.get(k, 0))
        for src, dst in ((s.get("closes", {}), closes), (s.get("handshakes", {}), handshakes),
                         (s.get("timeouts", {}), timeouts), (s.get("auth_failures", {}), auth)):
            for key, n in src.items():
                dst[key] = dst.get(key, 0) + n
        for reason, prio, n in s.get("dropped", ()):
            dropped[(reason, prio)] = dropped.get((reason, prio), 0) + n
        for i, n in enumerate(s.get("latency_ms_buckets", ())[:len(buckets)]):
            buckets[i] += n
        for label, h in (s.get("delivery_latency") or {}).items():
            acc = delivery.setdefault(label, {"buckets": [0] * width, "sum": 0.0})
            for i, n in enumerate(h.get("buckets", ())[:width]):
                acc["buckets"][i] += n
            acc["sum"] += h.get("sum", 0.0)
        for kind, n in s.get("rate_limited", {}).items():
            rate_limited[kind] = rate_limited.get(kind, 0) + n
    out.update(closes=closes, handshakes=handshakes, timeouts=timeouts, dropped=dropped,
               latency_ms_buckets=buckets, auth_failures=auth,
               delivery_latency=delivery, rate_limited=rate_limited)
    return out


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError, OverflowError):
        return isinstance(pid, int)
    return True


class WorkerSnapshots:
    """This worker's side of the aggregation: writes its snapshot every
    :data:`WRITE_INTERVAL` seconds, reads the other workers' at scrape time."""

    def __init__(self, node, directory: str, worker: str) -> None:
        self.node = node
        self.directory = directory
        self.worker = worker
        self.path = worker_metrics_file(directory, worker)
        self._handle = None
        self._warned = False

    def start(self) -> None:
        self._handle = self.node.loop.call_soon(self._tick)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _tick(self) -> None:
        self._handle = self.node.loop.call_later(WRITE_INTERVAL, self._tick)
        self.write()

    def write(self) -> None:
        doc = {"worker": self.worker, "pid": os.getpid(), "time": time.time(),
               "snap": portable(snapshot(self.node))}
        tmp = self.path + ".tmp"
        try:
            with open(tmp, "w") as fh:
                json.dump(doc, fh, separators=(",", ":"))
            os.replace(tmp, self.path)            # readers never see half a file
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("fastws: cannot write metrics snapshot %s: %s", self.path, exc)

    def others(self) -> list[dict]:
        """The latest snapshot document of every other live worker."""
        docs = []
        try:
            names = sorted(os.listdir(self.directory))
        except OSError:
            return docs
        own = os.path.basename(self.path)
        for name in names:
            if name == own or not name.startswith("worker-") or not name.endswith(".json"):
                continue
            try:
                with open(os.path.join(self.directory, name)) as fh:
                    doc = json.load(fh)
            except (OSError, ValueError):
                continue
            if isinstance(doc, dict) and isinstance(doc.get("snap"), dict) and _pid_alive(doc.get("pid")):
                docs.append(doc)
        return docs


class FastwsCollector:
    """Reads :func:`snapshot` at scrape time and yields the metric families."""

    def __init__(self, node, workers: WorkerSnapshots | None = None) -> None:
        self.node = node
        self.workers = workers        # set with --workers N: aggregate over every worker
        c = node.config
        self.region = c.region
        self.node_id = c.server_id or socket.gethostname()

    def describe(self):
        return []  # generated at scrape time; nothing to check at registration

    def collect(self):
        per_worker = None
        if self.workers is None:
            s = snapshot(self.node)
        else:
            now = time.time()
            per_worker = [{"worker": self.workers.worker, "pid": os.getpid(), "time": now,
                           "snap": portable(snapshot(self.node))}] + self.workers.others()
            s = merge([d["snap"] for d in per_worker])
        info = GaugeMetricFamily("fastws_info", "fastws build and identity",
                                 labels=["version", "engine", "region", "server_id"])
        info.add_metric([__version__, core.IMPLEMENTATION, self.region, self.node_id], 1)
        yield info

        g = GaugeMetricFamily("websocket_connections_total", "Open WebSocket connections",
                              labels=["region", "server_id"])
        g.add_metric([self.region, self.node_id], s["connections"])
        yield g

        buckets = s.get("latency_ms_buckets")
        cumulative, acc = [], 0
        for i, le in enumerate(LATENCY_BUCKETS_MS + (float("inf"),)):
            acc += buckets[i] if buckets else 0
            cumulative.append((floatToGoString(le), acc))   # "1.0" ... "+Inf", as Histogram writes them
        yield HistogramMetricFamily("websocket_message_latency_ms",
                                    "Time a message that has just arrived waits before the server can "
                                    "handle it, ms: the event loop's queueing delay, sampled 4 times a "
                                    "second as the lateness of a timer (not timed per message)",
                                    buckets=cumulative, sum_value=s.get("latency_ms_sum", 0.0))

        yield self._delivery_latency(s.get("delivery_latency") or {})
        rl = CounterMetricFamily("websocket_rate_limited", "Connections closed for sending over their "
                                 "rate limit (max_messages_per_second: messages, max_bytes_per_second: "
                                 "bytes)", labels=["kind"])
        for kind in ("messages", "bytes"):
            rl.add_metric([kind], (s.get("rate_limited") or {}).get(kind, 0))
        yield rl

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

        cl = CounterMetricFamily("websocket_closes", "Closed connections by close code (1000..1015; "
                                 "3xxx, 4xxx: application codes; other)", labels=["code"])
        closes: dict = {}
        for code, n in s["closes"].items():
            label = close_label(code)
            closes[label] = closes.get(label, 0) + n
        for label, n in sorted(closes.items()):
            cl.add_metric([label], n)
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
        rr = CounterMetricFamily("websocket_room_refusals", "Room joins and publishes refused: past "
                                 "max_rooms_per_connection (limit), a room name past max_room_name or "
                                 "not UTF-8 (name), refused by the app's authorize_join/authorize_publish "
                                 "(denied), joins past max_joins_per_second (rate)", labels=["reason"])
        rr.add_metric(["limit"], s.get("room_refusals_limit", 0))
        rr.add_metric(["name"], s.get("room_refusals_name", 0))
        rr.add_metric(["denied"], s.get("room_refusals_denied", 0))
        rr.add_metric(["rate"], s.get("room_refusals_rate", 0))
        yield rr
        af = CounterMetricFamily("websocket_auth_failures", "Upgrades refused by a token verifier "
                                 "(fastws.auth.TokenAuth as a route's on_connect), by reason",
                                 labels=["reason"])
        for reason, n in sorted(s.get("auth_failures", {}).items()):
            af.add_metric([str(reason)], n)
        yield af
        sf = CounterMetricFamily("websocket_broker_subscription_failures", "Broker subscribe/unsubscribe "
                                 "calls that failed (their keys are retried)", labels=["op"])
        sf.add_metric(["subscribe"], s.get("broker_subscribe_failures", 0))
        sf.add_metric(["unsubscribe"], s.get("broker_unsubscribe_failures", 0))
        yield sf
        yield GaugeMetricFamily("websocket_broker_subscriptions_failing", "Room keys whose broker "
                                "(un)subscription failed and waits for a retry",
                                value=s.get("broker_subscriptions_failing", 0))
        yield GaugeMetricFamily("websocket_event_loop_lag_seconds", "Worst event-loop lag over "
                                "the last 5 seconds", value=s["loop_lag"])
        if getattr(self.node, "regions", None) is not None:
            yield from self._regions(self.node.regions.stats())
        if per_worker is not None:
            yield from self._per_worker(per_worker, now)

    @staticmethod
    def _regions(r: dict):
        """The families of ``--region-peers`` (this node's counts)."""
        region = r["region"]
        up = GaugeMetricFamily("fastws_region_peer_up", "1 when the peer region's Redis answers this node",
                               labels=["region", "peer"])
        queued = GaugeMetricFamily("fastws_region_queued", "Messages waiting in this region's outbox for "
                                   "the peer region", labels=["region", "peer"])
        fwd = CounterMetricFamily("fastws_region_forwarded", "Messages this node moved to the peer region's "
                                  "inbound stream", labels=["region", "peer"])
        drop = CounterMetricFamily("fastws_region_dropped", "Messages for the peer region dropped by this node: "
                                   "over region_queue_max (length) or region_queue_age (age) while it could "
                                   "not take them, or while this region's Redis was down (local)",
                                   labels=["region", "peer", "reason"])
        for peer, p in sorted(r["peers"].items()):
            up.add_metric([region, peer], 1 if p["up"] else 0)
            queued.add_metric([region, peer], p["queued"])
            fwd.add_metric([region, peer], p["forwarded"])
            for reason, n in sorted(p["dropped"].items()):
                drop.add_metric([region, peer, reason], n)
        rec = CounterMetricFamily("fastws_region_received", "Messages from another region delivered to this "
                                  "region by this node", labels=["region", "origin"])
        for origin, n in sorted(r["received"].items()):
            rec.add_metric([region, origin], n)
        c = r["counters"]
        other = CounterMetricFamily("fastws_region_inbound", "Other outcomes of messages from other regions: "
                                    "duplicates (sent again, not delivered twice), redirected (the user "
                                    "moved: sent on to its region once), undeliverable (the user is in no "
                                    "region)", labels=["region", "outcome"])
        for outcome in ("duplicates", "redirected", "undeliverable"):
            other.add_metric([region, outcome], c[outcome])
        look = CounterMetricFamily("fastws_region_directory_lookups", "Where-is-this-user lookups: answered "
                                   "from this node's cache or by asking the regions' directories",
                                   labels=["region", "result"])
        look.add_metric([region, "cached"], c["lookups_cached"])
        look.add_metric([region, "asked"], c["lookups_asked"])
        users = GaugeMetricFamily("fastws_region_users", "Users with a connection on this node",
                                  labels=["region"])
        users.add_metric([region], r["users"])
        yield from (up, queued, fwd, drop, rec, other, look, users)

    @staticmethod
    def _delivery_latency(per_route: dict) -> HistogramMetricFamily:
        """``websocket_delivery_latency_seconds{route}`` from ``{label: {"buckets", "sum"}}``."""
        fam = HistogramMetricFamily(
            "websocket_delivery_latency_seconds",
            "Time from a message's arrival to its frame's write, seconds, one observation per "
            "connection written, by the connection's route: a reply from the start of the read that "
            "brought the message; frames of a publish, broadcast or send from a task or timer from "
            "the first frame queued in that loop iteration; frames held by a backed-up connection "
            "not counted. route is the fastws.App route's path, \"asgi\" for every ASGI connection; "
            f"past the first {core.DELIVERY_LATENCY_ROUTES - 1} routes of a process, routes share "
            "route=\"other\"",
            labels=["route"])
        bounds = core.DELIVERY_LATENCY_BUCKETS + (float("inf"),)
        for label in sorted(per_route):
            h = per_route[label]
            cumulative, acc = [], 0
            for i, le in enumerate(bounds):
                acc += h["buckets"][i] if i < len(h["buckets"]) else 0
                cumulative.append((floatToGoString(le), acc))
            fam.add_metric([label], cumulative, sum_value=h.get("sum", 0.0))
        return fam

    @staticmethod
    def _per_worker(docs, now):
        docs = sorted(docs, key=lambda d: str(d.get("worker")))
        yield GaugeMetricFamily("fastws_workers", "Worker processes whose numbers this scrape adds up",
                                value=len(docs))
        conns = GaugeMetricFamily("websocket_worker_connections", "Open WebSocket connections per "
                                  "worker", labels=["worker"])
        msgs = CounterMetricFamily("websocket_worker_messages", "WebSocket messages per worker",
                                   labels=["worker", "direction"])
        lag = GaugeMetricFamily("websocket_worker_event_loop_lag_seconds", "Worst event-loop lag "
                                "over the last 5 seconds per worker", labels=["worker"])
        age = GaugeMetricFamily("fastws_worker_snapshot_age_seconds", "Age of the worker's numbers "
                                "in this scrape (0 for the worker that answered)", labels=["worker"])
        for d in docs:
            w, snap = str(d.get("worker")), d["snap"]
            conns.add_metric([w], snap.get("connections", 0))
            msgs.add_metric([w, "inbound"], snap.get("messages_in", 0))
            msgs.add_metric([w, "outbound"], snap.get("messages_out", 0))
            lag.add_metric([w], snap.get("loop_lag", 0.0))
            age.add_metric([w], max(0.0, now - d.get("time", now)))
        yield conns
        yield msgs
        yield lag
        yield age


class Metrics:
    """The /metrics endpoint of one node."""

    def __init__(self, node) -> None:
        self.registry = CollectorRegistry(auto_describe=False)   # ours, not the global one
        self.workers = None
        directory, worker = os.environ.get(METRICS_DIR_ENV), os.environ.get("FASTWS_WORKER")
        if directory and worker is not None and os.path.isdir(directory):   # under the supervisor
            self.workers = WorkerSnapshots(node, directory, worker)
            self.workers.start()
        self.registry.register(FastwsCollector(node, self.workers))
        ProcessCollector(registry=self.registry)                 # process_resident_memory_bytes, fds, cpu
        node.routes.add("GET", "/metrics", self.handle)   # the app's own route wins

    def stop(self) -> None:
        if self.workers is not None:
            self.workers.stop()

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def handle(self, request):
        return 200, self.render(), CONTENT_TYPE, [("Cache-Control", "no-store")]
