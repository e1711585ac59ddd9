"""Socket.IO (v5, over Engine.IO v4 on WebSocket) on fastws.

Existing Socket.IO clients (``socket.io-client`` in browsers and Node,
python-socketio's ``AsyncClient``, ...) connect unchanged, with
``transports: ['websocket']``; the server API is python-socketio's::

    import fastws
    import fastws.socketio

    sio = fastws.socketio.Server()

    @sio.event
    async def connect(sid, environ, auth):
        await sio.enter_room(sid, "lobby")

    @sio.on("chat message")
    async def chat(sid, data):
        await sio.emit("chat message", data, to="lobby", skip_sid=sid)

    app = fastws.App()
    sio.attach(app)                  # fastws serve chat:app [--broker redis://...]

    # or beside FastAPI routes:  asgi = fastws.socketio.ASGIApp(sio, fastapi_app)

A Socket.IO connection is a fastws connection on the node's hub; its rooms
are fastws rooms, its emits are encoded once and fanned out by the hub, and
reach other workers and nodes through fastws's brokers (a node gets only the
rooms it has members in).  Modules:

* :mod:`fastws.socketio.packets`   - Engine.IO / Socket.IO packet encoding;
* :mod:`fastws.socketio.server`    - :class:`Server`: handlers, emits, rooms, acks, heartbeat;
* :mod:`fastws.socketio.recovery`  - connection state recovery;
* :mod:`fastws.socketio.namespace` - class-based namespaces;
* :mod:`fastws.socketio.asgi`      - :class:`ASGIApp`.

HTTP long-polling is not served: a polling request gets 400 with Engine.IO's
``Transport unknown`` error, and the README says to set
``transports: ['websocket']``.
"""

from .asgi import ASGIApp
from .namespace import AsyncNamespace, Namespace
from .server import ConnectionRefusedError, DisconnectedError, Server, TimeoutError, reason

AsyncServer = Server

__all__ = ["Server", "AsyncServer", "ASGIApp", "AsyncNamespace", "Namespace", "ConnectionRefusedError",
           "TimeoutError", "DisconnectedError", "reason"]
