"""Every byte layout of the broker layer, in one module.

Nothing here does I/O: these are the names, sizes and pack/unpack functions
of what nodes send each other, used by the backends (:mod:`.memory`,
:mod:`.embedded`, :mod:`.redis`, :mod:`.cluster`, :mod:`.streams`), the
bridge (:mod:`.bridge`), presence (:mod:`fastws.presence`) and
:mod:`fastws.resume`.  It imports nothing from the broker package, so every
module of it can import from here without a circle.  Integers are
big-endian; there is no pickle anywhere.  A malformed layout raises
:class:`~fastws.errors.BrokerProtocolError` (never a bare ``struct.error``
or ``IndexError``).

1. Channel names
----------------
A *key* is a room key, the tuple ``(namespace, name)``, or a node key, a
node id ``str``.  Its channel (also its stream key with Redis Streams) is
the same on every backend::

    fastws:{prefix}:room:{namespace}:{name}
    fastws:{prefix}:node:{node_id}

(``fastws:`` alone without a prefix; ``%`` and ``:`` in the namespace are
%-escaped, so the name part is unambiguous).  Presence keeps, per room, the
keys ``fastws:{prefix}:presence:{<namespace>:<name>}:nodes`` and
``...:node:<node_id>`` (the braces are a Redis Cluster hash tag: one slot
per room).

2. The envelope: one publish as a backend carries it
----------------------------------------------------
::

    +-----+-----+-----+--------------+----------------------------------+
    | 'F' | 'W' | 0x01| n (u8)       | origin node id (n bytes, UTF-8)  |  payload ...
    +-----+-----+-----+--------------+----------------------------------+
      magic        ver   origin length

The receiving broker drops an envelope whose origin is its own node (the
origin delivered locally already) and one that is not an envelope (wrong
magic or version: counted as ``stray``).

3. The bridge's payloads (inside the envelope)
----------------------------------------------
::

    ROOM    +------+-------+-----------------------------------------+
            | 0x01 | flags | message bytes ...                       |
            +------+-------+-----------------------------------------+
    DIRECT  +------+-------+----------------+-----------------------+---------------+
            | 0x02 | flags | request id u32 | connection id u64     | message ...   |
            +------+-------+----------------+-----------------------+---------------+
    REPLY   +------+-------+----------------+
            | 0x03 | flags | request id u32 |
            +------+-------+----------------+
    CLOSE   +------+-------+----------------+-----------------------+-----------+------------------+
            | 0x04 | flags | request id u32 | connection id u64     | code u16  | reason (UTF-8)   |
            +------+-------+----------------+-----------------------+-----------+------------------+

    flags   bit 0     the message's opcode: 1 BINARY, 0 TEXT
            bit 1     REPLY: the connection existed and the message was queued
            bits 4-7  ROOM: the delivery priority (fastws.frames.PRIORITY_*)

A ROOM message is the room message's bytes exactly as they go into the
WebSocket frame (UTF-8 for TEXT), so a receiving node hands them to the hub
as a ready frame payload without decoding; :func:`unpack_room` checks that a
TEXT payload is UTF-8 (a message from a foreign publisher must not reach a
client as an invalid text frame).  ``request id`` 0 asks for no REPLY.
A CLOSE asks the receiving node to close its connection ``connection id``
with ``code`` and ``reason`` (at most 123 bytes); it is answered with a
REPLY like a DIRECT.

4. The embedded broker's link frames (worker <-> supervisor, Unix socket)
------------------------------------------------------------------------
::

    +---------------------+----------+----------------------+
    | body length u32     | type u8  | body (<= MAX_FRAME)  |
    +---------------------+----------+----------------------+

========  =====  ==========================================================
HELLO     1      node id (UTF-8)
SUB       2      u32 request id, then (u32 length + channel) repeated
UNSUB     3      same as SUB
ACK       4      u32 request id (hub -> worker: the (un)subscription applies)
PUB       5      u32 channel length + channel + envelope (worker -> hub)
MSG       6      same body as PUB (hub -> worker)
PING      7      u32 request id; the hub answers PONG (8) with the same id
========  =====  ==========================================================

A channel is at most ``MAX_CHANNEL`` bytes; a SUB/UNSUB of more channels
than ``MAX_REQUEST`` bytes goes in several frames (:func:`link_batches`).

5. Redis Streams entries
------------------------
An entry is ``XADD <channel> MAXLEN ~ <maxlen> * d <envelope> n <counter>``:
field ``d`` the envelope above, field ``n`` the publishing node's counter
(decimal, increasing across the node's streams and restarts).  An entry id
is ``"<ms>-<seq>"`` (:func:`parse_id` makes it a comparable ``(ms, seq)``;
a bare ``"<ms>"`` means ``seq`` 0).
"""

from __future__ import annotations

import struct
from binascii import crc_hqx

from ..errors import BrokerProtocolError, is_valid_close_code
from ..frames import BINARY, PRIORITY_NORMAL, TEXT

__all__ = [
    # channel names
    "escape", "channel_name", "presence_base", "key_slot", "CLUSTER_SLOTS",
    # the envelope
    "MAGIC", "VERSION", "ENVELOPE", "pack_envelope", "unpack_envelope", "envelope_origin",
    # the bridge's payloads
    "ROOM", "DIRECT", "REPLY", "F_BINARY", "F_OK", "HEAD", "DIRECT_HEAD", "REPLY_HEAD",
    "encode_message", "decode_message", "pack_room", "pack_room_message", "unpack_room", "room_message",
    "pack_direct", "unpack_direct", "pack_reply", "unpack_reply", "payload_kind",
    "CLOSE", "CLOSE_HEAD", "pack_close", "unpack_close",
    # the embedded broker's links
    "LINK_HEAD", "U32", "HELLO", "SUB", "UNSUB", "ACK", "PUB", "MSG", "PING", "PONG",
    "MAX_FRAME", "MAX_CHANNEL", "MAX_REQUEST", "MalformedFrame",
    "link_frame", "link_channels", "link_split_channel", "link_batches", "link_pub_body",
    # Redis Streams entries
    "ZERO", "MAX_SEQ", "FIELD_DATA", "FIELD_COUNTER", "parse_id", "id_after", "entry_fields",
]


# -- 1. channel names -------------------------------------------------------------------

def escape(s: str) -> str:
    """``s`` with ``%`` and ``:`` %-escaped (a namespace inside a channel name)."""
    return s.replace("%", "%25").replace(":", "%3A")


def channel_name(prefix: str, key) -> bytes:
    """The channel of ``key`` (room tuple or node id str) under ``prefix``."""
    base = f"fastws:{prefix}:" if prefix else "fastws:"
    if isinstance(key, tuple):
        ns, name = key
        return f"{base}room:{escape(ns)}:{name}".encode()
    if isinstance(key, str):
        return f"{base}node:{key}".encode()
    raise TypeError(f"a broker key is a (namespace, name) tuple or a node id str, not {key!r}")


CLUSTER_SLOTS = 16384      # Redis Cluster's hash slots


def key_slot(channel: bytes) -> int:
    """The Redis Cluster hash slot of ``channel``: CRC16 (XMODEM) of its hash
    tag (the part between the first ``{`` and the next ``}``, when not
    empty) or of the whole name, modulo 16384 (the cluster specification)."""
    start = channel.find(b"{")
    if start >= 0:
        end = channel.find(b"}", start + 1)
        if end > start + 1:
            channel = channel[start + 1:end]
    return crc_hqx(channel, 0) % CLUSTER_SLOTS


def presence_base(prefix: str, key) -> str:
    """The common start of room ``key``'s presence keys (with its hash tag)."""
    ns, name = key
    p = f"fastws:{prefix}:" if prefix else "fastws:"
    return p + "presence:{" + escape(ns) + ":" + name + "}"


# -- 2. the envelope --------------------------------------------------------------------

MAGIC = b"FW"
VERSION = 1
ENVELOPE = struct.Struct("!2sBB")     # magic, version, origin length


def pack_envelope(origin: bytes, payload: bytes) -> bytes:
    """``origin`` (a node id, <= 255 bytes) and ``payload`` as one envelope."""
    return ENVELOPE.pack(MAGIC, VERSION, len(origin)) + origin + payload


def unpack_envelope(data: bytes):
    """``(origin: bytes, payload: bytes)``, or None if ``data`` is no envelope."""
    if len(data) < 4 or data[:2] != MAGIC or data[2] != VERSION or len(data) < 4 + data[3]:
        return None
    n = data[3]
    return bytes(data[4:4 + n]), bytes(data[4 + n:])


def envelope_origin(data: bytes):
    """The origin (bytes) of envelope ``data`` without copying its payload,
    or None if ``data`` is no envelope."""
    if len(data) < 4 or data[:2] != MAGIC or data[2] != VERSION or len(data) < 4 + data[3]:
        return None
    return bytes(data[4:4 + data[3]])


# -- 3. the bridge's payloads ------------------------------------------------------------

ROOM, DIRECT, REPLY, CLOSE = 1, 2, 3, 4
F_BINARY, F_OK = 1, 2
HEAD = struct.Struct("!BB")           # kind, flags
DIRECT_HEAD = struct.Struct("!BBIQ")  # kind, flags, request id, connection id
REPLY_HEAD = struct.Struct("!BBI")    # kind, flags, request id
CLOSE_HEAD = struct.Struct("!BBIQH")  # kind, flags, request id, connection id, close code


def encode_message(message) -> tuple:
    """``(opcode, payload bytes)`` of a room message: ``str`` is TEXT (UTF-8),
    anything bytes-like is BINARY.  UnicodeEncodeError for a lone surrogate."""
    if isinstance(message, str):
        return TEXT, message.encode("utf-8")
    return BINARY, bytes(message)


def decode_message(opcode: int, payload: bytes):
    """The ``str`` (TEXT) or ``bytes`` (BINARY) message of a payload."""
    return payload.decode("utf-8") if opcode == TEXT else payload


def _flags(opcode: int, priority: int) -> int:
    return (F_BINARY if opcode == BINARY else 0) | (priority & 0x0F) << 4


def pack_room(opcode: int, payload: bytes, priority: int = PRIORITY_NORMAL) -> bytes:
    """A ROOM payload: ``payload`` (the frame's bytes) sent with ``opcode``."""
    return HEAD.pack(ROOM, _flags(opcode, priority)) + payload


def pack_room_message(message, priority: int = PRIORITY_NORMAL) -> bytes:
    """A ROOM payload for ``message`` (``str`` or bytes-like)."""
    opcode, payload = encode_message(message)
    return HEAD.pack(ROOM, _flags(opcode, priority)) + payload


def payload_kind(payload: bytes) -> int:
    """ROOM, DIRECT or REPLY (or another number: not ours); BrokerProtocolError
    for a payload shorter than the common head."""
    if len(payload) < 2:
        raise BrokerProtocolError(f"bridge payload of {len(payload)} bytes")
    return payload[0]


def _text_checked(body: bytes) -> bytes:
    if not body.isascii():
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BrokerProtocolError(f"TEXT room message is not UTF-8: {exc}") from None
    return body


def unpack_room(payload: bytes) -> tuple:
    """``(opcode, priority, body)`` of a ROOM payload; a TEXT body is checked
    to be UTF-8.  BrokerProtocolError if ``payload`` is no ROOM payload."""
    if len(payload) < 2 or payload[0] != ROOM:
        raise BrokerProtocolError("not a ROOM payload")
    flags = payload[1]
    body = payload[2:]
    if flags & F_BINARY:
        return BINARY, flags >> 4, body
    return TEXT, flags >> 4, _text_checked(body)


def room_message(payload: bytes):
    """The message (``str`` or ``bytes``) of a ROOM payload, or None for
    another kind of payload (BrokerProtocolError for a TEXT one that is not
    UTF-8)."""
    if len(payload) < 2 or payload[0] != ROOM:
        return None
    body = payload[2:]
    if payload[1] & F_BINARY:
        return body
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BrokerProtocolError(f"TEXT room message is not UTF-8: {exc}") from None


def pack_direct(request_id: int, conn_id: int, message) -> bytes:
    """A DIRECT payload: ``message`` for connection ``conn_id`` of the
    receiving node; ``request_id`` (u32, 0: none) asks for a REPLY."""
    opcode, payload = encode_message(message)
    return DIRECT_HEAD.pack(DIRECT, _flags(opcode, 0), request_id, conn_id) + payload


def unpack_direct(payload: bytes) -> tuple:
    """``(request_id, conn_id, message)`` of a DIRECT payload (the message
    ``str`` or ``bytes``).  BrokerProtocolError if it is malformed."""
    if len(payload) < DIRECT_HEAD.size or payload[0] != DIRECT:
        raise BrokerProtocolError(f"not a DIRECT payload ({len(payload)} bytes)")
    _, flags, rid, cid = DIRECT_HEAD.unpack_from(payload, 0)
    body = payload[DIRECT_HEAD.size:]
    if flags & F_BINARY:
        return rid, cid, body
    try:
        return rid, cid, body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BrokerProtocolError(f"TEXT direct message is not UTF-8: {exc}") from None


def pack_reply(request_id: int, ok: bool) -> bytes:
    """A REPLY payload: the answer to DIRECT ``request_id``."""
    return REPLY_HEAD.pack(REPLY, F_OK if ok else 0, request_id)


def unpack_reply(payload: bytes) -> tuple:
    """``(request_id, ok)`` of a REPLY payload.  BrokerProtocolError if malformed."""
    if len(payload) < REPLY_HEAD.size or payload[0] != REPLY:
        raise BrokerProtocolError(f"not a REPLY payload ({len(payload)} bytes)")
    _, flags, rid = REPLY_HEAD.unpack_from(payload, 0)
    return rid, bool(flags & F_OK)


def pack_close(request_id: int, conn_id: int, code: int, reason: str = "") -> bytes:
    """A CLOSE payload: close connection ``conn_id`` of the receiving node
    with ``code`` and ``reason``; ``request_id`` (u32, 0: none) asks for a REPLY."""
    body = reason.encode("utf-8")
    if len(body) > 123:
        raise ValueError("a close reason is at most 123 bytes of UTF-8")
    return CLOSE_HEAD.pack(CLOSE, 0, request_id, conn_id, code) + body


def unpack_close(payload: bytes) -> tuple:
    """``(request_id, conn_id, code, reason)`` of a CLOSE payload.
    BrokerProtocolError if it is malformed (short, a code a server may not
    send, a reason past 123 bytes or not UTF-8)."""
    if len(payload) < CLOSE_HEAD.size or payload[0] != CLOSE:
        raise BrokerProtocolError(f"not a CLOSE payload ({len(payload)} bytes)")
    _, _, rid, cid, code = CLOSE_HEAD.unpack_from(payload, 0)
    if not is_valid_close_code(code) or code in (1005, 1006):
        raise BrokerProtocolError(f"CLOSE with code {code}, which no server sends")
    body = payload[CLOSE_HEAD.size:]
    if len(body) > 123:
        raise BrokerProtocolError(f"CLOSE reason of {len(body)} bytes")
    try:
        return rid, cid, code, body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BrokerProtocolError(f"CLOSE reason is not UTF-8: {exc}") from None


# -- 4. the embedded broker's link frames ---------------------------------------------------

LINK_HEAD = struct.Struct("!IB")      # body length, frame type
U32 = struct.Struct("!I")
HELLO, SUB, UNSUB, ACK, PUB, MSG, PING, PONG = range(1, 9)
MAX_FRAME = 64 << 20        # largest frame body either side accepts
MAX_CHANNEL = 1 << 20       # longest channel name
MAX_REQUEST = 1 << 20       # a SUB/UNSUB frame's channels, bytes (more: several frames)


class MalformedFrame(BrokerProtocolError, ValueError):
    """A link frame's body does not parse (a bug or a foreign peer: the link is dropped)."""


def link_frame(kind: int, body: bytes) -> bytes:
    """One link frame: the head, then ``body``."""
    return LINK_HEAD.pack(len(body), kind) + body


def link_channels(body: bytes, pos: int) -> list:
    """The channels of a SUB/UNSUB body from offset ``pos`` (after the request id)."""
    out = []
    n = len(body)
    while pos < n:
        if n - pos < 4:
            raise MalformedFrame("truncated channel length")
        (ln,) = U32.unpack_from(body, pos)
        pos += 4
        if ln > MAX_CHANNEL or n - pos < ln:
            raise MalformedFrame(f"channel of {ln} bytes")
        out.append(bytes(body[pos:pos + ln]))
        pos += ln
    return out


def link_split_channel(body: bytes) -> tuple:
    """``(channel, envelope)`` of a PUB/MSG body."""
    if len(body) < 4:
        raise MalformedFrame("truncated channel length")
    (ln,) = U32.unpack_from(body, 0)
    if ln > MAX_CHANNEL or len(body) - 4 < ln:
        raise MalformedFrame(f"channel of {ln} bytes")
    return body[4:4 + ln], body[4 + ln:]


def link_pub_body(channel: bytes, envelope: bytes) -> bytes:
    """The body of a PUB (and MSG) frame."""
    return U32.pack(len(channel)) + channel + envelope


def link_batches(chans) -> list:
    """``chans`` as SUB/UNSUB bodies (without the request id) of at most
    ``MAX_REQUEST`` bytes each (a single longer channel gets one of its own)."""
    out, parts, size = [], [], 0
    for c in chans:
        item = U32.pack(len(c)) + c
        if parts and size + len(item) > MAX_REQUEST:
            out.append(b"".join(parts))
            parts, size = [], 0
        parts.append(item)
        size += len(item)
    if parts:
        out.append(b"".join(parts))
    return out


# -- 5. Redis Streams entries ---------------------------------------------------------------

ZERO = b"0-0"                 # the id before every entry
MAX_SEQ = (1 << 64) - 1       # the largest seq part of an id
FIELD_DATA = b"d"             # the envelope
FIELD_COUNTER = b"n"          # the publishing node's counter


def parse_id(eid) -> tuple:
    """A stream entry id, ``"1700000000000-3"`` (str or bytes), as ``(ms, seq)``;
    a bare ``"1700000000000"`` means ``seq`` 0.  ValueError (naming the id)
    for anything else."""
    if isinstance(eid, str):
        raw = eid.encode("utf-8", "replace")
    elif isinstance(eid, (bytes, bytearray, memoryview)):
        raw = bytes(eid)
    else:
        raw = b""
    ms, sep, seq = raw.partition(b"-")
    if ms.isdigit() and (seq.isdigit() if sep else True):
        return int(ms), int(seq or 0)
    raise ValueError(f"not a stream entry id (ms-seq): {eid!r:.80}")


def id_after(eid: tuple) -> str:
    """The smallest id after ``(ms, seq)`` (an ``XRANGE`` start that excludes it)."""
    ms, seq = eid
    return f"{ms}-{seq + 1}" if seq < MAX_SEQ else f"{ms + 1}-0"


def entry_fields(fields) -> tuple:
    """``(envelope, counter)`` of an entry's field list ``[b"d", data, b"n", n]``
    (either None when absent or malformed)."""
    data = n = None
    if fields:
        for i in range(0, len(fields) - 1, 2):
            f = fields[i]
            if f == FIELD_DATA:
                data = fields[i + 1]
            elif f == FIELD_COUNTER:
                try:
                    n = int(fields[i + 1])
                except ValueError:
                    n = None
    return data, n
