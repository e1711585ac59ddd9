"""Listeners, the loop, the handshake decision and shutdown.

``Server`` composes its collaborators:

* ``hub``     - the engine-side registry and write coalescer (``_core.Hub``, or
                ``_pyconn.Hub`` on the wsproto engine), one per server;
* ``app``     - the routes and callbacks (``fastws.App``);
* ``config``  - every knob (``fastws.Config``);
* ``health``  - /health, /livez and the checks registry (``fastws.health``);
* ``metrics`` - /metrics (``fastws.metrics``), ``stats_page`` - /stats (``fastws.stats``).
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import signal
import socket
import ssl
import time
from functools import cached_property

from . import core
from .app import Accept, App, Reject
from .config import Config, mask_url
from .errors import HandshakeError, ServerStartError
from .limits import Admission, raise_nofile_limit, reconnect_hint
from .rooms import Rooms
from .handshake import (
    HttpRequest,
    OriginPolicy,
    accept_response,
    error_response,
    host_name,
    http_response,
    negotiate_deflate,
    ops_host_set,
    parse_http_head,
    parse_request,
)
from .health import Health

log = logging.getLogger("fastws")


def _hub_class():
    if core.IMPLEMENTATION == "cython":
        from ._core import Hub
    else:
        from ._pyconn import Hub
    return Hub


def bind_socket(host: str, port: int, *, reuse_port: bool = False, backlog: int = 4096,
                listen: bool = True) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ServerStartError(f"cannot listen on {host}:{port}: address already in use") from None
        raise ServerStartError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    if listen:
        sock.listen(backlog)
    sock.setblocking(False)
    return sock


class ServerWiring:
    """Operations endpoints and scale-out wiring shared by :class:`Server`
    and :class:`fastws.asgi.AsgiServer`.

    Uses only fields both servers have: ``config``, ``rooms``, ``health``,
    ``metrics``, ``stats_page``, ``broker``, ``bridge``, ``http_routes``,
    ``_http_paths``, ``_http_prefixes``, ``_http_prefix_paths``.
    """

    #: (METHOD, path) of the HTTP routes that are no operations endpoint (a
    #: fastws.App's own routes): served whatever the Host
    _public_routes = frozenset()

    @cached_property
    def origin_policy(self) -> OriginPolicy:
        """Which browser pages may upgrade (the ``allowed_origins`` setting)."""
        return OriginPolicy(getattr(self.config, "allowed_origins", "same-host"))

    @cached_property
    def _ops_hosts(self) -> frozenset:
        return ops_host_set(getattr(self.config, "ops_hosts", ""))

    def ops_host_allowed(self, host) -> bool:
        """May an operations endpoint answer a request with ``Host`` value
        ``host`` (None: no Host)?  Always with an empty ``ops_hosts``; else
        only when its host name (without port, any case) is listed."""
        hosts = self._ops_hosts
        return not hosts or host_name(host) in hosts

    def add_http_route(self, method: str, path: str, handler, *, prefix: bool = False,
                       ops: bool = True) -> None:
        """Serve plain HTTP ``method path`` on the WebSocket port.

        ``handler(request: HttpRequest)`` (sync or async) returns
        ``(status, body_bytes, content_type)`` or
        ``(status, body_bytes, content_type, extra_headers)``.  The response
        closes the connection.  Bodies are read up to ``max_message_size``
        (413 beyond).  An operations endpoint (``ops``, the default) answers
        only the hosts of ``ops_hosts`` when that is set, 404 elsewhere.
        """
        if not ops and not prefix:
            self._public_routes = self._public_routes | {(method.upper(), path)}
        if prefix:
            self._http_prefixes.append((method.upper(), path, handler))
            self._http_prefix_paths = tuple(p for _, p, _ in self._http_prefixes)
            return
        self.http_routes[(method.upper(), path)] = handler
        self._http_paths = {p for (_, p) in self.http_routes}

    async def _start_broker(self) -> None:
        """Rooms across workers and nodes: subscribe to a room's channel while
        it has local members, publish once to the broker, deliver what other
        nodes publish (fastws.broker.bridge)."""
        from .broker import create_broker
        from .broker.bridge import Bridge
        from .resume import Resumer

        c = self.config
        try:
            self.broker = create_broker(c.broker, prefix=c.broker_prefix)
        except (ValueError, ImportError) as exc:
            raise ServerStartError(mask_url(f"broker {c.broker!r}: {exc}")) from None   # no password shown
        self.bridge = Bridge(self.rooms, self.broker, lookup=self.hub.connections.get)
        await self.bridge.start()                             # never raises if Redis is down
        self.resumer = Resumer.for_bridge(self.rooms, self.bridge)   # None without history
        self.health.add_check("broker", self.broker.ping)
        # fails while a room's (un)subscription waits for a retry (fastws.broker.bridge)
        self.health.add_check("broker_subscriptions", self.bridge.check)
        if c.publish_token:
            from . import publish_api

            publish_api.register(self, self.bridge, c.publish_token)
        log.info("fastws: broker %s (node %s)", mask_url(c.broker), self.broker.node_id)

    def _start_operations(self) -> None:
        """/health + /livez (and the checks registry), /metrics, /stats, per config."""
        c = self.config
        self.health = Health(self)
        self.health.start()
        if c.metrics:
            try:
                from .metrics import Metrics
            except ImportError as exc:
                raise ServerStartError(f"metrics need prometheus_client ({exc}); install it or "
                                       "pass --no-metrics") from None
            self.metrics = Metrics(self)
        if c.stats:
            from .stats import StatsPage

            self.stats_page = StatsPage(self)
            self.stats_page.start()


class Server(ServerWiring):
    """One listening fastws server in the running loop."""

    def __init__(self, app: App, config: Config) -> None:
        self.app = app            # routes and callbacks
        self.config = config      # every knob
        self.hub = None           # engine-side connection registry, set by start()
        self.http_routes = {}     # (method, path) -> handler for plain HTTP requests
        self._http_paths = set()  # the paths of http_routes, for a cheap first test
        self._http_prefixes = []  # (method, path prefix, handler) for routes like /connections/{id}
        self._http_prefix_paths = ()  # their path prefixes, for str.startswith
        self._paths = {}          # interned request paths (bounded), shared by connections
        self._server = None       # the asyncio Server
        self._loop = None
        self.handshakes = {}      # HTTP status of each upgrade decision -> count (metrics)
        self.draining = False     # set by shutdown(): /health says 503, upgrades get 503
        self.admission = Admission(
            getattr(config, "max_connections", 0), getattr(config, "handshake_rate", 0.0),
            getattr(config, "handshake_burst", 0) or None, getattr(config, "retry_after", 5.0))
        self.health = None        # /health, /livez and the checks registry
        self.metrics = None       # /metrics, when config.metrics
        self.stats_page = None    # /stats, when config.stats

    @property
    def port(self) -> int:
        return self._server.sockets[0].getsockname()[1]

    async def start(self, sock: socket.socket | None = None) -> None:
        loop = self._loop = asyncio.get_running_loop()
        c = self.config
        self.hub = _hub_class()(
            loop,
            self._handshake,
            max_message_size=c.max_message_size,
            max_frame_size=c.max_frame_size,
            max_head_size=c.max_head_size,
            close_timeout=c.close_timeout,
            on_callback_error=self._callback_error,
            **self._hub_options(),
        )
        self.rooms = Rooms.from_config(self.hub, c)   # local room registry (fastws.rooms)
        self.broker = None             # fastws.broker.Broker when config.broker is set
        self.bridge = None             # fastws.broker.bridge.Bridge: rooms <-> broker
        for (method, path), handler in self.app.http_routes.items():
            self.add_http_route(method, path, handler, ops=False)
        self._start_operations()
        self._enable_fast_upgrade()
        if c.broker:
            await self._start_broker()
        tls = tls_options(c)
        if sock is None:
            sock = bind_socket(c.host, c.port, reuse_port=c.reuse_port, backlog=c.backlog)
        self._server = await loop.create_server(self.hub.connection_factory, sock=sock, backlog=c.backlog,
                                                **tls)
        self.app.server = self
        log.info("fastws: listening on %s://%s:%d (engine=%s)", "wss" if tls else "ws", c.host, self.port,
                 core.IMPLEMENTATION)

    @cached_property
    def origin_policy(self) -> OriginPolicy:
        """Which browser pages may upgrade: ``App(allowed_origins=...)`` if
        given (deprecated), else the ``allowed_origins`` setting."""
        if self.app.allowed_origins is not None:
            return OriginPolicy(self.app.allowed_origins)
        return OriginPolicy(getattr(self.config, "allowed_origins", "same-host"))

    def _enable_fast_upgrade(self) -> None:
        """Let the hub answer plain upgrades to routes without ``on_connect``
        in C (``Hub.set_fast_upgrade``): the same 101 this class would send,
        without a Python call.  Off when a decision needs Python for every
        request: a handshake rate limit, debug logging of each upgrade; and
        off while draining.  The origin policy tells the C path which Origin
        headers it may pass alone (``OriginPolicy.fast_mode``); any other
        goes to ``_handshake``, which answers 403 or goes on."""
        if (self.admission.bucket is not None
                or log.isEnabledFor(logging.DEBUG) or self.draining):
            self.hub.set_fast_upgrade(None)
            return
        eligible = lambda r: r if r is not None and r.on_connect is None else None  # noqa: E731
        routes = {p: eligible(r) for p, r in self.app.routes.items() if p != "*"}
        self.hub.set_fast_upgrade(routes, eligible(self.app.routes.get("*")),
                                  max_connections=self.admission.max_connections,
                                  deflate=bool(self.config.compression),
                                  origins=self.origin_policy.fast_mode)

    def _hub_options(self) -> dict:
        """Delivery-policy and timer knobs: Config, then App overrides."""
        opts = {}
        for key in ("high_water", "max_queue", "slow_grace", "ping_interval", "ping_timeout",
                    "idle_timeout", "handshake_timeout", "body_timeout"):
            if hasattr(self.config, key):
                opts[key] = getattr(self.config, key)
        opts.update(self.app.delivery)
        return opts

    async def serve_forever(self) -> None:
        await self._server.serve_forever()

    async def shutdown(self, code: int = 1001, reason: str = "server shutting down") -> None:
        """Stop accepting, close every connection with ``code``, wait for the
        close handshakes up to ``shutdown_timeout``, then drop the rest."""
        if self._server is None:
            return
        self.draining = True
        self.hub.set_fast_upgrade(None)   # every request to the Python handshake: 503
        if self.config.drain_delay > 0:
            log.info("fastws: draining for %gs (/health says 503) before closing %d connections",
                     self.config.drain_delay, len(self.hub.connections))
            await asyncio.sleep(self.config.drain_delay)
        self._server.close()
        deadline = self._loop.time() + self.config.shutdown_timeout
        await self._close_all(code, reason, deadline)
        while self.hub.connections and self._loop.time() < deadline:
            await asyncio.sleep(0.02)
        for conn in list(self.hub.connections.values()):
            conn.abort()
        await asyncio.sleep(0)
        if self.bridge is not None:
            await self.bridge.stop()
            await self.broker.close()
        self.health.stop()
        if self.stats_page is not None:
            self.stats_page.stop()
        self.app.server = None
        log.info("fastws: stopped")

    async def _close_all(self, code: int, reason: str, deadline: float) -> None:
        """Close every connection with ``code``, ``drain_rate`` per second
        (all at once when 0), each with a reason telling the client when to
        come back (spread with jitter, so they do not return together)."""
        rate = getattr(self.config, "drain_rate", 0.0)
        base = getattr(self.config, "reconnect_delay", 0.0)
        conns = list(self.hub.connections.values())
        log.info("fastws: closing %d connections with %d%s", len(conns), code,
                 f" at {rate:g}/s" if rate else "")
        step = max(1, int(rate * 0.05)) if rate else len(conns) or 1
        for i in range(0, len(conns), step):
            for conn in conns[i:i + step]:
                if base > 0 and code == 1001:
                    _, why = reconnect_hint(base, base)
                else:
                    why = reason
                conn.close(code, why)
            if rate and i + step < len(conns):
                if self._loop.time() >= deadline:
                    break
                await asyncio.sleep(step / rate)

    # -- the handshake decision (called by the hub with the request head) ----

    def _handshake(self, conn, head) -> None:
        if head is None:
            self._reject(conn, 431, "request head too large")
            return
        if (self.http_routes or self._http_prefixes) and self._maybe_http(conn, head):
            return
        if self.draining:
            self._reject(conn, 503, "server shutting down")
            return
        refused = self.admission.check(len(self.hub.connections))
        if refused is not None:
            reason, retry = refused
            self._reject(conn, 503, reason, [("Retry-After", str(retry))])
            return
        try:
            req = parse_request(head)
        except HandshakeError as exc:
            self._reject(conn, exc.status, exc.detail, exc.headers)
            return
        req.conn = conn                     # remote_address is looked up only if used
        route = self.app.match(req.path)
        if route is None:
            self._reject(conn, 404, f"no WebSocket route for {req.path}")
            return
        if not self.origin_policy.allows_request(req):
            self._reject(conn, 403, "origin not allowed")
            return
        if route.on_connect is None:
            self._decide(conn, req, route, None)
        elif route.connect_is_async:
            conn._hs_pause()
            task = self._loop.create_task(route.on_connect(req))
            task.add_done_callback(lambda t: self._async_decided(t, conn, req, route))
        else:
            try:
                decision = route.on_connect(req)
            except Reject as r:
                decision = r
            except Exception as exc:  # the app's bug: 500, logged once
                log.error("fastws: exception in on_connect", exc_info=exc)
                self._reject(conn, 500, "internal error")
                return
            self._decide(conn, req, route, decision)

    def _reject(self, conn, status: int, detail: str, headers=()) -> None:
        """Refuse the upgrade with ``status``, counted for the metrics."""
        self.handshakes[status] = self.handshakes.get(status, 0) + 1
        if log.isEnabledFor(logging.DEBUG):
            log.debug("fastws: handshake from %s refused: %d %s", conn.remote_address, status, detail)
        conn._hs_reject(error_response(status, detail, headers))

    def _async_decided(self, task, conn, req, route) -> None:
        if task.cancelled():
            self._reject(conn, 503, "server shutting down")
            return
        exc = task.exception()
        if isinstance(exc, Reject):
            self._decide(conn, req, route, exc)
        elif exc is not None:
            log.error("fastws: exception in on_connect", exc_info=exc)
            self._reject(conn, 500, "internal error")
        else:
            self._decide(conn, req, route, task.result())

    def _decide(self, conn, req, route, decision) -> None:
        if isinstance(decision, Reject):
            self._reject(conn, decision.status, decision.body, decision.headers)
            return
        if decision is False:
            self._reject(conn, 403, "connection refused")
            return
        subprotocol = None
        headers = ()
        if isinstance(decision, Accept):
            subprotocol = decision.subprotocol
            headers = decision.headers
            if subprotocol is not None and subprotocol not in req.subprotocols:
                log.error("fastws: on_connect chose subprotocol %r the client did not offer", subprotocol)
                self._reject(conn, 500, "internal error")
                return
        elif isinstance(decision, str):
            subprotocol = decision if decision in req.subprotocols else None
        ext_header = deflate = None
        if self.config.compression:
            ext_header, deflate = negotiate_deflate(
                req.extensions,
                server_no_context_takeover=self.app.server_no_context_takeover,
                client_no_context_takeover=self.app.client_no_context_takeover,
            )
        response = accept_response(req, subprotocol, ext_header, headers)
        self.handshakes[101] = self.handshakes.get(101, 0) + 1
        if log.isEnabledFor(logging.DEBUG):
            log.debug("fastws: %s upgraded on %s", conn.remote_address, req.path)
        # one shared str per distinct path: ~50 B less per connection
        path = self._paths.get(req.path)
        if path is None:
            path = req.path
            if len(self._paths) < 4096:
                self._paths[path] = path
        conn._hs_accept(response, route, path, req.query_string or "", subprotocol, deflate)

    # -- plain HTTP on the same port ------------------------------------------

    def _maybe_http(self, conn, head) -> bool:
        """Serve ``head`` as plain HTTP if it targets an HTTP route and is no
        upgrade request; False to go on with the WebSocket handshake."""
        # cheap test first: most heads are upgrades to a WebSocket route
        sp = head.find(b" ")
        end = head.find(b" ", sp + 1)
        target = head[sp + 1:end]
        q = target.find(b"?")
        first = (target[:q] if q >= 0 else target).decode("latin-1")
        if first not in self._http_paths and not (self._http_prefix_paths
                                                   and first.startswith(self._http_prefix_paths)):
            return False
        parsed = parse_http_head(head)
        if parsed is None:
            return False
        method, target, headers = parsed
        path, _, query = target.partition("?")
        if (self._ops_hosts and not any(p == path for (_, p) in self._public_routes)
                and not self.ops_host_allowed(dict(headers).get("host"))):
            # an operations endpoint asked on a Host it does not serve: as if absent
            if any(k == "upgrade" for k, _ in headers):
                return False
            conn._hs_reject(http_response(404, b"not found\n"))
            return True
        handler = self.http_routes.get((method, path))
        if handler is None:
            for m, p, h in self._http_prefixes:
                if m == method and path.startswith(p):
                    handler = h
                    break
        if handler is None:
            if not any(p == path for (_, p) in self.http_routes):
                return False
            if any(k == "upgrade" for k, _ in headers):
                return False
            allowed = sorted(m for (m, p) in self.http_routes if p == path)
            conn._hs_reject(http_response(405, b"method not allowed\n",
                                          headers=[("Allow", ", ".join(allowed))]))
            return True
        if any(k == "upgrade" for k, _ in headers):
            return False
        request = HttpRequest(method, path, query, headers, b"", conn.remote_address)
        length = dict(headers).get("content-length")
        if dict(headers).get("transfer-encoding"):
            conn._hs_reject(http_response(411, b"send a Content-Length\n"))
            return True
        if length:
            try:
                size = int(length)
                if size < 0:
                    raise ValueError
            except ValueError:
                conn._hs_reject(http_response(400, b"bad Content-Length\n"))
                return True
            limit = self.config.max_message_size
            if limit and size > limit:
                conn._hs_reject(http_response(413, b"body over max_message_size\n"))
                return True

            def got_body(body, request=request):
                request.body = body
                self._run_http(conn, handler, request)

            conn._hs_read_body(size, got_body)
        else:
            self._run_http(conn, handler, request)
        return True

    def _run_http(self, conn, handler, request) -> None:
        try:
            result = handler(request)
        except Exception as exc:
            log.error("fastws: exception in HTTP handler %s", request.path, exc_info=exc)
            conn._hs_reject(http_response(500, b"internal error\n"))
            return
        if asyncio.iscoroutine(result):
            task = self._loop.create_task(result)
            task.add_done_callback(lambda t: self._http_done(conn, request, t))
        else:
            self._send_http(conn, result)

    def _http_done(self, conn, request, task) -> None:
        if task.cancelled() or task.exception() is not None:
            if not task.cancelled():
                log.error("fastws: exception in HTTP handler %s", request.path, exc_info=task.exception())
            conn._hs_reject(http_response(500, b"internal error\n"))
            return
        self._send_http(conn, task.result())

    @staticmethod
    def _send_http(conn, result) -> None:
        status, body, ctype, *rest = result
        if isinstance(body, str):
            body = body.encode("utf-8")
        conn._hs_reject(http_response(status, body, ctype, rest[0] if rest else ()))

    def _callback_error(self, conn, exc) -> None:
        log.error("fastws: exception in a callback for connection %s; closing it with 1011",
                  conn.id, exc_info=exc)


def ssl_context(config: Config) -> ssl.SSLContext | None:
    """The server-side TLS context for ``ssl_certfile``/``ssl_keyfile``, or None."""
    if not config.ssl_certfile:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(config.ssl_certfile, config.ssl_keyfile)
    except (ssl.SSLError, OSError) as exc:
        raise ServerStartError(f"cannot load TLS certificate {config.ssl_certfile} / key "
                               f"{config.ssl_keyfile}: {exc}") from None
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def tls_options(config: Config) -> dict:
    """The TLS keywords of ``loop.create_server`` (none without a
    certificate): the context, a TLS handshake bounded by
    ``handshake_timeout`` (a silent client on a wss:// port is dropped then,
    not after the loop's default 60 s), and a TLS shutdown (our close_notify,
    then the peer's) bounded by ``close_timeout`` (0: the loop's 30 s)."""
    ctx = ssl_context(config)
    if ctx is None:
        return {}
    return {"ssl": ctx, "ssl_handshake_timeout": config.handshake_timeout,
            "ssl_shutdown_timeout": config.close_timeout or None}


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg (and exc)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "pid": record.process,
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def configure_logging(level: str, fmt: str = "text") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLogFormatter() if fmt == "json"
                         else logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler])


def run_server(app: App, config: Config, sock: socket.socket | None = None) -> None:
    """Run on uvloop until SIGINT/SIGTERM, then shut down gracefully; with
    ``config.workers > 1`` as a supervisor of that many worker processes."""
    configure_logging(config.log_level, config.log_format)
    if getattr(config, "workers", 1) > 1 and sock is None:
        from .supervisor import run_workers

        raise SystemExit(run_workers(lambda index: _run_one(app, config, None), config))
    _run_one(app, config, sock)


def _run_one(app: App, config: Config, sock) -> None:
    run_until_signal(Server(app, config), sock)


def run_until_signal(server, sock=None) -> None:
    """Run ``server`` (a Server or an AsgiServer: ``start(sock)`` and
    ``shutdown()``) on a new uvloop loop until SIGINT/SIGTERM, then shut it
    down gracefully.  Raises the soft open-file limit first."""
    import uvloop

    soft, hard = raise_nofile_limit()
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    stop = asyncio.Event()

    async def main():
        await server.start(sock)
        log.info("fastws: open files limit %d (hard %d)", soft, hard)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("fastws: shutting down")
        await server.shutdown()

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
