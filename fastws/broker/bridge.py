"""Wiring a node's rooms to a broker: ``bridge = attach(server.rooms, broker)``.

* Interest: a ``rooms.listeners`` callback subscribes the broker to a room's
  key when its first local member joins and unsubscribes when the last one
  leaves; changes made during one loop iteration go in one
  ``subscribe``/``unsubscribe`` call (a room joined and left in the same
  iteration costs nothing).
* Failures: a subscribe/unsubscribe call that fails (the broker raises, e.g.
  :class:`~fastws.broker.SubscribeError` for a key it cannot carry or an
  answer that did not come) is counted (``subscribe_failures`` /
  ``unsubscribe_failures``) and its failed keys are retried one key per call,
  so one bad key never holds back the others, with exponential backoff and
  jitter (``RETRY_MIN`` .. ``RETRY_MAX`` seconds) until they apply; a retry
  asks for what the room needs at that moment (subscribed while it has local
  members).  :meth:`Bridge.check` (the ``broker_subscriptions`` check of
  ``/health``) fails while keys wait for a retry or a call is stuck.
* Fan-in: a message another node published is delivered to the local members
  with ``rooms.publish`` (text stays text, bytes stay bytes, the priority is
  kept); the origin node's own echo is dropped by the broker.
* Fan-out: :meth:`Bridge.publish` delivers locally and sends the message to
  the broker once.
* Resume (Streams broker): :meth:`Bridge.resume` makes a connection a
  *stream member* of a room: it gets every entry of the room's stream, this
  node's own included (``broker.own_handler``), in stream order with its id,
  after a replay of what it missed since the id it gives.
* One connection anywhere: :func:`global_id` names a connection across nodes
  (``"{node_id}:{conn.id}"``); every node subscribes to its own node key, and
  :meth:`Bridge.send_to` delivers locally or through the owning node, which
  answers whether the connection existed.

The bridge's part of the payload (after the broker's envelope, see
:mod:`fastws.broker`) is ``struct("!BB")`` ``kind, flags`` then:

* ``ROOM``: the message (flags: bit 0 binary, bits 4-7 priority);
* ``DIRECT``: ``u32 request id, u64 connection id`` then the message;
* ``REPLY``: ``u32 request id`` (flags bit 1: delivered).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import struct

from ..delivery import PRIORITY_NORMAL
from ..rooms import stream_envelope
from . import PublishError
from .redis import backoff_delay
from .streams import parse_id

log = logging.getLogger("fastws.broker")

__all__ = ["Bridge", "attach", "global_id"]

_HEAD = struct.Struct("!BB")
_DIRECT = struct.Struct("!BBIQ")
_REPLY = struct.Struct("!BBI")
ROOM, DIRECT, REPLY = 1, 2, 3
F_BINARY, F_OK = 1, 2
REPLY_TIMEOUT = 2.0   # seconds send_to waits for the owning node's answer
RETRY_MIN = 0.1       # first retry of a failed (un)subscription, seconds ...
RETRY_MAX = 10.0      # ... doubling (with jitter) up to this
STUCK_AFTER = 10.0    # an (un)subscribe call running longer than this fails /health

_bridges: list = []   # attached bridges of this process (usually one)


def _flags(message, priority: int) -> int:
    if isinstance(message, str):
        return (priority & 0x0F) << 4
    return F_BINARY | (priority & 0x0F) << 4


def _encode(message) -> bytes:
    return message.encode("utf-8") if isinstance(message, str) else bytes(message)


def _decode(flags: int, body: bytes):
    return body if flags & F_BINARY else body.decode("utf-8")


class Bridge:
    """One node's link between its :class:`~fastws.rooms.Rooms` and a broker."""

    def __init__(self, rooms, broker) -> None:
        self.rooms = rooms                  # the local room registry
        self.broker = broker                # the Broker (already started or not)
        self.node_id = broker.node_id
        self._interest: dict = {}           # key -> joined?, changes of this loop iteration
        self._flush_handle = None
        self._tasks: dict = {}              # running subscribe/unsubscribe calls -> loop time started
        self._retry: dict = {}              # key -> (failed attempts, timer box or None while
                                            # its retry runs): keys whose (un)subscription failed
        self._retry_handles: set = set()    # TimerHandles of scheduled retries
        self.last_error = None              # text of the last failed (un)subscription
        self._replies: dict = {}            # request id -> future (send_to)
        self._req_ids = itertools.count(1)
        self.counters = {"remote_publishes": 0, "remote_failures": 0, "received": 0,
                         "direct_in": 0, "direct_out": 0, "subscribe_failures": 0,
                         "unsubscribe_failures": 0, "subscribe_retries": 0}

    # -- interest -----------------------------------------------------------------

    def _on_room(self, key, joined: bool) -> None:
        """rooms listener: ``key`` got its first (joined) / lost its last member."""
        self._interest[key] = joined
        if self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        changes, self._interest = self._interest, {}
        retry = self._retry
        if retry:
            for k in changes:
                retry.pop(k, None)          # a newer change replaces a waiting retry
        subs = [k for k, j in changes.items() if j]
        unsubs = [k for k, j in changes.items() if not j]   # the broker skips keys it never held
        if subs:
            self._start(True, subs, 0)
        if unsubs:
            self._start(False, unsubs, 0)

    def _start(self, joined: bool, keys: list, attempt: int) -> None:
        t = asyncio.ensure_future(self._apply(joined, keys, attempt))
        self._tasks[t] = asyncio.get_running_loop().time()
        t.add_done_callback(self._task_done)

    def _task_done(self, t) -> None:
        self._tasks.pop(t, None)
        if not t.cancelled() and t.exception() is not None:   # _apply catches what the broker raises
            log.error("fastws: broker (un)subscribe failed", exc_info=t.exception())

    async def _apply(self, joined: bool, keys: list, attempt: int) -> bool:
        """Subscribe (``joined``) or unsubscribe ``keys``; on failure count it
        and schedule a retry of the keys that failed. True if all applied."""
        try:
            if joined:
                await self.broker.subscribe(keys)
            else:
                await self.broker.unsubscribe(keys)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # any failure of the backend: retried, never lost
            failed = getattr(exc, "keys", None)
            if failed is None:
                failed = keys
            what = "subscribe" if joined else "unsubscribe"
            self.counters[what + "_failures"] += 1
            self.last_error = f"{what} of {len(failed)} key(s): {type(exc).__name__}: {exc}"
            log.warning("fastws: broker %s failed for %d of %d key(s), retrying: %s",
                        what, len(failed), len(keys), exc)
            self._schedule_retry(failed, attempt + 1)
            failed = set(failed)
            keys = [k for k in keys if k not in failed]
            ok = False
        else:
            ok = True
        if attempt and self._retry:          # a retry that went through: the key is fine again
            for k in keys:
                if self._retry.get(k) == (attempt, None):
                    del self._retry[k]
        return ok

    def _schedule_retry(self, keys, attempt: int) -> None:
        """Retry ``keys`` (each on its own) after the backoff of ``attempt``."""
        keys = [k for k in keys if k not in self._interest]   # a newer change goes out anyway
        if not keys:
            return
        delay = backoff_delay(attempt - 1, RETRY_MIN, RETRY_MAX)
        box: list = []
        box.append(asyncio.get_running_loop().call_later(delay, self._run_retry, keys, attempt, box))
        self._retry_handles.add(box[0])
        for k in keys:
            self._retry[k] = (attempt, box)

    def _run_retry(self, keys, attempt: int, box: list) -> None:
        self._retry_handles.discard(box[0])
        retry = self._retry
        for k in keys:
            state = retry.get(k)
            if state is None or state[1] is not box:   # superseded by a newer change or failure
                continue
            retry[k] = (attempt, None)                  # failing until the retry goes through
            self.counters["subscribe_retries"] += 1
            self._start(self._wanted(k), [k], attempt)

    def _wanted(self, key) -> bool:
        """Should this node be subscribed to ``key`` now?"""
        if isinstance(key, tuple):
            return self.rooms.count(key[1], key[0]) > 0
        return key == self.node_id            # a node key: only our own

    def subscription_state(self) -> dict:
        """``failing``: keys waiting for a retry; ``running``: (un)subscribe
        calls in progress (``stuck``: running for more than STUCK_AFTER s)."""
        now = 0.0
        if self._tasks:
            try:
                now = asyncio.get_running_loop().time()
            except RuntimeError:             # read outside the loop: nothing is stuck then
                now = 0.0
        return {"failing": len(self._retry), "running": len(self._tasks),
                "stuck": sum(1 for t0 in self._tasks.values() if now - t0 > STUCK_AFTER),
                "subscribe_failures": self.counters["subscribe_failures"],
                "unsubscribe_failures": self.counters["unsubscribe_failures"],
                "retries": self.counters["subscribe_retries"], "last_error": self.last_error}

    def check(self):
        """The ``broker_subscriptions`` check of ``/health``: fails while a
        room's (un)subscription waits for a retry or a call is stuck."""
        state = self.subscription_state()
        return state["failing"] == 0 and state["stuck"] == 0, state

    async def sync(self) -> None:
        """Wait until every membership change so far was sent to the broker
        and answered (a failed one waits for its retry: see :meth:`check`)."""
        for _ in range(100):
            if self._flush_handle is None and not self._tasks:
                return
            if self._flush_handle is not None:
                await asyncio.sleep(0)
                continue
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # -- messages from other nodes ----------------------------------------------------

    def _on_message(self, key, payload: bytes, origin: str) -> None:
        kind, flags = _HEAD.unpack_from(payload, 0)
        if kind == ROOM:
            self.counters["received"] += 1
            ns, name = key
            message = _decode(flags, payload[2:])
            self.rooms.publish(name, message, namespace=ns, priority=flags >> 4)
            if self.rooms.has_streamed(key):
                self._stream_entry(key, message)
        elif kind == DIRECT:
            _, _, rid, cid = _DIRECT.unpack_from(payload, 0)
            self.counters["direct_in"] += 1
            ok = self._send_local(cid, _decode(flags, payload[_DIRECT.size:]))
            if rid:
                reply = _REPLY.pack(REPLY, F_OK if ok else 0, rid)
                self.broker.publish_nowait(origin, reply)
        elif kind == REPLY:
            _, _, rid = _REPLY.unpack_from(payload, 0)
            fut = self._replies.pop(rid, None)
            if fut is not None and not fut.done():
                fut.set_result(bool(flags & F_OK))

    def _on_own(self, key, payload: bytes) -> None:
        """One of this node's room messages, back from the stream (Streams broker)."""
        kind, flags = _HEAD.unpack_from(payload, 0)
        if kind == ROOM and self.rooms.has_streamed(key):
            self._stream_entry(key, _decode(flags, payload[2:]))

    def _stream_entry(self, key, message) -> None:
        eid = self.broker.last_id(key)      # the entry being delivered
        if eid is not None:
            self.rooms.publish_streamed(key, eid, parse_id(eid), message)

    async def resume(self, conn, room: str, since=None, namespace=None, limit: int = 1000) -> bool:
        """Make ``conn`` a member of ``room`` that gets the room's stream in
        order, each message in the envelope ``{"room", "id", "data"|"b64"}``
        (see :func:`fastws.rooms.stream_envelope`), and first replay what it
        missed after entry ``since`` (the last id it saw; None: nothing to
        replay).  Live messages that arrive during the replay are held and
        sent after it, without duplicates.  Returns False when it cannot have
        everything after ``since``: more than ``limit`` entries (it then gets
        the newest ``limit``) or entries trimmed away by the stream's maxlen.
        Needs a broker with history (``redis+streams://``)."""
        if not hasattr(self.broker, "history"):
            raise ValueError("resume needs a broker with history: --broker redis+streams://...")
        if limit < 1:
            raise ValueError("limit must be >= 1")
        after = parse_id(since) if since is not None else None   # ValueError for a malformed id
        key = self.rooms._key(conn, room, namespace)
        self.rooms.join_streamed(conn, key, replaying=after is not None)
        if after is None:
            await self.sync()                   # from here on the room's stream is read
            return True
        last = after
        complete = True
        try:
            await self.sync()                   # the live stream of the room is being read
            entries = await self.broker.history(key, since_id=since, count=limit)
            complete = entries.complete
            if len(entries) >= limit:           # missed more than we replay: the newest `limit`
                entries = [e for e in await self.broker.history(key, count=limit) if parse_id(e.id) > after]
                complete = False
            for e in entries:
                kind, flags = _HEAD.unpack_from(e.payload, 0)
                if kind != ROOM or conn.closed:
                    continue
                conn.send(stream_envelope(key[1], e.id, _decode(flags, e.payload[2:])))
                last = parse_id(e.id)
        finally:
            self.rooms.end_replay(conn, key, last)
        return complete

    def _send_local(self, conn_id, message) -> bool:
        conn = self.rooms.hub.connections.get(conn_id)
        if conn is None or conn.closed:
            return False
        conn.send(message)
        return True

    # -- the API ------------------------------------------------------------------------

    def _payload(self, message, priority) -> bytes:
        return _HEAD.pack(ROOM, _flags(message, priority)) + _encode(message)

    async def publish(self, room: str, message, namespace: str = "", exclude=None,
                      priority: int = PRIORITY_NORMAL) -> tuple:
        """Deliver to the local members and send to the other nodes once.
        Returns ``(seq, sent)``: this node's sequence number for the room and
        whether the broker took the message (False: other nodes missed it;
        counted in ``counters["remote_failures"]`` and the broker's stats)."""
        seq, _ = self.rooms.publish(room, message, namespace=namespace, exclude=exclude,
                                    priority=priority)
        self.counters["remote_publishes"] += 1
        try:
            await self.broker.publish((namespace, room), self._payload(message, priority))
        except PublishError:
            self.counters["remote_failures"] += 1
            return seq, False
        return seq, True

    def publish_nowait(self, room: str, message, namespace: str = "", exclude=None,
                       priority: int = PRIORITY_NORMAL) -> int:
        """:meth:`publish` for synchronous code (``App.publish``): returns the
        local seq; the remote send goes out in call order, a failure is
        counted by the broker."""
        seq, _ = self.rooms.publish(room, message, namespace=namespace, exclude=exclude,
                                    priority=priority)
        self.counters["remote_publishes"] += 1
        self.broker.publish_nowait((namespace, room), self._payload(message, priority))
        return seq

    def global_id(self, conn) -> str:
        """The id of ``conn`` valid on every node: ``"{node_id}:{conn.id}"``."""
        return f"{self.node_id}:{conn.id}"

    async def send_to(self, gid: str, message, timeout: float = REPLY_TIMEOUT):
        """Send ``message`` to the connection ``gid`` (a :func:`global_id`)
        wherever it is. True: queued on it; False: no such open connection
        (or malformed id); None: its node did not answer in ``timeout``
        (unknown node, broker down)."""
        node, _, cid = str(gid).rpartition(":")
        try:
            cid = int(cid)
        except ValueError:
            return False
        if not node or node == self.node_id:
            return self._send_local(cid, message)
        rid = next(self._req_ids) & 0xFFFFFFFF or 1
        payload = _DIRECT.pack(DIRECT, _flags(message, PRIORITY_NORMAL), rid, cid) + _encode(message)
        fut = self._replies[rid] = asyncio.get_running_loop().create_future()
        self.counters["direct_out"] += 1
        try:
            receivers = await self.broker.publish(node, payload)
            if receivers == 0:      # the backend knows nobody listens: no such node
                return False
            return await asyncio.wait_for(fut, timeout)
        except (PublishError, asyncio.TimeoutError):
            return None
        finally:
            self._replies.pop(rid, None)

    def stats(self) -> dict:
        return dict(self.counters, broker=self.broker.stats())

    async def detach(self) -> None:
        """Undo :func:`attach` (the broker stays open; close it yourself)."""
        if self._on_room in self.rooms.listeners:
            self.rooms.listeners.remove(self._on_room)
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        for handle in self._retry_handles:
            handle.cancel()
        self._retry_handles.clear()
        self._retry.clear()
        if self in _bridges:
            _bridges.remove(self)
        self.broker.set_handler(None)
        if getattr(self.broker, "own_handler", None) == self._on_own:
            self.broker.own_handler = None
        if getattr(self.rooms, "bridge", None) is self:
            self.rooms.bridge = None


async def attach(rooms, broker, *, start: bool = True) -> Bridge:
    """Connect ``rooms`` (one server's registry) to ``broker``: start it
    (unless ``start=False``), subscribe to the node key and to every room
    that already has members, and keep that up to date. Returns the bridge;
    ``rooms.bridge`` is set to it too."""
    bridge = Bridge(rooms, broker)
    broker.set_handler(bridge._on_message)
    if hasattr(broker, "own_handler"):
        broker.own_handler = bridge._on_own
    if start:
        await broker.start()
    rooms.listeners.append(bridge._on_room)
    keys = [broker.node_id] + [r.key for r in list(rooms._rooms.values())]
    await bridge._apply(True, keys, 0)     # a failure is retried in the background
    rooms.bridge = bridge
    _bridges.append(bridge)
    return bridge


def global_id(conn) -> str:
    """``conn``'s id across nodes (``"{node_id}:{conn.id}"``), from the bridge
    of the server that holds it; the plain local id if no bridge is attached."""
    for b in _bridges:
        if b.rooms.hub.connections.get(conn.id) is conn:
            return b.global_id(conn)
    if len(_bridges) == 1:
        return _bridges[0].global_id(conn)
    return str(conn.id)
