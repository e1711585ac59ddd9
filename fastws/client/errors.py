"""The client's own errors (in fastws's one tree, under :class:`fastws.errors.FastWSError`)."""

from __future__ import annotations

from ..errors import ConnectionClosed, FastWSError, HandshakeError

__all__ = ["GaveUp", "SendQueueFull", "SubscriptionError"]


class GaveUp(ConnectionClosed):
    """The reconnecting client stopped trying: ``max_attempts`` attempts in
    a row failed, or the server refused the client (401/403 with
    ``on_refused="raise"``, or another 4xx that retrying cannot fix).

    ``error``: the last failure (a :class:`~fastws.errors.HandshakeError`
    for a refusal, an ``OSError``, a timeout ...); ``status``: the HTTP
    status of a refusal, else None; ``attempts``: failed attempts in a row."""

    def __init__(self, error: BaseException | None, attempts: int, code: int = 1006, reason: str = "") -> None:
        self.error = error
        self.attempts = attempts
        self.status = error.status if isinstance(error, HandshakeError) else None
        why = f"server refused the connection with HTTP {self.status}" if self.status else (
            f"{attempts} attempt(s) failed; last: {type(error).__name__}: {error}" if error is not None
            else f"{attempts} attempt(s) failed")
        ConnectionClosed.__init__(self, code, reason)
        Exception.__init__(self, f"gave up reconnecting: {why}")


class SendQueueFull(FastWSError):
    """``send`` while disconnected with a full send queue and
    ``send_queue_policy="raise"``; the message was not queued."""


class SubscriptionError(FastWSError):
    """The server refused a subscription or a publish of the room protocol:
    ``code`` is one of ``fastws.roomproto.ERROR_CODES`` ("room_limit",
    "room_name", "denied", "rate_limited", "bad_request", "unavailable"),
    ``room`` the room it was about."""

    def __init__(self, code: str, message: str, room: str | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.room = room
        self.detail = message
