"""The Socket.IO server as an ASGI application, beside other ASGI routes.

    sio = fastws.socketio.Server()
    api = FastAPI()
    app = fastws.socketio.ASGIApp(sio, api)       # fastws serve main:app

Requests to ``/socket.io/`` go to the Socket.IO server, everything else
(and the ``lifespan`` scope) to ``other_asgi_app``.  Served by ``fastws
serve``, an accepted Socket.IO WebSocket is handed to the Socket.IO server's
route (the ``fastws.route`` key of ``websocket.accept``): from then on its
frames go to the Socket.IO server directly, as in the native front, with no
ASGI message per frame.  Another ASGI server (uvicorn ...) cannot hand over
a socket: the upgrade is refused with 500 and one logged line saying so.
"""

from __future__ import annotations

import logging
from urllib.parse import parse_qsl

from .server import POLLING_REFUSED, ROOMS_PREFIX

log = logging.getLogger("fastws.socketio")


class SocketIORoute:
    """The route (callbacks) of every Socket.IO WebSocket handed over by the
    ASGI front: the Socket.IO server's own methods."""

    path = ""
    namespace = ROOMS_PREFIX
    on_connect = None
    open_is_async = message_is_async = disconnect_is_async = connect_is_async = False

    def __init__(self, sio) -> None:
        self.on_open = sio.opened
        self.on_message = sio.message
        self.on_disconnect = sio.closed


class ASGIApp:
    """``ASGIApp(socketio_server, other_asgi_app=None, socketio_path="socket.io")``,
    as python-socketio's ``socketio.ASGIApp``."""

    def __init__(self, socketio_server, other_asgi_app=None, socketio_path: str = "socket.io",
                 on_startup=None, on_shutdown=None) -> None:
        self.sio = socketio_server
        self.other = other_asgi_app
        self.path = "/" + socketio_path.strip("/") + "/"
        self.on_startup = on_startup
        self.on_shutdown = on_shutdown
        self.route = SocketIORoute(socketio_server)
        self._warned = False

    def _mine(self, scope) -> bool:
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):]
        return path == self.path or path == self.path[:-1]

    async def __call__(self, scope, receive, send) -> None:
        kind = scope["type"]
        if kind in ("websocket", "http") and self._mine(scope):
            if kind == "websocket":
                await self._websocket(scope, receive, send)
            else:
                await self._http(scope, receive, send)
            return
        if self.other is not None:
            await self.other(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        elif kind == "http":
            await _respond(send, 404, b"not found\n", b"text/plain; charset=utf-8")
        elif kind == "websocket":
            await send({"type": "websocket.close", "code": 1000})

    def _handover(self, headers):
        sio = self.sio

        def route_for(node):
            sio.bind(node)
            sio.upgrading = headers          # opened() (the route's on_open) runs next
            return self.route
        return route_for

    async def _websocket(self, scope, receive, send) -> None:
        await receive()                      # websocket.connect
        extensions = scope.get("extensions") or {}
        if "fastws.rooms" not in extensions:
            if not self._warned:
                self._warned = True
                log.error("fastws.socketio.ASGIApp: this ASGI server cannot hand a WebSocket to "
                          "fastws; serve the application with `fastws serve`")
            await self._deny(extensions, send, 500, b"Socket.IO needs fastws serve\n", b"text/plain")
            return
        query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
        refused = self.sio.check_request(query)
        if refused is not None:
            await self._deny(extensions, send, refused[0], refused[1].encode(), b"application/json")
            return
        await send({"type": "websocket.accept", "fastws.route": self._handover(scope.get("headers"))})

    @staticmethod
    async def _deny(extensions, send, status: int, body: bytes, ctype: bytes) -> None:
        if "websocket.http.response" in extensions:
            await send({"type": "websocket.http.response.start", "status": status,
                        "headers": [(b"content-type", ctype)]})
            await send({"type": "websocket.http.response.body", "body": body})
        else:
            await send({"type": "websocket.close", "code": 1008})

    async def _http(self, scope, receive, send) -> None:
        # long-polling (and its POSTs) is refused: the client is told to use the websocket transport
        await _respond(send, 400, POLLING_REFUSED.encode(), b"application/json")

    async def _lifespan(self, receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                if self.on_startup is not None:
                    await _maybe_await(self.on_startup())
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self.sio.unbind()
                if self.on_shutdown is not None:
                    await _maybe_await(self.on_shutdown())
                await send({"type": "lifespan.shutdown.complete"})
                return


async def _respond(send, status: int, body: bytes, ctype: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", ctype), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _maybe_await(value) -> None:
    if hasattr(value, "__await__"):
        await value


__all__ = ["ASGIApp", "SocketIORoute"]
