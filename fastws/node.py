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
* ``client_limits`` - the same per client address, checked once the
                  request is parsed (``fastws.limits.ClientLimits``);
* ``proxies``   - the peers trusted to name the client in ``X-Forwarded-For``
                  / ``Forwarded`` (``fastws.proxy.TrustedProxies``), or None
                  without ``proxy_headers``; ``clients`` keeps the address
                  they named of each open connection (native front);
* ``origins``   - which browser pages may upgrade (``allowed_origins``);
* ``routes``    - the plain HTTP routes served on the WebSocket port: the
                  operations endpoints and a ``fastws.App``'s own;
* ``health``, ``metrics``, ``stats_page`` - ``/health`` + ``/livez``,
                  ``/metrics``, ``/stats``;
* ``presence``  - who is in which room on every node (``--presence``, a
                  :class:`fastws.presence.Presence` in the broker's Redis);
* ``regions``   - this node's part in a deployment over several regions
                  (``--region-peers``, a :class:`fastws.regions.Regions`):
                  the user directory, messages to and from other regions,
                  ``GET /regions``;
* ``access``    - the access log (``--access-log``, an :class:`AccessLog`), or None;
* ``draining``  - set when a shutdown starts: upgrades get 503, ``/health``
                  says 503.

A ``fastws.App``'s ``on_startup`` hooks run at the end of :meth:`Node.start`
(the node is complete: rooms, broker, presence) and its ``on_shutdown``
hooks at the start of :meth:`Node.stop` (connections are closed, the broker
still runs), whatever the front.

A front builds ``Node(config, app)``, awaits :meth:`Node.start` with the
handshake callback of its protocol (the native front decides upgrades in
``Hub.handshake``; the ASGI front hands decided upgrades to connections with
``Connection.adopt`` and needs none), serves, and on shutdown calls
:meth:`Node.begin_drain`, :meth:`Node.close_connections` and
:meth:`Node.stop`.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from . import core, publish_api
from .broker import Broker, History, HistoryPage, create_broker, new_node_id
from .broker.bridge import Bridge
from .broker.wire import unpack_room
from .config import Config, mask_url
from .errors import CALLBACK_FAILED, RESTARTING, SHUTTING_DOWN, BrokerError, HandshakeError, ServerStartError
from .frames import PRIORITY_NORMAL, DeflateParams
from .handshake import HttpRequest, Request, accept_response, negotiate_deflate
from .health import Health
from .limits import Admission, ClientLimits, jittered
from .memory import HeapTrim
from .metrics import Metrics
from .origins import OriginPolicy, host_name, ops_host_set
from .presence import Presence, presence_client
from .proxy import TrustedProxies, client_key
from .regions import USER_NAMESPACE, Regions
from .resume import Resumer
from .roomproto import serve_client_js
from .rooms import Rooms
from .stats import StatsPage

log = logging.getLogger("fastws")
#: the headers :meth:`Node.forwarded` reads, by name as str and as bytes
_FORWARDED_HEADERS = {"x-forwarded-for": 0, "x-forwarded-proto": 1, "forwarded": 2,
                      b"x-forwarded-for": 0, b"x-forwarded-proto": 1, b"forwarded": 2}
access_log = logging.getLogger("fastws.access")

#: a plain HTTP route's handler: ``handler(request)`` (sync or async) returning
#: ``(status, body, content_type[, extra_headers])`` (see :class:`HttpRoutes`)
HttpHandler = Callable[[HttpRequest], Any]


async def _quietly(awaitable: Awaitable[object]) -> None:
    """Await a release step whose failure changes nothing (Redis gone)."""
    try:
        await awaitable
    except Exception as exc:
        log.debug("fastws: release step failed: %s", exc)


class AccessLog:
    """``--access-log``: one info line on logger ``fastws.access`` per
    upgrade (101), refused upgrade (its status and why) and close (its code,
    reason and how long the connection was open), in both fronts.

    Built only when the setting is on, so nothing of it runs otherwise (the
    native front then keeps its C fast upgrade path).  The native front
    wraps a route with :meth:`route` to see its connections' closes; the
    ASGI front calls :meth:`opened`/:meth:`closed` from its session."""

    def __init__(self) -> None:
        # open connection -> (monotonic time of its 101, peer, path)
        self.since: dict[core.Connection, tuple[float, str, str | None]] = {}
        self._routes: dict[int, _AccessRoute] = {}   # id(app route) -> its _AccessRoute

    @staticmethod
    def peer(address: object) -> str:
        if isinstance(address, tuple) and len(address) >= 2:
            return f"{address[0]}:{address[1]}"
        return str(address) if address else "-"

    def refused(self, address: object, path: str | None, status: int, detail: str = "") -> None:
        access_log.info('%s "%s" %d %s', self.peer(address), path or "-", status, detail or "")

    def opened(self, conn: core.Connection, address: object, path: str | None) -> None:
        peer = self.peer(address)
        self.since[conn] = (time.monotonic(), peer, path)
        access_log.info('%s "%s" 101 upgraded', peer, path)

    def forget(self, conn: core.Connection) -> None:
        """``conn`` never opened after all (the upgrade could not be written)."""
        self.since.pop(conn, None)

    def closed(self, conn: core.Connection, code: int | None, reason: str | None) -> None:
        entry = self.since.pop(conn, None)
        if entry is None:
            return
        t0, peer, path = entry
        access_log.info('%s "%s" closed %s %r after %.3fs', peer, path, code, reason or "",
                        time.monotonic() - t0)

    def route(self, route: Any) -> _AccessRoute:
        """``route`` as the engine should see it: the same callbacks, and a
        close reported here first."""
        wrapped = self._routes.get(id(route))
        if wrapped is None or wrapped.inner is not route:
            wrapped = self._routes[id(route)] = _AccessRoute(route, self)
        return wrapped


class _AccessRoute:
    """An app route seen through the access log (see :meth:`AccessLog.route`):
    everything is the route's own, except that ``on_disconnect`` reports the
    close before the app's callback runs."""

    __slots__ = ("inner", "log")

    def __init__(self, inner: Any, access: AccessLog) -> None:
        self.inner = inner
        self.log = access

    path = property(lambda self: self.inner.path)
    namespace = property(lambda self: self.inner.namespace)
    on_open = property(lambda self: self.inner.on_open)
    open_is_async = property(lambda self: self.inner.open_is_async)
    on_message = property(lambda self: self.inner.on_message)
    message_is_async = property(lambda self: self.inner.message_is_async)
    disconnect_is_async = property(lambda self: self.inner.disconnect_is_async)

    @property
    def on_disconnect(self) -> Callable[[core.Connection, int, str], object]:
        inner, access = self.inner.on_disconnect, self.log
        if inner is None:
            return access.closed
        if self.inner.disconnect_is_async:
            async def closed_async(conn: core.Connection, code: int, reason: str) -> None:
                access.closed(conn, code, reason)
                await inner(conn, code, reason)
            return closed_async

        def closed(conn: core.Connection, code: int, reason: str) -> object:
            access.closed(conn, code, reason)
            return inner(conn, code, reason)
        return closed


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

    def __init__(self, ops_hosts: frozenset[str] = frozenset()) -> None:
        self.exact: dict[tuple[str, str], tuple[HttpHandler, bool]] = {}  # (METHOD, path) -> (handler, is_ops)
        self.prefixes: list[tuple[str, str, HttpHandler]] = []  # (METHOD, path prefix, handler), operations routes
        self.paths: set[str] = set()   # every exact path, for a cheap first test
        self.prefix_paths: tuple[str, ...] = ()  # every prefix, for str.startswith
        self.ops_hosts = ops_hosts     # host names that may reach operations routes (empty: any)

    def add(self, method: str, path: str, handler: HttpHandler, *, prefix: bool = False, ops: bool = True) -> None:
        """Serve ``method path`` with ``handler`` (an existing route of the
        same method and path is kept: the application's own route wins)."""
        method = method.upper()
        if prefix:
            self.prefixes.append((method, path, handler))
            self.prefix_paths = tuple(p for _, p, _ in self.prefixes)
            return
        self.exact.setdefault((method, path), (handler, ops))
        self.paths.add(path)

    def __contains__(self, key: object) -> bool:
        return key in self.exact

    def __bool__(self) -> bool:
        return bool(self.exact or self.prefixes)

    def might_serve(self, path: str) -> bool:
        """Cheap test: could a route answer ``path`` (any method)?"""
        return path in self.paths or bool(self.prefix_paths and path.startswith(self.prefix_paths))

    def host_allowed(self, host: str | None) -> bool:
        """May an operations route answer a request with this ``Host`` value?"""
        return not self.ops_hosts or host_name(host) in self.ops_hosts

    def find(self, method: str, path: str, host: str | None = None) -> HttpHandler | None:
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

    def methods(self, path: str) -> list[str]:
        """The methods served at the exact ``path`` (for a 405's Allow)."""
        return sorted(m for (m, p) in self.exact if p == path)


class Node:
    """See the module docstring."""

    def __init__(self, config: Config, app: Any = None) -> None:
        self.config = config                  # every setting
        self.app = app                        # fastws.App, or None (ASGI) (Any: fastws.app imports this module)
        self.loop: asyncio.AbstractEventLoop | None = None   # the running loop, once started
        self.hub: core.Hub | None = None      # core.Hub, once started
        self.rooms: Rooms | None = None       # Rooms over the hub, once started
        self.broker: Broker | None = None     # the Broker, when config.broker is set
        self.bridge: Bridge | None = None     # rooms <-> broker
        self.resumer: Resumer | None = None   # replay + live stream for resuming members (history brokers)
        self.presence: Presence | None = None  # fastws.presence.Presence, with config.presence
        self.regions: Regions | None = None   # with config.region_peers
        self.access = AccessLog() if config.access_log else None
        self.admission = Admission(config.max_connections, config.handshake_rate,
                                   config.handshake_burst or None, config.retry_after)
        self.client_limits = ClientLimits(config.max_connections_per_ip, config.handshake_rate_per_ip,
                                          config.handshake_burst_per_ip or None, config.retry_after)
        self.proxies = TrustedProxies(config.forwarded_allow_ips) if config.proxy_headers else None
        self.clients: dict[core.Connection, Any] = {}  # open connection -> the client address a proxy named
        self._clients_sweep_at = 1024         # len(clients) that triggers the next sweep
        try:
            self.origins = OriginPolicy(config.allowed_origins)
            ops_hosts = ops_host_set(config.ops_hosts)
        except ValueError as exc:
            raise ServerStartError(str(exc)) from None
        self.routes = HttpRoutes(ops_hosts)   # plain HTTP on the WebSocket port
        self.handshakes: dict[int, int] = {}  # HTTP status of each upgrade decision -> count
        self.draining = False                 # a shutdown started (/health says 503)
        self.refuse_upgrades = False          # upgrades get 503 (while draining, unless handing off)
        self.health: Health | None = None     # /health, /livez and the checks registry
        self.heap_trim: HeapTrim | None = None   # gives the C heap back after many connections closed
        self.metrics: Metrics | None = None   # /metrics, when config.metrics
        self.stats_page: StatsPage | None = None  # /stats, when config.stats
        self._paths: dict[str, str] = {}      # interned request paths (bounded), shared by connections
        self.node_id = new_node_id()          # the hub's (connection ids "<node_id>-<n>") and the broker's

    # -- lifecycle ------------------------------------------------------------------

    async def start(self, handshake: Callable[[core.Connection, bytes | None], None] | None = None) -> None:
        """Build the hub (``handshake(conn, head)`` decides upgrades that
        arrive on the hub's own protocol; None when the front hands decided
        upgrades over with ``Connection.adopt``), the rooms, the operations
        endpoints and, when configured, the broker."""
        c = self.config
        self.loop = asyncio.get_running_loop()
        self.hub = core.Hub(self.loop, handshake, on_callback_error=self._callback_error,
                            node_id=self.node_id, **core.hub_settings(c))
        self.rooms = Rooms.from_config(self.hub, c)
        if self.client_limits.max_connections or c.proxy_headers:
            # per-address counts and forwarded addresses end with their connection
            self.hub.on_closed = self._connection_closed
        if self.app is not None:
            self.rooms.authorize = self._authorize_room   # the app's authorize_join/_publish
        if self.app is not None:
            for (method, path), handler in self.app.http_routes.items():
                self.routes.add(method, path, handler, ops=False)
        if c.serve_client_js:                 # the browser client (an app's own route wins)
            serve_client_js(self.routes)
        self.health = Health(self)
        self.health.start()
        hub = self.hub
        self.heap_trim = HeapTrim(self.loop, lambda: hub.open_connections)
        self.heap_trim.start()
        if c.metrics:
            self.metrics = Metrics(self)
        if c.stats:
            self.stats_page = StatsPage(self)
            self.stats_page.start()
        try:
            presence_redis = presence_client(c.broker) if c.presence else None   # the extra is there
        except ImportError as exc:
            await self.stop(run_hooks=False)
            raise ServerStartError(str(exc)) from None
        try:
            if c.broker:
                await self._start_broker()
            if presence_redis is not None:
                await self._start_presence(presence_redis)
            if c.region_peers:
                await self._start_regions()
            if c.publish_token:
                publish_api.register(self, c.publish_token)
            if self.app is not None:
                self.app.node = self
                await self._run_hooks("on_startup", self.app.startup_hooks)
        except BaseException:
            # a start that fails half way releases what it started (broker
            # links, timers): the process ends with one line, nothing pending
            if presence_redis is not None and self.presence is None:
                await _quietly(presence_redis.aclose())
            await self.stop(run_hooks=False)
            raise

    async def _start_broker(self) -> None:
        c = self.config
        try:
            self.broker = create_broker(c.broker, prefix=c.broker_prefix, node_id=self.node_id)
        except (ValueError, ImportError, BrokerError) as exc:
            raise ServerStartError(mask_url(f"broker {c.broker!r}: {exc}")) from None
        self.bridge = Bridge(self.rooms, self.broker, lookup=self.connection)
        await self.bridge.start()           # never raises when the backend is down: it retries
        self.resumer = Resumer.for_bridge(self.rooms, self.bridge)
        assert self.health is not None      # start() made it
        self.health.add_check("broker", self.broker.ping)
        # fails while a room's (un)subscription waits for a retry
        self.health.add_check("broker_subscriptions", self.bridge.check)
        log.info("fastws: broker %s (node %s)", mask_url(c.broker), self.broker.node_id)

    async def _start_presence(self, client: Any) -> None:
        c = self.config
        if self.broker is None:     # Config refuses presence without a Redis broker
            raise ServerStartError("presence needs a Redis broker (--broker redis://...)")
        self.presence = Presence(client, self.broker.node_id, prefix=c.broker_prefix, ttl=c.presence_ttl)
        self.presence.attach(self.rooms, self.global_id)
        await self.presence.start()
        log.info("fastws: presence on (ttl %gs)", c.presence_ttl)

    async def _start_regions(self) -> None:
        try:
            regions = Regions(self.config, self.node_id, self._publish_in_region, self._deliver_here)
            await regions.start()
        except ImportError as exc:
            raise ServerStartError(str(exc)) from None
        self.regions = regions
        self._running_rooms().listeners.append(regions.on_room)
        assert self.health is not None      # start() made it
        self.health.add_check("region", regions.check)
        self.routes.add("GET", "/regions", self._regions_page)

    async def _regions_page(self, request: HttpRequest) -> tuple[int, bytes, str, list[tuple[str, str]]]:
        assert self.regions is not None
        body = json.dumps(await self.regions.describe()).encode()
        return 200, body, "application/json", [("Cache-Control", "no-store")]

    def _deliver_here(self, namespace: str, room: str, payload: bytes) -> None:
        """Deliver a broker ROOM payload to this node's members of the room
        only (on a Redis Cluster the region's reader sends what other regions
        sent to every node of the region at once)."""
        opcode, priority, body = unpack_room(payload)
        self._running_rooms().publish_frame((namespace, room), opcode, body, priority)

    def _publish_in_region(self, namespace: str, room: str, message: str | bytes, priority: int) -> None:
        """Deliver to this region only (what another region sent, a user here)."""
        if self.bridge is not None:
            self.bridge.publish_nowait(room, message, namespace=namespace, priority=priority)
        else:
            self._running_rooms().publish(room, message, namespace=namespace, priority=priority)

    async def _run_hooks(self, kind: str, hooks: Iterable[Callable[[], object]]) -> None:
        """Run the app's ``on_startup``/``on_shutdown`` hooks in order (sync
        or async).  A startup hook that raises stops the start
        (ServerStartError, one line); a shutdown hook's exception is logged
        and the others still run."""
        for fn in list(hooks):
            name = getattr(fn, "__qualname__", repr(fn))
            try:
                result = fn()
                if inspect.isawaitable(result):
                    await result
            except Exception as exc:
                if kind == "on_startup":
                    raise ServerStartError(f"{kind} hook {name} failed: {type(exc).__name__}: {exc}") from exc
                log.error("fastws: %s hook %s failed", kind, name, exc_info=exc)

    async def stop(self, run_hooks: bool = True) -> None:
        """Release what :meth:`start` built (after the connections are gone);
        the app's ``on_shutdown`` hooks run first."""
        if run_hooks and self.app is not None and self.app.node is self:
            await self._run_hooks("on_shutdown", self.app.shutdown_hooks)
        if self.heap_trim is not None:
            self.heap_trim.stop()
        if self.regions is not None:
            regions, self.regions = self.regions, None
            await regions.close()
        if self.presence is not None:
            presence, self.presence = self.presence, None
            await presence.close()
            await _quietly(presence.client.aclose())
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
        if self.refuse_upgrades:
            return HandshakeError(503, "server shutting down")
        refused = self.admission.check(len(self._running_hub().connections))
        if refused is not None:
            reason, retry = refused
            return HandshakeError(503, reason, [("Retry-After", str(retry))])
        return None

    @property
    def guards_clients(self) -> bool:
        """Does an upgrade need its client's address (per-client limits, or
        proxy headers to read)?  Then the native front takes no upgrade in C."""
        return self.client_limits.enabled or self.proxies is not None

    def forwarded(self, peer: Any, headers: Iterable[tuple[Any, Any]]) -> tuple[Any, bool | None]:
        """``(client, secure)`` of a request from the direct ``peer`` with
        ``headers`` (``(lower-case name, value)`` pairs, str or bytes): the
        address and scheme a trusted proxy named (``proxy_headers``,
        :mod:`fastws.proxy`), else ``(peer, None)``.  ``secure``: True for
        https/wss, False for http/ws, None when not said."""
        proxies = self.proxies
        if proxies is None:
            return peer, None
        values: list[str | None] = [None, None, None]
        for name, value in headers:
            i = _FORWARDED_HEADERS.get(name)
            if i is not None:
                if type(value) is not str:
                    value = bytes(value).decode("latin-1")
                before = values[i]
                values[i] = value if before is None else before + "," + value
        resolved: tuple[Any, bool | None] = proxies.resolve(peer, *values)
        return resolved

    def admit_client(self, client: Any, holder: object) -> HandshakeError | None:
        """Once the upgrade request is parsed: None to go on, or 429 with a
        jittered ``Retry-After`` past ``max_connections_per_ip`` or
        ``handshake_rate_per_ip`` for ``client`` (its address, see
        :meth:`forwarded`).  ``holder`` stands for the upgrade until it is
        over: the engine connection (native front) or its transport (ASGI
        front).  A client without an address (a peer on ``--uds`` whose
        proxy named nobody) is not counted."""
        limits = self.client_limits
        if not limits.enabled:
            return None
        host = client[0] if isinstance(client, tuple) and client else client
        if not host:      # a Unix-socket peer no trusted proxy named: no address to count
            return None
        refused = limits.check(client_key(host), holder)
        if refused is None:
            return None
        reason, retry = refused
        if log.isEnabledFor(logging.DEBUG):
            log.debug("fastws: upgrade from %s refused: %s", host, reason)
        return HandshakeError(429, reason, [("Retry-After", str(retry))])

    def _client_key(self, client: Any) -> Any:
        host = client[0] if isinstance(client, tuple) and client else client
        return client_key(host) if host else None

    def release_client(self, client: Any, holder: object) -> None:
        """An admitted upgrade (``holder``) of ``client`` is over before it
        became a connection (refused later, or the client left): stop
        counting it for the per-address limit now."""
        key = self._client_key(client)
        if key is not None:
            self.client_limits.release(key, holder)

    def handed_over(self, client: Any, transport: object, conn: core.Connection) -> None:
        """The ASGI front handed ``client``'s upgraded ``transport`` to ``conn``:
        ``conn`` now stands for it in the per-address count (and is released
        when it closes, see :meth:`_connection_closed`)."""
        key = self._client_key(client)
        if key is not None:
            self.client_limits.replace(key, transport, conn)
        if self.config.proxy_headers or self.client_limits.max_connections:
            self.clients[conn] = client

    def _connection_closed(self, conn: core.Connection) -> None:
        """``hub.on_closed``: an upgraded connection ended; forget its
        forwarded address and stop counting it for its address's limit."""
        client = self.clients.pop(conn, None)
        if self.client_limits.max_connections:
            self.release_client(client if client is not None else conn.remote_address, conn)

    def remember_client(self, conn: core.Connection, client: Any) -> None:
        """Keep the address a trusted proxy named for ``conn`` (see
        :meth:`remote_address`); entries of lost connections are swept when
        the table has doubled since the last sweep."""
        clients = self.clients
        clients[conn] = client
        if len(clients) >= self._clients_sweep_at:
            for c in list(clients):
                # lost: its close code is known and its transport gone
                if c.close_code is not None and c.remote_address is None:
                    del clients[c]
            self._clients_sweep_at = max(1024, 2 * len(clients))

    def remote_address(self, conn: core.Connection) -> Any:
        """The client's address of ``conn``: the one a trusted proxy named
        (``proxy_headers``), else its peer's."""
        client = self.clients.get(conn) if self.clients else None
        return client if client is not None else conn.remote_address

    def auth_failures(self) -> dict[str, int]:
        """Upgrades refused by authentication, by reason, summed over the
        app's verifiers: each route's ``on_connect`` that counts its
        refusals in a ``failures`` dict (``fastws.auth.TokenAuth`` does)."""
        out: dict[str, int] = {}
        if self.app is None:
            return out
        seen = set()
        for route in list(self.app.routes.values()):
            verifier = route.on_connect
            failures = getattr(verifier, "failures", None)
            if isinstance(failures, dict) and id(verifier) not in seen:
                seen.add(id(verifier))
                for reason, n in failures.items():
                    out[reason] = out.get(reason, 0) + n
        return out

    def _authorize_room(self, action: str, conn: core.Connection | None, key: tuple[str, str],
                        message: object) -> bool:
        """``Rooms.authorize``: the app's check for ``key``'s namespace
        (``App.authorize_join`` / ``authorize_publish``); none: allowed."""
        args: tuple[object, ...]
        if action == "join":
            check = self.app.join_checks.get(key[0])
            args = (conn, key[1])
        else:
            check = self.app.publish_checks.get(key[0])
            args = (conn, key[1], message)
        if check is None:
            return True
        try:
            allowed = check(*args)
        except Exception as exc:  # the app's bug: refused, logged
            log.error("fastws: exception in authorize_%s for room %r; refused", action, key[1],
                      exc_info=exc)
            return False
        if inspect.isawaitable(allowed):
            if hasattr(allowed, "close"):
                allowed.close()
            log.error("fastws: authorize_%s returned an awaitable; it must return a bool "
                      "(refused)", action)
            return False
        return bool(allowed)

    def check_origin(self, request: Request) -> HandshakeError | None:
        """A browser page of a site ``allowed_origins`` does not list: 403."""
        if self.origins.allows_request(request):
            return None
        return HandshakeError(403, "origin not allowed")

    def accept(self, request: Request, subprotocol: str | None = None,
               headers: Iterable[tuple[str, str]] = ()) -> tuple[bytes, DeflateParams | None]:
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

    def connection(self, conn_id: str | int) -> core.Connection | None:
        """The open connection of this process with id ``conn_id`` (its
        ``conn.id``, or its number as an int), or None."""
        conn = self.hub.connection(conn_id) if self.hub is not None else None
        return conn if conn is not None and not conn.closed else None

    def publish(self, room: str, message: str | bytes, *, namespace: str = "",
                exclude: core.Connection | None = None, priority: int = PRIORITY_NORMAL) -> int:
        """Send ``message`` to every member of ``room`` on every node (through
        the broker when there is one), encoded once per node.  Returns this
        node's sequence number for it (0 when the room has no member here and
        there is no broker)."""
        seq: int
        if self.regions is not None:
            self.regions.forward_room(namespace, room, message, priority)
        if self.bridge is not None:
            seq = self.bridge.publish_nowait(room, message, namespace=namespace, exclude=exclude,
                                             priority=priority)
            return seq
        seq, _ = self._running_rooms().publish(room, message, namespace=namespace, exclude=exclude,
                                               priority=priority)
        return seq

    async def publish_confirmed(self, room: str, message: str | bytes, *, namespace: str = "",
                                priority: int = PRIORITY_NORMAL) -> tuple[int, bool]:
        """:meth:`publish`, waiting for the broker: ``(seq, remote)`` where
        ``remote`` is False when other nodes did not get it (True without a
        broker: there are no other nodes)."""
        if self.regions is not None:
            self.regions.forward_room(namespace, room, message, priority)
        if self.bridge is not None:
            confirmed: tuple[int, bool] = await self.bridge.publish(room, message, namespace=namespace,
                                                                     priority=priority)
            return confirmed
        seq: int
        seq, _ = self._running_rooms().publish(room, message, namespace=namespace, priority=priority)
        return seq, True

    def bind_user(self, conn: core.Connection, user_id: str) -> None:
        """``conn`` belongs to user ``user_id``: messages sent to the user
        (:meth:`send_to_user`) reach it, from any node and, with regions, from
        any region (the user is in this region's directory while one of its
        connections is open here).  It counts as a room of ``conn``."""
        if not isinstance(user_id, str) or not user_id:
            raise ValueError("a user id is a non-empty str")
        self._running_rooms().join(conn, user_id, namespace=USER_NAMESPACE)

    def unbind_user(self, conn: core.Connection, user_id: str) -> None:
        """Undo :meth:`bind_user` before ``conn`` closes (closing does it)."""
        self._running_rooms().leave(conn, user_id, namespace=USER_NAMESPACE)

    async def send_to_user(self, user_id: str, message: str | bytes, *, priority: int = PRIORITY_NORMAL) -> list[str]:
        """Send ``message`` to every connection bound to ``user_id``, on every
        node and, with regions, in every region.  Returns the regions it was
        handed to (``[]``: the user is in no region that answered); without
        regions, ``[region]``: handed to this node's broker, which reaches
        the user's connections on any node."""
        if self.regions is not None:
            return await self.regions.send_to_user(user_id, message, priority)
        self._publish_in_region(USER_NAMESPACE, user_id, message, priority)
        return [self.config.region]

    def global_id(self, conn: core.Connection) -> str:
        """``conn``'s id across nodes and workers: ``conn.id``, ``"<node_id>-<n>"``."""
        return conn.id  # type: ignore[return-value]  # None only before the upgrade: no callback sees that

    def local_connection(self, conn_id: str | int) -> core.Connection | None:
        """The open connection of this process named by ``conn_id`` (a
        :meth:`global_id` of this node), or None."""
        return self.connection(str(conn_id))

    async def send_to(self, conn_id: str, message: str | bytes) -> bool | None:
        """Send ``message`` to one connection, on whichever node holds it.
        True: queued; False: no such open connection; None: its node did not
        answer (with a broker)."""
        if self.bridge is not None:
            sent: bool | None = await self.bridge.send_to(conn_id, message)
            return sent
        conn = self.local_connection(conn_id)
        if conn is None:
            return False
        conn.send(message)
        return True

    async def disconnect(self, conn_id: str, code: int = 1000, reason: str = "") -> bool | None:
        """Close one connection, on whichever node holds it, with ``code``
        and ``reason``.  True: its close handshake started; False: no such
        open connection; None: its node did not answer (with a broker)."""
        if self.bridge is not None:
            closed: bool | None = await self.bridge.close_conn(conn_id, code, reason)
            return closed
        conn = self.local_connection(conn_id)
        if conn is None:
            return False
        conn.close(code, reason)
        return True

    @property
    def has_history(self) -> bool:
        """The broker keeps room history (``redis+streams://``)."""
        return self.broker is not None and isinstance(self.broker, History)

    async def history(self, room: str, *, namespace: str = "", since: str | None = None,
                      limit: int = 100) -> HistoryPage:
        """The room's recent messages (a :class:`fastws.broker.HistoryPage`
        of entries, oldest first): the last ``limit``, or up to ``limit``
        after the entry id ``since``.  ValueError without a history broker;
        :class:`~fastws.errors.BrokerError` when Redis cannot be asked."""
        broker = self.broker
        if broker is None or not isinstance(broker, History):     # self.has_history
            raise ValueError("history needs a broker with history: --broker redis+streams://...")
        page: HistoryPage = await broker.history((namespace, room), since_id=since, count=limit)
        return page

    async def resume(self, conn: core.Connection, room: str, since: str | None = None, *,
                     namespace: str | None = None, limit: int = 1000) -> bool:
        """See :meth:`fastws.App.resume`."""
        if self.resumer is None:
            raise ValueError("resume needs a broker with history: --broker redis+streams://...")
        return await self.resumer.resume(conn, room, since, namespace=namespace, limit=limit)

    # -- shutdown --------------------------------------------------------------------

    def begin_drain(self, refuse_upgrades: bool = True) -> None:
        """A shutdown starts: /health says 503 and (``refuse_upgrades``, as
        unless the listener is handed to the port's other processes)
        upgrades get 503."""
        self.draining = True
        self.refuse_upgrades = self.refuse_upgrades or refuse_upgrades

    def close_late(self, code: int, reason: str) -> None:
        """During a shutdown: close the connections that upgraded after
        :meth:`close_connections` took its list (an async decision that
        ended late); a no-op for those already closing."""
        base = self.config.reconnect_delay
        for conn in list(self._running_hub().connections.values()):
            if not conn.closed:
                why = reason
                if base > 0 and code == RESTARTING.code:
                    why = RESTARTING.reason.format(delay=jittered(base, base))
                conn.close(code, why)

    async def close_connections(self, code: int = SHUTTING_DOWN.code, reason: str = SHUTTING_DOWN.reason,
                                deadline: float | None = None) -> None:
        """Close every connection with ``code``, ``drain_rate`` per second (all
        at once when 0); on a 1001 with ``reconnect_delay`` set, each reason
        tells its client when to come back (spread with jitter so they do not
        return together).  Stops pacing at ``deadline`` (loop time)."""
        c = self.config
        rate, base = c.drain_rate, c.reconnect_delay
        conns = list(self._running_hub().connections.values())
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
                if deadline is not None and self.loop is not None and self.loop.time() >= deadline:
                    break
                await asyncio.sleep(step / rate)

    def abort_connections(self) -> None:
        for conn in list(self._running_hub().connections.values()):
            conn.abort()

    def _running_hub(self) -> core.Hub:
        """The hub (RuntimeError before :meth:`start`)."""
        if self.hub is None:
            raise RuntimeError("the node is not started")
        return self.hub

    def _running_rooms(self) -> Rooms:
        """The rooms (RuntimeError before :meth:`start`)."""
        if self.rooms is None:
            raise RuntimeError("the node is not started")
        return self.rooms

    # -- errors ------------------------------------------------------------------------

    @staticmethod
    def _callback_error(conn: core.Connection, exc: BaseException) -> None:
        log.error("fastws: exception in a callback for connection %s; closing it with %d",
                  conn.id, CALLBACK_FAILED.code, exc_info=exc)
