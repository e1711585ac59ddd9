# cython: language_level=3
"""fastws hot path: the RFC 6455 frame engine and the connection protocol.

Two layers live here, and only the second one touches a transport:

* ``Engine``: sans-I/O, server side.  Bytes in, events and bytes-to-send out.
  Its Python interface is the contract written in ``fastws/core.py``; the
  wsproto-backed twin in ``fastws/_wsproto_engine.py`` implements the same one
  and every protocol test runs against both.
* ``Connection(Engine)``: the ``asyncio.BufferedProtocol`` that uvloop drives.
  It moves bytes between the transport and the engine, runs the opening
  handshake (``fastws/handshake.py`` decides), dispatches messages to the
  route's callbacks and coalesces writes: one write per connection per loop
  iteration, whatever the number of frames queued in it.

Theory of operation of the receive buffer
-----------------------------------------
All connections of a process read into ONE shared buffer (``_READ_BUFFER``,
256 KiB), handed to the transport by ``get_buffer``.  That is safe because the
loop calls ``get_buffer``, reads, then ``buffer_updated`` synchronously, and
``buffer_updated`` consumes every byte before it returns: nothing refers to
the shared buffer afterwards.  So an idle connection owns no read buffer.

The parser is a streaming state machine, so a frame never has to be
contiguous in memory:

* a frame header (2 to 14 bytes) cut by a read boundary is kept in the
  engine's fixed 14-byte ``_hdr`` array until it is complete;
* payload bytes are unmasked in place in the shared buffer (a machine word at
  a time) as they arrive, UTF-8-checked incrementally for text, and appended
  to the message buffer ``_mbuf`` (malloc'd, grown by doubling up to the
  declared size, freed when the message is delivered: it exists only while a
  message is incomplete);
* the common case, a whole unfragmented frame inside one read, skips ``_mbuf``
  entirely: the ``bytes``/``str`` handed to the application is built straight
  from the shared buffer.

Worst case per connection: 14 header bytes + one message buffer of at most
``max_message_size`` (the size limits are checked from the frame header,
before any payload is buffered).  Everything handed to user code is an owned
``bytes`` or ``str``; nothing borrows the shared buffer past the callback.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_DecodeUTF8, PyUnicode_DecodeASCII
from cpython.mem cimport PyMem_Malloc, PyMem_Realloc, PyMem_Free
from cpython.buffer cimport PyBuffer_FillInfo

cdef extern from "Python.h":
    void PyObject_GC_UnTrack(object)
from libc.string cimport memcpy, memcmp, memset
from libc.errno cimport errno, EAGAIN, EINTR

cdef extern from "<errno.h>":
    int EWOULDBLOCK
from posix.uio cimport iovec

cdef extern from "<sys/socket.h>" nogil:
    # send(2)/sendmsg(2) rather than write(2)/writev(2): on a socket they skip
    # the VFS layer (file position lock, vfs_writev), a few percent of a
    # fan-out's kernel time
    struct msghdr:
        void* msg_name
        unsigned int msg_namelen
        iovec* msg_iov
        size_t msg_iovlen
        void* msg_control
        size_t msg_controllen
        int msg_flags
    ssize_t c_send "send"(int fd, const void* buf, size_t n, int flags)
    ssize_t c_sendmsg "sendmsg"(int fd, const msghdr* msg, int flags)
    int MSG_DONTWAIT
    int MSG_NOSIGNAL
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

import logging as _logging
import zlib as _zlib

from .errors import (CLOSE_REASONS as _CLOSE_REASONS, ConnectionClosed, HandshakeError,
                     CALLBACK_FAILED as _CALLBACK_FAILED, SLOW_CONSUMER as _SLOW_CONSUMER,
                     PING_TIMEOUT as _PING_TIMEOUT, IDLE_TIMEOUT as _IDLE_TIMEOUT)
from .handshake import error_response as _error_response

_log = _logging.getLogger("fastws")

# ---------------------------------------------------------------- handshake C helpers
# SHA-1 (FIPS 180-4) and base64 for Sec-WebSocket-Accept, so the common
# upgrade is answered without a Python call; checked against hashlib in
# tests/unit/test_handshake.py.
cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    static inline uint32_t fastws_rol(uint32_t x, int n) { return (x << n) | (x >> (32 - n)); }
    static void fastws_sha1_block(uint32_t h[5], const unsigned char *p) {
        uint32_t w[80], a, b, c, d, e, t;
        int i;
        for (i = 0; i < 16; i++)
            w[i] = ((uint32_t)p[4*i] << 24) | ((uint32_t)p[4*i+1] << 16) | ((uint32_t)p[4*i+2] << 8) | p[4*i+3];
        for (i = 16; i < 80; i++)
            w[i] = fastws_rol(w[i-3] ^ w[i-8] ^ w[i-14] ^ w[i-16], 1);
        a = h[0]; b = h[1]; c = h[2]; d = h[3]; e = h[4];
        for (i = 0; i < 80; i++) {
            uint32_t f, k;
            if (i < 20)      { f = (b & c) | (~b & d);          k = 0x5A827999u; }
            else if (i < 40) { f = b ^ c ^ d;                   k = 0x6ED9EBA1u; }
            else if (i < 60) { f = (b & c) | (b & d) | (c & d); k = 0x8F1BBCDCu; }
            else             { f = b ^ c ^ d;                   k = 0xCA62C1D6u; }
            t = fastws_rol(a, 5) + f + e + k + w[i];
            e = d; d = c; c = fastws_rol(b, 30); b = a; a = t;
        }
        h[0] += a; h[1] += b; h[2] += c; h[3] += d; h[4] += e;
    }
    /* SHA-1 of msg (len < 2^32 bytes) into out[20] */
    static void fastws_sha1(const unsigned char *msg, size_t len, unsigned char out[20]) {
        uint32_t h[5] = {0x67452301u, 0xEFCDAB89u, 0x98BADCFEu, 0x10325476u, 0xC3D2E1F0u};
        unsigned char block[64];
        size_t i = 0, r;
        uint64_t bits = (uint64_t)len * 8;
        for (; i + 64 <= len; i += 64) fastws_sha1_block(h, msg + i);
        r = len - i;
        memcpy(block, msg + i, r);
        block[r++] = 0x80;
        if (r > 56) { memset(block + r, 0, 64 - r); fastws_sha1_block(h, block); r = 0; }
        memset(block + r, 0, 56 - r);
        for (i = 0; i < 8; i++) block[56 + i] = (unsigned char)(bits >> (56 - 8 * i));
        fastws_sha1_block(h, block);
        for (i = 0; i < 5; i++) {
            out[4*i] = (unsigned char)(h[i] >> 24); out[4*i+1] = (unsigned char)(h[i] >> 16);
            out[4*i+2] = (unsigned char)(h[i] >> 8); out[4*i+3] = (unsigned char)h[i];
        }
    }
    static const char fastws_b64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    /* base64 of 20 bytes: 28 characters (one '=' of padding) */
    static void fastws_b64_20(const unsigned char in[20], char out[28]) {
        int i, o = 0;
        for (i = 0; i < 18; i += 3) {
            uint32_t v = ((uint32_t)in[i] << 16) | ((uint32_t)in[i+1] << 8) | in[i+2];
            out[o++] = fastws_b64[v >> 18]; out[o++] = fastws_b64[(v >> 12) & 63];
            out[o++] = fastws_b64[(v >> 6) & 63]; out[o++] = fastws_b64[v & 63];
        }
        {
            uint32_t v = ((uint32_t)in[18] << 16) | ((uint32_t)in[19] << 8);
            out[o++] = fastws_b64[v >> 18]; out[o++] = fastws_b64[(v >> 12) & 63];
            out[o++] = fastws_b64[(v >> 6) & 63]; out[o++] = '=';
        }
    }
    """
    void fastws_sha1(const unsigned char* msg, size_t len, unsigned char* out) nogil
    void fastws_b64_20(const unsigned char* inp, char* out) nogil

# Frame-level counters (messages and bytes in/out, exported by fastws.metrics)
# are always on; FASTWS_NO_COUNTERS=1 at build time compiles them out, only
# to measure what counting costs (bench/counters.py).
cdef extern from *:
    """
    #ifndef FASTWS_COUNTERS
    #define FASTWS_COUNTERS 1
    #endif
    """
    const bint COUNTERS "FASTWS_COUNTERS"

cdef extern from "<string.h>":
    void* memmem(const void* haystack, size_t hl, const void* needle, size_t nl) nogil


# ---------------------------------------------------------------- constants

DEF HDR_MAX = 14
DEF DIRECT_MIN = 4096      # single-frame messages at least this big are read into
                           # their final bytes object (no reassembly copy)
DEF DIRECT_READ_MIN = 65536  # and the kernel reads straight into it past this
DEF SPLIT_SEND_MIN = 16384   # larger sends queue header and payload separately
DEF DIRECT_MAX = 67108864    # ... up to this size (a header alone never allocates more)
DEF RESERVE_MAX = 1048576    # otherwise reserve at most this much from a header

cdef enum:
    OP_CONT = 0x0
    OP_TEXT = 0x1
    OP_BINARY = 0x2
    OP_CLOSE = 0x8
    OP_PING = 0x9
    OP_PONG = 0xA
    EV_ERROR = 0x10

cdef enum EngineState:
    S_OPEN = 0
    S_CLOSING = 1      # we sent a close frame, waiting for the peer's
    S_CLOSED = 2       # close exchange finished, or protocol error

# Delivery priorities of published messages (fastws.delivery documents the policy).
cdef enum Priority:
    PRIO_LOW = 0       # dropped first, as soon as a connection's socket is backed up
    PRIO_NORMAL = 1    # dropped once the connection's own queue is half full
    PRIO_HIGH = 2      # never dropped; past the hard cap the connection is closed

cdef enum FrameState:
    F_HEADER = 0
    F_PAYLOAD = 1

CONT = OP_CONT
TEXT = OP_TEXT
BINARY = OP_BINARY
CLOSE = OP_CLOSE
PING = OP_PING
PONG = OP_PONG
ERROR = EV_ERROR
OPEN = S_OPEN
CLOSING = S_CLOSING
CLOSED = S_CLOSED
PRIORITY_LOW = PRIO_LOW
PRIORITY_NORMAL = PRIO_NORMAL
PRIORITY_HIGH = PRIO_HIGH

cdef bytes _EMPTY = b""
cdef bytes _DEFLATE_TAIL = b"\x00\x00\xff\xff"

# ---------------------------------------------------------------- UTF-8
# Incremental validator: the DFA of Bjoern Hoehrmann ("Flexible and
# Economical UTF-8 Decoder"), byte classes then transitions; state 0 accepts,
# state 1 rejects.  ASCII runs are skipped eight bytes at a time.

cdef uint8_t _UTF8_CLASS[256]
cdef uint8_t _UTF8_TRANS[108]

cdef void _init_utf8_tables():
    cdef int i
    for i in range(256):
        if i < 0x80:
            _UTF8_CLASS[i] = 0
        elif i < 0x90:
            _UTF8_CLASS[i] = 1
        elif i < 0xA0:
            _UTF8_CLASS[i] = 9
        elif i < 0xC0:
            _UTF8_CLASS[i] = 7
        elif i < 0xC2:
            _UTF8_CLASS[i] = 8
        elif i < 0xE0:
            _UTF8_CLASS[i] = 2
        elif i == 0xE0:
            _UTF8_CLASS[i] = 10
        elif i < 0xED:
            _UTF8_CLASS[i] = 3
        elif i == 0xED:
            _UTF8_CLASS[i] = 4
        elif i < 0xF0:
            _UTF8_CLASS[i] = 3
        elif i == 0xF0:
            _UTF8_CLASS[i] = 11
        elif i < 0xF4:
            _UTF8_CLASS[i] = 6
        elif i == 0xF4:
            _UTF8_CLASS[i] = 5
        else:
            _UTF8_CLASS[i] = 8
    # states are multiples of 12: 0 accept, 12 reject, 24.. intermediate
    cdef uint8_t trans[108]
    trans[:] = [
        0, 12, 24, 36, 60, 96, 84, 12, 12, 12, 48, 72,
        12, 12, 12, 12, 12, 12, 12, 12, 12, 12, 12, 12,
        12, 0, 12, 12, 12, 12, 12, 0, 12, 0, 12, 12,
        12, 24, 12, 12, 12, 12, 12, 24, 12, 24, 12, 12,
        12, 12, 12, 12, 12, 12, 12, 24, 12, 12, 12, 12,
        12, 24, 12, 12, 12, 12, 12, 12, 12, 24, 12, 12,
        12, 12, 12, 12, 12, 12, 12, 36, 12, 36, 12, 12,
        12, 36, 12, 12, 12, 12, 12, 36, 12, 36, 12, 12,
        12, 36, 12, 12, 12, 12, 12, 12, 12, 12, 12, 12,
    ]
    for i in range(108):
        _UTF8_TRANS[i] = trans[i]

_init_utf8_tables()

DEF UTF8_ACCEPT = 0
DEF UTF8_REJECT = 12


cdef inline uint32_t _utf8_run(uint32_t state, const uint8_t* p, Py_ssize_t n) noexcept nogil:
    """Advance the DFA over ``n`` bytes; returns the new state (12 = invalid)."""
    cdef Py_ssize_t i = 0
    cdef uint64_t w
    while i < n:
        if state == UTF8_ACCEPT:
            # skip ASCII eight bytes at a time
            while i + 8 <= n:
                memcpy(&w, p + i, 8)
                if w & 0x8080808080808080ULL:
                    break
                i += 8
            if i >= n:
                break
        state = _UTF8_TRANS[state + _UTF8_CLASS[p[i]]]
        if state == UTF8_REJECT:
            return state
        i += 1
    return state


def utf8_valid(data):
    """True if ``data`` (bytes-like) is complete, valid UTF-8 (test helper)."""
    cdef const uint8_t[:] v = data
    if v.shape[0] == 0:
        return True
    return _utf8_run(0, &v[0], v.shape[0]) == UTF8_ACCEPT

# ---------------------------------------------------------------- masking

cdef inline void _unmask(uint8_t* p, Py_ssize_t n, const uint8_t* key, uint32_t offset) noexcept nogil:
    """XOR ``n`` bytes at ``p`` in place with the 4-byte ``key`` rotated by
    ``offset`` (the position of ``p`` in the frame payload, mod 4): eight
    bytes per step, then the tail byte by byte."""
    cdef uint8_t k[8]
    cdef Py_ssize_t i
    cdef uint64_t w, kw
    for i in range(8):
        k[i] = key[(offset + i) & 3]
    memcpy(&kw, k, 8)
    i = 0
    while i + 32 <= n:
        memcpy(&w, p + i, 8); w ^= kw; memcpy(p + i, &w, 8)
        memcpy(&w, p + i + 8, 8); w ^= kw; memcpy(p + i + 8, &w, 8)
        memcpy(&w, p + i + 16, 8); w ^= kw; memcpy(p + i + 16, &w, 8)
        memcpy(&w, p + i + 24, 8); w ^= kw; memcpy(p + i + 24, &w, 8)
        i += 32
    while i + 8 <= n:
        memcpy(&w, p + i, 8)
        w ^= kw
        memcpy(p + i, &w, 8)
        i += 8
    while i < n:
        p[i] ^= k[i & 7]
        i += 1

# ---------------------------------------------------------------- encoding

cdef bytes _encode(int opcode, const uint8_t* payload, Py_ssize_t n, bint fin,
                   const uint8_t* mask, bint rsv1):
    """One frame, header + payload, in a single new bytes object."""
    cdef Py_ssize_t hlen = 2
    if n > 65535:
        hlen = 10
    elif n > 125:
        hlen = 4
    if mask != NULL:
        hlen += 4
    cdef bytes out = PyBytes_FromStringAndSize(NULL, hlen + n)
    cdef uint8_t* o = <uint8_t*>PyBytes_AS_STRING(out)
    o[0] = (0x80 if fin else 0) | (0x40 if rsv1 else 0) | (opcode & 0x0F)
    cdef uint8_t mbit = 0x80 if mask != NULL else 0
    cdef Py_ssize_t pos
    cdef uint64_t ln = <uint64_t>n
    if n > 65535:
        o[1] = mbit | 127
        for pos in range(8):
            o[2 + pos] = (ln >> (56 - 8 * pos)) & 0xFF
        pos = 10
    elif n > 125:
        o[1] = mbit | 126
        o[2] = (n >> 8) & 0xFF
        o[3] = n & 0xFF
        pos = 4
    else:
        o[1] = mbit | <uint8_t>n
        pos = 2
    if mask != NULL:
        memcpy(o + pos, mask, 4)
        pos += 4
    if n:
        memcpy(o + pos, payload, n)
        if mask != NULL:
            _unmask(o + pos, n, mask, 0)
    return out


def encode_frame(int opcode, payload, bint fin=True, mask=None, bint rsv1=False):
    """Encode one frame.  ``mask`` (4 bytes) makes a masked client frame;
    ``None`` an unmasked server frame.  ``payload`` is bytes-like or str."""
    if isinstance(payload, str):
        payload = (<str>payload).encode("utf-8")
    cdef const uint8_t[:] pv = payload
    cdef const uint8_t[:] mv
    cdef const uint8_t* mp = NULL
    cdef const uint8_t* pp = NULL
    if pv.shape[0]:
        pp = &pv[0]
    if mask is not None:
        mv = mask
        if mv.shape[0] != 4:
            raise ValueError("mask must be 4 bytes")
        mp = &mv[0]
    return _encode(opcode, pp, pv.shape[0], fin, mp, rsv1)


cdef bytes _encode_header(int opcode, Py_ssize_t n):
    """Only the (unmasked, FIN) header of a frame of ``n`` payload bytes."""
    cdef bytes out
    cdef uint8_t* o
    cdef int i
    cdef uint64_t ln = <uint64_t>n
    if n > 65535:
        out = PyBytes_FromStringAndSize(NULL, 10)
        o = <uint8_t*>PyBytes_AS_STRING(out)
        o[1] = 127
        for i in range(8):
            o[2 + i] = (ln >> (56 - 8 * i)) & 0xFF
    elif n > 125:
        out = PyBytes_FromStringAndSize(NULL, 4)
        o = <uint8_t*>PyBytes_AS_STRING(out)
        o[1] = 126
        o[2] = (n >> 8) & 0xFF
        o[3] = n & 0xFF
    else:
        out = PyBytes_FromStringAndSize(NULL, 2)
        o = <uint8_t*>PyBytes_AS_STRING(out)
        o[1] = <uint8_t>n
    o[0] = 0x80 | (opcode & 0x0F)
    return out


cdef class _RawBuffer:
    """A writable buffer over memory owned by ``owner`` (a bytes object the
    engine is still filling and nobody else has seen): lets the transport read
    a large frame's payload straight into the message's final bytes."""
    cdef char* ptr
    cdef Py_ssize_t size
    cdef object owner

    def __getbuffer__(self, Py_buffer* buf, int flags):
        PyBuffer_FillInfo(buf, self, self.ptr, self.size, 0, flags)

    def __releasebuffer__(self, Py_buffer* buf):
        pass

    def __len__(self):          # uvloop's TLS layer asks
        return self.size


cdef inline bytes _encode_bytes(int opcode, bytes payload):
    return _encode(opcode, <const uint8_t*>PyBytes_AS_STRING(payload),
                   PyBytes_GET_SIZE(payload), True, NULL, False)


cdef bytes _close_payload(int code, str reason):
    if code == 1005:
        return _EMPTY
    cdef bytes r = reason.encode("utf-8") if reason else _EMPTY
    return bytes(((code >> 8) & 0xFF, code & 0xFF)) + r


cdef inline bint _valid_close_code(int code) noexcept:
    return (1000 <= code <= 1003) or (1007 <= code <= 1014) or (3000 <= code <= 4999)

# ---------------------------------------------------------------- engine

cdef inline Py_ssize_t _length_size(const uint8_t* h) noexcept:
    """Header bytes up to the end of the (extended) length."""
    cdef uint8_t l7 = h[1] & 0x7F
    return 4 if l7 == 126 else (10 if l7 == 127 else 2)


cdef inline Py_ssize_t _header_size(const uint8_t* h) noexcept:
    """Whole header size, masking key included, from its first two bytes."""
    return _length_size(h) + (4 if h[1] & 0x80 else 0)


cdef inline uint64_t _deflate_bound(uint64_t n) noexcept:
    """The most bytes deflate can turn ``n`` bytes into (zlib's compressBound:
    incompressible input goes out in stored blocks, a few bytes each).  The
    compressed size of a message or frame may pass a size limit by this
    much, no more."""
    return n + (n >> 12) + (n >> 14) + (n >> 25) + 13



cdef class Engine:
    """Sans-I/O RFC 6455 engine, server side.  See ``fastws/core.py``."""

    # -- receive state (fields are owned by the engine) --
    cdef public int state              # EngineState
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

    def __init__(self, *, max_message_size=1 << 20, max_frame_size=0, deflate=None):
        self.max_message_size = max_message_size
        self.max_frame_size = max_frame_size
        self._set_deflate(deflate)

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
        return _encode_bytes(OP_PING, payload)

    def close(self, int code=1000, str reason=""):
        """Start the closing handshake; returns the close frame to send.
        1005 sends an empty close frame (no reason allowed); otherwise the
        code must be one a peer may receive.  The reason is cut to 123 bytes
        of UTF-8 on a character boundary."""
        if self.state != S_OPEN:
            self._raise_closed()
        return self._start_close(code, reason)

    cdef _raise_closed(self):
        if self.close_code is not None:
            raise ConnectionClosed(self.close_code, self.close_reason or "")
        if self._sent_code:
            raise ConnectionClosed(self._sent_code, self._sent_reason or "")
        raise ConnectionClosed(1006, "")

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
        return _encode_bytes(OP_CLOSE, _close_payload(code, reason))

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
                       PyBytes_GET_SIZE(data), True, NULL, False)

    cdef bytes _compress(self, int opcode, bytes data):
        p = self._deflate_params
        if self._deflater is None:
            # zlib cannot deflate with a raw 8-bit window; 9 is what it uses
            self._deflater = _zlib.compressobj(
                _zlib.Z_DEFAULT_COMPRESSION, _zlib.DEFLATED, -max(9, p.server_max_window_bits))
        out = self._deflater.compress(data) + self._deflater.flush(_zlib.Z_SYNC_FLUSH)
        if out.endswith(_DEFLATE_TAIL):
            out = out[:len(out) - 4]
        if p.server_no_context_takeover:
            self._deflater = None
        return _encode(opcode, <const uint8_t*>PyBytes_AS_STRING(out),
                       PyBytes_GET_SIZE(out), True, NULL, True)

    cdef int _fail(self, int code, str detail) except -1:
        """The one place a protocol violation turns into a close frame."""
        if self.state == S_OPEN:
            self._queue(_encode_bytes(OP_CLOSE, _close_payload(code, _CLOSE_REASONS.get(code, ""))))
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
        if not (h[1] & 0x80):
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
            self._inflater = _zlib.decompressobj(-params.client_max_window_bits)
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
        if last and (params.client_no_context_takeover or self._inflater.eof):
            # eof: the client ended its deflate stream (a final block); the
            # next message starts a new one
            self._inflater = None
        return 0

    cdef int _control(self, int opcode, bytes payload) except -1:
        cdef int code
        cdef str reason
        if opcode == OP_PING:
            # answered while CLOSING too: only a *received* close ends pongs
            self._queue(_encode_bytes(OP_PONG, payload))
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
                self._queue(_encode_bytes(OP_CLOSE, _close_payload(code, "")))
            self.state = S_CLOSED
            if self.close_code is None:
                self.close_code = code
                self.close_reason = reason
            self._release_message()
            self._on_event((OP_CLOSE, code, reason))
        return 0

# ---------------------------------------------------------------- connection

# One read buffer for every connection of the process (see the module
# docstring for why that is safe).  256 KiB: large reads amortise syscalls.
cdef bytearray _READ_BUFFER = bytearray(256 * 1024)

cdef enum EndMode:
    END_NONE = 0
    END_CLOSE = 1      # close exchange complete: close the TCP connection
    END_LINGER = 2     # we sent an error close: half-close, discard input until
                       # the peer's EOF or close_timeout (closing at once would
                       # reset a peer still sending, and it would lose our close)
    END_EOF_SENT = 3   # lingering, FIN already sent

cdef enum Phase:
    P_HANDSHAKE = 0    # collecting the request head
    P_DECIDING = 1     # head handed to the handshake, answer pending (async on_connect)
    P_OPEN = 2         # upgraded: frames flow
    P_DONE = 3         # transport lost

DEF WHEEL_SIZE = 512       # slots of the timer wheel

cdef enum TimerKind:
    T_NONE = 0
    T_HANDSHAKE = 1    # the opening handshake must be done by then
    T_PING = 2         # time to check activity and maybe ping
    T_PONG = 3         # a ping is out: proof of life must have come by then
    T_CLOSE = 4        # the peer must have answered our close by then
    T_BODY = 5         # a plain HTTP request body must be in by then

# the answer to a request head or body that did not arrive in time
cdef bytes _REQUEST_TIMEOUT = _error_response(408, "request timeout")
# the answer to a request head on a hub that expects none (no handshake callback)
cdef bytes _UNEXPECTED_HEAD = _error_response(400, "unexpected request")

DEF MAX_FLUSH_JOIN = 65536  # below this many queued bytes, join frames into one buffer


# ---------------------------------------------------------------- fast upgrade
# The common opening handshake, decided without Python: a plain request
# (exactly what fastws.handshake.parse_fast accepts, and a subset of it) to a
# route without on_connect.  Anything else -- or any doubt -- goes to the
# Python handshake (wsproto semantics), so both answer alike; the unit tests
# check that every head this parser accepts gets the same answer from
# fastws.handshake.

cdef struct _Plain:
    Py_ssize_t path_end      # the target is p[4:target_end]; the path p[4:path_end]
    Py_ssize_t target_end
    Py_ssize_t key_start     # the 24 key characters
    bint has_ext             # Sec-WebSocket-Extensions offered
    Py_ssize_t host_start    # the Host value is p[host_start:host_end] (SP/HT trimmed)
    Py_ssize_t host_end
    Py_ssize_t origin_start  # the Origin value p[origin_start:origin_end]; -1: no Origin
    Py_ssize_t origin_end

# What the fast path decides alone about the Origin header (Hub.set_fast_upgrade
# origins=...); whatever it does not take goes to fastws.handshake.OriginPolicy.
cdef enum OriginMode:
    ORIGIN_ANY = 0         # "*": the Origin header is not looked at
    ORIGIN_SAME_HOST = 1   # no Origin, or http(s)://<the Host value> (any case)
    ORIGIN_ABSENT = 2      # no Origin only (an allow-list of origins)

cdef bytes _ACCEPT_HEAD = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                           b"Connection: Upgrade\r\nSec-WebSocket-Accept: ")
cdef bytes _WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

cdef uint8_t _TOKEN_CHARS[256]
cdef uint8_t _B64_CHARS[256]

cdef void _init_token_tables():
    cdef int i
    for i in range(256):
        _TOKEN_CHARS[i] = 0
        _B64_CHARS[i] = 0
    for c in b"!#$%&'*+.^_`|~-0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ":
        _TOKEN_CHARS[c] = 1
    for c in b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/":
        _B64_CHARS[c] = 1

_init_token_tables()

cdef inline bint _ieq(const uint8_t* p, Py_ssize_t n, const char* lower) noexcept nogil:
    """p[:n] equals the lower-case ASCII string ``lower`` (of length n), ignoring case."""
    cdef Py_ssize_t i
    cdef uint8_t c
    for i in range(n):
        c = p[i]
        if 0x41 <= c <= 0x5A:
            c += 0x20
        if c != <uint8_t>lower[i]:
            return False
    return True

cdef bint _has_upgrade_token(const uint8_t* v, Py_ssize_t n) noexcept nogil:
    """Some comma-separated token of v[:n] is "upgrade" (any case, SP/HT trimmed)."""
    cdef Py_ssize_t i = 0, a, b
    while i <= n:
        a = i
        while i < n and v[i] != 0x2C:
            i += 1
        b = i
        while a < b and (v[a] == 0x20 or v[a] == 0x09):
            a += 1
        while b > a and (v[b - 1] == 0x20 or v[b - 1] == 0x09):
            b -= 1
        if b - a == 7 and _ieq(v + a, 7, "upgrade"):
            return True
        i += 1
    return False

cdef bint _parse_plain(const uint8_t* p, Py_ssize_t n, _Plain* out) noexcept nogil:
    """Parse the head p[:n] (ending with the first CRLFCRLF).  True only for a
    plain, valid upgrade request; False means "ask the Python handshake"."""
    cdef Py_ssize_t i, name_start, name_len, v0, v1, line_end
    cdef uint8_t c
    cdef int seen = 0, bit, k
    if n < 20 or p[0] != 0x47 or p[1] != 0x45 or p[2] != 0x54 or p[3] != 0x20 or p[4] != 0x2F:
        return False                                          # "GET /"
    i = 4
    out.path_end = -1
    while i < n:
        c = p[i]
        if c == 0x20:
            break
        if c < 0x21 or c > 0x7E:
            return False
        if c == 0x3F and out.path_end < 0:                    # '?'
            out.path_end = i
        i += 1
    out.target_end = i
    if out.path_end < 0:
        out.path_end = i
    if i + 11 > n or memcmp(p + i, b" HTTP/1.1\r\n", 11) != 0:
        return False
    i += 11
    out.key_start = -1
    out.has_ext = False
    out.host_start = out.host_end = 0
    out.origin_start = out.origin_end = -1
    while True:
        if i + 2 > n:
            return False
        if p[i] == 0x0D and p[i + 1] == 0x0A:                 # the empty line
            if i + 2 != n:
                return False
            break
        name_start = i
        while i < n and _TOKEN_CHARS[p[i]]:
            i += 1
        name_len = i - name_start
        if name_len == 0 or i >= n or p[i] != 0x3A:           # token then ':'
            return False
        i += 1
        v0 = i
        while i < n:
            c = p[i]
            if (c < 0x20 and c != 0x09) or c == 0x7F or c > 0x7E:
                break
            i += 1
        if i + 1 >= n or p[i] != 0x0D or p[i + 1] != 0x0A:
            return False
        line_end = i
        i += 2
        v1 = line_end
        while v0 < v1 and (p[v0] == 0x20 or p[v0] == 0x09):
            v0 += 1
        while v1 > v0 and (p[v1 - 1] == 0x20 or p[v1 - 1] == 0x09):
            v1 -= 1
        bit = 0
        if name_len == 4 and _ieq(p + name_start, 4, "host"):
            bit = 1
            out.host_start = v0
            out.host_end = v1
        elif name_len == 6 and _ieq(p + name_start, 6, "origin"):
            bit = 128
            out.origin_start = v0
            out.origin_end = v1
        elif name_len == 7 and _ieq(p + name_start, 7, "upgrade"):
            bit = 2
            if not (v1 - v0 == 9 and _ieq(p + v0, 9, "websocket")):
                return False
        elif name_len == 10 and _ieq(p + name_start, 10, "connection"):
            bit = 4
            if not _has_upgrade_token(p + v0, v1 - v0):
                return False
        elif name_len == 17 and _ieq(p + name_start, 17, "sec-websocket-key"):
            bit = 8
            if v1 - v0 != 24 or p[v0 + 22] != 0x3D or p[v0 + 23] != 0x3D:
                return False
            for k in range(22):
                if not _B64_CHARS[p[v0 + k]]:
                    return False
            out.key_start = v0
        elif name_len == 21 and _ieq(p + name_start, 21, "sec-websocket-version"):
            bit = 16
            if not (v1 - v0 == 2 and p[v0] == 0x31 and p[v0 + 1] == 0x33):
                return False
        elif name_len == 22 and _ieq(p + name_start, 22, "sec-websocket-protocol"):
            bit = 32
        elif name_len == 24 and _ieq(p + name_start, 24, "sec-websocket-extensions"):
            bit = 64
            out.has_ext = True
        if bit:
            if seen & bit:
                return False                                  # duplicated: wsproto decides
            seen |= bit
    return (seen & 31) == 31


cdef bint _origin_ok(const uint8_t* p, const _Plain* r, int mode) noexcept nogil:
    """The parsed request r may be upgraded without asking Python about its
    Origin (OriginMode ``mode``).  For ORIGIN_SAME_HOST: no Origin, or an
    Origin that is "http://" or "https://" (any case) followed by exactly
    the Host value (any case) -- the first test of
    fastws.handshake._same_host.  False: Python decides (403 or allow)."""
    cdef Py_ssize_t on, hn, skip, i
    cdef const uint8_t* o
    cdef uint8_t a, b
    if mode == ORIGIN_ANY or r.origin_start < 0:
        return True
    if mode != ORIGIN_SAME_HOST:
        return False
    o = p + r.origin_start
    on = r.origin_end - r.origin_start
    if on >= 7 and _ieq(o, 7, "http://"):
        skip = 7
    elif on >= 8 and _ieq(o, 8, "https://"):
        skip = 8
    else:
        return False
    hn = r.host_end - r.host_start
    if hn == 0 or on - skip != hn:
        return False
    for i in range(hn):
        a = o[skip + i]
        b = p[r.host_start + i]
        if 0x41 <= a <= 0x5A:
            a += 0x20
        if 0x41 <= b <= 0x5A:
            b += 0x20
        if a != b:
            return False
    return True


cdef int _origin_mode(origins) except -1:
    """The OriginMode of set_fast_upgrade's ``origins`` argument."""
    if origins == "*":
        return ORIGIN_ANY
    if origins == "same-host":
        return ORIGIN_SAME_HOST
    if origins == "none":
        return ORIGIN_ABSENT
    raise ValueError(f"origins must be '*', 'same-host' or 'none', not {origins!r}")


def _fast_accept_for_test(head, origins="*"):
    """(path, query_string, response, has_ext) if the fast path would accept
    ``head`` (bytes ending with the first CRLFCRLF) with the Origin mode
    ``origins`` (see Hub.set_fast_upgrade), else None.  For tests."""
    cdef bytes b = bytes(head)
    cdef _Plain r
    cdef const uint8_t* p = <const uint8_t*>PyBytes_AS_STRING(b)
    cdef int mode = _origin_mode(origins)
    if not _parse_plain(p, len(b), &r) or not _origin_ok(p, &r, mode):
        return None
    path = b[4:r.path_end].decode("ascii")
    query = b[r.path_end + 1:r.target_end].decode("ascii") if r.path_end < r.target_end else ""
    return path, query, _accept_response(p + r.key_start), bool(r.has_ext)


cdef bytes _accept_response(const uint8_t* key):
    """The 101 response for the 24-character key at ``key``."""
    cdef unsigned char buf[60]
    cdef unsigned char digest[20]
    cdef Py_ssize_t hl = len(_ACCEPT_HEAD)
    memcpy(buf, key, 24)
    memcpy(buf + 24, PyBytes_AS_STRING(_WS_GUID), 36)
    fastws_sha1(buf, 60, digest)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, hl + 32)
    cdef char* o = PyBytes_AS_STRING(out)
    memcpy(o, PyBytes_AS_STRING(_ACCEPT_HEAD), hl)
    fastws_b64_20(digest, o + hl)
    memcpy(o + hl + 28, b"\r\n\r\n", 4)
    return out


def _sha1_for_test(data):
    """SHA-1 digest of ``data`` by the C helper (tests compare with hashlib)."""
    cdef bytes b = bytes(data)
    cdef unsigned char digest[20]
    fastws_sha1(<const unsigned char*>PyBytes_AS_STRING(b), len(b), digest)
    return PyBytes_FromStringAndSize(<char*>digest, 20)


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
    cdef public dict connections       # id -> Connection, upgraded and not lost
    cdef public Py_ssize_t max_message_size
    cdef public Py_ssize_t max_frame_size
    cdef public Py_ssize_t max_head_size
    cdef public double close_timeout
    cdef public object on_callback_error   # callable(conn, exc): log it
    cdef public object on_lost         # callable(conn) for a lost connection that joined rooms
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
                 handshake_timeout=10.0, body_timeout=30.0, tick=None):
        self.loop = loop
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.idle_timeout = idle_timeout
        self.handshake_timeout = handshake_timeout
        self.body_timeout = body_timeout
        if tick is None:
            # fine enough for the shortest timeout configured, at most 1 s
            shortest = min([t for t in (ping_interval, ping_timeout, idle_timeout,
                                        handshake_timeout, body_timeout, close_timeout)
                            if t > 0] or [1.0])
            tick = max(0.05, min(1.0, shortest / 4))
        self.tick = tick
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
        if self._tick_handle is None and self._waiting > 0:
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

    cdef inline void _mark_dirty(self, Connection c):
        self._dirty.append(c)
        if not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self._flush_all)

    def _flush_all(self):
        cdef Connection c
        cdef list dirty = self._dirty
        self._dirty = []
        self._scheduled = False
        for c in dirty:
            c._flush()

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
        permessage-deflate gets its own compressed one.  Returns the number
        of connections it was queued on."""
        if opcode != OP_TEXT and opcode != OP_BINARY:
            raise ValueError(f"opcode {opcode} is not TEXT or BINARY")
        return self._broadcast(opcode, payload if type(payload) is bytes else bytes(payload),
                               connections, exclude, priority)

    cdef int _broadcast(self, int opcode, bytes data, connections, exclude, int priority) except -1:
        cdef Connection c
        cdef bytes frame = None
        cdef int n = 0
        for c in connections:
            if c is exclude or c.state != S_OPEN or c._phase != P_OPEN:
                continue
            if c._wpaused and not c._admit(priority):
                continue
            if c._deflate_params is not None:
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


cdef class Connection(Engine):
    """One WebSocket connection: the protocol uvloop drives and the object
    the application's callbacks receive as ``conn``.

    Public API: ``send(message)``, ``close(code=1000, reason="")``,
    ``ping(payload=b"")``, ``id``, ``path``, ``query_string``,
    ``subprotocol``, ``remote_address``, ``store`` (a dict created on first
    use, for the application's per-connection state), ``closed``.
    """

    cdef Hub _hub
    cdef object transport
    cdef public object id              # process-unique int, set at upgrade
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
    cdef int _due_kind                 # TimerKind
    cdef long _rx_tick                 # wheel tick of the last read (proof of life)
    cdef long _msg_tick                # wheel tick of the last complete message
    cdef long _ping_tick               # wheel tick our last ping went out
    cdef bint _reported                # on_disconnect has run
    cdef object _body_cb               # plain HTTP: callback(body) once _body_size bytes are in
    cdef public object rooms           # room keys joined (fastws.rooms): None, a small tuple, or a set
    cdef bint _wpaused                 # the transport asked us to stop writing
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
        if COUNTERS:
            self._hub.bytes_in += nbytes
        self._rx_tick = self._hub._tick_no
        if self._read_direct:
            self._read_direct = False
            if self._consume_payload(self._mbuf + self._mlen, nbytes, True) == 0:
                if self._fpos == self._flen:
                    self._fstate = F_HEADER
                    self._end_frame()
            self._after_input()
        elif self._phase == P_OPEN:
            self._feed(<uint8_t*><char*>_READ_BUFFER, nbytes)
            self._after_input()
        elif self._phase == P_HANDSHAKE:
            if self._head is None and self._hub._fast_routes is not None:
                if self._fast_upgrade(<uint8_t*><char*>_READ_BUFFER, nbytes):
                    return
            self._head_data(memoryview(_READ_BUFFER)[:nbytes])
        elif self._phase == P_DECIDING:
            # bytes behind the request head while the server decides
            self._head.extend(memoryview(_READ_BUFFER)[:nbytes])
            self._check_body()

    def data_received(self, data):
        """For transports that do not use the buffered-protocol path (the
        stdlib loop's, TLS on some loops): same as bytes read by get_buffer."""
        if COUNTERS:
            self._hub.bytes_in += len(data)
        self._rx_tick = self._hub._tick_no
        self.feed(data)

    def feed(self, data):
        """Process ``data`` as if it had been read from the transport: for a
        protocol that hands its transport (and the bytes it already read, the
        request head included) over to a fastws Connection."""
        cdef bytearray buf
        if self._phase == P_HANDSHAKE:
            self._head_data(data)
        elif self._phase == P_DECIDING:
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
            self._hub.connections.pop(self.id, None)
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
        self._hub._next_id += 1
        self.id = self._hub._next_id
        self._hub.connections[self.id] = self
        self._phase = P_OPEN
        self._rx_tick = self._msg_tick = self._hub._tick_no
        self._schedule_heartbeat()
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

    # the names the fronts used before the hooks were public (to be removed)
    def _hs_accept(self, *args, **kwargs):
        return self.accept_upgrade(*args, **kwargs)

    def _hs_reject(self, response):
        self.reject_upgrade(response)

    def _hs_pause(self):
        self.hold_upgrade()

    def _hs_read_body(self, size, callback):
        self.read_body(size, callback)

    # ---------------------------------------------------------- engine hooks

    cdef int _on_message(self, int opcode, object payload) except -1:
        if COUNTERS:
            self._hub.messages_in += 1
        self._msg_tick = self._hub._tick_no
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
        if not self._dirty:
            self._dirty = True
            self._hub._mark_dirty(self)
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
        if self._dirty:
            self._flush()
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
        return 0

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
            hub.idle_timeouts += 1
            self.close(_IDLE_TIMEOUT.code, _IDLE_TIMEOUT.reason)
            return
        if kind == T_PONG:
            if self._rx_tick >= self._ping_tick:
                self._schedule_heartbeat()   # alive: the pong (or data) came
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
    def remote_address(self):
        if self.transport is None:
            return None
        return self.transport.get_extra_info("peername")

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
