"""Errors and close codes: the one place that names them.

Hierarchy::

    FastWSError                      base of everything fastws raises
    ├── ProtocolError(code, detail)  the *peer* broke RFC 6455; carries the close
    │                                code the server answers with (1002, 1007, 1009)
    ├── HandshakeError(status, ...)  the opening handshake is refused with an
    │                                HTTP status (400, 403, 426, 431, 503)
    ├── ConnectionClosed(code, reason)
    │                                the *caller* used a connection that is closed
    ├── ConfigError(key, value, allowed)
    │                                a configuration value is invalid
    └── RoomError                    a room operation was refused
        ├── RoomLimitError(limit)    a join past max_rooms_per_connection
        └── RoomNameError(detail, limit)
                                     a room name too long (max_room_name, bytes
                                     of UTF-8) or not encodable as UTF-8

"The peer sent garbage" (ProtocolError, HandshakeError) is kept apart from
"the caller misused the API" (ConnectionClosed, ConfigError, TypeError).

Both frame engines report a protocol violation as an ``(ERROR, code, detail)``
event; the close frame they put on the wire always carries the canonical
reason from :data:`CLOSE_REASONS`, never the parser's detail text, so the two
engines produce identical bytes and the peer learns nothing about internals.
"""

from __future__ import annotations

# RFC 6455 section 7.4.1 and the IANA registry.
NORMAL_CLOSURE = 1000
GOING_AWAY = 1001
PROTOCOL_ERROR = 1002
UNSUPPORTED_DATA = 1003
NO_STATUS_RCVD = 1005  # never sent on the wire
ABNORMAL_CLOSURE = 1006  # never sent on the wire
INVALID_PAYLOAD = 1007
POLICY_VIOLATION = 1008
MESSAGE_TOO_BIG = 1009
MANDATORY_EXTENSION = 1010
INTERNAL_ERROR = 1011
SERVICE_RESTART = 1012
TRY_AGAIN_LATER = 1013
BAD_GATEWAY = 1014

#: Reason text sent in a close frame that the server originates for a code.
CLOSE_REASONS = {
    PROTOCOL_ERROR: "protocol error",
    INVALID_PAYLOAD: "invalid payload data",
    MESSAGE_TOO_BIG: "message too big",
    INTERNAL_ERROR: "internal error",
}


def is_valid_close_code(code: int) -> bool:
    """True if ``code`` may appear in a close frame received from a peer."""
    return (
        1000 <= code <= 1003
        or 1007 <= code <= 1014
        or 3000 <= code <= 4999
    )


class FastWSError(Exception):
    """Base class of every error fastws raises."""


class ProtocolError(FastWSError):
    """The peer violated RFC 6455; ``code`` is the close code to answer with."""

    def __init__(self, code: int, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


class HandshakeError(FastWSError):
    """The opening handshake is refused with HTTP ``status``."""

    def __init__(self, status: int, detail: str, headers: list | None = None) -> None:
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail
        self.headers = headers or []


class ConnectionClosed(FastWSError):
    """An operation was attempted on a connection that is closed."""

    def __init__(self, code: int = ABNORMAL_CLOSURE, reason: str = "") -> None:
        super().__init__(f"connection closed ({code} {reason})".rstrip())
        self.code = code
        self.reason = reason


class ConfigError(FastWSError):
    """A configuration value is invalid; the message names key, value, allowed."""

    def __init__(self, key: str, value: object, allowed: str) -> None:
        super().__init__(f"invalid config {key}={value!r}: {allowed}")
        self.key = key
        self.value = value
        self.allowed = allowed


class RoomError(FastWSError):
    """A room operation (join, publish) was refused; the message says why."""


class RoomLimitError(RoomError):
    """A connection asked to join more rooms than ``max_rooms_per_connection``
    allows; it stays in the rooms it had."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"room limit reached: a connection may join at most {limit} rooms "
                         "(max_rooms_per_connection)")
        self.limit = limit


class RoomNameError(RoomError, ValueError):
    """A room name is refused: longer than ``max_room_name`` bytes of UTF-8,
    or not encodable as UTF-8 (a lone surrogate)."""

    def __init__(self, detail: str, limit: int | None = None) -> None:
        super().__init__(detail)
        self.limit = limit
