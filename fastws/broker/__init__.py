"""Brokers: how nodes (processes, machines) exchange room messages.

One contract, :class:`Broker`, several backends chosen by URL
(:func:`create_broker`):

==================================  ====================================================
``memory://[name]``                 one process (the default): brokers created with
                                    the same name share an in-process bus
``unix:///path.sock``               workers on one machine: the embedded hub the
                                    supervisor runs (:mod:`fastws.broker.embedded`)
``redis://host:port/db``            Redis pub/sub (``rediss://`` for TLS)
``redis+cluster://h:p[,h:p]``       Redis Cluster, sharded pub/sub (SPUBLISH)
``redis+streams://host:port/db``    Redis Streams: capped per-room streams, no loss
                                    over a short outage, history
                                    (:mod:`fastws.broker.streams`; ``rediss+streams://``
                                    for TLS)
``package.module.Class``            your own class, called as ``Class(url, **opts)``
==================================  ====================================================

Keys and channels
-----------------
A *key* is what a node subscribes to:

* a room key, the tuple ``(namespace, name)`` of :mod:`fastws.rooms`;
* a node key, a ``str`` node id (every node subscribes to its own, for
  messages to one connection, see :mod:`fastws.broker.bridge`).

:func:`channel_name` maps a key to one channel name, the same on every
backend: ``fastws:{prefix}:room:{namespace}:{name}`` and
``fastws:{prefix}:node:{node_id}`` (``%`` and ``:`` in the namespace are
%-escaped so the name is unambiguous). ``prefix`` (an option of every
broker) keeps deployments, and tests, apart.

The envelope
------------
A broker sends ``HEADER + origin + payload`` where HEADER is
``struct("!2sBB")``: magic ``b"FW"``, version 1, the length of the origin
node id. The receiving broker drops messages whose origin is its own node
(pub/sub also delivers to the publisher, and the origin has already delivered
locally), so a node never delivers a message twice. ``payload`` is opaque
bytes to the broker; the bridge puts the message kind, text/binary flag and
priority in its first bytes (:mod:`fastws.broker.bridge`). No pickle anywhere.

Semantics every backend passes (``tests/broker/test_contract.py``)
------------------------------------------------------------------
* ``await subscribe(keys)`` returns once the node receives messages for the
  keys (or, while disconnected, once the interest is recorded: it is
  subscribed when the connection comes back). Many keys go in one round trip.
  A key the backend cannot carry or that is not acknowledged while connected
  raises :class:`SubscribeError` naming the failed keys; the other keys of
  the call still apply (one bad key never poisons a batch), and a failed key
  is not kept as subscribed. :mod:`fastws.broker.bridge` retries failures.
* ``await publish(key, payload)`` sends one message; other nodes subscribed
  to ``key`` get ``handler(key, payload, origin)`` once each, in publish
  order per publisher. It raises :class:`PublishError` when the message could
  not be handed to the backend (disconnected, connection lost before the
  reply): the caller counts it; ``stats()["failures"]`` counts it too.
* A node not subscribed to a key receives nothing for it (interest-based).
* ``state``: ``"connecting"``, ``"connected"``, ``"disconnected"`` (retrying
  with backoff), ``"closed"``.
"""

from __future__ import annotations

import abc
import asyncio
import importlib
import logging
import os
import socket
import struct
import uuid

from ..errors import BrokerError, PublishError, SubscribeError

log = logging.getLogger("fastws.broker")

__all__ = [
    "Broker", "BrokerError", "PublishError", "SubscribeError", "create_broker", "channel_name", "new_node_id",
    "pack_envelope", "unpack_envelope",
]

_HEADER = struct.Struct("!2sBB")
MAGIC = b"FW"
VERSION = 1


def new_node_id() -> str:
    """A node id unique across machines and restarts: host-pid-random."""
    host = socket.gethostname().split(".")[0].replace(":", "-")[:20] or "node"
    return f"{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _esc(s: str) -> str:
    return s.replace("%", "%25").replace(":", "%3A")


def channel_name(prefix: str, key) -> bytes:
    """The channel of ``key`` (room tuple or node id str) under ``prefix``."""
    base = f"fastws:{prefix}:" if prefix else "fastws:"
    if isinstance(key, tuple):
        ns, name = key
        return f"{base}room:{_esc(ns)}:{name}".encode()
    if isinstance(key, str):
        return f"{base}node:{key}".encode()
    raise TypeError(f"a broker key is a (namespace, name) tuple or a node id str, not {key!r}")


def pack_envelope(origin: bytes, payload: bytes) -> bytes:
    return _HEADER.pack(MAGIC, VERSION, len(origin)) + origin + payload


def unpack_envelope(data: bytes):
    """``(origin: bytes, payload: bytes)``, or None if ``data`` is no envelope."""
    if len(data) < 4 or data[:2] != MAGIC or data[2] != VERSION:
        return None
    n = data[3]
    return bytes(data[4:4 + n]), bytes(data[4 + n:])


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
        fails because the backend is down: it keeps retrying)."""

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
        other nodes (never for this node's own publishes)."""
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


def create_broker(url: str | None = None, **opts) -> Broker:
    """A broker for ``url`` (see the module doc); ``opts`` go to its class
    (``node_id``, ``prefix``, backend-specific knobs)."""
    url = url or "memory://"
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme == "memory":
        from .memory import MemoryBroker
        return MemoryBroker(url, **opts)
    if scheme in ("redis", "rediss"):
        from .redis import RedisBroker
        return RedisBroker(url, **opts)
    if scheme in ("redis+cluster", "rediss+cluster"):
        from .cluster import ClusterBroker
        return ClusterBroker(url, **opts)
    if scheme in ("redis+streams", "rediss+streams"):
        from .streams import StreamsBroker
        return StreamsBroker(url, **opts)
    if scheme == "unix":
        from .embedded import EmbeddedBroker
        return EmbeddedBroker(url[len("unix://"):], **opts)
    if not scheme and "." in url:
        mod, _, cls = url.rpartition(".")
        try:
            klass = getattr(importlib.import_module(mod), cls)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"broker {url!r}: cannot import {cls} from {mod}: {exc}") from None
        return klass(url, **opts)
    raise ValueError(f"unknown broker URL {url!r}: use memory://, unix:///path.sock, "
                     "redis://host:port/db, rediss://..., redis+cluster://host:port,..., "
                     "redis+streams://host:port/db or a dotted path")
