"""Rooms: the local registry of who is in which room, and publishing to them.

A room is named by a string inside a *namespace*. A route's namespace is its
``namespace=`` argument (default ``""``, shared by every route), so rooms of
``/chat`` and ``/admin`` are kept apart by registering those routes with
``namespace="/chat"`` and ``namespace="/admin"``, as Socket.IO's namespaces.

Publishing encodes the message once and hands the same frame to every local
member in ``_core`` (``Hub.broadcast``): Python code never loops over members
per message. A message that arrives already encoded (from another node,
through :mod:`fastws.broker.bridge`) goes out with :meth:`Rooms.publish_frame`
as a ready frame payload (``Hub.broadcast_frame``), never decoded and encoded
again.  Membership is removed when a connection leaves or is lost, and
a room with no members disappears (no leak).

Batching (opt-in, per room: ``rooms.set_batching(room, ...)``): see
:mod:`fastws.delivery`, which collects and flushes a batching room's
messages.

Indirect members: ``join(conn, room, direct=False)`` makes ``conn`` a member
(counted, kept, subscribed across nodes like any other) that publishes do
not reach: whoever made it one delivers to it (:meth:`Rooms.indirect_members`).
:mod:`fastws.resume` uses it for members that get the room's Redis Stream,
with entry ids, instead of the messages themselves.

Limits: a connection may be in at most ``max_rooms_per_connection`` rooms
(``Config``; 0: no limit); a join past it raises
:class:`~fastws.errors.RoomLimitError` and changes nothing.  A room name is
at most ``max_room_name`` bytes of UTF-8 and must be encodable as UTF-8; a
join or publish with another one raises :class:`~fastws.errors.RoomNameError`
(so every broker can carry every room's channel).

Authorization: ``Rooms(..., authorize=fn)`` (the node sets it from the
app's ``authorize_join`` / ``authorize_publish`` callbacks) asks
``fn(action, conn, key, message) -> bool`` before every join (``action``
"join", ``message`` None) and before a publish checked with
:meth:`Rooms.check_publish` (``action`` "publish"; ``conn`` None for a
publish no connection asked for, e.g. the HTTP publish API); a refusal
raises :class:`~fastws.errors.RoomDeniedError` and changes nothing.  Every
refusal is counted in ``Rooms.refused`` by reason, "limit", "name",
"denied" (``websocket_room_refusals_total`` in the metrics).

A connection's own rooms (``conn.rooms``) cost nothing while it is in none
(None), a small tuple while it is in up to ``SMALL_ROOMS`` rooms, and a set
past that, so join and leave stay O(1) however many rooms it is in.

Ordering: each room has a sequence number, incremented by every publish on
this node; a client never sees one room's messages out of order from one
server, because frames are queued in publish order and written in order.
Across nodes (with a broker) each publish still gets its origin node's
sequence number; messages from two nodes interleave in arrival order.
"""

from __future__ import annotations

from .delivery import collect, flush_batch
from .errors import RATE_LIMITED, RoomDeniedError, RoomLimitError, RoomNameError, RoomRateError
from .frames import PRIORITY_HIGH, PRIORITY_LOW, PRIORITY_NORMAL, TEXT

__all__ = ["Rooms", "Room", "PRIORITY_LOW", "PRIORITY_NORMAL", "PRIORITY_HIGH",
           "SMALL_ROOMS", "DEFAULT_MAX_ROOMS", "DEFAULT_MAX_ROOM_NAME"]

#: A connection in up to this many rooms keeps them in a tuple (56 + 8 per
#: room bytes); past it, in a set (O(1) membership whatever the count).
SMALL_ROOMS = 8
#: Defaults of ``Rooms(hub)`` (the same as Config's).
DEFAULT_MAX_ROOMS = 1000
DEFAULT_MAX_ROOM_NAME = 256


class Room:
    """One room on this node: its local members and its sequence number."""

    __slots__ = ("key", "members", "seq", "batched", "pending", "first_seq", "timer", "indirect")

    def __init__(self, key) -> None:
        self.key = key
        self.members: set = set()   # open Connections of this node
        self.seq = 0                # last sequence number published here
        self.batched = None         # members that want the batch envelope (set), if any
        self.pending = None         # messages waiting for the batch flush (list), if batching
        self.first_seq = 0          # sequence number of pending[0]
        self.timer = None           # TimerHandle of the max_delay flush
        self.indirect = None        # members publishes do not reach (set), if any


class Rooms:
    """The rooms of one server (one per worker process)."""

    def __init__(self, hub, max_rooms_per_connection: int = DEFAULT_MAX_ROOMS,
                 max_room_name: int | None = DEFAULT_MAX_ROOM_NAME, authorize=None,
                 max_joins_per_second: float = 0.0, burst_seconds: float = 2.0) -> None:
        self.hub = hub                  # _core.Hub: encode-once fan-out, delivery policy
        self._rooms: dict = {}          # (namespace, name) -> Room
        #: rooms one connection may be in (0: no limit)
        self.max_rooms_per_connection = int(max_rooms_per_connection or 0)
        #: longest room name in bytes of UTF-8 (None: unchecked, for embedding only;
        #: Config always gives a number every broker can carry)
        self.max_room_name = max_room_name
        #: refused operations by reason: "limit" (RoomLimitError), "name"
        #: (RoomNameError), "denied" (RoomDeniedError)
        self.refused = {"limit": 0, "name": 0, "denied": 0, "rate": 0}
        #: joins one connection may make per second (0: no limit), counted in
        #: windows of ``burst_seconds``: past ``rate * window`` joins in one
        #: window the connection is closed 1008 "rate limit exceeded"
        self.max_joins_per_second = float(max_joins_per_second or 0.0)
        self.join_window = max(float(burst_seconds or 1.0), 0.001)
        self._joins: dict = {}          # conn -> joins in the current window (joiners only)
        self._joins_since = 0.0         # loop time the current window began
        #: fn(action, conn, key, message) -> bool asked before a join or a
        #: checked publish (see the module docstring), or None: all allowed
        self.authorize = authorize
        hub.rooms = self
        hub.on_lost = self.leave_all
        #: callables(key, joined: bool) told when a room gains its first or
        #: loses its last local member (a broker subscribes/unsubscribes).
        self.listeners: list = []
        #: (namespace, name) -> (max_batch, max_delay) for rooms that batch
        self.batching: dict = {}
        #: namespace -> fn(room, seq, message) -> str: the direct members of
        #: that namespace's rooms get fn's frame, built once per message with
        #: the room's sequence number, instead of the message itself (the
        #: room protocol's envelope, :mod:`fastws.roomproto`); unbatched
        #: publishes only
        self.envelopes: dict = {}
        #: namespace -> fn(key, opcode, payload, priority) -> (seq, delivered) or
        #: None: takes the already encoded messages (:meth:`publish_frame`, what
        #: other nodes publish) of that namespace's rooms; None lets them go
        #: out as usual (the Socket.IO front's envelopes, :mod:`fastws.socketio`)
        self.frame_handlers: dict = {}

    @classmethod
    def from_config(cls, hub, config) -> Rooms:
        """The registry of a server run with ``config`` (its room limits)."""
        return cls(hub, config.max_rooms_per_connection, config.max_room_name,
                   max_joins_per_second=config.max_joins_per_second,
                   burst_seconds=config.rate_burst_seconds)

    def _name_problem(self, room):
        """Why ``room`` is refused (str), or None when it is taken; TypeError
        for a non-str."""
        if not isinstance(room, str):
            raise TypeError(f"room name must be str, not {type(room).__name__}")
        limit = self.max_room_name
        if limit is None:
            return None
        n = len(room)
        if n <= limit:
            if room.isascii():                 # the common case: no encoding
                return None
            try:
                n = len(room.encode("utf-8"))
            except UnicodeEncodeError:
                return "room name is not valid UTF-8 (it holds a lone surrogate)"
            if n <= limit:
                return None
        # n chars are at least n bytes: no need to encode a long name to refuse it
        size = f"at least {n} bytes" if n == len(room) and not room.isascii() else f"{n} bytes"
        return f"room name too long: {size} of UTF-8, at most {limit} allowed (max_room_name)"

    def check_name(self, room) -> str:
        """``room`` if it is a name this server takes; TypeError for a non-str,
        :class:`~fastws.errors.RoomNameError` (counted in ``refused``) for one
        longer than ``max_room_name`` bytes of UTF-8 or not encodable as UTF-8."""
        problem = self._name_problem(room)
        if problem is not None:
            self.refused["name"] += 1
            raise RoomNameError(problem, self.max_room_name)
        return room

    def _allowed(self, action: str, conn, key, message) -> None:
        """RoomDeniedError (counted) unless ``authorize`` allows ``action``."""
        if not self.authorize(action, conn, key, message):
            self.refused["denied"] += 1
            raise RoomDeniedError(key[1], action)

    def check_publish(self, conn, room: str, message, namespace: str = ""):
        """Before publishing ``message`` to ``room`` for ``conn`` (None: for
        no connection, e.g. the HTTP publish API): the room's key if the name
        is taken (:meth:`check_name`) and ``authorize`` allows it, else
        :class:`~fastws.errors.RoomDeniedError` (counted)."""
        self.check_name(room)
        key = (namespace, room)
        if self.authorize is not None:
            self._allowed("publish", conn, key, message)
        return key

    def key_for(self, conn, room, namespace=None, check: bool = True):
        """The registry key ``(namespace, name)`` of ``room`` for ``conn``
        (its route's namespace when ``namespace`` is None); ``check``: refuse
        a name no join would take (:meth:`check_name`)."""
        if check:
            self.check_name(room)
        elif not isinstance(room, str):
            raise TypeError(f"room name must be str, not {type(room).__name__}")
        if namespace is None:
            route = conn.route if conn is not None else None
            namespace = getattr(route, "namespace", "") if route is not None else ""
        return (namespace, room)

    def set_batching(self, room: str, max_batch: int = 50, max_delay: float = 0.05,
                     namespace: str = "") -> None:
        """Batch ``room``'s messages (see the module docstring); ``max_batch``
        0 turns batching off again (after sending what is waiting)."""
        key = (namespace, room)
        r = self._rooms.get(key)
        if r is not None and r.pending:
            flush_batch(self.hub, r)
        if max_batch <= 0:
            self.batching.pop(key, None)
            return
        if max_delay <= 0:
            raise ValueError("max_delay must be > 0 seconds")
        self.batching[key] = (int(max_batch), float(max_delay))

    def _count_join(self, conn) -> None:
        """The join rate limit: a fixed window of ``join_window`` seconds;
        the table holds only the connections that joined in it."""
        now = self.hub.loop.time()
        if now - self._joins_since >= self.join_window:
            self._joins.clear()
            self._joins_since = now
        n = self._joins.get(conn, 0) + 1
        self._joins[conn] = n
        if n > self.max_joins_per_second * self.join_window:
            self.refused["rate"] += 1
            conn.close(RATE_LIMITED.code, RATE_LIMITED.reason)
            raise RoomRateError(self.max_joins_per_second)

    def join(self, conn, room: str, namespace=None, batch: bool = False, direct: bool = True) -> None:
        """Add ``conn`` to ``room``; ``batch=True``: it wants the batch envelope
        when the room batches; ``direct=False``: an indirect member, which
        publishes skip (see the module docstring; a later join with the
        default keeps it indirect).  Raises
        :class:`~fastws.errors.RoomLimitError` when ``conn`` is already in
        ``max_rooms_per_connection`` other rooms,
        :class:`~fastws.errors.RoomNameError` for a name that is too long,
        :class:`~fastws.errors.RoomDeniedError` when ``authorize`` refuses,
        :class:`~fastws.errors.RoomRateError` past ``max_joins_per_second``
        (the connection is then closed 1008); then nothing changes.  O(1) whatever the number of rooms."""
        if conn.closed:
            return
        key = self.key_for(conn, room, namespace)
        if self.max_joins_per_second:
            self._count_join(conn)
        if self.authorize is not None:
            self._allowed("join", conn, key, None)
        mine = conn.rooms
        if mine is None:
            conn.rooms = (key,)
        elif key not in mine:                     # a tuple of <= SMALL_ROOMS, or a set
            n = len(mine)
            limit = self.max_rooms_per_connection
            if limit and n >= limit:
                self.refused["limit"] += 1
                raise RoomLimitError(limit)
            if type(mine) is tuple:
                if n < SMALL_ROOMS:
                    conn.rooms = mine + (key,)
                else:
                    conn.rooms = mine = set(mine)
                    mine.add(key)
            else:
                mine.add(key)
        r = self._rooms.get(key)
        if r is None:
            r = self._rooms[key] = Room(key)
            for cb in self.listeners:
                cb(key, True)
        r.members.add(conn)
        if batch:
            if r.batched is None:
                r.batched = set()
            r.batched.add(conn)
        if not direct:
            if r.indirect is None:
                r.indirect = set()
            r.indirect.add(conn)

    def leave(self, conn, room: str, namespace=None) -> None:
        """Remove ``conn`` from ``room`` (no-op if it is not a member; a name
        no join would take is never one). O(1)."""
        key = self.key_for(conn, room, namespace, check=False)
        self._remove(conn, key)
        mine = conn.rooms
        if mine is None or key not in mine:
            return
        if type(mine) is tuple:
            mine = tuple(k for k in mine if k != key)
            conn.rooms = mine or None
        else:
            mine.discard(key)
            if not mine:
                conn.rooms = None

    def _remove(self, conn, key) -> None:
        r = self._rooms.get(key)
        if r is None:
            return
        r.members.discard(conn)
        if r.batched is not None:
            r.batched.discard(conn)
        if r.indirect is not None:
            r.indirect.discard(conn)
        if not r.members:
            if r.timer is not None:
                r.timer.cancel()
            del self._rooms[key]
            for cb in self.listeners:
                cb(key, False)

    def leave_all(self, conn) -> None:
        """Remove ``conn`` from every room (called when it is lost)."""
        keys, conn.rooms = conn.rooms, None
        for key in keys or ():
            self._remove(conn, key)

    def publish(self, room: str, message, *, namespace: str = "", exclude=None,
                priority: int = PRIORITY_NORMAL) -> tuple:
        """Send ``message`` (str: text, bytes: binary) to the local members of
        ``room``. Returns ``(seq, delivered)``: the room's sequence number for
        this message and how many connections it was queued on.  Raises
        :class:`~fastws.errors.RoomNameError` for a name no join would take."""
        self.check_name(room)
        key = (namespace, room)
        r = self._rooms.get(key)
        if r is None:
            return 0, 0
        policy = self.batching.get(key)
        if policy is None:
            r.seq += 1
            members = r.members - r.indirect if r.indirect else r.members
            if self.envelopes and namespace in self.envelopes:
                message = self.envelopes[namespace](room, r.seq, message)
            return r.seq, self.hub.broadcast(message, members, exclude, priority)
        if not isinstance(message, str):
            raise TypeError("messages published to a batched room must be str")
        return collect(self.hub, r, policy, message)

    def publish_frame(self, key, opcode: int, payload: bytes, priority: int = PRIORITY_NORMAL) -> tuple:
        """Send an already encoded message to the local members of room
        ``key`` (``(namespace, name)``): ``opcode`` TEXT (``payload`` is
        UTF-8, not checked here) or BINARY.  The frame goes out as it is
        (``Hub.broadcast_frame``); only a batching room decodes a TEXT
        payload, to put it in its envelope.  Returns ``(seq, delivered)``
        as :meth:`publish` (a BINARY message to a batching room is refused
        with TypeError)."""
        if self.frame_handlers:
            handler = self.frame_handlers.get(key[0])
            if handler is not None:
                done = handler(key, opcode, payload, priority)
                if done is not None:
                    return done
        r = self._rooms.get(key)
        if r is None:
            return 0, 0
        policy = self.batching.get(key)
        if policy is None:
            r.seq += 1
            members = r.members - r.indirect if r.indirect else r.members
            if self.envelopes and key[0] in self.envelopes:
                message = payload.decode("utf-8") if opcode == TEXT else bytes(payload)
                return r.seq, self.hub.broadcast(self.envelopes[key[0]](key[1], r.seq, message),
                                                 members, None, priority)
            return r.seq, self.hub.broadcast_frame(opcode, payload, members, None, priority)
        if opcode != TEXT:
            raise TypeError("messages published to a batched room must be str")
        return collect(self.hub, r, policy, payload.decode("utf-8"))

    def count(self, room: str, namespace: str = "") -> int:
        r = self._rooms.get((namespace, room))
        return len(r.members) if r is not None else 0

    def members(self, room: str, namespace: str = "") -> list:
        r = self._rooms.get((namespace, room))
        return list(r.members) if r is not None else []

    def seq(self, room: str, namespace: str = "") -> int:
        r = self._rooms.get((namespace, room))
        return r.seq if r is not None else 0

    def rooms_of(self, conn) -> list:
        """The names of ``conn``'s rooms (not fastws's own: a namespace that
        starts with NUL, such as the users' rooms of ``App.bind_user``)."""
        return sorted(name for ns, name in (conn.rooms or ()) if not ns.startswith("\x00"))

    def keys(self) -> list:
        """The keys ``(namespace, name)`` of every room with local members."""
        return list(self._rooms)

    def indirect_members(self, key):
        """The indirect members of room ``key`` (``join(..., direct=False)``):
        a set the caller must not change, or an empty tuple."""
        r = self._rooms.get(key)
        return r.indirect if r is not None and r.indirect else ()

    def names(self, namespace: str | None = None) -> list:
        """The rooms with local members: of ``namespace``, or of every
        namespace but fastws's own (None)."""
        return sorted(n for ns, n in self._rooms
                      if ns == namespace or namespace is None and not ns.startswith("\x00"))

    def __len__(self) -> int:
        return len(self._rooms)
