"""The Redis Cluster broker: sharded pub/sub (``redis+cluster://h:p[,h:p...]``).

Channels are hashed to slots like keys, so rooms spread over the shards and a
publish (``SPUBLISH``, one command) only touches the shard that owns its
channel. The broker keeps the slot map (``CLUSTER SLOTS``), one publishing and
one subscriber connection per master (the RESP client of
:mod:`fastws.broker.redis`), and for every channel the master it is
``SSUBSCRIBE``\\ d on.

Following slot moves: a ``MOVED``/``ASK`` answer to ``SPUBLISH`` is retried
on the node it names; a ``sunsubscribe`` the server sends by itself (Redis
does when a slot leaves a node), an error answer on a subscriber link or a
lost link marks the map dirty; the broker then re-reads ``CLUSTER SLOTS`` and
re-subscribes the channels whose owner changed. The map is also re-read every
``refresh_interval`` seconds. Outages: as the Redis broker (failures counted
and raised, backoff with jitter, ``state``, "authentication failed" told
apart from "not reachable", the URL printed with its password masked).
"""

from __future__ import annotations

import asyncio
import logging
from urllib.parse import urlsplit

from ..config import mask_url
from ..errors import BrokerURLError, PublishError
from .base import Broker, backoff_delay
from .redis import (
    ACK_TIMEOUT,
    URL_OPTIONS,
    RedisBroker,
    ReplyError,
    RespConn,
    is_auth_error,
    open_conn,
    parse_hosts,
    tls_context,
    url_options,
)
from .wire import key_slot

log = logging.getLogger("fastws.broker")


#: The query options of a ``redis+cluster://`` URL (TLS ones, with ``rediss+cluster``).
CLUSTER_URL_OPTIONS = {k: v for k, v in URL_OPTIONS.items() if k != "db"}
CLUSTER_URL_FORM = "redis+cluster://[user:password@]host[:port][,host[:port]...][?option=value&...]"


def parse_cluster_url(url: str):
    """``[(host, port), ...]`` seeds and the connection options.  Every part
    is checked (each seed's host and port, no database: a cluster has only
    db 0, each option known); a bad one raises
    :class:`~fastws.errors.BrokerURLError`."""
    safe = mask_url(url)
    u = urlsplit(url)
    if u.scheme.lower() not in ("redis+cluster", "rediss+cluster"):
        raise BrokerURLError(safe, f"scheme {u.scheme!r} is not a Redis Cluster scheme",
                             f"expected {CLUSTER_URL_FORM}")
    q = url_options(url, CLUSTER_URL_OPTIONS, CLUSTER_URL_FORM)
    if u.path.strip("/"):
        raise BrokerURLError(safe, f"unexpected path {u.path!r}",
                             f"a cluster has only database 0: expected {CLUSTER_URL_FORM}")
    creds, seeds = parse_hosts(url, "seed", 6379, CLUSTER_URL_FORM)
    opts = {**creds, "ssl": tls_context(url, u.scheme.lower().startswith("rediss"), q)}
    return seeds, opts


class ClusterBroker(Broker):
    SPUBLISH = b"SPUBLISH"

    def __init__(self, url: str, *, node_id=None, prefix: str = "", connect_timeout: float = 2.0,
                 backoff_min: float = 0.05, backoff_max: float = 5.0, refresh_interval: float = 5.0) -> None:
        super().__init__(node_id=node_id, prefix=prefix)
        self.url = url
        self.safe_url = mask_url(url)              # what logs and errors print
        self.problem = None                        # why it is not connected, or None
        self.seeds, self.conn_opts = parse_cluster_url(url)
        self.connect_timeout = connect_timeout
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.refresh_interval = refresh_interval   # re-read the slot map this often
        self._slots: list = [None] * 16384         # slot -> (host, port) of its master
        self._pubs: dict = {}                      # addr -> RespConn (SPUBLISH)
        self._subs: dict = {}                      # addr -> RespConn (SSUBSCRIBE, push mode)
        self._assigned: dict = {}                  # channel -> addr it is subscribed on (acked)
        self._sub_waiters: dict = {}               # (addr, channel) -> [futures]
        self._unsub_waiters: dict = {}
        self._task = None
        self._closing = False
        self._dirty = None                         # asyncio.Event: re-read the map, re-subscribe
        self._lock = None                          # one reconcile at a time

    # -- lifecycle ----------------------------------------------------------------

    async def start(self) -> None:
        if self._task is not None and not self._task.done():
            return                               # started already
        self._loop = asyncio.get_running_loop()
        self._dirty = asyncio.Event()
        self._lock = asyncio.Lock()
        self._connected = asyncio.Event()
        self._task = self._loop.create_task(self._run())
        try:
            await asyncio.wait_for(self._connected.wait(), self.connect_timeout * 2 + 1.0)
        except asyncio.TimeoutError:
            if not is_auth_error(self.problem or ""):   # an authentication failure is logged already
                log.warning("fastws: cluster broker %s not reachable yet; retrying", self.safe_url)

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            self._dirty.set()        # wakes the loop even if a cancel is swallowed by wait_for
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        for c in list(self._pubs.values()) + list(self._subs.values()):
            c.on_lost = None
            c.close()
        self._pubs.clear()
        self._subs.clear()
        self._release(self._sub_waiters)
        self._release(self._unsub_waiters)
        self._set_state("closed")

    async def _run(self) -> None:
        attempt = 0
        ever = False
        while not self._closing:
            self._dirty.clear()      # before the refresh: a move noticed during it is not lost
            try:
                async with self._lock:
                    await self._refresh()
                    await self._reconcile()
            except (OSError, asyncio.TimeoutError, ConnectionError, ReplyError) as exc:
                self._link_failed(exc)
                if self.state == "connected":
                    log.warning("fastws: lost the cluster at %s (%s); reconnecting", self.safe_url, exc)
                self._set_state("disconnected")
                self._connected.clear()
                await asyncio.sleep(backoff_delay(attempt, self.backoff_min, self.backoff_max))
                attempt += 1
                continue
            if self.state != "connected":
                if ever:
                    self.counters["reconnects"] += 1
                    log.warning("fastws: cluster broker reconnected to %s", self.safe_url)
                ever = True
                self.problem = None
                self._set_state("connected")
                self._connected.set()
            attempt = 0
            try:
                await asyncio.wait_for(self._dirty.wait(), self.refresh_interval)
            except asyncio.TimeoutError:
                pass

    _link_failed = RedisBroker._link_failed     # remember why; authentication failures at warning

    def _mark_dirty(self) -> None:
        if self._dirty is not None:
            self._dirty.set()

    # -- topology -----------------------------------------------------------------

    async def _connect(self, addr, push: bool):
        o = self.conn_opts
        conn = await open_conn(addr[0], addr[1], ssl=o["ssl"], username=o["username"],
                               password=o["password"], timeout=self.connect_timeout)
        if push:
            conn.push_mode = True
            conn.on_push = lambda r, addr=addr: self._on_push(addr, r)
        conn.on_lost = lambda exc, addr=addr, push=push: self._on_lost(addr, push)
        return conn

    def _on_lost(self, addr, push: bool) -> None:
        if push:
            self._subs.pop(addr, None)
            for ch in [c for c, a in self._assigned.items() if a == addr]:
                del self._assigned[ch]
            for d in (self._sub_waiters, self._unsub_waiters):
                for k in [k for k in d if k[0] == addr]:
                    for f in d.pop(k):
                        if not f.done():
                            f.set_result(None)
        else:
            self._pubs.pop(addr, None)
        if not self._closing:
            self._set_state("disconnected")
            self._mark_dirty()

    async def _refresh(self) -> None:
        """Read the slot map from a known node or a seed."""
        candidates = list(dict.fromkeys(list(self._pubs) + self.seeds))
        last = None
        for addr in candidates:
            conn = self._pubs.get(addr)
            temp = None
            try:
                if conn is None:
                    conn = temp = await self._connect(addr, False)
                    temp.on_lost = None
                r = await asyncio.wait_for(conn.send(b"CLUSTER", b"SLOTS"), self.connect_timeout)
            except (OSError, asyncio.TimeoutError, ConnectionError) as exc:
                if last is None or not is_auth_error(last):   # a refused password is the news
                    last = exc
                continue
            finally:
                if temp is not None:
                    temp.close()
            if isinstance(r, ReplyError):
                if last is None or not is_auth_error(last):
                    last = r
                continue
            slots = [None] * 16384
            for entry in r:
                start, end, master = entry[0], entry[1], entry[2]
                host = master[0].decode() if master[0] else addr[0]
                for s in range(start, end + 1):
                    slots[s] = (host, int(master[1]))
            if any(s is None for s in slots):
                last = ConnectionError("the cluster does not cover every slot")
                continue
            self._slots = slots
            return
        raise last or ConnectionError("no cluster node reachable")

    async def _reconcile(self) -> None:
        """Connections to every master; every wanted channel subscribed on
        the master of its slot, nothing else."""
        masters = set(self._slots)
        for addr in masters:
            if addr not in self._pubs:
                self._pubs[addr] = await self._connect(addr, False)
            if addr not in self._subs:
                self._subs[addr] = await self._connect(addr, True)
        for addr in list(self._pubs):
            if addr not in masters:
                c = self._pubs.pop(addr)
                c.on_lost = None
                c.close()
        # moves: subscribe where the slot is now, unsubscribe where it was
        to_sub, to_unsub = [], []
        for ch in self._keys:
            owner = self._slots[key_slot(ch)]
            was = self._assigned.get(ch)
            if was != owner:
                to_sub.append(ch)
                if was is not None:
                    to_unsub.append((was, ch))
        for ch, was in list(self._assigned.items()):
            if ch not in self._keys:
                to_unsub.append((was, ch))
        acks = self._ssub(to_sub) + self._sunsub(to_unsub)
        if acks:
            await asyncio.wait_for(asyncio.gather(*acks), ACK_TIMEOUT)

    # -- subscriptions ---------------------------------------------------------------

    def _on_push(self, addr, r) -> None:
        if isinstance(r, list) and r:
            kind = r[0]
            if kind == b"smessage":
                self._deliver(r[1], r[2])
            elif kind == b"ssubscribe":
                self._assigned[r[1]] = addr
                self._ack(self._sub_waiters, (addr, r[1]))
            elif kind == b"sunsubscribe":
                if self._assigned.get(r[1]) == addr:
                    del self._assigned[r[1]]
                if (addr, r[1]) in self._unsub_waiters:
                    self._ack(self._unsub_waiters, (addr, r[1]))
                elif r[1] in self._keys:      # the server dropped us: the slot moved
                    log.info("fastws: cluster broker: %r moved; re-subscribing", r[1])
                    self._mark_dirty()
        elif isinstance(r, ReplyError):
            # MOVED/CROSSSLOT for an SSUBSCRIBE: the map changed under us
            log.info("fastws: cluster broker: %s from %s:%d; refreshing the slot map", r, *addr)
            for k in [k for k in self._sub_waiters if k[0] == addr]:
                self._ack(self._sub_waiters, k)
            self._mark_dirty()

    @staticmethod
    def _ack(waiters, k) -> None:
        for f in waiters.pop(k, ()):
            if not f.done():
                f.set_result(None)

    @staticmethod
    def _release(waiters) -> None:
        for futs in waiters.values():
            for f in futs:
                if not f.done():
                    f.set_result(None)
        waiters.clear()

    def _group(self, pairs, cmd: bytes, waiters: dict) -> list:
        """Send ``cmd`` for (addr, channel) pairs: one command per slot (the
        server wants one slot per command), one write per node."""
        by_node: dict = {}
        for addr, ch in pairs:
            by_node.setdefault(addr, {}).setdefault(key_slot(ch), []).append(ch)
        futs = []
        for addr, slots in by_node.items():
            conn = self._subs.get(addr)
            if conn is None or conn.closed:
                self._mark_dirty()
                continue
            for chans in slots.values():
                for ch in chans:
                    f = self._loop.create_future()
                    waiters.setdefault((addr, ch), []).append(f)
                    futs.append(f)
            conn.send_many([(cmd, *chans) for chans in slots.values()])
        return futs

    def _ssub(self, chans) -> list:
        return self._group([(self._slots[key_slot(ch)], ch) for ch in chans], b"SSUBSCRIBE",
                           self._sub_waiters)

    def _sunsub(self, pairs) -> list:
        return self._group(pairs, b"SUNSUBSCRIBE", self._unsub_waiters)

    async def subscribe(self, keys) -> None:
        chans = []
        for key in keys:
            ch = self.channel(key)
            self._keys[ch] = key
            chans.append(ch)
        if chans and self.state == "connected":
            futs = self._ssub(chans)
            if futs:
                try:
                    await asyncio.wait_for(asyncio.gather(*futs), ACK_TIMEOUT)
                except asyncio.TimeoutError:
                    self._mark_dirty()

    async def unsubscribe(self, keys) -> None:
        pairs = []
        for key in keys:
            ch = self.channel(key)
            if self._keys.pop(ch, None) is None:
                continue
            addr = self._assigned.get(ch)
            if addr is not None:
                pairs.append((addr, ch))
        if pairs and self.state == "connected":
            futs = self._sunsub(pairs)
            if futs:
                try:
                    await asyncio.wait_for(asyncio.gather(*futs), ACK_TIMEOUT)
                except asyncio.TimeoutError:
                    self._mark_dirty()

    # -- publishing --------------------------------------------------------------------

    def _send_publish(self, ch: bytes, data: bytes):
        addr = self._slots[key_slot(ch)]
        conn = self._pubs.get(addr) if addr is not None else None
        if conn is None or conn.closed or self.state != "connected":
            raise self._fail("not connected")
        return conn.send(self.SPUBLISH, ch, data)

    def _first(self, key, payload: bytes):
        """Count and send at once (call order = wire order); raises PublishError."""
        self.counters["publishes"] += 1
        ch = self.channel(key)
        data = self._envelope(payload)
        return ch, data, self._send_publish(ch, data)

    async def publish(self, key, payload: bytes):
        ch, data, fut = self._first(key, payload)
        try:
            r = await fut
        except ConnectionError as exc:
            raise self._fail(exc) from None
        return await self._settle(ch, data, r)

    async def _settle(self, ch: bytes, data: bytes, r):
        """Follow MOVED/ASK answers (at most 3); the reply or PublishError."""
        for _ in range(3):
            if not isinstance(r, ReplyError):
                return r
            msg = str(r)
            if not msg.startswith(("MOVED", "ASK")):
                raise self._fail(r)
            _, slot, where = msg.split()[:3]
            host, _, port = where.rpartition(":")
            addr = (host or self.seeds[0][0], int(port))
            if msg.startswith("MOVED"):
                self._slots[int(slot)] = addr
            self._mark_dirty()
            try:
                conn = self._pubs.get(addr)
                if conn is None or conn.closed:
                    conn = self._pubs[addr] = await self._connect(addr, False)
                if msg.startswith("ASK"):
                    conn.send(b"ASKING").add_done_callback(lambda f: f.cancelled() or f.exception())
                r = await conn.send(self.SPUBLISH, ch, data)
            except (OSError, asyncio.TimeoutError, ConnectionError, ReplyError) as exc:
                raise self._fail(exc) from None
        if isinstance(r, ReplyError):
            raise self._fail("too many redirections")
        return r

    def publish_nowait(self, key, payload: bytes):
        try:
            ch, data, fut = self._first(key, payload)
        except PublishError:
            return None

        def done(f):
            if f.cancelled() or f.exception() is not None:
                self.counters["failures"] += 1
            elif isinstance(f.result(), ReplyError):
                t = asyncio.ensure_future(self._settle(ch, data, f.result()))
                t.add_done_callback(lambda t: t.cancelled() or t.exception())

        fut.add_done_callback(done)
        return fut

    async def ping(self):
        if self.state != "connected":
            return False, self.problem or self.state
        try:
            for conn in list(self._pubs.values()):
                r = await asyncio.wait_for(conn.send(b"PING"), 1.0)
                if isinstance(r, ReplyError):
                    return False, str(r)
        except (asyncio.TimeoutError, ConnectionError) as exc:
            return False, f"ping failed: {exc}"
        return True, self.state


def is_cluster_url(url: str) -> bool:
    """``redis+cluster://`` or ``rediss+cluster://``."""
    return url.split("://", 1)[0].lower() in ("redis+cluster", "rediss+cluster")


async def open_owner(url: str, key: str | bytes, timeout: float = 2.0, on_push=None) -> RespConn:
    """A connection to the master of the Redis Cluster of ``url`` that owns
    ``key``'s slot (as ``CLUSTER SLOTS`` of the first seed that answers has
    it; a slot whose master failed is owned by the promoted replica once the
    cluster has promoted it, and refused until then)."""
    seeds, opts = parse_cluster_url(url)
    slot = key_slot(key.encode() if isinstance(key, str) else key)
    last: BaseException | None = None
    for host, port in seeds:
        try:
            conn = await open_conn(host, port, timeout=timeout, **opts)
        except (OSError, asyncio.TimeoutError, ConnectionError) as exc:
            last = exc
            continue
        try:
            r = await asyncio.wait_for(conn.send(b"CLUSTER", b"SLOTS"), timeout)
        except (OSError, asyncio.TimeoutError, ConnectionError) as exc:
            last = exc
            continue
        finally:
            conn.close()
        if isinstance(r, ReplyError):
            last = r
            continue
        for entry in r:
            if entry[0] <= slot <= entry[1]:
                master = entry[2]
                owner = master[0].decode() if master[0] else host
                return await open_conn(owner, int(master[1]), timeout=timeout, on_push=on_push, **opts)
        last = ConnectionError(f"no master owns slot {slot} (yet)")
    raise last or ConnectionError("no cluster node reachable")
