# Part of fastws/_core.pyx (included there, in order): Hub: limits, registry, timer wheel, write coalescing, broadcast.

# ---------------------------------------------------------------- hub

DEF LAT_SLOTS = 64         # delivery-latency histograms per hub: one per route, the last for "other"
DEF LAT_OTHER = 63         # the slot of every route past the first LAT_SLOTS - 1
DEF LAT_ROW = LAT_BUCKETS + 1   # counters per slot: the buckets and the one above the last

#: How many delivery-latency histograms a hub keeps (Hub.stats()["delivery_latency"]):
#: one per route label for the first DELIVERY_LATENCY_ROUTES - 1 labels, one "other".
DELIVERY_LATENCY_ROUTES = LAT_SLOTS

cdef class Hub:
    """Per-server state shared by its connections: limits, the handshake,
    the registry of open connections, the per-loop write coalescer, the
    delivery policy and the frame-level counters.

    Delivery policy (theory of operation).  Each connection's send budget is
    the transport's write buffer (``high_water`` bytes, after which the
    transport calls ``pause_writing``) plus fastws's own queue of frames not
    yet handed to the transport (at most ``max_queue`` bytes).  While a
    connection is paused its frames stay in that queue; a published message
    of LOW priority is dropped for it, NORMAL is dropped once the queue is
    half full, HIGH and control frames are kept.  A connection whose queue
    passes ``max_queue``, or that stays paused longer than ``slow_grace``
    seconds while messages keep coming, is closed with 1008 "slow consumer".
    A paused connection is not read either, which paces a client that floods
    the server faster than it reads the answers.  So a connection never holds
    more than ``high_water + max_queue`` bytes of output, whatever it does.
    """

    cdef public object loop
    cdef public object handshake       # callable(conn, head: bytes | None) -> None that answers
                                       # with conn.accept_upgrade/reject_upgrade/hold_upgrade/
                                       # read_body; None: heads are refused (fronts adopt)
    cdef public dict connections       # number (int) -> Connection, upgraded and not lost
    cdef public str node_id            # this node's id: public connection ids are "<node_id>-<n>"
    cdef public Py_ssize_t max_message_size
    cdef public Py_ssize_t max_frame_size
    cdef public Py_ssize_t max_head_size
    cdef public double close_timeout
    cdef public object on_callback_error   # callable(conn, exc): log it
    cdef public object on_lost         # callable(conn) for a lost connection that joined rooms
    cdef public object on_closed       # callable(conn) for every lost connection that was upgraded
    cdef public object rooms           # the fastws.rooms.Rooms registry of this server
    # -- delivery policy --
    cdef public Py_ssize_t high_water  # transport write-buffer high-water mark, bytes
    cdef public Py_ssize_t max_queue   # hard cap on fastws's own per-connection queue, bytes
    cdef public double slow_grace      # seconds a connection may stay backed up
    # -- counters (exported by fastws.metrics) --
    cdef public unsigned long long messages_in, messages_out, bytes_in, bytes_out
    cdef public unsigned long long slow_consumer_closes
    cdef public dict closes            # close code (1000..1015, else "3xxx"/"4xxx"/"other") -> count
    cdef public dict dropped           # (reason, priority) -> count
    cdef public unsigned long long handshake_timeouts, ping_timeouts, idle_timeouts
    cdef public unsigned long long body_timeouts
    # -- per-connection rate limits (see _rate_setup; 0 = off) --
    cdef public double max_messages_per_second
    cdef public Py_ssize_t max_bytes_per_second
    cdef public double rate_burst_seconds
    cdef public dict rate_limited      # "messages"/"bytes" -> connections closed for it
    cdef bint _rate_on                 # a limit is set
    cdef uint32_t _rate_ticks          # window length, whole wheel ticks
    cdef uint32_t _rate_msgs_cap       # messages allowed per window (0: no limit)
    cdef uint32_t _rate_bytes_cap      # bytes read allowed per window (0: no limit)
    # -- delivery latency (see _flush_all), one histogram per route slot --
    cdef int64_t _read_ns              # monotonic ns at the start of the read being handled, else 0
    cdef int64_t _batch_ns             # monotonic ns when the pending flush was scheduled
    cdef unsigned long long _lat_counts[LAT_SLOTS * LAT_ROW]   # slot * LAT_ROW + bucket
    cdef int64_t _lat_sum_ns[LAT_SLOTS]
    cdef dict _lat_slot_of             # route label (str) -> slot, at most LAT_SLOTS - 1 entries
    cdef list _lat_labels              # slot -> route label, in the order routes were first accepted on
    cdef bint _lat_overflow            # a route label was sent to the LAT_OTHER slot
    # -- timers: one wheel per hub (see _on_tick) --
    cdef public double ping_interval   # seconds between server pings (0: no pings)
    cdef public double ping_timeout    # seconds to wait for proof of life after a ping
    cdef public double idle_timeout    # close after this long without a message (0: never)
    cdef public double handshake_timeout  # seconds to complete the opening handshake
    cdef public double body_timeout    # seconds a plain HTTP request body may take to arrive
    cdef public double tick            # wheel granularity, seconds
    cdef list _slots                   # WHEEL_SIZE heads of intrusive lists of Connection
    cdef Py_ssize_t _waiting           # connections in the wheel
    cdef long _tick_no                 # ticks since start; the wheel's clock
    cdef object _tick_handle           # the one TimerHandle of the wheel
    cdef unsigned long long _next_id
    cdef list _dirty                   # connections with frames queued this tick
    cdef bint _scheduled               # a flush is scheduled with call_soon
    # -- the fast upgrade (see _parse_plain); set by set_fast_upgrade --
    cdef dict _fast_routes             # path bytes -> (path str, route), or False: ask Python
    cdef object _fast_default          # the "*" route when it needs no Python decision
    cdef dict _fast_paths              # interned path str of wildcard-routed paths (bounded)
    cdef Py_ssize_t _fast_max_conns    # max_connections (0: none); at the cap Python answers 503
    cdef bint _fast_deflate            # compression on: extension offers go to Python
    cdef int _fast_origins             # OriginMode: which Origin headers the fast path takes
    cdef public unsigned long long fast_upgrades   # upgrades decided by the fast path

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
        self.max_messages_per_second = max_messages_per_second
        self.max_bytes_per_second = max_bytes_per_second
        self.rate_burst_seconds = rate_burst_seconds
        self._rate_on = max_messages_per_second > 0 or max_bytes_per_second > 0
        if tick is None:
            tick = _default_tick((ping_interval, ping_timeout, idle_timeout, handshake_timeout,
                                  body_timeout, close_timeout,
                                  rate_burst_seconds if self._rate_on else 0))
        self.tick = tick
        self._rate_setup()
        self.rate_limited = {"messages": 0, "bytes": 0}
        self.node_id = node_id or ""
        self.on_closed = None
        self._read_ns = 0
        self._batch_ns = 0
        memset(self._lat_counts, 0, sizeof(self._lat_counts))
        memset(self._lat_sum_ns, 0, sizeof(self._lat_sum_ns))
        self._lat_slot_of = {}
        self._lat_labels = []
        self._lat_overflow = False
        self._slots = [None] * WHEEL_SIZE
        self._waiting = 0
        self._tick_no = 0
        self._tick_handle = None
        self.high_water = high_water
        self.max_queue = max_queue
        self.slow_grace = slow_grace
        self.closes = {}
        self.dropped = {}
        self.on_lost = None
        self.handshake = handshake
        self.connections = {}
        self.max_message_size = max_message_size
        self.max_frame_size = max_frame_size
        self.max_head_size = max_head_size
        self.close_timeout = close_timeout
        self.on_callback_error = on_callback_error
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

    # -- rate limits ----------------------------------------------------------
    # Theory of operation: fixed windows counted in wheel ticks, no clock
    # read per message.  A connection keeps the tick its window began and
    # two counters (messages, bytes read) in 12 bytes that fill alignment
    # padding of the Connection struct.  When a message or a read finds the
    # window over (``_rate_ticks`` ticks since it began) the counters start
    # again; past the allowance of the window the connection is closed with
    # errors.RATE_LIMITED and whatever it sends afterwards is read and
    # dropped.  The allowance is the rate times the window's length in
    # whole ticks (rate_burst_seconds rounded to ticks, at least one), so a
    # client at the rate stays under it; a burst of up to a window's worth
    # passes; across a window boundary a client may send up to two windows'
    # worth before it is stopped.

    cdef _rate_setup(self):
        cdef double ticks
        self._rate_ticks = 0
        self._rate_msgs_cap = 0
        self._rate_bytes_cap = 0
        if not self._rate_on:
            return
        ticks = self.rate_burst_seconds / self.tick
        self._rate_ticks = <uint32_t>max(1, int(ticks + 0.5))
        window = self._rate_ticks * self.tick
        if self.max_messages_per_second > 0:
            self._rate_msgs_cap = <uint32_t>min(RATE_CAP_MAX, max(1, math_ceil(
                self.max_messages_per_second * window)))
        if self.max_bytes_per_second > 0:
            self._rate_bytes_cap = <uint32_t>min(RATE_CAP_MAX, max(1, math_ceil(
                self.max_bytes_per_second * window)))

    @property
    def rate_window(self):
        """(window ticks, messages allowed, bytes allowed) per window; 0 = off."""
        return (self._rate_ticks, self._rate_msgs_cap, self._rate_bytes_cap)

    def set_fast_upgrade(self, routes, default=None, *, max_connections=0, deflate=False,
                         origins="*"):
        """Let plain upgrade requests be answered in C, without calling ``handshake``.

        ``routes`` maps exact paths (str) to a route object, or to None when
        that path needs the Python handshake (an ``on_connect`` to run ...);
        ``default`` is the route for every other path (None: ask Python).
        The fast path only takes requests that ``fastws.handshake.parse_fast``
        accepts and validates, and answers them exactly as the Python
        handshake would for a route without ``on_connect``: no subprotocol,
        no extension.  With ``deflate`` True a request offering extensions
        goes to Python; at ``max_connections`` open connections every request
        does (so Python answers 503).  ``origins`` says which browser requests
        the fast path may take (the rest go to Python's origin check):
        ``"*"`` all, ``"same-host"`` those without Origin or whose Origin is
        http(s)://<Host>, ``"none"`` only those without Origin.
        ``routes=None`` turns the fast path off (the server does while it
        drains).
        """
        cdef int mode = _origin_mode(origins)
        if routes is None:
            self._fast_routes = None
            self._fast_default = None
            return
        table = {}
        for path, route in routes.items():
            table[path.encode("ascii")] = (path, route) if route is not None else False
        self._fast_routes = table
        self._fast_default = default
        self._fast_paths = {}
        self._fast_max_conns = max_connections
        self._fast_deflate = deflate
        self._fast_origins = mode

    # -- the timer wheel ------------------------------------------------------
    # Theory of operation: one TimerHandle per hub, whatever the number of
    # connections.  Every ``tick`` seconds the wheel advances one slot; a
    # connection waiting for something (handshake end, next ping, proof of
    # life after a ping, the peer's close) sits in the slot of its due tick
    # (slot = due % WHEEL_SIZE; a due tick more than one turn away stays in
    # place until its turn), linked through its own _wnext/_wprev fields:
    # no allocation and O(1) to add or remove.  A connection is in at most
    # one slot.  Activity does not move a connection: reads just stamp the
    # current tick number, checked when the connection's slot comes round.

    cdef void _schedule(self, Connection c, double delay, int kind):
        cdef long due = self._tick_no + <long>(delay / self.tick + 0.999999)
        cdef Py_ssize_t idx
        if due <= self._tick_no:
            due = self._tick_no + 1
        if c._due_tick >= 0:
            self._unlink(c)
        c._due_tick = due
        c._due_kind = kind
        idx = due % WHEEL_SIZE
        head = self._slots[idx]
        c._wprev = None
        c._wnext = head
        if head is not None:
            (<Connection>head)._wprev = c
        self._slots[idx] = c
        self._waiting += 1
        if self._tick_handle is None:
            self._tick_handle = self.loop.call_later(self.tick, self._on_tick)

    cdef void _unlink(self, Connection c):
        if c._wprev is not None:
            c._wprev._wnext = c._wnext
        else:
            self._slots[c._due_tick % WHEEL_SIZE] = c._wnext
        if c._wnext is not None:
            c._wnext._wprev = c._wprev
        c._wnext = None
        c._wprev = None
        self._waiting -= 1

    cdef void _unschedule(self, Connection c):
        if c._due_tick >= 0:
            self._unlink(c)
            c._due_tick = -1
            c._due_kind = T_NONE

    def _on_tick(self):
        cdef Connection c, nxt
        cdef list due = []
        self._tick_handle = None
        self._tick_no += 1
        head = self._slots[self._tick_no % WHEEL_SIZE]
        c = <Connection>head if head is not None else None
        while c is not None:
            nxt = c._wnext
            if c._due_tick <= self._tick_no:
                self._unlink(c)
                c._due_tick = -1
                due.append(c)
            c = nxt
        for c in due:
            try:
                c._timer_fired()
            except Exception as exc:
                _log.error("fastws: timer callback failed", exc_info=exc)
        if self._tick_handle is None and (self._waiting > 0 or (self._rate_on and self.connections)):
            # (rate limits count windows in ticks: the wheel turns while connections are open)
            self._tick_handle = self.loop.call_later(self.tick, self._on_tick)

    cdef void _keep_ticking(self):
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

    # -- write coalescing and the delivery latency -----------------------------
    # Theory of operation: frames queued during a loop iteration are written
    # once per connection (_flush_all, call_soon).  The delivery latency is
    # the time from a message's arrival to its frame's write: the hub reads
    # the monotonic clock when a read of an open connection starts
    # (_read_ns) and when the first frame of a batch is queued (_batch_ns:
    # the read's time inside a read, else the clock: a publish, a timer, a
    # task), and observes ``write time - start`` once per connection written:
    # the reply written at the end of the read that delivered a message
    # (_after_input) counts from that read, the frames of a batch from the
    # batch's start.  In a batch the clock is read, and its bucket found,
    # once per 16 connections written (the time of the 16th write stands for
    # the group).  Frames held back by a paused connection (the delivery
    # policy) are not observed when they finally go out.
    #
    # One histogram per route: a connection takes the slot of its route's
    # label when it is accepted (_accept: the handshake's accept_upgrade,
    # the C fast path, adopt) and keeps it in one byte of the Connection
    # struct (_lat_slot, beside _due_kind in what was padding).  A label is
    # the route's ``path`` (a non-empty str), else "asgi" (the ASGI front's
    # sessions and handed-over routes, whose paths are per connection); the
    # first LAT_SLOTS - 1 labels get a slot each, later ones share LAT_OTHER
    # ("other").  Counts and sums live in C arrays indexed by slot
    # (_lat_counts, _lat_sum_ns); nothing is allocated per frame.

    cdef inline void _mark_dirty(self, Connection c):
        self._dirty.append(c)
        if not self._scheduled:
            self._scheduled = True
            self._batch_ns = self._read_ns if self._read_ns else _now_ns()
            self.loop.call_soon(self._flush_all)

    cdef uint8_t _route_slot(self, route) except? 255:
        """The latency slot of connections accepted on ``route`` (a new one
        for a label not seen before, while there are free slots)."""
        label = getattr(route, "path", None)
        if not isinstance(label, str) or not label:
            label = "asgi"
        slot = self._lat_slot_of.get(label)
        if slot is not None:
            return <uint8_t>slot
        if len(self._lat_labels) >= LAT_OTHER:
            self._lat_overflow = True
            return LAT_OTHER
        slot = len(self._lat_labels)
        self._lat_labels.append(label)
        self._lat_slot_of[label] = slot
        return <uint8_t>slot

    cdef inline void _observe(self, unsigned int slot, int64_t dt) noexcept:
        """One write, on a connection of ``slot``, ``dt`` ns after its start."""
        cdef int i = 0
        if dt < 0:
            dt = 0
        while i < LAT_BUCKETS and dt > LAT_BOUNDS_NS[i]:
            i += 1
        self._lat_counts[slot * LAT_ROW + i] += 1
        self._lat_sum_ns[slot] += dt

    cdef inline void _observe_group(self, const uint8_t* slots, unsigned int n,
                                    int64_t dt) noexcept:
        """``n`` writes, ``dt`` ns each, on connections of ``slots[0:n]``."""
        cdef int i = 0
        cdef unsigned int k, slot
        if dt < 0:
            dt = 0
        while i < LAT_BUCKETS and dt > LAT_BOUNDS_NS[i]:
            i += 1
        for k in range(n):
            slot = slots[k]
            self._lat_counts[slot * LAT_ROW + i] += 1
            self._lat_sum_ns[slot] += dt

    def _flush_all(self):
        cdef Connection c
        cdef list dirty = self._dirty
        cdef int64_t start = self._batch_ns
        cdef uint8_t group[16]               # the slots written since the clock was last read
        cdef unsigned int n = 0
        self._dirty = []
        self._scheduled = False
        for c in dirty:
            if c._flush():
                group[n] = c._lat_slot
                n += 1
                if n == 16:                  # one clock read (and bucket) per 16 writes
                    self._observe_group(group, n, _now_ns() - start)
                    n = 0
        if n:
            self._observe_group(group, n, _now_ns() - start)

    def _latency_stats(self):
        """route label -> {"buckets", "sum", "count"} (see stats)."""
        cdef Py_ssize_t slot, i
        out = {}
        slots = list(enumerate(self._lat_labels))
        if self._lat_overflow:
            slots.append((LAT_OTHER, "other"))
        for slot, label in slots:
            buckets = [self._lat_counts[slot * LAT_ROW + i] for i in range(LAT_ROW)]
            seconds = self._lat_sum_ns[slot] / 1e9
            prev = out.get(label)
            if prev is not None:            # a route whose path is "other" shares the entry
                buckets = [a + b for a, b in zip(prev["buckets"], buckets, strict=True)]
                seconds += prev["sum"]
            out[label] = {"buckets": buckets, "sum": seconds, "count": sum(buckets)}
        return out

    def stats(self):
        """Counters and gauges for metrics (a new dict; O(connections))."""
        cdef Connection c
        cdef Py_ssize_t total = 0, largest = 0, q
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

    cdef void _count_drop(self, str reason, int priority):
        key = (reason, priority)
        self.dropped[key] = self.dropped.get(key, 0) + 1

    def broadcast(self, message, connections, exclude=None, int priority=PRIO_NORMAL):
        """``broadcast_frame`` of ``message``: str as TEXT (its UTF-8),
        bytes-like as BINARY."""
        if type(message) is str:
            return self._broadcast(OP_TEXT, (<str>message).encode("utf-8"), connections,
                                   exclude, priority)
        if type(message) is bytes:
            return self._broadcast(OP_BINARY, <bytes>message, connections, exclude, priority)
        if isinstance(message, (bytearray, memoryview)):
            return self._broadcast(OP_BINARY, bytes(message), connections, exclude, priority)
        raise TypeError(f"message must be str or bytes, not {type(message).__name__}")

    def broadcast_frame(self, int opcode, payload, connections, exclude=None,
                        int priority=PRIO_NORMAL):
        """Queue one frame of ``opcode`` (TEXT or BINARY) around ``payload``
        (bytes already encoded; a text payload is trusted to be UTF-8,
        nothing is decoded) on every open connection of ``connections`` (an
        iterable of Connection) except ``exclude``, under the delivery policy
        for ``priority``.  The frame is built once; a connection with
        permessage-deflate gets its own compressed one, except that members
        taking messages without context takeover share one per window size.
        Returns the number of connections it was queued on."""
        if opcode != OP_TEXT and opcode != OP_BINARY:
            raise ValueError(f"opcode {opcode} is not TEXT or BINARY")
        return self._broadcast(opcode, payload if type(payload) is bytes else bytes(payload),
                               connections, exclude, priority)

    cdef int _broadcast(self, int opcode, bytes data, connections, exclude, int priority) except -1:
        cdef Connection c
        cdef bytes frame = None
        cdef dict compressed = None          # window bits -> the frame compressed without context
        cdef int n = 0
        for c in connections:
            if c is exclude or c.state != S_OPEN or c._phase != P_OPEN:
                continue
            if c._wpaused and not c._admit(priority):
                continue
            if c._deflate_params is not None:
                p = c._deflate_params
                if p.server_no_context_takeover:
                    # the message on its own: the same bytes for every member
                    # with this window size, so compressed once for all of them
                    bits = p.server_max_window_bits
                    if compressed is None:
                        compressed = {}
                    cframe = compressed.get(bits)
                    if cframe is None:
                        cframe = compressed[bits] = c._compress(opcode, data)
                    c._queue(cframe)
                else:
                    c._queue(c._compress(opcode, data))
            else:
                if frame is None:
                    frame = _encode(opcode, <const uint8_t*>PyBytes_AS_STRING(data),
                                    PyBytes_GET_SIZE(data), True, NULL, False)
                c._queue(frame)
            n += 1
        if COUNTERS:
            self.messages_out += n
        return n

    @property
    def open_connections(self):
        return len(self.connections)
