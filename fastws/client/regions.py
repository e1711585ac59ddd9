"""Choosing among several server URLs (regions) by measured round trip.

:func:`measure` opens a TCP connection to every URL's host and port at the
same time and times it (a TCP connect is one round trip: SYN, SYN-ACK),
then closes it without sending a byte; a URL that cannot be reached within
the timeout is ranked last.  :class:`Ranking` keeps the order and hands out
the URL for each attempt: the fastest first, the next one after a failure,
and a fresh measurement once every URL has failed in turn.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterable, Sequence

from .connection import parse_url

__all__ = ["measure", "Ranking"]


async def _rtt(host: str, port: int, timeout: float) -> float:
    t0 = time.perf_counter()
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, asyncio.TimeoutError):
        return math.inf
    elapsed = time.perf_counter() - t0
    writer.transport.abort()
    return elapsed


async def measure(urls: Sequence[str], timeout: float = 2.0) -> dict[str, float]:
    """``{url: seconds}`` (``inf`` for one not reached in ``timeout``): the
    TCP connect time to each URL, all measured at once."""
    targets = [parse_url(u) for u in urls]
    times = await asyncio.gather(*(_rtt(t[1], t[2], timeout) for t in targets))
    return dict(zip(urls, times, strict=True))


class Ranking:
    """The URLs in the order to try them (see the module docstring)."""

    def __init__(self, urls: Iterable[str], timeout: float = 2.0) -> None:
        self.urls = list(urls)
        if not self.urls:
            raise ValueError("no URL to connect to")
        for u in self.urls:
            parse_url(u)                       # a bad URL fails at once
        self.timeout = timeout
        self.rtts: dict[str, float] = {}       # url -> seconds of the last measurement
        self.order: list[str] = []             # urls, fastest first
        self._next = 0                         # index in order of the next attempt

    async def pick(self) -> str:
        """The URL of the next attempt."""
        if len(self.urls) == 1:
            return self.urls[0]
        if not self.order or self._next >= len(self.order):
            self.rtts = await measure(self.urls, self.timeout)
            self.order = sorted(self.urls, key=lambda u: (self.rtts[u], self.urls.index(u)))
            self._next = 0
        return self.order[self._next]

    def failed(self) -> None:
        """The last URL picked did not work: the next attempt takes the next one."""
        self._next += 1

    def succeeded(self) -> None:
        """Connected: after a later loss, start again from the fastest."""
        self._next = 0
