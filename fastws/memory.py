"""Giving freed memory back to the system after many connections closed.

A worker that held many connections keeps the memory they used after they
close: the C heap (glibc's malloc) returns only the free pages at its top,
so a few live allocations above a freed region keep all of it resident.
:class:`HeapTrim` checks every :data:`INTERVAL` seconds how many
connections the worker has (often enough to see the peak of a burst that
lasts a few seconds, for the price of one ``len()``); once at least
:data:`MIN_FREED` of them are gone and at most half of the peak since the
last trim is left, it calls
glibc's ``malloc_trim(0)`` in a thread (it can take a while on a large
heap, and must not stall the event loop), which hands the free pages in
the middle of the heap back too.  On a C library without ``malloc_trim``
(musl, macOS) it does nothing.  ``trims`` counts the calls and
``released_bytes`` what the worker's RSS dropped across them.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger("fastws.memory")

INTERVAL = 1.0       # seconds between checks
MIN_FREED = 5000     # connections gone since the peak before a trim is worth it


def _find_malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim   # type: ignore[no-any-return]


malloc_trim = _find_malloc_trim()


def rss_bytes() -> int:
    """This process's resident set size (0 where /proc is not there)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096
    except (OSError, ValueError, IndexError):
        return 0


class HeapTrim:
    """Trims the C heap of this worker after a large drop in connections."""

    def __init__(self, loop: asyncio.AbstractEventLoop, count: Callable[[], int], *, interval: float = INTERVAL,
                 min_freed: int = MIN_FREED) -> None:
        self.loop = loop
        self.count = count                # the worker's open connections, now
        self.interval = interval
        self.min_freed = min_freed
        self.peak = 0
        self.trims = 0
        self.released_bytes = 0
        self._handle: asyncio.TimerHandle | None = None
        self._running: asyncio.Future[Any] | None = None

    def start(self) -> None:
        if malloc_trim is not None and self._handle is None:
            self._handle = self.loop.call_later(self.interval, self._check)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _check(self) -> None:
        self._handle = self.loop.call_later(self.interval, self._check)
        n = self.count()
        self.peak = max(self.peak, n)
        if self._running is not None or self.peak - n < self.min_freed or n > self.peak // 2:
            return
        self.peak = n
        before = rss_bytes()
        self._running = self.loop.run_in_executor(None, malloc_trim, 0)   # type: ignore[arg-type]
        self._running.add_done_callback(lambda fut: self._done(fut, before))

    def _done(self, fut: asyncio.Future[Any], before: int) -> None:
        self._running = None
        if fut.cancelled() or fut.exception() is not None:
            return
        self.trims += 1
        after = rss_bytes()
        self.released_bytes += max(0, before - after)
        log.debug("fastws: heap trimmed after connections closed: RSS %d -> %d bytes", before, after)


__all__ = ["HeapTrim", "malloc_trim", "rss_bytes", "INTERVAL", "MIN_FREED"]
