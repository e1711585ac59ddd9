"""The backend's side of gateway mode: write one handler, run it behind HTTP or on a stream.

A handler gets each event and an ``api`` for what to do about it::

    async def handle(event, api):
        if event.type == "connect":
            if event.query.get("token") != "secret":
                return Reject(403, "bad token")
            return Accept(user=event.query.get("user"), rooms=["lobby"])
        if event.type == "message":
            await api.publish("lobby", event.data)               # every member, every node
            await api.post_to_connection(event.connection_id, "sent")
        # "disconnect": event.code, event.reason

It may be ``async def`` or a plain function.  What it returns:

* for a connect: None or True (accept), False (refuse with 403),
  :class:`Accept` (subprotocol, user, rooms to join) or :class:`Reject`
  (status, reason);
* for a message: a str or bytes is the reply to the sender; None, nothing.

Everything done through ``api`` (:class:`Api`) travels back in the answer to
the event and is carried out by the gateway node that sent it, in order:
``post_to_connection`` (any connection, on any node: through the broker),
``publish`` (a room, on every node), ``join``/``leave`` (this connection),
``close`` (this connection or another).  An exception in the handler is
logged; a connect then gets 500, a message no answer.  After the handler
returned, ``api`` refuses more (use :class:`Client`, the HTTP API of any
node, for pushes that come later, e.g. from a background task).

Run it:

* behind HTTP (``--gateway http://...``): ``GatewayApp(handle)`` is an ASGI
  application; serve it alone (``uvicorn backend:app``) or mount it in
  FastAPI / Starlette (``api.mount("/fastws", GatewayApp(handle))``).  It
  takes batches (``Fastws-Gateway-Batch``), handles the events of different
  connections concurrently and those of one connection in order;
* on Redis Streams (``--gateway redis://...``): ``python -m fastws.gateway
  MODULE:HANDLER --url redis://...`` (or :func:`run_worker`), as many
  processes as you like: they share the stream's consumer group, each entry
  is handled by one of them and acknowledged after its answer is written
  (at least once: the entries of a worker that died are claimed by another
  after ``claim_idle`` seconds).
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import inspect
import json
import logging
import os
import signal
import socket
import time

from .http import BackendError, HttpPool
from .transport import streams_url
from .wire import CONNECT, DISCONNECT, MESSAGE, message_json, valid_close_code

log = logging.getLogger("fastws.gateway")

__all__ = ["Event", "Api", "Accept", "Reject", "GatewayApp", "Worker", "run_worker", "Client", "handle_events"]

#: the largest request body GatewayApp reads (bytes)
MAX_BODY = 64 << 20
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


class Accept:
    """A connect handler's "yes": the ``subprotocol`` to speak (one the
    client offered), the connection's ``user`` (``conn.store["user_id"]``,
    presence) and ``rooms`` to join."""

    __slots__ = ("subprotocol", "user", "rooms")

    def __init__(self, subprotocol: str | None = None, user: str | None = None, rooms=()) -> None:
        self.subprotocol, self.user, self.rooms = subprotocol, user, list(rooms)


class Reject:
    """A connect handler's "no": the HTTP ``status`` (400..599) and ``reason`` (the body)."""

    __slots__ = ("status", "reason")

    def __init__(self, status: int = 403, reason: str = "") -> None:
        if not 400 <= status <= 599:
            raise ValueError("a refusal's status is 400..599")
        self.status, self.reason = status, reason


class Event:
    """One event from the gateway (see :mod:`fastws.gateway.wire`).

    ``type`` ("connect", "message", "disconnect"), ``id``, ``connection_id``,
    ``route``, ``node``, ``user``; a message's ``data`` (str or bytes); a
    disconnect's ``code`` and ``reason``; a connect's ``headers``,
    ``query``, ``query_string``, ``cookies``, ``subprotocols``,
    ``remote_address``.  ``raw``: the event's JSON object."""

    __slots__ = ("type", "id", "connection_id", "route", "node", "user", "data", "code", "reason", "headers",
                 "query", "query_string", "cookies", "subprotocols", "remote_address", "raw")

    def __init__(self, raw: dict) -> None:
        self.raw = raw
        self.type = raw.get("type")
        self.id = raw.get("id")
        self.connection_id = raw.get("connection_id")
        self.route = raw.get("route")
        self.node = raw.get("node")
        self.user = raw.get("user")
        data = raw.get("text")
        if data is None and "base64" in raw:
            data = base64.b64decode(raw["base64"])
        self.data = data
        self.code = raw.get("code")
        self.reason = raw.get("reason")
        self.headers = raw.get("headers") or {}
        self.query = raw.get("query") or {}
        self.query_string = raw.get("query_string") or ""
        self.cookies = raw.get("cookies") or {}
        self.subprotocols = raw.get("subprotocols") or []
        self.remote_address = raw.get("remote_address")

    def __repr__(self) -> str:
        return f"Event({self.type} {self.connection_id} {self.route})"


class Api:
    """What a handler does about its event; carried by the answer (see the module docstring)."""

    __slots__ = ("event", "answer", "_done")

    def __init__(self, event: Event) -> None:
        self.event = event
        self.answer: dict = {}
        self._done = False

    def _add(self, key: str, value) -> None:
        if self._done:
            raise RuntimeError("this event was answered; push later with fastws.gateway.Client (the HTTP API)")
        self.answer.setdefault(key, []).append(value)

    async def post_to_connection(self, connection_id: str, data) -> None:
        """Send ``data`` (str: text, bytes: binary) to the connection ``connection_id``, on any node."""
        if connection_id == self.event.connection_id and self.event.type != DISCONNECT:
            self._add("reply", message_json(data))
        else:
            self._add("send", {"connection_id": connection_id, **message_json(data)})

    async def publish(self, room: str, data, *, namespace: str | None = None, exclude: str | None = None) -> None:
        """Send ``data`` to every member of ``room`` on every node (``exclude``: a connection id that
        does not get it; ``namespace``: default, the route's)."""
        entry = {"room": room, **message_json(data)}
        if namespace is not None:
            entry["namespace"] = namespace
        if exclude is not None:
            entry["exclude"] = exclude
        self._add("publish", entry)

    async def join(self, room: str) -> None:
        """The event's connection joins ``room`` (its route's namespace)."""
        self._add("join", room)

    async def leave(self, room: str) -> None:
        """The event's connection leaves ``room``."""
        self._add("leave", room)

    async def close(self, code: int = 1000, reason: str = "", *, connection_id: str | None = None) -> None:
        """Close the event's connection (or ``connection_id``, on any node) with ``code`` and ``reason``."""
        if not valid_close_code(code) or len(reason.encode()) > 123:
            raise ValueError("a close code a server may send (1000-1003, 1007-1014, 3000-4999) and a reason "
                             "of 123 bytes at most")
        if connection_id is None or connection_id == self.event.connection_id:
            if self._done:
                raise RuntimeError("this event was answered")
            self.answer["close"] = {"code": code, "reason": reason}
        else:
            self._add("disconnect", {"connection_id": connection_id, "code": code, "reason": reason})


def _answer_of(event: Event, api: Api, result) -> dict:
    answer = api.answer
    api._done = True
    if event.type == CONNECT:
        if result is False:
            answer["accept"] = False
        elif isinstance(result, Reject):
            answer.update(accept=False, status=result.status, reason=result.reason)
        elif isinstance(result, Accept):
            if result.subprotocol is not None:
                answer["subprotocol"] = result.subprotocol
            if result.user is not None:
                answer["user"] = str(result.user)
            if result.rooms:
                answer.setdefault("join", []).extend(result.rooms)
        elif isinstance(result, dict):
            answer.update(result)
    elif event.type == MESSAGE:
        if isinstance(result, (str, bytes, bytearray)):
            answer.setdefault("reply", []).append(message_json(result))
        elif isinstance(result, dict):
            answer.update(result)
    elif isinstance(result, dict):
        answer.update(result)
    return answer


def _failed(event: Event, api: Api, exc: Exception) -> dict:
    api._done = True
    log.error("fastws.gateway: the handler raised on a %s event of %s", event.type, event.connection_id,
              exc_info=exc)
    if event.type == CONNECT:
        return {"accept": False, "status": 500, "reason": "internal error"}
    return {}


class _Yield:
    """Awaiting it passes ``value`` (what a suspended coroutine yielded) up to
    the task and hands back what the task sends in."""

    __slots__ = ("value",)

    def __init__(self, value) -> None:
        self.value = value

    def __await__(self):
        return (yield self.value)


def _begin(handle, raw):
    """Run the handler on one event until it is done or first waits for
    something: ``(True, answer)`` or ``(False, (event, api, coroutine, what it
    yielded))``.  A handler that never really waits (the common case: ``api``
    calls complete at once) costs no task."""
    if type(raw) is not dict:
        return True, {}
    event = Event(raw)
    api = Api(event)
    try:
        result = handle(event, api)
        if inspect.isawaitable(result):
            coro = result if inspect.iscoroutine(result) else result.__await__()
            try:
                yielded = coro.send(None)
            except StopIteration as stop:
                result = stop.value
            else:
                return False, (event, api, coro, yielded)
    except Exception as exc:
        return True, _failed(event, api, exc)
    return True, _answer_of(event, api, result)


async def _resume(coro, yielded):
    """Go on with a coroutine that was started by hand and is waiting on
    ``yielded``; its result."""
    try:
        while True:
            try:
                sent = await _Yield(yielded)
            except BaseException as exc:
                yielded = coro.throw(exc)
            else:
                yielded = coro.send(sent)
    except StopIteration as stop:
        return stop.value


async def _complete(pending) -> dict:
    """Finish a handler :func:`_begin` left waiting (in the task that awaits this)."""
    event, api, coro, yielded = pending
    try:
        while True:
            try:
                sent = await _Yield(yielded)
            except BaseException as exc:        # the awaited thing failed, or the task is cancelled
                yielded = coro.throw(exc)
            else:
                yielded = coro.send(sent)
    except StopIteration as stop:
        return _answer_of(event, api, stop.value)
    except Exception as exc:
        return _failed(event, api, exc)


async def handle_events(handle, events: list) -> list:
    """The answers to ``events`` (JSON objects), in order: the events of one
    connection one after the other, different connections concurrently (a
    handler that waits for something holds up its connection's later events
    only; one that never waits runs without a task)."""
    answers: list = [None] * len(events)
    blocked: dict = {}          # connection id -> indexes of its events behind a waiting handler
    tasks = []
    for i, raw in enumerate(events):
        key = raw.get("connection_id") if type(raw) is dict else None
        behind = blocked.get(key)
        if behind is not None:
            behind.append(i)
            continue
        done, value = _begin(handle, raw)
        if done:
            answers[i] = value
        else:
            behind = blocked[key] = []
            tasks.append(_rest_of(handle, events, answers, i, value, behind))
    if tasks:
        await asyncio.gather(*tasks)
    return answers


async def _rest_of(handle, events, answers, first: int, pending, behind: list) -> None:
    """One connection's events from a waiting handler on, in order."""
    answers[first] = await _complete(pending)
    for j in behind:
        done, value = _begin(handle, events[j])
        answers[j] = value if done else await _complete(value)


class GatewayApp:
    """An ASGI application that answers the gateway's HTTP events with
    ``handle`` (see the module docstring).  ``token``: the
    ``--gateway-token`` the gateway sends (401 without it); ``batch``: the
    most events per request it takes (``Fastws-Gateway-Batch``; 1: none)."""

    def __init__(self, handle, *, token: str | None = None, batch: int = 1000) -> None:
        if not callable(handle):
            raise TypeError(f"handle must be callable, got {handle!r}")
        self.handle = handle
        self.token = token.encode() if token else None
        self.batch_header = [(b"content-type", b"application/json"),
                             (b"fastws-gateway-batch", str(max(1, batch)).encode())]
        self.events = 0          # events handled (for tests and operators)

    async def __call__(self, scope, receive, send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if kind != "http":
            return
        if scope["method"] != "POST":
            await _respond(send, 405, b'{"error": "POST the gateway\'s events here"}', [(b"allow", b"POST")])
            return
        if self.token is not None:
            auth = dict(scope["headers"]).get(b"authorization", b"")
            if not (auth[:7].lower() == b"bearer " and hmac.compare_digest(auth[7:].strip(), self.token)):
                await _respond(send, 401, b'{"error": "a gateway token is needed"}')
                return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > MAX_BODY:
                await _respond(send, 413, b'{"error": "body too large"}')
                return
            chunks.append(body)
            if not message.get("more_body"):
                break
        try:
            obj = json.loads(b"".join(chunks))
        except ValueError:
            await _respond(send, 400, b'{"error": "the body is not JSON"}')
            return
        if type(obj) is dict and type(obj.get("events")) is list:
            answers = await handle_events(self.handle, obj["events"])
            out = {"results": answers}
            self.events += len(answers)
        elif type(obj) is dict and "type" in obj:
            out = (await handle_events(self.handle, [obj]))[0]
            self.events += 1
        else:
            await _respond(send, 400, b'{"error": "an event, or {\\"events\\": [...]}"}')
            return
        await _respond(send, 200, _dumps(out).encode(), self.batch_header)


async def _respond(send, status: int, body: bytes, headers=None) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": headers or [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


class Worker:
    """A worker of the Streams transport: reads entries of the events stream
    as a member of the consumer group, answers them with ``handle``, writes
    the answers to the gateway node's reply stream and acknowledges.

    ``url``: the gateway's ``redis://host:port/db[?stream=..&group=..]``;
    ``consumer``: this worker's name in the group (default host-pid);
    ``concurrency``: entries handled at once; ``claim_idle``: seconds after
    which the entries another consumer read and did not acknowledge (it
    died) are claimed; ``count``: entries read per call."""

    def __init__(self, handle, url: str, *, consumer: str | None = None, concurrency: int = 16,
                 claim_idle: float = 30.0, count: int = 16, block_ms: int = 1000) -> None:
        if not callable(handle):
            raise TypeError(f"handle must be callable, got {handle!r}")
        self.handle = handle
        self.redis_url, self.stream, self.group = streams_url(url)
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.concurrency = concurrency
        self.claim_idle = claim_idle
        self.count = count
        self.block_ms = block_ms
        self.redis = None
        self.running = False
        self.entries = 0             # entries answered
        self.events = 0              # events handled
        self.claimed = 0             # entries claimed from consumers that died
        self._slots = None
        self._tasks: set = set()

    async def run(self) -> None:
        """Work until :meth:`stop`; then finish the entries in hand and return.
        Claiming and trimming run beside the reading, so they never hold it up."""
        import redis.asyncio as aioredis

        self.redis = aioredis.from_url(self.redis_url, decode_responses=False)
        self._slots = asyncio.Semaphore(self.concurrency)
        self.running = True
        backoff = 0.05
        upkeep = asyncio.get_running_loop().create_task(self._upkeep())
        try:
            while self.running:
                try:
                    await self._ensure_group()
                    got = await self.redis.xreadgroup(self.group, self.consumer, {self.stream: ">"},
                                                      count=self.count, block=self.block_ms)
                    backoff = 0.05
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    if "NOGROUP" in str(exc) or "no longer exists" in str(exc):   # the stream is gone: make it again
                        self._group_ok = False
                    log.warning("fastws.gateway: worker %s: Redis: %s; retrying", self.consumer, exc)
                    await asyncio.sleep(backoff)
                    backoff = min(2.0, backoff * 2)
                    continue
                for _key, entries in got or ():
                    if entries:
                        await self._start(entries)
            if self._tasks:
                await asyncio.gather(*list(self._tasks), return_exceptions=True)
        finally:
            upkeep.cancel()
            try:
                await upkeep
            except (asyncio.CancelledError, Exception):
                pass
            await self.redis.aclose()

    async def _upkeep(self) -> None:
        """Claim the entries of consumers that died, and trim the stream, now and then."""
        claimed_at = trimmed_at = 0.0
        while self.running:
            now = time.monotonic()
            try:
                if self._group_ok and now - claimed_at >= max(0.2, self.claim_idle / 2):
                    claimed_at = now
                    await self._claim()
                if self._group_ok and now - trimmed_at >= 5.0:
                    trimmed_at = now
                    await self._trim()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("fastws.gateway: worker %s: claiming/trimming: %s", self.consumer, exc)
            await asyncio.sleep(0.1)

    def stop(self) -> None:
        self.running = False

    _group_ok = False

    async def _ensure_group(self) -> None:
        if self._group_ok:
            return
        try:
            await self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except Exception as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ok = True

    async def _start(self, entries) -> None:
        """Hand ``entries`` (read together) to a task of their own, at most
        ``concurrency`` such tasks at once."""
        await self._slots.acquire()
        task = asyncio.get_running_loop().create_task(self._entries(entries))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _entries(self, entries) -> None:
        """Answer the entries read together: their events handled (an entry
        whose handler waits does not hold up the others), then every answer
        written and every entry acknowledged in one round trip to Redis."""
        try:
            out = []                     # (entry id, reply stream, answers or a task, events)
            for eid, fields in entries:
                events_json, reply_key = fields.get(b"e"), fields.get(b"r")
                try:
                    events = json.loads(events_json) if events_json else []
                    if type(events) is not list:
                        raise ValueError
                except ValueError:
                    log.error("fastws.gateway: worker %s: entry %s is not a list of events; acknowledged",
                              self.consumer, eid)
                    out.append((eid, None, None, ()))
                    continue
                coro = handle_events(self.handle, events)
                try:
                    yielded = coro.send(None)
                except StopIteration as stop:          # nothing waited: no task
                    out.append((eid, reply_key, stop.value, events))
                else:
                    task = asyncio.get_running_loop().create_task(_resume(coro, yielded))
                    out.append((eid, reply_key, task, events))
            pipe = self.redis.pipeline(transaction=False)
            for eid, reply_key, answers, _events in out:
                if isinstance(answers, asyncio.Task):
                    answers = await answers
                if reply_key:
                    pipe.xadd(reply_key, {"i": eid, "a": _dumps(answers)}, nomkstream=True)
            pipe.xack(self.stream, self.group, *[eid for eid, *_ in out])
            while True:
                try:
                    await pipe.execute()
                    break
                except Exception as exc:     # the answers must go out: Redis is back soon, or we are claimed
                    if not self.running:
                        raise
                    log.warning("fastws.gateway: worker %s: writing answers: %s; retrying", self.consumer, exc)
                    await asyncio.sleep(0.2)
            self.entries += len(out)
            self.events += sum(len(events) for *_, events in out)
        finally:
            self._slots.release()

    async def _claim(self) -> None:
        """Take over entries other consumers read and never acknowledged."""
        start = "0-0"
        while True:
            res = await self.redis.xautoclaim(self.stream, self.group, self.consumer,
                                              int(self.claim_idle * 1000), start_id=start, count=self.count)
            start, entries = res[0], res[1]
            entries = [(eid, fields) for eid, fields in entries if fields]   # None: trimmed away meanwhile
            if entries:
                self.claimed += len(entries)
                await self._start(entries)
            if not entries or start in (b"0-0", "0-0"):
                return

    async def _trim(self) -> None:
        """Delete the entries every group has read and acknowledged."""
        groups = await self.redis.xinfo_groups(self.stream)
        floor = None
        for g in groups:
            name = g.get("name") or g.get(b"name")
            last = g.get("last-delivered-id") or g.get(b"last-delivered-id")
            candidates = [last]
            if g.get("pending") or g.get(b"pending"):
                summary = await self.redis.xpending(self.stream, name)
                candidates.append(summary.get("min"))
            for c in candidates:
                if c is None:
                    continue
                c = c.decode() if isinstance(c, bytes) else str(c)
                key = tuple(int(x) for x in c.split("-"))
                if floor is None or key < floor:
                    floor = key
        if floor is not None and floor > (0, 0):
            await self.redis.xtrim(self.stream, minid=f"{floor[0]}-{floor[1]}", approximate=True)


def run_worker(handle, url: str, **options) -> None:
    """Run a :class:`Worker` until SIGINT/SIGTERM (then it finishes the
    entries in hand and returns)."""
    worker = Worker(handle, url, **options)

    async def main():
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, worker.stop)
        log.info("fastws.gateway: worker %s on %s (group %s)", worker.consumer, worker.stream, worker.group)
        await worker.run()

    try:
        import uvloop
        uvloop.run(main())
    except ImportError:
        asyncio.run(main())


class Client:
    """The HTTP API of a fastws node (``--publish-token``), for pushes that
    do not answer an event (a background task, another service)::

        client = Client("http://10.0.0.5:8000", token="...")
        await client.post_to_connection(connection_id, "hello")   # True: sent; False: no such connection
        await client.publish("lobby", "news")
        await client.close(connection_id, 4000, "kicked")
    """

    def __init__(self, url: str, token: str, *, timeout: float = 5.0, connections: int = 4) -> None:
        self.pool = HttpPool(url.rstrip("/") + "/", size=connections, timeout=timeout, token=token)
        self._slots = asyncio.Semaphore(connections)

    async def _call(self, method: str, path: str, obj) -> tuple:
        async with self._slots:
            try:
                status, _, body, _ = await self.pool.post(_dumps(obj).encode(), method=method, path=path)
            except BackendError as exc:
                raise ConnectionError(str(exc)) from None
        return status, body

    async def post_to_connection(self, connection_id: str, data) -> bool:
        status, body = await self._call("POST", f"/connections/{connection_id}", message_json(data))
        if status not in (200, 404):
            raise ConnectionError(f"POST /connections: HTTP {status} {body[:200]!r}")
        return status == 200

    async def publish(self, room: str, data, *, namespace: str = "") -> int:
        status, body = await self._call("POST", "/publish", {"room": room, "namespace": namespace,
                                                              **message_json(data)})
        if status != 200:
            raise ConnectionError(f"POST /publish: HTTP {status} {body[:200]!r}")
        return json.loads(body).get("seq", 0)

    async def close(self, connection_id: str, code: int = 1000, reason: str = "") -> bool:
        status, body = await self._call("DELETE", f"/connections/{connection_id}",
                                        {"code": code, "reason": reason})
        if status not in (200, 404):
            raise ConnectionError(f"DELETE /connections: HTTP {status} {body[:200]!r}")
        return status == 200

    async def aclose(self) -> None:
        self.pool.close()
