"""One client WebSocket connection on the fastws frame engine in client mode.

:func:`open_connection` opens a TCP (or TLS) connection, sends the opening
handshake (:func:`fastws.handshake.client_request`), checks the answer
(:func:`fastws.handshake.check_accept`) and returns a :class:`WebSocket`:
an asyncio protocol whose frames are parsed and built by
``fastws.core.Engine(client=True)`` (the Cython engine, or the wsproto
twin when the extension is not built).

Receiving: every message is handed to ``on_message(message)`` when one is
given (a plain call in the protocol callback: no task, no future, the
fastest way), else queued for :meth:`WebSocket.recv` / ``async for``.  The
queue holds at most ``max_queue`` messages: past it the socket is not read
until the application catches up (the server then sees a slow reader).

Sending: :meth:`WebSocket.send` writes the frame at once; it waits only
while the transport's buffer is above its high-water mark.

Liveness: with ``ping_interval`` the client pings a server it has heard
nothing from for that long; when nothing at all arrives within
``ping_timeout`` after the ping, the connection is dropped (close code
1006, reason "ping timeout"), which a reconnecting client treats as any
other loss.

Closing: :meth:`WebSocket.close` sends a close frame and waits (at most
``close_timeout``) for the server's close frame and for the server to end
the TCP connection (RFC 6455 7.1.1), then drops it.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
import ssl as ssl_module
from collections.abc import Callable, Iterable
from typing import cast
from urllib.parse import urlsplit

from ..core import BINARY, CLOSE, ERROR, OPEN, PONG, TEXT, Engine
from ..errors import ConnectionClosed, HandshakeError
from ..handshake import ClientAccept, check_accept, client_key, client_request, deflate_offer

__all__ = ["WebSocket", "open_connection", "parse_url", "MAX_HEAD", "Data"]

log = logging.getLogger("fastws.client")

#: a message's data: ``str`` for a text message, ``bytes`` for a binary one
Data = str | bytes

#: the longest handshake answer head a client reads
MAX_HEAD = 16384


def parse_url(url: str) -> tuple[bool, str, int, str, str]:
    """``(secure, host, port, resource, host_header)`` of a ``ws://`` /
    ``wss://`` URL; ValueError for anything else."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss"):
        raise ValueError(f"not a WebSocket URL (ws:// or wss://): {url!r}")
    if not parts.hostname:
        raise ValueError(f"no host in {url!r}")
    secure = parts.scheme == "wss"
    try:
        port = parts.port or (443 if secure else 80)
    except ValueError:
        raise ValueError(f"bad port in {url!r}") from None
    resource = (parts.path or "/") + ("?" + parts.query if parts.query else "")
    host = parts.hostname
    shown = f"[{host}]" if ":" in host else host
    default = 443 if secure else 80
    host_header = shown if port == default else f"{shown}:{port}"
    return secure, host, port, resource, host_header


class WebSocket(asyncio.Protocol):
    """An open client connection (see the module docstring).  Made by
    :func:`open_connection`; not meant to be built directly."""

    def __init__(self, loop: asyncio.AbstractEventLoop, *, max_message_size: int, max_queue: int,
                 on_message: Callable[[Data], object] | None = None,
                 ping_interval: float | None = None, ping_timeout: float | None = None,
                 close_timeout: float = 5.0) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.engine: Engine | None = None  # set once the handshake is accepted
        self.subprotocol: str | None = None   # the server's choice among those offered
        self.extensions: list[str] = []    # the extensions the server accepted, as it wrote them
        self.response_headers: list[tuple[str, str]] = []   # the 101's other headers, (lower-case name, value)
        self.close_code: int | None = None  # known once closed
        self.close_reason = ""
        self.on_message = on_message
        self.on_close: Callable[[int, str], object] | None = None   # fn(code, reason) once the connection is gone
        self._max_message_size = max_message_size
        self._max_queue = max(1, max_queue)
        self._queue: collections.deque[Data] = collections.deque()
        self._waiter: asyncio.Future[Data] | None = None   # future of a recv() waiting for a message
        self._head = bytearray()           # the handshake answer, until complete
        self._head_future: asyncio.Future[bytes] = loop.create_future()
        self._closed: asyncio.Future[None] = loop.create_future()  # resolved by connection_lost
        self._paused_reading = False
        self._write_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._ping_interval = ping_interval or 0.0
        self._ping_timeout = ping_timeout or 0.0
        self._close_timeout = close_timeout
        self._heard = 0.0                  # loop time of the last bytes received
        self._ping_sent = 0.0              # loop time of our unanswered ping, 0 when none
        self._timer: asyncio.TimerHandle | None = None
        self._abort_handle: asyncio.TimerHandle | None = None
        self._out: list[bytes] | None = None   # frames sent during this loop iteration (one write at its end)

    # -- asyncio protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)    # a stream transport (TCP or TLS)

    def data_received(self, data: bytes) -> None:
        engine = self.engine
        if engine is None:
            self._handshake_data(data)
            return
        self._heard = self.loop.time()
        events = engine.receive(data)
        out = engine.data_to_send()
        if out and self.transport is not None:
            self.transport.write(out)
        # frames sent by on_message while this read is handled go out in one
        # write when it ends, not in a callback of the next loop iteration
        reading = self._out is None
        if reading:
            self._out = []
        try:
            for ev in events:
                kind = ev[0]
                if kind in (TEXT, BINARY):
                    self._deliver(ev[1])
                elif kind == PONG:
                    self._ping_sent = 0.0
                elif kind in (CLOSE, ERROR):
                    self._peer_closed(ev[1], ev[2] if kind == CLOSE else "")
        finally:
            if reading:
                self._flush()

    def _deliver(self, message: Data) -> None:
        cb = self.on_message
        if cb is not None:
            try:
                cb(message)
            except Exception:       # the application's bug: logged, the connection goes on
                log.exception("fastws.client: exception in on_message")
            return
        waiter = self._waiter
        if waiter is not None and not self._queue:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(message)
                return
        self._queue.append(message)
        if len(self._queue) >= self._max_queue and not self._paused_reading and self.transport:
            self._paused_reading = True
            self.transport.pause_reading()

    def _peer_closed(self, code: int, reason: str | None) -> None:
        if self.close_code is None:
            self.close_code, self.close_reason = code, reason or ""
        # the close exchange is over: the server ends TCP; do it ourselves if it does not
        if self._abort_handle is None and self.transport is not None:
            self._abort_handle = self.loop.call_later(self._close_timeout, self._abort)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        waiters, self._drain_waiters = self._drain_waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.close_code is None:
            engine = self.engine
            if engine is not None and engine.close_code is not None:
                self.close_code, self.close_reason = engine.close_code, engine.close_reason or ""
            else:
                self.close_code = 1006
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._abort_handle is not None:
            self._abort_handle.cancel()
            self._abort_handle = None
        if not self._head_future.done():
            self._head_future.set_exception(ConnectionError("connection lost during the handshake"))
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionClosed(self.close_code, self.close_reason))
        for w in self._drain_waiters:
            if not w.done():
                w.set_exception(ConnectionClosed(self.close_code, self.close_reason))
        self._drain_waiters = []
        if not self._closed.done():
            self._closed.set_result(None)
        cb = self.on_close
        if cb is not None:
            self.on_close = None
            cb(self.close_code, self.close_reason)

    # -- the handshake ------------------------------------------------------------------

    def _handshake_data(self, data: bytes) -> None:
        self._head += data
        if self._head_future.done():
            return
        end = self._head.find(b"\r\n\r\n")
        if end >= 0:
            self._head_future.set_result(bytes(self._head))
        elif len(self._head) > MAX_HEAD:
            self._head_future.set_exception(HandshakeError(0, "handshake answer head too long"))

    def _start(self, accept: ClientAccept, end: int) -> None:
        rest = bytes(self._head[end:])
        self._head = bytearray()
        self.engine = Engine(max_message_size=self._max_message_size, deflate=accept.deflate, client=True)
        self.subprotocol = accept.subprotocol
        self.extensions = accept.extensions
        self.response_headers = accept.headers
        self._heard = self.loop.time()
        if self._ping_interval:
            self._timer = self.loop.call_later(self._ping_interval, self._check_alive)
        if rest:
            self.data_received(rest)

    # -- liveness ---------------------------------------------------------------------

    def _check_alive(self) -> None:
        self._timer = None
        engine = self.engine
        if engine is None or engine.state != OPEN or self.transport is None:
            return
        now = self.loop.time()
        if self._ping_sent:
            if self._heard < self._ping_sent and now - self._ping_sent >= self._ping_timeout:
                self.close_code, self.close_reason = 1006, "ping timeout"
                self._abort()
                return
            if self._heard >= self._ping_sent:
                self._ping_sent = 0.0
        if not self._ping_sent and now - self._heard >= self._ping_interval:
            self.transport.write(engine.ping(b""))
            self._ping_sent = now
        if self._ping_sent:
            delay = max(0.01, self._ping_sent + self._ping_timeout - now)
        else:
            delay = max(0.01, self._heard + self._ping_interval - now)
        self._timer = self.loop.call_later(delay, self._check_alive)

    def _abort(self) -> None:
        self._abort_handle = None
        if self.transport is not None:
            self.transport.abort()

    # -- the API ------------------------------------------------------------------------

    @property
    def open(self) -> bool:
        """True while messages can be sent."""
        return self.engine is not None and self.engine.state == OPEN and self.close_code is None

    @property
    def closed(self) -> bool:
        return self._closed.done()

    async def send(self, message: Data) -> None:
        """Send ``message`` (str: a text frame, bytes: a binary one).  Raises
        :class:`fastws.errors.ConnectionClosed` once the connection is closing."""
        if self.close_code is not None or self.transport is None or self.engine is None:
            raise ConnectionClosed(self.close_code or 1006, self.close_reason)
        self._write(self.engine.send(message))
        if self._write_paused:
            w: asyncio.Future[None] = self.loop.create_future()
            self._drain_waiters.append(w)
            await w

    def send_nowait(self, message: Data) -> None:
        """:meth:`send` without waiting for the transport's buffer to drain."""
        if self.close_code is not None or self.transport is None or self.engine is None:
            raise ConnectionClosed(self.close_code or 1006, self.close_reason)
        self._write(self.engine.send(message))

    def _write(self, frame: bytes) -> None:
        """Queue ``frame``: the frames of one loop iteration go out in one write."""
        out = self._out
        if out is None:
            self._out = [frame]
            self.loop.call_soon(self._flush)
        else:
            out.append(frame)

    def _flush(self) -> None:
        out, self._out = self._out, None
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    async def recv(self) -> Data:
        """The next message (str or bytes).  Raises
        :class:`fastws.errors.ConnectionClosed` once the connection is gone
        and every message that came before was read."""
        queue = self._queue
        if queue:
            message = queue.popleft()
            if self._paused_reading and len(queue) <= self._max_queue // 2:
                self._paused_reading = False
                if self.transport is not None:
                    self.transport.resume_reading()
            return message
        if self._closed.done():
            raise ConnectionClosed(self.close_code or 1006, self.close_reason)
        waiter: asyncio.Future[Data] = self.loop.create_future()
        self._waiter = waiter
        return await waiter

    def __aiter__(self) -> WebSocket:
        return self

    async def __anext__(self) -> Data:
        try:
            return await self.recv()
        except ConnectionClosed as exc:
            if exc.code in (1000, 1001):
                raise StopAsyncIteration from None
            raise

    async def ping(self, payload: bytes = b"") -> None:
        """Send a ping (the pong only counts as a sign of life)."""
        if self.close_code is not None or self.transport is None or self.engine is None:
            raise ConnectionClosed(self.close_code or 1006, self.close_reason)
        self.transport.write(self.engine.ping(payload))

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Start the close handshake and wait (at most ``close_timeout``) for
        the connection to end."""
        transport = self.transport
        if transport is None:
            return
        if not self._closed.done():
            if self.engine is not None and self.engine.state == OPEN:
                self._flush()                     # what was sent goes before the close frame
                try:
                    transport.write(self.engine.close(code, reason))
                except ConnectionClosed:
                    pass
                if self.close_code is None:
                    self.close_code, self.close_reason = code, reason
            else:
                transport.close()
            try:
                await asyncio.wait_for(asyncio.shield(self._closed), self._close_timeout)
            except asyncio.TimeoutError:
                transport.abort()
                await self._closed

    def abort(self) -> None:
        """Drop the TCP connection at once (no close handshake)."""
        if self.transport is not None:
            self.transport.abort()

    async def wait_closed(self) -> None:
        await asyncio.shield(self._closed)


async def open_connection(url: str, *, subprotocols: Iterable[str] = (), headers: Iterable[tuple[str, str]] = (),
                          compression: bool = False, max_message_size: int = 1 << 20, max_queue: int = 1024,
                          on_message: Callable[[Data], object] | None = None,
                          open_timeout: float = 10.0, ping_interval: float | None = 20.0,
                          ping_timeout: float | None = 20.0, close_timeout: float = 5.0,
                          ssl: ssl_module.SSLContext | None = None, sock: socket.socket | None = None,
                          local_addr: tuple[str, int] | None = None) -> WebSocket:
    """Open a WebSocket to ``url`` (``ws://`` or ``wss://``) and return the
    :class:`WebSocket` once the server accepted the upgrade.

    Raises :class:`fastws.errors.HandshakeError` when the server refuses
    (``status`` and ``headers`` of its answer, e.g. ``Retry-After``),
    ``OSError``/``ConnectionError`` when it cannot be reached,
    ``asyncio.TimeoutError`` after ``open_timeout`` seconds.
    ``ssl``: an ``ssl.SSLContext`` for ``wss://`` (default: the system's
    trust store).  ``sock``: an already connected socket to use;
    ``local_addr``: ``(host, port)`` to connect from."""
    secure, host, port, resource, host_header = parse_url(url)
    loop = asyncio.get_running_loop()
    ws = WebSocket(loop, max_message_size=max_message_size, max_queue=max_queue, on_message=on_message,
                   ping_interval=ping_interval, ping_timeout=ping_timeout, close_timeout=close_timeout)
    if secure and ssl is None:
        ssl = ssl_module.create_default_context()
    elif not secure:
        ssl = None
    key = client_key()
    offers = [deflate_offer(client_max_window_bits=15)] if compression else []
    offered = list(subprotocols)           # read twice: once for the request, once for the answer
    request = client_request(host_header, resource, key, offered, offers, list(headers))

    async def handshake() -> None:
        if sock is not None:
            transport, _ = await loop.create_connection(lambda: ws, sock=sock, ssl=ssl,
                                                        server_hostname=host if ssl else None)
        else:
            transport, _ = await loop.create_connection(lambda: ws, host, port, ssl=ssl, local_addr=local_addr)
        try:
            transport.write(request)
            head = await ws._head_future
            end = head.find(b"\r\n\r\n") + 4
            accept = check_accept(head[:end], key, offered, offers)
        except BaseException:
            transport.abort()
            raise
        ws._start(accept, end)

    await asyncio.wait_for(handshake(), open_timeout)
    return ws
