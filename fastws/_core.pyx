# cython: language_level=3
"""fastws hot path: the RFC 6455 frame engine and the connection protocol.

This file holds the C declarations, the constants and, in order, the parts
(``include``d ``.pxi`` files next to it, one per job): ``_core_utf8.pxi``
(UTF-8 validation), ``_core_frames.pxi`` (masking, encoding),
``_core_engine.pxi`` (Engine), ``_core_upgrade.pxi`` (the C handshake
parser, SHA-1), ``_core_hub.pxi`` (Hub: timer wheel, write coalescing,
broadcast), ``_core_connection.pxi`` (Connection).  ``fastws/core.py``
writes down the contract; ``fastws/_core.pyi`` the Python-level API.

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

cdef extern from "<sys/ioctl.h>" nogil:
    int c_ioctl "ioctl"(int fd, unsigned long request, ...)
    unsigned long FIONREAD
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t
from libc.math cimport ceil as math_ceil
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC

import logging as _logging
import os as _os
import zlib as _zlib

from .errors import (CLOSE_REASONS as _CLOSE_REASONS, ConnectionClosed as _ConnectionClosed,
                     CALLBACK_FAILED as _CALLBACK_FAILED, SLOW_CONSUMER as _SLOW_CONSUMER,
                     PING_TIMEOUT as _PING_TIMEOUT, IDLE_TIMEOUT as _IDLE_TIMEOUT,
                     RATE_LIMITED as _RATE_LIMITED)
from .handshake import error_response as _error_response

_log = _logging.getLogger("fastws")

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
# One compressor per window size for every message compressed without
# context takeover (see Engine._compress): a full flush after each message
# leaves nothing of it in the compressor, so the bytes are those a fresh
# compressor would give, without allocating and clearing one per message.
cdef dict _SHARED_DEFLATERS = {}

# -- connections and the hub (_core_connection.pxi, _core_hub.pxi) --

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

DEF RATE_CAP_MAX = 4294967293   # largest allowance per rate window (uint32, the top values are markers)
DEF RL_CLOSED = 4294967295      # Connection._rl_msgs of a connection closed for its rate

#: Upper bounds (seconds) of the delivery-latency histogram's buckets (Hub.stats(),
#: websocket_delivery_latency_seconds); one more bucket counts what lies above the last.
DELIVERY_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                            0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
DEF LAT_BUCKETS = 16
cdef int64_t LAT_BOUNDS_NS[LAT_BUCKETS]
for _i in range(LAT_BUCKETS):
    LAT_BOUNDS_NS[_i] = <int64_t>round(DELIVERY_LATENCY_BUCKETS[_i] * 1e9)


cdef inline int64_t _now_ns() noexcept nogil:
    """The monotonic clock (the one time.monotonic_ns reads), ns."""
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


cdef double _default_tick(tuple times):
    """The wheel's tick: a quarter of the shortest of ``times`` set (> 0),
    within 50 ms .. 1 s."""
    shortest = min([t for t in times if t > 0] or [1.0])
    return max(0.05, min(1.0, shortest / 4))


cdef object _conn_number(object conn_id, str node_id):
    """The number of the connection whose public id is ``conn_id`` on the
    node ``node_id`` ("<node_id>-<n>", or "<n>" without a node id; or the
    number itself as an int), else 0."""
    if type(conn_id) is int:
        return conn_id if conn_id > 0 else 0
    if not isinstance(conn_id, str):
        return 0
    node, sep, num = (<str>conn_id).rpartition("-")
    if node != node_id or (sep and not node_id):
        return 0
    if not num or len(num) > 20 or not (num.isascii() and num.isdigit()):
        return 0
    return int(num)

# ---------------------------------------------------------------- the parts, in order
# Each part may use what the parts before it define (and the constants above).

include "_core_utf8.pxi"        # incremental UTF-8 validation
include "_core_frames.pxi"      # masking, encoding, header helpers
include "_core_engine.pxi"      # Engine: sans-I/O RFC 6455, server side
include "_core_upgrade.pxi"     # the C handshake parser (fast upgrade), SHA-1
include "_core_hub.pxi"         # Hub: registry, timer wheel, write coalescing
include "_core_connection.pxi"  # Connection(Engine): the asyncio protocol
