"""The Socket.IO server: python-socketio's ``AsyncServer`` API on a fastws node.

One Engine.IO connection is one fastws engine connection on the node's hub;
what this module keeps per connection is an :class:`EioSession` (the
connection, its sockets, the ack callbacks it still waits for, a binary
packet being received) and per namespace joined a :class:`Socket` (its sid,
its session data).  Heartbeats run from two loop timers per server, whatever
the number of connections: every ``ping_interval`` one ping frame, built once,
goes to every connection (``Hub.broadcast``), and ``ping_timeout`` later the
connections that did not answer are closed.

Rooms are fastws rooms (:class:`fastws.rooms.Rooms`) in a fastws namespace per
Socket.IO namespace: ``"socket.io/chat"`` holds the application's rooms of
``/chat`` and ``"socket.io*/chat"`` the room ``"*"`` every socket of ``/chat``
is in (an emit without ``to``).  An emit encodes its packet once; the hub
queues the same frame on every member; with a broker (``--broker``, or
``--workers N``) the frame goes once to each other node that has members in
that room (the node subscribes to a room's channel only while it has members
there), which queues it on its own members without decoding it.  What a
plain frame cannot say (binary attachments, which must stay together; a
list of rooms, delivered once per socket; sids to skip on other nodes; a sid
this node does not hold) travels as a small envelope that the receiving node
unpacks (:func:`pack_envelope`).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import secrets
import struct

from ..broker.wire import pack_room_message
from ..errors import PING_TIMEOUT, ConnectionClosed, FastWSError, Reject, RoomError
from ..frames import BINARY, PRIORITY_HIGH, PRIORITY_LOW, PRIORITY_NORMAL, TEXT
from .packets import (
    ACK,
    BINARY_ACK,
    BINARY_EVENT,
    CONNECT,
    CONNECT_ERROR,
    DISCONNECT,
    EIO_PING,
    EVENT,
    PacketError,
    args_of,
    decode,
    encode,
    open_packet,
    reconstruct,
)
from .recovery import Recovery

log = logging.getLogger("fastws.socketio")

#: the fastws room namespaces of a Socket.IO namespace ``ns``: its rooms, and its every-socket room
ROOMS_PREFIX = "socket.io"
ALL_PREFIX = "socket.io*"
ALL_ROOM = "*"

#: close codes of the Engine.IO connection
INVALID_PACKET = (1007, "invalid Socket.IO packet")
TOO_BIG = (1009, "Socket.IO packet over maxPayload")
CONNECT_TIMEOUT = (1008, "no Socket.IO namespace joined in time")

#: recovery: the disconnect reasons after which a socket's state is kept
RECOVERABLE = frozenset({"transport close", "transport error", "ping timeout", "server shutting down"})

ENVELOPE_MAGIC = b"SIO1"
_SID_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
SID_LENGTH = 20


class ConnectionRefusedError(FastWSError):
    """Raised by a ``connect`` handler to refuse the namespace: the client
    gets CONNECT_ERROR with ``message`` (the first argument) and ``data``
    (the second, or the rest as a list), as python-socketio's."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        if not args:
            self.error_args = {"message": "Connection rejected by server"}
        else:
            self.error_args = {"message": str(args[0])}
            if len(args) == 2:
                self.error_args["data"] = args[1]
            elif len(args) > 2:
                self.error_args["data"] = list(args[1:])


class TimeoutError(FastWSError, asyncio.TimeoutError):  # python-socketio's name
    """``call()`` got no acknowledgement within its timeout."""


class DisconnectedError(FastWSError):
    """``call()`` to a sid that is not connected to this node."""


class reason:  # python-socketio's spelling
    """The disconnect reasons a ``disconnect(sid, reason)`` handler gets."""

    SERVER_DISCONNECT = "server disconnect"
    CLIENT_DISCONNECT = "client disconnect"
    PING_TIMEOUT = "ping timeout"
    TRANSPORT_CLOSE = "transport close"
    TRANSPORT_ERROR = "transport error"
    SERVER_SHUTTING_DOWN = "server shutting down"


class Done:
    """The awaitable result of an operation that is already done
    (``await sio.emit(...)`` as with python-socketio; the call alone does it)."""

    __slots__ = ("value",)

    def __init__(self, value=None) -> None:
        self.value = value

    def __await__(self):
        return self.value
        yield  # makes this a generator: awaiting it returns at once

    def __repr__(self) -> str:
        return f"<done: {self.value!r}>"


DONE = Done()


class Socket:
    """One namespace joined by one Engine.IO connection."""

    __slots__ = ("sid", "namespace", "session", "data", "pid", "rooms", "ready")

    def __init__(self, sid: str, namespace: str, session) -> None:
        self.sid = sid
        self.namespace = namespace
        self.session = session      # the EioSession
        self.data = None            # the session dict (get_session/save_session), on first use
        self.pid = None             # recovery: the private id
        self.rooms = ()             # recovery: the application's rooms (kept to be restored)
        self.ready = False          # the connect handler accepted it


class EioSession:
    """One Engine.IO connection (one fastws engine connection)."""

    __slots__ = ("conn", "sockets", "acks", "ack_seq", "partial", "pong_due", "idle", "headers",
                 "reason")

    def __init__(self, conn, headers) -> None:
        self.conn = conn
        self.sockets = ()           # Socket per namespace joined
        self.acks = None            # ack id -> callback, while acks are pending
        self.ack_seq = 0
        self.partial = None         # [Packet, attachments, bytes] of a binary packet being received
        self.pong_due = 0           # the ping round not answered yet (0: none)
        self.idle = 0               # ping rounds without a namespace joined
        self.headers = headers      # the upgrade request's headers (the environ of connect handlers)
        self.reason = None          # why the server closed it

    def socket(self, namespace: str):
        for s in self.sockets:
            if s.namespace == namespace:
                return s
        return None


class Handler:
    """An application handler and how to call it."""

    __slots__ = ("fn", "is_async", "nargs", "varargs")

    def __init__(self, fn) -> None:
        self.fn = fn
        self.is_async = inspect.iscoroutinefunction(fn)
        try:
            params = inspect.signature(fn).parameters.values()
        except (TypeError, ValueError):
            params = ()
        self.varargs = any(p.kind == p.VAR_POSITIONAL for p in params)
        self.nargs = sum(1 for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))

    def fit(self, args: tuple) -> tuple:
        """``args`` cut to what the handler takes (connect: sid, environ,
        auth; disconnect: sid, reason), as python-socketio calls them."""
        if self.varargs or len(args) <= self.nargs:
            return args
        return args[:self.nargs]


def new_sid() -> str:
    """A random id: 20 characters of base64url (120 bits)."""
    return secrets.token_urlsafe(15)


def sid_like(value) -> bool:
    """Could ``value`` be a sid (of another node)?"""
    return type(value) is str and len(value) == SID_LENGTH and _SID_CHARS.issuperset(value)


def pack_envelope(rooms, skip, messages) -> bytes:
    """The broker form of a packet a plain frame cannot carry: ``rooms`` (the
    whole list of an emit to several rooms or to sids of other nodes, else
    empty), ``skip`` (sids not to deliver to) and ``messages`` (the text
    message, then the binary attachments)."""
    head = json.dumps({"r": list(rooms), "s": list(skip),
                       "m": [len(m.encode("utf-8")) if type(m) is str else -len(m) for m in messages]},
                      separators=(",", ":")).encode("utf-8")
    parts = [ENVELOPE_MAGIC, struct.pack("!I", len(head)), head]
    parts += [m.encode("utf-8") if type(m) is str else m for m in messages]
    return b"".join(parts)


def unpack_envelope(payload) -> tuple:
    """``(rooms, skip, messages)`` of :func:`pack_envelope`; ValueError when it is not one."""
    payload = bytes(payload)
    if payload[:4] != ENVELOPE_MAGIC or len(payload) < 8:
        raise ValueError("not a Socket.IO envelope")
    (n,) = struct.unpack_from("!I", payload, 4)
    head = json.loads(payload[8:8 + n])
    pos = 8 + n
    messages = []
    for size in head["m"]:
        if size >= 0:
            messages.append(payload[pos:pos + size].decode("utf-8"))
            pos += size
        else:
            messages.append(payload[pos:pos - size])
            pos -= size
    if pos != len(payload) or not messages or type(messages[0]) is not str:
        raise ValueError("a Socket.IO envelope of the wrong length")
    return tuple(head["r"]), tuple(head["s"]), tuple(messages)


class Server:
    """A Socket.IO server, with the API of python-socketio's ``AsyncServer``.

    ::

        sio = fastws.socketio.Server()

        @sio.event
        async def connect(sid, environ, auth):
            await sio.enter_room(sid, "lobby")

        @sio.on("chat message", namespace="/chat")
        async def chat(sid, data):
            await sio.emit("chat message", data, to="lobby", skip_sid=sid, namespace="/chat")
            return "ok"                      # the client's ack gets "ok"

        app = fastws.App()
        sio.attach(app)                      # fastws serve module:app
        # or, beside FastAPI routes: asgi = fastws.socketio.ASGIApp(sio, fastapi_app)

    Settings (the Engine.IO/Socket.IO protocol's own; the server's limits,
    TLS, brokers ... are fastws settings, ``fastws serve --help``):

    * ``ping_interval`` / ``ping_timeout`` (seconds): the Engine.IO heartbeat;
    * ``max_http_buffer_size``: the largest packet accepted (``maxPayload``;
      a text message or a binary packet's attachments past it close the
      connection with 1009); the WebSocket ``max_message_size`` applies too;
    * ``namespaces``: ``"*"`` (every namespace), a list, or None (those with
      handlers);
    * ``always_connect``: answer CONNECT before the ``connect`` handler runs;
    * ``async_handlers``: async handlers run in a task each (as python-socketio);
      False awaits them in order, one event of a connection after the other
      is not guaranteed either way for async handlers (plain functions run at
      once, in order);
    * ``connection_state_recovery``: Socket.IO 4.6's recovery (see
      :mod:`fastws.socketio.recovery`), ``max_disconnection_duration``
      seconds, at most ``recovery_packets`` kept packets;
    * ``connect_timeout``: seconds a connection may stay without a namespace.

    Accepted for compatibility and without effect: ``async_mode``,
    ``cors_allowed_origins`` (browser origins are fastws's
    ``allowed_origins`` setting), ``cors_credentials``, ``logger``,
    ``engineio_logger``, ``http_compression``, ``compression_threshold``,
    ``allow_upgrades``, ``cookie``, ``monitor_clients``, ``client_manager``
    (rooms reach other workers and nodes through fastws's ``--broker``).
    """

    reason = reason

    _IGNORED = frozenset({"async_mode", "cors_allowed_origins", "cors_credentials", "logger",
                          "engineio_logger", "http_compression", "compression_threshold",
                          "allow_upgrades", "cookie", "monitor_clients", "client_manager", "json",
                          "transports"})

    def __init__(self, *, ping_interval: float = 25.0, ping_timeout: float = 20.0,
                 max_http_buffer_size: int = 1_000_000, namespaces=None, always_connect: bool = False,
                 async_handlers: bool = True, connection_state_recovery: bool = False,
                 max_disconnection_duration: float = 120.0, recovery_packets: int = 10_000,
                 connect_timeout: float = 45.0, **compat) -> None:
        unknown = sorted(set(compat) - self._IGNORED)
        if unknown:
            raise TypeError(f"fastws.socketio.Server() got unknown settings: {', '.join(unknown)}")
        transports = compat.get("transports")
        if transports is not None and "websocket" not in transports:
            raise ValueError("fastws.socketio serves the websocket transport only: transports must "
                             "include 'websocket'")
        if isinstance(ping_interval, tuple):     # python-socketio's (interval, grace)
            ping_interval = ping_interval[0]
        for name, value in (("ping_interval", ping_interval), ("ping_timeout", ping_timeout),
                            ("connect_timeout", connect_timeout)):
            if not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"{name} must be a number of seconds > 0, got {value!r}")
        if not isinstance(max_http_buffer_size, int) or max_http_buffer_size <= 0:
            raise ValueError(f"max_http_buffer_size must be an int > 0, got {max_http_buffer_size!r}")
        self.ping_interval = float(ping_interval)
        self.ping_timeout = float(ping_timeout)
        self.max_payload = max_http_buffer_size
        self.namespaces = namespaces
        self.always_connect = always_connect
        self.async_handlers = async_handlers
        self.connect_timeout = float(connect_timeout)
        self.recovery = (Recovery(max_disconnection_duration, recovery_packets)
                         if connection_state_recovery else None)
        self.handlers: dict = {}          # namespace -> {event: Handler}
        self.namespace_handlers: dict = {}  # namespace -> Namespace object
        self.node = None                  # the fastws Node, once bound
        self.hub = None
        self.registry = None       # the node's fastws.rooms.Rooms
        self.loop = None
        self.sessions: dict = {}          # engine connection -> EioSession
        self.sockets: dict = {}           # sid -> Socket (this node's)
        self.tasks: set = set()           # running handler tasks
        self.upgrading = None             # headers of the upgrade being accepted (native front)
        self._timers = []
        self._round = 0                   # ping rounds so far
        self._hooked: set = set()         # fastws namespaces whose remote frames come to us
        self.counters = {"connections": 0, "packets_in": 0, "events_in": 0, "emits": 0,
                         "invalid": 0, "ping_timeouts": 0, "handler_errors": 0}

    # -- handlers ---------------------------------------------------------------------

    def on(self, event: str, handler=None, namespace: str | None = None):
        """Register ``handler`` for ``event`` (a decorator when ``handler``
        is None).  ``"connect"``: ``fn(sid, environ[, auth])``, return False
        or raise :class:`ConnectionRefusedError` to refuse; ``"disconnect"``:
        ``fn(sid[, reason])``; ``"*"``: every event without a handler of its
        own, ``fn(event, sid, *args)``; any other event: ``fn(sid, *args)``,
        whose return value answers the client's ack (a tuple: several
        arguments).  Plain functions run at once; ``async def`` ones in a task."""
        ns = namespace or "/"

        def register(fn):
            if not callable(fn):
                raise TypeError(f"a Socket.IO handler must be callable, got {fn!r}")
            self.handlers.setdefault(ns, {})[event] = Handler(fn)
            return fn

        if handler is None:
            return register
        register(handler)
        return None

    def event(self, *args, **kwargs):
        """Decorator: the function's name is the event (``@sio.event``, or
        ``@sio.event(namespace="/chat")``)."""
        if len(args) == 1 and not kwargs and callable(args[0]):
            return self.on(args[0].__name__)(args[0])

        def deco(fn):
            return self.on(fn.__name__, **kwargs)(fn)
        return deco

    def register_namespace(self, namespace_handler) -> None:
        """Register a class-based namespace (:class:`fastws.socketio.AsyncNamespace`)."""
        namespace_handler._set_server(self)
        self.namespace_handlers[namespace_handler.namespace] = namespace_handler

    def _handler(self, namespace: str, event: str):
        """``(handler, catch_all)`` for ``event`` of ``namespace``, or (None, False)."""
        table = self.handlers.get(namespace)
        if table is not None:
            h = table.get(event)
            if h is not None:
                return h, False
        nsh = self.namespace_handlers.get(namespace)
        if nsh is not None:
            h = nsh.handler(event)
            if h is not None:
                return h, False
        if table is not None and event not in ("connect", "disconnect"):
            h = table.get("*")
            if h is not None:
                return h, True
        return None, False

    def _namespace_allowed(self, namespace: str) -> bool:
        if namespace in self.handlers or namespace in self.namespace_handlers:
            return True
        ns = self.namespaces
        return ns == "*" or (ns is not None and namespace in ns)

    # -- the node ----------------------------------------------------------------------

    def bind(self, node) -> None:
        """Serve on ``node`` (a :class:`fastws.node.Node` that started); done
        by the fronts.  A second call with the same node does nothing."""
        if self.node is node:
            return
        if self.node is not None:
            raise RuntimeError("this Socket.IO server already serves on another node")
        self.node = node
        self.hub = node.hub
        self.registry = node.rooms
        self.loop = node.loop
        self._timers.append(self.loop.call_later(self.ping_interval, self._ping_round))

    def unbind(self) -> None:
        """Stop the heartbeat timers (the node stops)."""
        for t in self._timers:
            t.cancel()
        self._timers.clear()
        for task in list(self.tasks):
            task.cancel()
        for fastns in self._hooked:
            if self.registry is not None:
                self.registry.frame_handlers.pop(fastns, None)
        self._hooked.clear()
        self.node = self.hub = self.registry = None       # the node's fastws.rooms.Rooms

    def _hook(self, namespace: str) -> None:
        """Take the remote frames of ``namespace``'s rooms (envelopes; with
        recovery every packet, to keep it)."""
        for fastns in (ROOMS_PREFIX + namespace, ALL_PREFIX + namespace):
            if fastns not in self._hooked:
                self._hooked.add(fastns)
                self.registry.frame_handlers[fastns] = self._remote_frame

    # -- the native front ------------------------------------------------------------

    def attach(self, app, socketio_path: str = "socket.io") -> None:
        """Serve this Socket.IO server on the :class:`fastws.App` ``app`` at
        ``/socketio_path/`` (``fastws serve module:app``).  A long-polling
        request there gets 400 with Engine.IO's "Transport unknown" (see
        :data:`POLLING_REFUSED`)."""
        path = "/" + socketio_path.strip("/") + "/"
        for p in (path, path.rstrip("/")):
            app.route(p, on_connect=self._upgrade, on_open=self.opened, on_message=self.message,
                      on_disconnect=self.closed, namespace=ROOMS_PREFIX)
            for method in ("GET", "POST"):
                app.http(method, p)(self._polling)
        app.on_startup(lambda: self.bind(app.node))
        app.on_shutdown(self.unbind)

    def _upgrade(self, request):
        """The native front's upgrade decision: Engine.IO v4 over WebSocket only."""
        refused = self.check_request(request.query)
        if refused is not None:
            return Reject(refused[0], refused[1])
        self.upgrading = request.headers       # picked up by opened(), which runs next
        return None

    @staticmethod
    def _polling(request) -> tuple:
        return 400, POLLING_REFUSED, "application/json"

    # -- the engine connection (both fronts call these) ------------------------------

    def check_request(self, path_query: dict):
        """Why an upgrade with these query parameters is refused (``(status,
        Engine.IO error JSON)``), or None."""
        if path_query.get("EIO") != "4":
            return 400, '{"code":5,"message":"Unsupported protocol version"}'
        if path_query.get("transport") != "websocket":
            return 400, POLLING_REFUSED
        return None

    def opened(self, conn, headers=None) -> None:
        """A new Engine.IO connection (the WebSocket is open): the open packet."""
        if self.node is None:
            conn.close(1011, "Socket.IO server not started")
            return
        s = EioSession(conn, headers if headers is not None else self.upgrading)
        self.upgrading = None
        self.sessions[conn] = s
        self.counters["connections"] += 1
        conn.send(open_packet(new_sid(), self.ping_interval, self.ping_timeout, self.max_payload))

    def message(self, conn, data) -> None:
        """One WebSocket message of an Engine.IO connection."""
        s = self.sessions.get(conn)
        if s is None:
            return
        s.pong_due = 0
        if type(data) is str:
            if s.partial is not None:
                self._invalid(s, "a text message where a binary attachment was due")
                return
            c = data[:1]
            if c == "4":
                if len(data) > self.max_payload:
                    self._close(s, TOO_BIG)
                    return
                self.counters["packets_in"] += 1
                try:
                    p = decode(data[1:])
                except PacketError as exc:
                    self._invalid(s, str(exc))
                    return
                if p.attachments:
                    if p.type != BINARY_EVENT and p.type != BINARY_ACK:
                        self._invalid(s, "attachments on a packet that takes none")
                        return
                    s.partial = [p, [], 0]
                    return
                self._dispatch(s, p)
            elif c == "3" or c == "6" or c == "5":
                return                       # pong (pong_due cleared above), noop, upgrade
            elif c == "2":
                conn.send("3" + data[1:])    # a client's ping: pong
            elif c == "1":
                s.reason = reason.CLIENT_DISCONNECT
                conn.close(1000, "")
            else:
                self._invalid(s, f"unknown Engine.IO packet {data[:8]!r}")
            return
        partial = s.partial
        if partial is None:
            self._invalid(s, "a binary message without a binary packet")
            return
        p, atts, size = partial
        size += len(data)
        if size > self.max_payload:
            self._close(s, TOO_BIG)
            return
        atts.append(data)
        partial[2] = size
        if len(atts) < p.attachments:
            return
        s.partial = None
        try:
            p.data = reconstruct(p.data, atts)
        except PacketError as exc:
            self._invalid(s, str(exc))
            return
        p.type = EVENT if p.type == BINARY_EVENT else ACK
        self._dispatch(s, p)

    def closed(self, conn, code: int, why: str) -> None:
        """The engine connection is gone: every socket of it disconnects."""
        s = self.sessions.pop(conn, None)
        if s is None:
            return
        r = s.reason
        if r is None:
            # no DISCONNECT packet and no Engine.IO close first: the transport closed (a close
            # frame or a lost link; recoverable), or failed (a protocol error)
            if code in (1000, 1001, 1005, 1006):
                r = reason.SERVER_SHUTTING_DOWN if why.startswith("server") else reason.TRANSPORT_CLOSE
            else:
                r = reason.TRANSPORT_ERROR
        acks, s.acks = s.acks, None
        for sock in s.sockets:
            self._gone(sock, r, leave=False)
        s.sockets = ()
        s.partial = None
        s.headers = None
        if acks:
            for cb in acks.values():
                if isinstance(cb, asyncio.Future) and not cb.done():
                    cb.cancel()

    # -- packets in ----------------------------------------------------------------------

    def _invalid(self, s: EioSession, detail: str) -> None:
        self.counters["invalid"] += 1
        if log.isEnabledFor(logging.DEBUG):
            log.debug("fastws.socketio: closing %s: %s", s.conn.id, detail)
        self._close(s, INVALID_PACKET, reason.TRANSPORT_ERROR)

    @staticmethod
    def _close(s: EioSession, code_reason: tuple, why: str = reason.TRANSPORT_ERROR) -> None:
        if s.reason is None:
            s.reason = why
        s.partial = None
        s.conn.close(*code_reason)

    def _dispatch(self, s: EioSession, p) -> None:
        t = p.type
        if t == EVENT:
            self._event(s, p)
        elif t == ACK:
            self._ack(s, p)
        elif t == CONNECT:
            self._connect(s, p)
        elif t == DISCONNECT:
            sock = s.socket(p.namespace)
            if sock is not None:
                self._gone(sock, reason.CLIENT_DISCONNECT)
        else:
            self._invalid(s, f"a client may not send packet type {t}")

    def _event(self, s: EioSession, p) -> None:
        data = p.data
        if type(data) is not list or not data or type(data[0]) is not str:
            self._invalid(s, "an EVENT whose data is not [name, ...args]")
            return
        sock = s.socket(p.namespace)
        if sock is None or not sock.ready:
            return                     # not connected to that namespace: ignored, as python-socketio
        self.counters["events_in"] += 1
        handler, catch_all = self._handler(p.namespace, data[0])
        if handler is None:
            return
        args = (data[0], sock.sid, *data[1:]) if catch_all else (sock.sid, *data[1:])
        if handler.is_async:
            if self.async_handlers:
                self._spawn(self._run_event(handler, args, sock, p.id, data[0]))
            else:
                self._serial(sock.session, self._run_event(handler, args, sock, p.id, data[0]))
            return
        try:
            result = handler.fn(*args)
        except Exception as exc:
            self._handler_error(data[0], exc)
            return
        if p.id is not None:
            self._send_ack(sock, p.id, result)

    async def _run_event(self, handler, args, sock, ack_id, event) -> None:
        try:
            result = await handler.fn(*args)
        except asyncio.CancelledError:
            return
        except Exception as exc:
            self._handler_error(event, exc)
            return
        if ack_id is not None:
            self._send_ack(sock, ack_id, result)

    def _handler_error(self, event: str, exc) -> None:
        self.counters["handler_errors"] += 1
        log.error("fastws.socketio: exception in the handler of event %r", event, exc_info=exc)

    def _spawn(self, coro) -> None:
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _serial(self, s: EioSession, coro) -> None:
        # async_handlers=False: one task per event still, but run as they came
        self._spawn(coro)

    def _send_ack(self, sock: Socket, ack_id: int, result) -> None:
        if result is None:
            args = []
        elif type(result) is tuple:
            args = list(result)
        else:
            args = [result]
        text, atts = encode(ACK, sock.namespace, args, ack_id)
        self._send(sock.session.conn, text, atts)

    def _ack(self, s: EioSession, p) -> None:
        acks = s.acks
        cb = acks.pop(p.id, None) if acks else None
        if acks is not None and not acks:
            s.acks = None
        if cb is None:
            return
        args = p.data if type(p.data) is list else [p.data]
        if isinstance(cb, asyncio.Future):
            if not cb.done():
                cb.set_result(args)
            return
        try:
            res = cb(*args)
            if inspect.isawaitable(res):
                self._spawn(_await(res))
        except Exception as exc:
            self._handler_error("<ack callback>", exc)

    # -- namespaces: connect and disconnect --------------------------------------------

    def _connect(self, s: EioSession, p) -> None:
        ns = p.namespace
        auth = p.data
        if auth is not None and type(auth) is not dict:
            self._invalid(s, "a CONNECT whose data is not an object")
            return
        if s.socket(ns) is not None:
            return                                   # already connected there
        if not self._namespace_allowed(ns):
            self._send(s.conn, encode(CONNECT_ERROR, ns, {"message": "Invalid namespace"})[0])
            return
        self._hook(ns)
        restored = None
        if self.recovery is not None and auth and "pid" in auth:
            restored = self.recovery.restore(auth.get("pid"), auth.get("offset"), ns)
            auth = {k: v for k, v in auth.items() if k not in ("pid", "offset")} or None
        sock = Socket(restored[0].sid if restored else new_sid(), ns, s)
        if self.recovery is not None:
            sock.pid = p.data["pid"] if restored else new_sid()
        s.sockets += (sock,)
        self.sockets[sock.sid] = sock
        s.idle = 0
        if restored:
            saved = restored[0]
            sock.data = saved.data
            for room in saved.rooms:
                self._join(sock, room)
        if self.always_connect:
            self._accepted(sock, restored)
        handler, _ = self._handler(ns, "connect")
        if handler is None:
            if not self.always_connect:
                self._accepted(sock, restored)
            return
        args = handler.fit((sock.sid, self.environ(s), auth))
        if handler.is_async:
            self._spawn(self._run_connect(handler, args, sock, restored))
            return
        try:
            ok = handler.fn(*args)
        except ConnectionRefusedError as exc:
            self._refused(sock, exc.error_args)
            return
        except Exception as exc:
            self._handler_error("connect", exc)
            self._refused(sock, {"message": "Connection rejected by server"})
            return
        self._decided(sock, ok, restored)

    async def _run_connect(self, handler, args, sock, restored) -> None:
        try:
            ok = await handler.fn(*args)
        except asyncio.CancelledError:
            return
        except ConnectionRefusedError as exc:
            self._refused(sock, exc.error_args)
            return
        except Exception as exc:
            self._handler_error("connect", exc)
            self._refused(sock, {"message": "Connection rejected by server"})
            return
        self._decided(sock, ok, restored)

    def _decided(self, sock: Socket, ok, restored) -> None:
        if ok is False:
            self._refused(sock, {"message": "Connection rejected by server"})
        elif not self.always_connect:
            self._accepted(sock, restored)

    def _accepted(self, sock: Socket, restored) -> None:
        s = sock.session
        if s.conn.closed or sock.sid not in self.sockets:
            return
        sock.ready = True
        ns = sock.namespace
        self._hook(ns)
        try:
            self.registry.join(s.conn, ALL_ROOM, ALL_PREFIX + ns)
        except RoomError as exc:
            log.error("fastws.socketio: socket %s cannot join its namespace's room: %s", sock.sid, exc)
        answer = {"sid": sock.sid}
        if sock.pid is not None:
            answer["pid"] = sock.pid
        self._send(s.conn, encode(CONNECT, ns, answer)[0])
        if restored:
            for messages in restored[1]:
                self._send(s.conn, messages[0], messages[1:])

    def _refused(self, sock: Socket, error_args: dict) -> None:
        s = sock.session
        if self.always_connect:
            text = encode(DISCONNECT, sock.namespace, None)[0]
        else:
            text = encode(CONNECT_ERROR, sock.namespace, error_args)[0]
        self._forget(sock)
        if not s.conn.closed:
            self._send(s.conn, text)

    def _forget(self, sock: Socket) -> None:
        """Remove ``sock`` from the tables and its rooms."""
        s = sock.session
        if self.sockets.get(sock.sid) is sock:
            del self.sockets[sock.sid]
        s.sockets = tuple(x for x in s.sockets if x is not sock)
        conn = s.conn
        if conn.rooms:
            mine = (ROOMS_PREFIX + sock.namespace, ALL_PREFIX + sock.namespace)
            for key in [k for k in conn.rooms if k[0] in mine]:
                self.registry.leave(conn, key[1], key[0])
        sock.ready = False

    def _gone(self, sock: Socket, why: str, leave: bool = True) -> None:
        """``sock`` disconnected (``why``): the disconnect handler runs;
        with recovery its state is kept when the reason allows it."""
        was_ready = sock.ready
        if self.recovery is not None and was_ready and why in RECOVERABLE and sock.pid is not None:
            self.recovery.save(sock.pid, sock.sid, sock.namespace, tuple(sock.rooms), sock.data)
        if leave:
            self._forget(sock)
        else:
            if self.sockets.get(sock.sid) is sock:
                del self.sockets[sock.sid]
            sock.ready = False
        if not was_ready:
            return
        handler, _ = self._handler(sock.namespace, "disconnect")
        if handler is None:
            return
        args = handler.fit((sock.sid, why))
        if handler.is_async:
            self._spawn(_await(handler.fn(*args), "disconnect"))
            return
        try:
            handler.fn(*args)
        except Exception as exc:
            self._handler_error("disconnect", exc)

    def environ(self, s: EioSession) -> dict:
        """The WSGI-style ``environ`` a connect handler gets (built per call)."""
        conn = s.conn
        addr = None
        node = self.node
        if node is not None:
            addr = node.remote_address(conn)
        env = {"REQUEST_METHOD": "GET", "PATH_INFO": conn.path, "QUERY_STRING": conn.query_string,
               "REMOTE_ADDR": addr[0] if isinstance(addr, tuple) else addr, "fastws.connection": conn}
        for name, value in s.headers or ():
            if type(name) is bytes:
                name, value = name.decode("latin-1"), bytes(value).decode("latin-1")
            key = "HTTP_" + name.upper().replace("-", "_")
            env[key] = env[key] + "," + value if key in env else value
        return env

    # -- sending -------------------------------------------------------------------------

    @staticmethod
    def _send(conn, text: str, attachments=()) -> bool:
        try:
            conn.send(text)
            for a in attachments:
                conn.send(a)
        except ConnectionClosed:
            return False
        return True

    def _join(self, sock: Socket, room) -> None:
        self.registry.join(sock.session.conn, room, ROOMS_PREFIX + sock.namespace)
        if self.recovery is not None and room not in sock.rooms:
            sock.rooms = sock.rooms + (room,)

    def emit(self, event: str, data=None, to=None, room=None, skip_sid=None, namespace=None,
             callback=None, volatile: bool = False, ignore_queue: bool = False) -> Done:
        """Emit ``event`` with ``data`` (a tuple: several arguments) to
        ``to`` (a sid, a room, or a list of them; default: every socket of
        the namespace), on every node, except ``skip_sid`` (a sid or a
        list).  ``callback(*args)``: called with the client's ack (one sid
        only).  ``volatile``: may be dropped for a client that is behind
        (lowest priority).  Done at once; awaiting the result is optional."""
        ns = namespace or "/"
        target = to if to is not None else room
        if self.node is None:
            raise RuntimeError("the Socket.IO server is not serving yet (attach it to an app)")
        if not isinstance(event, str):
            raise TypeError(f"an event name is a str, got {event!r}")
        self.counters["emits"] += 1
        args = [event, *args_of(data)]
        if callback is not None:
            sock = self.sockets.get(target) if type(target) is str else None
            if sock is None or sock.namespace != ns or not sock.ready:
                if isinstance(target, (list, tuple, set)) or target is None:
                    raise ValueError("callback needs one sid as the target")
                raise DisconnectedError(f"{target!r} is not a socket of {ns} on this node")
            s = sock.session
            s.ack_seq += 1
            if s.acks is None:
                s.acks = {}
            s.acks[s.ack_seq] = callback
            text, atts = encode(EVENT, ns, args, s.ack_seq)
            self._send(s.conn, text, atts)
            return DONE
        self._broadcast(ns, args, target, skip_sid, volatile)
        return DONE

    def _broadcast(self, ns: str, args: list, target, skip_sid, volatile: bool) -> None:
        rec = self.recovery
        offset = None
        if rec is not None and not volatile:
            offset = rec.new_offset()
            args.append(offset)
        text, atts = encode(EVENT, ns, args)
        priority = PRIORITY_LOW if volatile else PRIORITY_NORMAL
        if target is None:
            rooms = None
        elif isinstance(target, (list, tuple, set, frozenset)):
            rooms = tuple(dict.fromkeys(target))
        else:
            rooms = (target,)
        if skip_sid is None:
            skip = ()
        elif isinstance(skip_sid, (list, tuple, set, frozenset)):
            skip = tuple(skip_sid)
        else:
            skip = (skip_sid,)
        sockets = self.sockets
        skip_local = [sockets[x] for x in skip if x in sockets]
        skip_remote = len(skip_local) < len(skip)
        if rec is not None and offset is not None:
            rec.keep(offset, ns, rooms, skip, (text, *atts))
        bridge = self.node.bridge
        node = self.node
        # the common case: text, one room (or the whole namespace), nothing to skip elsewhere
        if not atts and not skip_remote and (rooms is None or (len(rooms) == 1 and rooms[0] not in sockets
                                                               and not sid_like(rooms[0]))):
            if rooms is None:
                fastns, name = ALL_PREFIX + ns, ALL_ROOM
            else:
                fastns, name = ROOMS_PREFIX + ns, rooms[0]
            if len(skip_local) == 1:
                exclude = skip_local[0].session.conn
                node.publish(name, text, namespace=fastns, exclude=exclude, priority=priority)
            elif not skip_local:
                node.publish(name, text, namespace=fastns, priority=priority)
            else:
                self._deliver_local(ns, rooms, skip, (text,), priority)
                if bridge is not None:
                    self._publish_remote(fastns, name, text, priority)
            return
        self._deliver_local(ns, rooms, skip, (text, *atts), priority)
        if bridge is None:
            return
        if rooms is None:
            self._publish_remote(ALL_PREFIX + ns, ALL_ROOM,
                                 pack_envelope((), skip, (text, *atts)), priority)
            return
        envelope = pack_envelope(rooms if len(rooms) > 1 else (), skip, (text, *atts))
        remote_sids = [r for r in rooms if r not in sockets and sid_like(r)]
        if remote_sids:       # sids of other nodes: through the namespace's channel
            self._publish_remote(ALL_PREFIX + ns, ALL_ROOM,
                                 pack_envelope(rooms, skip, (text, *atts)), priority)
        for r in rooms:
            if r not in sockets and not sid_like(r):
                self._publish_remote(ROOMS_PREFIX + ns, r, envelope, priority)

    def _publish_remote(self, fastns: str, name: str, message, priority: int) -> None:
        bridge = self.node.bridge
        bridge.broker.publish_nowait((fastns, name), bridge_message(message, priority))
        bridge.counters["remote_publishes"] += 1

    def _members(self, ns: str, rooms, skip) -> set:
        """The local connections an emit to ``rooms`` (None: the whole
        namespace) of ``ns`` reaches, less the sockets of ``skip``."""
        r = self.registry
        sockets = self.sockets
        if rooms is None:
            members = set(r.members(ALL_ROOM, ALL_PREFIX + ns))
        else:
            members = set()
            fastns = ROOMS_PREFIX + ns
            for name in rooms:
                sock = sockets.get(name) if type(name) is str else None
                if sock is not None:
                    if sock.namespace == ns and sock.ready:
                        members.add(sock.session.conn)
                else:
                    members.update(r.members(name, fastns))
        for sid in skip:
            sock = sockets.get(sid)
            if sock is not None and sock.namespace == ns:
                members.discard(sock.session.conn)
        return members

    def _deliver_local(self, ns: str, rooms, skip, messages: tuple, priority: int) -> int:
        members = self._members(ns, rooms, skip)
        if not members:
            return 0
        hub = self.hub
        if len(messages) == 1:
            return hub.broadcast(messages[0], members, None, priority)
        # a packet with attachments: its messages must stay together
        n = hub.broadcast(messages[0], members, None, PRIORITY_HIGH)
        for m in messages[1:]:
            hub.broadcast(m, members, None, PRIORITY_HIGH)
        return n

    def _remote_frame(self, key, opcode: int, payload, priority: int):
        """``Rooms.frame_handlers``: a message another node published to a
        room of ours.  A text frame goes out as it is (kept first, with
        recovery); an envelope is unpacked."""
        fastns, name = key
        everyone = fastns.startswith(ALL_PREFIX)
        ns = fastns[len(ALL_PREFIX if everyone else ROOMS_PREFIX):]
        if opcode == TEXT:
            if self.recovery is not None:
                text = bytes(payload).decode("utf-8", "replace")
                self._keep_remote(ns, None if everyone else (name,), (), (text,))
            return None                       # the rooms deliver it, no decode
        if opcode != BINARY:
            return 0, 0
        try:
            rooms, skip, messages = unpack_envelope(payload)
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise TypeError(f"not a Socket.IO envelope: {exc}") from None
        if everyone:
            if rooms:                          # an emit to sids (and rooms) of other nodes
                # this node's sids, and names shaped like sids (the rooms of such a name:
                # their members got it through this channel only)
                rooms = tuple(r for r in rooms if r in self.sockets or sid_like(r))
                if not rooms:
                    return 0, 0
            else:
                rooms = None
        else:
            if rooms:
                # an emit to several rooms comes once per room: deliver on the copy of the
                # first room this node has members in, to the union
                first = next((r for r in rooms if not sid_like(r) and self.registry.count(r, fastns)), None)
                if first != name:
                    return 0, 0
                rooms = tuple(r for r in rooms if not sid_like(r))
            else:
                rooms = (name,)
        if self.recovery is not None:
            self._keep_remote(ns, rooms, skip, messages)
        return 0, self._deliver_local(ns, rooms, skip, messages, priority)

    def _keep_remote(self, ns: str, rooms, skip, messages) -> None:
        offset = _offset_of(messages[0])
        if offset is not None:
            self.recovery.keep(offset, ns, rooms, skip, messages)

    def send(self, data, to=None, room=None, skip_sid=None, namespace=None, callback=None,
             ignore_queue: bool = False) -> Done:
        """``emit("message", data, ...)``."""
        return self.emit("message", data, to=to, room=room, skip_sid=skip_sid, namespace=namespace,
                         callback=callback)

    async def call(self, event: str, data=None, to=None, sid=None, namespace=None, timeout: float = 60,
                   ignore_queue: bool = False):
        """Emit ``event`` to one sid and wait for its ack: the client's
        argument (None for none, a tuple for several).  :class:`TimeoutError`
        after ``timeout`` seconds; :class:`DisconnectedError` when the sid
        is not connected to this node."""
        target = to if to is not None else sid
        if target is None:
            raise ValueError("Cannot use call() to broadcast.")
        fut = self.loop.create_future()
        self.emit(event, data, to=target, namespace=namespace, callback=fut)
        try:
            args = await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            self._drop_ack(target, fut)
            raise TimeoutError(f"no ack for {event!r} from {target} within {timeout}s") from None
        except asyncio.CancelledError:
            self._drop_ack(target, fut)
            raise
        return tuple(args) if len(args) > 1 else args[0] if args else None

    def _drop_ack(self, sid, fut) -> None:
        sock = self.sockets.get(sid)
        s = sock.session if sock is not None else None
        if s is not None and s.acks:
            for k, v in list(s.acks.items()):
                if v is fut:
                    del s.acks[k]
            if not s.acks:
                s.acks = None

    # -- rooms and sessions ---------------------------------------------------------

    def _socket(self, sid, namespace) -> Socket | None:
        sock = self.sockets.get(sid)
        if sock is None or sock.namespace != (namespace or "/"):
            return None
        return sock

    def enter_room(self, sid: str, room, namespace=None) -> Done:
        """Add the socket ``sid`` (of this node) to ``room``."""
        sock = self._socket(sid, namespace)
        if sock is not None and room != sid:
            self._join(sock, room)
        return DONE

    def leave_room(self, sid: str, room, namespace=None) -> Done:
        """Remove the socket ``sid`` from ``room``."""
        sock = self._socket(sid, namespace)
        if sock is not None:
            self.registry.leave(sock.session.conn, room, ROOMS_PREFIX + sock.namespace)
            if sock.rooms:
                sock.rooms = tuple(r for r in sock.rooms if r != room)
        return DONE

    def close_room(self, room, namespace=None) -> Done:
        """Remove every socket of this node from ``room``."""
        fastns = ROOMS_PREFIX + (namespace or "/")
        for conn in self.registry.members(room, fastns):
            self.registry.leave(conn, room, fastns)
            s = self.sessions.get(conn)
            sock = s.socket(namespace or "/") if s is not None else None
            if sock is not None and sock.rooms:
                sock.rooms = tuple(r for r in sock.rooms if r != room)
        return DONE

    def rooms(self, sid: str, namespace=None) -> list:
        """The rooms of the socket ``sid``: its own sid first."""
        sock = self._socket(sid, namespace)
        if sock is None:
            return []
        fastns = ROOMS_PREFIX + sock.namespace
        return [sid] + [name for k, name in (sock.session.conn.rooms or ()) if k == fastns]


    def get_session(self, sid: str, namespace=None) -> Done:
        """The session dict of ``sid`` (awaitable, as python-socketio's)."""
        sock = self._socket(sid, namespace)
        if sock is None:
            raise KeyError(f"no socket {sid!r} on this node")
        if sock.data is None:
            sock.data = {}
        return Done(sock.data)

    def save_session(self, sid: str, session: dict, namespace=None) -> Done:
        sock = self._socket(sid, namespace)
        if sock is None:
            raise KeyError(f"no socket {sid!r} on this node")
        sock.data = session
        return DONE

    def session(self, sid: str, namespace=None):
        """``async with sio.session(sid) as session:`` - the session dict."""
        return _SessionContext(self, sid, namespace)

    def disconnect(self, sid: str, namespace=None, ignore_queue: bool = False) -> Done:
        """Disconnect the socket ``sid`` from its namespace (the client gets
        DISCONNECT: ``"io server disconnect"``, and does not reconnect)."""
        sock = self._socket(sid, namespace)
        if sock is not None:
            self._send(sock.session.conn, encode(DISCONNECT, sock.namespace, None)[0])
            self._gone(sock, reason.SERVER_DISCONNECT)
        return DONE

    def transport(self, sid: str, namespace=None) -> str:
        return "websocket"

    def get_environ(self, sid: str, namespace=None):
        sock = self._socket(sid, namespace)
        return self.environ(sock.session) if sock is not None else None

    async def sleep(self, seconds: float = 0) -> None:
        await asyncio.sleep(seconds)

    def start_background_task(self, target, *args, **kwargs):
        """Run ``target(*args, **kwargs)`` (a coroutine function) in a task."""
        return asyncio.ensure_future(target(*args, **kwargs))

    # -- heartbeat -----------------------------------------------------------------------

    def _ping_round(self) -> None:
        self._timers = [t for t in self._timers if not t.cancelled()]
        loop = self.loop
        self._timers.append(loop.call_later(self.ping_interval, self._ping_round))
        sessions = self.sessions
        if self.recovery is not None:
            self.recovery.expire()
        if not sessions:
            return
        self.hub.broadcast(EIO_PING, list(sessions), None, PRIORITY_HIGH)
        self._round += 1
        r = self._round
        rounds = self.connect_timeout / self.ping_interval
        for s in sessions.values():
            if not s.pong_due:
                s.pong_due = r
            if not s.sockets:
                s.idle += 1
                if s.idle > rounds:
                    self._close(s, CONNECT_TIMEOUT, reason.TRANSPORT_CLOSE)
        self._timers.append(loop.call_later(self.ping_timeout, self._ping_check, r))

    def _ping_check(self, r: int) -> None:
        """``ping_timeout`` after ping round ``r``: close who has not answered since."""
        for s in list(self.sessions.values()):
            if 0 < s.pong_due <= r and not s.conn.closed:
                self.counters["ping_timeouts"] += 1
                s.reason = reason.PING_TIMEOUT
                s.conn.close(PING_TIMEOUT.code, PING_TIMEOUT.reason)

    def stats(self) -> dict:
        """Counters and sizes, for tests and ``/stats``."""
        out = dict(self.counters, sessions=len(self.sessions), sockets=len(self.sockets),
                   tasks=len(self.tasks))
        if self.recovery is not None:
            out.update(recovery_packets=len(self.recovery.packets), recovery_saved=len(self.recovery.saved),
                       recovered=self.recovery.recovered, recovery_failed=self.recovery.failed)
        return out


POLLING_REFUSED = ('{"code":0,"message":"Transport unknown: this server speaks Socket.IO over WebSocket '
                   'only; connect with transports: [\'websocket\']"}')


def bridge_message(message, priority: int) -> bytes:
    """The broker payload of a room message (fastws's wire format)."""
    return pack_room_message(message, priority)


def _offset_of(text: str):
    """The recovery offset at the end of an event's arguments, or None."""
    if not text.endswith('"]'):
        return None
    start = text.rfind('"', 0, len(text) - 2)
    return text[start + 1:-2] if start >= 0 else None


async def _await(awaitable, what: str = "<ack callback>") -> None:
    try:
        await awaitable
    except asyncio.CancelledError:
        pass
    except Exception as exc:
        log.error("fastws.socketio: exception in %s", what, exc_info=exc)


class _SessionContext:
    __slots__ = ("server", "sid", "namespace", "data")

    def __init__(self, server, sid, namespace) -> None:
        self.server, self.sid, self.namespace = server, sid, namespace
        self.data = None

    async def __aenter__(self):
        self.data = await self.server.get_session(self.sid, self.namespace)
        return self.data

    async def __aexit__(self, *exc):
        await self.server.save_session(self.sid, self.data, self.namespace)


__all__ = ["Server", "ConnectionRefusedError", "TimeoutError", "DisconnectedError", "reason", "Done",
           "EioSession", "Socket", "POLLING_REFUSED", "pack_envelope", "unpack_envelope", "sid_like",
           "ROOMS_PREFIX", "ALL_PREFIX", "ALL_ROOM"]
