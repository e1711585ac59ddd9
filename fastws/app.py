"""The public API: an :class:`App` maps paths to callbacks.

Example::

    import fastws

    app = fastws.App()

    @app.on_message("/echo")
    def echo(conn, data):          # data: str for text, bytes for binary
        conn.send(data)

    @app.on_connect("/echo")
    def check(request):            # optional: accept (None), Accept(...), Reject(...)
        if request.query.get("token") != "secret":
            return fastws.Reject(403, "bad token")

    fastws.run(app, host="127.0.0.1", port=8000)   # or: fastws serve module:app

Callbacks may be plain functions or ``async def``; only an async one costs a
task per call.  The path ``"*"`` is the fallback route for every path that has
no route of its own.

Lifecycle and shared state::

    @app.on_startup                # sync or async; runs before the server listens
    async def connect_db():
        app.state.db = await open_database()

    @app.on_shutdown               # after the connections are closed
    async def close_db():
        await app.state.db.close()

``app.state`` is a plain namespace for whatever the callbacks share.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, TypeVar

from .core import Connection
from .errors import Reject
from .frames import PRIORITY_NORMAL
from .handshake import HttpRequest, Request
from .presence import Presence
from .roomproto import RoomEndpoint
from .rooms import Rooms

if TYPE_CHECKING:
    from .node import Node


@dataclass
class Accept:
    """Returned by ``on_connect`` to accept with a subprotocol, extra
    response headers (a list of ``(name, value)``) and/or initial contents
    of the connection's ``store`` (e.g. the authenticated user); ``user``
    binds the connection to that user once it is open, as
    :meth:`App.bind_user` does (the native front)."""

    subprotocol: str | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)
    store: dict[str, Any] | None = None
    user: str | None = None


# -- the callbacks' types (plain functions or ``async def``: an async one's result is awaited) --

#: what ``on_connect`` answers: None or True (accept), an :class:`Accept`, the
#: name of a subprotocol the client offered, a :class:`Reject` (or raises one),
#: or False (refused with 403)
Decision = Accept | Reject | str | bool | None
#: ``on_connect(request)``
ConnectCallback = Callable[[Request], Decision | Awaitable[Decision]]
#: ``on_open(conn)``
OpenCallback = Callable[[Connection], object]
#: ``on_message(conn, data)``: ``str`` for a text message, ``bytes`` for a binary one
MessageCallback = Callable[[Connection, str | bytes], object]
#: ``on_disconnect(conn, code, reason)``
DisconnectCallback = Callable[[Connection, int, str], object]
#: a plain HTTP route's answer: ``(status, body, content_type)`` or
#: ``(status, body, content_type, extra_headers)``
HttpResponse = tuple[int, bytes | str, str] | tuple[int, bytes | str, str, Iterable[tuple[str, str]]]
#: a plain HTTP route (:meth:`App.http`)
HttpCallback = Callable[[HttpRequest], HttpResponse | Awaitable[HttpResponse]]
#: ``authorize_join``: ``fn(conn, room) -> bool``
JoinCheck = Callable[[Connection, str], bool]
#: ``authorize_publish``: ``fn(conn or None, room, message) -> bool``
PublishCheck = Callable[[Connection | None, str, str | bytes], bool]
#: ``on_startup`` / ``on_shutdown``: ``fn()``
Hook = Callable[[], object]

_Connect = TypeVar("_Connect", bound=ConnectCallback)
_Open = TypeVar("_Open", bound=OpenCallback)
_Message = TypeVar("_Message", bound=MessageCallback)
_Disconnect = TypeVar("_Disconnect", bound=DisconnectCallback)
_Http = TypeVar("_Http", bound=HttpCallback)
_Hook = TypeVar("_Hook", bound=Hook)
_Check = TypeVar("_Check", bound=Callable[..., bool])


class Route:
    """The callbacks of one path.  Flags are computed once, not per message."""

    __slots__ = (
        "path",
        "namespace",
        "on_connect",
        "on_open",
        "on_message",
        "on_disconnect",
        "connect_is_async",
        "open_is_async",
        "message_is_async",
        "disconnect_is_async",
    )

    def __init__(self, path: str) -> None:
        self.path = path
        self.namespace = ""       # rooms joined from this route live here
        self.on_connect: ConnectCallback | None = None
        self.on_open: OpenCallback | None = None
        self.on_message: MessageCallback | None = None
        self.on_disconnect: DisconnectCallback | None = None
        self.connect_is_async = False
        self.open_is_async = False
        self.message_is_async = False
        self.disconnect_is_async = False

    def set(self, kind: str, fn: Callable[..., object]) -> None:
        if not callable(fn):
            raise TypeError(f"{kind} callback must be callable, got {fn!r}")
        setattr(self, kind, fn)
        setattr(self, kind.replace("on_", "") + "_is_async", inspect.iscoroutinefunction(fn))


class App:
    """A fastws application: routes by path, each with up to three callbacks.

    ``on_connect(request)`` decides the upgrade; ``on_message(conn, data)``
    gets every complete message (``str`` for text, ``bytes`` for binary);
    ``on_disconnect(conn, code, reason)`` runs once per upgraded connection
    whatever ended it (1006 when the TCP connection was lost without a close
    frame).
    """

    def __init__(self, **settings: object) -> None:
        if settings:
            names = ", ".join(sorted(settings))
            raise TypeError(f"App() takes no settings ({names}): every setting lives in fastws.Config; "
                            f"pass it to fastws.run(app, {next(iter(sorted(settings)))}=...), "
                            "`fastws serve --flag`, FASTWS_* or the TOML file")
        self.routes: dict[str, Route] = {}
        #: plain HTTP routes served on the same port: (METHOD, path) -> handler
        self.http_routes: dict[tuple[str, str], HttpCallback] = {}
        #: callables run when a route is added while serving (the native
        #: front refreshes its C fast-upgrade table)
        self.route_listeners: list[Callable[[], object]] = []
        #: the running fastws.node.Node, while serving
        self.node: Node | None = None
        #: room authorization by namespace: fn(conn, room) -> bool (authorize_join)
        self.join_checks: dict[str, JoinCheck] = {}
        #: ... fn(conn_or_None, room, message) -> bool (authorize_publish)
        self.publish_checks: dict[str, PublishCheck] = {}
        #: a plain namespace for what the callbacks share (a database pool ...)
        self.state = SimpleNamespace()
        #: callables run by the node when it starts / stops (see on_startup)
        self.startup_hooks: list[Hook] = []
        self.shutdown_hooks: list[Hook] = []

    # -- registration -------------------------------------------------------

    def _route(self, path: str) -> Route:
        if path != "*" and not path.startswith("/"):
            raise ValueError(f"route path must start with '/' or be '*', got {path!r}")
        r = self.routes.get(path)
        if r is None:
            r = self.routes[path] = Route(path)
        return r

    def route(self, path: str, *, on_connect: ConnectCallback | None = None, on_open: OpenCallback | None = None,
              on_message: MessageCallback | None = None, on_disconnect: DisconnectCallback | None = None,
              namespace: str | None = None) -> Route:
        """Register callbacks for ``path`` without decorators.  ``namespace``
        keeps this route's rooms apart from other routes' (default: the
        shared namespace "")."""
        r = self._route(path)
        if namespace is not None:
            r.namespace = namespace
        callbacks: tuple[tuple[str, Callable[..., object] | None], ...] = (
            ("on_connect", on_connect), ("on_open", on_open),
            ("on_message", on_message), ("on_disconnect", on_disconnect))
        for kind, fn in callbacks:
            if fn is not None:
                r.set(kind, fn)
        self._routes_changed()
        return r

    def _routes_changed(self) -> None:
        # a route registered while serving: the front's fast-upgrade table
        # (routes that need no Python decision) must follow
        for listener in self.route_listeners:
            listener()

    def on_connect(self, path: str) -> Callable[[_Connect], _Connect]:
        """Decorator: ``fn(request) -> None | Accept | Reject`` (may be async)."""
        def deco(fn: _Connect) -> _Connect:
            self._route(path).set("on_connect", fn)
            self._routes_changed()
            return fn
        return deco

    def on_open(self, path: str) -> Callable[[_Open], _Open]:
        """Decorator: ``fn(conn)`` once the connection is upgraded, before
        its first message (the place to ``conn.join`` rooms)."""
        def deco(fn: _Open) -> _Open:
            self._route(path).set("on_open", fn)
            self._routes_changed()
            return fn
        return deco

    def on_message(self, path: str) -> Callable[[_Message], _Message]:
        """Decorator: ``fn(conn, data)`` for every complete message."""
        def deco(fn: _Message) -> _Message:
            self._route(path).set("on_message", fn)
            self._routes_changed()
            return fn
        return deco

    def on_disconnect(self, path: str) -> Callable[[_Disconnect], _Disconnect]:
        """Decorator: ``fn(conn, code, reason)`` once per connection."""
        def deco(fn: _Disconnect) -> _Disconnect:
            self._route(path).set("on_disconnect", fn)
            self._routes_changed()
            return fn
        return deco

    def on_startup(self, fn: _Hook) -> _Hook:
        """Decorator: ``fn()`` (sync or async) runs once the server's node is
        built (rooms, broker, presence; ``app.node`` is set) and before it
        listens, in registration order.  An exception stops the start with
        one line naming the hook."""
        if not callable(fn):
            raise TypeError(f"on_startup needs a callable, got {fn!r}")
        self.startup_hooks.append(fn)
        return fn

    def on_shutdown(self, fn: _Hook) -> _Hook:
        """Decorator: ``fn()`` (sync or async) runs on a graceful stop, after
        the connections are closed and before the broker is, in registration
        order.  An exception is logged; the other hooks still run."""
        if not callable(fn):
            raise TypeError(f"on_shutdown needs a callable, got {fn!r}")
        self.shutdown_hooks.append(fn)
        return fn

    def authorize_join(self, namespace: str = "") -> Callable[[_Check], _Check]:
        """Decorator: ``fn(conn, room) -> bool`` decides every join of a room
        of ``namespace`` (``conn.join``, ``app.resume``); False refuses it:
        the join raises :class:`fastws.errors.RoomDeniedError` (counted in
        ``websocket_room_refusals_total{reason="denied"}``) and changes
        nothing.  A plain function (it runs inside ``join``); an exception
        in it is logged and refuses."""
        return self._room_check(self.join_checks, namespace, "authorize_join")

    def authorize_publish(self, namespace: str = "") -> Callable[[_Check], _Check]:
        """Decorator: ``fn(conn, room, message) -> bool`` decides a publish to
        a room of ``namespace`` made for a connection, ``app.publish(...,
        sender=conn)`` (RoomDeniedError when False), and every publish of
        the HTTP publish API, with ``conn`` None (403 when False).  The
        app's own ``app.publish`` without ``sender`` is not asked.  A plain
        function; an exception in it is logged and refuses."""
        return self._room_check(self.publish_checks, namespace, "authorize_publish")

    @staticmethod
    def _room_check(table: dict[str, Any], namespace: str, what: str) -> Callable[[_Check], _Check]:
        if not isinstance(namespace, str):
            raise TypeError(f"{what}: namespace must be a str, got {namespace!r}")

        def deco(fn: _Check) -> _Check:
            if not callable(fn):
                raise TypeError(f"{what} callback must be callable, got {fn!r}")
            if inspect.iscoroutinefunction(fn):
                raise TypeError(f"{what} callback must be a plain function (it runs inside join/"
                                f"publish); decide in on_connect or before calling join instead")
            table[namespace] = fn
            return fn
        return deco

    def rooms_endpoint(self, path: str, *, namespace: str | None = None,
                       on_connect: ConnectCallback | None = None,
                       client_publish: bool = True, publish_rate: float = 0.0,
                       history_limit: int = 1000) -> RoomEndpoint:
        """Serve the room protocol (``fastws.rooms.v1``, ``docs/protocol.md``)
        at ``path``: the clients of :mod:`fastws.client` and ``fastws.js``
        subscribe, resume (with ``--broker redis+streams://``), publish and
        ping over it.  Returns the :class:`fastws.roomproto.RoomEndpoint`;
        its ``publish(room, message)`` reaches its subscribers on every node.

        ``namespace``: the namespace of its rooms (default: ``path``), the
        one ``authorize_join`` / ``authorize_publish`` are registered for.
        ``on_connect``: your upgrade decision (e.g. a ``fastws.auth.TokenAuth``),
        run first.  ``client_publish``: clients may publish;
        ``publish_rate``: publishes per second per connection (0: no
        limit); ``history_limit``: messages a resume replays at most."""
        endpoint = RoomEndpoint(self, path, namespace=namespace, on_connect=on_connect,
                                client_publish=client_publish, publish_rate=publish_rate,
                                history_limit=history_limit, accept_type=Accept)
        self.route(path, on_connect=endpoint.on_connect, on_message=endpoint.on_message,
                   on_disconnect=endpoint.on_disconnect, namespace=endpoint.namespace)
        self.startup_hooks.append(endpoint.start)
        if self.node is not None:          # added while serving
            endpoint.start()
        return endpoint

    def remote_address(self, conn: Connection) -> Any:
        """The client's address of ``conn``: with ``proxy_headers`` the one a
        trusted proxy named, else ``conn.remote_address``."""
        if self.node is None:
            return conn.remote_address
        return self.node.remote_address(conn)

    def http(self, method: str, path: str) -> Callable[[_Http], _Http]:
        """Decorator: serve plain HTTP ``method path`` on the WebSocket port.

        The handler gets a :class:`fastws.handshake.HttpRequest` and returns
        ``(status, body, content_type)``; it may be async.  The response
        closes the connection (no keep-alive: this is for pages, health
        checks and pushes, not for a web app; use ASGI mode for that)."""
        def deco(fn: _Http) -> _Http:
            self.http_routes[(method.upper(), path)] = fn
            return fn
        return deco

    def match(self, path: str) -> Route | None:
        return self.routes.get(path) or self.routes.get("*")

    # -- while serving ------------------------------------------------------

    @property
    def connections(self) -> dict[int, Connection]:
        """Open connections of this process by id (empty when not serving)."""
        hub = self.node.hub if self.node is not None else None
        return hub.connections if hub is not None else {}

    def broadcast(self, message: str | bytes, connections: Iterable[Connection] | None = None,
                  exclude: Connection | None = None, priority: int = PRIORITY_NORMAL) -> int:
        """Send ``message`` to ``connections`` (default: every open connection
        of this process) encoded once; returns how many it was queued on."""
        hub = self.node.hub if self.node is not None else None
        if hub is None:
            return 0
        return hub.broadcast(message, hub.connections.values() if connections is None else connections,
                             exclude, priority)

    @property
    def rooms(self) -> Rooms | None:
        """The node's :class:`fastws.rooms.Rooms` (None when not serving)."""
        return self.node.rooms if self.node is not None else None

    def publish(self, room: str, message: str | bytes, *, namespace: str = "", exclude: Connection | None = None,
                priority: int = PRIORITY_NORMAL, sender: Connection | None = None) -> int:
        """Send ``message`` to every member of ``room``, encoded once, on
        every worker and node (through the broker when there is one).

        ``exclude``: a connection that does not get it (e.g. the sender).
        ``priority``: ``fastws.PRIORITY_LOW``/``NORMAL``/``HIGH``, see
        :mod:`fastws.delivery` for what happens to backed-up members.
        ``sender``: the connection this publish is made for; the
        namespace's :meth:`authorize_publish` check then decides
        (:class:`fastws.errors.RoomDeniedError` when it refuses, nothing is
        sent).
        Returns the room's sequence number for this message on this node
        (0 if the room has no members here and there is no broker).
        Raises :class:`fastws.errors.RoomNameError` for a name past
        ``max_room_name``.
        """
        if self.node is None:
            return 0
        if sender is not None:
            rooms = self.node.rooms
            if rooms is None:         # app.node is set once the node's rooms are built
                raise RuntimeError("publish needs a running server")
            rooms.check_publish(sender, room, message, namespace)
        return self.node.publish(room, message, namespace=namespace, exclude=exclude, priority=priority)

    async def resume(self, conn: Connection, room: str, since: str | None = None, *,
                     namespace: str | None = None, limit: int = 1000) -> bool:
        """Join ``conn`` to ``room`` as a member that can resume: it gets the
        room's messages in the order of the room's Redis Stream, each as the
        JSON text frame ``{"room": ..., "id": "<entry id>", "data": ...}``
        (``"b64"`` instead of ``"data"`` for binary), whichever node published
        them; with ``since`` (the last ``id`` the client saw, e.g. before a
        reconnect to any node), what it missed is replayed first, then the
        live messages follow, none twice.  Returns False when the replay could
        not be complete (more than ``limit`` missed: it gets the newest
        ``limit``; or entries trimmed by the stream's maxlen).  Needs
        ``--broker redis+streams://...`` (ValueError otherwise, or for a
        malformed ``since``); messages whose publish did not reach Redis are
        not in the stream, so such members do not get them.
        """
        if self.node is None:
            raise ValueError("resume needs a running server with a broker with history "
                             "(--broker redis+streams://...)")
        return await self.node.resume(conn, room, since, namespace=namespace, limit=limit)

    def global_id(self, conn: Connection) -> str:
        """``conn``'s id on every node: ``"<node id>:<n>"`` with a broker,
        ``"<n>"`` without one.  :meth:`send_to`, :meth:`disconnect`, presence
        and the HTTP API (``/connections/{id}``) take it."""
        if self.node is None:
            raise RuntimeError("global_id needs a running server")
        return self.node.global_id(conn)

    async def send_to(self, conn_id: str, message: str | bytes) -> bool | None:
        """Send ``message`` to the connection ``conn_id`` (a
        :meth:`global_id`), on whichever node holds it.  True: queued on it;
        False: no such open connection; None: its node did not answer."""
        if self.node is None:
            return False
        return await self.node.send_to(conn_id, message)

    def send_local(self, conn_id: str | int, message: str | bytes) -> bool:
        """:meth:`send_to` for synchronous code, for a connection of this
        process only (``conn_id``: a :meth:`global_id` or ``conn.id``);
        False if there is no such open connection here."""
        conn = self.node.local_connection(conn_id) if self.node is not None else None
        if conn is None:
            return False
        conn.send(message)
        return True

    async def disconnect(self, conn_id: str, code: int = 1000, reason: str = "") -> bool | None:
        """Close the connection ``conn_id`` (a :meth:`global_id`), on
        whichever node holds it.  True / False / None as :meth:`send_to`;
        ValueError for a code no server may send (a server sends 1000-1003,
        1007-1014 or 3000-4999) or a reason past 123 bytes."""
        if self.node is None:
            return False
        return await self.node.disconnect(conn_id, code, reason)

    def bind_user(self, conn: Connection, user_id: str) -> None:
        """``conn`` belongs to user ``user_id`` (call it in ``on_open``):
        :meth:`send_to_user` reaches it from any node and, with
        ``--region-peers``, from any region.  With regions the user is in
        this region's directory while one of its connections is open here;
        closing the connection unbinds it.  It counts as one of ``conn``'s
        rooms (``max_rooms_per_connection``)."""
        if self.node is None:
            raise RuntimeError("bind_user needs a running server")
        self.node.bind_user(conn, user_id)

    def unbind_user(self, conn: Connection, user_id: str) -> None:
        """Undo :meth:`bind_user` while ``conn`` stays open."""
        if self.node is not None:
            self.node.unbind_user(conn, user_id)

    async def send_to_user(self, user_id: str, message: str | bytes) -> list[str]:
        """Send ``message`` to every connection bound to ``user_id``
        (:meth:`bind_user`) wherever it is.  Returns the regions the message
        was handed to: with ``--region-peers``, those whose directory holds
        the user (``[]``: none does); without, ``[region]`` (this node's
        broker reaches every node of the region).  Delivery to another region
        is at-least-once on the wire, exactly once at each connection, and
        waits in a bounded queue while that region cannot be reached
        (see :mod:`fastws.regions`)."""
        if self.node is None:
            raise RuntimeError("send_to_user needs a running server")
        return await self.node.send_to_user(user_id, message)

    @property
    def presence(self) -> Presence:
        """Who is in which room on every node (``--presence``): a
        :class:`fastws.presence.Presence` with ``await .count(room)``,
        ``await .members(room)`` (``{global id: user id}``) and ``await
        .users(room)``.  RuntimeError when presence is off."""
        presence = self.node.presence if self.node is not None else None
        if presence is None:
            raise RuntimeError("presence is off: serve with --presence and a Redis broker "
                               "(--broker redis://...)")
        return presence


__all__ = ["App", "Accept", "Reject", "Route"]
