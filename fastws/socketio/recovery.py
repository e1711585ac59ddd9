"""Connection state recovery (Socket.IO 4.6's ``connectionStateRecovery``).

With recovery on, every packet a broadcast emit sends (not one with an ack,
not a volatile one) carries an *offset*, a string appended to its arguments,
and is kept here for ``max_disconnection_duration`` seconds (at most
``max_packets`` of them).  A socket lost without saying goodbye (transport
closed, transport error, ping timeout) leaves its sid, rooms and session data
here for the same time, under its private id ``pid`` (sent only to that
client in its CONNECT answer).  When the client reconnects it sends back
``pid`` and the last offset it got; if both are still here, it gets its old
sid, rooms and data back and every kept packet after that offset that was
meant for it, in order (``recovered``).

What this node keeps is what it sent or relayed: the packets its own emits
made and those other nodes' emits brought to its rooms.  A client recovers on
the node it was on (after a dropped link it comes back to the same address;
with a load balancer in front, recovery needs session affinity).
"""

from __future__ import annotations

import secrets
import time
from collections import deque


class Saved:
    """A lost socket's state, waiting for its client."""

    __slots__ = ("sid", "namespace", "rooms", "data", "at")

    def __init__(self, sid: str, namespace: str, rooms: tuple, data, at: float) -> None:
        self.sid = sid
        self.namespace = namespace
        self.rooms = rooms
        self.data = data
        self.at = at


class Kept:
    """One packet kept for recovery: where it went and its messages."""

    __slots__ = ("index", "offset", "namespace", "rooms", "skip", "messages", "at")

    def __init__(self, index: int, offset: str, namespace: str, rooms, skip: tuple, messages: tuple,
                 at: float) -> None:
        self.index = index          # its position in what this node kept
        self.offset = offset        # the offset its emitter gave it
        self.namespace = namespace
        self.rooms = rooms          # tuple of room names, or None: every socket of the namespace
        self.skip = skip            # sids it was not for
        self.messages = messages    # the text message, then its binary attachments
        self.at = at


class Recovery:
    """The kept packets and the lost sockets of one Socket.IO server."""

    def __init__(self, max_disconnection_duration: float = 120.0, max_packets: int = 10_000,
                 clock=time.monotonic) -> None:
        self.window = float(max_disconnection_duration)
        self.max_packets = int(max_packets)
        self.clock = clock
        self.packets: deque = deque()     # Kept, oldest first
        self.offsets: dict = {}           # offset -> Kept
        self.saved: dict = {}             # pid -> Saved
        self.prefix = secrets.token_hex(3) + "-"   # offsets of this process
        self.offset_count = 0             # offsets this process gave
        self.kept_count = 0               # packets kept (the index of the last one)
        self.recovered = 0                # sockets recovered
        self.failed = 0                   # reconnects that asked and could not be recovered

    def new_offset(self) -> str:
        """A new offset, unique to this process."""
        self.offset_count += 1
        return f"{self.prefix}{self.offset_count:x}"

    def keep(self, offset: str, namespace: str, rooms, skip: tuple, messages: tuple) -> None:
        """Keep a packet sent (or relayed) with ``offset``."""
        now = self.clock()
        self.kept_count += 1
        kept = Kept(self.kept_count, offset, namespace, rooms, skip, messages, now)
        self.packets.append(kept)
        self.offsets[offset] = kept
        self._trim(now)

    def _trim(self, now: float) -> None:
        packets, offsets = self.packets, self.offsets
        limit = now - self.window
        while packets and (len(packets) > self.max_packets or packets[0].at < limit):
            old = packets.popleft()
            if offsets.get(old.offset) is old:
                del offsets[old.offset]

    def save(self, pid: str, sid: str, namespace: str, rooms: tuple, data) -> None:
        now = self.clock()
        self.saved[pid] = Saved(sid, namespace, rooms, data, now)
        self.expire(now)

    def expire(self, now: float | None = None) -> None:
        """Forget lost sockets and packets older than the window."""
        now = self.clock() if now is None else now
        limit = now - self.window
        saved = self.saved
        if saved:
            for pid in [p for p, s in saved.items() if s.at < limit]:
                del saved[pid]
        self._trim(now)

    def restore(self, pid, offset, namespace: str):
        """``(saved, missed)`` for a reconnect with ``pid`` and ``offset``:
        the lost socket's state and the messages of each packet it missed,
        oldest first; None when it cannot be recovered (unknown or expired
        pid, another namespace, an offset no longer kept)."""
        if not isinstance(pid, str):
            return None
        saved = self.saved.pop(pid, None)
        now = self.clock()
        if saved is None or saved.at < now - self.window or saved.namespace != namespace:
            self.failed += 1
            return None
        start = None
        if isinstance(offset, str):
            kept = self.offsets.get(offset)
            if kept is not None and self.packets and kept.index >= self.packets[0].index:
                start = kept.index
        if start is None:
            self.failed += 1
            return None
        mine = set(saved.rooms)
        mine.add(saved.sid)
        missed = []
        for k in self.packets:
            if k.index <= start or k.namespace != namespace or saved.sid in k.skip:
                continue
            if k.rooms is None or not mine.isdisjoint(k.rooms):
                missed.append(k.messages)
        self.recovered += 1
        return saved, missed


__all__ = ["Recovery", "Saved", "Kept"]
