"""Presence: who is in a room across all nodes, kept in Redis with a TTL.

Per room, with a hash tag so a room's keys share a cluster slot:

* ``fastws:{prefix}:presence:{<ns>:<room>}:nodes`` - a sorted set: node id ->
  the time (unix seconds) its entry expires;
* ``fastws:{prefix}:presence:{<ns>:<room>}:node:<node_id>`` - a hash:
  global connection id -> user id (``""`` if none), with ``EXPIRE ttl``.

Each node writes only its own hashes: changes in membership are written by
:meth:`Presence.sync` (a diff against what it last wrote; run every
``sync_interval`` seconds when attached to a node's rooms, or call it), and
every ``ttl / 3`` seconds it rewrites its hashes and refreshes their TTLs
and its expiry scores. A node that crashes stops refreshing: its hashes
expire and readers ignore (and trim) its expired score, so its members
disappear on their own after at most ``ttl`` seconds.

``client`` is a ``redis.asyncio.Redis`` or ``redis.asyncio.RedisCluster``
(:func:`presence_client` makes one from a broker URL; it needs the ``redis``
package, ``pip install "fastws[redis]"``).  Presence knows a node's rooms
only through the public API of :class:`fastws.rooms.Rooms` (``keys()``,
``members()``) and names connections with the ``global_id`` callable it is
given (the node's), so it runs beside any Redis-family broker; the key
layout is in :mod:`fastws.broker.wire`.

A server started with ``--presence`` (and a ``redis://``, ``rediss://``,
``redis+streams://`` or ``redis+cluster://`` broker) runs one per node
(:class:`fastws.node.Node`): ``app.presence`` in a ``fastws.App``,
``GET /presence?room=...`` on the HTTP API.  A connection's user is
``conn.store["user_id"]`` (set it in ``on_connect`` with
``fastws.Accept(store={"user_id": ...})`` or later).
"""

from __future__ import annotations

import asyncio
import logging
import time

from .broker.cluster import parse_cluster_url
from .broker.redis import is_auth_error
from .broker.wire import presence_base
from .config import mask_url

log = logging.getLogger("fastws.broker")

#: the broker URL schemes presence can share a Redis with
REDIS_SCHEMES = ("redis", "rediss", "redis+streams", "rediss+streams", "redis+cluster", "rediss+cluster")
INSTALL_HINT = 'pip install "fastws[redis]"'


def _why(exc) -> str:
    """``exc`` for a log line: "authentication failed" when Redis refused the
    password (told apart from an outage), any URL's password masked."""
    text = mask_url(f"{type(exc).__name__}: {exc}")
    return f"authentication failed ({text})" if is_auth_error(exc) else text


def presence_client(url: str):
    """A ``redis.asyncio`` client for a broker URL (redis://, rediss://,
    redis+streams://, redis+cluster://h:p,...).  ImportError naming the
    extra to install when the ``redis`` package is missing."""
    try:
        import redis.asyncio as aioredis
        from redis.asyncio.cluster import ClusterNode, RedisCluster
    except ImportError:
        raise ImportError(f"presence needs the redis package: {INSTALL_HINT}") from None

    if "+cluster://" in url:
        seeds, opts = parse_cluster_url(url)
        return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in seeds],
                            password=opts["password"], username=opts["username"],
                            ssl=opts["ssl"] is not None)
    # same server, plain client: drop the scheme's broker part and the
    # broker's own ?options (they are not redis-py's)
    return aioredis.from_url(url.replace("+streams://", "://", 1).split("?", 1)[0])


class Presence:
    """Who is in which room on every node (see the module docstring):
    :meth:`attach` a node's rooms, :meth:`start` the periodic sync,
    :meth:`close` on shutdown; :meth:`count`, :meth:`members` and
    :meth:`users` answer for any room from any node."""

    def __init__(self, client, node_id: str, *, prefix: str = "", ttl: float = 30.0,
                 sync_interval: float = 1.0) -> None:
        self.client = client              # redis.asyncio client
        self.node_id = node_id
        self.prefix = prefix
        self.ttl = ttl                    # seconds a node's entries live without refresh
        self.sync_interval = sync_interval
        self._written: dict = {}          # key -> {gid: user} as last written to Redis
        self._source = None               # () -> {key: {gid: user}}: this node's truth
        self._task = None
        self._last_refresh = 0.0

    def _base(self, key) -> str:
        return presence_base(self.prefix, key)

    def _node_key(self, key, node=None) -> str:
        return f"{self._base(key)}:node:{node or self.node_id}"

    # -- this node's side ------------------------------------------------------------

    def attach(self, rooms, global_id, user_of=None) -> None:
        """Track ``rooms`` (a node's registry): ``global_id(conn)`` names its
        connections, ``user_of(conn)`` their user (default
        ``conn.store.get("user_id")``)."""
        user_of = user_of or (lambda conn: (conn.store.get("user_id") if conn.store is not None else None))

        def snapshot():
            return {key: {global_id(c): str(user_of(c) or "") for c in rooms.members(key[1], key[0])}
                    for key in rooms.keys()}  # noqa: SIM118 (Rooms is no dict: keys() is all it has)

        self._source = snapshot

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.sync_interval)
            try:
                await self.sync()
            except Exception as exc:   # Redis down: try again next time
                log.warning("fastws: presence sync failed: %s", _why(exc))

    async def sync(self, force_refresh: bool = False) -> None:
        """Write what changed since the last sync; refresh TTLs every ttl/3."""
        if self._source is None:
            return
        now_state = self._source()
        now = time.time()
        refresh = force_refresh or now - self._last_refresh >= self.ttl / 3
        expires = now + self.ttl
        ms = int(self.ttl * 1000)
        pipe = self.client.pipeline(transaction=False)
        n = 0
        for key, members in now_state.items():
            old = self._written.get(key)
            if old == members and not refresh:
                continue
            hk = self._node_key(key)
            gone = [g for g in (old or ()) if g not in members]
            if gone:
                pipe.hdel(hk, *gone)
            # a refresh rewrites the whole hash: it may have expired meanwhile
            added = members if refresh else {g: u for g, u in members.items() if (old or {}).get(g) != u}
            if added:
                pipe.hset(hk, mapping=added)
            pipe.pexpire(hk, ms)
            pipe.zadd(self._base(key) + ":nodes", {self.node_id: expires})
            n += 1
        for key in [k for k in self._written if k not in now_state]:
            pipe.delete(self._node_key(key))
            pipe.zrem(self._base(key) + ":nodes", self.node_id)
            n += 1
        if n:
            await pipe.execute()
        self._written = now_state
        if refresh:
            self._last_refresh = now

    async def close(self) -> None:
        """Stop and remove this node's entries at once (a clean shutdown)."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        if self._written:
            pipe = self.client.pipeline(transaction=False)
            for key in self._written:
                pipe.delete(self._node_key(key))
                pipe.zrem(self._base(key) + ":nodes", self.node_id)
            try:
                await pipe.execute()
            except Exception as exc:
                log.warning("fastws: presence cleanup failed: %s", _why(exc))
        self._written = {}

    # -- queries (any node) ----------------------------------------------------------

    async def _live_nodes(self, key) -> list:
        zkey = self._base(key) + ":nodes"
        now = time.time()
        nodes = await self.client.zrangebyscore(zkey, now, "+inf")
        await self.client.zremrangebyscore(zkey, "-inf", now)   # trim crashed nodes
        return [n.decode() if isinstance(n, bytes) else n for n in nodes]

    async def members(self, room: str, namespace: str = "") -> dict:
        """``{global connection id: user id or ""}`` of ``room`` on every live node."""
        key = (namespace, room)
        nodes = await self._live_nodes(key)
        if not nodes:
            return {}
        pipe = self.client.pipeline(transaction=False)
        for node in nodes:
            pipe.hgetall(self._node_key(key, node))
        out = {}
        for h in await pipe.execute():
            for g, u in h.items():
                out[g.decode() if isinstance(g, bytes) else g] = u.decode() if isinstance(u, bytes) else u
        return out

    async def count(self, room: str, namespace: str = "") -> int:
        key = (namespace, room)
        nodes = await self._live_nodes(key)
        if not nodes:
            return 0
        pipe = self.client.pipeline(transaction=False)
        for node in nodes:
            pipe.hlen(self._node_key(key, node))
        return sum(await pipe.execute())

    async def users(self, room: str, namespace: str = "") -> set:
        """The distinct user ids in ``room`` (connections without one left out)."""
        return {u for u in (await self.members(room, namespace)).values() if u}
