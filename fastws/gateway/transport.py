"""How the gateway's batches of events reach the backend, and the answers come back.

A transport is made for a :class:`~fastws.gateway.service.Gateway` by
:func:`make_transport` (from the scheme of its URL) and offers:

* ``submit(batches)``: send them (never blocks); for each batch, later,
  ``gateway.batch_done(batch, answers, answered_at)`` or
  ``gateway.batch_failed(batch, exc)`` (``exc.unseen``: the backend cannot
  have seen it);
* ``batch_size()``: how many events a batch may carry now;
* ``start()``, ``stop()``, ``probe()`` (is the backend reachable?),
  ``late()`` (batches unanswered past the timeout), ``describe()`` (for
  /health).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from ..broker.redis import ReplyError, link_problem, open_conn, parse_redis_url
from ..config import mask_url
from .http import BackendError, Failed, HttpPool, Unseen
from .wire import BATCH_HEADER, DEFAULT_GROUP, DEFAULT_STREAM, AnswerError, batch_body, reply_stream, results_of

log = logging.getLogger("fastws.gateway")

__all__ = ["make_transport", "HttpTransport", "StreamsTransport", "streams_url"]

_BATCH_HEADER = BATCH_HEADER.encode()
#: seconds a reply stream lives without its node refreshing it
REPLY_TTL = 60
#: answers that came for no entry out (early, or duplicates) kept at most, and for how long
EARLY_MAX, EARLY_AGE = 10000, 30.0
#: seconds between attempts to reach Redis again
BACKOFF_MIN, BACKOFF_MAX = 0.05, 2.0


def make_transport(gateway):
    scheme = urlsplit(gateway.url).scheme.lower()
    if scheme in ("http", "https"):
        return HttpTransport(gateway)
    return StreamsTransport(gateway)


class HttpTransport:
    """Events as JSON POSTs over a keep-alive pool (:class:`~fastws.gateway.http.HttpPool`)."""

    kind = "http"

    def __init__(self, gateway) -> None:
        self.gw = gateway
        self.pool = HttpPool(gateway.url, size=gateway.concurrency, timeout=gateway.timeout, token=gateway.token)
        self.max_batch = 1          # until the backend's answer says it takes batches

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        self.pool.close()

    def batch_size(self) -> int:
        return self.max_batch

    def submit(self, batches) -> None:
        for batch in batches:
            frags = batch.frags
            batched = len(frags) > 1
            body = (batch_body(frags) if batched else frags[0]).encode()
            batch.sent_at = time.perf_counter()
            self.pool.send(body, lambda result, exc, batch=batch, batched=batched:
                           self._answered(batch, batched, result, exc))

    def _answered(self, batch, batched: bool, result, exc) -> None:
        """The request of ``batch`` ended: its answers, or why not (runs as the answer is read)."""
        gw = self.gw
        if exc is not None:
            gw.batch_failed(batch, exc)
            return
        status, headers, data, answered_at = result
        try:
            if status == 503:
                raise Unseen("the backend answered 503")
            if status != 200:
                where = dict(headers).get(b"location") if 300 <= status < 400 else None
                raise Failed(f"the backend answered HTTP {status}" + (
                    f" (a redirect to {where.decode('latin-1')}: give --gateway that URL)" if where else ""))
            results = results_of(data, len(batch.frags), batched)
        except BackendError as exc:
            gw.batch_failed(batch, exc)
            return
        except AnswerError as exc:
            gw.batch_failed(batch, Failed(f"malformed answer: {exc}"))
            return
        self._opt_in(headers)
        gw.batch_done(batch, results, answered_at)

    def _opt_in(self, headers) -> None:
        """The backend takes batches when its answer says so (and until one does not)."""
        for name, value in headers:
            if name == _BATCH_HEADER:
                try:
                    self.max_batch = max(1, min(self.gw.batch, int(value)))
                except ValueError:
                    self.max_batch = 1
                return
        self.max_batch = 1

    async def probe(self) -> bool:
        return await self.pool.probe()

    def late(self) -> int:
        return 0                    # the pool's timeout fails a late request

    def describe(self) -> dict:
        return {"batch": self.max_batch, "connections": len(self.pool.open)}


def streams_url(url: str) -> tuple:
    """``(redis URL without the gateway's options, stream, group)``."""
    u = urlsplit(url)
    q = dict(parse_qsl(u.query))
    base = urlunsplit((u.scheme, u.netloc, u.path, "", ""))
    return base, q.get("stream") or DEFAULT_STREAM, q.get("group") or DEFAULT_GROUP


class StreamsTransport:
    """Events as entries of a Redis Stream, read by a consumer group of
    workers (:func:`fastws.gateway.run_worker`); the answers come on this
    node's own reply stream (``<stream>:replies:<node id>``, expiring
    ``REPLY_TTL`` seconds after this node stops refreshing it).  An entry in
    Redis is never lost: it waits for a worker however long it takes (the
    connection's queue bounds what piles up behind it).

    Two connections of fastws's own RESP client
    (:class:`fastws.broker.redis.RespConn`): one writes the XADD commands of a
    loop iteration's batches at once, in the iteration that made them (one
    pipelined write, no task), the other waits on the reply stream (``XREAD
    BLOCK``) and carries out each answer as it is read.  A write that fails
    because Redis is unreachable sends its batches back to their queues
    (:class:`~fastws.gateway.http.Unseen`); an ``XADD`` whose reply was lost
    with the connection may then be in the stream twice (events are handled
    at least once; their ``id`` tells a repeat)."""

    kind = "streams"

    def __init__(self, gateway) -> None:
        self.gw = gateway
        self.redis_url, self.stream, self.group = streams_url(gateway.url)
        self.opts = None            # host, port, db, credentials, TLS of the URL
        self.cmd = None             # RespConn for XADD and the upkeep
        self.rd = None              # RespConn blocked in XREAD on the reply stream
        self.reply_key = ""
        self.waiting: dict = {}     # entry id -> batch
        self.early: dict = {}       # entry id -> (answers, answered_at): came before we knew the entry
        self.tasks: set = set()
        self.reader = None
        self.ready = False          # connected, the group and the reply stream exist
        self.running = False
        self.error = ""
        self.last = "0-0"           # the last answer entry read

    async def start(self) -> None:
        self.opts = parse_redis_url(self.redis_url)
        self.reply_key = reply_stream(self.stream, self.gw.node_id)
        self.running = True
        try:
            await self._connect()
        except Exception as exc:       # Redis down at start: the reader connects when it is back
            self.error = link_problem(exc)
            log.warning("fastws: gateway: Redis %s is %s; retrying", mask_url(self.redis_url), self.error)
        self.reader = self.gw.loop.create_task(self._read_answers())
        upkeep = self.gw.loop.create_task(self._upkeep())
        self.tasks.add(upkeep)
        upkeep.add_done_callback(self.tasks.discard)

    async def _connect(self) -> None:
        """Both connections, the consumer group and the reply stream."""
        self._drop()
        o = self.opts
        kw = {"ssl": o["ssl"], "username": o["username"], "password": o["password"], "db": o["db"],
              "timeout": max(2.0, self.gw.timeout)}
        cmd = await open_conn(o["host"], o["port"], **kw)
        try:
            rd = await open_conn(o["host"], o["port"], **kw)
        except BaseException:
            cmd.close()
            raise
        self.cmd, self.rd = cmd, rd
        for args in (("XGROUP", "CREATE", self.stream, self.group, "0", "MKSTREAM"),
                     # the reply stream exists (workers answer with NOMKSTREAM); an empty group makes it
                     ("XGROUP", "CREATE", self.reply_key, "gateway", "$", "MKSTREAM")):
            r = await asyncio.wait_for(cmd.send(*args), kw["timeout"])
            if isinstance(r, ReplyError) and "BUSYGROUP" not in str(r):
                raise r
        await asyncio.wait_for(cmd.send("EXPIRE", self.reply_key, REPLY_TTL), kw["timeout"])
        self.ready = True
        self.error = ""

    def _drop(self) -> None:
        self.ready = False
        for conn in (self.cmd, self.rd):
            if conn is not None:
                conn.close()
        self.cmd = self.rd = None

    async def stop(self) -> None:
        self.running = False
        for task in list(self.tasks):
            task.cancel()
        if self.reader is not None:
            self.reader.cancel()
            try:
                await self.reader
            except (asyncio.CancelledError, Exception):
                pass
        if self.cmd is not None and not self.cmd.closed:
            try:
                await asyncio.wait_for(self.cmd.send("DEL", self.reply_key), 2)
            except Exception:
                pass
        self._drop()

    def batch_size(self) -> int:
        return self.gw.batch

    def submit(self, batches) -> None:
        gw = self.gw
        cmd = self.cmd
        now = time.perf_counter()
        if cmd is None or cmd.closed or not self.ready:
            for b in batches:
                gw.batch_failed(b, Unseen(f"Redis: {self.error or 'not connected'}"))
            return
        key, reply_key = self.stream, self.reply_key
        futs = cmd.pipeline([("XADD", key, "*", "e", "[" + ",".join(b.frags) + "]", "r", reply_key)
                             for b in batches])
        for b, fut in zip(batches, futs, strict=True):
            b.sent_at = now
            fut.add_done_callback(lambda f, b=b: self._added(b, f))

    def _added(self, batch, fut) -> None:
        """Redis answered the XADD of ``batch``: its entry id, or an error."""
        exc = fut.exception()
        reply = None if exc is not None else fut.result()
        if exc is not None or isinstance(reply, ReplyError):
            self.error = mask_url(str(exc or reply))
            self.gw.batch_failed(batch, Unseen(f"Redis: {self.error}"))
            return
        eid = reply.decode() if isinstance(reply, bytes) else str(reply)
        early = self.early.pop(eid, None)
        if early is not None:
            self._answered(batch, *early)
        else:
            self.waiting[eid] = batch

    async def _read_answers(self) -> None:
        backoff = BACKOFF_MIN
        while self.running:
            try:
                if not self.ready or self.rd is None or self.rd.closed:
                    await self._connect()
                got = await self.rd.send("XREAD", "COUNT", 1000, "BLOCK", 1000, "STREAMS", self.reply_key,
                                         self.last)
                if isinstance(got, ReplyError):
                    raise got
                backoff = BACKOFF_MIN
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.error = link_problem(exc)
                self._drop()
                await asyncio.sleep(backoff)
                backoff = min(BACKOFF_MAX, backoff * 2)
                continue
            now = time.perf_counter()
            for _key, entries in got or ():
                for rid, fields in entries:
                    self.last = rid.decode() if isinstance(rid, bytes) else rid
                    f = dict(zip(fields[::2], fields[1::2], strict=True))
                    eid, answers = f.get(b"i"), f.get(b"a")
                    if eid is None or answers is None:
                        continue
                    eid = eid.decode()
                    batch = self.waiting.pop(eid, None)
                    if batch is None:
                        self._keep_early(eid, answers, now)
                    else:
                        self._answered(batch, answers, now)

    async def _upkeep(self) -> None:
        """Beside the reading: trim the answers read from the reply stream,
        and keep the stream alive (its TTL), now and then."""
        ticks = 0
        while self.running:
            await asyncio.sleep(1.0)
            ticks += 1
            cmd = self.cmd
            if cmd is None or cmd.closed:
                continue
            try:
                if self.last != "0-0":
                    cmd.send("XTRIM", self.reply_key, "MINID", self.last)
                if ticks % (REPLY_TTL // 6) == 0:
                    cmd.send("EXPIRE", self.reply_key, REPLY_TTL)
            except ConnectionError:
                pass

    def _keep_early(self, eid: str, answers: bytes, now: float) -> None:
        early = self.early
        if len(early) >= EARLY_MAX:
            for k in [k for k, (_, t) in early.items() if now - t > EARLY_AGE] or list(early)[:EARLY_MAX // 10]:
                del early[k]
        early[eid] = (answers, now)

    def _answered(self, batch, answers: bytes, answered_at: float) -> None:
        try:
            results = json.loads(answers)
            if type(results) is not list or len(results) != len(batch.items):
                raise AnswerError(f"an answer entry holds a JSON array of {len(batch.items)} answers")
        except (ValueError, AnswerError) as exc:
            self.gw.batch_failed(batch, Failed(f"malformed answer: {exc}"))
            return
        self.gw.batch_done(batch, results, answered_at)

    async def probe(self) -> bool:
        cmd = self.cmd
        if cmd is None or cmd.closed:
            return False
        try:
            r = await asyncio.wait_for(cmd.send("PING"), self.gw.timeout)
        except Exception:
            return False
        return not isinstance(r, ReplyError)

    def late(self) -> int:
        if not self.waiting:
            return 0
        now = time.perf_counter()
        limit = self.gw.timeout
        return sum(1 for b in self.waiting.values() if now - b.sent_at > limit)

    def describe(self) -> dict:
        out = {"stream": self.stream, "group": self.group, "entries_waiting": len(self.waiting)}
        if self.error:
            out["redis_error"] = self.error
        return out
