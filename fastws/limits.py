"""Limits that protect the server: open files, admission and reconnect pacing.

* ``raise_nofile_limit`` lifts the soft open-file limit to the hard one at
  start-up (each connection is one file descriptor);
* ``Admission`` decides, before an upgrade, whether the server takes one more
  connection: ``max_connections`` open at once and a token bucket of
  ``handshake_rate`` handshakes per second (burst ``handshake_burst``), so a
  reconnect storm is answered with cheap 503s instead of taking the process
  down. Every refusal carries a jittered ``Retry-After`` so refused clients
  do not come back in lockstep;
* ``jittered`` spreads a delay (the ``Retry-After`` of a refusal, the
  reconnect hint a draining node sends, see ``fastws.errors.RESTARTING``).
"""

from __future__ import annotations

import logging
import random
import resource
import time

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
