"""The vocabulary every layer shares: opcodes, event kinds, states, priorities.

This module sits at the bottom of the package (layer 1, with
:mod:`fastws.errors` and :mod:`fastws.config`) and imports nothing from
fastws, so every other module can name these values without an import
circle.  Both frame engines (the Cython ``fastws._core`` and the wsproto
twin) use exactly these numbers; ``fastws._core`` repeats them as C
constants and a unit test checks that the two agree.

Opcodes (RFC 6455 section 5.2) double as the kinds of the events an engine
returns from ``receive()``; ``ERROR`` is the one event kind that is no
opcode (the peer broke the protocol).
"""

from __future__ import annotations

from dataclasses import dataclass

# -- opcodes, and the kinds of the events an engine reports --------------------
CONT = 0x0
TEXT = 0x1
BINARY = 0x2
CLOSE = 0x8
PING = 0x9
PONG = 0xA
#: event kind: the peer broke RFC 6455 (``(ERROR, close_code, detail)``)
ERROR = 0x10

# -- the state of an engine (and of a connection's WebSocket) ---------------------
OPEN = 0      # messages flow both ways
CLOSING = 1   # we sent a close frame and wait for the peer's
CLOSED = 2    # the close handshake is over (or the protocol failed)

# -- delivery priorities of a published message (see fastws.delivery) ------------
PRIORITY_LOW = 0      # dropped first for a backed-up connection
PRIORITY_NORMAL = 1   # dropped once a backed-up connection's queue is half full
PRIORITY_HIGH = 2     # never dropped; only a slow-consumer close discards it


@dataclass(frozen=True)
class DeflateParams:
    """Negotiated permessage-deflate (RFC 7692) parameters, server's view."""

    server_no_context_takeover: bool = False
    client_no_context_takeover: bool = False
    server_max_window_bits: int = 15
    client_max_window_bits: int = 15


__all__ = [
    "CONT", "TEXT", "BINARY", "CLOSE", "PING", "PONG", "ERROR",
    "OPEN", "CLOSING", "CLOSED",
    "PRIORITY_LOW", "PRIORITY_NORMAL", "PRIORITY_HIGH",
    "DeflateParams",
]
