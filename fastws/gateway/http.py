"""A small HTTP/1.1 client for JSON POSTs to one backend: a keep-alive pool.

:class:`HttpPool` keeps up to ``size`` connections to the backend open
(HTTP/1.1 keep-alive, one request in flight on each: the gateway never has
more than ``size`` requests out) and reuses the most recently used idle one
first, so a light load keeps few connections busy.  Responses are parsed
with httptools (``Content-Length`` or chunked bodies).

Failures come in two kinds, because what may be sent again depends on it:

* :class:`Unseen` - the backend cannot have processed the request: the
  connection could not be opened, a reused keep-alive connection was closed
  before any byte of the answer (the backend closed it as idle, or is
  restarting), or the answer is ``503``;
* :class:`Failed` - it may have been processed: no complete answer within
  the timeout, the connection lost part-way through the answer, another
  status than 200, a malformed answer.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from urllib.parse import urlsplit

import httptools

log = logging.getLogger("fastws.gateway")
__all__ = ["HttpPool", "BackendError", "Unseen", "Failed", "parse_http_url", "MAX_ANSWER"]

#: the largest answer body read (bytes); a larger one fails its request
MAX_ANSWER = 64 << 20


class BackendError(Exception):
    """A request to the backend that did not get its answer."""

    unseen = False


class Unseen(BackendError):
    """The backend cannot have processed the request (see the module docstring)."""

    unseen = True


class Failed(BackendError):
    """The request may have been processed, but its answer did not come (or was an error)."""


def parse_http_url(url: str) -> tuple:
    """``(host, port, tls, target, host_header)`` of an http(s) URL."""
    u = urlsplit(url)
    tls = u.scheme.lower() == "https"
    host = u.hostname or ""
    port = u.port or (443 if tls else 80)
    target = u.path or "/"
    default = 443 if tls else 80
    host_header = (f"[{host}]" if ":" in host else host) + ("" if port == default else f":{port}")
    return host, port, tls, target, host_header


class _Conn(asyncio.Protocol):
    """One keep-alive connection: one request at a time."""

    def __init__(self, pool: HttpPool) -> None:
        self.pool = pool
        self.transport = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter = None           # done(result, exc) of the request in flight
        self.timer = None            # its timeout
        self.used = 0                # requests answered on this connection
        self.got_bytes = False       # a byte of the current answer came
        self.headers: list = []
        self.body: list = []
        self.size = 0                # bytes of the current answer's body
        self.closed = False

    # -- asyncio ---------------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(Failed(f"malformed answer: {exc}"))
            self.transport.abort()

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.pool.forget(self)
        if self.waiter is not None:
            if not self.got_bytes and self.used:
                self._fail(Unseen("the backend closed a keep-alive connection before answering"))
            else:
                self._fail(Failed("the backend closed the connection before answering"))

    # -- httptools callbacks ------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_body(self, body: bytes) -> None:
        self.size += len(body)
        if self.size > MAX_ANSWER:
            self._fail(Failed(f"the answer is larger than {MAX_ANSWER} bytes"))
            self.transport.abort()
            return
        self.body.append(body)

    def on_message_complete(self) -> None:
        waiter = self.waiter
        self.waiter = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        status = self.parser.get_status_code()
        keep = self.parser.should_keep_alive()
        headers, body = self.headers, b"".join(self.body)
        self.headers, self.body, self.size = [], [], 0
        self.used += 1
        self.got_bytes = False
        if keep and not self.closed and not self.transport.is_closing():
            self.pool.release(self)      # first: the answer's handler may send again at once
        else:
            self.transport.close()
        if waiter is not None:
            try:
                waiter((status, headers, body, time.perf_counter()), None)
            except Exception as exc:         # the answer's handler failed: not the parser's business
                log.error("fastws: gateway: handling an answer failed", exc_info=exc)

    # -- the pool's side ----------------------------------------------------------------------

    def request(self, data: bytes, timeout: float, done) -> None:
        """Write one request; ``done(result, None)`` or ``done(None, exc)`` once (see HttpPool.send)."""
        self.waiter = done
        self.got_bytes = False
        self.timer = self.pool.loop.call_later(timeout, self._timed_out, timeout)
        self.transport.write(data)

    def _timed_out(self, timeout: float) -> None:
        self.timer = None
        self._fail(Failed(f"no answer within {timeout:g}s"))
        if self.transport is not None:
            self.transport.abort()

    def _fail(self, exc: BackendError) -> None:
        waiter, self.waiter = self.waiter, None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if waiter is not None:
            try:
                waiter(None, exc)
            except Exception as err:
                log.error("fastws: gateway: handling a failed request failed", exc_info=err)


class HttpPool:
    """Keep-alive connections to the backend at ``url`` (http:// or https://);
    :meth:`post` sends one JSON body and returns ``(status, headers, body,
    answered_at)``.  The caller keeps at most ``size`` posts out at once."""

    def __init__(self, url: str, *, size: int, timeout: float, token: str | None = None,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.url = url
        self.host, self.port, tls, target, host_header = parse_http_url(url)
        self.ssl = (ssl_context or ssl.create_default_context()) if tls else None
        self.size = size
        self.timeout = timeout
        self.loop = None
        self.idle: list = []          # connections ready for a request, most recently used last
        self.open: set = set()        # every open connection
        self.tasks: set = set()       # requests waiting for a new connection
        self.target = target
        self.host_header = host_header
        self.auth = f"Authorization: Bearer {token}\r\n" if token else ""
        self.heads: dict = {}         # (method, target) -> the request head up to the length
        self.head = self._head("POST", target)
        self.closing = False

    def _head(self, method: str, target: str) -> bytes:
        head = self.heads.get((method, target))
        if head is None:
            head = self.heads[(method, target)] = (
                f"{method} {target} HTTP/1.1\r\nHost: {self.host_header}\r\nContent-Type: application/json\r\n"
                f"User-Agent: fastws-gateway\r\n{self.auth}Content-Length: ").encode("latin-1")
        return head

    def send(self, body: bytes, done, *, method: str = "POST", path: str | None = None) -> None:
        """POST ``body`` (or another ``method``, to ``path`` instead of the
        URL's) and call ``done(result, None)`` with ``result = (status,
        [(name, value)], body, answered_at)`` (names lower-case bytes;
        ``answered_at``: ``time.perf_counter()`` when the answer was
        complete), or ``done(None, exc)`` with an :class:`Unseen` or
        :class:`Failed`.  On an idle connection the request is written now and
        ``done`` runs as the answer is read (no task, no extra loop turn);
        otherwise a connection is opened first."""
        head = self.head if path is None and method == "POST" else self._head(method, path or self.target)
        if self.loop is None:
            self.loop = asyncio.get_running_loop()
        data = head + b"%d\r\n\r\n" % len(body) + body
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed and not conn.transport.is_closing():
                conn.request(data, self.timeout, done)
                return
        task = self.loop.create_task(self._send_new(data, done))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _send_new(self, data: bytes, done) -> None:
        try:
            conn = await self._connect()
        except BackendError as exc:
            done(None, exc)
            return
        conn.request(data, self.timeout, done)

    async def post(self, body: bytes, *, method: str = "POST", path: str | None = None) -> tuple:
        """:meth:`send`, awaited: the result, or raises :class:`Unseen` / :class:`Failed`."""
        if self.loop is None:
            self.loop = asyncio.get_running_loop()
        fut = self.loop.create_future()

        def done(result, exc):
            if not fut.done():
                if exc is not None:
                    fut.set_exception(exc)
                else:
                    fut.set_result(result)

        self.send(body, done, method=method, path=path)
        return await fut

    async def _connect(self) -> _Conn:
        if self.closing:
            raise Unseen("the gateway is stopping")
        try:
            _, conn = await asyncio.wait_for(
                self.loop.create_connection(lambda: _Conn(self), self.host, self.port, ssl=self.ssl,
                                            server_hostname=self.host if self.ssl else None),
                self.timeout)
        except (OSError, asyncio.TimeoutError, ssl.SSLError) as exc:
            raise Unseen(f"cannot connect to {self.host}:{self.port}: "
                         f"{exc.strerror if isinstance(exc, OSError) and exc.strerror else exc or 'timeout'}") from None
        self.open.add(conn)
        return conn

    async def probe(self) -> bool:
        """Can a connection to the backend be opened (kept as an idle one)?"""
        if self.loop is None:
            self.loop = asyncio.get_running_loop()
        try:
            conn = await self._connect()
        except Unseen:
            return False
        self.release(conn)
        return True

    def release(self, conn: _Conn) -> None:
        if self.closing or conn.closed:
            return
        self.idle.append(conn)

    def forget(self, conn: _Conn) -> None:
        self.open.discard(conn)
        try:
            self.idle.remove(conn)
        except ValueError:
            pass

    def close(self) -> None:
        self.closing = True
        for task in list(self.tasks):
            task.cancel()
        for conn in list(self.open):
            if conn.transport is not None:
                conn.transport.close()
        self.idle.clear()
