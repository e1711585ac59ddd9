"""The Redis Streams broker (``redis+streams://host:port/db``, ``rediss+streams://`` for TLS).

The same contract as the pub/sub broker (:mod:`fastws.broker`), but every
message is an entry of a capped Redis Stream, so a node that loses Redis for
a short while gets, once it is back, what other nodes published meanwhile,
and an app can read a room's recent history.

URL and options
---------------
``redis+streams://[user:password@]host:port/db[?maxlen=10000&block=5&count=256&ttl=86400]``;
the same names are keyword options of :class:`StreamsBroker` (a keyword
wins over the URL), besides those of :class:`~fastws.broker.redis.RedisBroker`
(``node_id``, ``prefix``, ``connect_timeout``, ``backoff_min``,
``backoff_max``, ``ping_interval``, ``max_backlog``):

* ``maxlen`` (10,000): entries kept per stream, trimmed approximately
  (``MAXLEN ~``: Redis keeps at least ``maxlen`` and trims whole nodes of
  its radix tree, so up to ``maxlen + stream-node-max-entries`` (100)).
* ``block`` (5 s): how long one ``XREAD`` waits; also the longest a
  subscription change can wait when ``CLIENT UNBLOCK`` is not allowed (below).
* ``count`` (256): entries read per stream per ``XREAD``.
* ``ttl`` (86,400 s, 0 = never): a stream nobody published to for this long
  expires (``PEXPIRE``, refreshed by a publisher at most every ``ttl / 4``),
  so rooms that are no longer used do not keep their history forever.

Keys, publishing
----------------
A key's stream is its :func:`~fastws.broker.channel_name`
(``fastws:{prefix}:room:{namespace}:{name}``, ``fastws:{prefix}:node:{id}``).
A publish is one command on the node's command connection,
``XADD key MAXLEN ~ maxlen * d <envelope> n <seq>`` (pipelined, in call
order; ``publish`` returns the entry id as ``str``): ``d`` is the usual
envelope (origin node + payload bytes, never pickle), ``n`` a per-node
counter that orders one publisher's entries across streams. With ``ttl``
a ``PEXPIRE`` follows right behind (pipelined, no extra round trip) when the
key's TTL is due for a refresh (at most every ``ttl / 4`` per key and node).

Reading (interest-based)
------------------------
A node reads only the streams of keys it is subscribed to, i.e. rooms with
local members and its own node key: one ``XREAD COUNT count BLOCK block
STREAMS k1 .. kn id1 .. idn`` at a time on a dedicated connection, from the
last id it has seen of each key.

* ``subscribe`` resolves where each new key starts: one pipelined
  ``XREVRANGE key + - COUNT 1`` per key, all in one write (one round trip
  for many keys, and ``subscribe`` calls of one loop iteration are
  coalesced). Everything published after ``subscribe`` returns is delivered;
  nothing older is. A key already subscribed keeps its position.
* The blocked ``XREAD`` is then interrupted (``CLIENT UNBLOCK`` of the
  reader connection, sent on the command connection) and issued again with
  the new key set. The ids are explicit, so nothing is lost across the
  re-issue. Of a read that was sent before the set grew, only entries
  older than the new keys' start (Redis ``TIME``, read in the same write as
  the start ids) are delivered; the rest are read again together with the
  new keys, so the order below holds for them too. Without the permission for ``CLIENT`` (an ACL), the new keys are
  read from the next ``XREAD`` on, at most ``block`` seconds later: still
  from their start id, so late but complete.
* ``unsubscribe`` is immediate for delivery (entries of the key still in a
  pending read are dropped, counted as ``stray``); the key leaves the read
  set at the next ``XREAD``.
* Order: per stream, entries come in stream order, so one publisher's
  messages to a room arrive in publish order. Entries of one read are
  merged across streams by id and by each publisher's counter ``n``, so one
  publisher's messages to several rooms also arrive in publish order; a
  stream that returned ``count`` entries holds back later entries of the
  other streams until the next read (ids are per millisecond: with several
  publishers in one millisecond and a room past ``count``, this last rule
  is best effort). The origin's own entries are dropped (the envelope's
  origin check): a node never delivers a message twice.

Outages
-------
As the pub/sub broker: ``state`` goes ``"disconnected"`` at once, publishes
raise :class:`~fastws.broker.PublishError` and are counted in
``stats()["failures"]``, the broker reconnects by itself with exponential
backoff and jitter, and a silent link is found by ``PING``\\ s (and by an
``XREAD`` that does not come back within ``block + ping_interval``). The
difference: the last seen id of every key survives the outage, so the first
``XREAD`` after the reconnect returns what other nodes published meanwhile,
in order (unless more than ``maxlen`` entries were published to a stream, or
it expired: then the oldest of them are gone). A key subscribed while
disconnected starts where its stream is when the broker is back.

History
-------
:class:`StreamsBroker` is a :class:`~fastws.broker.History` (the capability
interface of :mod:`fastws.broker.base`):

* ``await broker.history(key, since_id=None, count=100)`` reads a stream
  without touching the node's reading position: with ``since_id=None`` the
  last ``count`` entries, else up to ``count`` entries after that id; oldest
  first (page on with the last id you got).  It returns a
  :class:`~fastws.broker.HistoryPage`, a list of
  :class:`~fastws.broker.Entry` ``(id, payload, origin)`` (the node's own
  entries included), whose ``complete`` says, with ``since_id``, whether no
  entry after it can have been trimmed away (from ``XINFO STREAM``, in the
  same write): ``True`` if the entry ``since_id`` names is still in the
  stream (or nothing was ever removed), ``False`` if it is not (the client
  may have missed entries), ``None`` without ``since_id`` or when the stream
  is gone (expired, never written).
* ``broker.last_id(key)``: the id of the last entry of ``key`` this node has
  read (during a handler call, the entry being delivered; on the publishing
  node, ``publish`` returns the id).
* ``broker.set_entry_handler(handler)``: ``handler(key, entry_id, payload,
  origin)`` for every entry read, in delivery order, this node's own
  included (which the plain handler never gets); :mod:`fastws.resume` uses
  it to send a room's stream to resuming members.

:func:`fastws.broker.wire.room_message` turns a payload the bridge published
back into the ``str``/``bytes`` message; entry ids compare as
:func:`fastws.broker.wire.parse_id`.

Needs Redis >= 5.0 (streams, ``CLIENT UNBLOCK``).
The connections are the RESP client of :mod:`fastws.broker.redis`.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time

from ..errors import BrokerError, BrokerURLError
from .base import Entry, History, HistoryPage
from .redis import ACK_TIMEOUT, URL_OPTIONS, AuthenticationError, RedisBroker, ReplyError, is_auth_error, url_options
from .wire import MAX_SEQ, ZERO, entry_fields, envelope_origin, id_after, parse_id, room_message, unpack_envelope

log = logging.getLogger("fastws.broker")

__all__ = ["StreamsBroker", "Entry", "HistoryPage", "room_message", "parse_id"]


def _ignore(fut) -> None:
    if not fut.cancelled():
        fut.exception()


def _settled(task) -> None:
    """The done callback of a link's reader and unblocker tasks: their
    exception is retrieved here.  A lost link (ConnectionError, a timeout)
    is already reported by the "lost the broker" line, so it is logged at
    debug only; anything else is a bug and logged with its traceback."""
    if task.cancelled():
        return
    exc = task.exception()
    if exc is None:
        return
    if isinstance(exc, (ConnectionError, asyncio.TimeoutError)):
        log.debug("fastws: broker stream task ended with the link: %r", exc)
    else:
        log.error("fastws: broker stream task failed", exc_info=exc)


def _merge(lists) -> list:
    """Merge per-stream entry lists (each in stream order) into one delivery
    order: by id, except that one origin's entries (those with a counter) go
    in counter order. Entries are ``(idt, ch, eid, data, origin, n)``."""
    lists = [lst for lst in lists if lst]
    if len(lists) <= 1:
        return lists[0] if lists else []
    order: dict = {}                   # origin -> its counters in this read, sorted
    for lst in lists:
        for e in lst:
            if e[5] is not None:
                order.setdefault(e[4], []).append(e[5])
    for v in order.values():
        v.sort()
    pos = dict.fromkeys(order, 0)      # origin -> index of the counter due next
    heads = [0] * len(lists)
    heap: list = []                    # (idt, list index) of heads that may go now
    waiting: dict = {}                 # (origin, n) -> list index of a head that waits its turn
    out = []

    def offer(i):
        e = lists[i][heads[i]]
        if e[5] is None or order[e[4]][pos[e[4]]] == e[5]:
            heapq.heappush(heap, (e[0], i))
        else:
            waiting[(e[4], e[5])] = i

    for i in range(len(lists)):
        offer(i)
    while heap:
        _, i = heapq.heappop(heap)
        e = lists[i][heads[i]]
        out.append(e)
        heads[i] += 1
        if e[5] is not None:
            o = e[4]
            pos[o] += 1
            if pos[o] < len(order[o]):
                j = waiting.pop((o, order[o][pos[o]]), None)
                if j is not None:
                    heapq.heappush(heap, (lists[j][heads[j]][0], j))
        if heads[i] < len(lists[i]):
            offer(i)
    if len(out) < sum(map(len, lists)):
        # counters that contradict the streams (two nodes with one id): the rest by id
        rest = [lst[h:] for lst, h in zip(lists, heads, strict=True) if h < len(lst)]
        out.extend(heapq.merge(*rest, key=lambda e: e[0]))
    return out


class StreamsBroker(RedisBroker, History):
    """Redis Streams. ``url``: ``redis+streams://[user:password@]host:port/db``.

    Lifecycle, reconnects, publishing and health come from
    :class:`~fastws.broker.redis.RedisBroker` (two connections: commands,
    and here a reader for ``XREAD BLOCK`` instead of a subscriber)."""

    #: the query options of its URL: the Redis ones and the stream's own
    URL_OPTIONS = {**URL_OPTIONS,
                   "maxlen": "entries kept per room's stream, an integer >= 1 (10000)",
                   "block": "seconds an XREAD blocks, in (0, 3600] (5)",
                   "count": "entries per XREAD, an integer >= 1 (256)",
                   "ttl": "seconds an unused room's stream lives, >= 0, 0 = forever (86400)"}
    URL_FORM = "redis+streams://[user:password@]host[:port][/db][?maxlen=N&block=S&count=N&ttl=S]"

    def __init__(self, url: str = "redis+streams://127.0.0.1:6379/0", *, maxlen: int | None = None,
                 block: float | None = None, count: int | None = None, ttl: float | None = None,
                 **opts) -> None:
        super().__init__(url, **opts)
        q = url_options(url, self.URL_OPTIONS, self.URL_FORM)

        def opt(value, name, default, conv, ok, allowed):
            given = value
            if value is None:
                value = q.get(name, default)
            try:
                value = conv(value)
                if value != value or value in (float("inf"), float("-inf")):
                    value = None
            except (TypeError, ValueError):
                value = None
            if value is None or not ok(value):
                shown = given if given is not None else q.get(name)
                raise BrokerURLError(self.safe_url, f"{name}={shown} is not allowed", f"{name}: {allowed}")
            return value

        self.maxlen = opt(maxlen, "maxlen", 10_000, int, lambda v: v >= 1, "an integer >= 1")
        self.block = opt(block, "block", 5.0, float, lambda v: 0 < v <= 3600, "seconds in (0, 3600]")
        self.count = opt(count, "count", 256, int, lambda v: v >= 1, "an integer >= 1")
        self.ttl = opt(ttl, "ttl", 86_400.0, float, lambda v: v >= 0, "seconds >= 0 (0 = never)")
        self._block_ms = max(1, int(self.block * 1000))   # XREAD BLOCK 0 would mean forever
        self._entry_handler = None       # handler(key, id, payload, origin) of every entry read
        self._last: dict = {}            # channel -> last id read (bytes): the read set
        self._to_resolve: set = set()    # channels whose start id is still to be read
        self._inflight: dict = {}        # channel -> future of the batch resolving it now
        self._resolve_fut = None         # the pending coalesced resolve
        self._rd_id = None               # CLIENT ID of the reader connection (None: no UNBLOCK)
        self._reading = False            # an XREAD is out
        self._read_gen = 0               # _want_gen when it was sent
        self._want_gen = 0               # bumped whenever keys join the read set
        self._kicks: list = []           # (gen, Redis ms just before its keys were resolved)
        self._changed = None             # asyncio.Event: the read set got keys
        self._unblocker = None           # the task interrupting a stale XREAD
        self._seq = itertools.count(time.time_ns() // 1000)   # "n": increasing across restarts too
        self._expiry: dict = {}          # channel -> loop time of our last PEXPIRE

    async def start(self) -> None:
        if self._task is not None and not self._task.done():
            return                       # started already
        self._changed = asyncio.Event()
        await super().start()

    def stats(self) -> dict:
        return dict(super().stats(), reading=len(self._last))

    # -- the links ------------------------------------------------------------------

    async def _serve(self, pub, rd) -> bool:
        """Use ``pub`` (commands) and ``rd`` (XREAD) until one is lost; True if
        it got to "connected"."""
        lost = self._loop.create_future()

        def on_lost(exc):
            if not lost.done():
                lost.set_result(exc)
            if self.state == "connected" and not self._closing:
                log.warning("fastws: lost the broker at %s (%s); reconnecting", self.safe_url, exc)
                self._set_state("disconnected")     # at once: publishes fail from now on

        pub.on_lost = rd.on_lost = on_lost
        self._pub, self._sub = pub, rd
        self._expiry.clear()
        reached = False
        reader = None
        try:
            for r in await asyncio.wait_for(asyncio.gather(pub.send(b"PING"), rd.send(b"PING")),
                                            self.connect_timeout):
                if isinstance(r, ReplyError):
                    kind = AuthenticationError if is_auth_error(r) else ConnectionError
                    raise kind(f"PING answered {r}")
            r = await asyncio.wait_for(rd.send(b"CLIENT", b"ID"), self.connect_timeout)
            self._rd_id = r if isinstance(r, int) else None
            if self._rd_id is None:
                log.info("fastws: CLIENT ID refused (%s): subscription changes apply within "
                         "block=%ss", r, self.block)
            # where keys subscribed while away (all of them on first connect) start
            self._to_resolve.update(ch for ch in self._keys if ch not in self._last)
            await self._resolve_pending()
            if lost.done():
                return False
            if self._ever_connected:
                self.counters["reconnects"] += 1
                log.warning("fastws: broker reconnected to %s (reading %d streams from where it was)",
                            self.safe_url, len(self._last))
            self._ever_connected = True
            reached = True
            self.problem = None
            self._set_state("connected")
            self._connected.set()
            missing = [ch for ch in self._keys if ch not in self._last]
            if missing:                        # subscribed during the steps above
                self._to_resolve.update(missing)
                self._schedule_resolve()
            reader = self._loop.create_task(self._read_loop(rd))
            while not lost.done():
                await asyncio.wait([lost, reader], timeout=self.ping_interval,
                                   return_when=asyncio.FIRST_COMPLETED)
                if lost.done():
                    break
                if reader.done():
                    exc = None if reader.cancelled() else reader.exception()
                    log.warning("fastws: broker stream reader stopped (%r); reconnecting", exc)
                    break
                if not await self._ping(pub):
                    break
        except (asyncio.TimeoutError, ConnectionError) as exc:
            self._link_failed(exc)
        finally:
            for t in (reader, self._unblocker):
                if t is None:
                    continue
                if t.done():
                    _settled(t)          # its exception is retrieved (no "never retrieved")
                else:
                    t.cancel()
                    t.add_done_callback(_settled)
            self._unblocker = None
            self._reading = False
            self._rd_id = None
            self._connected.clear()
            self._drop_links()
            self._release_waiters()
        return reached

    # -- subscriptions -------------------------------------------------------------------

    async def subscribe(self, keys) -> None:
        new = False
        for key in keys:
            ch = self.channel(key)
            self._keys[ch] = key
            if ch not in self._last:
                self._to_resolve.add(ch)
                new = True
        if new and self._task is not None and not self._closing:
            try:
                await asyncio.wait_for(asyncio.shield(self._schedule_resolve()), ACK_TIMEOUT + 1.0)
            except asyncio.TimeoutError:
                log.warning("fastws: broker could not resolve new streams in %ss", ACK_TIMEOUT)

    async def unsubscribe(self, keys) -> None:
        for key in keys:
            ch = self.channel(key)
            if self._keys.pop(ch, None) is None:
                continue
            self._last.pop(ch, None)         # out of the read set from the next XREAD on
            self._to_resolve.discard(ch)

    def _schedule_resolve(self):
        """Coalesce: one resolve per loop iteration; a future resolved after it."""
        if self._resolve_fut is None:
            self._resolve_fut = self._loop.create_future()
            self._loop.call_soon(self._start_resolve)
        return self._resolve_fut

    def _start_resolve(self) -> None:
        done, self._resolve_fut = self._resolve_fut, None
        task = self._loop.create_task(self._resolve_pending())

        def finished(t):
            if not t.cancelled() and t.exception() is not None:
                log.error("fastws: broker stream resolve failed", exc_info=t.exception())
            if not done.done():
                done.set_result(None)

        task.add_done_callback(finished)

    async def _resolve_pending(self) -> None:
        """Set the start id (the stream's last entry, or 0-0) of every channel
        waiting for one, in one pipelined write; then re-issue the read."""
        pending = [ch for ch in self._to_resolve if ch in self._keys and ch not in self._last]
        self._to_resolve.clear()
        # keys an earlier batch is resolving: wait for it rather than ask twice
        earlier = {self._inflight[ch] for ch in pending if ch in self._inflight}
        chans = [ch for ch in pending if ch not in self._inflight]
        pub = self._pub
        if chans and (pub is None or pub.closed):
            self._to_resolve.update(chans)   # the reconnect resolves them
            chans = []
        if not chans:
            if earlier:
                await asyncio.wait(earlier, timeout=ACK_TIMEOUT)
            return
        batch = self._loop.create_future()
        for ch in chans:
            self._inflight[ch] = batch
        try:
            # TIME first: every entry with an earlier millisecond was added before
            # these keys' start ids were read (see _read_loop)
            futs = pub.pipeline([(b"TIME",)] + [(b"XREVRANGE", ch, b"+", b"-", b"COUNT", 1) for ch in chans])
            now, *replies = await asyncio.wait_for(asyncio.gather(*futs), ACK_TIMEOUT)
        except (ConnectionError, asyncio.TimeoutError) as exc:
            self._to_resolve.update(chans)
            if isinstance(exc, asyncio.TimeoutError):
                log.warning("fastws: broker did not answer for %d new streams in %ss", len(chans), ACK_TIMEOUT)
            if self.state == "connected" and self._pub is not None and self._pub is not pub:
                self._schedule_resolve()
            return
        finally:
            for ch in chans:
                if self._inflight.get(ch) is batch:
                    del self._inflight[ch]
            batch.set_result(None)   # its waiters run after the lines below (no await between)
        added = 0
        for ch, r in zip(chans, replies, strict=True):    # one reply per XREVRANGE
            if ch not in self._keys or ch in self._last:
                continue
            if isinstance(r, ReplyError):
                log.error("fastws: broker key %r is not a stream (%s); not read", ch, r)
                continue
            self._last[ch] = bytes(r[0][0]) if r else ZERO
            added += 1
        if added:
            ms = int(now[0]) * 1000 + int(now[1]) // 1000 if isinstance(now, list) else 0
            self._kick(ms)
        if earlier:
            await asyncio.wait(earlier, timeout=ACK_TIMEOUT)

    def _kick(self, ms: int) -> None:
        """The read set grew (with keys resolved after Redis time ``ms``): have
        the reader re-issue its XREAD now."""
        self._want_gen += 1
        self._kicks.append((self._want_gen, ms))
        if self._changed is not None:
            self._changed.set()
        if self._reading and self._rd_id is not None and self._unblocker is None:
            self._unblocker = self._loop.create_task(self._unblock())

    async def _unblock(self) -> None:
        try:
            for attempt in range(50):
                pub, rid = self._pub, self._rd_id
                if not self._reading or self._read_gen >= self._want_gen or rid is None \
                        or pub is None or pub.closed:
                    return
                r = await pub.send(b"CLIENT", b"UNBLOCK", rid)
                if isinstance(r, ReplyError):
                    log.info("fastws: CLIENT UNBLOCK refused (%s): subscription changes apply "
                             "within block=%ss", r, self.block)
                    self._rd_id = None
                    return
                # 0: our XREAD has not reached the server yet (or just returned): again
                await asyncio.sleep(0 if r == 1 else min(0.1, 0.002 * (attempt + 1)))
        except ConnectionError:
            pass
        finally:
            if self._unblocker is asyncio.current_task():
                self._unblocker = None

    # -- reading ----------------------------------------------------------------------------

    async def _read_loop(self, rd) -> None:
        """XREAD over the read set, forever; raises when the link fails or
        goes silent (the caller reconnects)."""
        while True:
            if not self._last:
                self._changed.clear()
                try:
                    await asyncio.wait_for(self._changed.wait(), self.ping_interval)
                except asyncio.TimeoutError:
                    await asyncio.wait_for(rd.send(b"PING"), self.ping_interval)
                continue
            chans = list(self._last)
            cmd = (b"XREAD", b"COUNT", self.count, b"BLOCK", self._block_ms, b"STREAMS",
                   *chans, *[self._last[c] for c in chans])
            self._read_gen = self._want_gen
            self._kicks.clear()              # every key they added is in this read
            self._reading = True
            try:
                r = await asyncio.wait_for(rd.send(*cmd), self.block + self.ping_interval)
            finally:
                self._reading = False
            if isinstance(r, ReplyError):
                await self._read_failed(r, chans)
            elif r:
                # if the read set grew while this read was out, only entries added
                # before the new keys were resolved go now: anything a publisher
                # sent to a new key came after them. The rest is read again together
                # with the new keys, so one publisher's order holds across them too.
                stale = [ms for gen, ms in self._kicks if gen > self._read_gen]
                self._dispatch(r, min(stale) if stale else None)

    async def _read_failed(self, err, chans) -> None:
        log.warning("fastws: broker XREAD failed: %s", err)
        pub = self._pub
        if "WRONGTYPE" in str(err) and pub is not None and not pub.closed:
            types = await asyncio.wait_for(asyncio.gather(*pub.pipeline([(b"TYPE", ch) for ch in chans])),
                                           ACK_TIMEOUT)
            for ch, t in zip(chans, types, strict=True):
                if t not in (b"stream", b"none"):
                    log.error("fastws: broker key %r is a %s, not a stream; not read", ch, t)
                    self._last.pop(ch, None)
        await asyncio.sleep(min(1.0, self.block))

    def _dispatch(self, reply, before_ms=None) -> None:
        """Deliver the entries of one XREAD reply (see the module doc for the
        order); with ``before_ms``, only those of an earlier millisecond."""
        cutoff = None        # the lowest last id of a stream cut short by COUNT
        if before_ms is not None:
            cutoff = (before_ms - 1, MAX_SEQ)
        for _, entries in reply:
            if entries and len(entries) >= self.count:
                t = parse_id(entries[-1][0])
                if cutoff is None or t < cutoff:
                    cutoff = t
        lists = []
        for ch, entries in reply:
            ch = bytes(ch)
            last = self._last.get(ch)
            if last is None:                 # unsubscribed while the read was out
                self.counters["stray"] += len(entries or ())
                continue
            lt = parse_id(last)
            lst = []
            for eid, fields in entries or ():
                t = parse_id(eid)
                if t <= lt:                  # already seen (resubscribed since the read went out)
                    continue
                if cutoff is not None and t > cutoff:
                    break                    # read again next time, after the cut streams
                data, n = entry_fields(fields)
                origin = envelope_origin(data) if data is not None else None
                lst.append((t, ch, bytes(eid), data, origin, n if origin is not None else None))
            lists.append(lst)
        handler = self._entry_handler
        for _t, ch, eid, data, origin, _ in _merge(lists):
            if ch not in self._last:
                self.counters["stray"] += 1
                continue
            self._last[ch] = eid
            if data is None:
                self.counters["stray"] += 1
                continue
            if handler is not None and origin is not None:
                self._entry(handler, ch, eid, data, origin)
            self._deliver(ch, data)

    def _entry(self, handler, ch: bytes, eid: bytes, data: bytes, origin: bytes) -> None:
        key = self._keys.get(ch)
        env = unpack_envelope(data)
        if key is None or env is None:
            return
        try:
            handler(key, eid.decode(), env[1], origin.decode("utf-8", "replace"))
        except Exception:
            log.exception("fastws: broker entry handler failed")

    def set_entry_handler(self, handler) -> None:
        """``handler(key, entry_id: str, payload: bytes, origin: str)`` for
        every entry read, this node's own included, before the plain handler
        (see :class:`~fastws.broker.History`); None: no calls."""
        self._entry_handler = handler

    def last_id(self, key):
        """The id (str) of the last entry of ``key``'s stream this node has read
        (during the handler call: of the entry being delivered), None if it
        does not read ``key``."""
        v = self._last.get(self.channel(key))
        return v.decode() if v is not None else None

    # -- publishing ------------------------------------------------------------------------

    def _publish_cmd(self, pub, ch, data):
        fut = pub.send(b"XADD", ch, b"MAXLEN", b"~", self.maxlen, b"*", b"d", data, b"n", next(self._seq))
        if self.ttl:
            now = self._loop.time()
            last = self._expiry.get(ch)
            if last is None or now - last >= self.ttl / 4:
                if last is None and len(self._expiry) >= 4096:
                    self._expiry = {c: t for c, t in self._expiry.items() if now - t < self.ttl / 4}
                self._expiry[ch] = now
                pub.send(b"PEXPIRE", ch, max(1, int(self.ttl * 1000))).add_done_callback(_ignore)
        return fut

    async def publish(self, key, payload: bytes):
        """Append to ``key``'s stream; the entry id (str). Raises PublishError."""
        r = await super().publish(key, payload)
        return r.decode() if isinstance(r, bytes) else r

    # -- history ----------------------------------------------------------------------------

    async def history(self, key, since_id=None, count: int = 100) -> HistoryPage:
        """The last ``count`` entries of ``key``'s stream, or up to ``count``
        entries after ``since_id``; oldest first (see the module doc).
        Raises :class:`~fastws.broker.BrokerError` when Redis cannot be asked."""
        if count < 1:
            raise ValueError("count must be >= 1")
        pub = self._pub
        if pub is None or pub.closed or self.state != "connected":
            raise BrokerError(f"broker history unavailable ({self.state})")
        ch = self.channel(key)
        since = None if since_id is None else parse_id(since_id)
        try:
            if since is None:
                rows = await asyncio.wait_for(pub.send(b"XREVRANGE", ch, b"+", b"-", b"COUNT", count),
                                              ACK_TIMEOUT)
                info = None
                if isinstance(rows, list):
                    rows.reverse()
            else:
                start = id_after(since)
                # XRANGE before XINFO: if nothing after since_id was trimmed when
                # XINFO ran, nothing was when XRANGE ran either
                rows, info = await asyncio.wait_for(asyncio.gather(*pub.pipeline([
                    (b"XRANGE", ch, start, b"+", b"COUNT", count), (b"XINFO", b"STREAM", ch)])), ACK_TIMEOUT)
        except (ConnectionError, asyncio.TimeoutError) as exc:
            raise BrokerError(f"broker history failed: {exc or 'timeout'}") from None
        if isinstance(rows, ReplyError):
            raise BrokerError(f"broker history failed: {rows}")
        out = HistoryPage()
        for eid, fields in rows or ():
            data, _ = entry_fields(fields)
            env = unpack_envelope(data) if data is not None else None
            if env is not None:
                out.append(Entry(bytes(eid).decode(), env[1], env[0].decode("utf-8", "replace")))
        if since is not None and isinstance(info, list):
            out.complete = _complete(dict(zip(info[::2], info[1::2], strict=False)), since)
        return out


def _complete(info: dict, since: tuple) -> bool:
    """From ``XINFO STREAM``: is no entry after ``since`` gone? Trimming
    removes the oldest entries, so none after ``since`` is gone if the first
    entry left is not after it, or if nothing was ever removed (Redis 7
    ``entries-added``); ``max-deleted-entry-id`` covers ``XDEL``."""
    deleted = info.get(b"max-deleted-entry-id")
    if deleted is not None and parse_id(deleted) > since:
        return False
    first = info.get(b"first-entry")
    if first and parse_id(first[0]) <= since:
        return True
    added = info.get(b"entries-added")
    return added is not None and added == info.get(b"length")
