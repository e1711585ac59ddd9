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

Memory bound: a connection never holds more than
``high_water + max_queue`` bytes of output (about 1.06 MiB by default), and
at most one incomplete incoming message of ``max_message_size``.
"""

from __future__ import annotations

from .frames import PRIORITY_HIGH, PRIORITY_LOW, PRIORITY_NORMAL

__all__ = ["PRIORITY_LOW", "PRIORITY_NORMAL", "PRIORITY_HIGH"]
