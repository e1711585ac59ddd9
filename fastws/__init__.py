"""fastws: a fast WebSocket server for Python.

    import fastws

    app = fastws.App()

    @app.on_message("/")
    def echo(conn, data):
        conn.send(data)

    fastws.run(app, port=8000)        # or: fastws serve module:app

See README.md for the CLI, rooms and deployment.  The package is built in
four layers, each importing only from the ones below it:

1. :mod:`fastws.frames`, :mod:`fastws.errors`, :mod:`fastws.config` - the
   shared vocabulary, the exception tree and close codes, every setting;
2. :mod:`fastws.core` (engines and connections: ``fastws._core`` in Cython,
   the wsproto twin) and :mod:`fastws.handshake`;
3. :mod:`fastws.node` - rooms, broker bridge, delivery policy, admission,
   operations endpoints (and :mod:`fastws.app`, the routes);
4. the fronts - :mod:`fastws.server` (native), :mod:`fastws.asgi`,
   :mod:`fastws.runner`, the CLI.

Beside them, the client: :func:`fastws.connect` (a reconnecting WebSocket
client for any server) and :class:`fastws.client.RoomClient` (the room
protocol of ``app.rooms_endpoint``), see :mod:`fastws.client`.
"""

from .app import Accept, App, Route
from .client import connect
from .config import Config
from .core import IMPLEMENTATION
from .errors import (
    ConfigError,
    ConnectionClosed,
    FastWSError,
    HandshakeError,
    ProtocolError,
    Reject,
    RoomDeniedError,
    RoomError,
    RoomLimitError,
    RoomNameError,
    RoomRateError,
    ServerStartError,
)
from .frames import PRIORITY_HIGH, PRIORITY_LOW, PRIORITY_NORMAL
from .handshake import Request
from .runner import run, serve
from .version import __version__

__all__ = [
    "App",
    "Accept",
    "Reject",
    "Request",
    "Route",
    "Config",
    "run",
    "serve",
    "connect",
    "IMPLEMENTATION",
    "PRIORITY_LOW",
    "PRIORITY_NORMAL",
    "PRIORITY_HIGH",
    "FastWSError",
    "ProtocolError",
    "HandshakeError",
    "ConnectionClosed",
    "ConfigError",
    "RoomError",
    "RoomLimitError",
    "RoomDeniedError",
    "RoomRateError",
    "RoomNameError",
    "ServerStartError",
    "__version__",
]
