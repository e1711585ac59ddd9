"""The engine layer's contract, and the pick of its implementation.

Two implementations of the same three classes exist:

* ``fastws._core`` (Cython): ``Engine``, ``Hub``, ``Connection(Engine)``;
* the Python twins: ``fastws._wsproto_engine.Engine`` (on wsproto's frame
  layer, the oracle of every protocol test) and ``fastws._pyconn.Hub`` /
  ``fastws._pyconn.Connection`` (which drive it).

This module exports the ones this process runs on: ``IMPLEMENTATION``
("cython" or "wsproto"), ``Engine``, ``encode_frame``, ``Hub``,
``Connection``.  The Python twins are used when the extension is not built
or when ``FASTWS_NO_EXTENSIONS=1`` is set.  Opcodes, event kinds, states and
priorities are :mod:`fastws.frames`'s numbers (re-exported here); the close
codes and reasons the connection layer chooses itself come from
:mod:`fastws.errors`.

What follows is the contract both implementations keep; the differential
tests (``tests/unit/test_protocol.py``, ``test_differential.py``,
``test_connection_contract.py``) hold them to it.

Engine: sans-I/O frame engine (RFC 6455, server or client side)
----------------------------------------------------------------
::

    engine = Engine(max_message_size=1 << 20, max_frame_size=0, deflate=None,
                    client=False)

    events = engine.receive(data)   # bytes in -> list of event tuples
    out = engine.data_to_send()     # bytes the engine wants on the wire
                                    # (pong replies, close echo, error close)
    frame = engine.send(message)    # str -> text frame, bytes -> binary frame
    frame = engine.encode_message(opcode, payload)
                                    # TEXT/BINARY + already-encoded payload
    frame = engine.ping(payload=b"")
    frame = engine.close(code=1000, reason="")   # starts the close handshake
    engine.state                    # OPEN, CLOSING (we sent close), CLOSED
    engine.close_code, engine.close_reason      # once known, else None
    engine.sent_close               # (code, reason) of our close frame, or None

Events are tuples whose first item is the kind:

    (TEXT, str)               a complete text message (fragments reassembled)
    (BINARY, bytes)           a complete binary message
    (PING, bytes)             a ping; the pong is already queued
    (PONG, bytes)             a pong (solicited or not)
    (CLOSE, code, reason)     the peer's close frame (code 1005 when empty);
                              when OPEN the echo (same code, empty reason; an
                              empty close answers an empty close) is queued;
                              the engine is CLOSED afterwards
    (ERROR, code, detail)     the peer broke the protocol; a close frame with
                              ``code`` and ``errors.CLOSE_REASONS[code]`` is
                              queued (unless we had already sent one); the
                              engine is CLOSED and ignores further input

Ownership: ``receive`` copies what it keeps; every payload it hands out is
an owned ``bytes``/``str``.  The wsproto engine also offers
``receive_iter(data)``, yielding ``(event, answer_bytes)`` one frame at a
time, so that ``_pyconn`` can dispatch while parsing as the Cython
connection does.  ``send``/``encode_message``/``ping``/``close``
return new ``bytes``; nothing refers to the caller's buffers afterwards.

Limits (0 means unlimited), checked on the lengths the frame headers declare,
before any payload is buffered: a data frame longer than ``max_frame_size``,
or one that takes the message past ``max_message_size``, fails with 1009.
With permessage-deflate (``deflate``: a negotiated :class:`DeflateParams`)
the same limits hold on the *compressed* lengths on the wire, raised by
deflate's worst-case overhead (zlib's compressBound), and the payload is
inflated as it arrives, never past ``max_message_size`` (+1 byte to detect
the excess): a zip bomb fails with 1009 having cost at most the limit.  The
messages the server sends are compressed too (``send``,
``encode_message``).

``send``/``encode_message``/``ping``/``close`` outside OPEN raise
``errors.ConnectionClosed`` (the known close code and reason, else the
ones we sent, else 1006).  ``close(1005)`` sends an empty close frame;
another code must be one a peer may receive (else ValueError); the reason
is cut to 123 UTF-8 bytes on a character boundary.  ``ping`` payloads are
at most 125 bytes (ValueError).

Module-level helper, in both: ``encode_frame(opcode, payload, fin=True,
mask=None, rsv1=False) -> bytes`` (``mask``: 4 bytes for a client frame).

The client role (``client=True``, ``engine.client``): everything above
holds with the roles of the two sides swapped.  Every frame the engine
produces (``send``, ``encode_message``, ``ping``, ``close``, the pong
replies, the close echo, the error close) is masked with a fresh key: the
Cython engine draws the keys from ``os.urandom`` in batches of 1,024 keys
(one per process, refilled after a fork), the wsproto engine lets wsproto
draw each from ``os.urandom``.  RFC 6455 asks for keys a script cannot
predict (so that it cannot choose the bytes on the wire and poison the
cache of an intermediary), not for secret ones: keys from the OS CSPRNG
are that, however many are read at once.  Frames received must be
unmasked: a masked frame is an ERROR 1002 (checked with the other header
bits, stage 2 of the order the wsproto engine documents).  With
permessage-deflate the client compresses with the ``client_*`` parameters
(``client_no_context_takeover``: every message on its own, from a compressor
shared by the process and emptied by a full flush after each message) and
inflates with the ``server_*`` ones.  The close handshake is the same
exchange of close frames; the engine says nothing about TCP: a client
waits for the server to close the connection after the exchange (RFC
6455 7.1.1) and closes it itself only when that does not come in time.
The opening handshake of a client is :func:`fastws.handshake.client_request`
and :func:`fastws.handshake.check_accept` (which gives the ``deflate`` for
``Engine``).

Hub: the per-server state of the connections
--------------------------------------------
::

    hub = Hub(loop, handshake=None, **hub_settings(config),
              on_callback_error=None, node_id="", tick=None)

* ``loop``: the asyncio loop (``time``, ``call_soon``, ``call_later``,
  ``create_task`` are all the hub uses).
* ``handshake(conn, head)``: called with the request head (``bytes``, up to
  and including the blank line) once it is in, or with ``None`` when it is
  over ``max_head_size``; it must answer on ``conn`` with
  ``accept_upgrade``, ``reject_upgrade``, ``hold_upgrade`` (then answer
  later) or ``read_body``.  ``None``: no head is expected (the front hands
  decided upgrades over with ``Connection.adopt``); a head that comes
  anyway gets 400 and the connection is closed.
* ``connection_factory()``: the protocol factory for ``loop.create_server``.
* ``set_fast_upgrade(routes, default=None, *, max_connections=0,
  deflate=False, origins="*")``: let plain upgrades to routes without
  ``on_connect`` be answered without calling ``handshake``.  The Cython hub
  answers them in C; the Python hub accepts the call and sends every head to
  ``handshake`` (same answers, ``fast_upgrades`` stays 0).
* ``node_id``: this node's id (the Node gives the one its broker uses;
  "" by default).  A connection's public id is ``"<node_id>-<n>"`` (``"<n>"``
  without a node id), where ``n`` (``conn.number``) counts the hub's
  upgrades from 1: unique across the workers and nodes of a deployment,
  built on access (nothing stored per connection).
* ``connections``: dict number (int) -> Connection, open (upgraded, not
  lost).  ``connection(conn_id)``: the one whose public id is ``conn_id``
  (or whose number is ``conn_id``, an int), else None; an id of another
  node is None.
* ``broadcast(message, connections, exclude=None, priority=PRIORITY_NORMAL)
  -> int``: str -> (TEXT, its UTF-8), bytes-like -> (BINARY, bytes), then
  ``broadcast_frame``.
* ``broadcast_frame(opcode, payload, connections, exclude=None,
  priority=PRIORITY_NORMAL) -> int``: one frame of ``opcode`` (TEXT or
  BINARY) around ``payload`` (already-encoded bytes; a text payload is
  trusted to be UTF-8, nothing is decoded), built once and queued on every
  open connection of ``connections`` except ``exclude``; a connection with
  permessage-deflate gets its own compressed frame (the Cython hub compresses
  once per window size for the members that take messages without context
  takeover: the same bytes each would get).  The delivery policy
  (below) applies per recipient.  Returns the number of connections it was
  queued on (and adds it to ``messages_out``).
* ``stats()``: a new dict: ``connections``, ``messages_in``,
  ``messages_out``, ``bytes_in``, ``bytes_out``, ``closes`` (close code
  1000..1015, else "3xxx"/"4xxx"/"other" -> count), ``dropped``
  ((reason, priority) -> count), ``slow_consumer_closes``,
  ``queued_bytes_total``, ``queued_bytes_max``, ``rate_limited``
  ("messages"/"bytes" -> connections closed for their rate),
  ``delivery_latency`` (route label -> ``{"buckets": counts per bucket of
  DELIVERY_LATENCY_BUCKETS, not cumulative, plus one above the last,
  "sum": seconds, "count": n}``, one entry per label seen, see below).  Also
  attributes: ``handshake_timeouts``, ``body_timeouts``, ``ping_timeouts``,
  ``idle_timeouts``, ``fast_upgrades``, ``open_connections``,
  ``rate_limited``, ``rate_window``.
* ``on_lost``: callable(conn), called when a connection that joined rooms
  (``conn.rooms`` truthy) is lost; ``rooms``: the room registry, for
  ``Connection.join``/``leave``.
* ``on_closed``: callable(conn) or None (the default: no cost), called once
  from ``connection_lost`` for every connection that was upgraded (accepted
  or adopted), after ``on_lost`` and before ``on_disconnect``, while
  ``conn.remote_address`` still answers; an exception in it is logged.
* ``stop_timers()``: cancel the timer wheel's loop timer (shutdown).

Counters: ``bytes_in`` counts every byte read; ``bytes_out`` every byte
handed to the transport or the socket (the 101 and reject answers, queued
frames), except a slow-consumer close frame written past the queue;
``messages_in``/``messages_out`` count data messages (one per recipient of
a broadcast).

Timers: one timer wheel per hub, one loop timer for it (``tick`` seconds,
by default a quarter of the shortest timeout configured, within 50 ms ..
1 s).  A connection waits in at most one slot: the handshake deadline
(``handshake_timeout``: a partial head gets 408, a silent client or an
undecided upgrade is aborted), the body deadline (``body_timeout``, 408),
the next activity check (every ``ping_interval`` or ``idle_timeout``,
whichever is shorter), the pong deadline (``ping_timeout`` after a ping:
no byte read since -> close ``errors.PING_TIMEOUT``), the close deadline
(``close_timeout`` after our close frame or a protocol error -> abort).  A
connection quiet for a whole ``ping_interval`` gets a ping; one without a
message for ``idle_timeout`` is closed with ``errors.IDLE_TIMEOUT``.
Times are counted in whole ticks of the wheel (a deadline may fire up to
a tick early or late); activity does not move a connection in the wheel,
reads and messages just stamp the current tick.

Rate limits (``max_messages_per_second``, ``max_bytes_per_second``, 0 =
off, and ``rate_burst_seconds``): counted per connection in fixed windows
of ``rate_burst_seconds`` rounded to whole wheel ticks (at least one; with a
limit set the tick is also fine enough for it), with no clock read per
message; the allowance of a window is the rate times its length.  Messages
are counted as they complete, bytes as they are read (frames of every
kind, headers included).  Past the allowance the connection is closed with
``errors.RATE_LIMITED`` (1008 "rate limit exceeded"), counted in
``rate_limited[kind]``; its later messages are dropped (the bytes it sends
are still read, so its close answer ends the connection).  The Cython
connection keeps the window in 12 bytes that fill alignment padding: no
memory per connection.

Delivery latency: histograms of the time from a message's arrival to its
frame being written, one per route, kept in the hub (fixed buckets, C
integers in the Cython hub, nothing allocated per frame).  A reply written
at the end of the read that delivered a message counts from the start of
that read; frames queued otherwise (a publish, a broadcast, a timer, a task)
count from the moment the first frame of their loop iteration's batch was
queued (inside a read: that read's start) to their connection's write in
the batch's flush (the clock is read once per 16 connections written: the
time of the 16th write stands for the group).  One observation per
connection written, in the histogram of the connection's route; frames a
paused connection holds are not observed when they finally go out.  A
route's label is its ``path`` attribute when that is a non-empty str (a
``fastws.App`` route: ``"/chat"``, ``"*"``), else ``"asgi"`` (the ASGI
front's sessions and handed-over routes: their paths are per connection).
The hub keeps ``DELIVERY_LATENCY_ROUTES`` (64) histograms: the first 63
labels get one each, in the order connections are first accepted on them;
later labels share ``"other"`` (in ``stats()`` once used).  The label is
looked up once per accepted connection (``accept_upgrade``, ``adopt`` and
the C fast path); the Cython connection keeps its slot in one byte of
former struct padding.

Delivery policy: a connection's output is the transport's buffer (up to
``high_water``, then the transport calls ``pause_writing``) plus the
connection's own queue (at most ``max_queue`` bytes).  While paused, the
queue is held and the peer is not read; a broadcast of PRIORITY_LOW is
dropped for it, PRIORITY_NORMAL once the queue is half full, PRIORITY_HIGH
is kept (drops are counted in ``conn.dropped`` and
``stats()["dropped"][("backpressure", priority)]``).  A queue past
``max_queue``, or a connection paused for more than ``slow_grace`` seconds
when a broadcast reaches it, is closed with ``errors.SLOW_CONSUMER`` (the
queue is discarded, the close frame written at once, abort after
``close_timeout``).

Connection: one WebSocket connection (an asyncio BufferedProtocol)
------------------------------------------------------------------
Lifetime: created by ``connection_factory``; *handshake* (collecting the
request head) -> *deciding* (the head is with ``handshake``) -> *open*
(upgraded, in ``hub.connections``, frames flow) -> *done* (transport lost).

The upgrade decision, called by ``handshake`` (or later, when held):

* ``accept_upgrade(response, route, path, query_string, subprotocol=None,
  deflate=None) -> bool``: write the 101 ``response``, register, start
  framing, run ``route.on_open``, then parse the bytes that came after the
  head.  False (nothing done) when the connection is not deciding or is
  gone.
* ``reject_upgrade(response)``: write the HTTP answer and close.
* ``hold_upgrade()``: stop reading while an async decision runs.
* ``reserve_id() -> str``: fix the connection's number (and so its public
  ``id``) now, while its upgrade is decided (gateway mode names the
  connection to its backend before the 101); the upgrade then keeps it.
* ``read_body(size, callback)``: a plain HTTP request: call
  ``callback(body)`` once ``size`` bytes behind the head are in (reading
  then stops; the answer must follow within ``handshake_timeout``), 408
  if they are not in within ``body_timeout``.
* ``adopt(transport, response, route, path, query_string, subprotocol=None,
  deflate=None, early=b"")``: take over a transport whose upgrade was
  parsed and decided elsewhere (the ASGI front): become its protocol, do
  what ``connection_made`` does, write ``response``, register, start
  framing, run ``on_open``, then parse ``early`` (bytes read after the head)
  as frames.  No re-parse, no ``handshake`` call.

A route is any object with ``on_open``, ``on_message``, ``on_disconnect``
(callables or None) and ``open_is_async``, ``message_is_async``,
``disconnect_is_async``.  ``on_message(conn, str | bytes)`` runs for each
message; an exception in it (or in ``on_open``, or in the task of an async
one) goes to ``hub.on_callback_error(conn, exc)`` (else it is logged) and
closes the connection with ``errors.CALLBACK_FAILED``.
``on_disconnect(conn, code, reason)`` runs exactly once, when an open
connection is lost, with its close code and reason: the peer's close frame
(or the protocol error's code and canonical reason), else the close frame
we sent if the peer never answered, else 1006 and "".

API for the application: ``send(message)`` (str text, bytes binary; raises
ConnectionClosed once closing), ``send_frame(frame)`` (an encoded frame),
``ping(payload=b"")``, ``close(code=1000, reason="")`` (no-op once
closing; the transport closes when the peer answers or after
``close_timeout``), ``abort()``, ``join(room)``/``leave(room)``, ``id`` (the public id, a
str), ``number`` (its int key in ``hub.connections``), ``path``,
``query_string``, ``subprotocol``, ``route``, ``remote_address``,
``store`` (a dict), ``closed``, ``state``, ``close_code``,
``close_reason``, ``dropped``, ``rooms``, ``backlog`` (bytes sent that the
kernel has not taken yet: fastws's queue plus the transport's buffer).

Writes: whatever is queued in one loop iteration goes out in one write per
connection (the hub flushes once per iteration, ``call_soon``), or as soon
as more than ``high_water`` bytes are queued within the iteration (so that
a burst meets the transport's flow control and the delivery policy); a close or
error ends the transport after the queue is written (a protocol error
half-closes with ``write_eof`` and lingers until the peer's EOF or
``close_timeout``).  The Cython connection writes with ``send(2)`` /
``sendmsg(2)`` straight on the socket when the transport holds nothing of
ours (never with TLS), and lets the kernel read a large frame's payload
straight into the message's final ``bytes`` (``get_buffer`` hands it out);
the Python connection does neither, with the same bytes on the wire and the
same callbacks.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import TYPE_CHECKING, Any

from . import _pyconn, _wsproto_engine
from .config import Config
from .frames import (  # re-exported: the vocabulary of the contract
    BINARY,
    CLOSE,
    CLOSED,
    CLOSING,
    CONT,
    ERROR,
    OPEN,
    PING,
    PONG,
    PRIORITY_HIGH,
    PRIORITY_LOW,
    PRIORITY_NORMAL,
    TEXT,
    DeflateParams,
)

try:
    # The Cython extension is optional (not built: the Python twins run), so
    # it is loaded by name, the one import of fastws that may fail here.
    _core: ModuleType | None = importlib.import_module(__package__ + "._core")
except ImportError:
    _core = None

#: the Config fields that become Hub keyword arguments (see hub_settings)
HUB_KNOBS = (
    "max_message_size", "max_frame_size", "max_head_size", "close_timeout",
    "high_water", "max_queue", "slow_grace",
    "ping_interval", "ping_timeout", "idle_timeout", "handshake_timeout", "body_timeout",
    "max_messages_per_second", "max_bytes_per_second", "rate_burst_seconds",
)


def hub_settings(config: Config) -> dict[str, Any]:
    """The keyword arguments of ``Hub`` taken from a :class:`fastws.Config`:
    limits, delivery policy and timers.  The one place that maps settings
    to the hub; ``Hub(loop, handshake, **hub_settings(config))``."""
    return {name: getattr(config, name) for name in HUB_KNOBS}


def _pick() -> str:
    if os.environ.get("FASTWS_NO_EXTENSIONS") == "1" or _core is None:
        return "wsproto"
    return "cython"


#: "cython" or "wsproto": the implementation this process runs on.
IMPLEMENTATION = _pick()
if TYPE_CHECKING:
    # What a type checker sees: the stub of the Cython module (fastws/_core.pyi).
    # The Python twins have the same names and parameters
    # (tests/unit/test_connection_contract.py checks both against the stub).
    from ._core import Connection, Engine, Hub, encode_frame
elif IMPLEMENTATION == "cython":
    Engine = _core.Engine
    encode_frame = _core.encode_frame
    Hub = _core.Hub
    Connection = _core.Connection
else:
    Engine = _wsproto_engine.Engine
    encode_frame = _wsproto_engine.encode_frame
    Hub = _pyconn.Hub
    Connection = _pyconn.Connection

#: upper bounds (seconds) of the delivery-latency buckets of ``Hub.stats()``
#: (the same tuple in both implementations)
DELIVERY_LATENCY_BUCKETS = _pyconn.DELIVERY_LATENCY_BUCKETS
#: delivery-latency histograms per hub: one per route label, the last one "other"
DELIVERY_LATENCY_ROUTES = _pyconn.DELIVERY_LATENCY_ROUTES


def engine_module(name: str) -> ModuleType:
    """Return the engine module called ``name`` ("cython" or "wsproto").

    Raises ImportError if the Cython extension is asked for but not built.
    """
    if name == "cython":
        if _core is None:
            raise ImportError("fastws._core (the Cython engine) is not built")
        return _core
    if name == "wsproto":
        return _wsproto_engine
    raise ValueError(f"unknown engine {name!r}")


def connection_module(name: str) -> ModuleType:
    """Return the module holding ``Hub`` and ``Connection`` of implementation
    ``name`` ("cython": ``fastws._core``; "wsproto": ``fastws._pyconn``)."""
    if name == "wsproto":
        return _pyconn
    return engine_module(name)


__all__ = [
    "IMPLEMENTATION", "Engine", "encode_frame", "Hub", "Connection", "hub_settings",
    "DELIVERY_LATENCY_BUCKETS", "DELIVERY_LATENCY_ROUTES",
    "HUB_KNOBS", "engine_module", "connection_module", "DeflateParams",
    "CONT", "TEXT", "BINARY", "CLOSE", "PING", "PONG", "ERROR", "OPEN", "CLOSING", "CLOSED",
    "PRIORITY_LOW", "PRIORITY_NORMAL", "PRIORITY_HIGH",
]
