"""Errors and close codes: the one place that names them.

Hierarchy (everything fastws raises derives from :class:`FastWSError`)::

    FastWSError
    ├── ProtocolError(code, detail)   the *peer* broke RFC 6455; carries the close code
    │                                 the server answers with (1002, 1007, 1009)
    ├── HandshakeError(status, detail, headers)
    │   │                             the opening handshake is refused with an HTTP
    │   │                             status (400, 403, 404, 408, 426, 431, 503)
    │   └── Reject(status, body, headers)
    │                                 raised or returned by an ``on_connect`` callback
    ├── ConnectionClosed(code, reason)
    │   └── ClientDisconnected        (also an OSError) ASGI ``send`` after the client left
    ├── ConfigError(key, value, allowed)
    │   │                             a setting is invalid: names the key
    │   └── BrokerURLError(url, problem, allowed)
    │                                 (also a ValueError) a broker URL is malformed or
    │                                 has an unknown option: says which part
    ├── ServerStartError              the server could not start (port taken, bad
    │   └── LifespanError             certificate, ...); the ASGI app's startup failed
    ├── RoomError                     a room operation was refused
    │   ├── RoomLimitError(limit)     a join past max_rooms_per_connection
    │   ├── RoomNameError(detail)     a room name too long (max_room_name) or not UTF-8
    │   └── RoomDeniedError(room, action)
    │                                 the app's authorize_join / authorize_publish said no
    └── BrokerError                   a broker could not do what it was asked
        ├── PublishError              a publish did not reach the backend
        ├── SubscribeError(keys)      a (un)subscribe did not apply
        ├── BrokerProtocolError       the backend sent bytes that are not its protocol
        ├── BrokerReplyError          the backend answered with an error
        └── BrokerAuthError           the backend refused the credentials (also a
                                      ConnectionError)

"The peer sent garbage" (ProtocolError, HandshakeError) is kept apart from
"the caller misused the API" (ConnectionClosed, ConfigError, RoomError,
TypeError).

Close codes
-----------
Both frame engines report a protocol violation as an ``(ERROR, code,
detail)`` event; the close frame they put on the wire always carries the
canonical reason from :data:`CLOSE_REASONS`, never the parser's detail
text, so the two engines produce identical bytes and the peer learns
nothing about internals.  Every other close the *server* starts (a slow
consumer, a ping timeout, a shutdown ...) is one of the :class:`ServerClose`
constants below, used by both connection implementations and the node, so
that a code and its reason are decided in this one table.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

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

#: Reason text of the close frame an engine sends when the peer broke the
#: protocol (and of 1011 when a callback failed).
CLOSE_REASONS = {
    PROTOCOL_ERROR: "protocol error",
    INVALID_PAYLOAD: "invalid payload data",
    MESSAGE_TOO_BIG: "message too big",
    INTERNAL_ERROR: "internal error",
}


class ServerClose(NamedTuple):
    """A close the server starts on its own: the code and the reason sent."""

    code: int
    reason: str


#: The application's callback raised: logged once, the peer learns nothing more.
CALLBACK_FAILED = ServerClose(INTERNAL_ERROR, CLOSE_REASONS[INTERNAL_ERROR])
#: The connection's output queue passed max_queue, or it stayed backed up past slow_grace.
SLOW_CONSUMER = ServerClose(POLICY_VIOLATION, "slow consumer")
#: No sign of life within ping_timeout after a ping.
PING_TIMEOUT = ServerClose(INTERNAL_ERROR, "ping timeout")
#: No message within idle_timeout.
IDLE_TIMEOUT = ServerClose(NORMAL_CLOSURE, "idle timeout")
#: The server shuts down (the reason may carry a reconnect hint instead, see RESTARTING).
SHUTTING_DOWN = ServerClose(GOING_AWAY, "server shutting down")
#: The server shuts down and tells the client when to come back ({delay} in seconds).
RESTARTING = ServerClose(GOING_AWAY, "server restarting; reconnect in {delay:.1f}s")
#: The client sent more than its rate limit allows (messages, bytes or joins per second).
RATE_LIMITED = ServerClose(POLICY_VIOLATION, "rate limit exceeded")
#: A backend the connection depends on is unavailable; the client may retry later.
TRY_AGAIN = ServerClose(TRY_AGAIN_LATER, "try again later")

#: Every server-originated close, by name (documentation and tests).
SERVER_CLOSES = {
    "callback_failed": CALLBACK_FAILED,
    "slow_consumer": SLOW_CONSUMER,
    "ping_timeout": PING_TIMEOUT,
    "idle_timeout": IDLE_TIMEOUT,
    "shutting_down": SHUTTING_DOWN,
    "restarting": RESTARTING,
    "rate_limited": RATE_LIMITED,
    "try_again": TRY_AGAIN,
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

    def __init__(self, status: int, detail: str, headers: list[tuple[str, str]] | None = None) -> None:
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail
        self.headers = headers or []


class Reject(HandshakeError):
    """Returned (or raised) by ``on_connect`` to refuse the upgrade with an
    HTTP ``status``, a plain-text ``body`` and extra response ``headers``
    (a list of ``(name, value)``).

    Example::

        @app.on_connect("/chat")
        def check(request):
            if request.query.get("token") != "secret":
                return fastws.Reject(403, "bad token")
    """

    def __init__(self, status: int = 403, body: str = "", headers: list[tuple[str, str]] | None = None) -> None:
        super().__init__(status, body, headers)
        self.body = body

    def __repr__(self) -> str:
        return f"Reject(status={self.status!r}, body={self.body!r}, headers={self.headers!r})"

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Reject) and (self.status, self.body, self.headers)
                == (other.status, other.body, other.headers))

    __hash__ = None  # type: ignore[assignment]


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


class BrokerURLError(ConfigError, ValueError):
    """A broker URL (the ``broker`` setting) is malformed: a part that does
    not parse, an option that is unknown or out of range.  ``str()`` is the
    problem and what is allowed, ``"port 'x' is not a number (...)"``;
    ``url`` is the URL as given (with its password masked by whoever
    raises), so a caller can prefix it without repeating it."""

    def __init__(self, url: str, problem: str, allowed: str) -> None:
        FastWSError.__init__(self, f"{problem} ({allowed})")
        self.key = "broker"
        self.value = url
        self.url = url
        self.problem = problem
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


class RoomDeniedError(RoomError):
    """The application's authorization (``App.authorize_join`` /
    ``App.authorize_publish``) refused ``action`` ("join" or "publish") on
    ``room``; nothing changed."""

    def __init__(self, room: str, action: str = "join") -> None:
        super().__init__(f"{action} refused for room {room!r} (not authorized)")
        self.room = room
        self.action = action


class RoomRateError(RoomError):
    """A connection joined rooms faster than ``max_joins_per_second`` allows;
    it is being closed with 1008 "rate limit exceeded" (``RATE_LIMITED``)."""

    def __init__(self, rate: float) -> None:
        super().__init__(f"join rate limit reached: at most {rate:g} joins per second "
                         "(max_joins_per_second); the connection is closed")
        self.rate = rate


class ClientDisconnected(ConnectionClosed, OSError):
    """ASGI: ``send()`` on a WebSocket the client has closed (ASGI spec 2.4
    asks for an ``OSError``)."""

    def __init__(self, reason: str = "the client disconnected") -> None:
        ConnectionClosed.__init__(self, ABNORMAL_CLOSURE, reason)


class ServerStartError(FastWSError):
    """The server could not start (port in use, bad address, unreadable
    certificate, a setting the chosen mode cannot honour): one clear line."""


class LifespanError(ServerStartError):
    """The ASGI application's lifespan startup failed: fatal, one clear line."""


class BrokerError(FastWSError):
    """A broker could not do what it was asked."""


class PublishError(BrokerError):
    """A publish did not reach the backend; other nodes did not get it."""


class SubscribeError(BrokerError):
    """A subscribe/unsubscribe did not apply (the backend refused or did not
    acknowledge it). ``keys``: the keys of the call that failed (the others
    did apply), or None for all of them."""

    def __init__(self, message: str, keys: Iterable[object] | None = None) -> None:
        super().__init__(message)
        self.keys = list(keys) if keys is not None else None


class BrokerProtocolError(BrokerError):
    """The backend sent bytes that are not its protocol (e.g. not RESP)."""


class BrokerReplyError(BrokerError):
    """The backend answered a command with an error (``-ERR ...``, ``-MOVED ...``)."""


class BrokerAuthError(BrokerError, ConnectionError):
    """The backend refused the credentials of the URL (wrong or missing password)."""
