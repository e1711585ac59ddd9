"""The gateway: fastws holds the WebSockets, a backend elsewhere handles their events.

:class:`Gateway` serves WebSocket routes of a :class:`fastws.App` (``fastws
serve --gateway URL`` serves every path of an empty one) by handing each
connection's *connect*, *message* and *disconnect* events to a backend
(:mod:`fastws.gateway.wire` says what they look like) and carrying out what
the backend answers: accept or refuse the upgrade, reply, join or leave
rooms, send to other connections, publish, close.

How events travel:

* every open connection has a queue of events waiting for the backend (at
  most ``gateway_queue``; past it ``gateway_overflow`` applies to a new
  message: close the connection 1013 "try again later", or drop the message
  and count it);
* once per loop iteration the queued events are gathered into batches (up
  to ``gateway_batch`` events, when the backend takes batches) and handed
  to the transport, at most ``gateway_concurrency`` batches out at once;
  the events of one connection are in at most one batch out, so the backend
  sees them in order, and its answers are carried out in order;
* transports: :class:`~fastws.gateway.transport.HttpTransport` (JSON POSTs
  over a keep-alive pool) and
  :class:`~fastws.gateway.transport.StreamsTransport` (a Redis Stream read
  by a consumer group of workers, answers on a stream of this node's own).

When the backend is down or slow the connections stay open.  A batch the
backend cannot have seen (:class:`~fastws.gateway.http.Unseen`: no
connection, 503, a Redis error) goes back to the front of its connections'
queues and is sent again after a backoff (50 ms doubling to 2 s, with
jitter), so nothing is lost while the queues hold.  A batch that may have
been processed without an answer (:class:`~fastws.gateway.http.Failed`: a
timeout, another status than 200, a malformed answer): its connect and
disconnect events are sent again up to ``gateway_retries`` times (they
name the connection, so a backend can take them twice), its messages are
counted as failed (``fastws_gateway_event_failures_total``) and logged,
never sent twice.  A connect not answered within ``gateway_timeout`` gets
503 with a Retry-After; one the backend failed gets 502.

Exactly one disconnect event follows every connection the backend
accepted, whatever ended it (1006 when the client vanished), after the
messages that came before it; none follows a refused or unanswered connect.

``/health`` has a check ``gateway`` (fails while the backend is
unreachable or, on Streams, has left events unanswered past
``gateway_timeout``: new connections cannot be accepted then) with the
backend's state, latency and queue depth; ``/metrics`` has the
``fastws_gateway_*`` families (see :class:`GatewayCollector`).
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import random
import time
from collections import deque
from json.encoder import encode_basestring

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from ..app import Accept
from ..config import Config, mask_url
from ..errors import TRY_AGAIN, ConnectionClosed, Reject, RoomError, ServerStartError
from ..limits import jittered
from .http import BackendError
from .transport import make_transport
from .wire import CONNECT, DISCONNECT, MESSAGE, AnswerError, data_fields, message_of, valid_close_code

log = logging.getLogger("fastws.gateway")

__all__ = ["Gateway", "GatewayCollector", "ADDED_BUCKETS", "BACKEND_BUCKETS"]

#: histogram bounds (seconds) of the gateway's own time per event
ADDED_BUCKETS = (0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.01, 0.025, 0.05, 0.1,
                 0.25, 1.0)
#: histogram bounds (seconds) of the backend's answer time per request / stream entry
BACKEND_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: the key of conn.store that carries a connect answer from on_connect to on_open
_ANSWER = "fastws.gateway.answer"
BACKOFF_BASE, BACKOFF_CAP = 0.05, 2.0
#: how often a failure of the same kind is logged at most (seconds)
LOG_EVERY = 5.0
#: the slowest recent answer times kept for /health's percentiles
RECENT = 2048
#: a batch stops growing past this many characters of JSON (one large message still goes alone)
BATCH_CHARS = 1 << 20


class _Item:
    """One event on its way: its JSON text and what it belongs to."""

    __slots__ = ("kind", "frag", "link", "future", "t0", "attempts")

    def __init__(self, kind, frag, link, t0) -> None:
        self.kind = kind
        self.frag = frag
        self.link = link            # the _Link of its connection (None for a connect)
        self.future = None          # connect: resolved with the answer
        self.t0 = t0                # perf_counter() when the event happened
        self.attempts = 0


class _Link:
    """The gateway's side of one open connection."""

    __slots__ = ("conn", "id", "prefix", "namespace", "queue", "busy", "ready", "closed", "done",
                 "overflowed")

    def __init__(self, conn, prefix: str, namespace: str) -> None:
        self.conn = conn
        self.id = conn.id
        self.prefix = prefix        # the JSON text of a message event up to its id's number
        self.namespace = namespace  # of the rooms it joins
        self.queue: deque = deque()
        self.busy = False           # some of its events are in a batch out
        self.ready = False          # in the gateway's ready list
        self.closed = False         # its disconnect event is queued
        self.done = False           # its disconnect event was handled
        self.overflowed = False     # closed for a full queue (once)


class _Batch:
    """Events sent together (one request, one stream entry)."""

    __slots__ = ("items", "links", "frags", "sent_at")

    def __init__(self, items, links) -> None:
        self.items = items
        self.links = links
        self.frags = [it.frag for it in items]
        self.sent_at = 0.0


class _Histogram:
    """Counts per bucket (not cumulative) and the sum, for /metrics."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> list:
        out, acc = [], 0
        for le, n in zip(self.bounds + (float("inf"),), self.counts, strict=True):
            acc += n
            out.append((floatToGoString(le), acc))
        return out

    def family(self, name: str, doc: str) -> HistogramMetricFamily:
        return HistogramMetricFamily(name, doc, buckets=self.cumulative(), sum_value=self.sum)


class Gateway:
    """See the module docstring.  Built from the settings (``Gateway.from_config``)
    or with keyword arguments; :meth:`serve` puts it on routes of an app."""

    def __init__(self, url: str, *, token: str | None = None, timeout: float = 5.0, concurrency: int = 32,
                 batch: int = 100, retries: int = 3, queue: int = 256, overflow: str = "close",
                 retry_after: float = 5.0) -> None:
        # one check for every way in: the Config's
        Config(gateway=url, gateway_token=token, gateway_timeout=timeout, gateway_concurrency=concurrency,
               gateway_batch=batch, gateway_retries=retries, gateway_queue=queue, gateway_overflow=overflow)
        self.url = url
        self.token = token
        self.timeout = float(timeout)
        self.concurrency = int(concurrency)
        self.batch = int(batch)
        self.retries = int(retries)
        self.max_queue = int(queue)
        self.overflow_close = overflow == "close"
        self.retry_after = retry_after
        self.app = None
        self.node = None
        self.loop = None
        self.node_id = ""
        self.transport = make_transport(self)
        self.links: dict = {}             # connection -> _Link
        self.ready: deque = deque()       # links with queued events and none out
        self.connects: deque = deque()    # connect events waiting to be sent
        self.inflight = 0                 # batches out
        self.inflight_events = 0
        self._seq = 0                     # event ids
        self._scheduled = False           # a flush is scheduled
        self._retry_at = 0.0              # loop time before which nothing is sent (backoff)
        self._retry_timer = None
        self._failures = 0                # consecutive failures that backed off
        self.up = True                    # the backend answered last time we asked
        self.down_since = None            # wall time it went down
        self.last_error = ""
        self._logged: dict = {}           # kind of failure -> loop time last logged
        self._stopping = False
        self._idle = None                 # set when nothing is queued or out (stop waits for it)
        # numbers for /metrics and /health
        self.events = dict.fromkeys((CONNECT, MESSAGE, DISCONNECT), 0)       # sent to the backend
        self.answered = dict.fromkeys((CONNECT, MESSAGE, DISCONNECT), 0)
        self.failures: dict = {}          # (type, reason) -> count
        self.retried = dict.fromkeys((CONNECT, MESSAGE, DISCONNECT), 0)
        self.dropped = 0                  # messages dropped past gateway_queue (policy drop)
        self.overflow_closes = 0          # connections closed past gateway_queue (policy close)
        self.requests = 0                 # requests / stream entries sent
        self.refused = 0                  # connects the backend refused
        self.added = {kind: _Histogram(ADDED_BUCKETS) for kind in (CONNECT, MESSAGE, DISCONNECT)}
        self.backend_time = _Histogram(BACKEND_BUCKETS)
        self.recent: deque = deque(maxlen=RECENT)     # recent backend answer times, seconds

    @classmethod
    def from_config(cls, config: Config) -> Gateway:
        return cls(config.gateway, token=config.gateway_token, timeout=config.gateway_timeout,
                   concurrency=config.gateway_concurrency, batch=config.gateway_batch,
                   retries=config.gateway_retries, queue=config.gateway_queue,
                   overflow=config.gateway_overflow, retry_after=config.retry_after)

    # -- on an app ---------------------------------------------------------------------

    def serve(self, app, paths="*") -> None:
        """Serve ``paths`` (a path, ``"*"`` for every path without a route of
        its own, or a comma-separated list / a list of them) of ``app`` from
        the backend.  ServerStartError (one line) for a path the app routes
        already."""
        if isinstance(paths, str):
            paths = [p.strip() for p in paths.split(",") if p.strip()]
        taken = [p for p in paths if p in app.routes]
        if taken:
            which = "'*' (every path without a route)" if taken[0] == "*" else repr(taken[0])
            raise ServerStartError(f"gateway_routes: the app has its own route {which}; list the paths "
                                   "that go to the backend with --gateway-routes /path,...")
        if self.app is not None and self.app is not app:
            raise ServerStartError("a Gateway serves routes of one app")
        for path in paths:
            app.route(path, on_connect=self.on_connect, on_open=self.on_open, on_message=self.on_message,
                      on_disconnect=self.on_disconnect)
        if self.app is None:
            self.app = app
            app.on_startup(self.start)
            app.on_shutdown(self.stop)
            if app.node is not None:         # added while serving
                raise ServerStartError("add gateway routes before the server starts")

    async def start(self) -> None:
        """The node started (an ``on_startup`` hook of the app): start the transport."""
        node = self.app.node
        self.node, self.loop, self.node_id = node, asyncio.get_running_loop(), node.node_id
        await self.transport.start()
        if node.health is not None:
            node.health.add_check("gateway", self.check)
        if node.metrics is not None:
            node.metrics.registry.register(GatewayCollector(self))
        log.info("fastws: gateway to %s (%s transport; %d in flight, batches of %d at most)",
                 mask_url(self.url), self.transport.kind, self.concurrency, self.batch)

    async def stop(self) -> None:
        """The node stops (an ``on_shutdown`` hook, after the connections are
        closed): send what is queued (the disconnect events) for up to
        ``gateway_timeout``, then close the transport."""
        self._stopping = True
        deadline = self.loop.time() + self.timeout
        while (self.ready or self.inflight or self.connects or any(not lk.done for lk in self.links.values())) \
                and self.loop.time() < deadline:
            self._kick()
            await asyncio.sleep(0.01)
        left = sum(len(lk.queue) + (not lk.done) for lk in self.links.values())
        if left:
            log.warning("fastws: gateway stopped with %d events not delivered", left)
        if self._retry_timer is not None:
            self._retry_timer.cancel()
        await self.transport.stop()

    # -- the route's callbacks -------------------------------------------------------------

    def _next_id(self) -> str:
        self._seq += 1
        return f"{self.node_id}-e{self._seq}"

    async def on_connect(self, request):
        """Ask the backend; answer the upgrade with what it says."""
        t0 = time.perf_counter()
        conn_id = request.conn.reserve_id()
        frag = self._connect_event(request, conn_id)
        item = _Item(CONNECT, frag, None, t0)
        item.future = self.loop.create_future()
        self.connects.append(item)
        self._kick()
        try:
            answer = await asyncio.wait_for(item.future, self.timeout)
        except asyncio.TimeoutError:
            self._count_failure(CONNECT, "timeout")
            return Reject(503, "the application did not answer in time",
                          [("Retry-After", str(round(jittered(self.retry_after, self.retry_after))))])
        if isinstance(answer, Exception):
            status = 503 if getattr(answer, "unseen", False) else 502
            return Reject(status, "the application failed to answer",
                          [("Retry-After", str(round(jittered(self.retry_after, self.retry_after))))]
                          if status == 503 else None)
        try:
            return self._decide(request, answer)
        except AnswerError as exc:
            self._bad_answer(CONNECT, exc)
            return Reject(502, "the application's answer was malformed")

    def _decide(self, request, answer: dict):
        accept = answer.get("accept", True)
        if type(accept) is not bool:
            raise AnswerError("accept: a boolean")
        if not accept:
            status = answer.get("status", 403)
            reason = answer.get("reason", "")
            if type(status) is not int or not 400 <= status <= 599:
                raise AnswerError("status: an HTTP status 400..599")
            if type(reason) is not str:
                raise AnswerError("reason: a string")
            self.refused += 1
            return Reject(status, reason)
        sub = answer.get("subprotocol")
        if sub is not None and (type(sub) is not str or sub not in request.subprotocols):
            raise AnswerError("subprotocol: one of the subprotocols the client offered")
        user = answer.get("user")
        if user is not None and type(user) not in (str, int):
            raise AnswerError("user: a string")
        store = {_ANSWER: answer}
        if user is not None:
            store["user_id"] = str(user)
        return Accept(subprotocol=sub, store=store)

    def _connect_event(self, request, conn_id: str) -> str:
        headers: dict = {}
        cookies: dict = {}
        for name, value in request.headers:
            if name == "cookie":
                for part in value.split(";"):
                    k, sep, v = part.strip().partition("=")
                    if sep and k:
                        cookies.setdefault(k, v)
            headers[name] = headers[name] + ", " + value if name in headers else value
        addr = request.remote_address
        host = addr[0] if isinstance(addr, tuple) and addr else (addr or "")
        return ('{"type":"connect","id":"%s","connection_id":%s,"route":%s,"node":%s,"headers":%s,'  # noqa: UP031
                '"query":%s,"query_string":%s,"cookies":%s,"subprotocols":%s,"remote_address":%s}' % (
                    self._next_id(), encode_basestring(conn_id), encode_basestring(request.path),
                    encode_basestring(self.node_id), _obj(headers), _obj(request.query),
                    encode_basestring(request.query_string or ""), _obj(cookies),
                    "[" + ",".join(encode_basestring(s) for s in request.subprotocols) + "]",
                    encode_basestring(str(host))))

    def on_open(self, conn) -> None:
        """The upgrade is done: start the connection's queue, then carry out
        the rest of the connect answer (rooms, replies)."""
        user = conn.store.get("user_id")
        route = conn.route
        prefix = ('{"type":"message","connection_id":%s,"route":%s,"node":%s,%s"id":"%s-e' % (  # noqa: UP031
            encode_basestring(conn.id), encode_basestring(conn.path), encode_basestring(self.node_id),
            "" if user is None else '"user":' + encode_basestring(str(user)) + ",", self.node_id))
        link = _Link(conn, prefix, getattr(route, "namespace", "") or "")
        self.links[conn] = link
        answer = conn.store.pop(_ANSWER, None)
        if answer:
            try:
                self._carry_out(link, answer, CONNECT)
            except AnswerError as exc:          # the connection is open: it stays, the rest is not done
                self._bad_answer(CONNECT, exc)

    def on_message(self, conn, data) -> None:
        """One message: queue its event (or apply the overflow policy)."""
        link = self.links.get(conn)
        if link is None:
            return
        queue = link.queue
        if len(queue) >= self.max_queue:
            self._overflow(link)
            return
        self._seq += 1
        queue.append(_Item(MESSAGE, link.prefix + str(self._seq) + '",' + data_fields(data) + "}", link,
                           time.perf_counter()))
        if not link.busy and not link.ready:
            link.ready = True
            self.ready.append(link)
            if not self._scheduled:
                self._scheduled = True
                self.loop.call_soon(self._flush)

    def on_disconnect(self, conn, code, reason) -> None:
        """The connection is gone: queue its disconnect event (after its messages)."""
        link = self.links.get(conn)
        if link is None or link.closed:
            return
        link.closed = True
        user = conn.store.get("user_id") if conn.store is not None else None
        frag = ('{"type":"disconnect","id":"%s","connection_id":%s,"route":%s,"node":%s,%s"code":%d,'  # noqa: UP031
                '"reason":%s}' % (self._next_id(), encode_basestring(link.id), encode_basestring(conn.path),
                                  encode_basestring(self.node_id),
                                  "" if user is None else '"user":' + encode_basestring(str(user)) + ",",
                                  code if type(code) is int else 1006, encode_basestring(reason or "")))
        link.queue.append(_Item(DISCONNECT, frag, link, time.perf_counter()))
        if not link.busy and not link.ready:
            link.ready = True
            self.ready.append(link)
        self._kick()

    def _overflow(self, link: _Link) -> None:
        if self.overflow_close:
            if not link.overflowed:
                link.overflowed = True
                self.overflow_closes += 1
                self._log_once("overflow", "fastws: gateway: connection %s has %d events waiting for the "
                               "backend; closing it 1013", link.id, len(link.queue))
                link.conn.close(TRY_AGAIN.code, TRY_AGAIN.reason)
        else:
            self.dropped += 1
            self._log_once("overflow", "fastws: gateway: connection %s has %d events waiting for the "
                           "backend; dropping its new messages", link.id, len(link.queue))

    # -- sending -----------------------------------------------------------------------------

    def _kick(self) -> None:
        if not self._scheduled and self.loop is not None:
            self._scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Gather queued events into batches and hand them to the transport."""
        self._scheduled = False
        if self.inflight >= self.concurrency or not (self.ready or self.connects):
            return
        if self._retry_at and self.loop.time() < self._retry_at:
            if self._retry_timer is None:
                self._retry_timer = self.loop.call_at(self._retry_at, self._retry)
            return
        cap = self.transport.batch_size()
        batches = []
        connects, ready = self.connects, self.ready
        room = self.concurrency - self.inflight
        while len(batches) < room and (connects or ready):
            items, links = [], []
            size = 0                              # characters of JSON in the batch
            while connects and len(items) < cap:
                it = connects.popleft()
                if not it.future.done():          # not given up by its on_connect
                    items.append(it)
                    size += len(it.frag)
            while ready and len(items) < cap and size < BATCH_CHARS:
                link = ready.popleft()
                link.ready = False
                queue = link.queue
                take = min(len(queue), cap - len(items))
                for _ in range(take):
                    it = queue.popleft()
                    items.append(it)
                    size += len(it.frag)
                    if size >= BATCH_CHARS:       # large messages: fewer per batch
                        break
                link.busy = True
                links.append(link)
            if items:
                batches.append(_Batch(items, links))
        if not batches:
            return
        events = self.events
        for b in batches:
            for it in b.items:
                events[it.kind] += 1
            self.inflight_events += len(b.items)
        self.inflight += len(batches)
        self.requests += len(batches)
        self.transport.submit(batches)

    def _retry(self) -> None:
        self._retry_timer = None
        self._retry_at = 0.0
        if self.ready or self.connects:
            self._kick()
        elif not self.up:
            self.loop.create_task(self._probe())

    async def _probe(self) -> None:
        """Nothing to send while the backend is down: see whether it is back."""
        try:
            ok = await self.transport.probe()
        except Exception:           # a probe that fails in any way is a "no"
            ok = False
        if ok:
            self._backend_up()
        elif not self._stopping:
            self._back_off()

    def _backend_up(self) -> None:
        if not self.up:
            log.info("fastws: gateway: the backend answers again (down for %.1fs)",
                     time.time() - (self.down_since or time.time()))
        self.up = True
        self.down_since = None
        self._failures = 0

    def _back_off(self) -> None:
        if self.up:
            self.up = False
            self.down_since = time.time()
        if self._retry_at and self.loop.time() < self._retry_at:
            return                  # the batches out when it went down fail together: one step
        self._failures += 1
        delay = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** min(self._failures - 1, 16))
        self._retry_at = self.loop.time() + delay * (0.5 + random.random() / 2)
        if self._retry_timer is not None:
            self._retry_timer.cancel()
        self._retry_timer = self.loop.call_at(self._retry_at, self._retry)

    # -- answers -------------------------------------------------------------------------------

    def batch_done(self, batch: _Batch, results: list, answered_at: float) -> None:
        """The transport got the answers of ``batch`` (one per event, in order)."""
        self.inflight -= 1
        self.inflight_events -= len(batch.items)
        if not self.up or self._failures:
            self._backend_up()
        took = answered_at - batch.sent_at
        self.backend_time.observe(took)
        self.recent.append(took)
        answered = self.answered
        for item, answer in zip(batch.items, results, strict=True):
            kind = item.kind
            answered[kind] += 1
            if kind == CONNECT:
                if not item.future.done():
                    item.future.set_result(answer if type(answer) is dict else {})
                continue
            link = item.link
            if kind == DISCONNECT:
                link.done = True
            if not answer:
                continue
            if type(answer) is not dict:
                self._bad_answer(kind, AnswerError("an answer is a JSON object"))
                continue
            if len(answer) == 1 and not link.closed:       # the common answer: one text reply
                reply = answer.get("reply")
                if type(reply) is list and len(reply) == 1:
                    reply = reply[0]
                if type(reply) is dict and len(reply) == 1:
                    text = reply.get("text")
                    if type(text) is str:
                        try:
                            link.conn.send(text)
                        except ConnectionClosed:
                            pass
                        continue
            try:
                self._carry_out(link, answer, kind)
            except AnswerError as exc:
                self._bad_answer(kind, exc)
        now = time.perf_counter()
        added = self.added
        for item in batch.items:
            added[item.kind].observe((batch.sent_at - item.t0) + (now - answered_at))
        self._release(batch.links)

    def batch_failed(self, batch: _Batch, exc: BaseException) -> None:
        """The transport could not get the answers of ``batch``."""
        self.inflight -= 1
        self.inflight_events -= len(batch.items)
        unseen = getattr(exc, "unseen", False)
        self.last_error = str(exc) or type(exc).__name__
        if not isinstance(exc, BackendError):
            log.error("fastws: gateway: sending events failed", exc_info=exc)
        self._log_once("unseen" if unseen else "failed", "fastws: gateway: %d event(s) %s: %s", len(batch.items),
                       "not delivered, sending again" if unseen else "failed", self.last_error)
        again: dict = {}                       # link -> its items to send again, in order
        for item in batch.items:
            kind = item.kind
            if unseen or (kind != MESSAGE and item.attempts < self.retries and not self._stopping):
                if not unseen:
                    item.attempts += 1
                self.retried[kind] += 1
                if kind == CONNECT:
                    if not item.future.done():
                        self.connects.appendleft(item)
                else:
                    again.setdefault(item.link, []).append(item)
                continue
            reason = "timeout" if "no answer within" in self.last_error else "failed"
            self._count_failure(kind, reason)
            if kind == CONNECT:
                if not item.future.done():
                    item.future.set_result(exc)
            elif kind == DISCONNECT:
                item.link.done = True
        for link, items in again.items():
            link.queue.extendleft(reversed(items))
        if unseen or "no answer within" in self.last_error:
            self._back_off()
        self._release(batch.links)

    def _release(self, links) -> None:
        for link in links:
            link.busy = False
            if link.queue:
                if not link.ready:
                    link.ready = True
                    self.ready.append(link)
            elif link.done:
                self.links.pop(link.conn, None)
        if self.ready or self.connects:
            self._kick()

    def _carry_out(self, link: _Link, answer: dict, kind: str) -> None:
        """Do what an answer says, for the connection of ``link``."""
        conn = link.conn
        node = self.node
        rooms = answer.get("join")
        if rooms is not None:
            for room in _str_list(rooms, "join"):
                if kind != DISCONNECT and not link.closed:
                    try:
                        conn.join(room, link.namespace)
                    except RoomError as exc:
                        self._log_once("room", "fastws: gateway: join %r for %s refused: %s", room, link.id, exc)
        reply = answer.get("reply")
        if reply is not None:
            for msg in (reply if type(reply) is list else (reply,)):
                message = message_of(msg, "reply")
                if not link.closed:
                    try:
                        conn.send(message)
                    except ConnectionClosed:
                        pass
        sends = answer.get("send")
        if sends is not None:
            for entry in _obj_list(sends, "send"):
                target = entry.get("connection_id")
                if type(target) is not str:
                    raise AnswerError("send: connection_id: a string")
                message = message_of(entry, "send")
                local = node.local_connection(target)
                if local is not None:
                    try:
                        local.send(message)
                    except ConnectionClosed:
                        pass
                elif node.bridge is not None:
                    self.loop.create_task(node.send_to(target, message))
        pubs = answer.get("publish")
        if pubs is not None:
            for entry in _obj_list(pubs, "publish"):
                room = entry.get("room")
                namespace = entry.get("namespace", link.namespace)
                if type(room) is not str or type(namespace) is not str:
                    raise AnswerError("publish: room and namespace: strings")
                message = message_of(entry, "publish")
                exclude = entry.get("exclude")
                try:
                    node.publish(room, message, namespace=namespace,
                                 exclude=node.local_connection(exclude) if type(exclude) is str else None)
                except RoomError as exc:
                    self._log_once("room", "fastws: gateway: publish to %r refused: %s", room, exc)
        rooms = answer.get("leave")
        if rooms is not None:
            for room in _str_list(rooms, "leave"):
                if not link.closed:
                    conn.leave(room, link.namespace)
        closes = answer.get("disconnect")
        if closes is not None:
            for entry in _obj_list(closes, "disconnect"):
                target, code, reason = entry.get("connection_id"), entry.get("code", 1000), entry.get("reason", "")
                if type(target) is not str or not valid_close_code(code) or type(reason) is not str \
                        or len(reason.encode()) > 123:
                    raise AnswerError("disconnect: connection_id, a close code a server may send, a reason of "
                                      "123 bytes at most")
                local = node.local_connection(target)
                if local is not None:
                    local.close(code, reason)
                elif node.bridge is not None:
                    self.loop.create_task(node.disconnect(target, code, reason))
        close = answer.get("close")
        if close is not None:
            if type(close) is not dict:
                raise AnswerError("close: {\"code\": int, \"reason\": str}")
            code, reason = close.get("code", 1000), close.get("reason", "")
            if not valid_close_code(code) or type(reason) is not str or len(reason.encode()) > 123:
                raise AnswerError("close: a close code a server may send, a reason of 123 bytes at most")
            if not link.closed:
                conn.close(code, reason)

    # -- failures and numbers ------------------------------------------------------------------

    def _count_failure(self, kind: str, reason: str) -> None:
        key = (kind, reason)
        self.failures[key] = self.failures.get(key, 0) + 1

    def _bad_answer(self, kind: str, exc: AnswerError) -> None:
        self._count_failure(kind, "bad_answer")
        self._log_once("bad_answer", "fastws: gateway: the backend's answer to a %s event is malformed (%s)",
                       kind, exc)

    def _log_once(self, what: str, msg: str, *args) -> None:
        now = time.monotonic()
        if now - self._logged.get(what, -LOG_EVERY) >= LOG_EVERY:
            self._logged[what] = now
            log.warning(msg, *args)

    def queued(self) -> tuple:
        """(events waiting, in the largest queue)."""
        total = biggest = 0
        for link in self.links.values():
            n = len(link.queue)
            total += n
            if n > biggest:
                biggest = n
        return total + len(self.connects), biggest

    def check(self):
        """/health's ``gateway`` check: ``(ok, detail)``."""
        waiting, biggest = self.queued()
        recent = sorted(self.recent)
        late = self.transport.late()
        ok = self.up and not late
        detail = {
            "backend": mask_url(self.url), "transport": self.transport.kind,
            "state": "up" if self.up else "down",
            "latency_ms": {"p50": _ms(recent, 0.5), "p99": _ms(recent, 0.99)},
            "queued_events": waiting, "largest_queue": biggest, "in_flight_events": self.inflight_events,
            "failures": sum(self.failures.values()), "dropped": self.dropped,
            "overflow_closes": self.overflow_closes,
        }
        if not self.up:
            detail["down_for_s"] = round(time.time() - (self.down_since or time.time()), 3)
            detail["error"] = self.last_error
        if late:
            detail["unanswered_past_timeout"] = late
        detail.update(self.transport.describe())
        return ok, detail


class GatewayCollector:
    """``/metrics``: the ``fastws_gateway_*`` families::

        fastws_gateway_backend_up                       gauge    1 while the backend answers
        fastws_gateway_events_total{type}               counter  events sent (connect, message, disconnect)
        fastws_gateway_answers_total{type}              counter  events answered
        fastws_gateway_event_failures_total{type,reason} counter  events failed (timeout, failed, bad_answer)
        fastws_gateway_retries_total{type}              counter  events sent again
        fastws_gateway_dropped_messages_total           counter  messages dropped past gateway_queue (drop)
        fastws_gateway_overflow_closes_total            counter  connections closed 1013 past gateway_queue
        fastws_gateway_refused_connects_total           counter  connects the backend refused
        fastws_gateway_requests_total                   counter  requests / stream entries sent
        fastws_gateway_queued_events                    gauge    events waiting to be sent
        fastws_gateway_queued_events_max                gauge    ... of the most backed-up connection
        fastws_gateway_in_flight_events                 gauge    events sent and not answered
        fastws_gateway_backend_latency_seconds          histogram  a request's (entry's) answer time
        fastws_gateway_added_latency_seconds{type}      histogram  the gateway's own time per event:
                                                                 arrival -> sent, plus answer -> carried out

    With ``--workers N`` they are the answering worker's own numbers."""

    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway

    def describe(self):
        return []

    def collect(self):
        gw = self.gw
        yield GaugeMetricFamily("fastws_gateway_backend_up", "1 while the gateway's backend answers",
                                value=1 if gw.up else 0)
        for name, doc, table in (("fastws_gateway_events", "Events sent to the backend", gw.events),
                                 ("fastws_gateway_answers", "Events the backend answered", gw.answered),
                                 ("fastws_gateway_retries", "Events sent to the backend again", gw.retried)):
            fam = CounterMetricFamily(name, doc, labels=["type"])
            for kind, n in table.items():
                fam.add_metric([kind], n)
            yield fam
        fam = CounterMetricFamily("fastws_gateway_event_failures", "Events without an answer: timeout, "
                                  "failed (connection lost, HTTP error), bad_answer", labels=["type", "reason"])
        for (kind, reason), n in sorted(gw.failures.items()):
            fam.add_metric([kind, reason], n)
        yield fam
        yield CounterMetricFamily("fastws_gateway_dropped_messages", "Messages dropped past gateway_queue",
                                  value=gw.dropped)
        yield CounterMetricFamily("fastws_gateway_overflow_closes", "Connections closed 1013 past "
                                  "gateway_queue", value=gw.overflow_closes)
        yield CounterMetricFamily("fastws_gateway_refused_connects", "Connects the backend refused",
                                  value=gw.refused)
        yield CounterMetricFamily("fastws_gateway_requests", "Requests (stream entries) sent to the backend",
                                  value=gw.requests)
        waiting, biggest = gw.queued()
        yield GaugeMetricFamily("fastws_gateway_queued_events", "Events waiting to be sent", value=waiting)
        yield GaugeMetricFamily("fastws_gateway_queued_events_max", "Events waiting to be sent, most "
                                "backed-up connection", value=biggest)
        yield GaugeMetricFamily("fastws_gateway_in_flight_events", "Events sent and not answered yet",
                                value=gw.inflight_events)
        yield gw.backend_time.family("fastws_gateway_backend_latency_seconds",
                                     "Time from a request (stream entry) sent to its answer, seconds")
        fam = HistogramMetricFamily("fastws_gateway_added_latency_seconds",
                                    "The gateway's own time per event, seconds, by event type: from its arrival "
                                    "to its request being sent, plus from the answer to it being carried out",
                                    labels=["type"])
        for kind, hist in gw.added.items():
            fam.add_metric([kind], hist.cumulative(), hist.sum)
        yield fam


def _obj(d: dict) -> str:
    return "{" + ",".join(encode_basestring(str(k)) + ":" + encode_basestring(str(v)) for k, v in d.items()) + "}"


def _str_list(value, what: str) -> list:
    if type(value) is str:
        return [value]
    if type(value) is not list or any(type(v) is not str for v in value):
        raise AnswerError(f"{what}: a list of room names")
    return value


def _obj_list(value, what: str) -> list:
    if type(value) is dict:
        return [value]
    if type(value) is not list or any(type(v) is not dict for v in value):
        raise AnswerError(f"{what}: a list of objects")
    return value


def _ms(sorted_values: list, q: float):
    if not sorted_values:
        return None
    return round(sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))] * 1000, 3)
