"""Resumable room membership: a room's stream with ids, and a replay of what
a reconnecting client missed, stitched to it without gap or duplicate.

``App.resume(conn, room, since)`` (through the node's :class:`Resumer`)
makes ``conn`` a *stream member* of ``room``: an indirect member of the
room (``Rooms.join(..., direct=False)``: publishes skip it) that gets every
entry of the room's stream instead, whichever node published it (this
node's own entries included), in stream order, each as one text frame::

    {"room": "lobby", "id": "1700000000000-3", "data": "text"}
    {"room": "lobby", "id": "1700000000000-4", "b64": "AP8Q"}     (binary, base64)

With ``since`` (the last ``id`` the client saw, e.g. before a reconnect to
any node), the entries after it are read with ``History.history`` and sent
first.  Live entries that arrive while that replay runs are held and sent
after it, minus those the replay already had; until the live stream has
passed the replay's last id, live entries the client already got are
dropped.  So the client sees one contiguous sequence of ids.

It needs a broker with the :class:`~fastws.broker.History` capability (the
Redis Streams broker, ``redis+streams://``) and is built only on public
APIs: the rooms' ``join``/``indirect_members``/``listeners``, the bridge's
``sync`` (wait until the room's stream is read) and the capability's
``history`` and ``set_entry_handler``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging

from .broker.base import History
from .broker.wire import parse_id, room_message
from .errors import SLOW_CONSUMER, BrokerProtocolError

log = logging.getLogger("fastws")

__all__ = ["Resumer", "stream_envelope", "DEFAULT_LIMIT"]

#: entries a resume replays at most (the newest ones when more were missed)
DEFAULT_LIMIT = 1000
REPLAY_POLL = 0.005     # seconds between two looks at a paced replay's backlog


def stream_envelope(room: str, entry_id: str, message) -> str:
    """The frame a stream member gets for one room message:
    ``{"room": ..., "id": ..., "data": "text"}``, or ``"b64"`` (base64)
    instead of ``"data"`` for a binary message."""
    if isinstance(message, str):
        body = {"room": room, "id": entry_id, "data": message}
    else:
        body = {"room": room, "id": entry_id, "b64": base64.b64encode(bytes(message)).decode("ascii")}
    return json.dumps(body, separators=(",", ":"))


class _Stream:
    """What one room's stream members need beyond the membership."""

    __slots__ = ("last", "replaying", "seq")

    def __init__(self) -> None:
        self.last = None        # id (ms, seq) of the last entry sent to the room's stream members
        self.seq = 0            # live entries of the room sent to its stream members here
        self.replaying = {}     # conn -> held frames [(id, frame)] while its replay runs, or
                                # after it the last id it got, until the live stream passes it


class Resumer:
    """The stream members of one node's rooms (see the module docstring)."""

    def __init__(self, rooms, bridge) -> None:
        broker = bridge.broker
        if not isinstance(broker, History):
            raise ValueError("resume needs a broker with history: --broker redis+streams://...")
        self.rooms = rooms
        self.bridge = bridge
        self.history: History = broker
        self._streams: dict = {}            # room key -> _Stream, while the room has members here
        self.counters = {"resumes": 0, "replayed": 0, "incomplete": 0, "live": 0, "stalled": 0}
        #: namespace -> fn(room, entry_id, seq, message) -> str: the frame the
        #: stream members of that namespace's rooms get instead of
        #: :func:`stream_envelope`'s; ``seq`` counts the room's live entries
        #: sent on this node (1, 2, ... while the room has members here),
        #: None for a replayed entry (the room protocol, :mod:`fastws.roomproto`)
        self.envelopes: dict = {}
        broker.set_entry_handler(self._on_entry)
        rooms.listeners.append(self._on_room)

    @classmethod
    def for_bridge(cls, rooms, bridge):
        """A Resumer when ``bridge``'s broker has history, else None."""
        if bridge is None or not isinstance(bridge.broker, History):
            return None
        return cls(rooms, bridge)

    def close(self) -> None:
        """Stop: no more entries to stream members (they stay room members)."""
        self.history.set_entry_handler(None)
        if self._on_room in self.rooms.listeners:
            self.rooms.listeners.remove(self._on_room)
        self._streams.clear()

    # -- the live stream ------------------------------------------------------------------

    def _on_room(self, key, joined: bool) -> None:
        if not joined:
            self._streams.pop(key, None)

    def _on_entry(self, key, entry_id: str, payload: bytes, origin: str) -> int:
        """One entry of a stream this node reads: to the room's stream members."""
        if type(key) is not tuple:
            return 0                               # a node key: not a room
        members = self.rooms.indirect_members(key)
        if not members:
            return 0
        try:
            message = room_message(payload)
        except BrokerProtocolError as exc:
            log.debug("fastws: stream entry %s of %r dropped: %s", entry_id, key, exc)
            return 0
        if message is None:
            return 0
        st = self._streams.get(key)
        if st is None:
            st = self._streams[key] = _Stream()
        fid = parse_id(entry_id)
        st.seq += 1
        build = self.envelopes.get(key[0]) if self.envelopes else None
        if build is None:
            frame = stream_envelope(key[1], entry_id, message)
        else:
            frame = build(key[1], entry_id, st.seq, message)
        st.last = fid
        targets = members
        if st.replaying:
            targets = set(members)
            for conn, state in list(st.replaying.items()):
                if conn not in members:              # left or lost meanwhile
                    del st.replaying[conn]
                elif type(state) is list:            # its replay runs: hold
                    state.append((fid, frame))
                    targets.discard(conn)
                elif fid <= state:                   # replayed already (the live read lags)
                    targets.discard(conn)
                else:                                # the live stream caught up: plain from now on
                    del st.replaying[conn]
        self.counters["live"] += 1
        return self.rooms.hub.broadcast(frame, targets) if targets else 0

    # -- resuming -------------------------------------------------------------------------

    async def resume(self, conn, room: str, since=None, namespace=None, limit: int = DEFAULT_LIMIT) -> bool:
        """Make ``conn`` a stream member of ``room`` and first replay what it
        missed after entry ``since`` (the last id it saw; None: nothing to
        replay).  Returns False when it cannot have everything after
        ``since``: more than ``limit`` entries (it then gets the newest
        ``limit``) or entries trimmed away by the stream's maxlen.
        ValueError for a malformed ``since`` or ``limit`` < 1,
        :class:`~fastws.errors.RoomNameError` /
        :class:`~fastws.errors.RoomLimitError` as for a join,
        :class:`~fastws.errors.BrokerError` when the history cannot be read."""
        if limit < 1:
            raise ValueError("limit must be >= 1")
        after = parse_id(since) if since is not None else None   # ValueError for a malformed id
        key = self.rooms.key_for(conn, room, namespace)
        self.rooms.join(conn, room, key[0], direct=False)
        self.counters["resumes"] += 1
        if conn not in self.rooms.indirect_members(key):          # closed: nothing to do
            return True
        if after is not None:
            st = self._streams.get(key)
            if st is None:
                st = self._streams[key] = _Stream()
            st.replaying[conn] = []
        if after is None:
            await self.bridge.sync()                # from here on the room's stream is read
            return True
        last = after
        complete = True
        build = self.envelopes.get(key[0]) if self.envelopes else None
        try:
            await self.bridge.sync()                # the live stream of the room is being read
            entries = await self.history.history(key, since_id=since, count=limit)
            complete = entries.complete
            if len(entries) >= limit:               # missed more than we replay: the newest `limit`
                entries = [e for e in await self.history.history(key, count=limit) if parse_id(e.id) > after]
                complete = False
            for e in entries:
                try:
                    message = room_message(e.payload)
                except BrokerProtocolError:
                    message = None
                if message is None or conn.closed:
                    continue
                conn.send(stream_envelope(key[1], e.id, message) if build is None
                          else build(key[1], e.id, None, message))
                self.counters["replayed"] += 1
                last = parse_id(e.id)
                if conn.backlog > self.rooms.hub.high_water:
                    await self._paced(conn)
        finally:
            self._end_replay(conn, key, last)
        if complete is not True:
            self.counters["incomplete"] += 1
        return complete

    async def _paced(self, conn) -> None:
        """A replay larger than a connection's send budget goes out at the
        pace the client reads it (instead of closing it as a slow consumer,
        which would only make it resume the same replay again): wait while
        more than ``high_water`` bytes are unsent.  A client that takes
        nothing for ``slow_grace`` seconds is closed as a slow consumer."""
        hub = self.rooms.hub
        stalled_since = None
        last = conn.backlog
        while not conn.closed and conn.backlog > hub.high_water:
            await asyncio.sleep(REPLAY_POLL)
            now = conn.backlog
            if now < last:
                stalled_since = None
            elif stalled_since is None:
                stalled_since = hub.loop.time()
            elif hub.loop.time() - stalled_since > hub.slow_grace:
                self.counters["stalled"] += 1
                conn.close(SLOW_CONSUMER.code, SLOW_CONSUMER.reason)
                return
            last = now

    def _end_replay(self, conn, key, after: tuple) -> None:
        """End the replay to ``conn`` in room ``key``, whose last entry was
        ``after``: send the held frames with a later id, in order; until the
        live stream passes ``after``, drop what ``conn`` already has."""
        st = self._streams.get(key)
        if st is None or conn not in st.replaying:
            return
        held = st.replaying[conn]
        if type(held) is not list:
            return
        if conn not in self.rooms.indirect_members(key):         # left or lost during the replay
            del st.replaying[conn]
            return
        for fid, frame in held:
            if fid > after and not conn.closed:
                conn.send(frame)
                after = fid
        if st.last is not None and st.last >= after:
            del st.replaying[conn]
        else:
            st.replaying[conn] = after

    def seq(self, key) -> int:
        """The room's live entries sent to its stream members on this node
        so far (the ``seq`` of the last one; 0 when none)."""
        st = self._streams.get(key)
        return st.seq if st is not None else 0

    def stats(self) -> dict:
        return dict(self.counters, rooms=len(self._streams),
                    replaying=sum(len(st.replaying) for st in self._streams.values()))
