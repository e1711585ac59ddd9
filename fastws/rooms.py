"""Rooms: the local registry of who is in which room, and publishing to them.

A room is named by a string inside a *namespace*. A route's namespace is its
``namespace=`` argument (default ``""``, shared by every route), so rooms of
``/chat`` and ``/admin`` are kept apart by registering those routes with
``namespace="/chat"`` and ``namespace="/admin"``, as Socket.IO's namespaces.

Publishing encodes the message once and hands the same frame to every local
member in ``_core`` (``Hub.broadcast``): Python code never loops over members
per message. Membership is removed when a connection leaves or is lost, and
a room with no members disappears (no leak).

Ordering: each room has a sequence number, incremented by every publish on
this node; a client never sees one room's messages out of order from one
server, because frames are queued in publish order and written in order.
Across nodes (with a broker) each publish still gets its origin node's
sequence number; messages from two nodes interleave in arrival order.
"""

from __future__ import annotations

from .delivery import PRIORITY_HIGH, PRIORITY_LOW, PRIORITY_NORMAL

__all__ = ["Rooms", "Room", "PRIORITY_LOW", "PRIORITY_NORMAL", "PRIORITY_HIGH"]


class Room:
    """One room on this node: its local members and its sequence number."""

    __slots__ = ("key", "members", "seq")

    def __init__(self, key) -> None:
        self.key = key
        self.members: set = set()   # open Connections of this node
        self.seq = 0                # last sequence number published here


class Rooms:
    """The rooms of one server (one per worker process)."""

    def __init__(self, hub) -> None:
        self.hub = hub                  # _core.Hub: encode-once fan-out, delivery policy
        self._rooms: dict = {}          # (namespace, name) -> Room
        hub.rooms = self
        hub.on_lost = self.leave_all
        #: callables(key, joined: bool) told when a room gains its first or
        #: loses its last local member (a broker subscribes/unsubscribes).
        self.listeners: list = []

    @staticmethod
    def _key(conn, room, namespace):
        if not isinstance(room, str):
            raise TypeError(f"room name must be str, not {type(room).__name__}")
        if namespace is None:
            route = conn.route if conn is not None else None
            namespace = getattr(route, "namespace", "") if route is not None else ""
        return (namespace, room)

    def join(self, conn, room: str, namespace=None) -> None:
        if conn.closed:
            return
        key = self._key(conn, room, namespace)
        r = self._rooms.get(key)
        if r is None:
            r = self._rooms[key] = Room(key)
            for cb in self.listeners:
                cb(key, True)
        r.members.add(conn)
        if conn.rooms is None:
            conn.rooms = {key}
        else:
            conn.rooms.add(key)

    def leave(self, conn, room: str, namespace=None) -> None:
        self._remove(conn, self._key(conn, room, namespace))
        if conn.rooms is not None:
            conn.rooms.discard(self._key(conn, room, namespace))

    def _remove(self, conn, key) -> None:
        r = self._rooms.get(key)
        if r is None:
            return
        r.members.discard(conn)
        if not r.members:
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
        this message and how many connections it was queued on."""
        r = self._rooms.get((namespace, room))
        if r is None:
            return 0, 0
        r.seq += 1
        return r.seq, self.hub.broadcast(message, r.members, exclude, priority)

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
        return sorted(name for _, name in (conn.rooms or ()))

    def names(self, namespace: str | None = None) -> list:
        return sorted(n for ns, n in self._rooms if namespace is None or ns == namespace)

    def __len__(self) -> int:
        return len(self._rooms)
