"""When to try again: exponential backoff with full jitter, and the server's hints.

A client that lost its server must not come back at the same moment as
every other client of that server (a thundering herd), nor hammer a server
that refused it.  :class:`Backoff` computes the delay before each attempt:

* *full jitter*: attempt ``n`` (0-based) waits a uniform random time in
  ``[0, min(cap, base * 2**n)]``, so many clients that lost the server at
  the same instant spread their retries over the whole window;
* after the connection has stayed up ``reset_after`` seconds, the next loss
  starts again from attempt 0 (a short-lived connection keeps backing off);
* ``max_attempts`` failed attempts in a row (None: no limit) and the client
  gives up.

The server's own hints win over the computed delay:

* a close reason ``"... reconnect in 1.7s"`` (what a fastws server sends
  while it restarts, already jittered per connection): wait that long;
* ``Retry-After`` on a 503 or 429 answer to the upgrade (seconds, or an
  HTTP date): wait that long;
* 401 and 403 (refused credentials) are not retried like a lost connection:
  by default the client gives up (``on_refused="raise"``); with
  ``on_refused="backoff"`` it waits ``refused_delay`` (60 s) times the
  backoff factor, so a fleet of clients with a bad token does not become a
  storm.
"""

from __future__ import annotations

import email.utils
import random
import re
import time
from collections.abc import Iterable

__all__ = ["Backoff", "reconnect_hint", "retry_after"]

_HINT = re.compile(r"reconnect in (\d+(?:\.\d+)?)\s*s\b")


def reconnect_hint(reason: str | None) -> float | None:
    """Seconds a close reason asks the client to wait (``"... reconnect in
    1.7s"``), or None."""
    if not reason:
        return None
    m = _HINT.search(reason)
    return float(m.group(1)) if m else None


def retry_after(headers: Iterable[tuple[str, str]] | None, now: float | None = None) -> float | None:
    """Seconds of a ``Retry-After`` header among ``headers`` (``(lower-case
    name, value)`` pairs): delay-seconds or an HTTP date; None when absent
    or unreadable."""
    for name, value in headers or ():
        if name.lower() != "retry-after":
            continue
        value = value.strip()
        if value.isdigit():
            return float(value)
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when is None:
            return None
        now = time.time() if now is None else now
        return max(0.0, when.timestamp() - now)
    return None


class Backoff:
    """Delays between connection attempts (see the module docstring).

    ``base``: the first window (seconds); ``cap``: the largest window;
    ``max_attempts``: failed attempts in a row before giving up (None: never);
    ``reset_after``: seconds a connection must stay up for the next loss to
    start from the first window again; ``rng``: a ``random.Random`` (tests)."""

    def __init__(self, base: float = 0.5, cap: float = 30.0, *, max_attempts: int | None = None,
                 reset_after: float = 10.0, rng: random.Random | None = None) -> None:
        if base <= 0 or cap < base:
            raise ValueError("need 0 < base <= cap")
        if max_attempts is not None and max_attempts < 1:
            raise ValueError("max_attempts must be >= 1 (or None)")
        self.base = float(base)
        self.cap = float(cap)
        self.max_attempts = max_attempts
        self.reset_after = float(reset_after)
        self.attempt = 0                   # failed attempts since the last stable connection
        self._rng = rng or random.Random()
        self._up_since: float | None = None   # monotonic time of the last successful connect

    def window(self, attempt: int | None = None) -> float:
        """The upper bound of attempt ``attempt``'s delay."""
        n = self.attempt if attempt is None else attempt
        factor: int = 2 ** min(n, 60)
        return min(self.cap, self.base * factor)

    def next_delay(self) -> float:
        """The delay before the next attempt (full jitter), counting it."""
        delay = self._rng.uniform(0.0, self.window())
        self.attempt += 1
        return delay

    @property
    def exhausted(self) -> bool:
        """True once ``max_attempts`` attempts in a row have failed."""
        return self.max_attempts is not None and self.attempt >= self.max_attempts

    def connected(self) -> None:
        """A connection was made (the attempt counter resets once it is stable)."""
        self._up_since = time.monotonic()

    def disconnected(self) -> None:
        """The connection was lost: a stable one starts the backoff afresh."""
        if self._up_since is not None and time.monotonic() - self._up_since >= self.reset_after:
            self.attempt = 0
        self._up_since = None
