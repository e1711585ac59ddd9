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
glue: a ``Route`` whose ``on_message``/``on_disconnect`` put ASGI events in
the session's deque, and the application's own task.  ``websocket.send``
queues a frame with ``conn.send``; ``websocket.close`` starts the close
handshake with ``conn.close``.

Refusals before accept: ``websocket.close`` -> 403; the denial-response
extension (``websocket.http.response.start/body``) -> the application's own
HTTP response; an exception or a return without accepting -> 500.  After
accept, an exception closes with 1011 and a return closes with 1000.

Rooms (the ``fastws.rooms`` scope extension; see docs/asgi.md): a raw ASGI
application sends ``fastws.join`` / ``fastws.leave`` / ``fastws.publish``
messages; frameworks whose WebSocket wrapper refuses unknown message types
(Starlette, FastAPI) call the ``join``/``leave``/``publish`` callables of
``scope["extensions"]["fastws.rooms"]`` (or ``fastws.asgi_rooms``).  A
publish encodes the message once and queues the same frame on every local
member (``hub.broadcast``).

Flow control: a session whose application does not read pauses the socket
past ``WS_QUEUE_HIGH`` queued messages; ``websocket.send`` waits (polling the
transport's buffer, a rare path) while more than ``WS_WRITE_HIGH`` bytes are
unsent.  HTTP ``send`` waits on ``pause_writing``/``resume_writing``.

Requires uvloop: a fastws engine connection is a duck-typed buffered protocol
(``get_buffer``/``buffer_updated``), which uvloop's ``set_protocol`` accepts.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import deque
from email.utils import formatdate
from urllib.parse import unquote

import httptools

from . import core
from .app import Route
from .config import Config
from .errors import CLOSE_REASONS, ConnectionClosed, HandshakeError
from .rooms import Rooms
from .handshake import accept_response, error_response, negotiate_deflate, parse_request
from .server import ServerStartError, _hub_class, bind_socket, configure_logging, run_until_signal

log = logging.getLogger("fastws")

ASGI_HTTP = {"version": "3.0", "spec_version": "2.4"}
ASGI_WS = {"version": "3.0", "spec_version": "2.4"}
ASGI_LIFESPAN = {"version": "3.0", "spec_version": "2.0"}

KEEPALIVE_TIMEOUT = 5.0       # seconds an idle keep-alive connection stays open
BODY_HIGH = 256 * 1024        # buffered request body bytes before reading pauses
WS_QUEUE_HIGH = 64            # received messages the app has not read before reading pauses
WS_QUEUE_LOW = 16             # ... and resumes
WS_EARLY_MAX = 64 * 1024      # bytes accepted after an upgrade request before the decision
WS_WRITE_HIGH = 1 << 22       # unsent bytes past which websocket.send waits
WS_WRITE_LOW = 1 << 20        # ... until the transport buffer is below this

_NO_BODY_STATUS = frozenset((204, 304))
_HUB_KNOBS = ("high_water", "max_queue", "slow_grace", "ping_interval", "ping_timeout",
              "idle_timeout")


class ClientDisconnected(OSError):
    """``send()`` on a connection the client has closed (ASGI spec 2.4)."""


class LifespanError(ServerStartError):
    """The application's lifespan startup failed: fatal, one clear line."""


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


def _addr(info):
    if isinstance(info, tuple) and len(info) >= 2:
        return (str(info[0]), int(info[1]))
    return None


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

class _LocalRooms:
    """The ``fastws.rooms`` extension's view of the server's rooms: a thin
    adapter over :class:`fastws.rooms.Rooms` (the shared namespace ""), so
    ASGI apps get the same encode-once fan-out, delivery policy and (with a
    broker) cross-node delivery as fastws apps."""

    __slots__ = ("rooms",)

    def __init__(self, hub) -> None:
        self.rooms = Rooms(hub)     # the registry; membership ends when a connection is lost

    def join(self, room: str, conn) -> None:
        self.rooms.join(conn, room, "")

    def leave(self, room: str, conn) -> None:
        self.rooms.leave(conn, room, "")

    def publish(self, room: str, message, exclude=None) -> int:
        return self.rooms.publish(room, message, exclude=exclude)[1]


def _room_name(message) -> str:
    room = message.get("room")
    if not isinstance(room, str) or not room:
        raise TypeError(f"{message['type']} needs a non-empty str 'room', got {room!r}")
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


class _WebSocketSession:
    """The ASGI glue of one WebSocket: its scope, the app's task, the event
    deque ``receive()`` reads, and (once accepted) the engine connection."""

    __slots__ = ("server", "scope", "request", "head", "proto", "transport", "conn", "state",
                 "events", "waiter", "final", "connect_sent", "paused", "early", "task",
                 "rooms", "denial", "denial_body")

    def __init__(self, server, proto, scope, request, head: bytes, early: bytes) -> None:
        self.server = server
        self.scope = scope
        self.request = request        # the parsed upgrade request (handshake.Request)
        self.head = head              # the request head, fed to the engine at hand-over
        self.proto = proto            # the HttpProtocol, until hand-over
        self.transport = proto.transport
        self.conn = None              # the engine connection, once accepted
        self.state = S_CONNECTING
        self.events = deque()         # ASGI events not yet received by the app
        self.waiter = None            # future receive() waits on
        self.final = None             # the websocket.disconnect event, once known
        self.connect_sent = False
        self.paused = False           # we paused reading: the app is behind
        self.early = bytearray(early) # bytes behind the head, before the decision
        self.task = None
        self.rooms = None             # set of rooms joined (fastws.rooms)
        self.denial = None            # (status, headers) of a denial response
        self.denial_body = None

    # -- events in ---------------------------------------------------------

    def _push(self, event) -> None:
        self.events.append(event)
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        elif (not self.paused and len(self.events) > WS_QUEUE_HIGH
                and self.transport is not None and self.state == S_OPEN):
            self.paused = True
            self.transport.pause_reading()

    def on_message(self, conn, data) -> None:
        # called by the engine for each complete message
        if type(data) is str:
            self._push({"type": "websocket.receive", "text": data})
        else:
            self._push({"type": "websocket.receive", "bytes": data})

    def on_disconnect(self, conn, code, reason) -> None:
        # called by the engine once, when the transport is gone
        self._finish(code, reason)

    def early_data(self, data: bytes) -> None:
        """Bytes read by the HTTP protocol behind the upgrade request."""
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
        self.final = {"type": "websocket.disconnect", "code": code, "reason": reason or ""}
        self.transport = None
        if self.rooms:
            for room in self.rooms:
                self.server.rooms.leave(room, self.conn)
            self.rooms = None
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- ASGI callables ----------------------------------------------------

    async def receive(self):
        if not self.connect_sent:
            self.connect_sent = True
            return {"type": "websocket.connect"}
        events = self.events
        while not events:
            if self.final is not None:
                return self.final
            self.waiter = self.server.loop.create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        event = events.popleft()
        if self.paused and len(events) <= WS_QUEUE_LOW:
            self.paused = False
            if self.transport is not None:
                self.transport.resume_reading()
        return event

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
                self._respond(error_response(403, "connection refused"))
                self._finish(code, reason)
            elif state == S_RESPONDING:
                raise RuntimeError("websocket.close during a denial response")
        elif kind in ("fastws.join", "fastws.leave", "fastws.publish"):
            self._rooms(kind, message)
        elif kind == "websocket.http.response.start":
            if state != S_CONNECTING:
                raise RuntimeError(f"websocket.http.response.start in state {state}")
            self.state = S_RESPONDING
            self.denial = (int(message["status"]), list(message.get("headers") or ()))
            self.denial_body = []
        elif kind == "websocket.http.response.body":
            if state != S_RESPONDING:
                raise RuntimeError("websocket.http.response.body without response.start")
            self.denial_body.append(bytes(message.get("body", b"")))
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
        route = Route(req.path)
        route.on_message = self.on_message
        route.on_disconnect = self.on_disconnect
        conn = self.server.hub.connection_factory()
        self.server.handovers[conn] = (response, route, req.path, req.query_string,
                                       subprotocol, deflate)
        self.conn = conn
        self.state = S_OPEN
        proto.detach()
        self.proto = None
        early, self.early = bytes(self.early), None
        transport.set_protocol(conn)
        conn.connection_made(transport)
        conn.feed(self.head + early)       # -> AsgiServer._handshake -> conn._hs_accept
        self.head = None
        self.server.handovers.pop(conn, None)

    def _respond(self, data: bytes) -> None:
        """Answer the upgrade request with an HTTP response and close."""
        proto = self.proto
        if proto is not None:
            proto.detach()
            self.proto = None
        t = self.transport
        if t is not None and not t.is_closing():
            t.write(data)
            t.close()

    def _send_denial(self) -> None:
        status, headers = self.denial
        body = b"".join(self.denial_body)
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
        self._respond(b"".join(head) + body)
        self._finish(1000, "")

    # -- rooms (the fastws.rooms extension) ---------------------------------

    def join(self, room: str) -> None:
        """Add this WebSocket to ``room`` (after accept)."""
        self._need_open("join")
        self.server.rooms.join(room, self.conn)
        if self.rooms is None:
            self.rooms = set()
        self.rooms.add(room)

    def leave(self, room: str) -> None:
        """Remove this WebSocket from ``room`` (no-op if not a member)."""
        if self.rooms is not None and room in self.rooms:
            self.rooms.discard(room)
            self.server.rooms.leave(room, self.conn)

    def publish(self, room: str, message, exclude_self: bool = False) -> int:
        """Send ``message`` (str: text, bytes: binary) to every member of
        ``room`` in this process, encoded once; returns how many got it."""
        if not isinstance(message, str):
            message = bytes(message)
        return self.server.rooms.publish(room, message, self.conn if exclude_self else None)

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
        self.task = self.server.loop.create_task(self.server.app(self.scope, self.receive, self.send))
        self.task.add_done_callback(self._done)
        self.server.sessions.add(self)

    def _done(self, task) -> None:
        self.server.sessions.discard(self)
        exc = None if task.cancelled() else task.exception()
        state = self.state
        if exc is not None:
            if state == S_CLOSED and _is_disconnect(exc):
                log.debug("fastws: ASGI websocket app ended after the disconnect", exc_info=exc)
            else:
                log.error("fastws: exception in ASGI application (websocket %s)",
                          self.scope["path"], exc_info=exc)
            if state == S_CONNECTING:
                self._respond(error_response(500, "internal error"))
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
            self._respond(error_response(500, "internal error"))
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
                 "disconnected", "waiter", "task", "request_done")

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
                self.proto.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
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
        elif kind == "fastws.publish":
            proto.server._publish(_room_name(message), _publish_payload(message))
        else:
            raise RuntimeError(f"unexpected ASGI message {kind!r} in an http scope")

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
    """One client connection until (unless) it becomes a WebSocket."""

    __slots__ = ("server", "loop", "transport", "parser", "url", "headers", "head_size",
                 "cycle", "receiving", "pipeline", "idle_timer", "write_paused", "drain_waiter",
                 "ws", "client", "local", "read_paused", "closed")

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
        self.idle_timer = None
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
        self.local = _addr(transport.get_extra_info("sockname"))
        self.server.http_connections.add(self)
        self._arm_idle()

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
        except httptools.HttpParserError as exc:
            if self.head_size > self.server.config.max_head_size:
                self._bad_request(431, "Request header fields too large")
            else:
                self._bad_request(400, f"Invalid HTTP request received: {exc}")

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.server.http_connections.discard(self)
        self._cancel_idle()
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
        self._cancel_idle()
        self.ws = None
        self.closed = True
        self.parser = None      # breaks the parser <-> protocol cycle at once

    # -- httptools callbacks ------------------------------------------------

    def on_message_begin(self) -> None:
        self._cancel_idle()
        self.url = b""
        self.headers = []
        self.head_size = 0

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.head_size += len(url)
        if self.head_size > self.server.config.max_head_size:
            raise _HeadTooLarge

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))
        self.head_size += len(name) + len(value) + 4
        if self.head_size > self.server.config.max_head_size:
            raise _HeadTooLarge

    def on_headers_complete(self) -> None:
        parser = self.parser
        if parser.should_upgrade() and self._wants_websocket():
            self.receiving = None
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
            "scheme": "http",
            "method": method,
            "root_path": "",
            "path": path,
            "raw_path": raw_path,
            "query_string": query,
            "headers": self.headers,
            "state": server.state.copy(),
            "extensions": {"fastws.rooms": server.http_rooms},
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
            if self.receiving is None:
                self._arm_idle()

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
            t = self.transport
            t.write(error_response(exc.status, exc.detail, exc.headers))
            t.close()
            return
        url = httptools.parse_url(self.url)
        raw_path = url.path or b"/"
        scope = {
            "type": "websocket",
            "asgi": ASGI_WS,
            "http_version": "1.1",
            "scheme": "ws",
            "server": self.local,
            "client": self.client,
            "root_path": "",
            "path": unquote(raw_path.decode("latin-1")),
            "raw_path": raw_path,
            "query_string": url.query or b"",
            "headers": self.headers,
            "subprotocols": request.subprotocols,
            "state": self.server.state.copy(),
            "extensions": {"websocket.http.response": {}},
        }
        self._cancel_idle()
        session = self.ws = _WebSocketSession(self.server, self, scope, request, head, early)
        scope["extensions"]["fastws.rooms"] = {
            "join": session.join, "leave": session.leave, "publish": session.publish,
        }
        session.run()

    def _bad_request(self, status: int, text: str) -> None:
        t = self.transport
        if t is None:
            return
        log.debug("fastws: %d %s from %s", status, text, self.client)
        if self.cycle is None or not self.cycle.started:
            t.write(_plain_response(status, text.encode() + b"\n"))
        t.close()

    def _arm_idle(self) -> None:
        if self.idle_timer is None:
            self.idle_timer = self.loop.call_later(KEEPALIVE_TIMEOUT, self._idle)

    def _cancel_idle(self) -> None:
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None

    def _idle(self) -> None:
        self.idle_timer = None
        if self.cycle is None and self.ws is None and self.transport is not None:
            self.transport.close()

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

class AsgiServer:
    """An ASGI application served on one port: HTTP on httptools, WebSockets
    on the fastws engine.

    Collaborators, one field each:

    * ``app``    - the ASGI 3 application;
    * ``config`` - every knob (``fastws.Config``);
    * ``hub``    - the engine-side registry and write coalescer of upgraded
                   WebSockets (``_core.Hub`` or ``_pyconn.Hub``);
    * ``rooms``  - room name -> members, for the ``fastws.rooms`` extension;
    * ``state``  - the lifespan state, shallow-copied into every scope.
    """

    def __init__(self, app, config: Config) -> None:
        self.app = app                    # the ASGI 3 callable
        self.config = config              # every knob
        self.hub = None                   # engine hub, set by start()
        self.rooms = None                 # _LocalRooms over the hub
        self.http_rooms = {}              # the fastws.rooms extension of http scopes
        self.state = {}                   # lifespan state
        self.loop = None
        self.lifespan = None
        self.handovers = {}               # engine conn -> prepared accept, during feed()
        self.http_connections = set()     # HttpProtocol instances still speaking HTTP
        self.sessions = set()             # WebSocket sessions whose app task runs
        self.stopping = False
        self._server = None

    @property
    def port(self) -> int:
        return self._server.sockets[0].getsockname()[1]

    async def start(self, sock: socket.socket | None = None) -> None:
        """Bind (ServerStartError if the port is taken), run lifespan startup
        (LifespanError if it fails), then accept connections."""
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
        self.rooms = _LocalRooms(self.hub)
        self.http_rooms = {"publish": self._publish}
        if sock is None:
            sock = bind_socket(c.host, c.port, reuse_port=c.reuse_port, backlog=c.backlog)
        self.lifespan = _Lifespan(self.app, self.state)
        try:
            await self.lifespan.startup()
        except BaseException:
            sock.close()
            raise
        self._server = await loop.create_server(lambda: HttpProtocol(self), sock=sock,
                                                backlog=c.backlog)
        host, port = sock.getsockname()[:2]
        log.info("fastws: ASGI app listening on http://%s:%d (engine=%s)", host, port,
                 core.IMPLEMENTATION)

    async def serve_forever(self) -> None:
        await self._server.serve_forever()

    async def shutdown(self, code: int = 1001, reason: str = "server shutting down") -> None:
        """Stop accepting; close WebSockets with ``code``; let in-flight HTTP
        responses finish; wait up to ``shutdown_timeout``; then lifespan
        shutdown."""
        if self._server is None or self.stopping:
            return
        self.stopping = True
        loop = self.loop
        self._server.close()
        for proto in list(self.http_connections):
            proto.shutdown()
        for session in list(self.sessions):
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
        for session in list(self.sessions):
            if session.task is not None:
                session.task.cancel()
        await asyncio.sleep(0)
        await self.lifespan.shutdown(self.config.shutdown_timeout)
        log.info("fastws: stopped")

    # -- the hub's handshake: completes a hand-over prepared by an accept --

    def _handshake(self, conn, head) -> None:
        prepared = self.handovers.pop(conn, None)
        if prepared is None:
            conn._hs_reject(error_response(400, "unexpected handshake"))
            return
        conn._hs_accept(*prepared)

    def _publish(self, room: str, message) -> int:
        if not isinstance(message, str):
            message = bytes(message)
        return self.rooms.publish(room, message)

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
    gracefully (WebSockets closed with 1001, lifespan shutdown).

    Raises ServerStartError when the port cannot be bound and LifespanError
    (a ServerStartError) when lifespan startup fails."""
    configure_logging(config.log_level, config.log_format)
    run_until_signal(AsgiServer(app, config), sock)


__all__ = ["AsgiServer", "ClientDisconnected", "LifespanError", "serve_asgi", "run_asgi"]
