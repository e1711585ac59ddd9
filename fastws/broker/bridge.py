"""Wiring a node's rooms to a broker: ``Bridge(rooms, broker, lookup=...)``.

The node builds one bridge per process and ``await bridge.start()`` it
(which starts the broker unless it runs already, subscribes the node key and
every room that has members, and installs the handlers); ``await
bridge.stop()`` undoes that (the broker stays open: its owner closes it).
The bridge knows the rooms only through the public API of
:class:`fastws.rooms.Rooms` and the node's connections only through
``lookup(conn_id) -> Connection | None``.

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
* Fan-in: a room message another node published arrives as a ROOM payload
  (:mod:`fastws.broker.wire`: opcode, priority, the message's bytes) and
  goes to the local members as a ready frame, ``rooms.publish_frame``: no
  decode, no second encode (a TEXT payload is only checked to be UTF-8).  A
  payload that does not parse is dropped and counted (``malformed``).  The
  origin node's own echo is dropped by the broker.
* Fan-out: :meth:`Bridge.publish` delivers locally and sends the message to
  the broker once.
* One connection anywhere: :meth:`Bridge.global_id` names a connection
  across nodes: ``conn.id`` itself, ``"<node_id>-<n>"`` (the node gives its
  hub the node id its broker uses); every node subscribes to its own
  node key, and :meth:`Bridge.send_to` delivers locally or through the
  owning node, which answers whether the connection existed;
  :meth:`Bridge.close_conn` closes one the same way (a CLOSE payload).

Resumable membership (replay + the room's stream with ids) is not here: it
is :mod:`fastws.resume`, on a broker with the
:class:`~fastws.broker.History` capability.
"""

from __future__ import annotations

import asyncio
import itertools
import logging

from ..errors import BrokerProtocolError, PublishError, is_valid_close_code
from ..frames import PRIORITY_NORMAL
from .base import backoff_delay
from .wire import (
    CLOSE,
    DIRECT,
    REPLY,
    ROOM,
    pack_close,
    pack_direct,
    pack_reply,
    pack_room_message,
    payload_kind,
    unpack_close,
    unpack_direct,
    unpack_reply,
    unpack_room,
)

log = logging.getLogger("fastws.broker")

__all__ = ["Bridge", "REPLY_TIMEOUT", "RETRY_MIN", "RETRY_MAX", "STUCK_AFTER"]

REPLY_TIMEOUT = 2.0   # seconds send_to waits for the owning node's answer
RETRY_MIN = 0.1       # first retry of a failed (un)subscription, seconds ...
RETRY_MAX = 10.0      # ... doubling (with jitter) up to this
STUCK_AFTER = 10.0    # an (un)subscribe call running longer than this fails /health


class Bridge:
    """One node's link between its :class:`~fastws.rooms.Rooms` and a broker.

    ``lookup(conn_id)``: the node's open connection with that id, or None
    (messages to one connection, :meth:`send_to`)."""

    def __init__(self, rooms, broker, *, lookup) -> None:
        self.rooms = rooms                  # the local room registry
        self.broker = broker                # the Broker (already started or not)
        self.lookup = lookup                # conn id -> open Connection or None
        self.node_id = broker.node_id
        self.started = False
        self._interest: dict = {}           # key -> joined?, changes of this loop iteration
        self._flush_handle = None
        self._tasks: dict = {}              # running subscribe/unsubscribe calls -> loop time started
        self._retry: dict = {}              # key -> (failed attempts, timer box or None while
                                            # its retry runs): keys whose (un)subscription failed
        self._retry_handles: set = set()    # TimerHandles of scheduled retries
        self.last_error = None              # text of the last failed (un)subscription
        self._replies: dict = {}            # request id -> future (send_to)
        self._req_ids = itertools.count(1)
        self._malformed_logged = False
        self.counters = {"remote_publishes": 0, "remote_failures": 0, "received": 0,
                         "direct_in": 0, "direct_out": 0, "close_in": 0, "close_out": 0,
                         "subscribe_failures": 0,
                         "unsubscribe_failures": 0, "subscribe_retries": 0, "malformed": 0}

    # -- lifecycle ------------------------------------------------------------------

    async def start(self) -> Bridge:
        """Install the handler, start the broker (unless it runs already),
        subscribe to the node key and every room that has local members, and
        follow membership from now on.  Never raises because the backend is
        down: a failed subscription is retried in the background."""
        if self.started:
            return self
        self.broker.set_handler(self._on_message)
        await self.broker.start()
        self.rooms.listeners.append(self._on_room)
        self.started = True
        await self._apply(True, [self.node_id] + self.rooms.keys(), 0)
        return self

    async def stop(self) -> None:
        """Undo :meth:`start`: stop following membership, cancel waiting
        retries, drop the handler (the broker stays open; close it yourself)."""
        self.started = False
        if self._on_room in self.rooms.listeners:
            self.rooms.listeners.remove(self._on_room)
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        for handle in self._retry_handles:
            handle.cancel()
        self._retry_handles.clear()
        self._retry.clear()
        self._interest.clear()
        self.broker.set_handler(None)
        for fut in self._replies.values():
            if not fut.done():
                fut.set_result(None)        # send_to: no answer
        self._replies.clear()

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
        """The broker's handler: one payload another node published."""
        try:
            kind = payload_kind(payload)
            if kind == ROOM:
                if type(key) is not tuple:
                    raise BrokerProtocolError("a ROOM payload on a node key")
                opcode, priority, body = unpack_room(payload)
                self.counters["received"] += 1
                self.rooms.publish_frame(key, opcode, body, priority)
            elif kind == DIRECT:
                rid, cid, message = unpack_direct(payload)
                self.counters["direct_in"] += 1
                ok = self._send_local(cid, message)
                if rid:
                    self.broker.publish_nowait(origin, pack_reply(rid, ok))
            elif kind == CLOSE:
                rid, cid, code, reason = unpack_close(payload)
                self.counters["close_in"] += 1
                ok = self._close_local(cid, code, reason)
                if rid:
                    self.broker.publish_nowait(origin, pack_reply(rid, ok))
            elif kind == REPLY:
                rid, ok = unpack_reply(payload)
                fut = self._replies.pop(rid, None)
                if fut is not None and not fut.done():
                    fut.set_result(ok)
            else:
                raise BrokerProtocolError(f"unknown payload kind {kind}")
        except (BrokerProtocolError, TypeError) as exc:
            # a foreign or broken publisher (TypeError: binary to a batching room)
            self.counters["malformed"] += 1
            level = logging.DEBUG if self._malformed_logged else logging.WARNING
            self._malformed_logged = True
            log.log(level, "fastws: dropped a broker message from %.80s on %.80r: %s "
                    "(counted in bridge stats 'malformed')", origin, key, exc)

    def _send_local(self, conn_id, message) -> bool:
        conn = self.lookup(conn_id)
        if conn is None or conn.closed:
            return False
        conn.send(message)
        return True

    def _close_local(self, conn_id, code: int, reason: str) -> bool:
        conn = self.lookup(conn_id)
        if conn is None or conn.closed:
            return False
        conn.close(code, reason)
        return True

    # -- the API ------------------------------------------------------------------------

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
            await self.broker.publish((namespace, room), pack_room_message(message, priority))
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
        self.broker.publish_nowait((namespace, room), pack_room_message(message, priority))
        return seq

    def global_id(self, conn) -> str:
        """The id of ``conn`` valid on every node: ``conn.id``, ``"<node_id>-<n>"``."""
        return conn.id

    async def send_to(self, gid: str, message, timeout: float = REPLY_TIMEOUT):
        """Send ``message`` to the connection ``gid`` (a :meth:`global_id`)
        wherever it is. True: queued on it; False: no such open connection
        (or malformed id); None: its node did not answer in ``timeout``
        (unknown node, broker down)."""
        return await self._ask(gid, timeout, "direct_out",
                               lambda cid: self._send_local(cid, message),
                               lambda rid, cid: pack_direct(rid, cid, message))

    async def close_conn(self, gid: str, code: int = 1000, reason: str = "",
                         timeout: float = REPLY_TIMEOUT):
        """Close the connection ``gid`` wherever it is with ``code`` and
        ``reason``. True: its close handshake started; False: no such open
        connection; None: its node did not answer in ``timeout``.
        ValueError, before anything is sent, for a code no server may send
        or a reason past 123 bytes of UTF-8 (the other node would refuse it)."""
        if not is_valid_close_code(code) or code in (1005, 1006):
            raise ValueError(f"close code {code!r}: a server sends 1000-1003, 1007-1014 or 3000-4999")
        if len(reason.encode("utf-8")) > 123:
            raise ValueError("a close reason is at most 123 bytes of UTF-8")
        return await self._ask(gid, timeout, "close_out",
                               lambda cid: self._close_local(cid, code, reason),
                               lambda rid, cid: pack_close(rid, cid, code, reason))

    async def _ask(self, gid, timeout, counter, local, pack):
        """Do ``local(cid)`` here, or send ``pack(rid, cid)`` to the node of
        ``gid`` (``"<node_id>-<n>"``) and wait for its REPLY."""
        node, _, cid = str(gid).rpartition("-")
        if not (cid.isascii() and cid.isdigit()):
            return False
        cid = int(cid)
        if not node or node == self.node_id:
            return local(cid)
        if not 0 <= cid < 1 << 64:
            return False
        rid = next(self._req_ids) & 0xFFFFFFFF or 1
        payload = pack(rid, cid)
        fut = self._replies[rid] = asyncio.get_running_loop().create_future()
        self.counters[counter] += 1
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
