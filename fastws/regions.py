"""Regions: users in several regions reach each other; each region runs alone.

A *region* is a group of nodes sharing one Redis (their broker, ``redis://``,
``rediss://``, ``redis+sentinel://`` for a Redis that Sentinel fails over:
every link of this module then asks the Sentinels for the master, again after
each lost connection; or ``redis+cluster://``, see "On a Redis Cluster").
Every region has its own Redis: nothing on the message path is shared
between regions.  A node is told its region (``region``) and
the other regions with the address of their Redis (``region_peers``).

Users and the directory
-----------------------
``app.bind_user(conn, user_id)`` (or ``fastws.Accept(user=user_id)`` from
``on_connect``) puts the connection in the user's room
(namespace :data:`USER_NAMESPACE`, name ``user_id``): a message for the user
is a publish to that room, so every connection of the user on every node of
the region gets it through the region's broker.  The first local connection
of a user registers it in the region's *directory*, in the region's own
Redis::

    fastws:{prefix}:region:{region}:user:{user_id}   sorted set: node id -> expiry (unix ms)

with a TTL of ``region_directory_ttl``; the node rewrites its entries every
third of it while the user is connected, and removes its node from the set
when the user's last local connection closes.  A crashed node stops
refreshing: its users vanish from the directory after the TTL.

A region knows only its own users.  To find a user, a node asks its own
region's directory and, in parallel, every other region's (one command
each); the answer (the set of regions holding the user) is cached for
:data:`CACHE_TTL` seconds, so routing does not ask Redis per message.  A
bind or unbind is announced on the region's channel
``fastws:{prefix}:region:{region}:directory``, and every node of the region
drops its cached answer for that user at once.  A cached answer about
another region may be stale for up to :data:`CACHE_TTL`: a message sent to
a region the user has left is forwarded once more by that region to where
its directory lookup finds the user now (at most one such extra hop, marked
in the message, so nothing loops).

Crossing a region boundary
--------------------------
A message for another region (a room publish goes to every other region; a
message for a user to the regions holding the user) is first appended, in
call order, to this region's *outbox* for that region, in its own Redis,
one entry per message::

    fastws:{prefix}:region:{region}:out:{peer}      stream

A node's writer takes whatever its node queued meanwhile (up to
:data:`WRITE_BATCH` writes) and appends it in one script per outbox; it
sends the next batch once Redis answered the last, so a message handed over
while the link is idle goes out at once, and only what accumulated during a
round trip waits for the next one.  Each message a node queues for a region
gets the next *write number* of that node for that region, and the script
appends only the messages numbered above the last it appended for the node
(kept in ``fastws:{prefix}:region:{region}:wrote:{node}:{peer}`` for a day
after the node's last append): a write whose answer was lost (a timeout) is
sent again and appends nothing twice.

One node of the region (whichever holds the lease
``fastws:{prefix}:region:{region}:lease:out:{peer}``; any other takes over
when it stops) reads the outbox in order (up to :data:`BATCH` entries at a
time, a blocking ``XREAD`` that answers as soon as there is one) and appends
what it read as *one* entry to the peer's inbound stream in the peer's
Redis::

    fastws:{prefix}:messages:{peer}                 stream

one ``XADD`` per batch and target region, whatever the number of messages,
nodes and members there.  Batches go out back to back on one connection (up
to :data:`WINDOW` batches not answered yet), so a link with a long round
trip is not idle while it waits for answers, and the peer gets them in
order.  The outbox entry's id is the message's *per-origin sequence* (it
grows with every entry of that outbox); it travels with the message.  Only
once the peer's Redis has taken a batch does it leave the outbox (one
``XTRIM MINID`` past its last entry), so a crash between the two sends it
again: the hop is at-least-once.

The format (both ends are this module; ``record`` and ``pack_batch`` below):

* a *record* (one message): ``!cBHHI`` kind (``r`` room, ``u`` user), hop
  (1: already sent on once), the lengths of the namespace, the target (room
  or user) and the payload; then the three (the payload is the broker's
  ROOM payload: opcode, priority, body);
* an outbox entry: the field ``m`` = one record;
* an inbound entry: ``o`` = the origin region, ``b`` = the batch: per
  message ``!QQI`` its sequence (the outbox id's milliseconds and sequence
  number) and the record's length, then the record.

The reader still takes the former format, one message per entry (outbox:
``k n t p h``; inbound: ``o s k n t p h``), so entries queued by an older
version are delivered after an upgrade.

While a peer region cannot be reached, its outbox grows, bounded by
``region_queue_max`` messages and ``region_queue_age`` seconds: the oldest
entries past either bound are trimmed and counted
(``fastws_region_dropped_total{peer,reason="length"|"age"}`` in
``/metrics``, ``dropped`` in ``/regions``; a warning is logged).  When the
peer comes back, the outbox drains in order.  A peer whose inbound stream
holds more than ``max(WINDOW, region_queue_max / BATCH)`` batches (its nodes
are not consuming) is treated the same way: its messages wait in the outbox.

Receiving
---------
One node of a region reads its inbound stream at a time, the holder of the
lease ``fastws:{prefix}:region:{region}:lease:in``.  It reads the oldest
entries (up to :data:`READ_COUNT`; a delivered entry is deleted, so what is
there is what is not delivered yet) with a blocking ``XREAD`` that answers
as soon as an entry comes, and delivers them (in scripts of about
:data:`APPLY_BYTES` each) with a Lua script on
the region's Redis that first checks the lease (a node that lost it
delivers nothing): it publishes each message on its room's channel of the
region's broker (so every node of the region delivers it to its local
members, as if it had been published there), records the last sequence
applied per origin (``fastws:{prefix}:region:{region}:applied``, a hash
origin -> sequence) and deletes the entries.  A message whose sequence is
not above the last applied from its origin is a copy sent again (a whole
batch sent twice, or batches that overlap): it is counted
(``fastws_region_inbound_total{outcome="duplicates"}``), not delivered.
An entry that is no batch this module wrote (its lengths do not add up) is
deleted, logged and counted as undeliverable.
When the reader stops, another node takes the lease, reads the applied
sequences and delivers what is left in the stream, from its oldest entry.
So a member gets each message once, and per room the messages of one origin
region in the order that region published them.  Nothing received is
forwarded again, except a user message for a user who is no longer in this
region (see above).

Faults
------
* A peer region unreachable: its messages queue in the outbox (bounded, see
  above); ``/regions`` shows it ``unreachable`` and its queue.
* This region's Redis down: ``/health`` says 503 (check ``region``);
  messages for other regions wait in this node's memory (at most
  ``max(region_queue_max, 100000)`` writes, the oldest past it dropped and
  counted with ``reason="local"``) until the Redis is back.  The other regions keep
  serving their users and queue for this one.
* This region's Redis restarted empty: the directory is rewritten by the
  next refresh (and what the stream and the outboxes held is lost with it).
  Once this region's Redis is back after an outage, the reader waits
  :data:`READ_SETTLE` seconds before it delivers again, so that every node's
  broker has subscribed again (the broker's pub/sub reaches only the nodes
  subscribed at the time of a publish).
* The reader's node stops: its lease expires after :data:`LEASE_TTL`
  seconds, another node of the region takes over (see Receiving).

On a Redis Cluster
------------------
A region whose Redis is a Redis Cluster (``redis+cluster://``, its nodes'
broker too) keeps the keys of its link in one slot, that of ``{region}``::

    fastws:{prefix}:region:{{region}}:out:{peer}, ...:lease:..., ...:applied, ...:wrote:...
    fastws:{prefix}:messages:{{region}}

so the scripts above (append, deliver) run whole on the master that owns
that slot, and this module's connections for them go to that master (asked
again, with ``CLUSTER SLOTS``, after each failure: a failover moves the
slot to the promoted replica).  The directory's keys are not in that slot:
each user's entry is on the master of its own slot.  The reader's script
cannot publish to the room channels of the cluster broker (they are
sharded, on other masters), so it publishes every message of the script,
as a record with its room, on one channel of the link's master,
``fastws:{prefix}:region:{{region}}:deliver``; every node of the region is
subscribed there (classic pub/sub, on that master) and delivers each one to
its own members (``deliver_here``).  A node that lost that subscription is a
node whose link's master is gone: the reader cannot deliver either until the
slot has a master again, and then waits :data:`READ_SETTLE` seconds, so
every node has subscribed again before anything is delivered.

This module speaks to Redis with ``redis.asyncio`` (``pip install
"fastws[redis]"``) for the directory, the outbox bounds and the watch, and
with the broker's own RESP connection (:class:`fastws.broker.redis.RespConn`)
for what is on the path of every message: the ordered appends to the
outbox, the forwarder's reads and trims, the batches it moves to another
region, and the reader's reads and deliveries.
A ``RespConn`` writes the commands of a loop iteration together and matches the answers in order,
so many batches can be in flight on one connection (``redis.asyncio`` would
spread concurrent pipelines over its pool's connections, and their order with
them), and it costs the node less CPU per message (see ``python -m
fastws.bench.regions``).
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from .broker.cluster import is_cluster_url, open_owner, parse_cluster_url
from .broker.redis import RespConn
from .broker.sentinel import is_sentinel_url, open_url, parse_sentinel_url
from .broker.wire import channel_name, id_after, pack_envelope, pack_room_message
from .config import Config, mask_url, parse_region_peers
from .frames import PRIORITY_NORMAL

log = logging.getLogger("fastws.regions")

#: the namespace of the users' rooms (a user's connections on a node); a
#: namespace starting with NUL is fastws's own: ``Rooms.rooms_of`` and
#: ``Rooms.names()`` leave it out
USER_NAMESPACE = "\x00user"
#: seconds a node keeps the answer to "where is this user?"
CACHE_TTL = 2.0
#: seconds a node keeps that answer when a region could not be asked
CACHE_TTL_PARTIAL = 0.5
#: seconds a lease lives without a refresh (a stopped holder is replaced after it)
LEASE_TTL = 3.0
#: messages moved per batch: outbox entries the forwarder reads and packs into
#: one entry of the peer's inbound stream
BATCH = 1024
#: inbound entries (each up to BATCH messages) the reader reads at a time
READ_COUNT = 64
#: bytes of entries the reader delivers in one script, about (a script holds
#: its Redis while it runs: a backlog goes out in several)
APPLY_BYTES = 256 * 1024
#: writes taken from this node's queue per round trip to its Redis
WRITE_BATCH = 4096
#: batches sent to a peer region and not answered yet, at most
WINDOW = 64
#: seconds to wait for one Redis command of a peer region
PEER_TIMEOUT = 2.0
#: writes to this region's Redis a node keeps in memory at least while it is down
#: (more with a larger region_queue_max)
BUFFER_MIN = 100_000
#: seconds between two looks at the peers' state (PING, queue lengths)
WATCH_INTERVAL = 1.0
#: seconds the reader waits, once this region's Redis is back after an outage,
#: before it delivers again: every node's broker has then subscribed again
#: (its reconnect backoff is at most 5 s), so no member misses what follows
READ_SETTLE = 6.0
INSTALL_HINT = 'pip install "fastws[redis]"'

#: one message: kind (b"r" room, b"u" user), hop (1: sent on once already),
#: lengths of the namespace, the target (room or user) and the payload; then
#: the three
_REC = struct.Struct("!cBHHI")
#: one message in an inbound batch: its per-origin sequence (the outbox
#: entry's id, ms and seq) and the length of its record; then the record
_ITEM = struct.Struct("!QQI")

#: the writer's append of messages to one outbox, one entry each, at most
#: once: KEYS[1] the outbox, KEYS[2] the last write number of this node to
#: it; ARGV[1] the write number of the first record, ARGV[2] how long (ms)
#: Redis keeps KEYS[2], then the records, in order, numbered from ARGV[1]
#: on.  A record whose number is not above KEYS[2] was appended already (an
#: append whose answer was lost, sent again): it is skipped.
_APPEND = """
local first = tonumber(ARGV[1])
local last = tonumber(redis.call('get', KEYS[2]) or '0')
local n = 0
for i = 3, #ARGV do
  if first + i - 3 > last then
    redis.call('xadd', KEYS[1], '*', 'm', ARGV[i]); n = n + 1
  end
end
local top = first + #ARGV - 3
if top < last then top = last end
redis.call('set', KEYS[2], top, 'PX', ARGV[2])
return n
"""
#: ms Redis keeps a node's last write number to an outbox after its last
#: append (a retry comes within seconds; a day covers a long outage)
WROTE_TTL_MS = 24 * 3600 * 1000

#: the reader's delivery of one batch, only while it holds the lease: Q channel
#: n payload*n (publish each), X outbox record (send on to the user's region),
#: A origin seq (last applied), I id (delete from the inbound stream)
_APPLY = """
if redis.call('get', KEYS[1]) ~= ARGV[1] then return 0 end
local ids = {}
local i = 2
while i <= #ARGV do
  local op = ARGV[i]
  if op == 'Q' then
    local ch, n = ARGV[i + 1], tonumber(ARGV[i + 2])
    for j = i + 3, i + 2 + n do redis.call('publish', ch, ARGV[j]) end
    i = i + 3 + n
  elseif op == 'X' then
    redis.call('xadd', ARGV[i + 1], '*', 'm', ARGV[i + 2]); i = i + 3
  elseif op == 'A' then
    redis.call('hset', KEYS[2], ARGV[i + 1], ARGV[i + 2]); i = i + 3
  else
    ids[#ids + 1] = ARGV[i + 1]; i = i + 2
  end
end
if #ids > 0 then
  redis.call('xdel', KEYS[3], unpack(ids))
end
return 1
"""

_LEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  redis.call('pexpire', KEYS[1], ARGV[2]) return 1
end
if redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 0
"""


def record(kind: bytes, hop: int, namespace: bytes, target: bytes, payload: bytes) -> bytes:
    """One message as it is queued and sent (see the module docstring)."""
    return _REC.pack(kind, hop, len(namespace), len(target), len(payload)) + namespace + target + payload


def parse_record(rec: bytes) -> tuple[bytes, int, bytes, bytes, bytes]:
    """``(kind, hop, namespace, target, payload)`` of a :func:`record`."""
    kind, hop, nl, tl, pl = _REC.unpack_from(rec)
    a = _REC.size
    b = a + nl
    c = b + tl
    if c + pl != len(rec):
        raise ValueError(f"a record of {len(rec)} bytes says {c + pl}")
    return kind, hop, rec[a:b], rec[b:c], rec[c:]


def _old_record(flat: list[Any]) -> bytes:
    """The record of an entry in the former format, one message as fields
    ``k n t p h`` (besides ``o s`` in an inbound entry)."""
    f = dict(zip(flat[::2], flat[1::2], strict=False))
    return record(b"u" if f.get(b"k") == b"u" else b"r", 1 if f.get(b"h") == b"1" else 0,
                  f.get(b"n", b""), f.get(b"t", b""), f.get(b"p", b""))


def pack_batch(entries: list[Any]) -> bytes:
    """Outbox entries ``[(id, fields)]`` as the ``b`` field of one inbound entry."""
    parts = []
    pack = _ITEM.pack
    for eid, flat in entries:
        rec = flat[1] if len(flat) == 2 and flat[0] == b"m" else _old_record(flat)
        ms, _, n = eid.partition(b"-")
        parts.append(pack(int(ms), int(n or 0), len(rec)))
        parts.append(rec)
    return b"".join(parts)


def unpack_batch(blob: bytes) -> list[tuple[tuple[int, int], bytes]]:
    """``[((ms, seq), record)]`` of a :func:`pack_batch` field."""
    out = []
    pos, end, size = 0, len(blob), _ITEM.size
    unpack = _ITEM.unpack_from
    while pos < end:
        ms, n, ln = unpack(blob, pos)
        pos += size
        out.append(((ms, n), blob[pos:pos + ln]))
        pos += ln
    if pos != end:
        raise ValueError(f"a batch of {end} bytes ends at {pos}")
    return out


def inbound_messages(flat: list[Any]) -> tuple[str, list[tuple[tuple[int, int], bytes]]]:
    """``(origin, [((ms, seq), record)])`` of one inbound entry, in either
    format: ``o b`` (a batch) or ``o s k n t p h`` (one message, former)."""
    f = dict(zip(flat[::2], flat[1::2], strict=False))
    origin = _text(f.get(b"o", b""))
    if b"b" in f:
        return origin, unpack_batch(f[b"b"])
    return origin, [(_seq(f.get(b"s", b"0-0")), _old_record(flat))]


def _seq(eid: Any) -> tuple[int, int]:
    """A stream id ("ms-n", str or bytes) as a comparable tuple."""
    text = eid.decode() if isinstance(eid, bytes) else str(eid)
    ms, _, n = text.partition("-")
    return int(ms), int(n or 0)


def _text(v: Any) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)


def redis_client(url: str, timeout: float) -> Any:
    """A ``redis.asyncio`` client for ``url`` that fails fast (no retries:
    the callers retry, and tell an unreachable region apart)."""
    try:
        import redis.asyncio as aioredis
        from redis.asyncio.sentinel import Sentinel
        from redis.backoff import NoBackoff
        from redis.retry import Retry
    except ImportError:
        raise ImportError(f"regions need the redis package: {INSTALL_HINT}") from None
    if is_cluster_url(url):
        # every command sent to the master of its key's slot (redis-py's
        # RedisCluster, which reads the slot map again after a failover)
        from redis.asyncio.cluster import ClusterNode, RedisCluster
        seeds, o = parse_cluster_url(url)
        tls: dict[str, Any] = {}
        if o["ssl"] is not None:
            tls = {"ssl": True, "ssl_cert_reqs": o["ssl"].verify_mode,
                   "ssl_check_hostname": o["ssl"].check_hostname}
        return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in seeds], username=o.get("username"),
                            password=o.get("password"), socket_timeout=timeout, socket_connect_timeout=timeout,
                            **tls)
    if is_sentinel_url(url):
        # the master its Sentinels name, asked again when a connection fails
        # (redis-py's Sentinel client): the region follows a failover
        sentinels, service, o = parse_sentinel_url(url)
        sentinel = Sentinel(sentinels, socket_timeout=timeout, socket_connect_timeout=timeout,  # type: ignore[no-untyped-call]
                            sentinel_kwargs={"password": o["sentinel_password"], "socket_timeout": timeout,
                                             "socket_connect_timeout": timeout})
        return sentinel.master_for(service, db=o["db"], username=o["username"], password=o["password"],
                                   socket_timeout=timeout, socket_connect_timeout=timeout,
                                   retry=Retry(NoBackoff(), 0), health_check_interval=0)
    return aioredis.from_url(url.split("?", 1)[0], socket_timeout=timeout, socket_connect_timeout=timeout,
                             retry=Retry(NoBackoff(), 0), health_check_interval=0)


async def _answer(fut: asyncio.Future[Any], timeout: float) -> Any:
    """The answer to one command sent on a :class:`RespConn` (an error
    answer raised)."""
    r = await asyncio.wait_for(fut, timeout)
    if isinstance(r, Exception):
        raise r
    return r


async def _answers(futs: list[asyncio.Future[Any]], timeout: float) -> list[Any]:
    """The answers to a pipeline sent on a :class:`RespConn` (the first error
    answer raised)."""
    replies = await asyncio.wait_for(asyncio.gather(*futs), timeout)
    for r in replies:
        if isinstance(r, Exception):
            raise r
    return replies


class _PeerDown(Exception):
    """The peer region's Redis failed (not this region's)."""


class Peer:
    """What this node knows of another region."""

    def __init__(self, name: str, url: str) -> None:
        self.name = name
        self.url = url
        self.cluster = is_cluster_url(url)   # its Redis is a Redis Cluster
        self.client: Any = None           # redis.asyncio client of its Redis
        self.up: bool | None = None       # last PING answered (None: not asked yet)
        self.problem = ""                 # why it is not up
        self.queued = 0                   # entries in our outbox for it (last look)
        self.backlogged = False           # its inbound stream is over region_queue_max
        self.forwarded = 0                # entries this node moved to it
        self.dropped = {"length": 0, "age": 0, "local": 0}   # counted by this node
        self.forwarding = False           # this node holds the outbox lease
        self.conn: RespConn | None = None  # this node's link to its Redis, while it forwards

    def state(self) -> str:
        if self.up is None:
            return "unknown"
        if not self.up:
            return "unreachable"
        return "backlogged" if self.backlogged else "up"


class Regions:
    """One node's part in the regions (see the module docstring).

    ``publish_local(namespace, room, message, priority)`` delivers to the
    region (this node's members and, through the broker, the other nodes'),
    without forwarding to other regions."""

    def __init__(self, config: Config, node_id: str,
                 publish_local: Callable[[str, str, Any, int], object],
                 deliver_here: Callable[[str, str, bytes], object] | None = None) -> None:
        self.region = config.region
        self.node_id = node_id
        self.prefix = config.broker_prefix
        self.local_url = config.broker
        #: this region's Redis is a Redis Cluster (see "On a Redis Cluster")
        self.cluster = is_cluster_url(config.broker)
        #: deliver_here(namespace, room, room payload): to this node's members
        #: only (what the region's reader sends to every node on a cluster)
        self.deliver_here = deliver_here
        if self.cluster and deliver_here is None:
            raise ValueError("regions on a Redis Cluster need deliver_here")
        self.queue_max = config.region_queue_max
        self.queue_age = config.region_queue_age
        #: entries (batches of up to BATCH messages) in a peer's inbound stream past
        #: which it counts as not consuming (backlogged)
        self.inbound_max = max(WINDOW, self.queue_max // BATCH)
        self.directory_ttl = config.region_directory_ttl
        self.publish_local = publish_local
        self.peers = {name: Peer(name, url) for name, url in parse_region_peers(config.region_peers).items()
                      if name != self.region}
        for peer in self.peers.values():
            if is_sentinel_url(peer.url):
                parse_sentinel_url(peer.url)    # checked whole at startup (BrokerURLError names the part)
            elif peer.cluster:
                parse_cluster_url(peer.url)
        self.local: Any = None                  # redis.asyncio client of this region's Redis
        self.local_up = False
        self.local_problem = "not started"
        self._local_since = 0.0                 # monotonic time local_up last became True
        self._outage = False                    # this region's Redis was down since this node started
        self.users: set[str] = set()            # users with a connection on this node
        self._cache: dict[str, tuple[float, frozenset[str], frozenset[str]]] = {}
        self._ops: deque[tuple[str, str, Any]] = deque()   # ordered writes to the local Redis
        self._ops_dropped = 0     # writes dropped from the front of _ops when it was full, ever
        #: per peer: the write number of the last message queued for it (its
        #: messages in _ops are numbered one after another, oldest first)
        self._numbered: dict[str, int] = {}
        self._conns: dict[str, RespConn] = {}   # this node's own links to its Redis, by use
        #: writes kept in memory while this region's Redis does not take them
        self.buffer_max = max(self.queue_max, BUFFER_MIN)
        self._buffer_full_logged = False
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._scripts: dict[str, Any] = {}
        self._applied: dict[str, tuple[int, int]] = {}
        self._channels: dict[tuple[bytes, bytes], bytes] = {}
        self._reading = False                   # this node holds the inbound lease
        self._subscribed = False                # on a cluster: to the delivery channel
        self._closing = False
        self.counters = {"received": 0, "duplicates": 0, "redirected": 0, "undeliverable": 0,
                         "lookups_cached": 0, "lookups_asked": 0}
        self.received_from: dict[str, int] = {}

    # -- keys ------------------------------------------------------------------------

    def _key(self, region: str, tail: str) -> str:
        base = f"fastws:{self.prefix}:" if self.prefix else "fastws:"
        return f"{base}region:{region}:{tail}"

    def _on_cluster(self, region: str) -> bool:
        if region == self.region:
            return self.cluster
        peer = self.peers.get(region)
        return peer is not None and peer.cluster

    def link_key(self, region: str, tail: str) -> str:
        """A key of ``region``'s link (outboxes, leases, sequences): on a
        Redis Cluster all of them in one slot, that of ``{region}``."""
        if self._on_cluster(region):
            base = f"fastws:{self.prefix}:" if self.prefix else "fastws:"
            return f"{base}region:{{{region}}}:{tail}"
        return self._key(region, tail)

    def user_key(self, region: str, user: str) -> str:
        return self._key(region, "user:" + user)

    def outbox_key(self, peer: str) -> str:
        return self.link_key(self.region, "out:" + peer)

    def inbound_key(self, region: str) -> str:
        base = f"fastws:{self.prefix}:" if self.prefix else "fastws:"
        if self._on_cluster(region):
            return f"{base}messages:{{{region}}}"
        return f"{base}messages:{region}"

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Connect (lazily: a Redis that is down is retried, never fatal) and
        start the writer, the forwarders, the reader and the watcher."""
        self.local = redis_client(self.local_url, 5.0)
        # EVALSHA, the script itself only when Redis does not know it (again)
        self._scripts = {name: self.local.register_script(text)
                         for name, text in (("lease", _LEASE),)}
        for p in self.peers.values():
            p.client = redis_client(p.url, PEER_TIMEOUT)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._writer()), loop.create_task(self._reader()),
                       loop.create_task(self._watch()), loop.create_task(self._refresher()),
                       loop.create_task(self._invalidations())]
        self._tasks += [loop.create_task(self._forwarder(p)) for p in self.peers.values()]
        if self.cluster:
            self._tasks.append(loop.create_task(self._deliveries()))
        log.info("fastws: region %s, peers %s", self.region,
                 ", ".join(f"{p.name}={mask_url(p.url)}" for p in self.peers.values()) or "none")

    async def close(self) -> None:
        # the unbinds of the connections just closed go out first (a second at most)
        deadline = time.monotonic() + 1.0
        while self._ops and self.local_up and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        self._closing = True
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):
                pass
        self._tasks = []
        if self.users and self.local is not None:
            try:
                pipe = self.local.pipeline(transaction=False)
                for user in self.users:
                    pipe.zrem(self.user_key(self.region, user), self.node_id)
                await asyncio.wait_for(pipe.execute(), 2.0)
            except Exception as exc:
                log.warning("fastws: region directory cleanup failed: %s", mask_url(str(exc)))
        for conn in self._conns.values():
            conn.close()
        for p in self.peers.values():
            self._drop_conn(p)
        for client in [self.local, *(p.client for p in self.peers.values())]:
            if client is not None:
                try:
                    await client.aclose()
                except Exception:   # closing a client whose Redis is gone
                    pass

    # -- users (the rooms' listener) ------------------------------------------------------

    def on_room(self, key: tuple[str, str], joined: bool) -> None:
        """``Rooms.listeners``: a user room gained its first or lost its last
        local member: the user is bound here, or no longer."""
        if key[0] != USER_NAMESPACE:
            return
        user = key[1]
        if joined:
            self.users.add(user)
            self._push("bind", user, None)
        else:
            self.users.discard(user)
            self._push("unbind", user, None)
        self._cache.pop(user, None)

    # -- sending --------------------------------------------------------------------------

    def forward_room(self, namespace: str, room: str, message: str | bytes, priority: int = PRIORITY_NORMAL) -> None:
        """Hand a room publish to every other region (call order kept)."""
        if not self.peers or namespace == USER_NAMESPACE:
            return
        rec = record(b"r", 0, namespace.encode(), room.encode(), pack_room_message(message, priority))
        for name in self.peers:
            self._push("xadd", name, rec)

    async def send_to_user(self, user: str, message: str | bytes, priority: int = PRIORITY_NORMAL) -> list[str]:
        """Send ``message`` to every connection of ``user`` in every region;
        the regions it was handed to (this one first when the user is here).
        A region that could not be asked gets it too when no region that
        answered holds the user (it is dropped there if the user is not
        there either, counted as undeliverable)."""
        found, unknown = await self.locate(user)
        if user in self.users:          # here, whatever this region's Redis says
            found |= {self.region}
        out: list[str] = []
        if self.region in found:
            self.publish_local(USER_NAMESPACE, user, message, priority)
            out.append(self.region)
        targets = sorted(r for r in found if r != self.region)
        if not found:
            targets = sorted(unknown)
        rec = record(b"u", 0, b"", user.encode(), pack_room_message(message, priority))
        for name in targets:
            self._push("xadd", name, rec)
            out.append(name)
        return out

    async def locate(self, user: str, *, cached: bool = True) -> tuple[frozenset[str], frozenset[str]]:
        """``(regions holding user, regions that could not be asked)``."""
        now = time.monotonic()
        hit = self._cache.get(user) if cached else None
        if hit is not None and hit[0] > now:
            self.counters["lookups_cached"] += 1
            return hit[1], hit[2]
        self.counters["lookups_asked"] += 1
        ms = int(time.time() * 1000)
        asks = [(self.region, self.local)] + [(p.name, p.client) for p in self.peers.values()]

        async def ask(region: str, client: Any) -> bool | None:
            try:
                got = await asyncio.wait_for(
                    client.zrangebyscore(self.user_key(region, user), ms, "+inf", start=0, num=1), PEER_TIMEOUT)
            except Exception:
                return None
            return bool(got)

        answers = await asyncio.gather(*(ask(r, c) for r, c in asks))
        found = frozenset(r for (r, _), a in zip(asks, answers, strict=True) if a)
        unknown = frozenset(r for (r, _), a in zip(asks, answers, strict=True) if a is None and r != self.region)
        if len(self._cache) > 100_000:
            self._cache.clear()
        self._cache[user] = (now + (CACHE_TTL_PARTIAL if unknown else CACHE_TTL), found, unknown)
        return found, unknown

    def _push(self, op: str, a: str, b: Any) -> None:
        ops = self._ops
        if len(ops) >= self.buffer_max:
            old = ops.popleft()
            self._ops_dropped += 1
            peer = self.peers.get(old[1]) if old[0] == "xadd" else None
            if peer is not None:
                peer.dropped["local"] += 1
                if not self._buffer_full_logged:
                    self._buffer_full_logged = True
                    log.warning("fastws: region %s: %d writes wait for this region's Redis; dropping the "
                                "oldest messages for other regions (counted as reason=local)", self.region,
                                len(ops))
        if op == "xadd":          # numbered, so that an append sent again is not appended twice
            n = self._numbered[a] = self._numbered.get(a, 0) + 1
            b = (n, b)
        ops.append((op, a, b))
        self._wake.set()

    # -- the ordered writer (this node -> its region's Redis) -----------------------------

    async def _writer(self) -> None:
        delay = 0.05
        slow = 0                      # answers that timed out in a row
        while True:
            if not self._ops:
                self._wake.clear()
                await self._wake.wait()
            batch = [self._ops[i] for i in range(min(len(self._ops), WRITE_BATCH))]
            dropped = self._ops_dropped
            try:
                conn = await self._local_conn("writer")
                ttl_ms = int(self.directory_ttl * 1000)
                expiry = int(time.time() * 1000) + ttl_ms
                channel = self._key(self.region, "directory")
                cmds: list[tuple[Any, ...]] = []
                entries: list[tuple[Any, ...]] = []    # the directory's (on a cluster: its own slots)
                appends: dict[str, list[Any]] = {}     # peer -> [number of the first, its records...]
                for op, a, b in batch:
                    if op == "xadd":
                        recs = appends.get(a)
                        if recs is None:
                            recs = appends[a] = [b[0]]
                        recs.append(b[1])
                    elif op == "bind":
                        key = self.user_key(self.region, a)
                        entries += [("ZADD", key, expiry, self.node_id), ("PEXPIRE", key, ttl_ms)]
                        cmds.append(("PUBLISH", channel, a))
                    else:
                        entries.append(("ZREM", self.user_key(self.region, a), self.node_id))
                        cmds.append(("PUBLISH", channel, a))
                if self.cluster and entries:
                    # each user's entry on the master of its slot, before the news of it
                    pipe = self.local.pipeline(transaction=False)
                    for cmd in entries:
                        pipe.execute_command(*cmd)
                    await asyncio.wait_for(pipe.execute(), 5.0)
                elif entries:
                    cmds = entries + cmds
                for peer, (first, *recs) in appends.items():   # one script per outbox: one entry per message
                    cmds.append(("EVAL", _APPEND, 2, self.outbox_key(peer),
                                 self.link_key(self.region, f"wrote:{self.node_id}:{peer}"), first, WROTE_TTL_MS,
                                 *recs))
                await _answers(conn.pipeline(cmds), 5.0)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._local_failed(exc)
                slow = slow + 1 if isinstance(exc, asyncio.TimeoutError) else 0
                if slow != 1:
                    # refused (on a cluster: MOVED, READONLY) or no answer twice: a new
                    # connection, to the slot's master now; one slow answer keeps the
                    # connection, and the write numbers make the append sent again
                    # behind it harmless
                    self._drop_local("writer")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            delay, slow = 0.05, 0
            self._buffer_full_logged = False
            # what is written leaves the queue; a full queue may have dropped the oldest of
            # these meanwhile (they were written all the same), and then fewer are left
            for _ in range(max(0, len(batch) - (self._ops_dropped - dropped))):
                self._ops.popleft()

    async def _local_conn(self, name: str) -> RespConn:
        """This node's own connection ``name`` to this region's Redis (for
        the ordered writes, one per forwarder): commands written at once,
        answers matched in order (see the module docstring)."""
        conn = self._conns.get(name)
        if conn is None or conn.closed:
            if self.cluster:     # the master of the slot of this region's link keys
                conn = await open_owner(self.local_url, self.link_key(self.region, ""), 5.0)
            else:
                conn = await open_url(self.local_url, 5.0)
            self._conns[name] = conn
        return conn

    def _drop_local(self, name: str) -> None:
        """Close this node's connection ``name`` after a failure: the next use
        opens a new one (on a cluster, to whichever master owns the slot then)."""
        conn = self._conns.pop(name, None)
        if conn is not None:
            conn.close()

    def _local_failed(self, exc: BaseException) -> None:
        problem = mask_url(f"{type(exc).__name__}: {exc}")
        if self.local_up or problem != self.local_problem:
            log.warning("fastws: region %s: its Redis is not reachable: %s", self.region, problem)
        if self.local_up:
            self._outage = True
        self.local_up = False
        self.local_problem = problem

    async def _refresher(self) -> None:
        """Rewrite this node's directory entries every third of their TTL."""
        while True:
            await asyncio.sleep(self.directory_ttl / 3)
            users = list(self.users)
            ttl_ms = int(self.directory_ttl * 1000)
            expiry = int(time.time() * 1000) + ttl_ms
            try:
                for i in range(0, len(users), 1000):
                    pipe = self.local.pipeline(transaction=False)
                    for user in users[i:i + 1000]:
                        key = self.user_key(self.region, user)
                        pipe.zadd(key, {self.node_id: expiry})
                        pipe.pexpire(key, ttl_ms)
                    await pipe.execute()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._local_failed(exc)

    async def _invalidations(self) -> None:
        """Drop cached answers about users bound or unbound in this region."""
        channel = self._key(self.region, "directory")
        while True:
            pubsub = self.local.pubsub()
            try:
                await pubsub.subscribe(channel)
                self._cache.clear()       # what changed while not subscribed is unknown
                while True:
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if msg is not None and msg.get("type") == "message":
                        self._cache.pop(_text(msg["data"]), None)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._local_failed(exc)
                await asyncio.sleep(0.5)
            finally:
                try:
                    await pubsub.aclose()
                except Exception:    # the connection is gone already
                    pass

    # -- leases ---------------------------------------------------------------------------

    async def _lease(self, name: str) -> bool:
        got = await self._scripts["lease"](keys=[self.link_key(self.region, "lease:" + name)],
                                           args=[self.node_id, int(LEASE_TTL * 1000)])
        return bool(got)

    # -- outbox -> peer ----------------------------------------------------------------------

    async def _forwarder(self, peer: Peer) -> None:
        """While this node holds the peer's outbox lease: move the outbox to
        the peer (see :meth:`_stream`); while the peer cannot take it, apply
        the outbox's bounds and try again with backoff."""
        out = self.outbox_key(peer.name)
        inbound = self.inbound_key(peer.name)
        delay = 0.1
        while True:
            try:
                peer.forwarding = await self._lease("out:" + peer.name)
                if not peer.forwarding:
                    self._drop_conn(peer)
                    await asyncio.sleep(LEASE_TTL / 3)
                    continue
                if peer.up is False or peer.backlogged:
                    await self._trim(peer, out)      # the bounds hold while it cannot take them
                try:
                    conn = await self._peer_conn(peer)
                    n = await asyncio.wait_for(conn.send("XLEN", inbound), PEER_TIMEOUT)
                    if isinstance(n, Exception):
                        raise n
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    raise _PeerDown(f"{type(exc).__name__}: {exc}") from exc
                if peer.up is False:
                    log.info("fastws: region %s: %s reachable again", self.region, peer.name)
                peer.up, peer.problem = True, ""
                peer.backlogged = int(n) > self.inbound_max
                if peer.backlogged:              # its nodes do not consume: keep ours here
                    await asyncio.sleep(0.5)
                    continue
                delay = 0.1
                await self._stream(peer, conn, out, inbound)
            except asyncio.CancelledError:
                self._drop_conn(peer)
                raise
            except _PeerDown as exc:
                self._drop_conn(peer)
                self._peer_failed(peer, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
            except Exception as exc:        # our own Redis
                self._drop_conn(peer)
                self._drop_local("out:" + peer.name)
                peer.forwarding = False
                self._local_failed(exc)
                await asyncio.sleep(0.5)

    async def _peer_conn(self, peer: Peer) -> RespConn:
        conn = peer.conn
        if conn is None or conn.closed:
            if peer.cluster:     # the master of the slot of its inbound stream
                conn = peer.conn = await open_owner(peer.url, self.inbound_key(peer.name), PEER_TIMEOUT)
            else:
                conn = peer.conn = await open_url(peer.url, PEER_TIMEOUT)
        return conn

    @staticmethod
    def _drop_conn(peer: Peer) -> None:
        if peer.conn is not None:
            peer.conn.close()
            peer.conn = None

    async def _stream(self, peer: Peer, conn: RespConn, out: str, inbound: str) -> None:
        """Move the outbox to the peer's inbound stream, in order, on one
        connection with up to :data:`WINDOW` batches sent and not yet
        answered; a batch leaves the outbox once the peer answered it.
        Returns when the lease is lost or the peer is backlogged; raises
        :class:`_PeerDown` when the peer fails (what it did not answer is
        sent again from the outbox: the receiver drops the copies)."""
        inflight: deque[tuple[int, bytes, list[asyncio.Future[Any]]]] = deque()
        region = self.region.encode()
        local = await self._local_conn("out:" + peer.name)
        last: Any = "0-0"
        lease_at = time.monotonic()

        async def settle(block: bool) -> None:
            """Take the answered batches (waiting for the oldest if ``block``)
            out of the outbox, oldest first."""
            while inflight:
                count, last_id, futs = inflight[0]
                if not block and not futs[-1].done():
                    return
                block = False
                try:
                    replies = await asyncio.wait_for(asyncio.gather(*futs), PEER_TIMEOUT * 2)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    raise _PeerDown(f"{type(exc).__name__}: {exc}") from exc
                refused = next((r for r in replies if isinstance(r, Exception)), None)
                if refused is not None:
                    raise _PeerDown(f"refused: {refused}")
                inflight.popleft()
                # everything up to the batch's last entry went out (in order): one
                # command takes it out of the outbox
                await _answer(local.send("XTRIM", out, "MINID", id_after(_seq(last_id))), 5.0)
                peer.forwarded += count
                peer.backlogged = int(replies[-1]) > self.inbound_max
                if peer.up is not True:          # it answers, whatever a ping said meanwhile
                    log.info("fastws: region %s: %s reachable again", self.region, peer.name)
                    peer.up, peer.problem = True, ""

        try:
            while True:
                now = time.monotonic()
                if now - lease_at > LEASE_TTL / 3:
                    if not await self._lease("out:" + peer.name):
                        peer.forwarding = False
                        return
                    lease_at = now
                await settle(len(inflight) >= WINDOW)
                if peer.backlogged:
                    return
                if conn.closed:
                    raise _PeerDown("connection lost")
                got = await _answer(local.send("XREAD", "COUNT", BATCH, "BLOCK", 50 if inflight else 1000,
                                                "STREAMS", out, last), 10.0)
                entries = got[0][1] if got else []
                if not entries:
                    continue
                # the whole batch as one entry of the peer's stream (see the module docstring)
                cmds = [("XADD", inbound, "*", b"o", region, b"b", pack_batch(entries)), ("XLEN", inbound)]
                try:
                    futs = conn.pipeline(cmds)
                except ConnectionError as exc:
                    raise _PeerDown(str(exc)) from exc
                last = entries[-1][0]
                inflight.append((len(entries), last, futs))
        finally:
            for _c, _l, futs in inflight:         # nobody waits for these any more
                for f in futs:
                    if f.done() and not f.cancelled():
                        f.exception()
                    else:
                        f.cancel()

    def _peer_failed(self, peer: Peer, exc: BaseException) -> None:
        problem = mask_url(f"{type(exc).__name__}: {exc}") if str(exc) else type(exc).__name__
        if peer.up is not False:
            log.warning("fastws: region %s: %s not reachable (%s); queueing its messages", self.region,
                        peer.name, problem)
        peer.up, peer.problem = False, problem

    async def _trim(self, peer: Peer, out: str) -> None:
        """Apply the outbox's bounds; count what they remove."""
        pipe = self.local.pipeline(transaction=False)
        pipe.xtrim(out, maxlen=self.queue_max, approximate=False)
        if self.queue_age > 0:
            minid = int(time.time() * 1000 - self.queue_age * 1000)
            pipe.xtrim(out, minid=f"{max(minid, 0)}-0", approximate=False)
        else:
            pipe.xlen(out)
        by_length, by_age = await pipe.execute()
        if not self.queue_age:
            peer.queued, by_age = by_age, 0
        for reason, n in (("length", by_length), ("age", by_age)):
            if n:
                peer.dropped[reason] += n
                await self.local.hincrby(self._key(self.region, "dropped"), f"{peer.name}:{reason}", n)
                log.warning("fastws: region %s: dropped %d queued messages for %s (over the %s bound; "
                            "counted)", self.region, n, peer.name, reason)

    # -- inbound -> this region --------------------------------------------------------------

    async def _reader(self) -> None:
        """While this node holds the reader's lease: read the oldest entries of
        the inbound stream (what is delivered is deleted), or wait for one,
        and deliver them (:meth:`_apply`)."""
        key = self.inbound_key(self.region)
        lease = self.link_key(self.region, "lease:in")
        lease_at = 0.0
        while True:
            if self._outage and (not self.local_up or time.monotonic() - self._local_since < READ_SETTLE):
                self._reading = False
                await asyncio.sleep(0.2)
                continue
            try:
                conn = await self._local_conn("reader")
                now = time.monotonic()
                if not self._reading or now - lease_at > LEASE_TTL / 6:
                    held = await _answer(conn.send("EVAL", _LEASE, 1, lease, self.node_id, int(LEASE_TTL * 1000)),
                                         5.0)
                    if not held:
                        self._reading = False
                        await asyncio.sleep(LEASE_TTL / 3)
                        continue
                    lease_at = now
                if not self._reading:         # a new holder: what was applied, by whoever held it
                    raw = await _answer(conn.send("HGETALL", self.link_key(self.region, "applied")), 5.0)
                    self._applied = {_text(k): _seq(v) for k, v in zip(raw[::2], raw[1::2], strict=True)}
                    self._reading = True
                # the oldest entries (the delivered ones are deleted), at once when there
                # are some, else as soon as one comes
                got = await _answer(conn.send("XREAD", "COUNT", READ_COUNT, "BLOCK", int(LEASE_TTL * 1000 / 6),
                                              "STREAMS", key, "0-0"), LEASE_TTL + 5.0)
                chunk: list[Any] = []
                size = 0
                for entry in got[0][1] if got else ():
                    chunk.append(entry)
                    size += sum(len(v) for v in entry[1] or ())
                    if size >= APPLY_BYTES:
                        await self._apply(conn, key, lease, chunk)
                        chunk, size = [], 0
                        if not self._reading:     # the lease went to another node
                            break
                if chunk and self._reading:
                    await self._apply(conn, key, lease, chunk)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._reading = False
                self._local_failed(exc)
                self._drop_local("reader")     # a new connection (on a cluster: to the slot's master now)
                await asyncio.sleep(0.5)

    async def _deliveries(self) -> None:
        """On a Redis Cluster: what the region's reader delivers, from its
        channel on the master of the link's slot, to this node's members."""
        channel = self.link_key(self.region, "deliver")
        loop = asyncio.get_running_loop()
        while True:
            lost: asyncio.Future[BaseException] = loop.create_future()
            conn: RespConn | None = None
            try:
                conn = await open_owner(self.local_url, channel, 5.0, on_push=self._delivered)

                def on_lost(exc: BaseException, lost: asyncio.Future[BaseException] = lost) -> None:
                    if not lost.done():
                        lost.set_result(exc)

                conn.on_lost = on_lost
                conn.push_mode = True
                conn.send_many([("SUBSCRIBE", channel)])
                self._subscribed = True
                exc = await lost
                raise exc
            except asyncio.CancelledError:
                if conn is not None:
                    conn.close()
                raise
            except Exception as exc:
                self._subscribed = False
                self._local_failed(exc)
                await asyncio.sleep(0.2)

    def _delivered(self, reply: Any) -> None:
        """One push of the delivery channel: a message for members here."""
        if not isinstance(reply, list) or len(reply) != 3 or reply[0] != b"message":
            return
        try:
            _kind, _hop, ns, target, payload = parse_record(reply[2])
        except (struct.error, ValueError) as exc:
            log.warning("fastws: region %s: a malformed delivery (%s)", self.region, exc)
            return
        assert self.deliver_here is not None
        try:
            self.deliver_here(_text(ns), _text(target), payload)
        except Exception as exc:      # not a room payload this node can deliver: counted, never fatal
            self.counters["undeliverable"] += 1
            log.warning("fastws: region %s: a delivery for %r could not be delivered here (%s)", self.region,
                        _text(target), exc)

    def _channel(self, namespace: bytes, room: bytes) -> bytes:
        ch = self._channels.get((namespace, room))
        if ch is None:
            if len(self._channels) > 10_000:
                self._channels.clear()
            ch = self._channels[(namespace, room)] = channel_name(self.prefix, (_text(namespace), _text(room)))
        return ch

    async def _apply(self, conn: RespConn, key: str, lease: str, entries: list[Any]) -> None:
        """Deliver ``entries`` to this region, exactly once each message (see
        the module docstring), in one script that runs only while this node
        still holds the reader's lease."""
        decoded: list[tuple[Any, str, list[tuple[Any, ...]]]] = []
        users: set[bytes] = set()
        malformed = 0
        for eid, flat in entries:
            try:
                origin, msgs = inbound_messages(flat or [])
                parsed = [(seq, *parse_record(rec)) for seq, rec in msgs]
            except (struct.error, ValueError, IndexError) as exc:
                # not this module's format: deleted and counted, never retried forever
                malformed += 1
                log.warning("fastws: region %s: dropped a malformed inbound entry %s (%s; counted as "
                            "undeliverable)", self.region, _text(eid), exc)
                decoded.append((eid, "", []))
                continue
            users.update(m[4] for m in parsed if m[1] == b"u")
            decoded.append((eid, origin, parsed))
        # users: is each here, or where is it now?
        where: dict[bytes, tuple[bool, frozenset[str]]] = {}
        for user in users:
            found, _unknown = await self.locate(_text(user), cached=False)
            where[user] = (self.region in found, found)
        applied = dict(self._applied)
        ops: list[Any] = []
        counts = {"received": 0, "duplicates": 0, "redirected": 0, "undeliverable": malformed}
        received: dict[str, int] = {}
        run_channel: bytes | None = None        # consecutive publishes to one channel: one op
        deliver = self.link_key(self.region, "deliver").encode()
        run: list[bytes] = []

        def flush() -> None:
            if run:
                ops.extend(("Q", run_channel, len(run)))
                ops.extend(run)
                run.clear()

        for eid, origin, parsed in decoded:
            ops += ["I", eid]
            last = applied.get(origin, (0, 0))
            head = pack_envelope(("region:" + origin).encode()[:255], b"")
            n = 0
            for seq, kind, hop, ns, target, payload in parsed:
                if seq <= last:
                    counts["duplicates"] += 1
                    continue
                last = seq
                if kind == b"u":
                    here, found = where[target]
                    if here:
                        ns = USER_NAMESPACE.encode()
                        channel = self._channel(ns, target)
                    else:
                        if not hop and found - {self.region}:
                            for region in sorted(found - {self.region}):
                                if region in self.peers:
                                    ops += ["X", self.outbox_key(region), record(b"u", 1, b"", target, payload)]
                            counts["redirected"] += 1
                        else:
                            counts["undeliverable"] += 1
                        continue
                else:
                    channel = self._channel(ns, target)
                if self.cluster:
                    # one channel for the whole region (see "On a Redis Cluster")
                    channel = deliver
                    body = record(b"r", 0, ns, target, payload)
                else:
                    body = head + payload
                if channel != run_channel:
                    flush()
                    run_channel = channel
                run.append(body)
                n += 1
            if last != (0, 0):
                applied[origin] = last
            if n:
                received[origin] = received.get(origin, 0) + n
        flush()
        for o, sq in applied.items():
            if self._applied.get(o) != sq:
                ops += ["A", o, f"{sq[0]}-{sq[1]}"]
        try:
            done = await _answer(conn.send("EVAL", _APPLY, 3, lease, self.link_key(self.region, "applied"), key,
                                           self.node_id, *ops), 10.0)
        except BaseException:
            # unknown whether it applied: read the truth again before the next batch
            self._reading = False
            raise
        if not done:           # the lease went to another node: it delivers these
            self._reading = False
            return
        self._applied = applied
        counts["received"] = sum(received.values())
        for what, n in counts.items():
            self.counters[what] += n
        for origin, n in received.items():
            self.received_from[origin] = self.received_from.get(origin, 0) + n
        if counts["undeliverable"]:
            log.info("fastws: region %s: a message for a user found in no region was dropped (counted)",
                     self.region)

    # -- watching ---------------------------------------------------------------------------

    async def _watch(self) -> None:
        """Every WATCH_INTERVAL: is this region's Redis up, is each peer's,
        how long is each outbox."""
        while True:
            await self.look()
            await asyncio.sleep(WATCH_INTERVAL)

    async def look(self) -> None:
        try:
            if self.cluster:    # PING has no slot: the commands one by one, each to its master
                replies = await asyncio.wait_for(asyncio.gather(
                    self.local.ping(), *(self.local.xlen(self.outbox_key(p.name)) for p in self.peers.values())),
                    PEER_TIMEOUT)
            else:
                pipe = self.local.pipeline(transaction=False)
                pipe.ping()
                for p in self.peers.values():
                    pipe.xlen(self.outbox_key(p.name))
                replies = await asyncio.wait_for(pipe.execute(), PEER_TIMEOUT)
            for p, n in zip(self.peers.values(), replies[1:], strict=True):
                p.queued = int(n)
            if not self.local_up:
                log.info("fastws: region %s: its Redis is reachable", self.region)
                self._local_since = time.monotonic()
            self.local_up, self.local_problem = True, ""
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._local_failed(exc)

        async def ping(p: Peer) -> None:
            try:
                await asyncio.wait_for(p.client.ping(), PEER_TIMEOUT)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._peer_failed(p, exc)
                return
            if p.up is False and not p.forwarding:
                log.info("fastws: region %s: %s reachable again", self.region, p.name)
            if not p.forwarding or p.up is None:
                p.up, p.problem = True, ""

        await asyncio.gather(*(ping(p) for p in self.peers.values()))

    # -- reports ----------------------------------------------------------------------------

    def check(self) -> tuple[bool, str]:
        """The ``region`` check of ``/health``: this region's Redis answers."""
        if self.local_up:
            return True, f"region {self.region}: Redis reachable"
        return False, f"region {self.region}: Redis not reachable ({self.local_problem})"

    async def describe(self) -> dict[str, Any]:
        """``GET /regions``: this region and every peer with its state:
        ``up``, ``unreachable``, ``backlogged`` (its inbound stream is over
        ``region_queue_max``: not consumed) or ``unknown`` (not asked yet),
        the messages queued for it and dropped (by reason), and whether this
        node moves them (``forwarder``); ``reader``: this node delivers what
        other regions send here."""
        dropped: dict[str, int] = {}
        try:
            pipe = self.local.pipeline(transaction=False)
            pipe.hgetall(self._key(self.region, "dropped"))
            for p in self.peers.values():
                pipe.xlen(self.outbox_key(p.name))
            raw, *lengths = await asyncio.wait_for(pipe.execute(), 1.0)
            dropped = {_text(k): int(v) for k, v in raw.items()}
            for p, n in zip(self.peers.values(), lengths, strict=True):
                p.queued = int(n)
        except Exception:   # this region's Redis is down: the node's own counts only
            dropped = {}
        regions: list[dict[str, Any]] = [{
            "name": self.region, "self": True, "state": "up" if self.local_up else "down",
            **({} if self.local_up else {"problem": self.local_problem})}]
        for p in self.peers.values():
            entry: dict[str, Any] = {
                "name": p.name, "self": False, "state": p.state(), "queued": p.queued,
                "forwarder": p.forwarding,
                "dropped": {r: max(dropped.get(f"{p.name}:{r}", 0), p.dropped[r]) if r != "local"
                            else p.dropped[r] for r in p.dropped},
            }
            if p.problem:
                entry["problem"] = p.problem
            regions.append(entry)
        return {"region": self.region, "node": self.node_id, "healthy": self.local_up, "reader": self._reading,
                "regions": regions}

    def stats(self) -> dict[str, Any]:
        """What ``/metrics`` shows (this node's counts)."""
        return {
            "region": self.region,
            "peers": {p.name: {"up": p.up is True, "queued": p.queued, "forwarded": p.forwarded,
                               "dropped": dict(p.dropped)} for p in self.peers.values()},
            "received": dict(self.received_from),
            "counters": dict(self.counters),
            "users": len(self.users),
        }


__all__ = ["Regions", "USER_NAMESPACE", "CACHE_TTL"]
