"""Delivery policy: send budgets, priorities, drops and slow consumers.

The policy runs in ``_core`` (per delivery it is a couple of C comparisons);
this module names its parts for the Python API and documents them.

Each connection's send budget has two parts:

* the transport's write buffer, up to ``high_water`` bytes (default 64 KiB):
  past it the transport calls ``pause_writing`` and the connection counts as
  *backed up*; fastws then stops reading from that peer too, which paces a
  client that sends faster than it reads the answers;
* fastws's own queue of frames not yet handed to the transport, at most
  ``max_queue`` bytes (default 1 MiB).

While a connection is backed up, a message published to it with

* ``PRIORITY_LOW`` is dropped for that connection,
* ``PRIORITY_NORMAL`` (the default) is dropped once its queue is half full,
* ``PRIORITY_HIGH`` is queued; control frames are always queued.

Every drop is counted per connection (``conn.dropped``) and in total
(``hub.stats()["dropped"][("backpressure", priority)]``). A connection
whose queue passes ``max_queue``, or that stays backed up longer than
``slow_grace`` seconds (default 5) while messages keep coming, is closed
with 1008 and the reason "slow consumer"; if it does not answer the close
within ``close_timeout`` the TCP connection is dropped.

Memory bound: a connection never holds more than about
``2 * high_water + max_queue`` bytes of output (a burst queued within one
loop iteration is written as soon as it passes ``high_water``, so the
transport's flow control and this policy see it), and at most one
incomplete incoming message of ``max_message_size``.  The per-connection
part of the policy runs in the engine (``fastws.core``: ``Connection``);
this module holds its room-level part, batching.

Batching (opt-in, per room: ``rooms.set_batching(room, max_batch=50,
max_delay=0.05)``): the room collects published messages and sends them when
``max_batch`` are waiting or ``max_delay`` seconds after the first.  Members
that joined with ``batch=True`` get one text frame per batch, the JSON
envelope::

    {"room": "lobby", "seq": 41, "messages": ["m41", "m42", "m43"]}

(``seq`` is the sequence number of the first message; the others follow
consecutively); every other member gets the batch's messages as usual, one
frame each, in order.  Messages published to a batched room must be ``str``.
Whatever the batching, every connection's frames of one loop iteration go
out in one write.
"""

from __future__ import annotations

import json

from .frames import PRIORITY_HIGH, PRIORITY_LOW, PRIORITY_NORMAL

__all__ = ["PRIORITY_LOW", "PRIORITY_NORMAL", "PRIORITY_HIGH", "collect", "flush_batch"]


def collect(hub, r, policy: tuple, message: str) -> tuple:
    """Add ``message`` to the batch of room ``r`` (a ``fastws.rooms.Room``;
    ``policy`` its ``(max_batch, max_delay)``), flushed by size or delay.
    Returns ``(seq, members)`` as a publish does."""
    r.seq += 1
    if r.pending is None:
        r.pending = []
    if not r.pending:
        r.first_seq = r.seq
        r.timer = hub.loop.call_later(policy[1], flush_batch, hub, r)
    r.pending.append(message)
    if len(r.pending) >= policy[0]:
        flush_batch(hub, r)
    return r.seq, len(r.members)


def flush_batch(hub, r) -> None:
    """Send what room ``r`` collected: the envelope to its batch members,
    the messages one by one to the other direct members."""
    if r.timer is not None:
        r.timer.cancel()
        r.timer = None
    pending, r.pending = r.pending, []
    if not pending:
        return
    batched = r.batched or ()
    if batched:
        envelope = json.dumps({"room": r.key[1], "seq": r.first_seq, "messages": pending},
                              separators=(",", ":"))
        hub.broadcast(envelope, batched)
    others = r.members - batched if batched else r.members
    if r.indirect:
        others = others - r.indirect
    if others:
        for message in pending:
            hub.broadcast(message, others)
