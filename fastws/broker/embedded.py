"""The embedded broker: workers on one machine, no extra service.

The supervisor runs an :class:`EmbeddedRelay` on a Unix domain socket; each
worker's :class:`EmbeddedBroker` (``unix:///path.sock``) connects to it,
tells it which channels it wants, and publishes through it. The relay routes a
publish to the workers subscribed to its channel (never back to the sender),
so the interest-based routing is the same as with Redis.

Wire protocol (both directions): length-prefixed frames, HELLO, SUB,
UNSUB, ACK, PUB, MSG, PING and PONG, drawn in :mod:`fastws.broker.wire`
(section 4), which also has their pack/unpack functions.

Sizes: a channel name is at most ``MAX_CHANNEL`` bytes (far more than the
longest room name Config allows, ``max_room_name`` <= 64 KiB, plus any
prefix and namespace); a subscribe of more channels than fit in one frame
goes in several SUB frames of at most ``MAX_REQUEST`` bytes.  A key whose
channel cannot be carried (too long, not UTF-8) fails alone with
:class:`~fastws.broker.SubscribeError`: the other keys of the call are
subscribed, and the failed one is not recorded.  A publish larger than a
frame fails with :class:`~fastws.broker.PublishError` instead of breaking
the link.  The relay drops a link that sends a malformed frame.
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
import threading

from ..errors import BrokerURLError, PublishError, SubscribeError
from .base import Broker, backoff_delay
from .wire import (
    ACK,
    HELLO,
    LINK_HEAD,
    MAX_CHANNEL,
    MAX_FRAME,
    MAX_REQUEST,
    MSG,
    PING,
    PONG,
    PUB,
    SUB,
    U32,
    UNSUB,
    MalformedFrame,
    link_batches,
    link_channels,
    link_frame,
    link_pub_body,
    link_split_channel,
)

log = logging.getLogger("fastws.broker")

__all__ = ["EmbeddedRelay", "EmbeddedBroker", "MAX_FRAME", "MAX_CHANNEL", "MAX_REQUEST", "MalformedFrame",
           "parse_unix_url"]

UNIX_URL_FORM = "unix:///absolute/path.sock"


def parse_unix_url(url: str) -> str:
    """The socket path of ``unix:///path.sock``: absolute, at most 107 bytes
    (the kernel's limit), no host, options or fragment; else
    :class:`~fastws.errors.BrokerURLError` saying which part is wrong."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() != "unix":
        raise BrokerURLError(url, f"scheme {scheme!r} is not unix", f"expected {UNIX_URL_FORM}")
    if "?" in rest or "#" in rest:
        raise BrokerURLError(url, "unexpected options ('?' or '#')",
                             f"the embedded broker takes none: expected {UNIX_URL_FORM}")
    if not rest.startswith("/"):
        raise BrokerURLError(url, f"socket path {rest!r} is not absolute" if rest else "no socket path",
                             f"expected {UNIX_URL_FORM}")
    if len(rest.encode()) > 107:
        raise BrokerURLError(url, f"socket path is {len(rest.encode())} bytes long",
                             "at most 107 bytes (the kernel's limit for a Unix socket path)")
    return rest


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
            ln, kind = LINK_HEAD.unpack_from(buf, pos)
            if ln > MAX_FRAME:
                log.error("fastws: embedded broker: frame of %d bytes; dropping the link", ln)
                self.transport.abort()
                return
            if n - pos - 5 < ln:
                break
            body = bytes(buf[pos + 5:pos + 5 + ln])
            pos += 5 + ln
            try:
                self.on_frame(kind, body)
            except (MalformedFrame, struct.error) as exc:
                log.error("fastws: embedded broker: malformed frame type %d (%s); dropping the link",
                          kind, exc)
                self.closed = True
                self.transport.abort()
                return
            if self.closed:
                return
        if pos:
            del buf[:pos]

    def send(self, kind: int, body: bytes) -> None:
        self.transport.write(link_frame(kind, body))

    def connection_lost(self, exc) -> None:
        self.closed = True


class _RelayLink(_Framed):
    """The relay's end of one worker's connection."""

    def __init__(self, relay) -> None:
        super().__init__()
        self.relay = relay
        self.node = "?"
        self.channels: set = set()

    def on_frame(self, kind: int, body: bytes) -> None:
        relay = self.relay
        if kind == PUB:
            ch, _ = link_split_channel(body)
            subs = relay.routes.get(ch)
            relay.publishes += 1
            if subs:
                frame = link_frame(MSG, body)
                for link in subs:
                    if link is not self:
                        link.transport.write(frame)
                        relay.deliveries += 1
        elif kind in (SUB, UNSUB):
            for ch in link_channels(body, 4):
                if kind == SUB:
                    self.channels.add(ch)
                    relay.routes.setdefault(ch, set()).add(self)
                else:
                    self.channels.discard(ch)
                    relay._drop(ch, self)
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
            self.relay._drop(ch, self)
        self.channels.clear()
        self.relay.links.discard(self)


class EmbeddedRelay:
    """The supervisor's side: routes publishes to subscribed workers.

    In a running loop: ``await relay.start()`` / ``await relay.close()``. From a
    plain (supervisor) thread: ``relay.run_in_thread()`` / ``relay.stop_thread()``.
    """

    def __init__(self, path: str) -> None:
        self.path = path            # the Unix socket
        self.routes: dict = {}      # channel -> set of _RelayLink
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
        link = _RelayLink(self)
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
            ch, data = link_split_channel(body)
            self.broker._deliver(ch, data)
        elif kind in (ACK, PONG):
            f = self.broker._requests.pop(U32.unpack_from(body, 0)[0], None)
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
        if self._task is not None and not self._task.done():
            return                      # started already
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

    async def _request(self, kind: int, chans):
        """Send SUB/UNSUB (in frames of at most MAX_REQUEST bytes) or PING and
        wait for the relay's answers: True when all came, False if the link is
        down or went down meanwhile, None if it is up but an answer did not
        come within ``ack_timeout``."""
        link = self._link
        if link is None or link.closed:
            return False
        futs = []
        for payload in (link_batches(chans) if chans else [b""]):
            self._next_req = (self._next_req + 1) & 0xFFFFFFFF
            rid = self._next_req
            fut = self._requests[rid] = self._loop.create_future()
            futs.append((rid, fut))
            link.send(kind, U32.pack(rid) + payload)
        done, _ = await asyncio.wait([f for _, f in futs], timeout=self.ack_timeout)
        if len(done) < len(futs):
            for rid, _ in futs:
                self._requests.pop(rid, None)
            return False if link.closed else None
        return all(f.result() for _, f in futs)

    def _carried(self, keys):
        """``(channel -> key for the keys the link can carry, [keys it cannot])``."""
        ok, bad = {}, []
        for key in keys:
            try:
                ch = self.channel(key)
            except (UnicodeEncodeError, TypeError) as exc:
                log.warning("fastws: embedded broker: key %.80r refused: %s", key, exc)
                bad.append(key)
                continue
            if len(ch) > MAX_CHANNEL:
                log.warning("fastws: embedded broker: channel of %d bytes refused (at most %d)",
                            len(ch), MAX_CHANNEL)
                bad.append(key)
                continue
            ok[ch] = key
        return ok, bad

    async def subscribe(self, keys) -> None:
        chans, bad = self._carried(keys)
        self._keys.update(chans)                # wanted: also sent again on every reconnect
        if chans:
            ok = await self._request(SUB, list(chans))   # False while disconnected: sent on reconnect
            if ok is None:                      # connected, no answer: not subscribed, not kept
                for ch in chans:
                    if self._keys.get(ch) is chans[ch]:
                        del self._keys[ch]
                bad.extend(chans.values())
                raise SubscribeError(f"embedded broker: no answer to a subscribe within {self.ack_timeout}s",
                                     bad)
        if bad:
            raise SubscribeError(f"embedded broker cannot carry {len(bad)} of {len(bad) + len(chans)} keys "
                                 f"(channel longer than {MAX_CHANNEL} bytes or not UTF-8)", bad)

    async def unsubscribe(self, keys) -> None:
        chans, _ = self._carried(keys)          # a key it cannot carry was never subscribed
        chans = {ch: key for ch, key in chans.items() if self._keys.pop(ch, None) is not None}
        if chans:
            ok = await self._request(UNSUB, list(chans))
            if ok is None:                      # maybe still subscribed: kept, a retry unsubscribes
                for ch, key in chans.items():
                    self._keys.setdefault(ch, key)
                raise SubscribeError(f"embedded broker: no answer to an unsubscribe within "
                                     f"{self.ack_timeout}s", list(chans.values()))

    async def publish(self, key, payload: bytes):
        self._send_publish(key, payload)

    def _send_publish(self, key, payload: bytes) -> None:
        self.counters["publishes"] += 1
        link = self._link
        if link is None or link.closed or self.state != "connected":
            raise self._fail("not connected")
        try:
            ch = self.channel(key)
        except (UnicodeEncodeError, TypeError) as exc:
            raise self._fail(f"key {key!r:.80} cannot be carried: {exc}") from None
        body = link_pub_body(ch, self._envelope(payload))
        if len(ch) > MAX_CHANNEL or len(body) > MAX_FRAME:
            raise self._fail(f"a publish of {len(body)} bytes does not fit a frame of the embedded broker "
                             f"(at most {MAX_FRAME} bytes, channel at most {MAX_CHANNEL})")
        link.send(PUB, body)

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
        return bool(ok), self.state if ok else "no answer from the relay"

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
