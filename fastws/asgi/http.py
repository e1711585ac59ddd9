"""HTTP/1.1 for ASGI applications: one :class:`HttpProtocol` per TCP
connection (httptools), one :class:`HttpCycle` per request/response, and
the WebSocket upgrade handed to a :class:`~fastws.asgi.websocket.WebSocketSession`."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from urllib.parse import unquote

import httptools

from ..errors import ClientDisconnected, HandshakeError
from ..handshake import HttpRequest, error_response, request_from_fields
from .rooms import RoomsExtension, publish_payload, room_name
from .websocket import DENIAL_EXTENSION, NO_SUBPROTOCOLS, WebSocketSession
from .wire import (
    ASGI_HTTP,
    ASGI_WS,
    address,
    clock,
    header_pair,
    intern,
    local_address,
    plain_response,
    response_head,
    split_target,
)

log = logging.getLogger("fastws")

KEEPALIVE_TIMEOUT = 5.0       # seconds an idle keep-alive connection stays open
# what the one timer of an HttpProtocol waits for (handshake_timeout and
# body_timeout come from the Config; see HttpProtocol._timer_fired)
T_IDLE = 1                    # keep-alive: the next request must start (else close quietly)
T_HEAD = 2                    # a request head must be complete (else 408 and close)
T_BODY = 3                    # a request body must be complete (else 408 and close)
# how far the parser is in the request being read
R_IDLE, R_HEAD, R_BODY = 0, 1, 2
BODY_HIGH = 256 * 1024        # buffered request body bytes before reading pauses

_NO_BODY_STATUS = frozenset((204, 304))


class HttpCycle:
    """One HTTP request/response exchange: the ``receive``/``send`` pair."""

    __slots__ = ("proto", "scope", "body", "body_size", "body_total", "more_body", "keep_alive", "expect_100",
                 "started", "status", "headers", "chunked", "head_only", "complete",
                 "disconnected", "waiter", "task", "request_done", "ops", "kept")

    def __init__(self, proto, scope, keep_alive: bool, expect_100: bool) -> None:
        self.proto = proto
        self.scope = scope
        self.body = []                # request body chunks not yet received by the app
        self.body_size = 0            # bytes in self.body
        self.body_total = 0           # bytes of the request body read so far (max_body_size)
        self.more_body = True         # the request body is not complete yet
        self.keep_alive = keep_alive
        self.expect_100 = expect_100
        self.started = False          # http.response.start seen
        self.status = 0
        self.headers = None
        self.chunked = False
        self.head_only = scope["method"] == "HEAD"
        self.complete = False         # the response is complete
        self.disconnected = False
        self.waiter = None
        self.task = None
        self.request_done = False     # the app got the last http.request
        self.ops = None               # the operations handler answering instead of the app's 404
        self.kept = None              # body chunks the app received, kept for an operations route

    def wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def _wait(self) -> None:
        self.waiter = self.proto.loop.create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None

    async def receive(self):
        if self.expect_100:
            self.expect_100 = False
            if not self.started and not self.disconnected:
                proto = self.proto
                proto.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                if proto.timer_kind == T_BODY:    # the client sends the body from now on
                    proto._arm(T_BODY, proto.server.config.body_timeout)
        while True:
            if self.disconnected or self.complete:
                return {"type": "http.disconnect"}
            if not self.request_done and (self.body or not self.more_body):
                break
            await self._wait()
        body = b"".join(self.body) if len(self.body) != 1 else self.body[0]
        self.body.clear()
        was = self.body_size
        self.body_size = 0
        if not self.more_body:
            self.request_done = True
        if was >= BODY_HIGH:
            self.proto.maybe_resume()
        if self.kept is not None and body:
            self.kept.append(body)    # the operations route (if the app answers 404) reads it too
        return {"type": "http.request", "body": body, "more_body": self.more_body}

    async def send(self, message) -> None:
        kind = message["type"]
        proto = self.proto
        if self.disconnected:
            raise ClientDisconnected("the client closed the connection")
        if proto.write_paused:
            await proto.drain()
            if self.disconnected:
                raise ClientDisconnected("the client closed the connection")
        if kind == "http.response.body":
            if not self.started or self.status == 0:
                raise RuntimeError("http.response.body before http.response.start")
            if self.complete:
                raise RuntimeError("http.response.body after the response was complete")
            body = message.get("body", b"")
            more = message.get("more_body", False)
            if self.ops is not None:
                # the application has no such route: the operations endpoint answers
                if not more:
                    await self._serve_ops()
                return
            if self.headers is not None:
                self._write_head(body, more)
            elif body and not self.head_only:
                if self.chunked:
                    proto.transport.write(b"%x\r\n%s\r\n" % (len(body), body))
                else:
                    proto.transport.write(body)
            if not more:
                if self.chunked and not self.head_only:
                    proto.transport.write(b"0\r\n\r\n")
                self.complete = True
                self.wake()
                proto.cycle_done(self)
        elif kind == "http.response.start":
            if self.started:
                raise RuntimeError("http.response.start sent twice")
            self.started = True
            self.status = int(message["status"])
            self.headers = list(message.get("headers") or ())
            if self.status == 404 and proto.server.node.routes:
                host = next((v for k, v in self.scope["headers"] if k == b"host"), None)
                self.ops = proto.server.ops_route(self.scope["method"],
                                                  proto.server.unrooted(self.scope["raw_path"]),
                                                  host.decode("latin-1") if host is not None else None)
        elif kind == "fastws.publish":
            proto.server.publish(room_name(message), publish_payload(message))
        else:
            raise RuntimeError(f"unexpected ASGI message {kind!r} in an http scope")

    async def _serve_ops(self) -> None:
        """Answer with the operations handler (``/health``, ``/metrics``,
        ``POST /publish`` ...) instead of the application's 404: the
        application's own route of that path wins, as in fastws.App mode."""
        handler, self.ops = self.ops, None
        scope = self.scope
        server = self.proto.server
        # what the application read of the body before answering 404, then the rest
        chunks, limit = list(self.kept or ()), server.config.max_body_size
        size = sum(map(len, chunks))
        result = None
        while not self.request_done and not self.disconnected:
            msg = await self.receive()
            if msg["type"] != "http.request":
                break
            chunks.append(msg["body"])
            size += len(msg["body"])
            if limit and size > limit:
                result = (413, b"body over max_body_size\n", "text/plain; charset=utf-8")
                self.keep_alive = False
                break
            if not msg.get("more_body"):
                break
        if self.disconnected:
            raise ClientDisconnected("the client closed the connection")
        if result is None:
            request = HttpRequest(
                scope["method"], server.unrooted(scope["raw_path"]),
                scope["query_string"].decode("latin-1"),
                [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]],
                b"".join(chunks), scope["client"])
            try:
                result = handler(request)
                if asyncio.iscoroutine(result):
                    result = await result
            except Exception as exc:  # logged, answered with 500
                log.error("fastws: exception in HTTP handler %s", request.path, exc_info=exc)
                result = (500, b"internal error\n", "text/plain; charset=utf-8")
            if self.disconnected:
                raise ClientDisconnected("the client closed the connection")
        status, body, ctype, *rest = result
        if isinstance(body, str):
            body = body.encode("utf-8")
        self.status = int(status)
        self.headers = [(b"content-type", ctype.encode("latin-1"))]
        self.headers += [(str(k).encode("latin-1"), str(v).encode("latin-1"))
                         for k, v in (rest[0] if rest else ())]
        self._write_head(body, False)
        self.complete = True
        self.wake()
        self.proto.cycle_done(self)

    def _write_head(self, body: bytes, more: bool) -> None:
        """The response head, decided when the first body message arrives so
        that a one-message response gets a Content-Length, not chunks."""
        headers, self.headers = self.headers, None
        status = self.status
        out = []
        has_length = False
        for name, value in headers:
            name = bytes(name).lower()
            if name == b"content-length":
                has_length = True
            elif name == b"connection":
                if bytes(value).lower() == b"close":
                    self.keep_alive = False
                continue
            elif name == b"transfer-encoding":
                continue      # the server frames the body
            out.append((name, value))
        no_body = status in _NO_BODY_STATUS or status < 200
        if no_body:
            self.head_only = True
        if not has_length and not no_body:
            if not more:
                out.append((b"content-length", b"%d" % len(body)))
            elif self.scope["http_version"] == "1.1":
                self.chunked = True
                out.append((b"transfer-encoding", b"chunked"))
            else:
                self.keep_alive = False   # HTTP/1.0: the close ends the body
        out.append((b"date", clock.date()))
        if not self.keep_alive:
            out.append((b"connection", b"close"))
        head = response_head(status, out)
        head.append(b"\r\n")
        if body and not self.head_only and not no_body:
            head.append(b"%x\r\n%s\r\n" % (len(body), body) if self.chunked else body)
        self.proto.transport.write(b"".join(head))

    def run(self) -> None:
        proto = self.proto
        self.task = proto.loop.create_task(proto.server.app(self.scope, self.receive, self.send))
        self.task.add_done_callback(self._done)

    def _done(self, task) -> None:
        proto = self.proto
        exc = None if task.cancelled() else task.exception()
        if exc is not None:
            if self.disconnected:
                log.debug("fastws: ASGI http app ended after the client left", exc_info=exc)
            else:
                log.error("fastws: exception in ASGI application (%s %s)",
                          self.scope["method"], self.scope["path"], exc_info=exc)
        elif not self.complete and not self.disconnected and not task.cancelled():
            log.error("fastws: ASGI app returned without completing the response (%s %s)",
                      self.scope["method"], self.scope["path"])
        if self.complete or self.disconnected:
            return
        t = proto.transport
        if t is not None and not t.is_closing():
            if not self.started or self.headers is not None:
                t.write(plain_response(500, b"Internal Server Error\n"))
            t.close()
        self.complete = True
        proto.cycle_done(self)


class HttpProtocol(asyncio.Protocol):
    """One client connection until (unless) it becomes a WebSocket.

    Deadlines (one TimerHandle, ``timer``, waiting for ``timer_kind``):

    * a new connection's first request head must be complete within
      ``handshake_timeout`` of the connect (a silent client is closed then);
    * between keep-alive requests the connection may stay idle for
      ``KEEPALIVE_TIMEOUT``; the next head must then be complete within
      ``handshake_timeout`` of its first byte;
    * a request body must be complete within ``body_timeout`` of its head
      (time while reading is paused because the application is behind, or
      while the client waits for ``100 Continue``, does not count);
    * an upgrade request must be decided within ``handshake_timeout`` too.

    A head or body that is late gets ``408 Request Timeout`` (unless a
    response is already under way) and the connection is closed."""

    __slots__ = ("server", "loop", "transport", "parser", "url", "headers", "head_size",
                 "cycle", "receiving", "pipeline", "timer", "timer_kind", "reading",
                 "write_paused", "drain_waiter", "ws", "client", "local", "read_paused", "closed", "held")

    def __init__(self, server) -> None:
        self.server = server
        self.loop = server.loop
        self.transport = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.headers = []
        self.head_size = 0
        self.cycle = None             # the exchange whose response is being produced
        self.receiving = None         # the exchange whose request is being parsed
        self.pipeline = deque()       # parsed requests waiting for self.cycle to end
        self.timer = None             # the one deadline of this connection (TimerHandle)
        self.timer_kind = 0           # T_IDLE, T_HEAD or T_BODY while self.timer runs
        self.reading = R_IDLE         # R_HEAD / R_BODY: inside a request's head / body
        self.write_paused = False
        self.drain_waiter = None
        self.ws = None                # a WebSocket session deciding on its upgrade
        self.client = None
        self.local = None
        self.read_paused = False
        self.closed = False
        self.held = None              # the client address an admitted upgrade is counted for

    # -- asyncio protocol --------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.client = address(transport.get_extra_info("peername"))
        self.local = local_address(transport.get_extra_info("sockname"))
        self.server.http_connections.add(self)
        # the first request's head is due within handshake_timeout of the connect
        self._arm(T_HEAD, self.server.config.handshake_timeout)

    def data_received(self, data: bytes) -> None:
        if self.ws is not None:
            self.ws.early_data(data)
            return
        if self.parser is None:
            return      # detached: the transport is closing
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._upgrade(data[exc.args[0]:] if exc.args else b"")
            if self.ws is None and not self.closed:
                # another protocol than WebSocket: served as HTTP, then closed
                self.reading = R_IDLE
                self._deadline()
            return
        except httptools.HttpParserError as exc:
            if self.head_size > self.server.config.max_head_size:
                self._bad_request(431, "Request header fields too large")
            else:
                self._bad_request(400, f"Invalid HTTP request received: {exc}")
            return
        self._deadline()

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.server.http_connections.discard(self)
        if self.held is not None:     # an admitted upgrade that never became a connection
            self.server.node.release_client(self.held, self.transport)
            self.held = None
        self._cancel_timer()
        for c in (self.cycle, self.receiving, *self.pipeline):
            if c is not None:
                c.disconnected = True
                c.wake()
        self.pipeline.clear()
        if self.ws is not None:
            ws, self.ws = self.ws, None
            ws.lost_before_accept()
        w = self.drain_waiter
        if w is not None and not w.done():
            w.set_result(None)
        self.transport = None

    def eof_received(self):
        return None   # close our side too

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        w = self.drain_waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def drain(self) -> None:
        if self.write_paused and not self.closed:
            self.drain_waiter = self.loop.create_future()
            try:
                await self.drain_waiter
            finally:
                self.drain_waiter = None

    def detach(self) -> None:
        """The transport now belongs to someone else (a WebSocket)."""
        self.server.http_connections.discard(self)
        self._cancel_timer()
        self.ws = None
        self.closed = True
        self.parser = None      # breaks the parser <-> protocol cycle at once

    # -- httptools callbacks ------------------------------------------------

    def on_message_begin(self) -> None:
        self.reading = R_HEAD
        self.url = b""
        self.headers = []
        self.head_size = 0

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.head_size += len(url)
        if self.head_size > self.server.config.max_head_size:
            raise _HeadTooLarge

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append(header_pair(name, value))
        self.head_size += len(name) + len(value) + 4
        if self.head_size > self.server.config.max_head_size:
            raise _HeadTooLarge

    def on_headers_complete(self) -> None:
        parser = self.parser
        self.reading = R_BODY
        if parser.should_upgrade() and self._wants_websocket():
            self.receiving = None
            self.reading = R_IDLE
            return     # the upgrade is handled once the parser stops (HttpParserUpgrade)
        url = httptools.parse_url(self.url)
        raw_path = url.path or b"/"
        path = unquote(raw_path.decode("latin-1"))
        root = self.server.config.root_path
        if root:                  # the app sees the whole path, root_path included (as uvicorn)
            path, raw_path = root + path, self.server.root_path_bytes + raw_path
        query = url.query or b""
        method = parser.get_method().decode("ascii")
        server = self.server
        client, scheme = self.client, server.http_scheme
        if server.node.proxies is not None:    # a trusted proxy names the client (per request)
            client, secure = server.node.forwarded(client, self.headers)
            if secure is not None:
                scheme = "https" if secure else "http"
        scope = {
            "type": "http",
            "asgi": ASGI_HTTP,
            "http_version": parser.get_http_version(),
            "server": self.local,
            "client": client,
            "scheme": scheme,
            "method": method,
            "root_path": root,
            "path": path,
            "raw_path": raw_path,
            "query_string": query,
            "headers": self.headers,
            "state": server.state.copy(),
            "extensions": {"fastws.rooms": server.http_extension},
        }
        limit = server.config.max_body_size
        if limit:
            length = next((v for k, v in self.headers if k == b"content-length"), b"")
            if length.isdigit() and int(length) > limit:
                self._body_too_large()     # the application never sees the request
                return
        expect_100 = any(k == b"expect" and v.lower() == b"100-continue" for k, v in self.headers)
        cycle = HttpCycle(self, scope, parser.should_keep_alive(), expect_100)
        if method != "GET" and server.node.routes.might_serve(server.unrooted(raw_path)):
            cycle.kept = []           # an operations route may answer: keep the body the app reads
        if parser.should_upgrade():
            cycle.keep_alive = False  # an upgrade we do not speak: serve it, then close
        if server.node.draining:
            cycle.keep_alive = False
        self.receiving = cycle
        if self.cycle is None:
            self.cycle = cycle
            cycle.run()
        else:
            self.pipeline.append(cycle)
            self._pause_reading()

    def on_body(self, body: bytes) -> None:
        c = self.receiving
        if c is None:
            return
        c.body_total += len(body)
        limit = self.server.config.max_body_size
        if limit and c.body_total > limit:
            self._body_too_large()
            return
        c.body.append(body)
        c.body_size += len(body)
        c.wake()
        if c.body_size >= BODY_HIGH:
            self._pause_reading()

    def on_message_complete(self) -> None:
        self.reading = R_IDLE
        c = self.receiving
        if c is None:
            return
        self.receiving = None
        c.more_body = False
        c.wake()

    # -- exchanges -----------------------------------------------------------

    def cycle_done(self, cycle) -> None:
        """``cycle``'s response is complete (or it failed)."""
        if cycle is not self.cycle:
            return
        self.cycle = None
        t = self.transport
        if t is None or self.closed:
            return
        if not cycle.keep_alive or cycle.more_body or self.server.node.draining:
            # unread request body, Connection: close, or shutting down
            t.close()
            return
        if self.pipeline:
            nxt = self.pipeline.popleft()
            self.cycle = nxt
            nxt.run()
            if not self.pipeline:
                self.maybe_resume()
        else:
            self.maybe_resume()
            if self.receiving is None and self.timer is None:
                self._arm(T_IDLE, KEEPALIVE_TIMEOUT)

    def maybe_resume(self) -> None:
        if (self.read_paused and not self.pipeline and self.transport is not None
                and not self.closed and (self.receiving is None or self.receiving.body_size < BODY_HIGH)):
            self.read_paused = False
            self.transport.resume_reading()

    def _pause_reading(self) -> None:
        if not self.read_paused and self.transport is not None:
            self.read_paused = True
            self.transport.pause_reading()

    def _wants_websocket(self) -> bool:
        return any(k == b"upgrade" and v.lower() == b"websocket" for k, v in self.headers)

    def _upgrade(self, early: bytes) -> None:
        """The parser stopped behind a WebSocket upgrade request."""
        if not self._wants_websocket():
            return   # another protocol: served as HTTP above, closed after the response
        if self.cycle is not None:
            # a response is still in flight (a pipelined upgrade)
            self._bad_request(503, "Service Unavailable")
            return
        node = self.server.node
        t = self.transport
        client, scheme = self.client, self.server.ws_scheme
        refused = node.admit()            # 503 while draining or past the admission limits
        if refused is None:
            try:                          # the fields httptools parsed: no second parse
                request = request_from_fields(self.parser.get_method(), self.url, self.headers)
            except HandshakeError as exc:
                refused = exc
            else:
                if node.guards_clients:
                    client, secure = node.forwarded(client, self.headers)   # proxy_headers
                    if secure is not None:
                        scheme = "wss" if secure else "ws"
                    refused = node.admit_client(client, t)   # per-client limits: 429
                    if refused is None and node.client_limits.max_connections:
                        self.held = client    # counted until handed over or gone
                if refused is None:
                    # a browser page of a site not allowed (allowed_origins): the app never sees it
                    refused = node.check_origin(request)
        if refused is not None:
            if self.held is not None:
                node.release_client(self.held, t)
                self.held = None
            node.count_handshake(refused.status)
            if node.access is not None:
                node.access.refused(client, self.url.decode("latin-1"), refused.status, refused.detail)
            t.write(error_response(refused.status, refused.detail, refused.headers))
            t.close()
            return
        raw_path, path, query = split_target(self.url)
        root = self.server.config.root_path
        if root:                  # the app sees the whole path, root_path included (as uvicorn)
            path, raw_path = intern(root + path), intern(self.server.root_path_bytes + raw_path)
        scope = {
            "type": "websocket",
            "asgi": ASGI_WS,
            "http_version": "1.1",
            "scheme": scheme,
            "server": self.local,
            "client": client,
            "root_path": root,
            "path": path,
            "raw_path": raw_path,
            "query_string": query,
            "headers": self.headers,
            "subprotocols": request.subprotocols or NO_SUBPROTOCOLS,
            "state": self.server.state.copy(),
            "extensions": None,
        }
        if self.timer_kind != T_HEAD:    # the decision is due within handshake_timeout too
            self._arm(T_HEAD, self.server.config.handshake_timeout)
        session = self.ws = WebSocketSession(self.server, self, scope, request, early)
        scope["extensions"] = {"websocket.http.response": DENIAL_EXTENSION,
                               "fastws.rooms": RoomsExtension(session)}
        session.run()

    def _body_too_large(self) -> None:
        """A request body past ``max_body_size``: 413 (unless a response is
        under way), the application's receive() sees a disconnect, close."""
        t = self.transport
        if t is None or self.closed:
            return
        log.debug("fastws: request body from %s over max_body_size", self.client)
        cycle = self.cycle
        if cycle is None or (cycle is self.receiving and not cycle.started):
            t.write(plain_response(413, b"request body over max_body_size\n"))
        for c in (cycle, self.receiving, *self.pipeline):
            if c is not None:
                c.disconnected = True
                c.wake()
        self.receiving = None
        self.parser = None
        self.closed = True
        t.close()

    def _bad_request(self, status: int, text: str) -> None:
        t = self.transport
        if t is None:
            return
        log.debug("fastws: %d %s from %s", status, text, self.client)
        if self.cycle is None or not self.cycle.started:
            t.write(plain_response(status, text.encode() + b"\n"))
        t.close()

    # -- deadlines -------------------------------------------------------------

    def _deadline(self) -> None:
        """After parsing what was read: the deadline of the request part
        still arriving (no timer at all for a request that came whole)."""
        reading = self.reading
        if reading == R_HEAD:
            if self.timer_kind != T_HEAD:     # a new connection's stays: counted from the connect
                self._arm(T_HEAD, self.server.config.handshake_timeout)
        elif reading == R_BODY:
            if self.timer_kind != T_BODY:
                self._arm(T_BODY, self.server.config.body_timeout)
        elif self.cycle is not None:
            self._cancel_timer()              # a response is under way; cycle_done re-arms

    def _arm(self, kind: int, delay: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer_kind = kind
        self.timer = self.loop.call_later(delay, self._timer_fired)

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
            self.timer_kind = 0

    def _timer_fired(self) -> None:
        kind, self.timer, self.timer_kind = self.timer_kind, None, 0
        t = self.transport
        if t is None or self.closed:
            return
        if kind == T_IDLE:
            if self.cycle is None and self.ws is None:
                t.close()
            return
        server = self.server
        if kind == T_BODY:
            c = self.receiving
            if self.read_paused or (c is not None and c.expect_100 and not c.started):
                # the application is behind (reading paused) or has not asked
                # for the body yet (100 Continue not sent): not the client's delay
                self._arm(T_BODY, server.config.body_timeout)
                return
            server.node.hub.body_timeouts += 1
        else:
            server.node.hub.handshake_timeouts += 1
        if self.ws is not None:
            # the application did not decide on the upgrade in time
            log.debug("fastws: upgrade from %s not decided within the handshake timeout",
                      self.client)
            t.close()     # -> connection_lost -> the session sees websocket.disconnect
            return
        cycle = self.cycle
        answer = self.reading != R_IDLE and (
            cycle is None or (cycle is self.receiving and not cycle.started))
        log.debug("fastws: request %s from %s not complete in time",
                  "body" if kind == T_BODY else "head", self.client)
        for c in (cycle, self.receiving, *self.pipeline):
            if c is not None:
                c.disconnected = True     # the application's receive()/send() see it
                c.wake()
        self.parser = None
        if answer:
            t.write(plain_response(408, b"request timeout\n"))
        t.close()

    def shutdown(self) -> None:
        """Graceful stop: close now if idle, else after the current response."""
        if self.ws is not None:
            return    # the session's task is cancelled by the server
        if self.cycle is None and self.transport is not None:
            self.transport.close()
        elif self.cycle is not None:
            self.cycle.keep_alive = False


class _HeadTooLarge(Exception):
    """Raised in a parser callback; httptools reports it as a callback error."""
