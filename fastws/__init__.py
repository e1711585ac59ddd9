"""fastws: a fast WebSocket server for Python.

    import fastws

    app = fastws.App()

    @app.on_message("/")
    def echo(conn, data):
        conn.send(data)

    fastws.run(app, port=8000)        # or: fastws serve module:app

See README.md for the CLI, rooms and deployment.
"""

from .app import Accept, App, Reject, run
from .config import Config
from .core import IMPLEMENTATION
from .delivery import PRIORITY_HIGH, PRIORITY_LOW, PRIORITY_NORMAL
from .errors import (
    ConfigError,
    ConnectionClosed,
    FastWSError,
    HandshakeError,
    ProtocolError,
)
from .handshake import Request

__version__ = "0.1.0.dev0"

__all__ = [
    "App",
    "Accept",
    "Reject",
    "Request",
    "Config",
    "run",
    "IMPLEMENTATION",
    "PRIORITY_LOW",
    "PRIORITY_NORMAL",
    "PRIORITY_HIGH",
    "FastWSError",
    "ProtocolError",
    "HandshakeError",
    "ConnectionClosed",
    "ConfigError",
]
