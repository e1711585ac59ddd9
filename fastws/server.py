"""The fronts: what listens on the socket, on top of a :class:`~fastws.node.Node`.

:class:`Server` is what every front shares: it builds the Node from the
Config, binds the listening socket (TLS when configured), accepts
connections with the front's protocol factory, and shuts down in one order
(drain, close connections with a reason, wait, abort, release).  A front
differs only in the protocol it speaks before the WebSocket starts:

* :class:`NativeServer` (here) serves a :class:`fastws.App`: every
  connection starts as an engine connection (``Hub.connection_factory``);
  plain upgrades to routes without ``on_connect`` are answered in C, the
  rest reach :meth:`NativeServer.handshake` with the request head, which
  runs the app's ``on_connect`` and answers with
  ``Connection.accept_upgrade`` / ``reject_upgrade``; plain HTTP requests to
  the node's routes (``/health``, ``/metrics``, the publish API, the app's
  ``@app.http`` routes) are answered with one response each;
* :class:`fastws.asgi.AsgiServer` serves an ASGI 3 application: every
  connection starts as an HTTP/1.1 protocol, and a WebSocket the
  application accepts is handed to an engine connection with
  ``Connection.adopt``.

Every setting applies to both fronts (``Config``); :func:`fastws.runner.run`
picks the front for an application.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import ssl
import stat

from . import core
from .app import Accept
from .config import Config
from .errors import CALLBACK_FAILED, SHUTTING_DOWN, HandshakeError, Reject, ServerStartError
from .gateway import Gateway
from .handshake import HttpRequest, error_response, http_response, parse_http_head, parse_request
from .node import Node

log = logging.getLogger("fastws")


def bind_socket(host: str, port: int, *, reuse_port: bool = False, backlog: int = 4096,
                listen: bool = True) -> socket.socket:
    """A non-blocking listening TCP socket; ServerStartError with one clear
    line when the address cannot be bound."""
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


def bind_unix(path: str, *, backlog: int = 4096) -> socket.socket:
    """A non-blocking listening Unix domain socket at ``path``.  A stale
    socket file (nobody listens on it) is replaced; ServerStartError with one
    line when a process listens there, the path is another kind of file, or
    it cannot be bound."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise ServerStartError(f"cannot listen on unix:{path}: {exc.strerror}") from None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise ServerStartError(f"cannot listen on unix:{path}: the path exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)          # stale: left by a process that is gone
        else:
            raise ServerStartError(f"cannot listen on unix:{path}: a process is listening on it")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        raise ServerStartError(f"cannot listen on unix:{path}: {exc.strerror}") from None
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


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


class Server:
    """One listening front in the running loop (see the module docstring).

    Subclasses give :meth:`protocol_factory` and, if their connections start
    on the engine's own protocol, :meth:`handshake`; the hooks
    :meth:`before_listen`, :meth:`stop_front`, :meth:`front_busy`,
    :meth:`abort_front` and :meth:`after_close` let a front add its own steps
    to the start and the shutdown."""

    #: the scheme words of the start-up log line
    schemes = ("ws", "wss")
    #: with reuse_port, seconds the connections taken from the closed
    #: listener get to finish their upgrade before the shutdown closes them
    HANDOFF_GRACE = 1.0

    def __init__(self, config: Config, app=None) -> None:
        self.config = config                  # every setting
        self.node = Node(config, app)         # hub, rooms, broker, admission, operations
        self.tls = False                      # serving TLS
        self._server = None                   # the asyncio Server, once listening
        self._tls: dict = {}                  # create_server's TLS keywords
        self._uds = None                      # (path, inode) of our Unix socket file

    @property
    def loop(self):
        return self.node.loop

    @property
    def port(self) -> int:
        return self._server.sockets[0].getsockname()[1]

    # -- what a front provides ---------------------------------------------------

    handshake = None        # callable(conn, head) for connections that start on the engine protocol

    def protocol_factory(self):
        raise NotImplementedError

    async def before_listen(self) -> None:
        """Start-up work between the node and the listener (ASGI lifespan)."""

    def stop_front(self, code: int, reason: str) -> None:
        """Shutdown: end the front's own connections (those not on the hub)."""

    def front_busy(self) -> bool:
        """Shutdown: the front still has work in flight (waited for)."""
        return False

    def abort_front(self) -> None:
        """Shutdown deadline passed: drop the front's own connections."""

    async def after_close(self) -> None:
        """Shutdown: after every connection is gone, before the node stops."""

    def on_drain(self) -> None:
        """Shutdown started (upgrades now get 503)."""

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self, sock: socket.socket | None = None) -> None:
        """Build the node, bind (ServerStartError if the port is taken or the
        certificate unreadable), then accept connections."""
        c = self.config
        tls = self._tls = tls_options(c)
        self.tls = bool(tls)
        self.check_config()
        await self.node.start(self.handshake)
        try:
            if sock is None and c.uds:
                sock = bind_unix(c.uds, backlog=c.backlog)
                self._uds = (c.uds, os.stat(c.uds).st_ino)
            elif sock is None:
                sock = bind_socket(c.host, c.port, reuse_port=c.reuse_port, backlog=c.backlog)
            try:
                await self.before_listen()
            except BaseException:
                sock.close()
                raise
            self._server = await self.node.loop.create_server(
                self.protocol_factory(), sock=sock, backlog=c.backlog, **tls)
        except BaseException:
            self._remove_uds()
            await self.node.stop()
            raise
        if sock.family == socket.AF_UNIX:
            where = f"unix:{sock.getsockname()}"
        else:
            host, port = sock.getsockname()[:2]
            where = f"{host}:{port}"
        log.info("fastws: %s listening on %s://%s (engine=%s)", self.describe(),
                 self.schemes[self.tls], where, core.IMPLEMENTATION)

    def check_config(self) -> None:
        """Refuse (ServerStartError, one line) a setting this front cannot apply."""

    def describe(self) -> str:
        return "server"

    def _remove_uds(self) -> None:
        """Remove our Unix socket file (not one another server bound since)."""
        if self._uds is None:
            return
        path, inode = self._uds
        self._uds = None
        try:
            if os.stat(path).st_ino == inode:
                os.unlink(path)
        except OSError:
            pass

    async def _hand_off(self) -> None:
        """Stop listening now, so that the kernel gives new connections to
        the other processes listening on the port (SO_REUSEPORT), without
        dropping the ones it already queued on our listener: they are
        accepted here first and served like any other."""
        server = self._server
        dups = []
        for s in server.sockets:
            try:
                dups.append(socket.socket(fileno=os.dup(s.fileno())))
            except OSError as exc:
                log.warning("fastws: cannot keep the listener for the hand-off: %s", exc)
        server.close()          # our listener lives on in ``dups`` until they are closed
        taken = []
        for d in dups:
            d.setblocking(False)
            try:
                while True:
                    taken.append(d.accept()[0])
            except OSError:     # BlockingIOError: the queue is empty
                pass
            finally:
                d.close()       # the listener leaves the port's group here
        log.info("fastws: stopped listening (other processes on the port take new connections); "
                 "%d queued connection(s) taken over", len(taken))
        loop = self.node.loop
        for conn in taken:
            conn.setblocking(False)
            loop.create_task(self._adopt_accepted(conn))

    async def _adopt_accepted(self, sock) -> None:
        try:
            await self.node.loop.connect_accepted_socket(self.protocol_factory(), sock, **self._tls)
        except Exception as exc:    # the client went away, a TLS handshake failed
            log.debug("fastws: a connection taken from the listener failed: %s", exc)
            sock.close()

    async def serve_forever(self) -> None:
        await self._server.serve_forever()

    async def shutdown(self, code: int = SHUTTING_DOWN.code, reason: str = SHUTTING_DOWN.reason) -> None:
        """Graceful stop: upgrades get 503 and ``/health`` 503 for
        ``drain_delay`` seconds (a load balancer stops sending), then the
        listener closes, every connection is closed with ``code`` (paced by
        ``drain_rate``; with ``reconnect_delay`` each client is told when to
        come back), close handshakes get up to ``shutdown_timeout``, the rest
        is dropped, then the node releases its broker and timers."""
        node = self.node
        if self._server is None or node.draining:
            return
        c = self.config
        # SO_REUSEPORT: other processes may listen on the port (the next
        # version, during a rolling restart): hand new connections to them
        handoff = c.reuse_port and not c.uds
        node.begin_drain(refuse_upgrades=not handoff)
        self.on_drain()
        if handoff:
            await self._hand_off()
            # the connections taken over finish their upgrade (with a 101)
            grace = max(c.drain_delay, min(self.HANDOFF_GRACE, c.handshake_timeout))
            log.info("fastws: draining for %gs before closing %d connections", grace,
                     len(node.hub.connections))
            await asyncio.sleep(grace)
            node.refuse_upgrades = True
        elif c.drain_delay > 0:
            log.info("fastws: draining for %gs (/health says 503) before closing %d connections",
                     c.drain_delay, len(node.hub.connections))
            await asyncio.sleep(c.drain_delay)
        self._server.close()
        loop = node.loop
        deadline = loop.time() + c.shutdown_timeout
        self.stop_front(code, reason)
        await node.close_connections(code, reason, deadline)
        while (node.hub.connections or self.front_busy()) and loop.time() < deadline:
            node.close_late(code, reason)      # upgraded after the closing started (an async decision)
            await asyncio.sleep(0.02)
        node.abort_connections()
        self.abort_front()
        await asyncio.sleep(0)
        await self.after_close()
        await node.stop()
        self._remove_uds()
        log.info("fastws: stopped")


class NativeServer(Server):
    """The front of a :class:`fastws.App` (see the module docstring)."""

    def __init__(self, app, config: Config) -> None:
        super().__init__(config, app)
        self.app = app                        # routes and callbacks
        self.gateway = None                   # gateway mode (--gateway): routes served by a backend
        if config.gateway:
            self.gateway = Gateway.from_config(config)
            self.gateway.serve(app, config.gateway_routes)

    def describe(self) -> str:
        return "server"

    def check_config(self) -> None:
        if self.config.root_path:
            raise ServerStartError("root_path applies to ASGI applications (scope['root_path']); "
                                   "a fastws.App routes each request by the path it was sent with")

    def protocol_factory(self):
        return self.node.hub.connection_factory

    async def before_listen(self) -> None:
        self.app.route_listeners.append(self._enable_fast_upgrade)
        self._enable_fast_upgrade()

    def on_drain(self) -> None:
        self.node.hub.set_fast_upgrade(None)   # every request to the Python handshake: 503

    async def after_close(self) -> None:
        if self._enable_fast_upgrade in self.app.route_listeners:
            self.app.route_listeners.remove(self._enable_fast_upgrade)

    def _enable_fast_upgrade(self) -> None:
        """Let the hub answer plain upgrades to routes without ``on_connect``
        in C (``Hub.set_fast_upgrade``): the same 101 :meth:`handshake` would
        send, without a Python call.  Off when a decision needs Python for
        every request: a handshake rate limit, per-client limits or proxy
        headers (the client's address), debug logging of each upgrade, the
        access log; and off while draining.  The origin policy tells the C path which
        Origin headers it may pass alone; any other goes to
        :meth:`handshake`, which answers 403 or goes on."""
        node = self.node
        if (node.admission.bucket is not None or node.guards_clients
                or log.isEnabledFor(logging.DEBUG) or node.draining or node.access is not None):
            node.hub.set_fast_upgrade(None)
            return
        eligible = lambda r: r if r is not None and r.on_connect is None else None  # noqa: E731
        routes = {p: eligible(r) for p, r in self.app.routes.items() if p != "*"}
        node.hub.set_fast_upgrade(routes, eligible(self.app.routes.get("*")),
                                  max_connections=node.admission.max_connections,
                                  deflate=bool(self.config.compression),
                                  origins=node.origins.fast_mode)

    # -- the handshake decision (the hub calls it with the request head) ---------------

    def handshake(self, conn, head) -> None:
        node = self.node
        if head is None:
            self._reject(conn, 431, "request head too large")
            return
        if node.routes and self._maybe_http(conn, head):
            return
        refused = node.admit()
        if refused is not None:
            self._reject(conn, refused.status, refused.detail, refused.headers)
            return
        try:
            req = parse_request(head)
        except HandshakeError as exc:
            self._reject(conn, exc.status, exc.detail, exc.headers)
            return
        req.conn = conn                     # remote_address is looked up only if used
        if node.guards_clients:             # per-client limits, proxy headers
            req.client = node.forwarded(conn.remote_address, req.headers)[0]
            refused = node.admit_client(req.client, conn)
            if refused is not None:
                self._reject(conn, refused.status, refused.detail, refused.headers, req.path, req.client)
                return
        route = self.app.match(req.path)
        if route is None:
            self._reject(conn, 404, f"no WebSocket route for {req.path}", path=req.path, client=req.client)
            return
        refused = node.check_origin(req)
        if refused is not None:
            self._reject(conn, refused.status, refused.detail, path=req.path, client=req.client)
            return
        if route.on_connect is None:
            self._decide(conn, req, route, None)
        elif route.connect_is_async:
            conn.hold_upgrade()
            task = node.loop.create_task(self._in_time(route.on_connect(req)))
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
            if asyncio.iscoroutine(decision):   # a sync callable that answered with a coroutine
                conn.hold_upgrade()
                task = node.loop.create_task(self._in_time(decision))
                task.add_done_callback(lambda t: self._async_decided(t, conn, req, route))
                return
            self._decide(conn, req, route, decision)

    def _reject(self, conn, status: int, detail: str, headers=(), path=None, client=None) -> None:
        """Refuse the upgrade with ``status``, counted for the metrics;
        ``client``: the address a trusted proxy named (logged instead of the peer's)."""
        self.node.count_handshake(status)
        if self.node.access is not None:
            self.node.access.refused(client or conn.remote_address, path, status, detail)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("fastws: handshake from %s refused: %d %s", client or conn.remote_address, status, detail)
        if self.node.client_limits.max_connections:   # an admitted upgrade no longer counts
            self.node.release_client(client or conn.remote_address, conn)
        conn.reject_upgrade(error_response(status, detail, headers))

    def _in_time(self, decision):
        """An async ``on_connect`` has ``handshake_timeout`` to decide (the
        connection is dropped then anyway): past it, it is cancelled instead
        of running on for a client that is gone."""
        return asyncio.wait_for(decision, self.config.handshake_timeout)

    def _async_decided(self, task, conn, req, route) -> None:
        if task.cancelled():
            self._reject(conn, 503, "server shutting down")
            return
        exc = task.exception()
        if isinstance(exc, asyncio.TimeoutError):
            log.warning("fastws: on_connect for %s did not decide within the handshake timeout (%gs)",
                        req.path, self.config.handshake_timeout)
            self._reject(conn, 503, "not decided in time")
            return
        if isinstance(exc, Reject):
            self._decide(conn, req, route, exc)
        elif exc is not None:
            log.error("fastws: exception in on_connect", exc_info=exc)
            self._reject(conn, 500, "internal error")
        else:
            self._decide(conn, req, route, task.result())

    def _decide(self, conn, req, route, decision) -> None:
        if isinstance(decision, Reject):
            self._reject(conn, decision.status, decision.body, decision.headers, path=req.path,
                         client=req.client)
            return
        if decision is False:
            self._reject(conn, 403, "connection refused", path=req.path, client=req.client)
            return
        subprotocol = None
        headers = ()
        store = None
        user = None
        if isinstance(decision, Accept):
            subprotocol = decision.subprotocol
            headers = decision.headers
            store = decision.store
            user = decision.user
            if subprotocol is not None and subprotocol not in req.subprotocols:
                log.error("fastws: on_connect chose subprotocol %r the client did not offer", subprotocol)
                self._reject(conn, 500, "internal error")
                return
        elif isinstance(decision, str):
            subprotocol = decision if decision in req.subprotocols else None
        node = self.node
        response, deflate = node.accept(req, subprotocol, headers)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("fastws: %s upgraded on %s", req.remote_address, req.path)
        if store:
            conn.store.update(store)      # before on_open runs (accept_upgrade calls it)
        proxied = node.proxies is not None and req.client is not None
        if proxied:
            node.remember_client(conn, req.client)   # conn's address for app.remote_address
        access = node.access
        if access is not None:
            access.opened(conn, req.remote_address, req.path)   # before on_open: it may close at once
            route = access.route(route)
        if not conn.accept_upgrade(response, route, node.intern_path(req.path), req.query_string or "",
                                   subprotocol, deflate):
            if proxied:
                node.clients.pop(conn, None)
            if access is not None:
                access.forget(conn)
            if node.client_limits.max_connections:   # the client left while it was decided
                node.release_client(req.client or conn.remote_address, conn)
        elif user is not None:                        # Accept(user=...): the auth hook names the user
            try:
                node.bind_user(conn, str(user))
            except Exception as exc:                  # past max_rooms_per_connection, an empty id
                log.error("fastws: could not bind the connection to user %r; closing it with %d", user,
                          CALLBACK_FAILED.code, exc_info=exc)
                conn.close(CALLBACK_FAILED.code, CALLBACK_FAILED.reason)

    # -- plain HTTP on the same port ------------------------------------------------

    def _maybe_http(self, conn, head) -> bool:
        """Serve ``head`` as plain HTTP if it targets an HTTP route and is no
        upgrade request; False to go on with the WebSocket handshake."""
        routes = self.node.routes
        # cheap test first: most heads are upgrades to a WebSocket route
        sp = head.find(b" ")
        end = head.find(b" ", sp + 1)
        target = head[sp + 1:end]
        q = target.find(b"?")
        if not routes.might_serve((target[:q] if q >= 0 else target).decode("latin-1")):
            return False
        parsed = parse_http_head(head)
        if parsed is None:
            return False
        method, target, headers = parsed
        if any(k == "upgrade" for k, _ in headers):
            return False
        path, _, query = target.partition("?")
        fields = dict(headers)
        handler = routes.find(method, path, fields.get("host"))
        if handler is None:
            allowed = routes.methods(path)
            if not allowed or not routes.find(allowed[0], path, fields.get("host")):
                # no route, or an operations endpoint asked on a Host it does not serve
                conn.reject_upgrade(http_response(404, b"not found\n"))
                return True
            conn.reject_upgrade(http_response(405, b"method not allowed\n",
                                              headers=[("Allow", ", ".join(allowed))]))
            return True
        peer = conn.remote_address
        if self.node.proxies is not None:     # the client a trusted proxy names
            peer = self.node.forwarded(peer, headers)[0]
        request = HttpRequest(method, path, query, headers, b"", peer)
        length = fields.get("content-length")
        if fields.get("transfer-encoding"):
            conn.reject_upgrade(http_response(411, b"send a Content-Length\n"))
            return True
        if length:
            try:
                size = int(length)
                if size < 0:
                    raise ValueError
            except ValueError:
                conn.reject_upgrade(http_response(400, b"bad Content-Length\n"))
                return True
            limit = self.config.max_body_size
            if limit and size > limit:
                conn.reject_upgrade(http_response(413, b"body over max_body_size\n"))
                return True

            def got_body(body, request=request):
                request.body = body
                self._run_http(conn, handler, request)

            conn.read_body(size, got_body)
        else:
            self._run_http(conn, handler, request)
        return True

    def _run_http(self, conn, handler, request) -> None:
        try:
            result = handler(request)
        except Exception as exc:
            log.error("fastws: exception in HTTP handler %s", request.path, exc_info=exc)
            conn.reject_upgrade(http_response(500, b"internal error\n"))
            return
        if asyncio.iscoroutine(result):
            task = self.node.loop.create_task(result)
            task.add_done_callback(lambda t: self._http_done(conn, request, t))
        else:
            self._send_http(conn, result)

    def _http_done(self, conn, request, task) -> None:
        if task.cancelled() or task.exception() is not None:
            if not task.cancelled():
                log.error("fastws: exception in HTTP handler %s", request.path, exc_info=task.exception())
            conn.reject_upgrade(http_response(500, b"internal error\n"))
            return
        self._send_http(conn, task.result())

    @staticmethod
    def _send_http(conn, result) -> None:
        status, body, ctype, *rest = result
        if isinstance(body, str):
            body = body.encode("utf-8")
        conn.reject_upgrade(http_response(status, body, ctype, rest[0] if rest else ()))


__all__ = ["Server", "NativeServer", "bind_socket", "bind_unix", "ssl_context", "tls_options"]
