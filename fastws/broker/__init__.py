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
``redis+sentinel://s:p[,s:p]/svc``  Redis pub/sub on the master Redis Sentinel names,
                                    followed through a failover
                                    (:mod:`fastws.broker.sentinel`)
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
A broker sends each payload in an envelope naming its origin node (magic
``b"FW"``, version, origin; see :mod:`fastws.broker.wire`, which draws every
byte layout of this package). The receiving broker drops messages whose
origin is its own node (pub/sub also delivers to the publisher, and the
origin has already delivered locally), so a node never delivers a message
twice. ``payload`` is opaque bytes to the broker; the bridge's payloads
(room message with opcode and priority, one-connection message, reply) are
in ``wire`` too. No pickle anywhere.

History
-------
A broker that keeps recent messages (``redis+streams://``) also implements
:class:`History` (``history``, ``last_id``, ``set_entry_handler``): test it
with ``isinstance(broker, History)``. :mod:`fastws.resume` builds the
resumable room membership on it.

Modules
-------
``base`` (the contract, the capability), ``wire`` (byte layouts), one module
per backend, ``bridge`` (a node's rooms <-> its broker; presence, which
keeps its own keys in the broker's Redis, is :mod:`fastws.presence`). Each
imports from ``base``/``wire`` and the modules it builds on, never from this
package, so ``fastws.broker`` has no import circle.

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
* ``await start()`` a second time changes nothing (the bridge starts the
  broker it is given unless it runs already).
"""

from __future__ import annotations

import importlib

from ..config import mask_url
from ..errors import BrokerError, BrokerURLError, PublishError, SubscribeError
from .base import Broker, Entry, History, HistoryPage, backoff_delay, new_node_id
from .cluster import ClusterBroker
from .embedded import EmbeddedBroker, parse_unix_url
from .memory import MemoryBroker
from .redis import RedisBroker
from .sentinel import SentinelBroker
from .streams import StreamsBroker
from .wire import MAGIC, VERSION, channel_name, pack_envelope, unpack_envelope

__all__ = [
    "Broker", "History", "Entry", "HistoryPage", "BrokerError", "PublishError", "SubscribeError",
    "create_broker", "BrokerURLError", "BROKER_URL_FORMS", "channel_name", "new_node_id", "backoff_delay",
    "pack_envelope", "unpack_envelope",
    "MAGIC", "VERSION",
]


BROKER_URL_FORMS = ("memory://[name]", "unix:///path.sock", "redis://[user:password@]host:port/db",
                    "rediss://...", "redis+streams://host:port/db[?maxlen=N&block=S&count=N&ttl=S]",
                    "redis+cluster://host:port[,host:port]",
                    "redis+sentinel://sentinel:port[,sentinel:port]/service[/db]", "package.module.Class")


def create_broker(url: str | None = None, **opts) -> Broker:
    """A broker for ``url`` (see the module doc); ``opts`` go to its class
    (``node_id``, ``prefix``, backend-specific knobs).

    Creating a broker parses and checks its whole URL (scheme, host, port,
    database, every option; an unknown option is refused by name with the
    list of the known ones) without connecting, so a front calls this at
    startup and a malformed URL is a :class:`~fastws.errors.BrokerURLError`
    (a :class:`~fastws.errors.ConfigError` and a ``ValueError``) before
    anything listens."""
    url = url or "memory://"
    safe = mask_url(url)
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme == "memory":
        return MemoryBroker(url, **opts)
    if scheme in ("redis", "rediss"):
        return RedisBroker(url, **opts)
    if scheme in ("redis+cluster", "rediss+cluster"):
        return ClusterBroker(url, **opts)
    if scheme in ("redis+streams", "rediss+streams"):
        return StreamsBroker(url, **opts)
    if scheme in ("redis+sentinel", "rediss+sentinel"):
        return SentinelBroker(url, **opts)
    if scheme == "unix":
        return EmbeddedBroker(parse_unix_url(url), **opts)
    if not scheme and "." in url and all(part.isidentifier() for part in url.split(".")):
        mod, _, cls = url.rpartition(".")
        try:
            klass = getattr(importlib.import_module(mod), cls)
        except (ImportError, AttributeError) as exc:
            raise BrokerURLError(safe, f"cannot import {cls} from {mod} ({type(exc).__name__}: {exc})",
                                 "a dotted path to your Broker class, importable from here") from None
        return klass(url, **opts)
    raise BrokerURLError(safe, f"unknown scheme {scheme!r}" if scheme else "not a broker URL",
                         "use " + ", ".join(BROKER_URL_FORMS))
