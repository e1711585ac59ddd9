# Part of fastws/_core.pyx (included there, in order): Connection: the protocol uvloop drives.

# ---------------------------------------------------------------- connection

cdef class Connection(Engine):
    """One WebSocket connection: the protocol uvloop drives and the object
    the application's callbacks receive as ``conn``.

    Public API: ``send(message)``, ``close(code=1000, reason="")``,
    ``ping(payload=b"")``, ``id`` (``"<node_id>-<n>"``), ``number`` (``n``),
    ``path``, ``query_string``,
    ``subprotocol``, ``remote_address``, ``store`` (a dict created on first
    use, for the application's per-connection state), ``closed``.
    """

    cdef Hub _hub
    cdef object transport
    cdef unsigned long long _num       # number on the hub (key of hub.connections), set at upgrade
    cdef public str path
    cdef public str query_string
    cdef public object subprotocol
    cdef public object route           # the route object (callbacks), set at upgrade
    cdef object _on_message_cb         # route.on_message, cached for the hot path
    cdef bint _msg_async               # on_message is a coroutine function
    cdef int _phase                    # Phase
    cdef bytearray _head               # request head until the handshake is decided
    cdef object _wq                    # frames queued for the next flush: None, one bytes,
                                       # or a list of bytes (no list for the common single frame)
    cdef int _fd                       # socket fd for direct writes, -1 when not allowed (TLS ...)
    cdef bint _tpending                # the transport may hold unsent bytes of ours
    cdef Py_ssize_t _wq_size           # bytes in _wq
    cdef bint _read_direct             # the last get_buffer handed out the message itself
    cdef bint _dirty                   # registered in the hub's dirty list
    cdef int _end_mode                 # END_*: what to do with the transport once _wq is written
    cdef bint _errored                 # we closed because the peer broke the protocol
    cdef object _store                 # user dict, created lazily
    cdef long _due_tick                # the wheel tick this connection waits for, -1 if none
    cdef Connection _wnext, _wprev     # neighbours in the wheel slot's list
    cdef uint8_t _due_kind             # TimerKind
    cdef uint8_t _lat_slot             # the route's delivery-latency slot (see Hub._route_slot);
                                       # with _due_kind, in the 4 bytes before _rl_start
    # the rate-limit window (see Hub._rate_setup); the three 4-byte fields
    # are spread so that each fills alignment padding after an int field
    cdef uint32_t _rl_start            # wheel tick (low 32 bits) the window began
    cdef long _rx_tick                 # wheel tick of the last read (proof of life)
    cdef long _msg_tick                # wheel tick of the last complete message
    cdef long _ping_tick               # wheel tick our last ping went out
    cdef bint _reported                # on_disconnect has run
    cdef uint32_t _rl_msgs             # messages in the window (RL_CLOSED: closed for its rate)
    cdef object _body_cb               # plain HTTP: callback(body) once _body_size bytes are in
    cdef public object rooms           # room keys joined (fastws.rooms): None, a small tuple, or a set
    cdef bint _wpaused                 # the transport asked us to stop writing
    cdef uint32_t _rl_bytes            # bytes read in the window (saturates)
    cdef double _paused_at             # loop time of pause_writing
    cdef public unsigned long dropped  # messages dropped for this connection
    cdef Py_ssize_t _body_size

    def __init__(self, Hub hub):
        self._hub = hub
        self._fd = -1
        self._due_tick = -1
        self.max_message_size = hub.max_message_size
        self.max_frame_size = hub.max_frame_size
        self._phase = P_HANDSHAKE

    # ---------------------------------------------------------- asyncio protocol

    def connection_made(self, transport):
        self._made(transport)
        if self._hub.handshake_timeout > 0:
            self._hub._schedule(self, self._hub.handshake_timeout, T_HANDSHAKE)

    cdef _made(self, transport):
        """Take ``transport``: its socket for direct writes (never with
        TLS), the hub's write-buffer limit."""
        self.transport = transport
        if transport.get_extra_info("sslcontext") is None:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                self._fd = sock.fileno()
        if self._hub.high_water != 65536:
            transport.set_write_buffer_limits(high=self._hub.high_water)

    def get_buffer(self, Py_ssize_t sizehint):
        cdef _RawBuffer rb
        if (self._direct and self._fstate == F_PAYLOAD
                and self._flen - self._fpos >= DIRECT_READ_MIN):
            # a large frame's payload: let the kernel write it in place
            rb = _RawBuffer.__new__(_RawBuffer)
            rb.owner = self._mobj
            rb.ptr = <char*>(self._mbuf + self._mlen)
            rb.size = <Py_ssize_t>(self._flen - self._fpos)
            self._read_direct = True
            return rb
        self._read_direct = False
        return _READ_BUFFER

    def buffer_updated(self, Py_ssize_t nbytes):
        cdef Hub hub = self._hub
        if COUNTERS:
            hub.bytes_in += nbytes
        self._rx_tick = hub._tick_no
        if self._phase == P_OPEN:
            hub._read_ns = _now_ns()       # the start of the delivery latency of replies
            if hub._rate_bytes_cap:
                self._rate_bytes(nbytes)
            if self._read_direct:
                self._read_direct = False
                if self._consume_payload(self._mbuf + self._mlen, nbytes, True) == 0:
                    if self._fpos == self._flen:
                        self._fstate = F_HEADER
                        self._end_frame()
            else:
                self._feed(<uint8_t*><char*>_READ_BUFFER, nbytes)
            self._after_input()
            hub._read_ns = 0
        elif self._phase == P_HANDSHAKE:
            if self._head is None and self._hub._fast_routes is not None:
                if self._fast_upgrade(<uint8_t*><char*>_READ_BUFFER, nbytes):
                    return
            self._head_data(memoryview(_READ_BUFFER)[:nbytes])
        elif self._phase == P_DECIDING and self._head is not None:
            # bytes behind the request head while the server decides
            self._head.extend(memoryview(_READ_BUFFER)[:nbytes])
            self._check_body()

    def data_received(self, data):
        """For transports that do not use the buffered-protocol path (the
        stdlib loop's, TLS on some loops): same as bytes read by get_buffer."""
        cdef Hub hub = self._hub
        if COUNTERS:
            hub.bytes_in += len(data)
        self._rx_tick = hub._tick_no
        if self._phase == P_OPEN:
            hub._read_ns = _now_ns()
            if hub._rate_bytes_cap:
                self._rate_bytes(len(data))
            self.feed(data)
            hub._read_ns = 0
        else:
            self.feed(data)

    def feed(self, data):
        """Process ``data`` as if it had been read from the transport (not
        counted in bytes_in).  A protocol that hands over a transport whose
        upgrade it decided itself uses ``adopt`` instead."""
        cdef bytearray buf
        if self._phase == P_HANDSHAKE:
            self._head_data(data)
        elif self._phase == P_DECIDING and self._head is not None:
            self._head.extend(data)
            self._check_body()
        elif self._phase == P_OPEN:
            buf = bytearray(data)
            if len(buf):
                self._feed(<uint8_t*><char*>buf, len(buf))
            self._after_input()

    def read_body(self, Py_ssize_t size, callback):
        """While deciding (a plain HTTP request): call ``callback(body)``
        once ``size`` bytes behind the head are in.  The body must be in
        within the hub's ``body_timeout``, else the client gets 408 and the
        connection is closed."""
        self._body_size = size
        self._body_cb = callback
        if self._hub.body_timeout > 0:
            self._hub._schedule(self, self._hub.body_timeout, T_BODY)
        self._check_body()

    cdef _check_body(self):
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
        cdef int phase = self._phase
        self._phase = P_DONE
        self._wq = None
        self._hub._unschedule(self)
        if phase == P_OPEN or phase == P_DONE:
            self._hub.connections.pop(self._num, None)
        if self.close_code is None:
            if self._sent_code:
                # we closed (e.g. slow consumer) and the peer never answered
                self.close_code = self._sent_code
                self.close_reason = self._sent_reason or ""
            else:
                self.close_code = 1006
                self.close_reason = ""
        if self.state != S_CLOSED:
            self.state = S_CLOSED
        self._release_message()
        if phase == P_OPEN:
            code = self.close_code
            if not 1000 <= code <= 1015:   # client-chosen codes share 3 keys: the dict stays small
                code = "3xxx" if 3000 <= code <= 3999 else ("4xxx" if 4000 <= code <= 4999 else "other")
            self._hub.closes[code] = self._hub.closes.get(code, 0) + 1
            if self.rooms and self._hub.on_lost is not None:
                try:
                    self._hub.on_lost(self)
                except Exception as exc:
                    _log.error("fastws: leaving rooms failed", exc_info=exc)
            if self._hub.on_closed is not None:
                try:
                    self._hub.on_closed(self)
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

    cdef bint _admit(self, int priority):
        """Delivery policy for a published message to a paused connection:
        True to queue it, False if it is dropped (counted) or the connection
        is being closed as a slow consumer."""
        cdef Hub hub = self._hub
        if (self._wq_size > hub.max_queue or
                (hub.slow_grace > 0 and hub.loop.time() - self._paused_at > hub.slow_grace)):
            self._slow_consumer()
            return False
        if priority <= PRIO_LOW or (priority == PRIO_NORMAL and self._wq_size * 2 > hub.max_queue):
            self.dropped += 1
            hub._count_drop("backpressure", priority)
            return False
        return True

    cdef _slow_consumer(self):
        """Close with 1008: discard what is queued, send the close frame past
        the pause, drop the TCP connection after close_timeout."""
        if self.state != S_OPEN:
            return
        self._hub.slow_consumer_closes += 1
        self._wq = None
        self._wq_size = 0
        frame = self._start_close(_SLOW_CONSUMER.code, _SLOW_CONSUMER.reason)
        if self.transport is not None:
            self.transport.write(frame)
            self._tpending = True
        self._arm_close_timer()

    # ---------------------------------------------------------- handshake

    cdef int _head_data(self, object data) except -1:
        if self._head is None:
            self._head = bytearray()
        cdef Py_ssize_t start = len(self._head) - 3
        if start < 0:
            start = 0
        self._head.extend(data)
        cdef Py_ssize_t end = self._head.find(b"\r\n\r\n", start)
        if end < 0:
            if len(self._head) > self._hub.max_head_size:
                self._phase = P_DECIDING
                self._decide(None)
            return 0
        end += 4
        if end > self._hub.max_head_size:
            self._phase = P_DECIDING
            self._decide(None)
            return 0
        head = bytes(self._head[:end])
        del self._head[:end]
        self._phase = P_DECIDING
        self._decide(head)
        return 0

    cdef _decide(self, head):
        """Hand the request head (None: over max_head_size) to the hub's handshake."""
        hs = self._hub.handshake
        if hs is None:
            self.reject_upgrade(_UNEXPECTED_HEAD)
        else:
            hs(self, head)

    cdef bint _fast_upgrade(self, uint8_t* p, Py_ssize_t n) except -1:
        """Answer a plain upgrade request that arrived whole in one read (see
        _parse_plain) in C; False leaves the bytes untouched for the Python
        handshake."""
        cdef Hub hub = self._hub
        cdef _Plain r
        cdef const uint8_t* e = <const uint8_t*>memmem(p, n, b"\r\n\r\n", 4)
        if e == NULL:
            return False
        cdef Py_ssize_t end = (e - p) + 4
        if end > hub.max_head_size or not _parse_plain(p, end, &r):
            return False
        if not _origin_ok(p, &r, hub._fast_origins):
            return False
        if r.has_ext and hub._fast_deflate:
            return False
        if hub._fast_max_conns and len(hub.connections) >= hub._fast_max_conns:
            return False
        bpath = PyBytes_FromStringAndSize(<char*>p + 4, r.path_end - 4)
        entry = hub._fast_routes.get(bpath)
        if entry is None:
            route = hub._fast_default
            if route is None:
                return False
            path = hub._fast_paths.get(bpath)
            if path is None:
                path = bpath.decode("ascii")
                if len(hub._fast_paths) < 4096:
                    hub._fast_paths[bpath] = path
        elif entry is False:
            return False
        else:
            path, route = <tuple>entry
        if r.path_end < r.target_end:
            query = PyUnicode_DecodeASCII(<char*>p + r.path_end + 1, r.target_end - r.path_end - 1, NULL)
        else:
            query = ""
        hub.fast_upgrades += 1
        self._phase = P_DECIDING
        self._accept(_accept_response(p + r.key_start), route, path, query, None, None)
        if end < n and self._phase == P_OPEN:
            self._feed(p + end, n - end)
            self._after_input()
        return True

    def accept_upgrade(self, bytes response, route, str path, str query_string,
                       subprotocol=None, deflate=None):
        """Called by the handshake: send the 101 ``response``, register,
        start framing, run on_open, then parse the bytes that came after
        the head.  False (nothing done) unless deciding on a live transport."""
        if self._phase != P_DECIDING or self.transport is None:
            return False
        self._accept(response, route, path, query_string, subprotocol, deflate)
        cdef bytearray rest = self._head
        self._head = None
        if self.transport.is_reading() is False:
            self.transport.resume_reading()
        if rest:
            self._feed(<uint8_t*><char*>rest, len(rest))
            self._after_input()
        return True

    cdef int _accept(self, bytes response, route, str path, str query_string,
                     subprotocol, deflate) except -1:
        self._hub.bytes_out += len(response)
        self.transport.write(response)
        self._tpending = True
        self.route = route
        self.path = path
        self.query_string = query_string
        self.subprotocol = subprotocol
        self._on_message_cb = route.on_message
        self._msg_async = route.message_is_async
        if deflate is not None:
            self._set_deflate(deflate)
        cdef Hub hub = self._hub
        self._lat_slot = hub._route_slot(route)
        if not self._num:              # not reserved by reserve_id() during the decision
            hub._next_id += 1
            self._num = hub._next_id
        hub.connections[self._num] = self
        self._phase = P_OPEN
        self._rx_tick = self._msg_tick = hub._tick_no
        self._rl_start = <uint32_t>hub._tick_no
        self._schedule_heartbeat()
        if hub._rate_on:
            hub._keep_ticking()
        if route.on_open is not None:
            self._call_open()
        return 0

    def adopt(self, transport, bytes response, route, str path, str query_string,
              subprotocol=None, deflate=None, early=b""):
        """Take over ``transport``, whose upgrade request was parsed and
        decided elsewhere (the ASGI front): become its protocol, take it as
        ``connection_made`` does, write ``response``, register, start
        framing, run on_open, then parse ``early`` (bytes read after the
        head) as frames.  No re-parse, no handshake call."""
        cdef bytes data
        transport.set_protocol(self)
        self._made(transport)
        self._phase = P_DECIDING
        self._head = None
        self._accept(response, route, path, query_string, subprotocol, deflate)
        if transport.is_reading() is False:
            transport.resume_reading()
        if early and self._phase == P_OPEN:
            data = bytes(early)
            self.feed(data)

    def reject_upgrade(self, bytes response):
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

    # ---------------------------------------------------------- engine hooks

    cdef int _on_message(self, int opcode, object payload) except -1:
        if COUNTERS:
            self._hub.messages_in += 1
        self._msg_tick = self._hub._tick_no
        if self._hub._rate_on and self._rate_message():
            return 0                   # over the rate: the connection is closing, the message dropped
        cb = self._on_message_cb
        if cb is None:
            return 0
        if self._msg_async:
            task = self._hub.loop.create_task(cb(self, payload))
            task.add_done_callback(self._task_done)
            return 0
        try:
            cb(self, payload)
        except Exception as exc:
            self._callback_failed(exc)
        return 0

    cdef int _on_event(self, tuple event) except -1:
        if event[0] == EV_ERROR:
            self._errored = True
        return 0

    cdef int _queue(self, bytes frame) except -1:
        if self._phase != P_OPEN:
            return 0
        cdef object w = self._wq
        cdef list lst
        if w is None:
            self._wq = frame
        elif type(w) is list:
            (<list>w).append(frame)
        else:
            lst = [w, frame]
            # a list of bytes cannot be in a reference cycle: keep it away
            # from the cyclic GC, which otherwise scans one per member per tick
            PyObject_GC_UnTrack(lst)
            self._wq = lst
        self._wq_size += PyBytes_GET_SIZE(frame)
        if self._wpaused:
            if self._wq_size > self._hub.max_queue and self.state == S_OPEN:
                self._slow_consumer()
            return 0
        cdef Hub hub = self._hub
        if not self._dirty:
            self._dirty = True
            hub._mark_dirty(self)
        if self._wq_size > hub.high_water:
            # More than a transport's worth queued within one loop iteration
            # (a burst of publishes in one callback, or one large message):
            # write it now, so that the transport's flow control
            # (pause_writing) and then the delivery policy bound the rest,
            # instead of the whole burst landing in the transport's buffer
            # at the end of the iteration.
            if self._flush():
                hub._observe(self._lat_slot,
                             _now_ns() - (hub._read_ns if hub._read_ns else hub._batch_ns))
        return 0

    # -- rate limits (see Hub._rate_setup) ---------------------------------------

    cdef inline void _rate_window(self) noexcept:
        """Start a new window when the current one is over."""
        cdef uint32_t now = <uint32_t>self._hub._tick_no
        if <uint32_t>(now - self._rl_start) >= self._hub._rate_ticks:
            self._rl_start = now
            self._rl_msgs = 0
            self._rl_bytes = 0

    cdef bint _rate_message(self) except -1:
        """A message came: True when it is over the rate (dropped)."""
        if self._rl_msgs == RL_CLOSED:
            return True
        cdef uint32_t cap = self._hub._rate_msgs_cap
        if not cap:
            return False
        self._rate_window()
        self._rl_msgs += 1
        if self._rl_msgs > cap:
            self._rate_close("messages")
            return True
        return False

    cdef int _rate_bytes(self, Py_ssize_t n) except -1:
        """``n`` bytes were read: count them; past the window's allowance, close."""
        if self._rl_msgs == RL_CLOSED:
            return 0
        self._rate_window()
        cdef uint64_t total = <uint64_t>self._rl_bytes + <uint64_t>n
        self._rl_bytes = <uint32_t>total if total < 0xFFFFFFFF else 0xFFFFFFFF
        if total > self._hub._rate_bytes_cap:
            self._rate_close("bytes")
        return 0

    cdef int _rate_close(self, str kind) except -1:
        """Over the rate: counted, closed with errors.RATE_LIMITED; what the
        peer sends from now on is read (its close answer ends the
        connection) and its messages dropped."""
        cdef Hub hub = self._hub
        self._rl_msgs = RL_CLOSED
        hub.rate_limited[kind] = hub.rate_limited.get(kind, 0) + 1
        if self.state == S_OPEN and self._phase == P_OPEN:
            self._queue(self._start_close(_RATE_LIMITED.code, _RATE_LIMITED.reason))
            self._arm_close_timer()
        return 0

    cdef inline int _after_input(self) except -1:
        if self.state == S_CLOSED and self._phase == P_OPEN and self._end_mode == END_NONE:
            # close exchange finished, or protocol error: write what is queued
            # (the echo or the error close frame), then end the transport
            if self._errored:
                self._end_mode = END_LINGER
                self._arm_close_timer()
            else:
                self._end_mode = END_CLOSE
                self._hub._unschedule(self)
        cdef Hub hub
        if self._dirty:
            hub = self._hub
            if self._flush() and hub._read_ns:
                # a reply, from the read that brought it
                hub._observe(self._lat_slot, _now_ns() - hub._read_ns)
        elif self._end_mode != END_NONE:
            self._end_transport()
        return 0

    cdef int _end_transport(self) except -1:
        cdef object t = self.transport
        if t is None:
            return 0
        if self._end_mode == END_CLOSE:
            t.close()
        elif self._end_mode == END_LINGER:
            self._end_mode = END_EOF_SENT
            if t.can_write_eof():
                t.write_eof()
            else:
                t.close()
        return 0

    cdef int _flush(self) except -1:
        """Write what is queued (unless held by the delivery policy); 1 if
        bytes were handed to the socket or the transport, else 0."""
        cdef int wrote = 0
        self._dirty = False
        if self._wpaused and self._end_mode == END_NONE:
            return 0      # held until resume_writing (see Hub's delivery policy)
        cdef object wq = self._wq
        cdef object t = self.transport
        cdef Py_ssize_t size = self._wq_size
        if wq is not None:
            self._wq = None
            self._wq_size = 0
            if t is not None:
                wrote = 1
                if COUNTERS:
                    self._hub.bytes_out += size
                if self._fd >= 0 and self._write_direct(wq, size):
                    pass                    # the kernel took it all
                elif type(wq) is bytes:
                    t.write(wq)
                elif size <= MAX_FLUSH_JOIN:
                    t.write(b"".join(wq))   # small frames: one contiguous buffer
                else:
                    t.writelines(wq)        # large ones: writev, no copy
        if self._end_mode != END_NONE:
            self._end_transport()
        return wrote

    cdef bint _write_direct(self, object wq, Py_ssize_t size) except -1:
        """Write ``wq`` with one send(2)/sendmsg(2) on the socket, skipping
        the transport's Python-level machinery, when the transport holds
        nothing of ours (so order is kept).  True if the kernel took every
        byte; otherwise the unwritten rest has been handed to the transport
        (which then owns flow control) and True is returned as well; False
        only when the direct path does not apply."""
        cdef Py_ssize_t n, i, cnt
        cdef iovec iov[64]
        cdef msghdr msg
        cdef bytes b
        if self._tpending:
            if self.transport.get_write_buffer_size():
                return False
            self._tpending = False
        if type(wq) is bytes:
            n = c_send(self._fd, PyBytes_AS_STRING(<bytes>wq), PyBytes_GET_SIZE(<bytes>wq),
                       MSG_DONTWAIT | MSG_NOSIGNAL)
        else:
            cnt = len(<list>wq)
            if cnt > 64:
                return False
            for i in range(cnt):
                b = <bytes>(<list>wq)[i]
                iov[i].iov_base = PyBytes_AS_STRING(b)
                iov[i].iov_len = PyBytes_GET_SIZE(b)
            memset(&msg, 0, sizeof(msg))
            msg.msg_iov = iov
            msg.msg_iovlen = <size_t>cnt
            n = c_sendmsg(self._fd, &msg, MSG_DONTWAIT | MSG_NOSIGNAL)
        if n == size:
            return True
        if n < 0:
            if errno != EAGAIN and errno != EWOULDBLOCK and errno != EINTR:
                # a dead socket: let the transport meet the error itself and
                # report connection_lost the usual way
                return False
            n = 0
        # partial write: the transport takes the rest and its flow control
        rest = wq if type(wq) is bytes else b"".join(wq)
        self.transport.write(rest[n:] if n else rest)
        self._tpending = True
        return True

    def _task_done(self, task):
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self._callback_failed(exc)

    cdef _callback_failed(self, exc):
        """An exception in user code: logged once, connection closed 1011."""
        handler = self._hub.on_callback_error
        if handler is not None:
            handler(self, exc)
        else:
            _log.error("fastws: exception in a callback", exc_info=exc)
        if self.state == S_OPEN and self._phase == P_OPEN:
            self._queue(self._start_close(_CALLBACK_FAILED.code, _CALLBACK_FAILED.reason))
            self._arm_close_timer()

    cdef _call_open(self):
        route = self.route
        try:
            res = route.on_open(self)
            if route.open_is_async:
                task = self._hub.loop.create_task(res)
                task.add_done_callback(self._task_done)
        except Exception as exc:
            self._callback_failed(exc)

    cdef _call_disconnect(self):
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

    cdef _arm_close_timer(self):
        if self._due_kind != T_CLOSE and self._hub.close_timeout > 0:
            self._hub._schedule(self, self._hub.close_timeout, T_CLOSE)

    cdef _timer_fired(self):
        """The wheel reached this connection's due tick."""
        cdef Hub hub = self._hub
        cdef int kind = self._due_kind
        self._due_kind = T_NONE
        if self.transport is None:
            return
        if kind == T_HANDSHAKE:
            if self._phase == P_HANDSHAKE and self._head:
                hub.handshake_timeouts += 1
                self.reject_upgrade(_REQUEST_TIMEOUT)   # part of a head came, slowly (slowloris)
            elif self._phase == P_HANDSHAKE or self._phase == P_DECIDING:
                hub.handshake_timeouts += 1
                self.transport.abort()     # silent client, or no decision in time
            return
        if kind == T_BODY:
            if self._phase == P_DECIDING and self._body_cb is not None:
                hub.body_timeouts += 1
                self._body_cb = None
                self.reject_upgrade(_REQUEST_TIMEOUT)   # the request body did not come in time
            return
        if kind == T_CLOSE:
            self.transport.abort()         # the peer never answered our close
            return
        if self._phase != P_OPEN or self.state != S_OPEN:
            return
        cdef long now = hub._tick_no
        if hub.idle_timeout > 0 and (now - self._msg_tick) * hub.tick >= hub.idle_timeout:
            if self._input_waiting():
                hub._schedule(self, hub.tick, kind)   # read what came first (see _input_waiting)
                return
            hub.idle_timeouts += 1
            self.close(_IDLE_TIMEOUT.code, _IDLE_TIMEOUT.reason)
            return
        if kind == T_PONG:
            if self._rx_tick >= self._ping_tick:
                self._schedule_heartbeat()   # alive: the pong (or data) came
            elif self._input_waiting():
                hub._schedule(self, hub.tick, T_PONG)
            else:
                hub.ping_timeouts += 1
                self.close(_PING_TIMEOUT.code, _PING_TIMEOUT.reason)
            return
        # T_PING: ping only a connection that has been quiet for an interval
        if hub.ping_interval > 0 and (now - self._rx_tick) * hub.tick >= hub.ping_interval * 0.999:
            self._ping_tick = now          # anything read from now on is proof of life
            self._queue(_encode_bytes(OP_PING, _EMPTY))
            hub._schedule(self, hub.ping_timeout, T_PONG)
        else:
            self._schedule_heartbeat()

    cdef bint _input_waiting(self):
        """Bytes from the peer wait unread in the socket while reading is on.

        The wheel's tick can run before the read of what arrived while the
        loop was blocked (a long handler, a broadcast to a huge room): a
        pong that came in time would then count as missing.  A deadline
        that finds input waiting is checked again one tick later, after the
        loop has read it.  Not while reading is paused: then the input
        cannot be read, and the deadline holds."""
        cdef int fd = self._fd
        cdef int n = 0
        transport = self.transport
        if transport is None:
            return False
        try:
            if not transport.is_reading():
                return False
            if fd < 0:
                sock = transport.get_extra_info("socket")
                if sock is None:
                    return False
                fd = sock.fileno()
        except Exception:
            return False
        if fd < 0 or c_ioctl(fd, FIONREAD, &n) != 0:
            return False
        return n > 0

    cdef _schedule_heartbeat(self):
        cdef Hub hub = self._hub
        cdef double d = hub.ping_interval
        if hub.idle_timeout > 0 and (d <= 0 or hub.idle_timeout < d):
            d = hub.idle_timeout
        if d > 0:
            hub._schedule(self, d, T_PING)
        else:
            hub._unschedule(self)

    # ---------------------------------------------------------- public API

    def send(self, message):
        """Queue ``message`` (str: text frame; bytes: binary frame).  It is
        written with everything else queued in this loop iteration.
        Raises ConnectionClosed once the connection is closing or closed."""
        if self.state != S_OPEN or self._phase != P_OPEN:
            self._raise_closed()
        if COUNTERS:
            self._hub.messages_out += 1
        if (type(message) is bytes and PyBytes_GET_SIZE(message) >= SPLIT_SEND_MIN
                and self._deflate_params is None):
            # large binary: header and payload go out by writev, no copy
            self._queue(_encode_header(OP_BINARY, PyBytes_GET_SIZE(message)))
            self._queue(<bytes>message)
            return
        self._queue(self._frame_message(message))

    def send_frame(self, bytes frame):
        """Queue an already encoded frame (see ``encode_frame``)."""
        if self.state != S_OPEN or self._phase != P_OPEN:
            self._raise_closed()
        self._queue(frame)

    def ping(self, payload=b""):
        """Queue a ping frame."""
        self._queue(Engine.ping(self, payload))

    def close(self, int code=1000, str reason=""):
        """Start the closing handshake; the transport closes when the peer
        answers, or after ``close_timeout`` seconds.  No-op when closed."""
        if self.state != S_OPEN or self._phase != P_OPEN:
            return
        self._queue(self._start_close(code, reason))
        self._arm_close_timer()

    def join(self, room, namespace=None, batch=False):
        """Join ``room`` (in the route's namespace unless given); ``batch``:
        receive the room's batch envelope when it batches (fastws.rooms)."""
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
        (``"<n>"`` on a hub without a node id); None before the upgrade.
        Built on each access from the hub's node id and ``number``."""
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
        """Bytes sent on this connection that the kernel has not taken yet:
        fastws's own queue plus the transport's buffer.  A sender of many
        messages (a replay) waits while it is over ``hub.high_water``."""
        cdef Py_ssize_t n = self._wq_size
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

    @property
    def closed(self):
        return self.state != S_OPEN or self._phase != P_OPEN

    def __repr__(self):
        return f"<fastws.Connection id={self.id} path={self.path!r} state={self.state}>"


def _log_task_error(task):
    if not task.cancelled() and task.exception() is not None:
        _log.error("fastws: exception in a callback", exc_info=task.exception())
