"""Run ASGI 3 applications (http, websocket, lifespan) on the fastws core.

    fastws serve myproject.main:app          # Starlette, FastAPI, any ASGI 3 app

or, from Python::

    fastws.run(app, port=8000)              # blocking, uvloop
    await fastws.serve(app, port=8000)      # until cancelled

The package, one module per job:

* :mod:`fastws.asgi.server`    - :class:`AsgiServer`, the front (on a :class:`fastws.node.Node`);
* :mod:`fastws.asgi.http`      - HTTP/1.1 on httptools, the upgrade decision's start;
* :mod:`fastws.asgi.websocket` - one WebSocket's scope, ``receive``/``send``, the hand-over;
* :mod:`fastws.asgi.lifespan`  - the ``lifespan`` scope;
* :mod:`fastws.asgi.rooms`     - the ``fastws.rooms`` extension, both sides;
* :mod:`fastws.asgi.wire`      - response bytes and the tables shared by scopes.

Theory of operation
-------------------
Every TCP connection starts on an :class:`HttpProtocol`, which parses
HTTP/1.1 with ``httptools`` (llhttp).  A plain request becomes an ``http``
scope run as one task (:class:`~fastws.asgi.http.HttpCycle`): keep-alive, pipelining (one
response at a time, reading paused while a later request waits), request
bodies streamed to ``receive()`` (reading paused past ``BODY_HIGH`` buffered
bytes), responses streamed with Content-Length when known up front, else
chunked, and ``Expect: 100-continue`` answered on the first ``receive()``.

An upgrade request becomes a ``websocket`` scope run as one task
(:class:`~fastws.asgi.websocket.WebSocketSession`).  The HTTP protocol keeps the transport while
the application decides (so a client that goes away before the decision is
seen and reported as ``websocket.disconnect`` 1006).  On
``websocket.accept`` the decision is complete, so the session hands the
transport to a fastws engine connection, with the request the HTTP protocol
already parsed (no second parse):

    response, deflate = node.accept(request, subprotocol, headers)
    conn = hub.connection_factory()
    conn.adopt(transport, response, session, path, query, subprotocol, deflate, early_bytes)

The engine writes the 101 response and, from then on, frames are parsed,
unmasked, validated, answered (ping/close) and written (coalesced once per
loop iteration) by ``_core`` exactly as for a ``fastws.App``.  The only per-connection Python is the ASGI
glue: the session, which is also the engine connection's route (its
``on_message``/``on_disconnect`` hand ASGI events to the ``receive()`` the
application waits in), the scope, and the application's own task.
``websocket.send`` queues a frame with ``conn.send``; ``websocket.close``
starts the close handshake with ``conn.close``.

Memory per idle WebSocket (see docs/asgi.md): nothing of the upgrade
decision outlives it (the parsed request, the head, early bytes); received
events are queued only while the application is behind; header tuples,
paths, the server address and client hosts are shared between connections
(bounded tables); the rooms extension is one small object; every session
task shares one name, one done callback and one callback context.

Refusals before accept: ``websocket.close`` -> 403; the denial-response
extension (``websocket.http.response.start/body``) -> the application's own
HTTP response; an exception or a return without accepting -> 500.  After
accept, an exception closes with 1011 and a return closes with 1000.

Rooms (the ``fastws.rooms`` scope extension; see docs/asgi.md): a raw ASGI
application sends ``fastws.join`` / ``fastws.leave`` / ``fastws.publish``
messages; frameworks whose WebSocket wrapper refuses unknown message types
(Starlette, FastAPI) call the ``join``/``leave``/``publish`` callables of
``scope["extensions"]["fastws.rooms"]`` (or :mod:`fastws.asgi.rooms`).  The
registry is a :class:`fastws.rooms.Rooms`, as for a ``fastws.App``: a
publish encodes the message once and queues the same frame on every local
member (``hub.broadcast``), and with a broker (``--broker``, or the
embedded one of ``--workers N``) goes to the other workers and nodes
through the node's bridge (:mod:`fastws.broker.bridge`).

Operations (``/health``, ``/livez``, ``/metrics``, ``/stats``, the HTTP
publish API): the node's routes, the same as on the native server, served for a plain HTTP
request when the application answers it with 404 (the application's own
route of that path wins).

Flow control: a session whose application does not read pauses the socket
past ``WS_QUEUE_HIGH`` queued messages; ``websocket.send`` waits (polling the
transport's buffer, a rare path) while more than ``WS_WRITE_HIGH`` bytes are
unsent.  HTTP ``send`` waits on ``pause_writing``/``resume_writing``.

Requires uvloop: a fastws engine connection is a duck-typed buffered protocol
(``get_buffer``/``buffer_updated``), which uvloop's ``set_protocol`` accepts.
"""

from .server import AsgiServer
from .websocket import WebSocketSession

__all__ = ["AsgiServer", "WebSocketSession"]
