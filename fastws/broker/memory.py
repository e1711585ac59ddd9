"""The in-process broker (``memory://``, the default for one process).

Brokers created with the same URL share one bus, so tests (and an app
embedding two servers) can run several "nodes" in one process. Delivery is
asynchronous (next loop iteration), as with a real backend, and in publish
order.
"""

from __future__ import annotations

import asyncio

from ..errors import BrokerURLError
from .base import Broker

_BUSES: dict = {}   # bus name -> {channel: set of MemoryBroker}


def parse_memory_url(url: str) -> str:
    """The bus name of ``memory://[name]`` (empty: the default bus; so is a
    dotted-path creation without ``://``); a URL with options or another
    scheme raises :class:`~fastws.errors.BrokerURLError`."""
    scheme, sep, name = url.partition("://")
    if not sep:
        return ""              # created by dotted path (fastws.broker.memory.MemoryBroker): the default bus
    if scheme.lower() != "memory":
        raise BrokerURLError(url, f"scheme {scheme!r} is not memory", "expected memory://[name]")
    if "?" in name or "#" in name or "/" in name:
        raise BrokerURLError(url, f"unexpected {'?' if '?' in name else '#' if '#' in name else '/'} "
                             f"after the bus name", "the memory broker takes a bare name: memory://[name]")
    return name


class MemoryBroker(Broker):
    def __init__(self, url: str = "memory://", **opts) -> None:
        super().__init__(**opts)
        self.bus_name = parse_memory_url(url)
        self._bus = _BUSES.setdefault(self.bus_name, {})

    async def start(self) -> None:
        self._set_state("connected")

    async def publish(self, key, payload: bytes):
        return self._send(key, payload)

    def publish_nowait(self, key, payload: bytes):
        try:
            return self._send(key, payload)
        except Exception:
            return None

    def _send(self, key, payload: bytes):
        if self.state != "connected":
            self.counters["publishes"] += 1
            raise self._fail("not started" if self.state != "closed" else "closed")
        self.counters["publishes"] += 1
        ch = self.channel(key)
        data = self._envelope(bytes(payload))
        subs = self._bus.get(ch, ())
        for b in subs:
            b._loop.call_soon(b._deliver, ch, data)
        return len(subs)

    async def subscribe(self, keys) -> None:
        self._loop = asyncio.get_running_loop()
        for key in keys:
            ch = self.channel(key)
            self._keys[ch] = key
            self._bus.setdefault(ch, set()).add(self)

    async def unsubscribe(self, keys) -> None:
        for key in keys:
            ch = self.channel(key)
            self._keys.pop(ch, None)
            subs = self._bus.get(ch)
            if subs is not None:
                subs.discard(self)
                if not subs:
                    del self._bus[ch]

    async def close(self) -> None:
        await self.unsubscribe(list(self._keys.values()))
        self._set_state("closed")
