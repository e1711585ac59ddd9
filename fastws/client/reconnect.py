"""A WebSocket client that reconnects by itself: ``fastws.connect(url)``.

::

    async with fastws.connect("ws://127.0.0.1:8000/echo") as ws:
        await ws.send("hello")
        async for message in ws:          # goes on across reconnects
            print(message)

What it does when the connection is lost (or cannot be made):

* it waits (see :mod:`fastws.client.backoff`: full-jitter exponential
  backoff; the server's ``"reconnect in 1.7s"`` close reason and a 503/429's
  ``Retry-After`` win) and connects again, to the fastest of several URLs
  (:mod:`fastws.client.regions`) when given a list;
* a server that refuses the client (401, 403 and the other 4xx except 408
  and 429) is not retried in a storm: by default the client gives up at
  once (``on_refused="raise"``: :class:`~fastws.client.errors.GaveUp`
  with the ``status``); ``on_refused="backoff"`` waits ``refused_delay``
  seconds and more each time (doubling, jittered, up to 16 times it);
* messages sent while disconnected wait in a queue of at most
  ``send_queue`` messages, sent in order once connected again, after the
  ``on_connect`` callbacks ran; when full, ``send_queue_policy``
  ``"drop_oldest"`` drops the oldest (counted in ``dropped``) and
  ``"raise"`` refuses the new one (:class:`~fastws.client.errors.SendQueueFull`);
* received messages from every connection come out of one ``recv`` /
  ``async for`` (or go to ``on_message``), in order; iteration ends when
  you :meth:`Client.close` it, and raises
  :class:`~fastws.client.errors.GaveUp` when it gave up.

Messages that were on the wire when the connection broke are lost: the
room client (:mod:`fastws.client.rooms`) resumes rooms from their last
position and acknowledges publishes for that.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import logging
import random
import ssl as ssl_module
from collections.abc import Callable, Generator, Iterable
from typing import Any

from ..errors import ConnectionClosed, HandshakeError
from .backoff import Backoff, reconnect_hint, retry_after
from .connection import Data, WebSocket, open_connection
from .errors import GaveUp, SendQueueFull
from .regions import Ranking

__all__ = ["Client", "connect"]

log = logging.getLogger("fastws.client")

#: statuses retried like a lost connection (with backoff or the server's hint)
RETRIED = frozenset((408, 429, 500, 502, 503, 504))
#: statuses of a refused client (credentials): see on_refused
REFUSED = frozenset((401, 403))
POLICIES = ("drop_oldest", "raise")

#: ``on_connect(client)`` (plain or ``async``)
ConnectCallback = Callable[["Client"], object]
#: ``on_disconnect(client, code, reason)`` (plain or ``async``)
DisconnectCallback = Callable[["Client", int, str], object]


class Client:
    """A reconnecting WebSocket client (see the module docstring); made by
    :func:`connect`.

    ``server_hints=False`` ignores the server's reconnect hint and
    ``Retry-After`` (the backoff alone decides; for comparisons).
    ``local_addr``: ``(host, port)`` to connect from.

    Callbacks (plain or ``async``): ``on_connect(client)`` after each
    successful connection, before queued messages are sent;
    ``on_disconnect(client, code, reason)`` after each loss;
    ``on_message(message)`` instead of ``recv``/``async for`` (a plain
    call per message: the fastest way)."""

    def __init__(self, urls: str | Iterable[str], *, subprotocols: Iterable[str] = (),
                 headers: Iterable[tuple[str, str]] = (), compression: bool = False,
                 backoff: Backoff | None = None, on_refused: str = "raise", refused_delay: float = 60.0,
                 send_queue: int = 1024, send_queue_policy: str = "drop_oldest",
                 max_message_size: int = 1 << 20, max_queue: int = 1024, open_timeout: float = 10.0,
                 ping_interval: float | None = 20.0, ping_timeout: float | None = 20.0,
                 close_timeout: float = 5.0, ssl: ssl_module.SSLContext | None = None,
                 on_connect: ConnectCallback | None = None, on_disconnect: DisconnectCallback | None = None,
                 on_message: Callable[[Data], object] | None = None, rtt_timeout: float = 2.0,
                 server_hints: bool = True, local_addr: tuple[str, int] | None = None) -> None:
        if isinstance(urls, str):
            urls = [urls]
        if on_refused not in ("raise", "backoff"):
            raise ValueError("on_refused must be 'raise' or 'backoff'")
        if send_queue_policy not in POLICIES:
            raise ValueError(f"send_queue_policy must be one of {', '.join(POLICIES)}")
        if send_queue < 0:
            raise ValueError("send_queue must be >= 0")
        self.ranking = Ranking(urls, rtt_timeout)
        self.backoff = backoff or Backoff()
        self.on_refused = on_refused
        self.server_hints = server_hints   # False: the backoff alone decides (hint and Retry-After ignored)
        self.refused_delay = float(refused_delay)
        self.send_queue_size = int(send_queue)
        self.send_queue_policy = send_queue_policy
        self._options: dict[str, Any] = dict(
            subprotocols=tuple(subprotocols), headers=list(headers), compression=compression,
            max_message_size=max_message_size, max_queue=max_queue, open_timeout=open_timeout,
            ping_interval=ping_interval, ping_timeout=ping_timeout, close_timeout=close_timeout, ssl=ssl,
            local_addr=local_addr)
        self.connect_callbacks: list[ConnectCallback] = [on_connect] if on_connect else []
        self.disconnect_callbacks: list[DisconnectCallback] = [on_disconnect] if on_disconnect else []
        self.on_message = on_message
        self.websocket: WebSocket | None = None   # the open WebSocket, or None while disconnected
        self.url: str | None = None        # the URL of the current (or last) connection
        self.connections = 0               # successful connections so far
        self.dropped = 0                   # queued messages dropped (drop_oldest)
        self.delays: list[float] = []      # every delay waited before an attempt (seconds)
        self.last_close: tuple[int, str] | None = None   # (code, reason) of the last lost connection
        self.last_error: BaseException | None = None     # the last failed attempt's exception
        self.gave_up: GaveUp | None = None  # the GaveUp, once given up
        self._refusals = 0
        self._outbox: collections.deque[Data] = collections.deque()
        self._inbox: collections.deque[Data] = collections.deque()
        self._max_inbox = max(1, max_queue)
        self._waiter: asyncio.Future[Data] | None = None
        self._connected: asyncio.Future[None] | None = None   # future: the next connection is up
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._sleep: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- lifecycle --------------------------------------------------------------------

    async def start(self, wait: bool = True) -> Client:
        """Start connecting; ``wait``: until the first connection is up
        (raises :class:`GaveUp` if it never comes)."""
        if self._task is None:
            self._loop = asyncio.get_running_loop()
            self._connected = self._loop.create_future()
            self._task = self._loop.create_task(self._run())
        if wait:
            await self.wait_connected()
        return self

    async def wait_connected(self) -> None:
        """Until a connection is up (raises :class:`GaveUp` if given up)."""
        while self.websocket is None or not self.websocket.open:
            if self.gave_up is not None:
                raise self.gave_up
            if self._closing:
                raise ConnectionClosed(1000, "closed by the client")
            if self._connected is None:
                raise RuntimeError("the client is not started (await client.start())")
            await asyncio.shield(self._connected)

    def __await__(self) -> Generator[Any, None, Client]:
        return self.start().__await__()

    async def __aenter__(self) -> Client:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close the connection and stop reconnecting; iteration ends."""
        self._closing = True
        if self._sleep is not None and not self._sleep.done():
            self._sleep.cancel()
        ws = self.websocket
        if ws is not None:
            await ws.close(code, reason)
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        self._wake(ConnectionClosed(code, reason or "closed by the client"))

    def abort(self) -> None:
        """Stop reconnecting and drop the connection at once (no close
        handshake); iteration ends."""
        self._closing = True
        if self._sleep is not None and not self._sleep.done():
            self._sleep.cancel()
        if self.websocket is not None:
            self.websocket.abort()
        if self._task is not None and not self._task.done():
            self._task.cancel()
        self._wake(ConnectionClosed(1006, "aborted by the client"))

    @property
    def connected(self) -> bool:
        return self.websocket is not None and self.websocket.open

    # -- the connection loop ------------------------------------------------------------

    async def _run(self) -> None:
        try:
            while not self._closing:
                delay = await self._attempt()
                if self._closing:
                    break
                if delay is None:            # given up
                    return
                await self._wait(delay)
        except asyncio.CancelledError:
            if self.websocket is not None:
                self.websocket.abort()
            raise

    async def _wait(self, delay: float) -> None:
        self.delays.append(delay)
        loop = self._started_loop()
        sleep: asyncio.Future[None] = loop.create_future()
        self._sleep = sleep

        def wake() -> None:
            if not sleep.done():
                sleep.set_result(None)

        handle = loop.call_later(delay, wake)
        try:
            await sleep
        except asyncio.CancelledError:
            if not self._closing:
                raise
        finally:
            handle.cancel()
            self._sleep = None

    def _started_loop(self) -> asyncio.AbstractEventLoop:
        """The loop :meth:`start` ran in (RuntimeError before)."""
        if self._loop is None:
            raise RuntimeError("the client is not started (await client.start())")
        return self._loop

    async def _attempt(self) -> float | None:
        """One connection attempt, and the connection's life if it is made;
        returns the delay before the next attempt, None to give up."""
        url = await self.ranking.pick()
        self.url = url
        try:
            ws = await open_connection(url, on_message=self._deliver, **self._options)
        except HandshakeError as exc:
            self.last_error = exc
            self.ranking.failed()
            return self._after_refusal(exc)
        except (OSError, asyncio.TimeoutError, EOFError) as exc:
            self.last_error = exc
            self.ranking.failed()
            return self._next_delay(None)
        if self._closing:
            await ws.close()
            return None
        # connected
        self.ranking.succeeded()
        self.backoff.connected()
        self._refusals = 0
        self.connections += 1
        self.websocket = ws
        loop = self._started_loop()
        lost: asyncio.Future[tuple[int, str]] = loop.create_future()

        def closed(code: int, reason: str) -> None:
            if not lost.done():
                lost.set_result((code, reason))

        ws.on_close = closed
        if ws.closed and not lost.done():       # (a closed WebSocket knows its close code)
            lost.set_result((ws.close_code if ws.close_code is not None else 1006, ws.close_reason))
        for cb in list(self.connect_callbacks):
            await self._call(cb, self)
        self._flush_outbox(ws)
        if self._connected is not None and not self._connected.done():
            self._connected.set_result(None)
        code, reason = await lost
        self.websocket = None
        self._connected = loop.create_future()
        self.backoff.disconnected()
        self.last_close = (code, reason)
        for on_lost in list(self.disconnect_callbacks):
            await self._call(on_lost, self, code, reason)
        if self._closing:
            return None
        hint = reconnect_hint(reason) if self.server_hints else None
        if hint is not None:
            return hint
        return self._next_delay(None)

    def _after_refusal(self, exc: HandshakeError) -> float | None:
        status = exc.status
        if status in REFUSED or (400 <= status < 500 and status not in RETRIED):
            if self.on_refused == "raise":
                self._give_up(exc)
                return None
            self._refusals += 1
            window = self.refused_delay * (2 ** min(self._refusals - 1, 4))
            return random.uniform(window / 2, window)
        hinted = retry_after(exc.headers) if status in (429, 503) and self.server_hints else None
        return self._next_delay(hinted)

    def _next_delay(self, hinted: float | None) -> float | None:
        if self.backoff.exhausted:
            self._give_up(self.last_error)
            return None
        delay = self.backoff.next_delay()
        return hinted if hinted is not None else delay

    def _give_up(self, error: BaseException | None) -> None:
        gave_up = self.gave_up = GaveUp(error, self.backoff.attempt)
        log.warning("fastws.client: %s", gave_up)
        if self._connected is not None and not self._connected.done():
            self._connected.set_result(None)
        self._wake(gave_up)

    async def _call(self, cb: Callable[..., object], *args: object) -> None:
        try:
            result = cb(*args)
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("fastws.client: exception in a callback")

    # -- receiving ------------------------------------------------------------------------

    def _deliver(self, message: Data) -> None:
        cb = self.on_message
        if cb is not None:
            cb(message)
            return
        waiter = self._waiter
        if waiter is not None and not self._inbox:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(message)
                return
        self._inbox.append(message)
        if len(self._inbox) >= self._max_inbox:
            ws = self.websocket
            if ws is not None and ws.transport is not None and not ws._paused_reading:
                ws._paused_reading = True
                ws.transport.pause_reading()

    def _wake(self, exc: BaseException) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    async def recv(self) -> Data:
        """The next message from any connection; raises :class:`GaveUp`
        once given up, ``ConnectionClosed`` once closed by :meth:`close`."""
        inbox = self._inbox
        if inbox:
            message = inbox.popleft()
            ws = self.websocket
            if ws is not None and ws._paused_reading and len(inbox) <= self._max_inbox // 2:
                ws._paused_reading = False
                if ws.transport is not None:
                    ws.transport.resume_reading()
            return message
        if self.gave_up is not None:
            raise self.gave_up
        if self._closing:
            raise ConnectionClosed(1000, "closed by the client")
        waiter: asyncio.Future[Data] = self._started_loop().create_future()
        self._waiter = waiter
        return await waiter

    def __aiter__(self) -> Client:
        return self

    async def __anext__(self) -> Data:
        try:
            return await self.recv()
        except GaveUp:
            raise
        except ConnectionClosed:
            raise StopAsyncIteration from None

    # -- sending ------------------------------------------------------------------------

    async def send(self, message: Data) -> None:
        """Send ``message`` now, or queue it until connected again (see the
        module docstring)."""
        ws = self.websocket
        if ws is not None and not self._outbox:
            try:
                await ws.send(message)
                return
            except ConnectionClosed:
                pass
        self.send_nowait(message)

    def send_nowait(self, message: Data) -> None:
        """:meth:`send` without waiting for the transport's buffer."""
        ws = self.websocket
        if ws is not None and not self._outbox and ws.open:
            ws.send_nowait(message)
            return
        if self.gave_up is not None:
            raise self.gave_up
        if self._closing:
            raise ConnectionClosed(1000, "closed by the client")
        outbox = self._outbox
        if len(outbox) >= self.send_queue_size:
            if self.send_queue_policy == "raise" or self.send_queue_size == 0:
                raise SendQueueFull(f"send queue full ({self.send_queue_size} messages) while disconnected")
            outbox.popleft()
            self.dropped += 1
        outbox.append(message)

    def _flush_outbox(self, ws: WebSocket) -> None:
        outbox = self._outbox
        while outbox and ws.open:
            ws.send_nowait(outbox.popleft())

    @property
    def queued(self) -> int:
        """Messages waiting for a connection."""
        return len(self._outbox)


def connect(urls: str | Iterable[str], **options: Any) -> Client:
    """A reconnecting client of ``urls`` (one ``ws://``/``wss://`` URL, or a
    list: the fastest reachable one is used, see
    :mod:`fastws.client.regions`).  Use it as ``async with fastws.connect(url)
    as ws`` or ``ws = await fastws.connect(url)``; ``options`` are those of
    :class:`Client`."""
    return Client(urls, **options)
