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
        self.tasks: set = set()

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        self.pool.close()

    def batch_size(self) -> int:
        return self.max_batch

    def submit(self, batches) -> None:
        loop = self.gw.loop
        for batch in batches:
            task = loop.create_task(self._post(batch))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _post(self, batch) -> None:
        gw = self.gw
        frags = batch.frags
        batched = len(frags) > 1
        body = (batch_body(frags) if batched else frags[0]).encode()
        batch.sent_at = time.perf_counter()
        try:
            status, headers, data, answered_at = await self.pool.post(body)
            if status == 503:
                raise Unseen("the backend answered 503")
            if status != 200:
                where = dict(headers).get(b"location") if 300 <= status < 400 else None
                raise Failed(f"the backend answered HTTP {status}" + (
                    f" (a redirect to {where.decode('latin-1')}: give --gateway that URL)" if where else ""))
            results = results_of(data, len(frags), batched)
        except BackendError as exc:
            gw.batch_failed(batch, exc)
            return
        except AnswerError as exc:
            gw.batch_failed(batch, Failed(f"malformed answer: {exc}"))
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:      # a bug here must not leave the batch out forever
            gw.batch_failed(batch, exc)
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
    connection's queue bounds what piles up behind it)."""

    kind = "streams"

    def __init__(self, gateway) -> None:
        self.gw = gateway
        self.redis_url, self.stream, self.group = streams_url(gateway.url)
        self.redis = None
        self.reply_key = ""
        self.waiting: dict = {}     # entry id -> batch
        self.early: dict = {}       # entry id -> (answers, answered_at): came before we knew the entry
        self.tasks: set = set()
        self.reader = None
        self.ready = False          # the group and the reply stream exist
        self.running = False
        self.error = ""

    async def start(self) -> None:
        try:
            import redis.asyncio as aioredis
        except ImportError:
            raise ImportError("the Streams transport needs the redis package: pip install 'fastws[redis]'") \
                from None
        self.redis = aioredis.from_url(self.redis_url, decode_responses=False)
        self.reply_key = reply_stream(self.stream, self.gw.node_id)
        self.running = True
        try:
            await self._setup()
        except Exception as exc:       # Redis down at start: the reader sets up when it is back
            self.error = mask_url(str(exc))
            log.warning("fastws: gateway: Redis %s is not reachable (%s); retrying", mask_url(self.redis_url),
                        self.error)
        self.reader = self.gw.loop.create_task(self._read_answers())

    async def _setup(self) -> None:
        r = self.redis
        try:
            await r.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except Exception as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        try:                            # the reply stream exists (workers answer with NOMKSTREAM)
            await r.xgroup_create(self.reply_key, "gateway", id="$", mkstream=True)
        except Exception as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        await r.expire(self.reply_key, REPLY_TTL)
        self.ready = True
        self.error = ""

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
        if self.redis is not None:
            try:
                await asyncio.wait_for(self.redis.delete(self.reply_key), 2)
            except Exception:
                pass
            try:
                await self.redis.aclose()
            except Exception:
                pass

    def batch_size(self) -> int:
        return self.gw.batch

    def submit(self, batches) -> None:
        task = self.gw.loop.create_task(self._add(batches))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _add(self, batches) -> None:
        gw = self.gw
        now = time.perf_counter()
        try:
            if not self.ready:
                await self._setup()
            pipe = self.redis.pipeline(transaction=False)
            for b in batches:
                b.sent_at = now
                pipe.xadd(self.stream, {"e": "[" + ",".join(b.frags) + "]", "r": self.reply_key})
            ids = await pipe.execute()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.error = mask_url(str(exc))
            for b in batches:
                gw.batch_failed(b, Unseen(f"Redis: {self.error}"))
            return
        for b, eid in zip(batches, ids, strict=True):
            eid = eid.decode() if isinstance(eid, bytes) else str(eid)
            early = self.early.pop(eid, None)
            if early is not None:
                self._answered(b, *early)
            else:
                self.waiting[eid] = b

    async def _read_answers(self) -> None:
        last = "0-0"
        backoff = 0.05
        trimmed_at = time.monotonic()
        refreshed_at = time.monotonic()
        while self.running:
            try:
                if not self.ready:
                    await self._setup()
                got = await self.redis.xread({self.reply_key: last}, count=1000, block=1000)
                backoff = 0.05
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.error = mask_url(str(exc))
                self.ready = False
                await asyncio.sleep(backoff)
                backoff = min(2.0, backoff * 2)
                continue
            now = time.perf_counter()
            for _key, entries in got or ():
                for rid, fields in entries:
                    last = rid.decode() if isinstance(rid, bytes) else rid
                    eid = fields.get(b"i")
                    answers = fields.get(b"a")
                    if eid is None or answers is None:
                        continue
                    eid = eid.decode()
                    batch = self.waiting.pop(eid, None)
                    if batch is None:
                        self._keep_early(eid, answers, now)
                    else:
                        self._answered(batch, answers, now)
            mono = time.monotonic()
            if mono - trimmed_at > 1.0 and last != "0-0":
                trimmed_at = mono
                try:
                    await self.redis.xtrim(self.reply_key, minid=last, approximate=False)
                except Exception:
                    pass
            if mono - refreshed_at > REPLY_TTL / 6:
                refreshed_at = mono
                try:
                    await self.redis.expire(self.reply_key, REPLY_TTL)
                except Exception:
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
        try:
            await asyncio.wait_for(self.redis.ping(), self.gw.timeout)
        except Exception:
            return False
        return True

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
