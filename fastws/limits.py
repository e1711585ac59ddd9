"""Limits that protect the server: open files, admission and reconnect pacing.

* ``raise_nofile_limit`` lifts the soft open-file limit to the hard one at
  start-up (each connection is one file descriptor);
* ``Admission`` decides, before an upgrade, whether the server takes one more
  connection: ``max_connections`` open at once and a token bucket of
  ``handshake_rate`` handshakes per second (burst ``handshake_burst``), so a
  reconnect storm is answered with cheap 503s instead of taking the process
  down. Every refusal carries a jittered ``Retry-After`` so refused clients
  do not come back in lockstep;
* ``ClientLimits`` does the same per client address (``max_connections_per_ip``
  open at once, ``handshake_rate_per_ip`` upgrades per second with a burst of
  ``handshake_burst_per_ip``): one address cannot take the server's whole
  capacity; its excess gets 429 with a jittered ``Retry-After`` (RFC 6585);
* ``jittered`` spreads a delay (the ``Retry-After`` of a refusal, the
  reconnect hint a draining node sends, see ``fastws.errors.RESTARTING``).
"""

from __future__ import annotations

import logging
import math
import random
import resource
import time
from collections import OrderedDict

from .core import Connection

log = logging.getLogger("fastws")


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:  # pragma: no cover - platform specific
            log.warning("fastws: could not raise the open-file limit: %s", exc)
    return soft, hard


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up."""

    __slots__ = ("rate", "burst", "_tokens", "_stamp", "_clock")

    def __init__(self, rate: float, burst: float | None = None, clock=time.monotonic) -> None:
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else max(1.0, rate))
        self._tokens = self.burst
        self._clock = clock
        self._stamp = clock()

    def take(self) -> bool:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


def jittered(base: float, spread: float) -> float:
    """A delay in [base, base + spread]."""
    return base + random.random() * spread


class Admission:
    """Connection limits checked before an upgrade is accepted."""

    def __init__(self, max_connections: int = 0, handshake_rate: float = 0.0,
                 handshake_burst: float | None = None, retry_after: float = 5.0) -> None:
        self.max_connections = max_connections      # 0: no limit
        self.bucket = TokenBucket(handshake_rate, handshake_burst) if handshake_rate > 0 else None
        self.retry_after = retry_after              # base of the Retry-After hint, seconds
        self.refused = {"max_connections": 0, "handshake_rate": 0}

    def check(self, open_connections: int):
        """None to admit, or ``(reason, retry_after_seconds)`` to refuse with 503."""
        if self.max_connections and open_connections >= self.max_connections:
            self.refused["max_connections"] += 1
            return "too many connections", self._retry()
        if self.bucket is not None and not self.bucket.take():
            self.refused["handshake_rate"] += 1
            return "too many handshakes per second", self._retry()
        return None

    def _retry(self) -> int:
        return max(1, round(jittered(self.retry_after, self.retry_after)))


#: Most client addresses whose handshake rate ``ClientLimits`` remembers at
#: once (about 300 bytes each); see ``ClientLimits`` for what happens past it.
RATE_TABLE_MAX = 65536


def _gone(holder) -> bool:
    """Is the upgrade or connection ``holder`` stands for over?  An engine
    ``Connection`` (the native front) knows its close code once it is lost
    or its peer closed; an asyncio transport (the ASGI front, before and
    after the hand-over) is closing."""
    if isinstance(holder, Connection):
        return holder.close_code is not None
    return holder.is_closing()


class ClientLimits:
    """Per-client limits checked at the upgrade (both fronts, see
    ``fastws.node.Node.admit_client``).  A client is a key of
    :func:`fastws.proxy.client_key`: its IPv4 address, or its IPv6 /64.

    * ``max_connections``: open connections plus upgrades in progress per
      key (0: no limit).  Each admitted upgrade leaves a *holder* (its engine
      connection, or its transport) in ``holders[key]``; a key at the limit
      drops the holders that are over (:func:`_gone`) before it refuses, and
      a sweep over every key runs when the holders recorded since the last
      one reach twice the number it kept (amortized O(1) per upgrade), so
      ``holders`` never holds much more than the open connections.
    * ``rate`` / ``burst``: a token bucket per key (0: no limit).  The
      buckets are kept least recently used first and bounded: a bucket that
      has refilled carries nothing and is dropped (checked from the oldest
      on every take, O(1) amortized); past ``table_max`` keys the least
      recently seen one is dropped even if it has not refilled (counted in
      ``evicted``): that address starts again with a full burst.  So a flood
      from more addresses than ``table_max`` within ``burst / rate`` seconds
      weakens the per-address rate for them (the global ``handshake_rate``
      still bounds the total), while memory stays bounded.

    The rate is checked first (every attempt takes a token, admitted or not),
    then the count.  Refusals are counted in ``refused``.
    """

    def __init__(self, max_connections: int = 0, rate: float = 0.0, burst: float | None = None,
                 retry_after: float = 5.0, table_max: int = RATE_TABLE_MAX,
                 clock=time.monotonic) -> None:
        self.max_connections = int(max_connections or 0)
        self.rate = float(rate or 0.0)
        self.burst = float(burst) if burst else max(1.0, self.rate)
        self.retry_after = retry_after      # base of the Retry-After of a count refusal, seconds
        self.table_max = max(1, int(table_max))
        self._clock = clock
        self.buckets: OrderedDict = OrderedDict()   # key -> [tokens, stamp], oldest first
        self.holders: dict = {}             # key -> [holder, ...] of open connections / upgrades
        self._recorded = 0                  # holders appended since the last sweep (+ those it kept)
        self._sweep_at = 1024
        self.evicted = 0                    # buckets dropped at table_max before they refilled
        self.refused = {"connections_per_ip": 0, "handshake_rate_per_ip": 0}

    @property
    def enabled(self) -> bool:
        return bool(self.max_connections or self.rate > 0)

    def check(self, key, holder):
        """None to admit (``holder`` is then counted for ``key`` until it is
        over), or ``(reason, retry_after_seconds)`` to refuse with 429."""
        if self.rate > 0:
            wait = self._take(key)
            if wait:
                self.refused["handshake_rate_per_ip"] += 1
                return "too many handshakes from this address", _retry(wait)
        limit = self.max_connections
        if limit:
            held = self.holders.get(key)
            if held is None:
                held = self.holders[key] = []
            elif len(held) >= limit:
                held[:] = [h for h in held if not _gone(h)]
                if len(held) >= limit:
                    self.refused["connections_per_ip"] += 1
                    return "too many connections from this address", _retry(self.retry_after)
            held.append(holder)
            self._recorded += 1
            if self._recorded >= self._sweep_at:
                self.sweep()
        return None

    def release(self, key, holder) -> None:
        """``holder`` of ``key`` is over (its connection closed): stop
        counting it now, so nothing of it is kept until a sweep."""
        held = self.holders.get(key)
        if not held:
            return
        try:
            held.remove(holder)
        except ValueError:
            return
        if not held:
            del self.holders[key]

    def replace(self, key, old, new) -> None:
        """The upgrade ``old`` stood for is now the connection ``new`` (the
        ASGI front hands the transport over to an engine connection)."""
        held = self.holders.get(key)
        if held:
            for i, h in enumerate(held):
                if h is old:
                    held[i] = new
                    return

    def open_count(self, key) -> int:
        """Open connections and upgrades in progress of ``key`` (prunes it)."""
        held = self.holders.get(key)
        if not held:
            return 0
        held[:] = [h for h in held if not _gone(h)]
        if not held:
            del self.holders[key]
        return len(held)

    def sweep(self) -> None:
        """Drop every holder that is over, and every key left without one."""
        kept = 0
        for key in list(self.holders):
            held = [h for h in self.holders[key] if not _gone(h)]
            if held:
                self.holders[key] = held
                kept += len(held)
            else:
                del self.holders[key]
        self._recorded = kept
        self._sweep_at = max(1024, 2 * kept)

    def _take(self, key) -> float:
        """0.0 when ``key`` had a token (taken), else the seconds until it has one."""
        now = self._clock()
        buckets = self.buckets
        entry = buckets.get(key)
        if entry is None:
            entry = buckets[key] = [self.burst, now]
        else:
            entry[0] = min(self.burst, entry[0] + (now - entry[1]) * self.rate)
            entry[1] = now
            buckets.move_to_end(key)
        self._expire(now)
        if entry[0] >= 1.0:
            entry[0] -= 1.0
            return 0.0
        return (1.0 - entry[0]) / self.rate

    def _expire(self, now: float) -> None:
        buckets = self.buckets
        refill = self.burst / self.rate        # an untouched bucket is full again after this
        while buckets:
            key, (tokens, stamp) = next(iter(buckets.items()))
            if now - stamp >= refill:
                buckets.popitem(last=False)
            elif len(buckets) > self.table_max:
                buckets.popitem(last=False)
                self.evicted += 1
            else:
                break


def _retry(base: float) -> int:
    """A ``Retry-After`` in whole seconds: ``base`` jittered up to twice it, at least 1."""
    return max(1, math.ceil(jittered(base, base)))
