"""The embedded broker: workers on one machine, no extra service.

The supervisor runs an :class:`EmbeddedHub` on a Unix domain socket; each
worker's :class:`EmbeddedBroker` (``unix:///path.sock``) connects to it,
tells it which channels it wants, and publishes through it. The hub routes a
publish to the workers subscribed to its channel (never back to the sender),
so the interest-based routing is the same as with Redis.

Wire protocol (both directions): frames of ``struct("!IB")`` (body length,
type) followed by the body.

========  =====  ===========================================================
HELLO     1      node id (utf-8)
SUB       2      u32 request id, then (u16 length + channel) repeated
UNSUB     3      same as SUB
ACK       4      u32 request id (hub -> worker: the (un)subscription applies)
PUB       5      u16 channel length + channel + envelope (worker -> hub)
MSG       6      same body as PUB (hub -> worker)
PING      7      u32 request id; the hub answers PONG (8) with the same id
========  =====  ===========================================================
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
import threading

from . import Broker, PublishError
from .redis import backoff_delay

log = logging.getLogger("fastws.broker")

_FRAME = struct.Struct("!IB")
_U32 = struct.Struct("!I")
_U16 = struct.Struct("!H")
HELLO, SUB, UNSUB, ACK, PUB, MSG, PING, PONG = range(1, 9)
MAX_FRAME = 64 << 20


def _frame(kind: int, body: bytes) -> bytes:
    return _FRAME.pack(len(body), kind) + body


def _channels(body: bytes, pos: int) -> list:
    out = []
    n = len(body)
    while pos < n:
        (ln,) = _U16.unpack_from(body, pos)
        out.append(bytes(body[pos + 2:pos + 2 + ln]))
        pos += 2 + ln
    return out


class _Framed(asyncio.Protocol):
    """Splits the byte stream into (type, body) frames for ``on_frame``."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.transport = None
        self.closed = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data) -> None:
        buf = self.buf
        buf += data
        pos = 0
        n = len(buf)
        while n - pos >= 5:
            ln, kind = _FRAME.unpack_from(buf, pos)
            if ln > MAX_FRAME:
                log.error("fastws: embedded broker: frame of %d bytes; dropping the link", ln)
                self.transport.abort()
                return
            if n - pos - 5 < ln:
                break
            body = bytes(buf[pos + 5:pos + 5 + ln])
            pos += 5 + ln
            self.on_frame(kind, body)
            if self.closed:
                return
        if pos:
            del buf[:pos]

    def send(self, kind: int, body: bytes) -> None:
        self.transport.write(_frame(kind, body))

    def connection_lost(self, exc) -> None:
        self.closed = True


class _HubLink(_Framed):
    """The hub's end of one worker's connection."""

    def __init__(self, hub) -> None:
        super().__init__()
        self.hub = hub
        self.node = "?"
        self.channels: set = set()

    def on_frame(self, kind: int, body: bytes) -> None:
        hub = self.hub
        if kind == PUB:
            (ln,) = _U16.unpack_from(body, 0)
            subs = hub.routes.get(body[2:2 + ln])
            hub.publishes += 1
            if subs:
                frame = _frame(MSG, body)
                for link in subs:
                    if link is not self:
                        link.transport.write(frame)
                        hub.deliveries += 1
        elif kind == SUB or kind == UNSUB:
            for ch in _channels(body, 4):
                if kind == SUB:
                    self.channels.add(ch)
                    hub.routes.setdefault(ch, set()).add(self)
                else:
                    self.channels.discard(ch)
                    hub._drop(ch, self)
            self.send(ACK, body[:4])
        elif kind == PING:
            self.send(PONG, body[:4])
        elif kind == HELLO:
            self.node = body.decode("utf-8", "replace")
        else:
            log.error("fastws: embedded broker: unknown frame type %d from %s", kind, self.node)
            self.transport.abort()

    def connection_lost(self, exc) -> None:
        super().connection_lost(exc)
        for ch in self.channels:
            self.hub._drop(ch, self)
        self.channels.clear()
        self.hub.links.discard(self)


class EmbeddedHub:
    """The supervisor's side: routes publishes to subscribed workers.

    In a running loop: ``await hub.start()`` / ``await hub.close()``. From a
    plain (supervisor) thread: ``hub.run_in_thread()`` / ``hub.stop_thread()``.
    """

    def __init__(self, path: str) -> None:
        self.path = path            # the Unix socket
        self.routes: dict = {}      # channel -> set of _HubLink
        self.links: set = set()     # connected workers
        self.publishes = 0
        self.deliveries = 0
        self._server = None
        self._thread = None
        self._loop = None

    def _drop(self, ch, link) -> None:
        subs = self.routes.get(ch)
        if subs is not None:
            subs.discard(link)
            if not subs:
                del self.routes[ch]

    def _link(self):
        link = _HubLink(self)
        self.links.add(link)
        return link

    async def start(self) -> None:
        if os.path.exists(self.path):
            os.unlink(self.path)   # a stale socket of a previous run
        self._loop = asyncio.get_running_loop()
        self._server = await self._loop.create_unix_server(self._link, self.path)
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for link in list(self.links):
                link.transport.abort()
            await self._server.wait_closed()
            self._server = None
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def stats(self) -> dict:
        return {"workers": len(self.links), "channels": len(self.routes),
                "publishes": self.publishes, "deliveries": self.deliveries}

    def run_in_thread(self) -> None:
        """Serve on a thread of its own (returns once listening)."""
        ready = threading.Event()
        error = []

        def main():
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self.start())
            except Exception as exc:  # reported to the caller below
                error.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self.close())
            loop.close()

        self._thread = threading.Thread(target=main, name="fastws-embedded-broker", daemon=True)
        self._thread.start()
        ready.wait(10)
        if error:
            raise error[0]

    def stop_thread(self, timeout: float = 5.0) -> None:
        if self._thread is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)
            self._thread = None


class _WorkerLink(_Framed):
    def __init__(self, broker) -> None:
        super().__init__()
        self.broker = broker
        self.lost = asyncio.get_event_loop().create_future()

    def on_frame(self, kind: int, body: bytes) -> None:
        if kind == MSG:
            (ln,) = _U16.unpack_from(body, 0)
            self.broker._deliver(body[2:2 + ln], body[2 + ln:])
        elif kind == ACK or kind == PONG:
            f = self.broker._requests.pop(_U32.unpack_from(body, 0)[0], None)
            if f is not None and not f.done():
                f.set_result(True)

    def connection_lost(self, exc) -> None:
        super().connection_lost(exc)
        if not self.lost.done():
            self.lost.set_result(exc)
        self.broker._on_link_lost(self)


class EmbeddedBroker(Broker):
    """A worker's side of the embedded broker (``unix:///path.sock``)."""

    def __init__(self, path: str, *, node_id=None, prefix: str = "", connect_timeout: float = 2.0,
                 backoff_min: float = 0.05, backoff_max: float = 2.0, ack_timeout: float = 5.0) -> None:
        super().__init__(node_id=node_id, prefix=prefix)
        self.path = path
        self.connect_timeout = connect_timeout
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.ack_timeout = ack_timeout
        self._link = None
        self._requests: dict = {}   # request id -> future (ACK / PONG)
        self._next_req = 0
        self._task = None
        self._closing = False

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._connected = asyncio.Event()
        self._task = self._loop.create_task(self._run())
        try:
            await asyncio.wait_for(self._connected.wait(), self.connect_timeout + 1.0)
        except asyncio.TimeoutError:
            log.warning("fastws: embedded broker %s not reachable yet; retrying", self.path)

    async def _run(self) -> None:
        attempt = 0
        ever = False
        while not self._closing:
            self._set_state("connecting")
            try:
                _, link = await asyncio.wait_for(
                    self._loop.create_unix_connection(lambda: _WorkerLink(self), self.path),
                    self.connect_timeout)
            except (OSError, asyncio.TimeoutError) as exc:
                log.debug("fastws: embedded broker connect failed: %s", exc)
            else:
                link.send(HELLO, self._origin)
                self._link = link
                chans = list(self._keys)
                ok = True
                if chans:
                    ok = await self._request(SUB, chans)
                if ok and not link.closed:
                    if ever:
                        self.counters["reconnects"] += 1
                    ever = True
                    attempt = 0
                    self._set_state("connected")
                    self._connected.set()
                    await link.lost
                self._connected.clear()
                self._link = None
                link.transport.abort()
            if self._closing:
                break
            self._set_state("disconnected")
            await asyncio.sleep(backoff_delay(attempt, self.backoff_min, self.backoff_max))
            attempt += 1

    def _on_link_lost(self, link) -> None:
        for f in self._requests.values():
            if not f.done():
                f.set_result(False)
        self._requests.clear()

    async def _request(self, kind: int, chans) -> bool:
        """Send SUB/UNSUB/PING and wait for the hub's answer (False if the
        link is down or went down meanwhile)."""
        link = self._link
        if link is None or link.closed:
            return False
        self._next_req = (self._next_req + 1) & 0xFFFFFFFF
        rid = self._next_req
        fut = self._requests[rid] = self._loop.create_future()
        link.send(kind, _U32.pack(rid) + b"".join(_U16.pack(len(c)) + c for c in chans))
        try:
            return await asyncio.wait_for(fut, self.ack_timeout)
        except asyncio.TimeoutError:
            self._requests.pop(rid, None)
            return False

    async def subscribe(self, keys) -> None:
        chans = []
        for key in keys:
            ch = self.channel(key)
            self._keys[ch] = key
            chans.append(ch)
        if chans:
            await self._request(SUB, chans)   # False while disconnected: sent on reconnect

    async def unsubscribe(self, keys) -> None:
        chans = [ch for ch in map(self.channel, keys) if self._keys.pop(ch, None) is not None]
        if chans:
            await self._request(UNSUB, chans)

    async def publish(self, key, payload: bytes):
        self._send_publish(key, payload)

    def _send_publish(self, key, payload: bytes) -> None:
        self.counters["publishes"] += 1
        link = self._link
        if link is None or link.closed or self.state != "connected":
            raise self._fail("not connected")
        ch = self.channel(key)
        link.send(PUB, _U16.pack(len(ch)) + ch + self._envelope(payload))

    def publish_nowait(self, key, payload: bytes):
        try:
            self._send_publish(key, payload)
        except PublishError:
            return False
        return True

    async def ping(self):
        if self.state != "connected":
            return False, self.state
        ok = await self._request(PING, [])
        return ok, self.state if ok else "no answer from the hub"

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        if self._link is not None:
            self._link.transport.abort()
            self._link = None
        self._set_state("closed")
