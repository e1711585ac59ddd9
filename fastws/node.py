"""The Node: one process's WebSocket world, built from a :class:`~fastws.Config`.

Both fronts (the native server, :mod:`fastws.server`, and the ASGI server,
:mod:`fastws.asgi`) run on a Node; they differ only in the protocol they
speak on the socket.  Everything that is the same whatever that protocol is
lives here, one field per collaborator:

* ``config``    - every setting (``fastws.Config``);
* ``app``       - the routes and callbacks (``fastws.App``), or None for an
                  ASGI application (which speaks through its own scope);
* ``hub``       - the engine-side registry of open connections, the write
                  coalescer, the timer wheel and the delivery policy
                  (``fastws.core.Hub``: Cython, or the Python twin);
* ``rooms``     - the local room registry (``fastws.rooms.Rooms``);
* ``bridge``    - rooms <-> broker, when a broker is configured (rooms across
                  workers and nodes; ``fastws.broker.bridge``);
* ``admission`` - connection limits checked before an upgrade
                  (``fastws.limits.Admission``);
* ``origins``   - which browser pages may upgrade (``allowed_origins``);
* ``routes``    - the plain HTTP routes served on the WebSocket port: the
                  operations endpoints and a ``fastws.App``'s own;
* ``health``, ``metrics``, ``stats_page`` - ``/health`` + ``/livez``,
                  ``/metrics``, ``/stats``;
* ``draining``  - set when a shutdown starts: upgrades get 503, ``/health``
                  says 503.

A front builds ``Node(config, app)``, awaits :meth:`Node.start` with the
handshake callback of its protocol (the native front decides upgrades in
``Hub.handshake``; the ASGI front hands decided upgrades to connections with
``Connection.adopt`` and needs none), serves, and on shutdown calls
:meth:`Node.begin_drain`, :meth:`Node.close_connections` and
:meth:`Node.stop`.
"""

from __future__ import annotations

import asyncio
import logging

from . import core, publish_api
from .broker import create_broker
from .broker.bridge import Bridge
from .config import Config, mask_url
from .errors import (CALLBACK_FAILED, RESTARTING, SHUTTING_DOWN, BrokerError, HandshakeError,
                     ServerStartError)
from .frames import PRIORITY_NORMAL
from .handshake import accept_response, negotiate_deflate
from .origins import OriginPolicy, host_name, ops_host_set
from .health import Health
from .limits import Admission, jittered
from .metrics import Metrics
from .resume import Resumer
from .rooms import Rooms
from .stats import StatsPage

log = logging.getLogger("fastws")


class HttpRoutes:
    """The plain HTTP routes of the WebSocket port: ``(METHOD, path)``
    routes and prefix routes (``POST /connections/{id}``).

    A handler is ``handler(request: fastws.handshake.HttpRequest)`` (sync or
    async) returning ``(status, body, content_type)`` or
    ``(status, body, content_type, extra_headers)``.  An *operations*
    route (``/health``, ``/metrics``, the publish API ...) answers only
    requests whose ``Host`` is one of ``ops_hosts`` when that is set; a
    ``fastws.App``'s own routes answer every host.
    """

    def __init__(self, ops_hosts=frozenset()) -> None:
        self.exact: dict = {}          # (METHOD, path) -> (handler, is_ops)
        self.prefixes: list = []       # (METHOD, path prefix, handler), always operations routes
        self.paths: set = set()        # every exact path, for a cheap first test
        self.prefix_paths: tuple = ()  # every prefix, for str.startswith
        self.ops_hosts = ops_hosts     # host names that may reach operations routes (empty: any)

    def add(self, method: str, path: str, handler, *, prefix: bool = False, ops: bool = True) -> None:
        """Serve ``method path`` with ``handler`` (an existing route of the
        same method and path is kept: the application's own route wins)."""
        method = method.upper()
        if prefix:
            self.prefixes.append((method, path, handler))
            self.prefix_paths = tuple(p for _, p, _ in self.prefixes)
            return
        self.exact.setdefault((method, path), (handler, ops))
        self.paths.add(path)

    def __contains__(self, key) -> bool:
        return key in self.exact

    def __bool__(self) -> bool:
        return bool(self.exact or self.prefixes)

    def might_serve(self, path: str) -> bool:
        """Cheap test: could a route answer ``path`` (any method)?"""
        return path in self.paths or bool(self.prefix_paths and path.startswith(self.prefix_paths))

    def host_allowed(self, host) -> bool:
        """May an operations route answer a request with this ``Host`` value?"""
        return not self.ops_hosts or host_name(host) in self.ops_hosts

    def find(self, method: str, path: str, host=None):
        """The handler of ``method path`` for a request to ``Host`` ``host``,
        or None (no such route, or an operations route for another host)."""
        entry = self.exact.get((method, path))
        if entry is not None:
            handler, ops = entry
            return handler if not ops or self.host_allowed(host) else None
        for m, p, h in self.prefixes:
            if m == method and path.startswith(p):
                return h if self.host_allowed(host) else None
        return None

    def methods(self, path: str) -> list:
        """The methods served at the exact ``path`` (for a 405's Allow)."""
        return sorted(m for (m, p) in self.exact if p == path)


class Node:
    """See the module docstring."""

    def __init__(self, config: Config, app=None) -> None:
        self.config = config                  # every setting
        self.app = app                        # fastws.App, or None (ASGI)
        self.loop = None                      # the running loop, once started
        self.hub = None                       # core.Hub, once started
        self.rooms = None                     # Rooms over the hub, once started
        self.broker = None                    # the Broker, when config.broker is set
        self.bridge = None                    # rooms <-> broker
        self.resumer = None                   # replay + live stream for resuming members (history brokers)
        self.admission = Admission(config.max_connections, config.handshake_rate,
                                   config.handshake_burst or None, config.retry_after)
        try:
            self.origins = OriginPolicy(config.allowed_origins)
            ops_hosts = ops_host_set(config.ops_hosts)
        except ValueError as exc:
            raise ServerStartError(str(exc)) from None
        self.routes = HttpRoutes(ops_hosts)   # plain HTTP on the WebSocket port
        self.handshakes: dict = {}            # HTTP status of each upgrade decision -> count
        self.draining = False                 # a shutdown started
        self.health = None                    # /health, /livez and the checks registry
        self.metrics = None                   # /metrics, when config.metrics
        self.stats_page = None                # /stats, when config.stats
        self._paths: dict = {}                # interned request paths (bounded), shared by connections

    # -- lifecycle ------------------------------------------------------------------

    async def start(self, handshake=None) -> None:
        """Build the hub (``handshake(conn, head)`` decides upgrades that
        arrive on the hub's own protocol; None when the front hands decided
        upgrades over with ``Connection.adopt``), the rooms, the operations
        endpoints and, when configured, the broker."""
        c = self.config
        self.loop = asyncio.get_running_loop()
        self.hub = core.Hub(self.loop, handshake, on_callback_error=self._callback_error,
                            **core.hub_settings(c))
        self.rooms = Rooms.from_config(self.hub, c)
        if self.app is not None:
            for (method, path), handler in self.app.http_routes.items():
                self.routes.add(method, path, handler, ops=False)
        self.health = Health(self)
        self.health.start()
        if c.metrics:
            self.metrics = Metrics(self)
        if c.stats:
            self.stats_page = StatsPage(self)
            self.stats_page.start()
        if c.broker:
            await self._start_broker()
        if c.publish_token:
            publish_api.register(self, c.publish_token)
        if self.app is not None:
            self.app.node = self

    async def _start_broker(self) -> None:
        c = self.config
        try:
            self.broker = create_broker(c.broker, prefix=c.broker_prefix)
        except (ValueError, ImportError, BrokerError) as exc:
            raise ServerStartError(mask_url(f"broker {c.broker!r}: {exc}")) from None
        self.bridge = Bridge(self.rooms, self.broker, lookup=self.connection)
        await self.bridge.start()           # never raises when the backend is down: it retries
        self.resumer = Resumer.for_bridge(self.rooms, self.bridge)
        self.health.add_check("broker", self.broker.ping)
        # fails while a room's (un)subscription waits for a retry
        self.health.add_check("broker_subscriptions", self.bridge.check)
        log.info("fastws: broker %s (node %s)", mask_url(c.broker), self.broker.node_id)

    async def stop(self) -> None:
        """Release what :meth:`start` built (after the connections are gone)."""
        if self.resumer is not None:
            self.resumer.close()
            self.resumer = None
        if self.bridge is not None:
            await self.bridge.stop()
            self.bridge = None
        if self.broker is not None:
            await self.broker.close()
        if self.health is not None:
            self.health.stop()
        if self.metrics is not None:
            self.metrics.stop()
        if self.stats_page is not None:
            self.stats_page.stop()
        if self.hub is not None:
            self.hub.stop_timers()
        if self.app is not None and self.app.node is self:
            self.app.node = None

    # -- upgrades (both fronts) ------------------------------------------------------

    def count_handshake(self, status: int) -> None:
        """One upgrade request decided with HTTP ``status`` (metrics)."""
        self.handshakes[status] = self.handshakes.get(status, 0) + 1

    def admit(self) -> HandshakeError | None:
        """Before an upgrade request is parsed: None to go on, or the refusal
        (503 while draining, 503 with a jittered ``Retry-After`` past
        ``max_connections`` or the handshake rate)."""
        if self.draining:
            return HandshakeError(503, "server shutting down")
        refused = self.admission.check(len(self.hub.connections))
        if refused is not None:
            reason, retry = refused
            return HandshakeError(503, reason, [("Retry-After", str(retry))])
        return None

    def check_origin(self, request) -> HandshakeError | None:
        """A browser page of a site ``allowed_origins`` does not list: 403."""
        if self.origins.allows_request(request):
            return None
        return HandshakeError(403, "origin not allowed")

    def accept(self, request, subprotocol=None, headers=()) -> tuple:
        """``(response, deflate)``: the 101 answer to ``request`` and the
        negotiated permessage-deflate parameters (None without compression)."""
        ext_header = deflate = None
        c = self.config
        if c.compression:
            ext_header, deflate = negotiate_deflate(
                request.extensions,
                server_no_context_takeover=c.deflate_server_no_context_takeover,
                client_no_context_takeover=c.deflate_client_no_context_takeover)
        self.count_handshake(101)
        return accept_response(request, subprotocol, ext_header, headers), deflate

    def intern_path(self, path: str) -> str:
        """One shared str per distinct request path (bounded): a little less
        memory per connection."""
        shared = self._paths.get(path)
        if shared is None:
            shared = path
            if len(self._paths) < 4096:
                self._paths[path] = path
        return shared

    # -- messages ---------------------------------------------------------------------

    def connection(self, conn_id):
        """The open connection of this process with id ``conn_id``, or None."""
        conn = self.hub.connections.get(conn_id) if self.hub is not None else None
        return conn if conn is not None and not conn.closed else None

    def publish(self, room: str, message, *, namespace: str = "", exclude=None,
                priority: int = PRIORITY_NORMAL) -> int:
        """Send ``message`` to every member of ``room`` on every node (through
        the broker when there is one), encoded once per node.  Returns this
        node's sequence number for it (0 when the room has no member here and
        there is no broker)."""
        if self.bridge is not None:
            return self.bridge.publish_nowait(room, message, namespace=namespace, exclude=exclude,
                                              priority=priority)
        seq, _ = self.rooms.publish(room, message, namespace=namespace, exclude=exclude,
                                    priority=priority)
        return seq

    async def publish_confirmed(self, room: str, message, *, namespace: str = "",
                                priority: int = PRIORITY_NORMAL) -> tuple:
        """:meth:`publish`, waiting for the broker: ``(seq, remote)`` where
        ``remote`` is False when other nodes did not get it (True without a
        broker: there are no other nodes)."""
        if self.bridge is not None:
            return await self.bridge.publish(room, message, namespace=namespace, priority=priority)
        seq, _ = self.rooms.publish(room, message, namespace=namespace, priority=priority)
        return seq, True

    def global_id(self, conn) -> str:
        """``conn``'s id across nodes: ``"{node}:{id}"`` with a broker, else its id."""
        return self.bridge.global_id(conn) if self.bridge is not None else str(conn.id)

    async def send_to(self, conn_id, message):
        """Send ``message`` to one connection, on whichever node holds it.
        True: queued; False: no such open connection; None: its node did not
        answer (with a broker)."""
        if self.bridge is not None:
            return await self.bridge.send_to(conn_id, message)
        try:
            conn = self.connection(int(str(conn_id).rpartition(":")[2]))
        except ValueError:
            return False
        if conn is None:
            return False
        conn.send(message)
        return True

    async def resume(self, conn, room: str, since=None, *, namespace=None, limit: int = 1000) -> bool:
        """See :meth:`fastws.App.resume`."""
        if self.resumer is None:
            raise ValueError("resume needs a broker with history: --broker redis+streams://...")
        return await self.resumer.resume(conn, room, since, namespace=namespace, limit=limit)

    # -- shutdown --------------------------------------------------------------------

    def begin_drain(self) -> None:
        """Stop taking new connections: upgrades get 503, /health says 503."""
        self.draining = True

    async def close_connections(self, code: int = SHUTTING_DOWN.code, reason: str = SHUTTING_DOWN.reason,
                                deadline: float | None = None) -> None:
        """Close every connection with ``code``, ``drain_rate`` per second (all
        at once when 0); on a 1001 with ``reconnect_delay`` set, each reason
        tells its client when to come back (spread with jitter so they do not
        return together).  Stops pacing at ``deadline`` (loop time)."""
        c = self.config
        rate, base = c.drain_rate, c.reconnect_delay
        conns = list(self.hub.connections.values())
        log.info("fastws: closing %d connections with %d%s", len(conns), code,
                 f" at {rate:g}/s" if rate else "")
        step = max(1, int(rate * 0.05)) if rate else len(conns) or 1
        for i in range(0, len(conns), step):
            for conn in conns[i:i + step]:
                why = reason
                if base > 0 and code == RESTARTING.code:
                    why = RESTARTING.reason.format(delay=jittered(base, base))
                conn.close(code, why)
            if rate and i + step < len(conns):
                if deadline is not None and self.loop.time() >= deadline:
                    break
                await asyncio.sleep(step / rate)

    def abort_connections(self) -> None:
        for conn in list(self.hub.connections.values()):
            conn.abort()

    # -- errors ------------------------------------------------------------------------

    @staticmethod
    def _callback_error(conn, exc) -> None:
        log.error("fastws: exception in a callback for connection %s; closing it with %d",
                  conn.id, CALLBACK_FAILED.code, exc_info=exc)
