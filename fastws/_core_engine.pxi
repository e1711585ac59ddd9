# Part of fastws/_core.pyx (included there, in order): the sans-I/O frame engine (Engine).

# ---------------------------------------------------------------- engine

cdef class Engine:
    """Sans-I/O RFC 6455 engine, server side (or client side with
    ``client=True``).  See ``fastws/core.py``."""

    # -- receive state (fields are owned by the engine) --
    cdef public int state              # EngineState
    cdef bint _client                  # client role: frames out masked, frames in unmasked
                                       # (declared here: it fills the padding after state)
    cdef public object close_code      # int once the close is known, else None
    cdef public object close_reason    # str once known
    cdef int _fstate                   # FrameState
    cdef uint8_t _hdr[HDR_MAX]         # a header cut by a read boundary
    cdef int _hdr_len                  # bytes of it held in _hdr
    cdef int _opcode                   # opcode of the frame being read
    cdef bint _fin
    cdef bint _rsv1                    # compressed message (permessage-deflate)
    cdef uint8_t _mask[4]
    cdef uint64_t _flen                # payload length of the current frame
    cdef uint64_t _fpos                # payload bytes of it consumed so far
    cdef uint64_t _wire_len            # payload bytes of the open message as sent
                                       # (compressed size), frame headers summed
    cdef int _msg_opcode               # TEXT/BINARY while a message is open, else 0
    cdef bint _msg_compressed
    cdef uint32_t _utf8                # incremental UTF-8 DFA state for the message
    cdef uint8_t* _mbuf                # message (or control payload) accumulation
    cdef Py_ssize_t _mlen, _mcap
    cdef bint _direct                  # _mbuf is the storage of _mobj (not malloc'd)
    cdef object _mobj                  # bytes being filled in direct mode, else None
    cdef Py_ssize_t _ctrl_start        # where the control payload starts in _mbuf
    # -- limits --
    cdef public Py_ssize_t max_message_size    # 0 = unlimited
    cdef public Py_ssize_t max_frame_size      # 0 = unlimited
    # -- permessage-deflate (None when not negotiated) --
    cdef object _deflate_params
    cdef object _inflater
    cdef object _deflater
    # -- output and events for the Python-level interface --
    cdef list _out                     # frames queued by the engine itself
    cdef list _events                  # events collected by receive()
    cdef int _sent_code                # the code of the close frame we sent, 0 if none
    cdef str _sent_reason

    def __cinit__(self):
        self._mbuf = NULL
        self.close_code = None
        self.close_reason = None

    def __init__(self, *, max_message_size=1 << 20, max_frame_size=0, deflate=None,
                 bint client=False):
        self.max_message_size = max_message_size
        self.max_frame_size = max_frame_size
        self._client = client
        self._set_deflate(deflate)

    @property
    def client(self):
        """True for the client role (see ``fastws/core.py``)."""
        return self._client

    def __dealloc__(self):
        if self._mbuf != NULL and not self._direct:
            PyMem_Free(self._mbuf)
        self._mbuf = NULL

    cdef _set_deflate(self, object params):
        self._deflate_params = params
        self._inflater = None
        self._deflater = None

    # ---------------------------------------------------------- hooks
    # Subclasses (Connection) override these to act instead of collecting.

    cdef int _on_message(self, int opcode, object payload) except -1:
        self._events.append((opcode, payload))
        return 0

    cdef int _on_event(self, tuple event) except -1:
        self._events.append(event)
        return 0

    cdef int _queue(self, bytes frame) except -1:
        if self._out is None:
            self._out = [frame]
        else:
            self._out.append(frame)
        return 0

    # ---------------------------------------------------------- Python API

    def receive(self, data):
        """Feed bytes from the peer; return the list of events they complete."""
        self._events = []
        cdef bytearray buf = bytearray(data)   # writable copy: unmasked in place
        if len(buf):
            self._feed(<uint8_t*><char*>buf, len(buf))
        ev = self._events
        self._events = None
        return ev

    def data_to_send(self):
        """Bytes the engine queued itself (pongs, close echo, error close)."""
        if not self._out:
            return _EMPTY
        out = b"".join(self._out)
        self._out = None
        return out

    def send(self, message):
        """Frame ``message``: str as text, bytes-like as binary."""
        if self.state != S_OPEN:
            self._raise_closed()
        return self._frame_message(message)

    def encode_message(self, int opcode, payload):
        """The frame of one whole message of ``opcode`` (TEXT or BINARY)
        around ``payload``, bytes already encoded (a text payload is trusted
        to be UTF-8: nothing is decoded); compressed with deflate."""
        if self.state != S_OPEN:
            self._raise_closed()
        if opcode != OP_TEXT and opcode != OP_BINARY:
            raise ValueError(f"opcode {opcode} is not TEXT or BINARY")
        cdef bytes data = payload if type(payload) is bytes else bytes(payload)
        return self._frame_payload(opcode, data)

    def ping(self, payload=b""):
        if self.state != S_OPEN:
            self._raise_closed()
        payload = bytes(payload)
        if len(payload) > 125:
            raise ValueError("ping payload is limited to 125 bytes")
        return self._frame_bytes(OP_PING, payload)

    def close(self, int code=1000, str reason=""):
        """Start the closing handshake; returns the close frame to send.
        1005 sends an empty close frame (no reason allowed); otherwise the
        code must be one a peer may receive.  The reason is cut to 123 bytes
        of UTF-8 on a character boundary."""
        if self.state != S_OPEN:
            self._raise_closed()
        return self._start_close(code, reason)

    @property
    def sent_close(self):
        """(code, reason) of the close frame ``close()`` produced, or None."""
        if self._sent_code:
            return (self._sent_code, self._sent_reason or "")
        return None

    cdef _raise_closed(self):
        if self.close_code is not None:
            raise _ConnectionClosed(self.close_code, self.close_reason or "")
        if self._sent_code:
            raise _ConnectionClosed(self._sent_code, self._sent_reason or "")
        raise _ConnectionClosed(1006, "")

    # ---------------------------------------------------------- internals

    cdef bytes _start_close(self, int code, str reason):
        cdef bytes r
        if code == 1005:
            if reason:
                raise ValueError("a close frame without a code has no reason")
        elif not _valid_close_code(code):
            raise ValueError(f"{code} is not a close code that can be sent")
        if reason:
            r = reason.encode("utf-8")
            if len(r) > 123:
                reason = r[:123].decode("utf-8", "ignore")
        self.state = S_CLOSING
        self._sent_code = code
        self._sent_reason = reason
        return self._frame_bytes(OP_CLOSE, _close_payload(code, reason))

    cdef inline bytes _frame_bytes(self, int opcode, bytes payload):
        """One whole (FIN) frame of ``opcode`` around ``payload``, as this
        side sends it: masked with a fresh key in the client role."""
        return _encode(opcode, <const uint8_t*>PyBytes_AS_STRING(payload),
                       PyBytes_GET_SIZE(payload), True,
                       _next_mask() if self._client else NULL, False)

    cdef bytes _frame_message(self, object message):
        cdef bytes data
        cdef int opcode
        if type(message) is str:
            data = (<str>message).encode("utf-8")
            opcode = OP_TEXT
        elif type(message) is bytes:
            data = <bytes>message
            opcode = OP_BINARY
        elif isinstance(message, (bytearray, memoryview)):
            data = bytes(message)
            opcode = OP_BINARY
        else:
            raise TypeError(f"message must be str or bytes, not {type(message).__name__}")
        return self._frame_payload(opcode, data)

    cdef inline bytes _frame_payload(self, int opcode, bytes data):
        """One whole message frame around encoded ``data`` (compressed with deflate)."""
        if self._deflate_params is not None:
            return self._compress(opcode, data)
        return _encode(opcode, <const uint8_t*>PyBytes_AS_STRING(data),
                       PyBytes_GET_SIZE(data), True,
                       _next_mask() if self._client else NULL, False)

    cdef bytes _compress(self, int opcode, bytes data):
        """The compressed frame of a whole message: with the server's
        parameters (window, no_context_takeover) on the server side, the
        client's on the client side."""
        p = self._deflate_params
        # zlib cannot deflate with a raw 8-bit window; 9 is what it uses
        cdef int bits = max(9, p.client_max_window_bits if self._client else p.server_max_window_bits)
        if p.client_no_context_takeover if self._client else p.server_no_context_takeover:
            # every message on its own: the shared compressor of this window
            # size, emptied by a full flush (no memory kept per connection)
            deflater = _SHARED_DEFLATERS.get(bits)
            if deflater is None:
                deflater = _SHARED_DEFLATERS[bits] = _zlib.compressobj(
                    _zlib.Z_DEFAULT_COMPRESSION, _zlib.DEFLATED, -bits)
            out = deflater.compress(data) + deflater.flush(_zlib.Z_FULL_FLUSH)
        else:
            if self._deflater is None:
                self._deflater = _zlib.compressobj(_zlib.Z_DEFAULT_COMPRESSION, _zlib.DEFLATED, -bits)
            out = self._deflater.compress(data) + self._deflater.flush(_zlib.Z_SYNC_FLUSH)
        if out.endswith(_DEFLATE_TAIL):
            out = out[:len(out) - 4]
        return _encode(opcode, <const uint8_t*>PyBytes_AS_STRING(out),
                       PyBytes_GET_SIZE(out), True,
                       _next_mask() if self._client else NULL, True)

    cdef int _fail(self, int code, str detail) except -1:
        """The one place a protocol violation turns into a close frame."""
        if self.state == S_OPEN:
            self._queue(self._frame_bytes(OP_CLOSE, _close_payload(code, _CLOSE_REASONS.get(code, ""))))
        self.state = S_CLOSED
        if self.close_code is None:
            self.close_code = code
            self.close_reason = _CLOSE_REASONS.get(code, "")   # what went on the wire
        self._release_message()
        self._on_event((EV_ERROR, code, detail))
        return 0

    cdef void _release_message(self) noexcept:
        if self._direct:
            self._direct = False
            self._mobj = None
        elif self._mbuf != NULL:
            PyMem_Free(self._mbuf)
        self._mbuf = NULL
        self._mlen = 0
        self._mcap = 0

    cdef int _reserve(self, Py_ssize_t extra) except -1:
        cdef Py_ssize_t need = self._mlen + extra
        cdef Py_ssize_t cap
        cdef uint8_t* nb
        if need <= self._mcap:
            return 0
        if self._direct:  # sized exactly from the header: cannot happen
            raise AssertionError("direct message buffer overflow")
        cap = self._mcap * 2 if self._mcap else 256
        if cap < need:
            cap = need
        nb = <uint8_t*>PyMem_Realloc(self._mbuf, cap)
        if nb == NULL:
            raise MemoryError()
        self._mbuf = nb
        self._mcap = cap
        return 0

    cdef int _append(self, const uint8_t* p, Py_ssize_t n) except -1:
        if n:
            self._reserve(n)
            memcpy(self._mbuf + self._mlen, p, n)
            self._mlen += n
        return 0

    cdef int _feed(self, uint8_t* p, Py_ssize_t n) except -1:
        """Parse ``n`` bytes at ``p`` (unmasked in place).  Stops at CLOSED."""
        cdef Py_ssize_t pos = 0
        cdef Py_ssize_t avail, take, hl
        cdef uint8_t* h
        cdef object payload
        while pos < n:
            if self.state == S_CLOSED:
                return 0
            if self._fstate == F_HEADER:
                avail = n - pos
                if self._hdr_len == 0 and avail >= 2:
                    h = p + pos
                    hl = _header_size(h)
                    if avail >= hl:
                        # whole header in this read: check and parse it in place
                        if (self._check_start(h) < 0 or self._check_length(h) < 0
                                or self._check_frame(h) < 0):
                            return 0
                        pos += hl
                        # fast path: the whole unfragmented, uncompressed data
                        # frame is in this read, no message is open
                        if (self._fin and self._msg_opcode == 0 and not self._rsv1
                                and (self._opcode == OP_TEXT or self._opcode == OP_BINARY)
                                and <uint64_t>(n - pos) >= self._flen):
                            take = <Py_ssize_t>self._flen
                            if not self._client:
                                _unmask(p + pos, take, self._mask, 0)
                            if self._opcode == OP_TEXT:
                                try:
                                    payload = PyUnicode_DecodeUTF8(<char*>(p + pos), take, NULL)
                                except UnicodeDecodeError:
                                    self._fail(1007, "invalid UTF-8 in text message")
                                    return 0
                            else:
                                payload = PyBytes_FromStringAndSize(<char*>(p + pos), take)
                            pos += take
                            self._on_message(self._opcode, payload)
                            continue
                        self._begin_payload()
                        continue
                # a header cut by the read boundary: collect it in _hdr, with
                # each check made as soon as the bytes it needs are in
                self._hdr[self._hdr_len] = p[pos]
                self._hdr_len += 1
                pos += 1
                if self._hdr_len < 2:
                    continue
                if self._hdr_len == 2 and self._check_start(self._hdr) < 0:
                    return 0
                if self._hdr_len == _length_size(self._hdr) and self._check_length(self._hdr) < 0:
                    return 0
                if self._hdr_len == _header_size(self._hdr):
                    self._hdr_len = 0
                    if self._check_frame(self._hdr) < 0:
                        return 0
                    self._begin_payload()
                continue
            # F_PAYLOAD
            take = n - pos
            if <uint64_t>take > self._flen - self._fpos:
                take = <Py_ssize_t>(self._flen - self._fpos)
            if self._consume_payload(p + pos, take) < 0:
                return 0
            pos += take
            if self._fpos == self._flen:
                self._fstate = F_HEADER
                self._end_frame()
        return 0

    # Header checks, in three stages, each run as soon as its bytes are in
    # (the order the wsproto engine documents; the differential test holds
    # both to it).  Each returns -2 after _fail() when the frame is refused.

    cdef int _check_start(self, const uint8_t* h) except -1:
        """Stage 1, the first two bytes: opcode and control-frame rules."""
        cdef int opcode = h[0] & 0x0F
        cdef bint control = opcode >= 8
        if opcode > 2 and opcode < 8 or opcode > 10:
            self._fail(1002, "unknown opcode %d" % opcode)
            return -2
        if control and not (h[0] & 0x80):
            self._fail(1002, "fragmented control frame")
            return -2
        if control and (h[1] & 0x7F) > 125:
            self._fail(1002, "control frame payload over 125 bytes")
            return -2
        return 0

    cdef int _check_length(self, const uint8_t* h) except -1:
        """Stage 2, extended length read: minimal encoding, RSV bits, mask."""
        cdef uint64_t ln = h[1] & 0x7F
        cdef int i, opcode = h[0] & 0x0F
        if ln == 126:
            ln = (<uint64_t>h[2] << 8) | h[3]
            if ln < 126:
                self._fail(1002, "16-bit length used for a payload under 126 bytes")
                return -2
        elif ln == 127:
            ln = 0
            for i in range(8):
                ln = (ln << 8) | h[2 + i]
            if ln >> 63:
                self._fail(1002, "payload length with the most significant bit set")
                return -2
            if ln < 65536:
                self._fail(1002, "64-bit length used for a payload under 65536 bytes")
                return -2
        if h[0] & 0x30:
            self._fail(1002, "reserved bits set")
            return -2
        if h[0] & 0x40:
            if self._deflate_params is None:
                self._fail(1002, "RSV1 set without a negotiated extension")
                return -2
            if opcode >= 8 or opcode == OP_CONT:
                self._fail(1002, "RSV1 set on a control or continuation frame")
                return -2
        if self._client:
            if h[1] & 0x80:
                self._fail(1002, "masked server frame")
                return -2
        elif not (h[1] & 0x80):
            self._fail(1002, "unmasked client frame")
            return -2
        return 0

    cdef int _check_frame(self, const uint8_t* h) except -1:
        """Stage 3, masking key read: fragment sequence and size limits; then
        set the frame up.

        The limits are checked on the lengths the headers declare, before
        any payload is stored: the frame's length against max_frame_size,
        the message's total so far against max_message_size.  A compressed
        message is held to the same limits on its compressed size, with
        deflate's worst-case overhead on top (``_deflate_bound``); its
        inflated size is checked again as it is inflated (``_inflate``)."""
        cdef int opcode = h[0] & 0x0F
        cdef uint64_t ln = h[1] & 0x7F
        cdef int off = 2
        cdef int i
        cdef bint compressed
        cdef uint64_t base = 0, limit
        if ln == 126:
            ln = (<uint64_t>h[2] << 8) | h[3]
            off = 4
        elif ln == 127:
            ln = 0
            for i in range(8):
                ln = (ln << 8) | h[2 + i]
            off = 10
        if opcode < 8:
            if opcode == OP_CONT:
                if self._msg_opcode == 0:
                    self._fail(1002, "continuation frame without a message to continue")
                    return -2
            elif self._msg_opcode != 0:
                self._fail(1002, "new data frame inside a fragmented message")
                return -2
            compressed = (h[0] & 0x40) != 0 or (opcode == OP_CONT and self._msg_compressed)
            if opcode == OP_CONT:
                base = self._wire_len
            if self.max_frame_size:
                limit = <uint64_t>self.max_frame_size
                if compressed:
                    limit = _deflate_bound(limit)
                if ln > limit:
                    self._fail(1009, "frame of %d bytes over max_frame_size" % ln)
                    return -2
            if self.max_message_size:
                limit = <uint64_t>self.max_message_size
                if compressed:
                    limit = _deflate_bound(limit)
                if base > limit or ln > limit - base:
                    self._fail(1009, "compressed message over max_message_size" if compressed
                               else "message over max_message_size")
                    return -2
            self._wire_len = base + ln
        if not self._client:         # a server frame has no key (nothing to read at h + off)
            memcpy(self._mask, h + off, 4)
        self._opcode = opcode
        self._fin = (h[0] & 0x80) != 0
        self._rsv1 = (h[0] & 0x40) != 0
        self._flen = ln
        self._fpos = 0
        return 0

    cdef int _begin_payload(self) except -1:
        """After a header: open the message for a first data frame, then
        either read the payload or (empty frame) finish at once."""
        if self._opcode == OP_TEXT or self._opcode == OP_BINARY:
            self._msg_opcode = self._opcode
            self._msg_compressed = self._rsv1
            self._utf8 = UTF8_ACCEPT
            self._mlen = 0
        if self._opcode >= 8:
            self._ctrl_start = self._mlen
        elif (self._fin and self._opcode != OP_CONT and not self._msg_compressed
                and self._flen >= DIRECT_MIN and self._flen <= DIRECT_MAX and
                (not self.max_message_size or self._flen <= <uint64_t>self.max_message_size)):
            # a single-frame message: fill its final bytes object directly
            # (never more than DIRECT_MAX on the header's word alone: with no
            # size limit, a bigger frame grows its buffer as payload arrives)
            self._release_message()
            self._mobj = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>self._flen)
            self._mbuf = <uint8_t*>PyBytes_AS_STRING(self._mobj)
            self._mcap = <Py_ssize_t>self._flen
            self._direct = True
        elif not self._msg_compressed:
            # reserve up front part of what the header declares; the rest
            # grows by doubling as the payload really arrives
            self._reserve(<Py_ssize_t>(self._flen if self._flen < RESERVE_MAX else RESERVE_MAX))
        if self._flen == 0:
            self._fstate = F_HEADER
            self._end_frame()
        else:
            self._fstate = F_PAYLOAD
        return 0

    cdef int _consume_payload(self, uint8_t* p, Py_ssize_t n, bint in_place=False) except -1:
        """Unmask and check ``n`` payload bytes at ``p``; append them to the
        message unless they were read there already (``in_place``).
        Compressed payload is inflated as it arrives, never stored."""
        if not self._client:
            _unmask(p, n, self._mask, <uint32_t>(self._fpos & 3))
        self._fpos += n
        if self._opcode < 8 and self._msg_compressed:
            return self._inflate(p, n, self._fin and self._fpos == self._flen)
        if self._opcode < 8 and self._msg_opcode == OP_TEXT:
            self._utf8 = _utf8_run(self._utf8, p, n)
            if self._utf8 == UTF8_REJECT:
                self._fail(1007, "invalid UTF-8 in text message")
                return -2
        if in_place:
            self._mlen += n
        else:
            self._append(p, n)
        return 0

    cdef int _end_frame(self) except -1:
        cdef object payload
        cdef int opcode = self._opcode
        if opcode >= 8:
            payload = PyBytes_FromStringAndSize(<char*>(self._mbuf + self._ctrl_start),
                                                self._mlen - self._ctrl_start)
            self._mlen = self._ctrl_start
            if self._msg_opcode == 0:
                self._release_message()
            return self._control(opcode, <bytes>payload)
        if self._msg_compressed and self._fin and self._flen == 0:
            # a last frame with no payload: only the RFC 7692 tail to inflate
            if self._inflate(NULL, 0, True) < 0:
                return 0
        if not self._fin:
            return 0
        # message complete
        opcode = self._msg_opcode
        self._msg_opcode = 0
        if opcode == OP_TEXT:
            if self._utf8 != UTF8_ACCEPT:
                self._fail(1007, "text message ends inside a UTF-8 sequence")
                return 0
            payload = PyUnicode_DecodeUTF8(<char*>self._mbuf, self._mlen, NULL) if self._mlen else ""
        elif self._direct:
            payload = self._mobj
        else:
            payload = PyBytes_FromStringAndSize(<char*>self._mbuf, self._mlen) if self._mlen else _EMPTY
        self._release_message()
        self._on_message(opcode, payload)
        return 0

    cdef int _inflate(self, const uint8_t* p, Py_ssize_t n, bint last) except -1:
        """Inflate ``n`` compressed payload bytes at ``p`` and append the
        output to the message; ``last``: they end the message, so the RFC
        7692 tail goes in after them.  With a size limit, zlib is asked for
        at most what remains of max_message_size plus one byte, so a zip
        bomb is never inflated past the limit: the extra byte is a 1009."""
        params = self._deflate_params
        cdef Py_ssize_t size = n + 4 if last else n
        cdef bytes data = PyBytes_FromStringAndSize(NULL, size)
        cdef uint8_t* d = <uint8_t*>PyBytes_AS_STRING(data)
        if n:
            memcpy(d, p, n)
        if last:
            memcpy(d + n, <const char*>_DEFLATE_TAIL, 4)
        if self._inflater is None:
            # the peer compresses: the client's window on the server side, the server's on the client side
            self._inflater = _zlib.decompressobj(
                -(params.server_max_window_bits if self._client else params.client_max_window_bits))
        cdef bint limited = self.max_message_size != 0
        cdef Py_ssize_t room = self.max_message_size - self._mlen if limited else 0
        try:
            if limited:
                out = self._inflater.decompress(data, room + 1)
            else:
                out = self._inflater.decompress(data)
        except _zlib.error as exc:
            self._fail(1007, "invalid deflate data: %s" % exc)
            return -2
        if limited and (len(out) > room or self._inflater.unconsumed_tail):
            self._fail(1009, "decompressed message over max_message_size")
            return -2
        if self._msg_opcode == OP_TEXT and len(out):
            self._utf8 = _utf8_run(self._utf8, <const uint8_t*>PyBytes_AS_STRING(out), len(out))
            if self._utf8 == UTF8_REJECT:
                self._fail(1007, "invalid UTF-8 in text message")
                return -2
        self._append(<const uint8_t*>PyBytes_AS_STRING(out), len(out))
        if last and ((params.server_no_context_takeover if self._client
                      else params.client_no_context_takeover) or self._inflater.eof):
            # eof: the peer ended its deflate stream (a final block); the
            # next message starts a new one
            self._inflater = None
        return 0

    cdef int _control(self, int opcode, bytes payload) except -1:
        cdef int code
        cdef str reason
        if opcode == OP_PING:
            # answered while CLOSING too: only a *received* close ends pongs
            self._queue(self._frame_bytes(OP_PONG, payload))
            self._on_event((OP_PING, payload))
        elif opcode == OP_PONG:
            self._on_event((OP_PONG, payload))
        else:
            n = len(payload)
            if n == 0:
                code = 1005
                reason = ""
            elif n == 1:
                self._fail(1002, "close frame with a 1-byte payload")
                return 0
            else:
                code = (payload[0] << 8) | payload[1]
                if not _valid_close_code(code):
                    self._fail(1002, "invalid close code %d" % code)
                    return 0
                try:
                    reason = payload[2:].decode("utf-8")
                except UnicodeDecodeError:
                    self._fail(1007, "invalid UTF-8 in close reason")
                    return 0
            if self.state == S_OPEN:
                self._queue(self._frame_bytes(OP_CLOSE, _close_payload(code, "")))
            self.state = S_CLOSED
            if self.close_code is None:
                self.close_code = code
                self.close_reason = reason
            self._release_message()
            self._on_event((OP_CLOSE, code, reason))
        return 0
