"""The room client: subscriptions that survive reconnects (``fastws.rooms.v1``).

::

    from fastws.client import RoomClient

    async with RoomClient("ws://127.0.0.1:8000/rt") as rt:
        sub = await rt.subscribe("lobby", lambda m: print(m.room, m.seq, m.data))
        await rt.publish("lobby", "hello")       # waits for the server's ack

It speaks the room protocol of ``docs/protocol.md`` with a server route made
by ``app.rooms_endpoint(path)``, over the reconnecting :class:`Client`
(backoff with jitter, the server's hints, several URLs, a bounded send
queue).  What it adds:

* **resume**: after a reconnect, to whichever node, every subscription is
  sent again with its last position (``since``: the last stream id with a
  history broker, else the last seq); the server answers ``recovered``
  true (nothing was missed: with ``redis+streams://`` it replays what was
  published meanwhile, in order) or false (a gap: no history, or history
  trimmed past the position).  A false answer is never silent: the
  subscription's ``on_gap(sub, info)`` is called (else a warning is
  logged) and ``sub.gaps`` counts it.
* **order and duplicates**: a message with a stream id at or before the
  subscription's position is dropped (a replay overlapping what was seen);
  messages carrying ``seq`` go through a reorder buffer: one that comes
  early waits at most ``reorder_wait`` seconds (``reorder_max`` messages)
  for the missing ones; when they do not come, that is a gap: with a
  history broker the client asks the server for recovery (a ``sub`` with
  its position) and delivers what the replay brings, in stream order;
  without one it delivers what it has and reports the gap.  Every
  ``sync_interval`` seconds the client also asks for each room's last seq
  (a ping with ``seqs``): messages lost at the end of a burst are found
  and recovered (or reported) the same way.
* **acks**: ``publish(..., ack=True)`` waits for the server's answer (an
  error answer raises :class:`~fastws.client.errors.SubscriptionError`
  with its code); a connection lost before the answer raises
  ``ConnectionClosed`` (the message may or may not have been published).

Handlers are plain functions called in order for each message; a
subscription without a handler is an async iterator of :class:`Message`.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import json
import logging
from collections.abc import Callable, Generator, Iterable
from typing import Any, TypeVar

from ..errors import ConnectionClosed
from .errors import SubscriptionError
from .reconnect import Client

__all__ = ["RoomClient", "Subscription", "Message", "SUBPROTOCOL", "stream_id"]

log = logging.getLogger("fastws.client")

#: the subprotocol the room client asks for (the server's fastws.roomproto.SUBPROTOCOL)
SUBPROTOCOL = "fastws.rooms.v1"
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode

#: a frame of the room protocol (a JSON object)
Frame = dict[str, Any]
_T = TypeVar("_T")


def stream_id(eid: str) -> tuple[int, int]:
    """A Redis Stream entry id ``"1700000000000-3"`` as a comparable ``(ms, seq)``."""
    ms, _, seq = eid.partition("-")
    return int(ms), int(seq or 0)


class Message:
    """One room message: ``room``, ``data`` (str or bytes), ``seq`` (the
    node's number for it; None for a replayed one), ``id`` (the stream
    entry id with a history broker, else None)."""

    __slots__ = ("room", "data", "seq", "id")

    def __init__(self, room: str, data: str | bytes, seq: int | None, id: str | None) -> None:
        self.room, self.data, self.seq, self.id = room, data, seq, id

    def __repr__(self) -> str:
        return f"Message(room={self.room!r}, seq={self.seq!r}, id={self.id!r}, data={self.data!r})"


def _data(frame: Frame) -> str | bytes:
    if "data" in frame:
        text: str = frame["data"]
        return text
    return base64.b64decode(frame.get("b64", ""))


class Subscription:
    """One room the :class:`RoomClient` keeps subscribed (see the module
    docstring).  ``position``: the last stream id (str) or seq (int) seen,
    sent as ``since`` when resubscribing; ``recovered``: the last answer's;
    ``gaps``: gaps reported; ``delivered``: messages handed out."""

    def __init__(self, client: RoomClient, room: str, handler: Callable[[Message], object] | None = None,
                 on_gap: Callable[[Subscription, dict[str, Any]], object] | None = None,
                 since: str | int | None = None) -> None:
        self.client = client
        self.room = room
        self.handler = handler
        self.on_gap = on_gap
        self.position = since
        self.recovered: bool | None = None
        self.history: bool | None = None  # the server keeps history (positions are stream ids)
        self.gaps = 0
        self.recoveries = 0               # recovery requests made after a gap
        self.delivered = 0
        self.active = True
        self._last_id = stream_id(since) if isinstance(since, str) else None
        self._next_seq: int | None = None  # the seq the next message must have (None: not known yet)
        self._answered = False            # the server answered the last sub
        self._collect: list[Frame] = []   # frames that came between our sub and its answer
        self._held: dict[int, Frame] = {}  # seq -> frame: early frames waiting for the missing ones
        self._timer: asyncio.TimerHandle | None = None
        self._answer: asyncio.Future[Subscription] | None = None   # future of the pending sub's answer
        self._queue: collections.deque[Message] = collections.deque()
        self._waiter: asyncio.Future[Message] | None = None
        self._retry: asyncio.TimerHandle | None = None

    # -- what the client sends -----------------------------------------------------

    def _request(self, recovering: bool = False) -> str:
        """The ``sub`` request (with ``since``) and the state of waiting for its answer."""
        self._answered = False
        self._collect = []
        if recovering:
            self.recoveries += 1
        req: dict[str, object] = {"t": "sub", "room": self.room}
        if self.position is not None:
            req["since"] = self.position
        return _dumps(req)

    # -- what the server sends -------------------------------------------------------

    def _frame(self, frame: Frame) -> None:
        if not self._answered:
            self._collect.append(frame)
            if len(self._collect) > self.client.collect_max:      # a server that never answers
                self._collect.pop(0)
            return
        seq = frame.get("seq")
        if seq is None or type(seq) is not int:                    # replayed: in stream order
            self._deliver(frame)
            return
        nxt = self._next_seq
        if nxt is None or seq == nxt:
            self._next_seq = seq + 1
            self._deliver(frame)
            if self._held:
                self._drain()
        elif seq < nxt:
            return                                                 # seen already
        else:
            self._held[seq] = frame
            if len(self._held) >= self.client.reorder_max:
                self._gap()
            elif self._timer is None:
                self._timer = asyncio.get_running_loop().call_later(self.client.reorder_wait, self._gap)

    def _drain(self) -> None:
        held = self._held
        while True:
            nxt = self._next_seq
            if nxt is None or nxt not in held:
                break
            frame = held.pop(nxt)
            self._next_seq = nxt + 1
            self._deliver(frame)
        if not held and self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _gap(self) -> None:
        """The messages before the held ones did not come in time."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._held:
            return
        first = min(self._held)
        # (no next seq: a sub answered without one while frames were held)
        missing = first - self._next_seq if self._next_seq is not None else None
        if self._recover():
            return
        self._report_gap({"missing": missing, "reason": "messages lost (no history to recover from)"})
        self._next_seq = first
        self._drain()

    def _recover(self) -> bool:
        """With history: ask for everything after our position (the replay
        brings the missing messages and the held ones again, in stream
        order); False without history."""
        if not (self.history and self.client.connected):
            return False
        held, self._held = self._held, {}
        self._next_seq = None
        self.client.client.send_nowait(self._request(recovering=True))
        self._collect.extend(held[s] for s in sorted(held))
        return True

    def _check_tail(self, seq: object) -> None:
        """A sync pong says the room's last message here was ``seq``: every
        message up to it came before the pong, so one we lack is lost (a gap
        at the end of a burst, which no later message reveals)."""
        nxt = self._next_seq
        if not self._answered or nxt is None or type(seq) is not int or self._held or seq < nxt:
            return
        if self._recover():
            return
        self._report_gap({"missing": seq - nxt + 1, "reason": "messages lost (no history to recover from)"})
        self._next_seq = seq + 1

    def _answered_with(self, answer: Frame) -> None:
        self._answered = True
        self.recovered = bool(answer.get("recovered"))
        pos = answer.get("pos")
        if isinstance(pos, str):
            self.history = True
        elif isinstance(pos, int):
            self.history = False
        asked = self.position
        collected, self._collect = self._collect, []
        if self.history:
            collected.sort(key=lambda f: stream_id(f["id"]) if isinstance(f.get("id"), str) else (0, 0))
        for frame in collected:
            self._deliver(frame)
        if pos is not None:
            if self.history:
                if self._last_id is None or stream_id(pos) > self._last_id:
                    self._last_id = stream_id(pos)
                    self.position = pos
            else:
                self.position = pos
        seq = answer.get("seq")
        self._next_seq = seq + 1 if type(seq) is int else None
        self._held = {s: f for s, f in self._held.items() if self._next_seq is None or s >= self._next_seq}
        if not self.recovered and asked is not None:
            self._report_gap({"missing": None, "reason": "the server could not replay what was missed "
                              "(no history, or trimmed past our position)", "since": asked})
        fut, self._answer = self._answer, None
        if fut is not None and not fut.done():
            fut.set_result(self)

    def _refused(self, error: SubscriptionError) -> None:
        fut, self._answer = self._answer, None
        if error.code == "unavailable" and self.active:
            # the broker could not serve it now: ask again a bit later
            if fut is not None and not fut.done():
                fut.set_exception(error)
                return
            self._retry = asyncio.get_running_loop().call_later(1.0, self._resend)
            return
        self.active = False
        self.client.subs.pop(self.room, None)
        if fut is not None and not fut.done():
            fut.set_exception(error)
        else:
            log.warning("fastws.client: subscription to %r ended: %s", self.room, error)
        self._end(error)

    def _resend(self) -> None:
        self._retry = None
        if self.active and self.client.connected:
            self.client.client.send_nowait(self._request())

    def _report_gap(self, info: dict[str, Any]) -> None:
        self.gaps += 1
        info["room"] = self.room
        if self.on_gap is not None:
            try:
                self.on_gap(self, info)
            except Exception:
                log.exception("fastws.client: exception in on_gap")
        else:
            log.warning("fastws.client: room %r: gap: %s", self.room, info["reason"])

    def _deliver(self, frame: Frame) -> None:
        eid = frame.get("id")
        if isinstance(eid, str):
            try:
                fid = stream_id(eid)
            except ValueError:
                fid = None
            if fid is not None:
                if self._last_id is not None and fid <= self._last_id:
                    return                                     # a duplicate
                self._last_id = fid
                self.position = eid
                self.history = True
        elif self.history is not True and type(frame.get("seq")) is int:
            self.position = frame["seq"]
        message = Message(self.room, _data(frame), frame.get("seq"), eid)
        self.delivered += 1
        handler = self.handler
        if handler is not None:
            try:
                handler(message)
            except Exception:
                log.exception("fastws.client: exception in the handler of room %r", self.room)
            return
        waiter = self._waiter
        if waiter is not None and not self._queue:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(message)
                return
        self._queue.append(message)

    def _end(self, exc: BaseException) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    # -- the application's side ------------------------------------------------------

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Message:
        if self._queue:
            return self._queue.popleft()
        if not self.active:
            raise StopAsyncIteration
        waiter: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._waiter = waiter
        try:
            return await waiter
        except (ConnectionClosed, SubscriptionError):
            raise StopAsyncIteration from None

    async def unsubscribe(self) -> None:
        await self.client.unsubscribe(self.room)


class RoomClient:
    """A client of a room protocol endpoint (see the module docstring).

    ``urls``: one URL or several (regions: the fastest reachable is used);
    ``reorder_wait``/``reorder_max``: the reorder buffer's bound (seconds,
    messages); ``ack_timeout``: seconds :meth:`publish` waits for the ack;
    ``sync_interval``: seconds between two checks of every room's last seq
    on the server (``ping(sync=True)``; 0: never);
    the other options are :class:`fastws.client.Client`'s (backoff,
    on_refused, send_queue, ping_interval ...)."""

    def __init__(self, urls: str | Iterable[str], *, reorder_wait: float = 0.5, reorder_max: int = 1000,
                 ack_timeout: float = 10.0, collect_max: int = 100_000, sync_interval: float = 10.0,
                 **options: Any) -> None:
        for name in ("on_message", "subprotocols"):
            if name in options:
                raise TypeError(f"RoomClient sets {name} itself")
        self.reorder_wait = float(reorder_wait)
        self.reorder_max = int(reorder_max)
        self.ack_timeout = float(ack_timeout)
        self.collect_max = int(collect_max)
        self.sync_interval = float(sync_interval)
        self._sync_task: asyncio.Task[None] | None = None
        user_connect = options.pop("on_connect", None)
        self.client = Client(urls, subprotocols=[SUBPROTOCOL], on_message=self._on_frame, **options)
        self.client.connect_callbacks.insert(0, self._on_connect)
        if user_connect is not None:
            self.client.connect_callbacks.append(user_connect)
        self.client.disconnect_callbacks.insert(0, self._on_disconnect)
        self.subs: dict[str, Subscription] = {}   # room -> Subscription
        self._acks: dict[int, asyncio.Future[Frame]] = {}   # ack number -> future
        self._pings: dict[int, tuple[asyncio.Future[float], float]] = {}   # ping ts -> (future, loop time sent)
        self._unsubs: dict[str, asyncio.Future[None]] = {}   # room -> future of the unsubscribe answer
        self._sent_acks: set[int] = set()  # acks whose publish went out on the current connection
        self._ack_seq = 0
        self.errors: list[SubscriptionError] = []   # error answers not tied to a request

    # -- lifecycle ------------------------------------------------------------------

    async def start(self, wait: bool = True) -> RoomClient:
        if self.sync_interval > 0 and self._sync_task is None:
            self._sync_task = asyncio.ensure_future(self._sync_loop())
        await self.client.start(wait)
        return self

    async def _sync_loop(self) -> None:
        """Every ``sync_interval`` seconds: a ping whose pong names each
        room's last seq (see :meth:`ping`)."""
        while True:
            await asyncio.sleep(self.sync_interval)
            if self.client.connected and self.subs:
                self.client.send_nowait(_dumps({"t": "ping", "ts": "sync", "seqs": True}))

    async def __aenter__(self) -> RoomClient:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __await__(self) -> Generator[Any, None, RoomClient]:
        return self.start().__await__()

    async def close(self) -> None:
        if self._sync_task is not None:
            self._sync_task.cancel()
            self._sync_task = None
        await self.client.close()
        closed = ConnectionClosed(1000, "closed by the client")
        for sub in list(self.subs.values()):
            sub.active = False
            sub._end(closed)
        self._fail_pending(closed)

    @property
    def connected(self) -> bool:
        return self.client.connected

    def _on_connect(self, client: Client) -> None:
        """Connected (again): every subscription is asked for again, with its position."""
        ws = client.websocket
        assert ws is not None                  # the connect callbacks run once it is open
        for sub in list(self.subs.values()):
            if sub.active:
                ws.send_nowait(sub._request())
        self._sent_acks = set(self._acks)      # the queued publishes go out right after

    def _on_disconnect(self, client: Client, code: int, reason: str) -> None:
        lost = ConnectionClosed(code, reason)
        for n in self._sent_acks:
            fut = self._acks.pop(n, None)
            if fut is not None and not fut.done():
                fut.set_exception(lost)
        self._sent_acks = set()
        for sub in self.subs.values():
            if sub._timer is not None:
                sub._timer.cancel()
                sub._timer = None
            # frames held for order are dropped: the resubscribe's replay (or its gap report) covers them
            sub._held = {}
            sub._next_seq = None

    def _fail_pending(self, exc: BaseException) -> None:
        pending: list[asyncio.Future[Any]] = [*self._acks.values(), *(p[0] for p in self._pings.values()),
                                              *self._unsubs.values()]
        for fut in pending:
            if not fut.done():
                fut.set_exception(exc)
        self._acks.clear()
        self._pings.clear()
        self._unsubs.clear()

    # -- frames from the server -------------------------------------------------------

    def _on_frame(self, text: str | bytes) -> None:
        try:
            frame = json.loads(text)
            t = frame["t"]
        except (ValueError, TypeError, KeyError):
            log.warning("fastws.client: not a frame of %s: %.80r", SUBPROTOCOL, text)
            return
        if t == "m":
            sub = self.subs.get(frame.get("room"))
            if sub is not None and sub.active:
                sub._frame(frame)
        elif t == "subscribed":
            sub = self.subs.get(frame.get("room"))
            if sub is not None:
                sub._answered_with(frame)
        elif t == "ack":
            fut = self._acks.pop(frame.get("ack"), None)
            if fut is not None and not fut.done():
                fut.set_result(frame)
        elif t == "pong":
            seqs = frame.get("seqs")
            if isinstance(seqs, dict):
                for room, seq in seqs.items():
                    sub = self.subs.get(room)
                    if sub is not None and sub.active:
                        sub._check_tail(seq)
            entry = self._pings.pop(frame.get("ts"), None)
            if entry is not None and not entry[0].done():
                entry[0].set_result(asyncio.get_running_loop().time() - entry[1])
        elif t == "unsubscribed":
            gone = self._unsubs.pop(frame.get("room"), None)
            if gone is not None and not gone.done():
                gone.set_result(None)
        elif t == "error":
            self._on_error(frame)

    def _on_error(self, frame: Frame) -> None:
        error = SubscriptionError(str(frame.get("code")), str(frame.get("message", "")), frame.get("room"))
        ack = frame.get("ack")
        if ack is not None:
            fut = self._acks.pop(ack, None)
            if fut is not None and not fut.done():
                fut.set_exception(error)
                return
        room = frame.get("room")
        sub = self.subs.get(room) if isinstance(room, str) else None
        if sub is not None and not sub._answered:
            sub._refused(error)
            return
        self.errors.append(error)
        log.warning("fastws.client: server error: %s", error)

    # -- the API ----------------------------------------------------------------------

    async def subscribe(self, room: str, handler: Callable[[Message], object] | None = None, *,
                        since: str | int | None = None,
                        on_gap: Callable[[Subscription, dict[str, Any]], object] | None = None) -> Subscription:
        """Subscribe to ``room``; returns the :class:`Subscription` once the
        server answered (raises :class:`SubscriptionError` when it refused).
        ``handler(message)``: called for each :class:`Message` (else iterate
        the subscription); ``since``: a position to start from (the last
        stream id or seq seen); ``on_gap(sub, info)``: told when messages
        were lost and could not be recovered."""
        if not isinstance(room, str) or not room:
            raise ValueError("room must be a non-empty str")
        old = self.subs.get(room)
        if old is not None and old.active:
            raise ValueError(f"already subscribed to {room!r}")
        sub = self.subs[room] = Subscription(self, room, handler, on_gap, since)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Subscription] = loop.create_future()
        sub._answer = fut
        if self.client.connected:         # else the (re)connection sends it
            self.client.send_nowait(sub._request())
        try:
            return await self._answer_of(fut)
        except BaseException:
            if self.subs.get(room) is sub:
                del self.subs[room]
            sub.active = False
            raise

    async def _answer_of(self, fut: asyncio.Future[_T]) -> _T:
        """``fut``'s result, or the client's end (gave up, closed) if that comes first."""
        task = self.client._task
        if task is None or task.done():
            if self.client.gave_up is not None:
                raise self.client.gave_up
            return await fut
        first: set[asyncio.Future[Any]] = {fut, task}
        await asyncio.wait(first, return_when=asyncio.FIRST_COMPLETED)
        if fut.done():
            return fut.result()
        fut.cancel()
        raise self.client.gave_up or ConnectionClosed(1000, "closed by the client")

    async def unsubscribe(self, room: str) -> None:
        """Stop the subscription to ``room`` (waits for the server's answer
        while connected)."""
        sub = self.subs.pop(room, None)
        if sub is None:
            return
        sub.active = False
        sub._end(ConnectionClosed(1000, "unsubscribed"))
        if not self.client.connected:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._unsubs[room] = fut
        self.client.send_nowait(_dumps({"t": "unsub", "room": room}))
        try:
            await asyncio.wait_for(fut, self.ack_timeout)
        except (asyncio.TimeoutError, ConnectionClosed):
            pass

    async def publish(self, room: str, data: str | bytes, *, ack: bool = True) -> Frame | None:
        """Publish ``data`` (str, or bytes) to ``room``.  ``ack``: wait for the
        server's answer (its ack frame, a dict) and raise
        :class:`SubscriptionError` when it refused; else return at once."""
        req: dict[str, object] = {"t": "pub", "room": room}
        if isinstance(data, str):
            req["data"] = data
        else:
            req["b64"] = base64.b64encode(bytes(data)).decode("ascii")
        if not ack:
            self.client.send_nowait(_dumps(req))
            return None
        self._ack_seq += 1
        n = req["ack"] = self._ack_seq
        fut: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self._acks[n] = fut
        if self.client.connected:
            self._sent_acks.add(n)
        self.client.send_nowait(_dumps(req))
        try:
            return await asyncio.wait_for(fut, self.ack_timeout)
        finally:
            self._acks.pop(n, None)
            self._sent_acks.discard(n)

    async def ping(self, *, sync: bool = False) -> float:
        """A round trip of the room protocol (``ping``/``pong``), in seconds.
        ``sync``: the pong also names each subscribed room's last seq on the
        server, and a room that lacks messages up to it recovers them (with
        history) or reports the gap.  Such a ping goes out every
        ``sync_interval`` seconds anyway: a gap at the end of a burst is
        otherwise noticed only when the room's next message comes."""
        loop = asyncio.get_running_loop()
        self._ack_seq += 1
        ts = self._ack_seq
        fut: asyncio.Future[float] = loop.create_future()
        self._pings[ts] = (fut, loop.time())
        req: dict[str, object] = {"t": "ping", "ts": ts}
        if sync:
            req["seqs"] = True
        self.client.send_nowait(_dumps(req))
        try:
            return await asyncio.wait_for(fut, self.ack_timeout)
        finally:
            self._pings.pop(ts, None)
