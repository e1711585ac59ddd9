"""fastws's Python client (asyncio), on the fastws frame engine in client mode.

Two levels:

* :func:`connect` - a WebSocket client for any server that reconnects by
  itself (backoff with full jitter, the server's reconnect hint and
  ``Retry-After``, several URLs ranked by round trip, a bounded send queue
  while disconnected, ping liveness, no retry storm against a server that
  refuses it)::

      import fastws

      async with fastws.connect("ws://127.0.0.1:8000/echo") as ws:
          await ws.send("hello")
          async for message in ws:
              ...

* :class:`RoomClient` - the room protocol (``fastws.rooms.v1``, a server's
  ``app.rooms_endpoint(path)``): subscriptions resumed from their last
  position after every reconnect, on whichever node, in order, without
  duplicates, and gaps reported, never silent::

      from fastws.client import RoomClient

      async with RoomClient("ws://127.0.0.1:8000/rt") as rt:
          await rt.subscribe("lobby", print)
          await rt.publish("lobby", "hello")

:func:`open_connection` is the single, non-reconnecting connection both are
built on.  The frames are parsed and built by ``fastws.core.Engine(client=True)``
(Cython, or the wsproto twin when the extension is not built).

This package sits beside the server's layers: it uses the vocabulary
(:mod:`fastws.frames`, :mod:`fastws.errors`), the engines
(:mod:`fastws.core`) and the client handshake (:mod:`fastws.handshake`),
never the node or the fronts.
"""

from .backoff import Backoff, reconnect_hint, retry_after
from .connection import WebSocket, open_connection
from .errors import GaveUp, SendQueueFull, SubscriptionError
from .reconnect import Client, connect
from .regions import Ranking, measure
from .rooms import SUBPROTOCOL, Message, RoomClient, Subscription

__all__ = [
    "connect", "Client", "open_connection", "WebSocket", "RoomClient", "Subscription", "Message",
    "Backoff", "reconnect_hint", "retry_after", "measure", "Ranking", "GaveUp", "SendQueueFull",
    "SubscriptionError", "SUBPROTOCOL",
]
