"""The ASGI front: an ASGI 3 application on a :class:`~fastws.node.Node`."""

from __future__ import annotations

import logging

from ..config import Config
from ..errors import ServerStartError
from ..server import Server
from .http import HttpProtocol
from .lifespan import Lifespan
from .rooms import check_room
from .websocket import SESSION_OPEN

log = logging.getLogger("fastws")


class AsgiServer(Server):
    """An ASGI application served on one port: HTTP on httptools, WebSockets
    on the fastws engine (see :mod:`fastws.asgi`).

    Collaborators, one field each (the rest is the :class:`~fastws.node.Node`'s):

    * ``app``              - the ASGI 3 application;
    * ``state``            - the lifespan state, shallow-copied into every scope;
    * ``lifespan``         - the ``lifespan`` scope runner;
    * ``http_connections`` - HttpProtocol instances still speaking HTTP;
    * ``sessions``         - app task -> WebSocket session, while the task runs;
    * ``http_extension``   - the ``fastws.rooms`` extension of http scopes.
    """

    schemes = ("http", "https")

    def __init__(self, app, config: Config) -> None:
        super().__init__(config)
        self.app = app                        # the ASGI 3 callable
        self.state: dict = {}                 # lifespan state
        self.lifespan = None
        self.http_connections: set = set()    # HttpProtocol instances still speaking HTTP
        self.sessions: dict = {}              # app task -> WebSocket session, while the task runs
        self.session_done = self._session_done   # the done callback of every session task
        self.http_extension = {"publish": self._http_publish}
        #: root_path (scope["root_path"]) as bytes, put before raw_path
        self.root_path_bytes = config.root_path.encode("utf-8")
        self.http_scheme = "http"             # scope["scheme"] of http scopes ("https" with TLS)
        self.ws_scheme = "ws"                 # ... of websocket scopes ("wss" with TLS)

    def describe(self) -> str:
        return "ASGI app"

    def check_config(self) -> None:
        if self.config.region_peers:
            raise ServerStartError("region_peers: an ASGI application has no user binding (fastws.App.bind_user) "
                                   "to route between regions; serve a fastws.App for regions")
        if self.config.gateway:
            raise ServerStartError("gateway: an ASGI application handles its own WebSockets; serve the "
                                   "gateway without an app (fastws serve --gateway URL) or with a fastws.App")

    def protocol_factory(self):
        return lambda: HttpProtocol(self)

    async def before_listen(self) -> None:
        if self.tls:
            self.http_scheme, self.ws_scheme = "https", "wss"
        self.lifespan = Lifespan(self.app, self.state)
        await self.lifespan.startup()          # LifespanError (a ServerStartError) if it fails

    # -- shutdown steps ------------------------------------------------------------

    def stop_front(self, code: int, reason: str) -> None:
        for proto in list(self.http_connections):
            proto.shutdown()
        for session in list(self.sessions.values()):
            if session.state != SESSION_OPEN and session.task is not None:
                session.task.cancel()

    def front_busy(self) -> bool:
        return bool(self.http_connections or self.sessions)

    def abort_front(self) -> None:
        for proto in list(self.http_connections):
            if proto.transport is not None:
                proto.transport.abort()
        for task in list(self.sessions):
            task.cancel()

    async def after_close(self) -> None:
        if self.lifespan is not None:
            await self.lifespan.shutdown(self.config.shutdown_timeout)

    # -- the sessions' task callback ------------------------------------------------

    def _session_done(self, task) -> None:
        session = self.sessions.pop(task, None)
        if session is not None:
            session._done(task)

    # -- rooms -----------------------------------------------------------------

    def publish(self, room: str, message, exclude=None) -> int:
        """Send ``message`` to the members of ``room`` (shared namespace),
        encoded once; with a broker also to the other workers and nodes.
        Returns how many members of this process it was queued on."""
        if not isinstance(message, str):
            message = bytes(message)
        node = self.node
        n = node.rooms.count(room)
        if n and exclude is not None and ("", room) in (exclude.rooms or ()):
            n -= 1
        node.publish(room, message, exclude=exclude)
        return n

    def _http_publish(self, room: str, message, exclude_self: bool = False) -> int:
        # an http scope has no connection of its own to exclude
        return self.publish(check_room(room), message)

    # -- operations endpoints (served where the application answers 404) -----

    def unrooted(self, raw_path: bytes) -> str:
        """A scope's ``raw_path`` as the client sent it (without root_path):
        the path the operations routes are matched on."""
        root = self.root_path_bytes
        if root and raw_path.startswith(root):
            raw_path = raw_path[len(root):] or b"/"
        return raw_path.decode("latin-1")

    def ops_route(self, method: str, path: str, host=None):
        """The operations handler for ``method path`` (``/health``,
        ``/metrics``, ``POST /publish`` ...) asked on ``Host`` ``host``, or
        None (the application's 404 stands)."""
        return self.node.routes.find(method, path, host)


__all__ = ["AsgiServer"]
