"""Pick the frame engine: the Cython one (``fastws._core``) or the wsproto twin.

Both engines implement the same small sans-I/O interface, so one protocol test
suite runs against both and wsproto (written by others) is the oracle for the
Cython engine. The wsproto engine is also the fallback when the extension is
not built, or when ``FASTWS_NO_EXTENSIONS=1`` is set in the environment.

The interface (server side of RFC 6455)::

    engine = Engine(max_message_size=1 << 20, max_frame_size=0, deflate=None)

    events = engine.receive(data)   # bytes in -> list of event tuples
    out = engine.data_to_send()     # bytes the engine wants on the wire
                                    # (pong replies, close echo, error close)
    frame = engine.send(message)    # str -> text frame, bytes -> binary frame
    frame = engine.ping(payload=b"")
    frame = engine.close(code=1000, reason="")   # starts the close handshake
    engine.state                    # OPEN, CLOSING (we sent close), CLOSED
    engine.close_code, engine.close_reason      # once known, else None

Events are tuples whose first item is the kind:

    (TEXT, str)               a complete text message (fragments reassembled)
    (BINARY, bytes)           a complete binary message
    (PING, bytes)             a ping; the pong is already queued
    (PONG, bytes)             a pong (solicited or not)
    (CLOSE, code, reason)     the peer's close frame (code 1005 when empty);
                              when OPEN the echo (same code, empty reason; an
                              empty close answers an empty close) is queued;
                              the engine is CLOSED afterwards
    (ERROR, code, detail)     the peer broke the protocol; a close frame with
                              ``code`` and ``errors.CLOSE_REASONS[code]`` is
                              queued (unless we had already sent one); the
                              engine is CLOSED and ignores further input

Limits (0 means unlimited): a data frame whose header declares more than
``max_frame_size`` bytes, or that would take the message past
``max_message_size``, fails with 1009 from the header, before any payload is
buffered. With permessage-deflate the decompressed size is what counts.

Module-level helper, in both engines:
``encode_frame(opcode, payload, fin=True, mask=None, rsv1=False) -> bytes``
(``mask`` is 4 bytes for a client frame, None for a server frame).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

# Event kinds and opcodes (the data/control kinds are the RFC 6455 opcodes).
CONT = 0x0
TEXT = 0x1
BINARY = 0x2
CLOSE = 0x8
PING = 0x9
PONG = 0xA
ERROR = 0x10

# Engine states.
OPEN = 0
CLOSING = 1
CLOSED = 2


@dataclass(frozen=True)
class DeflateParams:
    """Negotiated permessage-deflate (RFC 7692) parameters, server's view."""

    server_no_context_takeover: bool = False
    client_no_context_takeover: bool = False
    server_max_window_bits: int = 15
    client_max_window_bits: int = 15


def _load():
    if os.environ.get("FASTWS_NO_EXTENSIONS") == "1":
        from . import _wsproto_engine as mod

        return "wsproto", mod
    try:
        from . import _core as mod
    except ImportError:
        from . import _wsproto_engine as mod

        return "wsproto", mod
    return "cython", mod


#: "cython" or "wsproto": the engine this process runs on.
IMPLEMENTATION, _engine_module = _load()
Engine = _engine_module.Engine
encode_frame = _engine_module.encode_frame


def engine_module(name: str):
    """Return the engine module called ``name`` ("cython" or "wsproto").

    Raises ImportError if the Cython extension is asked for but not built.
    """
    if name == "cython":
        from . import _core

        return _core
    if name == "wsproto":
        from . import _wsproto_engine

        return _wsproto_engine
    raise ValueError(f"unknown engine {name!r}")
