"""The broker contract (:class:`Broker`), the history capability
(:class:`History`) and what every backend shares.

The contract is described in :mod:`fastws.broker`; the byte layouts are in
:mod:`fastws.broker.wire`.  Backends import from here and from ``wire``,
never from the package itself, so the package has no import circle.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import os
import random
import socket
import uuid
from typing import NamedTuple

from ..errors import PublishError
from .wire import channel_name, pack_envelope, unpack_envelope

log = logging.getLogger("fastws.broker")

__all__ = ["Broker", "History", "Entry", "HistoryPage", "new_node_id", "backoff_delay"]


def new_node_id() -> str:
    """A node id unique across machines and restarts: host-pid-random."""
    host = socket.gethostname().split(".")[0].replace(":", "-")[:20] or "node"
    return f"{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def backoff_delay(attempt: int, lo: float, hi: float) -> float:
    """Exponential backoff with jitter: uniform in [d/2, d], d = lo * 2**attempt <= hi."""
    d = min(hi, lo * (2 ** min(attempt, 30)))
    return random.uniform(d / 2, d)


class Broker(abc.ABC):
    """What a node needs from a broker. Subclasses implement the abstract
    methods; the shared bookkeeping (channels, envelope, echo filter,
    counters, handler) lives here."""

    def __init__(self, *, node_id: str | None = None, prefix: str = "") -> None:
        self.node_id = node_id or new_node_id()   # this node, unique
        self.prefix = prefix                      # channel name prefix (isolation)
        self.state = "disconnected"               # connecting/connected/disconnected/closed
        self._origin = self.node_id.encode()
        if len(self._origin) > 255:
            raise ValueError("node_id is limited to 255 bytes")
        self._handler = None                      # handler(key, payload, origin)
        self._keys: dict = {}                     # channel bytes -> key, what we want
        self.counters = {"publishes": 0, "failures": 0, "reconnects": 0, "received": 0,
                         "echoes_dropped": 0, "stray": 0}
        self.state_listeners: list = []           # callables(state) on every change

    # -- the contract ---------------------------------------------------------

    @abc.abstractmethod
    async def start(self) -> None:
        """Connect (waits a bounded time for the first connection; never
        fails because the backend is down: it keeps retrying).  A second
        call while started returns at once and changes nothing."""

    @abc.abstractmethod
    async def publish(self, key, payload: bytes):
        """Send ``payload`` to the other nodes subscribed to ``key``. Raises
        :class:`PublishError` (and counts a failure) if it could not be sent.
        May return how many nodes (including this one) received it, if known."""

    @abc.abstractmethod
    async def subscribe(self, keys) -> None:
        """Receive messages for every key in ``keys`` (one round trip)."""

    @abc.abstractmethod
    async def unsubscribe(self, keys) -> None:
        """Stop receiving messages for ``keys`` (one round trip)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Disconnect for good; state becomes ``"closed"``."""

    def publish_nowait(self, key, payload: bytes):
        """Publish from synchronous code: sent in call order, a failure is
        counted (and logged at debug) instead of raised. Returns a future."""
        fut = asyncio.ensure_future(self.publish(key, payload))
        fut.add_done_callback(_swallow)
        return fut

    def set_handler(self, handler) -> None:
        """``handler(key, payload: bytes, origin: str)`` for messages from
        other nodes (never for this node's own publishes); None: drop them."""
        self._handler = handler

    @property
    def subscribed(self) -> list:
        """The keys this node is (or will be, once connected) subscribed to."""
        return list(self._keys.values())

    def stats(self) -> dict:
        return dict(self.counters, state=self.state, subscribed=len(self._keys), node_id=self.node_id)

    async def ping(self):
        """Health check: ``(ok, detail)``."""
        return self.state == "connected", self.state

    # -- helpers for subclasses ----------------------------------------------

    def channel(self, key) -> bytes:
        return channel_name(self.prefix, key)

    def _envelope(self, payload: bytes) -> bytes:
        return pack_envelope(self._origin, payload)

    def _set_state(self, state: str) -> None:
        if state != self.state:
            self.state = state
            for cb in self.state_listeners:
                try:
                    cb(state)
                except Exception:  # a listener's bug must not stop the broker
                    log.exception("fastws: broker state listener failed")

    def _fail(self, reason) -> PublishError:
        self.counters["failures"] += 1
        return PublishError(f"broker publish failed ({self.state}): {reason}")

    def _deliver(self, channel: bytes, data: bytes) -> None:
        """A message arrived on ``channel``: unwrap, drop echoes, dispatch."""
        key = self._keys.get(bytes(channel))
        if key is None:              # after an unsubscribe, before its ack
            self.counters["stray"] += 1
            return
        env = unpack_envelope(data)
        if env is None:
            self.counters["stray"] += 1
            return
        origin, payload = env
        if origin == self._origin:
            self.counters["echoes_dropped"] += 1
            return
        self.counters["received"] += 1
        if self._handler is not None:
            try:
                self._handler(key, payload, origin.decode("utf-8", "replace"))
            except Exception:
                log.exception("fastws: broker message handler failed")


def _swallow(fut) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.debug("fastws: broker publish failed: %s", fut.exception())


# -- the history capability ---------------------------------------------------------------

class Entry(NamedTuple):
    """One history entry: its id, the published payload, the origin node."""
    id: str
    payload: bytes
    origin: str


class HistoryPage(list):
    """A list of :class:`Entry`, oldest first. ``complete``: True if no entry
    after ``since_id`` was trimmed, False if some may have been, None if
    unknown (no ``since_id``, no stream)."""
    complete = None


class History(abc.ABC):
    """The capability of a broker that keeps each key's recent messages as
    entries with ids ordered in time (the Redis Streams broker): read them
    back, and see every entry as it is read, the node's own included.

    A broker has it if ``isinstance(broker, History)``; :mod:`fastws.resume`
    (replay to a reconnecting client, stitched to the live stream) needs it.
    Ids are those of :func:`fastws.broker.wire.parse_id`.
    """

    @abc.abstractmethod
    async def history(self, key, since_id=None, count: int = 100) -> HistoryPage:
        """The last ``count`` entries of ``key``, or up to ``count`` entries
        after ``since_id``; oldest first, the node's own included, without
        touching the node's reading position.  ``complete`` on the result
        says, with ``since_id``, whether no entry after it can have been
        trimmed away.  Raises :class:`~fastws.errors.BrokerError` when the
        backend cannot be asked, ValueError for a malformed ``since_id``."""

    @abc.abstractmethod
    def last_id(self, key):
        """The id (str) of the last entry of ``key`` this node has read
        (during a handler call: of the entry being delivered), None if it
        does not read ``key``."""

    @abc.abstractmethod
    def set_entry_handler(self, handler) -> None:
        """``handler(key, entry_id: str, payload: bytes, origin: str)`` for
        every entry of a subscribed key this node reads, in delivery order,
        its own entries included (the plain handler never gets those); it
        runs before the plain handler of the same entry.  None: no calls."""
