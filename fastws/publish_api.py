"""HTTP publish API on the WebSocket port, for backends that push without a
WebSocket: ``register(node, token)``.

``POST /publish``
    JSON ``{"room": "...", "namespace": "", "text": "..."}`` (or ``"base64"``
    instead of ``"text"`` for a binary message), or a raw body with
    ``?room=NAME[&namespace=NS]`` (text; binary when the Content-Type is
    ``application/octet-stream``). The message reaches the room's members on
    every node. Answers ``200 {"seq": N, "remote": true}``; ``"remote":
    false`` when the broker did not take it (local members got it, other
    nodes did not).

``POST /connections/{id}`` (and ``POST /connections?id={id}``)
    The body (raw or JSON as above) to one connection, on whichever node holds
    it (``id`` as given by :func:`fastws.broker.bridge.global_id`). ``200``
    sent, ``404`` no such connection, ``504`` its node did not answer.

Every request needs ``Authorization: Bearer <token>`` (``401`` otherwise;
the scheme is matched in any case, ``bearer`` too, followed by one or more
spaces, and the token is compared in constant time); bodies over
``max_body_size`` get ``413`` from the server before any handler runs;
malformed requests ``400`` with ``{"error": "..."}``.  A request is checked
completely before anything is published: a rejected one never takes a room
sequence number, so the numbers a room's members see stay consecutive.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
from urllib.parse import unquote

from .errors import RoomNameError

JSON = "application/json"

__all__ = ["register"]


def _reply(status: int, obj) -> tuple:
    return status, json.dumps(obj).encode() + b"\n", JSON


class _BadRequest(Exception):
    pass


def _utf8(value: str, what: str) -> str:
    """``value`` if it encodes to UTF-8; a JSON string may hold a lone
    surrogate (``"\\ud800"``) that no UTF-8 text frame can carry."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _BadRequest(f"{what} is not valid Unicode (it holds a lone surrogate)") from None
    return value


def _message(request, *, need_room: bool):
    """(room, namespace, message) from a JSON or raw request, every part
    checked (a text message, the room and the namespace encode to UTF-8)."""
    q = request.query
    ctype = (request.header("content-type") or "").split(";")[0].strip().lower()
    if ctype == JSON:
        try:
            obj = json.loads(request.body or b"null")
        except ValueError:
            raise _BadRequest("body is not JSON") from None
        except RecursionError:      # [[[[... : json gives up past the interpreter's recursion limit
            raise _BadRequest("body is not JSON (nested too deeply)") from None
        if not isinstance(obj, dict):
            raise _BadRequest("body must be a JSON object")
        room, ns = obj.get("room", q.get("room")), obj.get("namespace", q.get("namespace", ""))
        if "text" in obj and isinstance(obj["text"], str):
            message = _utf8(obj["text"], '"text"')
        elif "base64" in obj and isinstance(obj["base64"], str):
            try:
                message = base64.b64decode(obj["base64"], validate=True)
            except (binascii.Error, ValueError):
                raise _BadRequest("bad base64") from None
        else:
            raise _BadRequest('give "text" (a string) or "base64"')
    else:
        room, ns = q.get("room"), q.get("namespace", "")
        if ctype == "application/octet-stream":
            message = bytes(request.body)
        else:
            try:
                message = bytes(request.body).decode("utf-8")
            except UnicodeDecodeError:
                raise _BadRequest("text body is not UTF-8 (send application/octet-stream)") from None
    if need_room and (not isinstance(room, str) or not room):
        raise _BadRequest('"room" is required')
    if not isinstance(ns, str):
        raise _BadRequest('"namespace" must be a string')
    if need_room:
        _utf8(room, '"room"')
    _utf8(ns, '"namespace"')
    return room, ns, message


def _bearer(header: str | None) -> bytes | None:
    """The token of an ``Authorization: Bearer <token>`` header: the scheme
    in any case (RFC 9110 section 11.1), then one or more spaces; None for
    another scheme or no header."""
    if not header:
        return None
    scheme, sep, rest = header.partition(" ")
    if not sep or scheme.lower() != "bearer":
        return None
    return rest.lstrip(" ").encode("latin-1", "replace")   # headers arrive decoded as latin-1


def register(node, token: str, *, prefix: str = ""):
    """Add ``POST {prefix}/publish`` and ``POST {prefix}/connections`` to the
    routes of ``node`` (a :class:`fastws.node.Node`); with a broker they reach
    every node, without one the rooms and connections of this process."""
    if not token:
        raise ValueError("the HTTP publish API needs a bearer token")
    expected = token.encode("utf-8")

    def authorized(request) -> bool:
        got = _bearer(request.header("authorization"))
        if got is None:
            return False
        return hmac.compare_digest(got, expected)   # time independent of where they differ

    async def publish(request):
        if not authorized(request):
            return 401, b"missing or wrong bearer token\n", "text/plain", [("WWW-Authenticate", "Bearer")]
        try:
            room, ns, message = _message(request, need_room=True)
            if not isinstance(message, str) and (ns, room) in node.rooms.batching:
                raise _BadRequest(f"room {room!r} batches its messages: send text")
            node.rooms.check_name(room)       # RoomNameError: past max_room_name bytes
        except (_BadRequest, RoomNameError) as exc:
            return _reply(400, {"error": str(exc)})
        seq, remote = await node.publish_confirmed(room, message, namespace=ns)
        return _reply(200, {"seq": seq, "remote": remote})

    base = prefix + "/connections/"

    async def connection(request):
        if not authorized(request):
            return 401, b"missing or wrong bearer token\n", "text/plain", [("WWW-Authenticate", "Bearer")]
        if request.path.startswith(base):
            conn_id = unquote(request.path[len(base):])
        else:
            conn_id = request.query.get("id")
        if not conn_id:
            return _reply(400, {"error": "give the connection id"})
        try:
            _, _, message = _message(request, need_room=False)
        except _BadRequest as exc:
            return _reply(400, {"error": str(exc)})
        ok = await node.send_to(conn_id, message)
        if ok is None:
            return _reply(504, {"error": "the connection's node did not answer", "id": conn_id})
        if not ok:
            return _reply(404, {"error": "no such connection", "id": conn_id})
        return _reply(200, {"sent": True, "id": conn_id})

    node.routes.add("POST", prefix + "/publish", publish)
    node.routes.add("POST", prefix + "/connections", connection)
    node.routes.add("POST", base, connection, prefix=True)   # POST /connections/{id}
    return connection
