"""One WebSocket of an ASGI application: the ``websocket`` scope's
``receive``/``send``, the decision on the upgrade, and the hand-over of the
accepted socket to a fastws engine connection (``Connection.adopt``)."""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections import deque

from ..errors import CLOSE_REASONS, ClientDisconnected, ConnectionClosed
from ..handshake import error_response
from .rooms import check_room, publish_payload, room_name
from .wire import clock, intern, is_disconnect, response_head

log = logging.getLogger("fastws")

WS_QUEUE_HIGH = 64            # received messages the app has not read before reading pauses
WS_QUEUE_LOW = 16             # ... and resumes
WS_EARLY_MAX = 64 * 1024      # bytes accepted after an upgrade request before the decision
WS_WRITE_HIGH = 1 << 22       # unsent bytes past which websocket.send waits
WS_WRITE_LOW = 1 << 20        # ... until the transport buffer is below this

# the state of a session (not the engine's OPEN/CLOSING/CLOSED of fastws.frames)
SESSION_CONNECTING, SESSION_RESPONDING, SESSION_OPEN, SESSION_CLOSED = 0, 1, 2, 3

#: the context the sessions' done callbacks run in (one for all, instead of
#: a copy of the current context per connection; they use no context vars)
_DONE_CONTEXT = contextvars.Context()
_TASK_NAME = "fastws-asgi-websocket"   # every session task's name (one shared str)
NO_SUBPROTOCOLS = ()       # scope["subprotocols"] when the client offers none
DENIAL_EXTENSION = {}      # scope["extensions"]["websocket.http.response"]: always empty
#: what receive() returns once the application handed its WebSocket to a fastws route
HANDED_OVER = {"type": "websocket.disconnect", "code": 1000, "reason": "handed over to a fastws route"}


class WebSocketSession:
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

    __slots__ = ("server", "scope", "request", "proto", "transport", "conn", "state",
                 "events", "waiter", "final", "connect_sent", "paused", "early", "task", "denial")

    # the route interface the engine reads (fastws.app.Route's fields)
    namespace = ""                  # rooms of ASGI apps live in the shared namespace
    on_open = None
    open_is_async = False
    message_is_async = False
    disconnect_is_async = False

    def __init__(self, server, proto, scope, request, early: bytes) -> None:
        self.server = server
        self.scope = scope
        self.request = request        # the parsed upgrade request (handshake.Request), until decided
        self.proto = proto            # the HttpProtocol, until hand-over
        self.transport = proto.transport
        self.conn = None              # the engine connection, once accepted
        self.state = SESSION_CONNECTING
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
                and self.transport is not None and self.state == SESSION_OPEN):
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
        access = self.server.node.access
        if access is not None:
            access.closed(conn, code, reason)
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
        self.state = SESSION_CLOSED
        final = self.final = {"type": "websocket.disconnect", "code": code, "reason": reason or ""}
        self.transport = None
        self.request = self.early = self.denial = None
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
            if state != SESSION_OPEN:
                if state == SESSION_CLOSED:
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
            if state != SESSION_CONNECTING:
                if state == SESSION_CLOSED:
                    raise ClientDisconnected("the client went away before the accept")
                raise RuntimeError(f"websocket.accept in state {state}")
            self._accept(message)
        elif kind == "websocket.close":
            code = message.get("code") or 1000
            reason = message.get("reason") or ""
            if state == SESSION_OPEN:
                if not self.conn.closed:
                    self.conn.close(code, reason)
            elif state == SESSION_CONNECTING:
                self._respond(error_response(403, "connection refused"), 403)
                self._finish(code, reason)
            elif state == SESSION_RESPONDING:
                raise RuntimeError("websocket.close during a denial response")
        elif kind in ("fastws.join", "fastws.leave", "fastws.publish"):
            self._rooms(kind, message)
        elif kind == "websocket.http.response.start":
            if state != SESSION_CONNECTING:
                raise RuntimeError(f"websocket.http.response.start in state {state}")
            self.state = SESSION_RESPONDING
            self.denial = [int(message["status"]), list(message.get("headers") or ()), []]
        elif kind == "websocket.http.response.body":
            if state != SESSION_RESPONDING:
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
        node = self.server.node
        response, deflate = node.accept(req, subprotocol, extra)
        conn = node.hub.connection_factory()
        self.conn = conn
        self.state = SESSION_OPEN
        self.request = None
        held, proto.held = proto.held, None
        proto.detach()
        self.proto = None
        if held is not None:          # the per-address count: conn stands for the upgrade now
            node.handed_over(held, transport, conn)
        early = bytes(self.early) if self.early else b""
        self.early = None
        if node.access is not None:
            node.access.opened(conn, self.scope["client"], self.scope["path"])
        handover = message.get("fastws.route")
        if handover is not None:
            # the application hands the WebSocket to a fastws route (fastws.socketio):
            # ``handover(node)`` gives the route, whose callbacks get every message;
            # the ASGI glue is done (receive() says disconnect, send() refuses)
            route = handover(node)
            if node.access is not None:
                route = node.access.route(route)
            self.state = SESSION_CLOSED
            self.final = HANDED_OVER
            conn.adopt(transport, response, route, intern(req.path), intern(req.query_string),
                       subprotocol, deflate, early)
            return
        # the session is the connection's route (see the class docstring)
        conn.adopt(transport, response, self, intern(req.path), intern(req.query_string),
                   subprotocol, deflate, early)

    def _respond(self, data: bytes, status: int = 0) -> None:
        """Answer the upgrade request with an HTTP response and close."""
        if status:
            node = self.server.node
            node.count_handshake(status)
            if node.access is not None:
                node.access.refused(self.scope["client"], self.scope["path"], status,
                                    "refused by the application")
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
            headers.append((b"date", clock.date()))
        headers.append((b"connection", b"close"))
        head = response_head(status, headers)
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
        self.server.node.rooms.join(self.conn, check_room(room), "")

    def leave(self, room: str) -> None:
        """Remove this WebSocket from ``room`` (no-op if not a member)."""
        if self.conn is not None:
            self.server.node.rooms.leave(self.conn, check_room(room), "")

    def publish(self, room: str, message, exclude_self: bool = False) -> int:
        """Send ``message`` (str: text, bytes: binary) to every member of
        ``room``, encoded once (with a broker: on every worker and node);
        returns how many members of this process it was queued on."""
        return self.server.publish(room, message, self.conn if exclude_self else None)

    def _need_open(self, what: str) -> None:
        if self.state != SESSION_OPEN:
            if self.state == SESSION_CLOSED:
                raise ClientDisconnected("the WebSocket is closed")
            raise RuntimeError(f"fastws.rooms {what} before websocket.accept")

    def _rooms(self, kind: str, message) -> None:
        room = room_name(message)
        if kind == "fastws.publish":
            self.publish(room, publish_payload(message), bool(message.get("exclude_self")))
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
            if state == SESSION_CLOSED and is_disconnect(exc):
                log.debug("fastws: ASGI websocket app ended after the disconnect", exc_info=exc)
            else:
                log.error("fastws: exception in ASGI application (websocket %s)",
                          self.scope["path"], exc_info=exc)
            if state == SESSION_CONNECTING:
                self._respond(error_response(500, "internal error"), 500)
                self._finish(1006, "")
            elif state == SESSION_OPEN and not self.conn.closed:
                self.conn.close(1011, CLOSE_REASONS[1011])
            elif state == SESSION_RESPONDING:
                self._respond(b"")
                self._finish(1006, "")
        elif state == SESSION_CONNECTING:
            if not task.cancelled():
                log.error("fastws: ASGI websocket app returned without accepting or closing (%s)",
                          self.scope["path"])
            self._respond(error_response(500, "internal error"), 500)
            self._finish(1006, "")
        elif state == SESSION_OPEN and not self.conn.closed:
            self.conn.close(1000, "")
        elif state == SESSION_RESPONDING:
            log.error("fastws: ASGI websocket app returned during its denial response")
            self._respond(b"")
            self._finish(1006, "")
