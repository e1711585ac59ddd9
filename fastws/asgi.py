"""Run ASGI 3 applications (http, websocket, lifespan) on the fastws core.

    fastws serve myproject.main:app          # Starlette, FastAPI, any ASGI 3 app

or, from Python::

    fastws.asgi.run_asgi(app, fastws.Config(port=8000))      # blocking, uvloop
    await fastws.asgi.serve_asgi(app, config)                 # until cancelled

Theory of operation
-------------------
Every TCP connection starts on an :class:`HttpProtocol`, which parses
HTTP/1.1 with ``httptools`` (llhttp).  A plain request becomes an ``http``
scope run as one task (:class:`_HttpCycle`): keep-alive, pipelining (one
response at a time, reading paused while a later request waits), request
bodies streamed to ``receive()`` (reading paused past ``BODY_HIGH`` buffered
bytes), responses streamed with Content-Length when known up front, else
chunked, and ``Expect: 100-continue`` answered on the first ``receive()``.

An upgrade request becomes a ``websocket`` scope run as one task
(:class:`_WebSocketSession`).  The HTTP protocol keeps the transport while
the application decides (so a client that goes away before the decision is
seen and reported as ``websocket.disconnect`` 1006).  On
``websocket.accept`` the decision is complete, so the session hands the
transport to a fastws engine connection:

    conn = hub.connection_factory()
    transport.set_protocol(conn); conn.connection_made(transport)
    conn.feed(head + bytes read after the head)

The hub calls :meth:`AsgiServer._handshake` with the head, which finds the
prepared answer and calls ``conn._hs_accept(...)``: the engine writes the 101
response and, from then on, frames are parsed, unmasked, validated, answered
(ping/close) and written (coalesced once per loop iteration) by ``_core``
exactly as for a ``fastws.App``.  The only per-connection Python is the ASGI
glue: the session, which is also the engine connection's route (its
``on_message``/``on_disconnect`` hand ASGI events to the ``receive()`` the
application waits in), the scope, and the application's own task.
``websocket.send`` queues a frame with ``conn.send``; ``websocket.close``
starts the close handshake with ``conn.close``.

Memory per idle WebSocket (see docs/asgi.md): nothing of the upgrade
decision outlives it (the parsed request, the head, early bytes); received
events are queued only while the application is behind; header tuples,
paths, the server address and client hosts are shared between connections
(bounded tables); the rooms extension is one small object; every session
task shares one name, one done callback and one callback context.

Refusals before accept: ``websocket.close`` -> 403; the denial-response
extension (``websocket.http.response.start/body``) -> the application's own
HTTP response; an exception or a return without accepting -> 500.  After
accept, an exception closes with 1011 and a return closes with 1000.

Rooms (the ``fastws.rooms`` scope extension; see docs/asgi.md): a raw ASGI
application sends ``fastws.join`` / ``fastws.leave`` / ``fastws.publish``
messages; frameworks whose WebSocket wrapper refuses unknown message types
(Starlette, FastAPI) call the ``join``/``leave``/``publish`` callables of
``scope["extensions"]["fastws.rooms"]`` (or ``fastws.asgi_rooms``).  The
registry is a :class:`fastws.rooms.Rooms`, as for a ``fastws.App``: a
publish encodes the message once and queues the same frame on every local
member (``hub.broadcast``), and with a broker (``--broker``, or the
embedded one of ``--workers N``) goes to the other workers and nodes
through :mod:`fastws.broker.bridge`, wired by ``ServerWiring._start_broker``.

Operations (``/health``, ``/livez``, ``/metrics``, ``/stats``, the HTTP
publish API): registered by ``ServerWiring._start_operations`` /
``_start_broker`` as on the native server, and served for a plain HTTP
request when the application answers it with 404 (the application's own
route of that path wins).

Flow control: a session whose application does not read pauses the socket
past ``WS_QUEUE_HIGH`` queued messages; ``websocket.send`` waits (polling the
transport's buffer, a rare path) while more than ``WS_WRITE_HIGH`` bytes are
unsent.  HTTP ``send`` waits on ``pause_writing``/``resume_writing``.

Requires uvloop: a fastws engine connection is a duck-typed buffered protocol
(``get_buffer``/``buffer_updated``), which uvloop's ``set_protocol`` accepts.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import socket
import time
from collections import deque
from collections.abc import Mapping
from email.utils import formatdate
from urllib.parse import unquote

import httptools

from . import core
from .config import Config
from .errors import CLOSE_REASONS, ClientDisconnected, ConnectionClosed, HandshakeError, LifespanError
from .rooms import Rooms
from .handshake import (HttpRequest, accept_response, error_response, negotiate_deflate,
                        parse_request)
from .server import (ServerStartError, ServerWiring, _hub_class, bind_socket, configure_logging,
                     run_until_signal, tls_options)

log = logging.getLogger("fastws")

ASGI_HTTP = {"version": "3.0", "spec_version": "2.4"}
ASGI_WS = {"version": "3.0", "spec_version": "2.4"}
ASGI_LIFESPAN = {"version": "3.0", "spec_version": "2.0"}

KEEPALIVE_TIMEOUT = 5.0       # seconds an idle keep-alive connection stays open
# what the one timer of an HttpProtocol waits for (handshake_timeout and
# body_timeout come from the Config; see HttpProtocol._timer_fired)
T_IDLE = 1                    # keep-alive: the next request must start (else close quietly)
T_HEAD = 2                    # a request head must be complete (else 408 and close)
T_BODY = 3                    # a request body must be complete (else 408 and close)
# how far the parser is in the request being read
R_IDLE, R_HEAD, R_BODY = 0, 1, 2
BODY_HIGH = 256 * 1024        # buffered request body bytes before reading pauses
WS_QUEUE_HIGH = 64            # received messages the app has not read before reading pauses
WS_QUEUE_LOW = 16             # ... and resumes
WS_EARLY_MAX = 64 * 1024      # bytes accepted after an upgrade request before the decision
WS_WRITE_HIGH = 1 << 22       # unsent bytes past which websocket.send waits
WS_WRITE_LOW = 1 << 20        # ... until the transport buffer is below this

_NO_BODY_STATUS = frozenset((204, 304))
_HUB_KNOBS = ("high_water", "max_queue", "slow_grace", "ping_interval", "ping_timeout",
              "idle_timeout")


# ---------------------------------------------------------------- helpers

class _Clock:
    """The Date header, formatted at most once a second."""

    __slots__ = ("_second", "_value")

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def date(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._value = formatdate(now, usegmt=True).encode("ascii")
        return self._value


_clock = _Clock()


# -- sharing what many connections have in common ----------------------------
#
# An idle WebSocket keeps its scope for as long as it lives, so what is the
# same on most connections (header names, values such as "websocket" or the
# Host, paths, the server address, the client's host) is one shared object,
# looked up in bounded tables (at most INTERN_MAX entries each; past that,
# new values are simply not shared).  Bytes and str objects are immutable, so
# sharing them is invisible to applications.

INTERN_MAX = 4096           # entries per table
INTERN_LEN_MAX = 256        # longer names, values, paths and targets are never shared

#: headers whose values repeat across clients (values of others, e.g.
#: sec-websocket-key, cookie or authorization, are per connection)
_SHARED_VALUE_HEADERS = frozenset((
    b"host", b"upgrade", b"connection", b"sec-websocket-version", b"sec-websocket-extensions",
    b"sec-websocket-protocol", b"origin", b"user-agent", b"accept", b"accept-encoding",
    b"accept-language", b"cache-control", b"pragma", b"content-type", b"dnt", b"te",
    b"sec-fetch-dest", b"sec-fetch-mode", b"sec-fetch-site", b"sec-ch-ua", b"sec-ch-ua-mobile",
    b"sec-ch-ua-platform", b"x-forwarded-proto", b"x-forwarded-host", b"x-forwarded-port",
))
_header_names: dict = {}    # name as sent -> lower-case name (shared)
_header_pairs: dict = {}    # (name as sent, value) -> shared (lower-case name, value) tuple
_interned: dict = {}        # str/bytes -> the shared equal object (paths, hosts, ...)
_targets: dict = {}         # request target -> (raw_path, path, query_string), no query only


def _intern(value):
    shared = _interned.get(value)
    if shared is None:
        if len(_interned) < INTERN_MAX and len(value) <= INTERN_LEN_MAX:
            _interned[value] = value
        return value
    return shared


def _header(name: bytes, value: bytes) -> tuple:
    """``(lower-case name, value)`` for a scope's header list, shared when
    the same header line was seen before."""
    pair = _header_pairs.get((name, value))
    if pair is not None:
        return pair
    lname = _header_names.get(name)
    if lname is None:
        lname = name.lower()
        if len(_header_names) < INTERN_MAX and len(name) <= INTERN_LEN_MAX:
            _header_names[name] = lname
    pair = (lname, value)
    if (lname in _SHARED_VALUE_HEADERS and len(value) <= INTERN_LEN_MAX
            and len(_header_pairs) < INTERN_MAX):
        _header_pairs[(name, value)] = pair
    return pair


def _addr(info):
    if isinstance(info, tuple) and len(info) >= 2:
        return (_intern(str(info[0])), int(info[1]))
    return None


_local_addrs: dict = {}     # sockname -> the shared scope["server"] tuple


def _local_addr(info):
    shared = _local_addrs.get(info)
    if shared is None:
        shared = _addr(info)
        if len(_local_addrs) < 64:
            _local_addrs[info] = shared
    return shared


def _target(url: bytes) -> tuple:
    """``(raw_path, path, query_string)`` of a request target, shared for
    targets seen before (those without a query string)."""
    shared = _targets.get(url)
    if shared is not None:
        return shared
    parsed = httptools.parse_url(url)
    raw_path = parsed.path or b"/"
    query = parsed.query or b""
    out = (raw_path, unquote(raw_path.decode("latin-1")), query)
    if not query and len(_targets) < INTERN_MAX and len(url) <= INTERN_LEN_MAX:
        _targets[url] = out
    return out


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "(no message)"


def _status_line(status: int) -> bytes:
    from http import HTTPStatus

    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    return b"HTTP/1.1 %d %s\r\n" % (status, phrase.encode("ascii"))


_STATUS_LINES = {s: _status_line(s) for s in (101, 200, 201, 204, 301, 302, 304, 400, 401,
                                              403, 404, 405, 413, 422, 500, 503)}


def _response_head(status: int, headers) -> list:
    line = _STATUS_LINES.get(status)
    if line is None:
        line = _status_line(status)
    out = [line]
    for name, value in headers:
        out.append(b"%s: %s\r\n" % (bytes(name), bytes(value)))
    return out


def _plain_response(status: int, body: bytes, keep_alive: bool = False) -> bytes:
    head = _response_head(status, [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
        (b"date", _clock.date()),
        (b"connection", b"keep-alive" if keep_alive else b"close"),
    ])
    head.append(b"\r\n")
    return b"".join(head) + body


def _is_disconnect(exc) -> bool:
    """An exception that only says the client went away (ours, or a
    framework's WebSocketDisconnect / ClientDisconnect)."""
    return isinstance(exc, OSError) or any(
        c.__name__ in ("WebSocketDisconnect", "ClientDisconnect") for c in type(exc).__mro__)


# ---------------------------------------------------------------- lifespan

class _Lifespan:
    """Runs the ``lifespan`` scope: startup before serving, shutdown after.

    An application that raises before it ever calls ``receive()`` does not
    speak lifespan (info log, serving goes on, as uvicorn's ``auto``); one
    that sends ``lifespan.startup.failed`` or raises after receiving
    ``lifespan.startup`` fails the start (:class:`LifespanError`)."""

    def __init__(self, app, state: dict) -> None:
        self.app = app
        self.state = state
        self.task = None
        self.events: asyncio.Queue = asyncio.Queue()
        self.received = False          # the app called receive(): it speaks lifespan
        self.unsupported = False
        self.startup_done = asyncio.Event()
        self.shutdown_done = asyncio.Event()
        self.failure = None            # one-line message

    async def startup(self) -> None:
        loop = asyncio.get_running_loop()
        self.task = loop.create_task(self._main())
        await self.events.put({"type": "lifespan.startup"})
        await self.startup_done.wait()
        if self.failure is not None:
            raise LifespanError(f"ASGI lifespan startup failed: {self.failure}")

    async def shutdown(self, timeout: float) -> None:
        if self.task is None or self.unsupported or self.task.done():
            return
        await self.events.put({"type": "lifespan.shutdown"})
        try:
            await asyncio.wait_for(self.shutdown_done.wait(), timeout or None)
        except asyncio.TimeoutError:
            log.error("fastws: ASGI lifespan shutdown did not complete in %ss", timeout)
            self.task.cancel()
        if self.failure is not None:
            log.error("fastws: ASGI lifespan shutdown failed: %s", self.failure)

    async def _main(self) -> None:
        scope = {"type": "lifespan", "asgi": ASGI_LIFESPAN, "state": self.state}
        try:
            await self.app(scope, self._receive, self._send)
        except BaseException as exc:  # noqa: BLE001 - the app's, reported below
            if isinstance(exc, asyncio.CancelledError):
                raise
            if not self.received:
                self.unsupported = True
                log.info("fastws: ASGI 'lifespan' protocol appears unsupported (%s: %s)",
                         type(exc).__name__, exc)
            elif self.failure is None:
                self.failure = f"{type(exc).__name__}: {exc}"
                log.debug("fastws: exception in ASGI lifespan", exc_info=exc)
        finally:
            self.startup_done.set()
            self.shutdown_done.set()

    async def _receive(self):
        self.received = True
        return await self.events.get()

    async def _send(self, message) -> None:
        kind = message["type"]
        if kind == "lifespan.startup.complete":
            self.startup_done.set()
        elif kind == "lifespan.startup.failed":
            self.failure = _last_line(message.get("message", ""))
            self.startup_done.set()
        elif kind == "lifespan.shutdown.complete":
            self.shutdown_done.set()
        elif kind == "lifespan.shutdown.failed":
            self.failure = _last_line(message.get("message", ""))
            self.shutdown_done.set()
        else:
            raise RuntimeError(f"unexpected ASGI lifespan message {kind!r}")


# ---------------------------------------------------------------- rooms

class _RoomsExtension(Mapping):
    """``scope["extensions"]["fastws.rooms"]`` of a websocket scope: a
    read-only mapping ``{"join", "leave", "publish"}`` whose callables are
    the session's bound methods, made when looked up (one small object per
    connection instead of a dict and three bound methods).  A refused join
    or publish raises a :class:`fastws.errors.RoomError` in the caller
    (see :meth:`_WebSocketSession.join`)."""

    __slots__ = ("_session",)
    _KEYS = ("join", "leave", "publish")

    def __init__(self, session) -> None:
        self._session = session

    def __getitem__(self, key):
        if key in self._KEYS:
            return getattr(self._session, key)
        raise KeyError(key)

    def __iter__(self):
        return iter(self._KEYS)

    def __len__(self) -> int:
        return 3


def _room_name(message) -> str:
    room = message.get("room")
    if not isinstance(room, str) or not room:
        raise TypeError(f"{message['type']} needs a non-empty str 'room', got {room!r}")
    return room


def _check_room(room) -> str:
    if not isinstance(room, str) or not room:
        raise TypeError(f"a room name is a non-empty str, got {room!r}")
    return room


def _publish_payload(message):
    text = message.get("text")
    if text is not None:
        return text
    data = message.get("bytes")
    if data is None:
        raise TypeError("fastws.publish needs 'text' or 'bytes'")
    return bytes(data)


# ---------------------------------------------------------------- websocket

S_CONNECTING, S_RESPONDING, S_OPEN, S_CLOSED = 0, 1, 2, 3

#: the context the sessions' done callbacks run in (one for all, instead of
#: a copy of the current context per connection; they use no context vars)
_DONE_CONTEXT = contextvars.Context()
_TASK_NAME = "fastws-asgi-websocket"   # every session task's name (one shared str)
_NO_SUBPROTOCOLS = ()       # scope["subprotocols"] when the client offers none
_DENIAL_EXTENSION = {}      # scope["extensions"]["websocket.http.response"]: always empty


class _WebSocketSession:
    """The ASGI glue of one WebSocket: its scope, the app's task, the events
    ``receive()`` has not returned yet, and (once accepted) the engine
    connection.

    The session is also the engine connection's *route* (``conn.route``):
    the engine calls ``on_message``/``on_disconnect`` on it, so no route
    object or bound callbacks exist per connection.

    What an idle accepted WebSocket keeps here: this object, its scope, the
    app's task, and the future the app's ``receive()`` waits on.  Received
    events go straight to that future when the app is waiting; a deque is
    made only while the app is behind, and dropped once it has caught up.
    Everything needed only for the decision (the parsed request, its head,
    early bytes, a denial response) is released at the decision."""

    __slots__ = ("server", "scope", "request", "head", "proto", "transport", "conn", "state",
                 "events", "waiter", "final", "connect_sent", "paused", "early", "task", "denial")

    # the route interface the engine reads (fastws.app.Route's fields)
    namespace = ""                  # rooms of ASGI apps live in the shared namespace
    on_open = None
    open_is_async = False
    message_is_async = False
    disconnect_is_async = False

    def __init__(self, server, proto, scope, request, head: bytes, early: bytes) -> None:
        self.server = server
        self.scope = scope
        self.request = request        # the parsed upgrade request (handshake.Request), until decided
        self.head = head              # the request head, fed to the engine at hand-over
        self.proto = proto            # the HttpProtocol, until hand-over
        self.transport = proto.transport
        self.conn = None              # the engine connection, once accepted
        self.state = S_CONNECTING
        self.events = None            # deque of events the app has not received, while it is behind
        self.waiter = None            # the future receive() waits on
        self.final = None             # the websocket.disconnect event, once known
        self.connect_sent = False
        self.paused = False           # we paused reading: the app is behind
        self.early = bytearray(early) if early else None   # bytes behind the head, before the decision
        self.task = None
        self.denial = None            # [status, headers, body chunks] of a denial response

    # -- events in ---------------------------------------------------------

    def _push(self, event) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(event)      # the app waits in receive() (so nothing is queued)
            return
        events = self.events
        if events is None:
            events = self.events = deque()
        events.append(event)
        if (not self.paused and len(events) > WS_QUEUE_HIGH
                and self.transport is not None and self.state == S_OPEN):
            self.paused = True
            self.transport.pause_reading()

    @staticmethod
    def on_message(conn, data) -> None:
        # called by the engine for each complete message (a plain function:
        # the engine caches route.on_message, so nothing is bound per connection)
        if type(data) is str:
            conn.route._push({"type": "websocket.receive", "text": data})
        else:
            conn.route._push({"type": "websocket.receive", "bytes": data})

    def on_disconnect(self, conn, code, reason) -> None:
        # called by the engine once, when the transport is gone (it has
        # already removed the connection from its rooms: hub.on_lost)
        self._finish(code, reason)

    def early_data(self, data: bytes) -> None:
        """Bytes read by the HTTP protocol behind the upgrade request."""
        if self.early is None:
            self.early = bytearray()
        self.early += data
        if len(self.early) > WS_EARLY_MAX and self.transport is not None:
            self.transport.pause_reading()

    def lost_before_accept(self) -> None:
        self.proto = None
        self._finish(1006, "")

    def _finish(self, code: int, reason: str) -> None:
        if self.final is not None:
            return
        self.state = S_CLOSED
        final = self.final = {"type": "websocket.disconnect", "code": code, "reason": reason or ""}
        self.transport = None
        self.request = self.head = self.early = self.denial = None
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(final)

    # -- ASGI callables ----------------------------------------------------

    async def receive(self):
        if not self.connect_sent:
            self.connect_sent = True
            return {"type": "websocket.connect"}
        events = self.events
        if events:
            event = events.popleft()
            if not events:
                self.events = None
            if self.paused and len(events) <= WS_QUEUE_LOW:
                self.paused = False
                if self.transport is not None:
                    self.transport.resume_reading()
            return event
        if self.final is not None:
            return self.final
        waiter = self.waiter = self.server.loop.create_future()
        try:
            return await waiter
        except asyncio.CancelledError:
            # cancelled after an event was handed over: keep it for the next receive()
            if waiter.done() and not waiter.cancelled():
                event = waiter.result()
                if event is not self.final:
                    if self.events is None:
                        self.events = deque()
                    self.events.appendleft(event)
            raise
        finally:
            self.waiter = None

    async def send(self, message) -> None:
        kind = message["type"]
        state = self.state
        if kind == "websocket.send":
            if state != S_OPEN:
                if state == S_CLOSED:
                    raise ClientDisconnected("the WebSocket is closed")
                raise RuntimeError("websocket.send before websocket.accept")
            text = message.get("text")
            try:
                self.conn.send(text if text is not None else message.get("bytes") or b"")
            except ConnectionClosed:
                raise ClientDisconnected("the WebSocket is closed") from None
            t = self.transport
            if t is not None and t.get_write_buffer_size() > WS_WRITE_HIGH:
                await self._drain()
        elif kind == "websocket.accept":
            if state != S_CONNECTING:
                if state == S_CLOSED:
                    raise ClientDisconnected("the client went away before the accept")
                raise RuntimeError(f"websocket.accept in state {state}")
            self._accept(message)
        elif kind == "websocket.close":
            code = message.get("code") or 1000
            reason = message.get("reason") or ""
            if state == S_OPEN:
                if not self.conn.closed:
                    self.conn.close(code, reason)
            elif state == S_CONNECTING:
                self._respond(error_response(403, "connection refused"), 403)
                self._finish(code, reason)
            elif state == S_RESPONDING:
                raise RuntimeError("websocket.close during a denial response")
        elif kind in ("fastws.join", "fastws.leave", "fastws.publish"):
            self._rooms(kind, message)
        elif kind == "websocket.http.response.start":
            if state != S_CONNECTING:
                raise RuntimeError(f"websocket.http.response.start in state {state}")
            self.state = S_RESPONDING
            self.denial = [int(message["status"]), list(message.get("headers") or ()), []]
        elif kind == "websocket.http.response.body":
            if state != S_RESPONDING:
                raise RuntimeError("websocket.http.response.body without response.start")
            self.denial[2].append(bytes(message.get("body", b"")))
            if not message.get("more_body", False):
                self._send_denial()
        else:
            raise RuntimeError(f"unexpected ASGI message {kind!r} in a websocket scope")

    # -- decisions ---------------------------------------------------------

    def _accept(self, message) -> None:
        proto = self.proto
        transport = self.transport
        if proto is None or transport is None or transport.is_closing():
            self._finish(1006, "")
            raise ClientDisconnected("the client went away before the accept")
        req = self.request
        subprotocol = message.get("subprotocol")
        extra = [(bytes(k).decode("latin-1"), bytes(v).decode("latin-1"))
                 for k, v in (message.get("headers") or ())]
        ext_header = deflate = None
        if self.server.config.compression:
            ext_header, deflate = negotiate_deflate(req.extensions)
        response = accept_response(req, subprotocol, ext_header, extra)
        server = self.server
        conn = server.hub.connection_factory()
        # the session is the connection's route (see the class docstring)
        server.handovers[conn] = (response, self, _intern(req.path), _intern(req.query_string),
                                  subprotocol, deflate)
        server.count_handshake(101)
        self.conn = conn
        self.state = S_OPEN
        self.request = None
        proto.detach()
        self.proto = None
        head = self.head
        if self.early:
            head += bytes(self.early)
        self.head = self.early = None
        transport.set_protocol(conn)
        conn.connection_made(transport)
        conn.feed(head)                    # -> AsgiServer._handshake -> conn._hs_accept
        server.handovers.pop(conn, None)

    def _respond(self, data: bytes, status: int = 0) -> None:
        """Answer the upgrade request with an HTTP response and close."""
        if status:
            self.server.count_handshake(status)
        proto = self.proto
        if proto is not None:
            proto.detach()
            self.proto = None
        t = self.transport
        if t is not None and not t.is_closing():
            t.write(data)
            t.close()

    def _send_denial(self) -> None:
        status, headers, chunks = self.denial
        body = b"".join(chunks)
        headers = [(bytes(k).lower(), bytes(v)) for k, v in headers]
        headers = [(k, v) for k, v in headers if k not in (b"connection", b"transfer-encoding")]
        names = {k for k, _ in headers}
        if b"content-length" not in names:
            headers.append((b"content-length", b"%d" % len(body)))
        if b"date" not in names:
            headers.append((b"date", _clock.date()))
        headers.append((b"connection", b"close"))
        head = _response_head(status, headers)
        head.append(b"\r\n")
        self._respond(b"".join(head) + body, status)
        self._finish(1000, "")

    # -- rooms (the fastws.rooms extension) ---------------------------------

    def join(self, room: str) -> None:
        """Add this WebSocket to ``room`` (after accept); it leaves all its
        rooms when it disconnects.  Raises :class:`fastws.errors.RoomLimitError`
        past ``max_rooms_per_connection`` rooms and
        :class:`fastws.errors.RoomNameError` for a name past ``max_room_name``
        bytes (the app sees it from the extension's ``join`` or from
        ``await send({"type": "fastws.join", ...})``; the WebSocket stays open)."""
        self._need_open("join")
        self.server.rooms.join(self.conn, _check_room(room), "")

    def leave(self, room: str) -> None:
        """Remove this WebSocket from ``room`` (no-op if not a member)."""
        if self.conn is not None:
            self.server.rooms.leave(self.conn, _check_room(room), "")

    def publish(self, room: str, message, exclude_self: bool = False) -> int:
        """Send ``message`` (str: text, bytes: binary) to every member of
        ``room``, encoded once (with a broker: on every worker and node);
        returns how many members of this process it was queued on."""
        return self.server.publish(room, message, self.conn if exclude_self else None)

    def _need_open(self, what: str) -> None:
        if self.state != S_OPEN:
            if self.state == S_CLOSED:
                raise ClientDisconnected("the WebSocket is closed")
            raise RuntimeError(f"fastws.rooms {what} before websocket.accept")

    def _rooms(self, kind: str, message) -> None:
        room = _room_name(message)
        if kind == "fastws.publish":
            self.publish(room, _publish_payload(message), bool(message.get("exclude_self")))
        elif kind == "fastws.join":
            self.join(room)
        else:
            self.leave(room)

    async def _drain(self) -> None:
        # rare slow-consumer path: the engine protocol has no drain hook
        t = self.transport
        while t is not None and not t.is_closing() and t.get_write_buffer_size() > WS_WRITE_LOW:
            await asyncio.sleep(0.005)
            t = self.transport

    # -- the application's task --------------------------------------------

    def run(self) -> None:
        server = self.server
        task = self.task = server.loop.create_task(
            server.app(self.scope, self.receive, self.send), name=_TASK_NAME)
        server.sessions[task] = self
        # one callback object for every session: AsgiServer._session_done
        task.add_done_callback(server.session_done, context=_DONE_CONTEXT)

    def _done(self, task) -> None:
        """The application's task ended (AsgiServer._session_done)."""
        exc = None if task.cancelled() else task.exception()
        state = self.state
        if exc is not None:
            if state == S_CLOSED and _is_disconnect(exc):
                log.debug("fastws: ASGI websocket app ended after the disconnect", exc_info=exc)
            else:
                log.error("fastws: exception in ASGI application (websocket %s)",
                          self.scope["path"], exc_info=exc)
            if state == S_CONNECTING:
                self._respond(error_response(500, "internal error"), 500)
                self._finish(1006, "")
            elif state == S_OPEN and not self.conn.closed:
                self.conn.close(1011, CLOSE_REASONS[1011])
            elif state == S_RESPONDING:
                self._respond(b"")
                self._finish(1006, "")
        elif state == S_CONNECTING:
            if not task.cancelled():
                log.error("fastws: ASGI websocket app returned without accepting or closing (%s)",
                          self.scope["path"])
            self._respond(error_response(500, "internal error"), 500)
            self._finish(1006, "")
        elif state == S_OPEN and not self.conn.closed:
            self.conn.close(1000, "")
        elif state == S_RESPONDING:
            log.error("fastws: ASGI websocket app returned during its denial response")
            self._respond(b"")
            self._finish(1006, "")


# ---------------------------------------------------------------- http

class _HttpCycle:
    """One HTTP request/response exchange: the ``receive``/``send`` pair."""

    __slots__ = ("proto", "scope", "body", "body_size", "more_body", "keep_alive", "expect_100",
                 "started", "status", "headers", "chunked", "head_only", "complete",
                 "disconnected", "waiter", "task", "request_done", "ops")

    def __init__(self, proto, scope, keep_alive: bool, expect_100: bool) -> None:
        self.proto = proto
        self.scope = scope
        self.body = []                # request body chunks not yet received by the app
        self.body_size = 0
        self.more_body = True         # the request body is not complete yet
        self.keep_alive = keep_alive
        self.expect_100 = expect_100
        self.started = False          # http.response.start seen
        self.status = 0
        self.headers = None
        self.chunked = False
        self.head_only = scope["method"] == "HEAD"
        self.complete = False         # the response is complete
        self.disconnected = False
        self.waiter = None
        self.task = None
        self.request_done = False     # the app got the last http.request
        self.ops = None               # the operations handler answering instead of the app's 404

    def wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def _wait(self) -> None:
        self.waiter = self.proto.loop.create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None

    async def receive(self):
        if self.expect_100:
            self.expect_100 = False
            if not self.started and not self.disconnected:
                proto = self.proto
                proto.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                if proto.timer_kind == T_BODY:    # the client sends the body from now on
                    proto._arm(T_BODY, proto.server.config.body_timeout)
        while True:
            if self.disconnected or self.complete:
                return {"type": "http.disconnect"}
            if not self.request_done and (self.body or not self.more_body):
                break
            await self._wait()
        body = b"".join(self.body) if len(self.body) != 1 else self.body[0]
        self.body.clear()
        was = self.body_size
        self.body_size = 0
        if not self.more_body:
            self.request_done = True
        if was >= BODY_HIGH:
            self.proto.maybe_resume()
        return {"type": "http.request", "body": body, "more_body": self.more_body}

    async def send(self, message) -> None:
        kind = message["type"]
        proto = self.proto
        if self.disconnected:
            raise ClientDisconnected("the client closed the connection")
        if proto.write_paused:
            await proto.drain()
            if self.disconnected:
                raise ClientDisconnected("the client closed the connection")
        if kind == "http.response.body":
            if not self.started or self.status == 0:
                raise RuntimeError("http.response.body before http.response.start")
            if self.complete:
                raise RuntimeError("http.response.body after the response was complete")
            body = message.get("body", b"")
            more = message.get("more_body", False)
            if self.ops is not None:
                # the application has no such route: the operations endpoint answers
                if not more:
                    await self._serve_ops()
                return
            if self.headers is not None:
                self._write_head(body, more)
            elif body and not self.head_only:
                if self.chunked:
                    proto.transport.write(b"%x\r\n%s\r\n" % (len(body), body))
                else:
                    proto.transport.write(body)
            if not more:
                if self.chunked and not self.head_only:
                    proto.transport.write(b"0\r\n\r\n")
                self.complete = True
                self.wake()
                proto.cycle_done(self)
        elif kind == "http.response.start":
            if self.started:
                raise RuntimeError("http.response.start sent twice")
            self.started = True
            self.status = int(message["status"])
            self.headers = list(message.get("headers") or ())
            if self.status == 404 and proto.server.http_routes:
                host = next((v for k, v in self.scope["headers"] if k == b"host"), None)
                self.ops = proto.server.ops_route(self.scope["method"],
                                                  self.scope["raw_path"].decode("latin-1"),
                                                  host.decode("latin-1") if host is not None else None)
        elif kind == "fastws.publish":
            proto.server.publish(_room_name(message), _publish_payload(message))
        else:
            raise RuntimeError(f"unexpected ASGI message {kind!r} in an http scope")

    async def _serve_ops(self) -> None:
        """Answer with the operations handler (``/health``, ``/metrics``,
        ``POST /publish`` ...) instead of the application's 404: the
        application's own route of that path wins, as in fastws.App mode."""
        handler, self.ops = self.ops, None
        scope = self.scope
        server = self.proto.server
        chunks, size, limit = [], 0, server.config.max_message_size
        result = None
        while not self.request_done and not self.disconnected:
            msg = await self.receive()
            if msg["type"] != "http.request":
                break
            chunks.append(msg["body"])
            size += len(msg["body"])
            if limit and size > limit:
                result = (413, b"body over max_message_size\n", "text/plain; charset=utf-8")
                self.keep_alive = False
                break
            if not msg.get("more_body"):
                break
        if self.disconnected:
            raise ClientDisconnected("the client closed the connection")
        if result is None:
            request = HttpRequest(
                scope["method"], scope["raw_path"].decode("latin-1"),
                scope["query_string"].decode("latin-1"),
                [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]],
                b"".join(chunks), scope["client"])
            try:
                result = handler(request)
                if asyncio.iscoroutine(result):
                    result = await result
            except Exception as exc:  # noqa: BLE001 - logged, answered with 500
                log.error("fastws: exception in HTTP handler %s", request.path, exc_info=exc)
                result = (500, b"internal error\n", "text/plain; charset=utf-8")
            if self.disconnected:
                raise ClientDisconnected("the client closed the connection")
        status, body, ctype, *rest = result
        if isinstance(body, str):
            body = body.encode("utf-8")
        self.status = int(status)
        self.headers = [(b"content-type", ctype.encode("latin-1"))]
        self.headers += [(str(k).encode("latin-1"), str(v).encode("latin-1"))
                         for k, v in (rest[0] if rest else ())]
        self._write_head(body, False)
        self.complete = True
        self.wake()
        self.proto.cycle_done(self)

    def _write_head(self, body: bytes, more: bool) -> None:
        """The response head, decided when the first body message arrives so
        that a one-message response gets a Content-Length, not chunks."""
        headers, self.headers = self.headers, None
        status = self.status
        out = []
        has_length = False
        for name, value in headers:
            name = bytes(name).lower()
            if name == b"content-length":
                has_length = True
            elif name == b"connection":
                if bytes(value).lower() == b"close":
                    self.keep_alive = False
                continue
            elif name == b"transfer-encoding":
                continue      # the server frames the body
            out.append((name, value))
        no_body = status in _NO_BODY_STATUS or status < 200
        if no_body:
            self.head_only = True
        if not has_length and not no_body:
            if not more:
                out.append((b"content-length", b"%d" % len(body)))
            elif self.scope["http_version"] == "1.1":
                self.chunked = True
                out.append((b"transfer-encoding", b"chunked"))
            else:
                self.keep_alive = False   # HTTP/1.0: the close ends the body
        out.append((b"date", _clock.date()))
        if not self.keep_alive:
            out.append((b"connection", b"close"))
        head = _response_head(status, out)
        head.append(b"\r\n")
        if body and not self.head_only and not no_body:
            head.append(b"%x\r\n%s\r\n" % (len(body), body) if self.chunked else body)
        self.proto.transport.write(b"".join(head))

    def run(self) -> None:
        proto = self.proto
        self.task = proto.loop.create_task(proto.server.app(self.scope, self.receive, self.send))
        self.task.add_done_callback(self._done)

    def _done(self, task) -> None:
        proto = self.proto
        exc = None if task.cancelled() else task.exception()
        if exc is not None:
            if self.disconnected:
                log.debug("fastws: ASGI http app ended after the client left", exc_info=exc)
            else:
                log.error("fastws: exception in ASGI application (%s %s)",
                          self.scope["method"], self.scope["path"], exc_info=exc)
        elif not self.complete and not self.disconnected and not task.cancelled():
            log.error("fastws: ASGI app returned without completing the response (%s %s)",
                      self.scope["method"], self.scope["path"])
        if self.complete or self.disconnected:
            return
        t = proto.transport
        if t is not None and not t.is_closing():
            if not self.started or self.headers is not None:
                t.write(_plain_response(500, b"Internal Server Error\n"))
            t.close()
        self.complete = True
        proto.cycle_done(self)


class HttpProtocol(asyncio.Protocol):
    """One client connection until (unless) it becomes a WebSocket.

    Deadlines (one TimerHandle, ``timer``, waiting for ``timer_kind``):

    * a new connection's first request head must be complete within
      ``handshake_timeout`` of the connect (a silent client is closed then);
    * between keep-alive requests the connection may stay idle for
      ``KEEPALIVE_TIMEOUT``; the next head must then be complete within
      ``handshake_timeout`` of its first byte;
    * a request body must be complete within ``body_timeout`` of its head
      (time while reading is paused because the application is behind, or
      while the client waits for ``100 Continue``, does not count);
    * an upgrade request must be decided within ``handshake_timeout`` too.

    A head or body that is late gets ``408 Request Timeout`` (unless a
    response is already under way) and the connection is closed."""

    __slots__ = ("server", "loop", "transport", "parser", "url", "headers", "head_size",
                 "cycle", "receiving", "pipeline", "timer", "timer_kind", "reading",
                 "write_paused", "drain_waiter", "ws", "client", "local", "read_paused", "closed")

    def __init__(self, server) -> None:
        self.server = server
        self.loop = server.loop
        self.transport = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.headers = []
        self.head_size = 0
        self.cycle = None             # the exchange whose response is being produced
        self.receiving = None         # the exchange whose request is being parsed
        self.pipeline = deque()       # parsed requests waiting for self.cycle to end
        self.timer = None             # the one deadline of this connection (TimerHandle)
        self.timer_kind = 0           # T_IDLE, T_HEAD or T_BODY while self.timer runs
        self.reading = R_IDLE         # R_HEAD / R_BODY: inside a request's head / body
        self.write_paused = False
        self.drain_waiter = None
        self.ws = None                # a WebSocket session deciding on its upgrade
        self.client = None
        self.local = None
        self.read_paused = False
        self.closed = False

    # -- asyncio protocol --------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.client = _addr(transport.get_extra_info("peername"))
        self.local = _local_addr(transport.get_extra_info("sockname"))
        self.server.http_connections.add(self)
        # the first request's head is due within handshake_timeout of the connect
        self._arm(T_HEAD, self.server.config.handshake_timeout)

    def data_received(self, data: bytes) -> None:
        if self.ws is not None:
            self.ws.early_data(data)
            return
        if self.parser is None:
            return      # detached: the transport is closing
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._upgrade(data[exc.args[0]:] if exc.args else b"")
            if self.ws is None and not self.closed:
                # another protocol than WebSocket: served as HTTP, then closed
                self.reading = R_IDLE
                self._deadline()
            return
        except httptools.HttpParserError as exc:
            if self.head_size > self.server.config.max_head_size:
                self._bad_request(431, "Request header fields too large")
            else:
                self._bad_request(400, f"Invalid HTTP request received: {exc}")
            return
        self._deadline()

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.server.http_connections.discard(self)
        self._cancel_timer()
        for c in (self.cycle, self.receiving, *self.pipeline):
            if c is not None:
                c.disconnected = True
                c.wake()
        self.pipeline.clear()
        if self.ws is not None:
            ws, self.ws = self.ws, None
            ws.lost_before_accept()
        w = self.drain_waiter
        if w is not None and not w.done():
            w.set_result(None)
        self.transport = None

    def eof_received(self):
        return None   # close our side too

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        w = self.drain_waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def drain(self) -> None:
        if self.write_paused and not self.closed:
            self.drain_waiter = self.loop.create_future()
            try:
                await self.drain_waiter
            finally:
                self.drain_waiter = None

    def detach(self) -> None:
        """The transport now belongs to someone else (a WebSocket)."""
        self.server.http_connections.discard(self)
        self._cancel_timer()
        self.ws = None
        self.closed = True
        self.parser = None      # breaks the parser <-> protocol cycle at once

    # -- httptools callbacks ------------------------------------------------

    def on_message_begin(self) -> None:
        self.reading = R_HEAD
        self.url = b""
        self.headers = []
        self.head_size = 0

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.head_size += len(url)
        if self.head_size > self.server.config.max_head_size:
            raise _HeadTooLarge

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append(_header(name, value))
        self.head_size += len(name) + len(value) + 4
        if self.head_size > self.server.config.max_head_size:
            raise _HeadTooLarge

    def on_headers_complete(self) -> None:
        parser = self.parser
        self.reading = R_BODY
        if parser.should_upgrade() and self._wants_websocket():
            self.receiving = None
            self.reading = R_IDLE
            return     # the upgrade is handled once the parser stops (HttpParserUpgrade)
        url = httptools.parse_url(self.url)
        raw_path = url.path or b"/"
        path = unquote(raw_path.decode("latin-1"))
        query = url.query or b""
        method = parser.get_method().decode("ascii")
        server = self.server
        scope = {
            "type": "http",
            "asgi": ASGI_HTTP,
            "http_version": parser.get_http_version(),
            "server": self.local,
            "client": self.client,
            "scheme": server.http_scheme,
            "method": method,
            "root_path": "",
            "path": path,
            "raw_path": raw_path,
            "query_string": query,
            "headers": self.headers,
            "state": server.state.copy(),
            "extensions": {"fastws.rooms": server.http_extension},
        }
        expect_100 = any(k == b"expect" and v.lower() == b"100-continue" for k, v in self.headers)
        cycle = _HttpCycle(self, scope, parser.should_keep_alive(), expect_100)
        if parser.should_upgrade():
            cycle.keep_alive = False  # an upgrade we do not speak: serve it, then close
        if server.stopping:
            cycle.keep_alive = False
        self.receiving = cycle
        if self.cycle is None:
            self.cycle = cycle
            cycle.run()
        else:
            self.pipeline.append(cycle)
            self._pause_reading()

    def on_body(self, body: bytes) -> None:
        c = self.receiving
        if c is None:
            return
        c.body.append(body)
        c.body_size += len(body)
        c.wake()
        if c.body_size >= BODY_HIGH:
            self._pause_reading()

    def on_message_complete(self) -> None:
        self.reading = R_IDLE
        c = self.receiving
        if c is None:
            return
        self.receiving = None
        c.more_body = False
        c.wake()

    # -- exchanges -----------------------------------------------------------

    def cycle_done(self, cycle) -> None:
        """``cycle``'s response is complete (or it failed)."""
        if cycle is not self.cycle:
            return
        self.cycle = None
        t = self.transport
        if t is None or self.closed:
            return
        if not cycle.keep_alive or cycle.more_body or self.server.stopping:
            # unread request body, Connection: close, or shutting down
            t.close()
            return
        if self.pipeline:
            nxt = self.pipeline.popleft()
            self.cycle = nxt
            nxt.run()
            if not self.pipeline:
                self.maybe_resume()
        else:
            self.maybe_resume()
            if self.receiving is None and self.timer is None:
                self._arm(T_IDLE, KEEPALIVE_TIMEOUT)

    def maybe_resume(self) -> None:
        if (self.read_paused and not self.pipeline and self.transport is not None
                and not self.closed and (self.receiving is None or self.receiving.body_size < BODY_HIGH)):
            self.read_paused = False
            self.transport.resume_reading()

    def _pause_reading(self) -> None:
        if not self.read_paused and self.transport is not None:
            self.read_paused = True
            self.transport.pause_reading()

    def _wants_websocket(self) -> bool:
        for k, v in self.headers:
            if k == b"upgrade" and v.lower() == b"websocket":
                return True
        return False

    def _upgrade(self, early: bytes) -> None:
        """The parser stopped behind a WebSocket upgrade request."""
        if not self._wants_websocket():
            return   # another protocol: served as HTTP above, closed after the response
        if self.cycle is not None or self.server.stopping:
            # a response is still in flight (pipelined upgrade) or shutting down
            self._bad_request(503, "Service Unavailable")
            return
        method = self.parser.get_method()
        head = b"".join([method, b" ", self.url, b" HTTP/1.1\r\n",
                         *(b"%s: %s\r\n" % (k, v) for k, v in self.headers), b"\r\n"])
        try:
            request = parse_request(head)
        except HandshakeError as exc:
            self.server.count_handshake(exc.status)
            t = self.transport
            t.write(error_response(exc.status, exc.detail, exc.headers))
            t.close()
            return
        if not self.server.origin_policy.allows_request(request):
            # a browser page of a site not allowed (allowed_origins): the app never sees it
            self.server.count_handshake(403)
            t = self.transport
            t.write(error_response(403, "origin not allowed"))
            t.close()
            return
        raw_path, path, query = _target(self.url)
        scope = {
            "type": "websocket",
            "asgi": ASGI_WS,
            "http_version": "1.1",
            "scheme": self.server.ws_scheme,
            "server": self.local,
            "client": self.client,
            "root_path": "",
            "path": path,
            "raw_path": raw_path,
            "query_string": query,
            "headers": self.headers,
            "subprotocols": request.subprotocols or _NO_SUBPROTOCOLS,
            "state": self.server.state.copy(),
            "extensions": None,
        }
        if self.timer_kind != T_HEAD:    # the decision is due within handshake_timeout too
            self._arm(T_HEAD, self.server.config.handshake_timeout)
        session = self.ws = _WebSocketSession(self.server, self, scope, request, head, early)
        scope["extensions"] = {"websocket.http.response": _DENIAL_EXTENSION,
                               "fastws.rooms": _RoomsExtension(session)}
        session.run()

    def _bad_request(self, status: int, text: str) -> None:
        t = self.transport
        if t is None:
            return
        log.debug("fastws: %d %s from %s", status, text, self.client)
        if self.cycle is None or not self.cycle.started:
            t.write(_plain_response(status, text.encode() + b"\n"))
        t.close()

    # -- deadlines -------------------------------------------------------------

    def _deadline(self) -> None:
        """After parsing what was read: the deadline of the request part
        still arriving (no timer at all for a request that came whole)."""
        reading = self.reading
        if reading == R_HEAD:
            if self.timer_kind != T_HEAD:     # a new connection's stays: counted from the connect
                self._arm(T_HEAD, self.server.config.handshake_timeout)
        elif reading == R_BODY:
            if self.timer_kind != T_BODY:
                self._arm(T_BODY, self.server.config.body_timeout)
        elif self.cycle is not None:
            self._cancel_timer()              # a response is under way; cycle_done re-arms

    def _arm(self, kind: int, delay: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer_kind = kind
        self.timer = self.loop.call_later(delay, self._timer_fired)

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
            self.timer_kind = 0

    def _timer_fired(self) -> None:
        kind, self.timer, self.timer_kind = self.timer_kind, None, 0
        t = self.transport
        if t is None or self.closed:
            return
        if kind == T_IDLE:
            if self.cycle is None and self.ws is None:
                t.close()
            return
        server = self.server
        if kind == T_BODY:
            c = self.receiving
            if self.read_paused or (c is not None and c.expect_100 and not c.started):
                # the application is behind (reading paused) or has not asked
                # for the body yet (100 Continue not sent): not the client's delay
                self._arm(T_BODY, server.config.body_timeout)
                return
            server.hub.body_timeouts += 1
        else:
            server.hub.handshake_timeouts += 1
        if self.ws is not None:
            # the application did not decide on the upgrade in time
            log.debug("fastws: upgrade from %s not decided within the handshake timeout",
                      self.client)
            t.close()     # -> connection_lost -> the session sees websocket.disconnect
            return
        cycle = self.cycle
        answer = self.reading != R_IDLE and (
            cycle is None or (cycle is self.receiving and not cycle.started))
        log.debug("fastws: request %s from %s not complete in time",
                  "body" if kind == T_BODY else "head", self.client)
        for c in (cycle, self.receiving, *self.pipeline):
            if c is not None:
                c.disconnected = True     # the application's receive()/send() see it
                c.wake()
        self.parser = None
        if answer:
            t.write(_plain_response(408, b"request timeout\n"))
        t.close()

    def shutdown(self) -> None:
        """Graceful stop: close now if idle, else after the current response."""
        if self.ws is not None:
            return    # the session's task is cancelled by the server
        if self.cycle is None and self.transport is not None:
            self.transport.close()
        elif self.cycle is not None:
            self.cycle.keep_alive = False


class _HeadTooLarge(Exception):
    """Raised in a parser callback; httptools reports it as a callback error."""


# ---------------------------------------------------------------- server

class AsgiServer(ServerWiring):
    """An ASGI application served on one port: HTTP on httptools, WebSockets
    on the fastws engine.

    Collaborators, one field each:

    * ``app``    - the ASGI 3 application;
    * ``config`` - every knob (``fastws.Config``);
    * ``hub``    - the engine-side registry and write coalescer of upgraded
                   WebSockets (``_core.Hub`` or ``_pyconn.Hub``);
    * ``rooms``  - the room registry (``fastws.rooms.Rooms``) behind the
                   ``fastws.rooms`` extension, the same as a ``fastws.App``'s;
    * ``bridge`` - rooms <-> broker (``fastws.broker.bridge``) when a broker
                   is configured (``--broker``, or ``--workers N``);
    * ``health``, ``metrics``, ``stats_page`` - /health + /livez, /metrics,
                   /stats, served when the application answers 404 there;
    * ``state``  - the lifespan state, shallow-copied into every scope.

    Operations and scale-out are wired by :class:`fastws.server.ServerWiring`
    (``_start_operations``, ``_start_broker``, ``add_http_route``), shared
    with the native server.
    """

    def __init__(self, app, config: Config) -> None:
        self.app = app                    # the ASGI 3 callable
        self.config = config              # every knob
        self.hub = None                   # engine hub, set by start()
        self.rooms = None                 # fastws.rooms.Rooms over the hub
        self.http_extension = {}          # the fastws.rooms extension of http scopes
        self.state = {}                   # lifespan state
        self.loop = None
        self.lifespan = None
        self.handovers = {}               # engine conn -> prepared accept, during feed()
        self.http_connections = set()     # HttpProtocol instances still speaking HTTP
        self.sessions = {}                # app task -> WebSocket session, while the task runs
        self.session_done = self._session_done   # the done callback of every session task
        self.stopping = False             # shutdown started: upgrades get 503, /health 503
        self.http_scheme = "http"         # scope["scheme"] of http scopes ("https" with TLS)
        self.ws_scheme = "ws"             # ... of websocket scopes ("wss" with TLS)
        self.handshakes = {}              # HTTP status of each upgrade decision -> count (metrics)
        self.health = None                # /health, /livez and the checks registry
        self.metrics = None               # /metrics, when config.metrics
        self.stats_page = None            # /stats, when config.stats
        self.broker = None                # fastws.broker.Broker when config.broker is set
        self.bridge = None                # fastws.broker.bridge.Bridge: rooms <-> broker
        self.http_routes = {}             # (METHOD, path) -> handler: the operations endpoints
        self._http_paths = set()
        self._http_prefixes = []          # (METHOD, path prefix, handler)
        self._http_prefix_paths = ()
        self._server = None

    @property
    def _loop(self):
        return self.loop      # the name fastws.server, health, metrics and stats use

    @property
    def draining(self) -> bool:
        return self.stopping

    @property
    def port(self) -> int:
        return self._server.sockets[0].getsockname()[1]

    async def start(self, sock: socket.socket | None = None) -> None:
        """Bind (ServerStartError if the port is taken), connect the broker
        (if any), run lifespan startup (LifespanError if it fails), then
        accept connections."""
        loop = self.loop = asyncio.get_running_loop()
        c = self.config
        # knobs the engine hub takes from the Config when this Config has them
        extra = {k: getattr(c, k) for k in _HUB_KNOBS if hasattr(c, k)}
        self.hub = _hub_class()(
            loop,
            self._handshake,
            max_message_size=c.max_message_size,
            max_frame_size=c.max_frame_size,
            max_head_size=max(c.max_head_size, 65536),
            close_timeout=c.close_timeout,
            on_callback_error=self._callback_error,
            **extra,
        )
        self.rooms = Rooms.from_config(self.hub, c)   # with the room limits of the Config
        self.http_extension = {"publish": self._http_publish}
        tls = tls_options(c)              # ServerStartError on a bad certificate or key
        if tls:
            self.http_scheme, self.ws_scheme = "https", "wss"
        try:
            self._start_operations()          # /health, /livez, /metrics, /stats, per config
            if c.broker:
                await self._start_broker()    # rooms across workers and nodes (+ POST /publish)
            if sock is None:
                sock = bind_socket(c.host, c.port, reuse_port=c.reuse_port, backlog=c.backlog)
            self.lifespan = _Lifespan(self.app, self.state)
            try:
                await self.lifespan.startup()
            except BaseException:
                sock.close()
                raise
            self._server = await loop.create_server(lambda: HttpProtocol(self), sock=sock,
                                                    backlog=c.backlog, **tls)
        except BaseException:
            await self._stop_operations()
            raise
        host, port = sock.getsockname()[:2]
        log.info("fastws: ASGI app listening on %s://%s:%d (engine=%s)", self.http_scheme, host,
                 port, core.IMPLEMENTATION)

    async def serve_forever(self) -> None:
        await self._server.serve_forever()

    async def shutdown(self, code: int = 1001, reason: str = "server shutting down") -> None:
        """Stop accepting (after ``drain_delay`` seconds of 503 to upgrades
        and /health); close WebSockets with ``code``; let in-flight HTTP
        responses finish; wait up to ``shutdown_timeout``; then lifespan
        shutdown, then the broker."""
        if self._server is None or self.stopping:
            return
        self.stopping = True
        loop = self.loop
        delay = getattr(self.config, "drain_delay", 0.0)
        if delay > 0:
            log.info("fastws: draining for %gs (/health says 503) before closing %d WebSockets",
                     delay, len(self.hub.connections))
            await asyncio.sleep(delay)
        self._server.close()
        for proto in list(self.http_connections):
            proto.shutdown()
        for session in list(self.sessions.values()):
            if session.state == S_OPEN:
                session.conn.close(code, reason)
            elif session.task is not None:
                session.task.cancel()
        for conn in list(self.hub.connections.values()):
            conn.close(code, reason)
        deadline = loop.time() + self.config.shutdown_timeout
        while (self.hub.connections or self.http_connections or self.sessions) and loop.time() < deadline:
            await asyncio.sleep(0.02)
        for conn in list(self.hub.connections.values()):
            conn.abort()
        for proto in list(self.http_connections):
            if proto.transport is not None:
                proto.transport.abort()
        for task in list(self.sessions):
            task.cancel()
        await asyncio.sleep(0)
        await self.lifespan.shutdown(self.config.shutdown_timeout)
        await self._stop_operations()
        log.info("fastws: stopped")

    async def _stop_operations(self) -> None:
        if self.bridge is not None:
            await self.bridge.stop()
            self.bridge = None
        if self.broker is not None:
            await self.broker.close()
        if self.health is not None:
            self.health.stop()
        if self.metrics is not None and hasattr(self.metrics, "stop"):
            self.metrics.stop()
        if self.stats_page is not None:
            self.stats_page.stop()

    # -- the hub's handshake: completes a hand-over prepared by an accept --

    def _handshake(self, conn, head) -> None:
        prepared = self.handovers.pop(conn, None)
        if prepared is None:
            conn._hs_reject(error_response(400, "unexpected handshake"))
            return
        conn._hs_accept(*prepared)

    def _session_done(self, task) -> None:
        session = self.sessions.pop(task, None)
        if session is not None:
            session._done(task)

    def count_handshake(self, status: int) -> None:
        """One upgrade request decided with HTTP ``status`` (metrics)."""
        self.handshakes[status] = self.handshakes.get(status, 0) + 1

    # -- rooms -----------------------------------------------------------------

    def publish(self, room: str, message, exclude=None) -> int:
        """Send ``message`` to the members of ``room`` (shared namespace),
        encoded once; with a broker also to the other workers and nodes
        (through ``bridge``, like ``App.publish``).  Returns how many members
        of this process it was queued on."""
        if not isinstance(message, str):
            message = bytes(message)
        bridge = self.bridge
        if bridge is None:
            return self.rooms.publish(room, message, exclude=exclude)[1]
        # the bridge delivers locally too, and returns the room's seq: count first
        n = self.rooms.count(room)
        if n and exclude is not None and ("", room) in (exclude.rooms or ()):
            n -= 1
        bridge.publish_nowait(room, message, exclude=exclude)
        return n

    def _http_publish(self, room: str, message, exclude_self: bool = False) -> int:
        # an http scope has no connection of its own to exclude
        return self.publish(_check_room(room), message)

    # -- operations endpoints (served where the application answers 404) -----

    def ops_route(self, method: str, path: str, host=None):
        """The operations handler for ``method path`` (``/health``,
        ``/metrics``, ``POST /publish`` ...) asked on ``Host`` ``host``, or
        None (the application's 404 stands): also when ``ops_hosts`` is set
        and does not list ``host``."""
        if not self.ops_host_allowed(host):
            return None
        handler = self.http_routes.get((method, path))
        if handler is None:
            for m, p, h in self._http_prefixes:
                if m == method and path.startswith(p):
                    return h
        return handler

    def _callback_error(self, conn, exc) -> None:
        log.error("fastws: exception in the ASGI glue for connection %s; closing it with 1011",
                  conn.id, exc_info=exc)


async def serve_asgi(app, config: Config | None = None, sock: socket.socket | None = None,
                     *, started=None) -> None:
    """Serve ``app`` in the running loop until cancelled, then shut down
    gracefully.  ``started`` (optional) is called with the AsgiServer once it
    listens (e.g. to read ``server.port`` when ``config.port == 0``)."""
    server = AsgiServer(app, config or Config())
    await server.start(sock)
    if started is not None:
        started(server)
    try:
        await server.serve_forever()
    finally:
        await asyncio.shield(server.shutdown())


def run_asgi(app, config: Config, sock: socket.socket | None = None) -> None:
    """Serve ``app`` on uvloop until SIGINT/SIGTERM, then shut down
    gracefully (WebSockets closed with 1001, lifespan shutdown); with
    ``config.workers > 1`` as a supervisor of that many worker processes
    (each runs the lifespan; rooms span the workers through the embedded
    broker unless ``config.broker`` names one).

    Raises ServerStartError when the port cannot be bound and LifespanError
    (a ServerStartError) when lifespan startup fails."""
    configure_logging(config.log_level, config.log_format)
    if getattr(config, "workers", 1) > 1 and sock is None:
        from .supervisor import run_workers

        raise SystemExit(run_workers(lambda index: run_until_signal(AsgiServer(app, config)),
                                     config))
    run_until_signal(AsgiServer(app, config), sock)


__all__ = ["AsgiServer", "ClientDisconnected", "LifespanError", "serve_asgi", "run_asgi"]
