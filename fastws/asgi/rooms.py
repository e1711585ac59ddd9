"""Rooms for Starlette / FastAPI WebSocket endpoints.

    from fastws.asgi import rooms

    @app.websocket("/chat/{room}")
    async def chat(websocket: WebSocket, room: str):
        await websocket.accept()
        await rooms.join(websocket, room)
        async for text in websocket.iter_text():
            await rooms.publish(websocket, room, text)     # every member, once-encoded

Served by ``fastws serve``, these call the ``fastws.rooms`` scope extension
(see docs/asgi.md): the server keeps the members, encodes a published
message once and queues the same frame on every member; members leave their
rooms automatically when they disconnect.  With a broker (``fastws serve
--broker redis://...``, or ``--workers N``) a publish also reaches the
members on every other worker and node.

Served by anything else (uvicorn, hypercorn, Starlette's ``TestClient``) the
extension is absent and a per-process fallback does what FastAPI's
``ConnectionManager`` does (a set of sockets, one ``send`` each), so the same
application runs and tests unchanged everywhere.

``websocket`` is anything with a ``scope`` (Starlette's ``WebSocket``); for
``publish`` it may also be an HTTP ``Request`` (a backend route pushing to a
room).

The server's side of the extension is :class:`RoomsExtension` (one per
WebSocket scope) and the ``fastws.join`` / ``fastws.leave`` /
``fastws.publish`` messages a raw ASGI application may send instead.
"""

from __future__ import annotations

from collections.abc import Mapping

_fallback: dict = {}   # room -> set of framework WebSocket objects (fallback only)


def _extension(obj):
    return obj.scope.get("extensions", {}).get("fastws.rooms")


def available(obj) -> bool:
    """True when ``obj`` (a WebSocket or Request) is served with the
    ``fastws.rooms`` extension (encode-once fan-out by the server)."""
    return _extension(obj) is not None


async def join(websocket, room: str) -> None:
    """Add ``websocket`` (accepted) to ``room``.  Served by ``fastws serve``
    a refused join raises: :class:`fastws.errors.RoomLimitError` past
    ``--max-rooms-per-connection`` rooms, :class:`fastws.errors.RoomNameError`
    for a name past ``--max-room-name`` bytes (both are
    :class:`fastws.errors.RoomError`); the WebSocket stays open and in the
    rooms it had."""
    ext = _extension(websocket)
    if ext is not None:
        ext["join"](room)
    else:
        _fallback.setdefault(room, set()).add(websocket)


async def leave(websocket, room: str) -> None:
    """Remove ``websocket`` from ``room`` (no-op if it is not a member)."""
    ext = _extension(websocket)
    if ext is not None:
        ext["leave"](room)
        return
    members = _fallback.get(room)
    if members is not None:
        members.discard(websocket)
        if not members:
            del _fallback[room]


async def publish(sender, room: str, message, *, exclude_self: bool = False) -> int:
    """Send ``message`` (str: text frame, bytes: binary frame) to every member
    of ``room``; returns the number of members of this process it was queued
    on (with a broker, members elsewhere get it too).

    ``exclude_self`` skips ``sender`` when it is a member.  Served by
    ``fastws serve``, a room name past ``--max-room-name`` bytes raises
    :class:`fastws.errors.RoomNameError`."""
    ext = _extension(sender)
    if ext is not None:
        if exclude_self:
            return ext["publish"](room, message, True)
        return ext["publish"](room, message)
    members = _fallback.get(room)
    if not members:
        return 0
    n = 0
    for ws in list(members):
        if exclude_self and ws is sender:
            continue
        try:
            if isinstance(message, str):
                await ws.send_text(message)
            else:
                await ws.send_bytes(bytes(message))
            n += 1
        except Exception:  # a member that went away leaves the room
            members.discard(ws)
    if not members:
        _fallback.pop(room, None)
    return n




# -- the server's side of the extension ------------------------------------------

class RoomsExtension(Mapping):
    """``scope["extensions"]["fastws.rooms"]`` of a websocket scope: a
    read-only mapping ``{"join", "leave", "publish"}`` whose callables are
    the session's bound methods, made when looked up (one small object per
    connection instead of a dict and three bound methods).  A refused join
    or publish raises a :class:`fastws.errors.RoomError` in the caller
    (see :meth:`fastws.asgi.websocket.WebSocketSession.join`)."""

    __slots__ = ("_session",)
    _KEYS = ("join", "leave", "publish")

    def __init__(self, session) -> None:
        self._session = session

    def __getitem__(self, key):
        if key in self._KEYS:
            return getattr(self._session, key)
        raise KeyError(key)

    def __iter__(self):
        return iter(self._KEYS)

    def __len__(self) -> int:
        return 3


def room_name(message) -> str:
    room = message.get("room")
    if not isinstance(room, str) or not room:
        raise TypeError(f"{message['type']} needs a non-empty str 'room', got {room!r}")
    return room


def check_room(room) -> str:
    if not isinstance(room, str) or not room:
        raise TypeError(f"a room name is a non-empty str, got {room!r}")
    return room


def publish_payload(message):
    text = message.get("text")
    if text is not None:
        return text
    data = message.get("bytes")
    if data is None:
        raise TypeError("fastws.publish needs 'text' or 'bytes'")
    return bytes(data)


__all__ = ["available", "join", "leave", "publish", "RoomsExtension", "room_name", "check_room",
           "publish_payload"]
