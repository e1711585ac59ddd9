"""Pure-Python twin of ``_core.Hub`` and ``_core.Connection``.

Used when the Cython extension is not built (or ``FASTWS_NO_EXTENSIONS=1``).
It is the same machine as the Cython classes, written in Python over the
wsproto-backed engine (``fastws._wsproto_engine``): the contract in
``fastws/core.py`` is theirs, and ``tests/unit/test_connection_contract.py``
runs both side by side through the same scenarios and compares the bytes
on the wire, the transport calls, the callbacks and the counters.

The same design, part for part:

* one read buffer for every connection of the process (``get_buffer``
  hands it out; ``buffer_updated`` takes its bytes out at once);
* the request head collected until its blank line, then handed to the hub's
  ``handshake`` (the Python hub has no C fast path: every head goes there);
* frames parsed and dispatched one at a time (``Engine.receive_iter``), so
  a callback that closes the connection acts on the frames after its own;
* a per-connection queue of frames flushed once per loop iteration (one
  ``call_soon`` per hub), held while the transport is paused;
* one timer wheel per hub with one loop timer, ticks of the same length
  chosen by the same formula, the same due-tick arithmetic, the same
  handshake, body, ping, pong, idle and close deadlines;
* the same delivery policy, counters and ``connection_lost`` bookkeeping.

What it cannot do, it does another way with the same result: it writes
through the transport (the Cython connection may ``send(2)`` on the socket
itself) and copies large payloads out of the read buffer (the Cython one
may let the kernel read them into the message).
"""

from __future__ import annotations

import array
import fcntl
import logging
import math
import termios
import time

from . import _wsproto_engine as engine_mod
from .errors import CALLBACK_FAILED, IDLE_TIMEOUT, PING_TIMEOUT, RATE_LIMITED, SLOW_CONSUMER, ConnectionClosed
from .frames import BINARY, CLOSED, ERROR, OPEN, PRIORITY_LOW, PRIORITY_NORMAL, TEXT
from .handshake import error_response

_log = logging.getLogger("fastws")

#: the answer to a request head or body that did not arrive in time
REQUEST_TIMEOUT = error_response(408, "request timeout")
#: the answer to a request head on a hub that expects none (no handshake)
UNEXPECTED_HEAD = error_response(400, "unexpected request")

# One read buffer for every connection of the process: the loop calls
# get_buffer, reads, then buffer_updated, which copies the bytes out before
# it returns, so nothing refers to it afterwards.
_READ_BUFFER = bytearray(256 * 1024)

# Phases of a connection.
P_HANDSHAKE = 0    # collecting the request head
P_DECIDING = 1     # head handed to the handshake, answer pending
P_OPEN = 2         # upgraded: frames flow
P_DONE = 3         # transport lost

# What to do with the transport once the queue is written.
END_NONE = 0
END_CLOSE = 1      # close exchange complete: close the TCP connection
END_LINGER = 2     # we sent an error close: half-close, wait for the peer's EOF
END_EOF_SENT = 3   # lingering, FIN already sent

# Timers of the wheel.
WHEEL_SIZE = 512
T_NONE = 0
T_HANDSHAKE = 1    # the opening handshake must be done by then
T_PING = 2         # time to check activity and maybe ping
T_PONG = 3         # a ping is out: proof of life must have come by then
T_CLOSE = 4        # the peer must have answered our close by then
T_BODY = 5         # a plain HTTP request body must be in by then

# Rate limits (see Hub._rate_setup).
RATE_CAP_MAX = 4294967293   # largest allowance per window (the Cython side keeps it in a uint32)
RL_CLOSED = 4294967295      # Connection._rl_msgs of a connection closed for its rate

#: Upper bounds (seconds) of the delivery-latency histogram's buckets (Hub.stats(),
#: websocket_delivery_latency_seconds); one more bucket counts what lies above the last.
DELIVERY_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                            0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_LAT_BOUNDS_NS = tuple(round(b * 1e9) for b in DELIVERY_LATENCY_BUCKETS)
#: How many delivery-latency histograms a hub keeps (Hub.stats()["delivery_latency"]):
#: one per route label for the first DELIVERY_LATENCY_ROUTES - 1 labels, one "other".
DELIVERY_LATENCY_ROUTES = 64
_LAT_OTHER = DELIVERY_LATENCY_ROUTES - 1   # the slot of every route past the first 63
_now_ns = time.monotonic_ns


def _default_tick(times):
    """The wheel's tick: a quarter of the shortest of ``times`` set (> 0),
    within 50 ms .. 1 s."""
    shortest = min([t for t in times if t > 0] or [1.0])
    return max(0.05, min(1.0, shortest / 4))


def _conn_number(conn_id, node_id):
    """The number of the connection whose public id is ``conn_id`` on the
    node ``node_id`` ("<node_id>-<n>", or "<n>" without a node id; or the
    number itself as an int), else 0."""
    if type(conn_id) is int:
        return conn_id if conn_id > 0 else 0
    if not isinstance(conn_id, str):
        return 0
    node, sep, num = conn_id.rpartition("-")
    if node != node_id or (sep and not node_id):
        return 0
    if not num or len(num) > 20 or not (num.isascii() and num.isdigit()):
        return 0
    return int(num)


class Hub:
    """Per-server state shared by its connections: limits, the handshake,
    the registry of open connections, the per-loop write coalescer, the
    timer wheel, the delivery policy and the counters (see ``fastws.core``)."""

    fast_upgrades = 0   # no C fast path here: every head goes to ``handshake``

    def __init__(self, loop, handshake=None, *, max_message_size=1 << 20, max_frame_size=0,
                 max_head_size=8192, close_timeout=5.0, on_callback_error=None,
                 high_water=65536, max_queue=1 << 20, slow_grace=5.0,
                 ping_interval=20.0, ping_timeout=20.0, idle_timeout=0.0,
                 handshake_timeout=10.0, body_timeout=30.0,
                 max_messages_per_second=0.0, max_bytes_per_second=0, rate_burst_seconds=2.0,
                 node_id="", tick=None):
        self.loop = loop
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.idle_timeout = idle_timeout
        self.handshake_timeout = handshake_timeout
        self.body_timeout = body_timeout
        self.max_messages_per_second = float(max_messages_per_second)
        self.max_bytes_per_second = int(max_bytes_per_second)
        self.rate_burst_seconds = float(rate_burst_seconds)
        self._rate_on = max_messages_per_second > 0 or max_bytes_per_second > 0
        if tick is None:
            tick = _default_tick((ping_interval, ping_timeout, idle_timeout, handshake_timeout,
                                  body_timeout, close_timeout,
                                  rate_burst_seconds if self._rate_on else 0))
        self.tick = tick
        self._rate_setup()
        self.rate_limited = {"messages": 0, "bytes": 0}   # connections closed for their rate, by kind
        self.node_id = node_id or ""   # public connection ids are "<node_id>-<n>"
        self.on_closed = None          # callable(conn): every lost connection that was upgraded
        self._read_ns = 0              # the delivery latency (see _flush_all)
        self._batch_ns = 0
        # per route slot: counts per bucket, and the sum (ns)
        self._lat_counts = [[0] * (len(DELIVERY_LATENCY_BUCKETS) + 1)
                            for _ in range(DELIVERY_LATENCY_ROUTES)]
        self._lat_sum_ns = [0] * DELIVERY_LATENCY_ROUTES
        self._lat_slot_of = {}         # route label -> slot (at most 63)
        self._lat_labels = []          # slot -> route label
        self._lat_overflow = False     # a route label was sent to the "other" slot
        # the wheel: per slot, the connections due there in the order they
        # were put in (walked newest first, as the Cython intrusive lists are)
        self._slots = [{} for _ in range(WHEEL_SIZE)]
        self._waiting = 0
        self._tick_no = 0
        self._tick_handle = None
        self.high_water = high_water
        self.max_queue = max_queue
        self.slow_grace = slow_grace
        self.closes = {}          # close code (1000..1015, else "3xxx"/"4xxx"/"other") -> count
        self.dropped = {}         # (reason, priority) -> count
        self.on_lost = None
        self.rooms = None
        self.handshake = handshake
        self.connections = {}
        self.max_message_size = max_message_size
        self.max_frame_size = max_frame_size
        self.max_head_size = max_head_size
        self.close_timeout = close_timeout
        self.on_callback_error = on_callback_error
        self.messages_in = self.messages_out = self.bytes_in = self.bytes_out = 0
        self.slow_consumer_closes = 0
        self.handshake_timeouts = self.ping_timeouts = self.idle_timeouts = 0
        self.body_timeouts = 0
        self._next_id = 0
        self._dirty = []
        self._scheduled = False

    def connection_factory(self):
        """The protocol factory to hand to ``loop.create_server``."""
        return Connection(self)

    def connection(self, conn_id):
        """The open connection whose public id is ``conn_id`` (its ``id``,
        ``"<node_id>-<n>"``, or the number ``n`` as an int), else None."""
        key = _conn_number(conn_id, self.node_id)
        return self.connections.get(key) if key else None

    # -- rate limits (see _core_hub.pxi for the theory of operation) ----------------

    def _rate_setup(self):
        self._rate_ticks = self._rate_msgs_cap = self._rate_bytes_cap = 0
        if not self._rate_on:
            return
        self._rate_ticks = max(1, int(self.rate_burst_seconds / self.tick + 0.5))
        window = self._rate_ticks * self.tick
        if self.max_messages_per_second > 0:
            self._rate_msgs_cap = min(RATE_CAP_MAX, max(1, math.ceil(self.max_messages_per_second * window)))
        if self.max_bytes_per_second > 0:
            self._rate_bytes_cap = min(RATE_CAP_MAX, max(1, math.ceil(self.max_bytes_per_second * window)))

    @property
    def rate_window(self):
        """(window ticks, messages allowed, bytes allowed) per window; 0 = off."""
        return (self._rate_ticks, self._rate_msgs_cap, self._rate_bytes_cap)

    def set_fast_upgrade(self, routes, default=None, *, max_connections=0, deflate=False,
                         origins="*"):
        """The Cython hub answers plain upgrades in C; this one has no such
        path: every request head goes to the ``handshake`` callback, which
        gives the same answers."""

    # -- the timer wheel (see _core_hub.pxi for the theory of operation) ------------

    def _schedule(self, c, delay, kind):
        due = self._tick_no + int(delay / self.tick + 0.999999)
        if due <= self._tick_no:
            due = self._tick_no + 1
        if c._due_tick >= 0:
            self._unlink(c)
        c._due_tick = due
        c._due_kind = kind
        self._slots[due % WHEEL_SIZE][c] = None
        self._waiting += 1
        if self._tick_handle is None:
            self._tick_handle = self.loop.call_later(self.tick, self._on_tick)

    def _unlink(self, c):
        del self._slots[c._due_tick % WHEEL_SIZE][c]
        self._waiting -= 1

    def _unschedule(self, c):
        if c._due_tick >= 0:
            self._unlink(c)
            c._due_tick = -1
            c._due_kind = T_NONE

    def _on_tick(self):
        self._tick_handle = None
        self._tick_no += 1
        slot = self._slots[self._tick_no % WHEEL_SIZE]
        due = []
        for c in list(reversed(slot)):
            if c._due_tick <= self._tick_no:
                self._unlink(c)
                c._due_tick = -1
                due.append(c)
        for c in due:
            try:
                c._timer_fired()
            except Exception as exc:
                _log.error("fastws: timer callback failed", exc_info=exc)
        if self._tick_handle is None and (self._waiting > 0 or (self._rate_on and self.connections)):
            # (rate limits count windows in ticks: the wheel turns while connections are open)
            self._tick_handle = self.loop.call_later(self.tick, self._on_tick)

    def _keep_ticking(self):
        """Rate limits on: a connection opened, the wheel must turn."""
        if self._tick_handle is None:
            self._tick_handle = self.loop.call_later(self.tick, self._on_tick)

    def stop_timers(self):
        """Cancel the wheel's loop timer (shutdown)."""
        if self._tick_handle is not None:
            self._tick_handle.cancel()
            self._tick_handle = None

    @property
    def scheduled(self):
        """How many connections wait in the timer wheel (for tests)."""
        return self._waiting

    # -- write coalescing and the delivery latency (see _core_hub.pxi) -------------------

    def _mark_dirty(self, c):
        self._dirty.append(c)
        if not self._scheduled:
            self._scheduled = True
            self._batch_ns = self._read_ns or _now_ns()
            self.loop.call_soon(self._flush_all)

    def _route_slot(self, route):
        """The latency slot of connections accepted on ``route``: one per
        label (the route's ``path`` when a non-empty str, else "asgi") for
        the first 63 labels, then the "other" slot."""
        label = getattr(route, "path", None)
        if not isinstance(label, str) or not label:
            label = "asgi"
        slot = self._lat_slot_of.get(label)
        if slot is not None:
            return slot
        if len(self._lat_labels) >= _LAT_OTHER:
            self._lat_overflow = True
            return _LAT_OTHER
        slot = len(self._lat_labels)
        self._lat_labels.append(label)
        self._lat_slot_of[label] = slot
        return slot

    @staticmethod
    def _bucket(dt):
        i = 0
        bounds = _LAT_BOUNDS_NS
        while i < len(bounds) and dt > bounds[i]:
            i += 1
        return i

    def _observe(self, slot, dt):
        """One write, on a connection of ``slot``, ``dt`` ns after its start."""
        dt = max(0, dt)
        self._lat_counts[slot][self._bucket(dt)] += 1
        self._lat_sum_ns[slot] += dt

    def _observe_group(self, slots, dt):
        """A write on a connection of each of ``slots``, ``dt`` ns each."""
        dt = max(0, dt)
        i = self._bucket(dt)
        for slot in slots:
            self._lat_counts[slot][i] += 1
            self._lat_sum_ns[slot] += dt

    def _flush_all(self):
        dirty, self._dirty = self._dirty, []
        self._scheduled = False
        start, group = self._batch_ns, []      # group: slots written since the clock was last read
        for c in dirty:
            if c._flush():
                group.append(c._lat_slot)
                if len(group) == 16:           # one clock read (and bucket) per 16 writes
                    self._observe_group(group, _now_ns() - start)
                    group = []
        if group:
            self._observe_group(group, _now_ns() - start)

    def _latency_stats(self):
        """route label -> {"buckets", "sum", "count"} (see stats)."""
        out = {}
        slots = list(enumerate(self._lat_labels))
        if self._lat_overflow:
            slots.append((_LAT_OTHER, "other"))
        for slot, label in slots:
            buckets = list(self._lat_counts[slot])
            seconds = self._lat_sum_ns[slot] / 1e9
            prev = out.get(label)
            if prev is not None:               # a route whose path is "other" shares the entry
                buckets = [a + b for a, b in zip(prev["buckets"], buckets, strict=True)]
                seconds += prev["sum"]
            out[label] = {"buckets": buckets, "sum": seconds, "count": sum(buckets)}
        return out

    # -- counters and delivery -----------------------------------------------------------

    def stats(self):
        """Counters and gauges for metrics (a new dict; O(connections))."""
        total = largest = 0
        for c in self.connections.values():
            q = c._wq_size
            if c.transport is not None and c._wpaused:
                q += c.transport.get_write_buffer_size()
            total += q
            if q > largest:
                largest = q
        return {
            "connections": len(self.connections),
            "messages_in": self.messages_in,
            "messages_out": self.messages_out,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "closes": dict(self.closes),
            "dropped": dict(self.dropped),
            "slow_consumer_closes": self.slow_consumer_closes,
            "queued_bytes_total": total,
            "queued_bytes_max": largest,
            "rate_limited": dict(self.rate_limited),
            "delivery_latency": self._latency_stats(),
        }

    def _count_drop(self, reason, priority):
        key = (reason, priority)
        self.dropped[key] = self.dropped.get(key, 0) + 1

    def broadcast(self, message, connections, exclude=None, priority=PRIORITY_NORMAL):
        """``broadcast_frame`` of ``message``: str as TEXT (its UTF-8),
        bytes-like as BINARY."""
        if isinstance(message, str):
            return self._broadcast(TEXT, message.encode("utf-8"), connections, exclude, priority)
        if isinstance(message, (bytes, bytearray, memoryview)):
            return self._broadcast(BINARY, bytes(message), connections, exclude, priority)
        raise TypeError(f"message must be str or bytes, not {type(message).__name__}")

    def broadcast_frame(self, opcode, payload, connections, exclude=None, priority=PRIORITY_NORMAL):
        """Queue one frame of ``opcode`` (TEXT or BINARY) around ``payload``
        (bytes already encoded; a text payload is trusted to be UTF-8,
        nothing is decoded) on every open connection of ``connections``
        except ``exclude``, under the delivery policy for ``priority``.  The
        frame is built once; a connection with permessage-deflate gets its
        own compressed one (the Cython hub shares one per window size among
        members without context takeover: the same bytes).  Returns the
        number of connections it was queued on."""
        if opcode != TEXT and opcode != BINARY:
            raise ValueError(f"opcode {opcode} is not TEXT or BINARY")
        return self._broadcast(opcode, bytes(payload), connections, exclude, priority)

    def _broadcast(self, opcode, data, connections, exclude, priority):
        frame = None
        n = 0
        for c in connections:
            if c is exclude or c.closed:
                continue
            if c._wpaused and not c._admit(priority):
                continue
            if c._deflate is not None:
                c._queue(c._engine.encode_message(opcode, data))
            else:
                if frame is None:
                    frame = engine_mod.encode_frame(opcode, data)
                c._queue(frame)
            n += 1
        self.messages_out += n
        return n

    @property
    def open_connections(self):
        return len(self.connections)


class Connection:
    """One WebSocket connection: the protocol the loop drives and the object
    the application's callbacks receive as ``conn`` (see ``fastws.core``)."""

    def __init__(self, hub):
        self._hub = hub
        self._engine = None          # the frame engine, from the upgrade on
        self._deflate = None         # the negotiated DeflateParams, or None
        self._state = OPEN           # state, close code and reason before the upgrade
        self._lost_code = None       # (CLOSED, 1006, "" once lost)
        self._lost_reason = None
        self.transport = None
        self._num = 0                # number on the hub (key of hub.connections), set at upgrade
        self.path = None
        self.query_string = None
        self.subprotocol = None
        self.route = None
        self._phase = P_HANDSHAKE
        self._head = None            # request head until the handshake is decided
        self._wq = None              # frames queued for the next flush
        self._wq_size = 0
        self._dirty = False          # registered in the hub's dirty list
        self._end_mode = END_NONE
        self._errored = False        # we closed because the peer broke the protocol
        self._store = None
        self._due_tick = -1          # the wheel tick this connection waits for
        self._due_kind = T_NONE
        self._lat_slot = 0           # the route's delivery-latency slot (Hub._route_slot)
        self._rx_tick = 0            # wheel tick of the last read (proof of life)
        self._msg_tick = 0           # wheel tick of the last complete message
        self._ping_tick = 0          # wheel tick our last ping went out
        self._reported = False       # on_disconnect has run
        self._body_cb = None
        self._body_size = 0
        self._wpaused = False
        self._paused_at = 0.0
        self.rooms = None
        self.dropped = 0
        self._rl_start = 0           # the rate-limit window: the tick it began,
        self._rl_msgs = 0            # messages in it (RL_CLOSED: closed for its rate),
        self._rl_bytes = 0           # bytes read in it

    # -- asyncio protocol ---------------------------------------------------------------

    def connection_made(self, transport):
        self._made(transport)
        if self._hub.handshake_timeout > 0:
            self._hub._schedule(self, self._hub.handshake_timeout, T_HANDSHAKE)

    def _made(self, transport):
        self.transport = transport
        if self._hub.high_water != 65536:
            transport.set_write_buffer_limits(high=self._hub.high_water)

    def get_buffer(self, sizehint):
        return _READ_BUFFER

    def buffer_updated(self, nbytes):
        self._read(bytes(memoryview(_READ_BUFFER)[:nbytes]))

    def data_received(self, data):
        """For transports that do not use the buffered-protocol path."""
        self._read(bytes(data))

    def _read(self, data):
        hub = self._hub
        hub.bytes_in += len(data)
        self._rx_tick = hub._tick_no
        if self._phase == P_OPEN:
            hub._read_ns = _now_ns()       # the start of the delivery latency of replies
            if hub._rate_bytes_cap:
                self._rate_bytes(len(data))
            self._received(data)
            hub._read_ns = 0
        else:
            self._received(data)

    def feed(self, data):
        """Process ``data`` as if it had been read from the transport."""
        self._received(bytes(data))

    def _received(self, data):
        if self._phase == P_OPEN:
            self._input(data)
        elif self._phase == P_HANDSHAKE:
            self._head_data(data)
        elif self._phase == P_DECIDING and self._head is not None:
            # bytes behind the request head while the server decides
            self._head.extend(data)
            self._check_body()

    def read_body(self, size, callback):
        """While deciding (a plain HTTP request): call ``callback(body)``
        once ``size`` bytes behind the head are in.  The body must be in
        within the hub's ``body_timeout``, else the client gets 408 and the
        connection is closed."""
        self._body_size = size
        self._body_cb = callback
        if self._hub.body_timeout > 0:
            self._hub._schedule(self, self._hub.body_timeout, T_BODY)
        self._check_body()

    def _check_body(self):
        cb = self._body_cb
        if cb is not None and self._head is not None and len(self._head) >= self._body_size:
            self._body_cb = None
            body = bytes(self._head[:self._body_size])
            del self._head[:self._body_size]
            # the handler answers next: bounded by the handshake timeout, and
            # nothing more is read (the answer closes the connection)
            if self._hub.handshake_timeout > 0:
                self._hub._schedule(self, self._hub.handshake_timeout, T_HANDSHAKE)
            else:
                self._hub._unschedule(self)
            if self.transport is not None:
                self.transport.pause_reading()
            cb(body)

    def eof_received(self):
        return False

    def connection_lost(self, exc):
        hub = self._hub
        phase = self._phase
        self._phase = P_DONE
        self._wq = None
        hub._unschedule(self)
        if phase in (P_OPEN, P_DONE):
            hub.connections.pop(self._num, None)
        eng = self._engine
        if eng is None:
            self._state = CLOSED
            if self._lost_code is None:
                self._lost_code, self._lost_reason = 1006, ""
        else:
            if eng.close_code is None:
                # we closed (e.g. slow consumer) and the peer never answered
                eng.close_code, eng.close_reason = eng.sent_close or (1006, "")
            eng.state = CLOSED
        if phase == P_OPEN:
            code = self.close_code
            if not 1000 <= code <= 1015:   # client-chosen codes share 3 keys: the dict stays small
                code = "3xxx" if 3000 <= code <= 3999 else ("4xxx" if 4000 <= code <= 4999 else "other")
            hub.closes[code] = hub.closes.get(code, 0) + 1
            if self.rooms and hub.on_lost is not None:
                try:
                    hub.on_lost(self)
                except Exception as exc:
                    _log.error("fastws: leaving rooms failed", exc_info=exc)
            if hub.on_closed is not None:
                try:
                    hub.on_closed(self)
                except Exception as exc:
                    _log.error("fastws: the hub's on_closed hook failed", exc_info=exc)
        if phase == P_OPEN and not self._reported:
            self._reported = True
            self._call_disconnect()
        self.transport = None

    def pause_writing(self):
        """The transport's buffer is over high water: keep frames in our own
        queue, and stop reading this peer until it drains."""
        self._wpaused = True
        self._paused_at = self._hub.loop.time()
        if self.transport is not None and self._phase == P_OPEN:
            self.transport.pause_reading()

    def resume_writing(self):
        self._wpaused = False
        if self.transport is not None and self._phase == P_OPEN:
            self.transport.resume_reading()
            if self._wq is not None:
                self._flush()

    def _admit(self, priority):
        """Delivery policy for a published message to a paused connection:
        True to queue it, False if it is dropped (counted) or the connection
        is being closed as a slow consumer."""
        hub = self._hub
        if self._wq_size > hub.max_queue or (
                hub.slow_grace > 0 and hub.loop.time() - self._paused_at > hub.slow_grace):
            self._slow_consumer()
            return False
        if priority <= PRIORITY_LOW or (priority == PRIORITY_NORMAL and self._wq_size * 2 > hub.max_queue):
            self.dropped += 1
            hub._count_drop("backpressure", priority)
            return False
        return True

    def _slow_consumer(self):
        """Close with 1008: discard what is queued, send the close frame past
        the pause, drop the TCP connection after close_timeout."""
        if self.state != OPEN:
            return
        self._hub.slow_consumer_closes += 1
        self._wq = None
        self._wq_size = 0
        frame = self._engine.close(*SLOW_CONSUMER)
        if self.transport is not None:
            self.transport.write(frame)
        self._arm_close_timer()

    # -- the opening handshake ----------------------------------------------------------

    def _head_data(self, data):
        if self._head is None:
            self._head = bytearray()
        start = max(len(self._head) - 3, 0)
        self._head.extend(data)
        end = self._head.find(b"\r\n\r\n", start)
        limit = self._hub.max_head_size
        if end < 0:
            if len(self._head) > limit:
                self._phase = P_DECIDING
                self._decide(None)
            return
        end += 4
        if end > limit:
            self._phase = P_DECIDING
            self._decide(None)
            return
        head = bytes(self._head[:end])
        del self._head[:end]
        self._phase = P_DECIDING
        self._decide(head)

    def _decide(self, head):
        """Hand the request head (None: over max_head_size) to the hub's handshake."""
        hs = self._hub.handshake
        if hs is None:
            self.reject_upgrade(UNEXPECTED_HEAD)
        else:
            hs(self, head)

    def accept_upgrade(self, response, route, path, query_string, subprotocol=None, deflate=None):
        """Called by the handshake: send the 101 ``response``, register,
        start framing, run on_open, then parse the bytes that came after
        the head.  False (nothing done) unless deciding on a live transport."""
        if self._phase != P_DECIDING or self.transport is None:
            return False
        self._accept(response, route, path, query_string, subprotocol, deflate)
        rest, self._head = self._head, None
        if self.transport.is_reading() is False:
            self.transport.resume_reading()
        if rest:
            self._input(bytes(rest))
        return True

    def adopt(self, transport, response, route, path, query_string, subprotocol=None,
              deflate=None, early=b""):
        """Take over ``transport``, whose upgrade request was parsed and
        decided elsewhere (the ASGI front): become its protocol, take it as
        ``connection_made`` does, write ``response``, register, start
        framing, run on_open, then parse ``early`` (bytes read after the
        head) as frames.  No re-parse, no handshake call."""
        transport.set_protocol(self)
        self._made(transport)
        self._phase = P_DECIDING
        self._head = None
        self._accept(response, route, path, query_string, subprotocol, deflate)
        if transport.is_reading() is False:
            transport.resume_reading()
        if early and self._phase == P_OPEN:
            self._input(bytes(early))

    def _accept(self, response, route, path, query_string, subprotocol, deflate):
        hub = self._hub
        hub.bytes_out += len(response)
        self.transport.write(response)
        self.route = route
        self.path = path
        self.query_string = query_string
        self.subprotocol = subprotocol
        self._engine = engine_mod.Engine(max_message_size=hub.max_message_size,
                                         max_frame_size=hub.max_frame_size, deflate=deflate)
        self._deflate = deflate
        self._lat_slot = hub._route_slot(route)
        if not self._num:              # not reserved by reserve_id() during the decision
            hub._next_id += 1
            self._num = hub._next_id
        hub.connections[self._num] = self
        self._phase = P_OPEN
        self._rx_tick = self._msg_tick = hub._tick_no
        self._rl_start = hub._tick_no & 0xFFFFFFFF
        self._schedule_heartbeat()
        if hub._rate_on:
            hub._keep_ticking()
        if route.on_open is not None:
            self._call_open()

    def reject_upgrade(self, response):
        """Called by the handshake: answer with an HTTP error and close."""
        self._head = None
        if self.transport is not None:
            self._hub.bytes_out += len(response)
            self.transport.write(response)
            self.transport.close()

    def hold_upgrade(self):
        """Stop reading while an async decision (on_connect) runs."""
        if self.transport is not None:
            self.transport.pause_reading()

    def reserve_id(self):
        """The public id this connection has once upgraded, fixed now (while
        its upgrade is being decided, so that the decision can name it); the
        same id on every call.  A connection whose upgrade is refused never
        uses its number."""
        if not self._num:
            self._hub._next_id += 1
            self._num = self._hub._next_id
        return self.id

    # -- frames ---------------------------------------------------------------------------

    def _input(self, data):
        """Parse ``data`` and dispatch each event as its frame is parsed (so
        what a callback does, a close, acts on the frames after it); the
        engine's answer to an event (pong, close echo, error close) is
        queued before the event is acted on, as the Cython engine does."""
        hub = self._hub
        for ev, out in self._engine.receive_iter(data):
            if out:
                self._queue(out)
            kind = ev[0]
            if kind in (TEXT, BINARY):
                hub.messages_in += 1
                self._msg_tick = hub._tick_no
                if hub._rate_on and self._rate_message():
                    continue               # over the rate: the connection is closing, the message dropped
                self._dispatch(ev[1])
            elif kind == ERROR:
                self._errored = True
        self._after_input()

    def _dispatch(self, payload):
        route = self.route
        cb = route.on_message
        if cb is None:
            return
        if route.message_is_async:
            task = self._hub.loop.create_task(cb(self, payload))
            task.add_done_callback(self._task_done)
            return
        try:
            cb(self, payload)
        except Exception as exc:
            self._callback_failed(exc)

    def _queue(self, frame):
        if self._phase != P_OPEN:
            return
        if self._wq is None:
            self._wq = [frame]
        else:
            self._wq.append(frame)
        self._wq_size += len(frame)
        if self._wpaused:
            if self._wq_size > self._hub.max_queue and self.state == OPEN:
                self._slow_consumer()
            return
        hub = self._hub
        if not self._dirty:
            self._dirty = True
            hub._mark_dirty(self)
        # a burst within one loop iteration, or one large message: write it
        # now (see _core_connection.pxi)
        if self._wq_size > hub.high_water and self._flush():
            hub._observe(self._lat_slot, _now_ns() - (hub._read_ns or hub._batch_ns))

    # -- rate limits (see _core_hub.pxi) ----------------------------------------------------

    def _rate_window(self):
        """Start a new window when the current one is over."""
        now = self._hub._tick_no & 0xFFFFFFFF
        if (now - self._rl_start) & 0xFFFFFFFF >= self._hub._rate_ticks:
            self._rl_start = now
            self._rl_msgs = 0
            self._rl_bytes = 0

    def _rate_message(self):
        """A message came: True when it is over the rate (dropped)."""
        if self._rl_msgs == RL_CLOSED:
            return True
        cap = self._hub._rate_msgs_cap
        if not cap:
            return False
        self._rate_window()
        self._rl_msgs += 1
        if self._rl_msgs > cap:
            self._rate_close("messages")
            return True
        return False

    def _rate_bytes(self, n):
        """``n`` bytes were read: count them; past the window's allowance, close."""
        if self._rl_msgs == RL_CLOSED:
            return
        self._rate_window()
        total = self._rl_bytes + n
        self._rl_bytes = min(total, 0xFFFFFFFF)
        if total > self._hub._rate_bytes_cap:
            self._rate_close("bytes")

    def _rate_close(self, kind):
        """Over the rate: counted, closed with errors.RATE_LIMITED; what the
        peer sends from now on is read and its messages dropped."""
        hub = self._hub
        self._rl_msgs = RL_CLOSED
        hub.rate_limited[kind] = hub.rate_limited.get(kind, 0) + 1
        if self.state == OPEN and self._phase == P_OPEN:
            self._queue(self._engine.close(*RATE_LIMITED))
            self._arm_close_timer()

    def _after_input(self):
        if self.state == CLOSED and self._phase == P_OPEN and self._end_mode == END_NONE:
            # close exchange finished, or protocol error: write what is queued
            # (the echo or the error close frame), then end the transport
            if self._errored:
                self._end_mode = END_LINGER
                self._arm_close_timer()
            else:
                self._end_mode = END_CLOSE
                self._hub._unschedule(self)
        if self._dirty:
            hub = self._hub
            if self._flush() and hub._read_ns:
                # a reply, from the read that brought it
                hub._observe(self._lat_slot, _now_ns() - hub._read_ns)
        elif self._end_mode != END_NONE:
            self._end_transport()

    def _end_transport(self):
        t = self.transport
        if t is None:
            return
        if self._end_mode == END_CLOSE:
            t.close()
        elif self._end_mode == END_LINGER:
            self._end_mode = END_EOF_SENT
            if t.can_write_eof():
                t.write_eof()
            else:
                t.close()

    def _flush(self):
        """Write what is queued (unless held by the delivery policy); True if
        bytes were handed to the transport."""
        self._dirty = False
        if self._wpaused and self._end_mode == END_NONE:
            return False    # held until resume_writing (see the delivery policy)
        wq, size, t = self._wq, self._wq_size, self.transport
        wrote = False
        if wq is not None:
            self._wq = None
            self._wq_size = 0
            if t is not None:
                wrote = True
                self._hub.bytes_out += size
                t.write(wq[0] if len(wq) == 1 else b"".join(wq))
        if self._end_mode != END_NONE:
            self._end_transport()
        return wrote

    def _task_done(self, task):
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self._callback_failed(exc)

    def _callback_failed(self, exc):
        """An exception in user code: logged once, connection closed 1011."""
        handler = self._hub.on_callback_error
        if handler is not None:
            handler(self, exc)
        else:
            _log.error("fastws: exception in a callback", exc_info=exc)
        if self.state == OPEN and self._phase == P_OPEN:
            self._queue(self._engine.close(*CALLBACK_FAILED))
            self._arm_close_timer()

    def _call_open(self):
        route = self.route
        try:
            res = route.on_open(self)
            if route.open_is_async:
                task = self._hub.loop.create_task(res)
                task.add_done_callback(self._task_done)
        except Exception as exc:
            self._callback_failed(exc)

    def _call_disconnect(self):
        route = self.route
        if route is None or route.on_disconnect is None:
            return
        try:
            res = route.on_disconnect(self, self.close_code, self.close_reason or "")
            if route.disconnect_is_async:
                task = self._hub.loop.create_task(res)
                task.add_done_callback(_log_task_error)
        except Exception as exc:
            _log.error("fastws: exception in on_disconnect", exc_info=exc)

    # -- timers ---------------------------------------------------------------------------

    def _arm_close_timer(self):
        if self._due_kind != T_CLOSE and self._hub.close_timeout > 0:
            self._hub._schedule(self, self._hub.close_timeout, T_CLOSE)

    def _timer_fired(self):
        """The wheel reached this connection's due tick."""
        hub = self._hub
        kind = self._due_kind
        self._due_kind = T_NONE
        if self.transport is None:
            return
        if kind == T_HANDSHAKE:
            if self._phase == P_HANDSHAKE and self._head:
                hub.handshake_timeouts += 1
                self.reject_upgrade(REQUEST_TIMEOUT)   # part of a head came, slowly (slowloris)
            elif self._phase == P_HANDSHAKE or self._phase == P_DECIDING:
                hub.handshake_timeouts += 1
                self.transport.abort()     # silent client, or no decision in time
            return
        if kind == T_BODY:
            if self._phase == P_DECIDING and self._body_cb is not None:
                hub.body_timeouts += 1
                self._body_cb = None
                self.reject_upgrade(REQUEST_TIMEOUT)   # the request body did not come in time
            return
        if kind == T_CLOSE:
            self.transport.abort()         # the peer never answered our close
            return
        if self._phase != P_OPEN or self.state != OPEN:
            return
        now = hub._tick_no
        if hub.idle_timeout > 0 and (now - self._msg_tick) * hub.tick >= hub.idle_timeout:
            if self._input_waiting():
                hub._schedule(self, hub.tick, kind)   # read what came first (see _input_waiting)
                return
            hub.idle_timeouts += 1
            self.close(*IDLE_TIMEOUT)
            return
        if kind == T_PONG:
            if self._rx_tick >= self._ping_tick:
                self._schedule_heartbeat()   # alive: the pong (or data) came
            elif self._input_waiting():
                hub._schedule(self, hub.tick, T_PONG)
            else:
                hub.ping_timeouts += 1
                self.close(*PING_TIMEOUT)
            return
        # T_PING: ping only a connection that has been quiet for an interval
        if hub.ping_interval > 0 and (now - self._rx_tick) * hub.tick >= hub.ping_interval * 0.999:
            self._ping_tick = now          # anything read from now on is proof of life
            self._queue(self._engine.ping(b""))
            hub._schedule(self, hub.ping_timeout, T_PONG)
        else:
            self._schedule_heartbeat()

    def _input_waiting(self) -> bool:
        """Bytes from the peer wait unread in the socket while reading is on.

        The wheel's tick can run before the read of what arrived while the
        loop was blocked (a long handler, a broadcast to a huge room): a
        pong that came in time would then count as missing.  A deadline
        that finds input waiting is checked again one tick later, after the
        loop has read it.  Not while reading is paused: then the input
        cannot be read, and the deadline holds."""
        transport = self.transport
        if transport is None:
            return False
        try:
            if not transport.is_reading():
                return False
            sock = transport.get_extra_info("socket")
            if sock is None:
                return False
            waiting = array.array("i", [0])
            fcntl.ioctl(sock.fileno(), termios.FIONREAD, waiting, True)
        except (OSError, ValueError, AttributeError):
            return False
        return waiting[0] > 0

    def _schedule_heartbeat(self):
        hub = self._hub
        d = hub.ping_interval
        if hub.idle_timeout > 0 and (d <= 0 or hub.idle_timeout < d):
            d = hub.idle_timeout
        if d > 0:
            hub._schedule(self, d, T_PING)
        else:
            hub._unschedule(self)

    # -- public API -----------------------------------------------------------------------

    @property
    def state(self):
        """OPEN, CLOSING (we sent a close) or CLOSED (the engine's state)."""
        return self._engine.state if self._engine is not None else self._state

    @property
    def close_code(self):
        """The close code once known (the peer's, an error's, ours if the
        peer never answered, 1006 if lost), else None."""
        return self._engine.close_code if self._engine is not None else self._lost_code

    @property
    def close_reason(self):
        return self._engine.close_reason if self._engine is not None else self._lost_reason

    @property
    def closed(self):
        return self._phase != P_OPEN or self._engine.state != OPEN

    def _raise_closed(self):
        if self.close_code is not None:
            raise ConnectionClosed(self.close_code, self.close_reason or "")
        sent = self._engine.sent_close if self._engine is not None else None
        if sent:
            raise ConnectionClosed(sent[0], sent[1] or "")
        raise ConnectionClosed(1006, "")

    def send(self, message):
        """Queue ``message`` (str: text frame; bytes: binary frame).  It is
        written with everything else queued in this loop iteration.
        Raises ConnectionClosed once the connection is closing or closed."""
        if self._phase != P_OPEN or self._engine.state != OPEN:
            self._raise_closed()
        self._hub.messages_out += 1
        self._queue(self._engine.send(message))

    def send_frame(self, frame):
        """Queue an already encoded frame (see ``encode_frame``)."""
        if not isinstance(frame, bytes):
            raise TypeError(f"frame must be bytes, not {type(frame).__name__}")
        if self._phase != P_OPEN or self._engine.state != OPEN:
            self._raise_closed()
        self._queue(frame)

    def ping(self, payload=b""):
        """Queue a ping frame."""
        if self._engine is None:   # not upgraded: nothing is sent
            if len(bytes(payload)) > 125:
                raise ValueError("ping payload is limited to 125 bytes")
            return
        self._queue(self._engine.ping(payload))

    def close(self, code=1000, reason=""):
        """Start the closing handshake; the transport closes when the peer
        answers, or after ``close_timeout`` seconds.  No-op when closed."""
        if self._phase != P_OPEN or self._engine.state != OPEN:
            return
        self._queue(self._engine.close(code, reason))
        self._arm_close_timer()

    def join(self, room, namespace=None, batch=False):
        """Join ``room`` (in the route's namespace unless given)."""
        self._hub.rooms.join(self, room, namespace, batch)

    def leave(self, room, namespace=None):
        """Leave ``room``; no-op if not a member."""
        self._hub.rooms.leave(self, room, namespace)

    def abort(self):
        """Drop the TCP connection at once, without a close handshake."""
        if self.transport is not None:
            self.transport.abort()

    @property
    def id(self):
        """The public id, unique across nodes and workers: ``"<node_id>-<n>"``
        (``"<n>"`` on a hub without a node id); None before the upgrade."""
        if not self._num:
            return None
        node = self._hub.node_id
        return f"{node}-{self._num}" if node else str(self._num)

    @property
    def number(self):
        """The connection's number on its hub (its key in ``hub.connections``); 0 before the upgrade."""
        return self._num

    @property
    def remote_address(self):
        if self.transport is None:
            return None
        return self.transport.get_extra_info("peername")

    @property
    def backlog(self):
        """Bytes sent on this connection that the kernel has not taken yet
        (see ``_core.Connection.backlog``)."""
        n = self._wq_size
        if self.transport is not None:
            n += self.transport.get_write_buffer_size()
        return n

    @property
    def timer_state(self):
        """(due tick, timer kind, last read tick, last ping tick, hub tick):
        for tests and debugging."""
        return (self._due_tick, self._due_kind, self._rx_tick, self._ping_tick, self._hub._tick_no)

    @property
    def store(self):
        if self._store is None:
            self._store = {}
        return self._store

    def __repr__(self):
        return f"<fastws.Connection id={self.id} path={self.path!r} state={self.state}>"


def _log_task_error(task):
    if not task.cancelled() and task.exception() is not None:
        _log.error("fastws: exception in a callback", exc_info=task.exception())
