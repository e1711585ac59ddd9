"""Gateway mode: fastws holds the WebSockets, the application runs elsewhere.

The gateway tier keeps every client connected while the application behind
it is deployed, scaled or restarted: each connection's *connect*,
*message* and *disconnect* events go to a backend, which answers them
(accept or refuse, reply, join rooms, publish, close) and pushes whatever
else through the HTTP API of any node (``POST /connections/{id}``, ``POST
/publish``).  ::

    fastws serve --gateway http://127.0.0.1:9000/events          # no app module needed
    fastws serve --gateway redis://127.0.0.1:6379/0               # a Redis Stream and a worker group
    fastws serve chat:app --gateway http://... --gateway-routes /bots   # next to an app's own routes

The pieces:

* :class:`Gateway` (:mod:`fastws.gateway.service`): the node's side; the
  native front builds one from the ``gateway*`` settings, or
  ``fastws.gateway.route(app, "/path", url)`` puts one on a path of an app;
* the transports (:mod:`fastws.gateway.transport`): HTTP (a keep-alive pool,
  batches when the backend takes them) and Redis Streams (a consumer group
  of workers, at least once);
* the backend's side (:mod:`fastws.gateway.sdk`): one ``handle(event,
  api)`` run as an ASGI app (:class:`GatewayApp`, FastAPI / Starlette can
  mount it) or as worker processes (``python -m fastws.gateway
  MODULE:HANDLER --url redis://...``, :func:`run_worker`), and
  :class:`Client` for pushes that answer no event;
* the wire format (:mod:`fastws.gateway.wire`).

Only the native front serves gateway routes: an ASGI application handles
its own WebSockets, so the ASGI front refuses the ``gateway`` setting.
This package is a front (layer 4): it builds on the node (rooms, the
bridge's ``send_to``/``disconnect``, ``publish``, health, metrics) and on
the app's routes, like the native server does.
"""

from .sdk import Accept, Api, Client, Event, GatewayApp, Reject, Worker, handle_events, run_worker
from .service import Gateway, GatewayCollector
from .wire import BATCH_HEADER, DEFAULT_GROUP, DEFAULT_STREAM, EVENT_TYPES


def route(app, path: str, url: str, **options) -> Gateway:
    """Serve the WebSocket path ``path`` (or a comma-separated list of
    paths, ``"*"`` for every path without a route) of ``app`` from the
    backend at ``url``; ``options`` are :class:`Gateway`'s (``token``,
    ``timeout``, ``concurrency``, ``batch``, ``retries``, ``queue``,
    ``overflow``).  Returns the :class:`Gateway`."""
    gateway = Gateway(url, **options)
    gateway.serve(app, path)
    return gateway


__all__ = ["Gateway", "GatewayCollector", "route", "GatewayApp", "Worker", "run_worker", "Client", "Event", "Api",
           "Accept", "Reject", "handle_events", "BATCH_HEADER", "DEFAULT_STREAM", "DEFAULT_GROUP", "EVENT_TYPES"]
