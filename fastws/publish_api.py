"""The HTTP API on the WebSocket port, for backends that push without a
WebSocket: ``register(node, token)`` (``--publish-token``).

Every request needs ``Authorization: Bearer <token>`` (``401`` otherwise;
the scheme is matched in any case, ``bearer`` too, followed by one or more
spaces, and the token is compared in constant time).  A request body is one
JSON object, whatever the ``Content-Type`` says (``curl -d`` sends
``application/x-www-form-urlencoded``: it is read as JSON all the same);
there is no raw-body mode.  A field the endpoint does not know, a missing
one or one of the wrong type is a ``400`` with ``{"error": "..."}`` naming
it.  Bodies over ``max_body_size`` get ``413`` from the server before any
handler runs.  Connection ids are the ones ``App.global_id(conn)`` gives
(``"<node id>:<n>"`` with a broker, ``"<n>"`` without one).

``POST /publish``
    ``{"room": "lobby", "namespace": "", "text": "..."}``, or ``"base64":
    "..."`` instead of ``"text"`` for a binary message (``namespace`` is
    optional).  The message reaches the room's members on every node.
    ``200 {"seq": N, "remote": true}``; ``"remote": false`` when the broker
    did not take it (local members got it, other nodes did not).  A request
    is checked completely before anything is published: a rejected one never
    takes a room sequence number, so the numbers a room's members see stay
    consecutive.

``POST /connections/{id}`` (and ``POST /connections?id={id}``)
    ``{"text": "..."}`` or ``{"base64": "..."}``: that message (the text
    itself, not the JSON) to one connection, on whichever node holds it.
    ``200`` sent, ``404`` no such connection, ``504`` its node did not answer.

``DELETE /connections/{id}`` (and ``DELETE /connections?id={id}``)
    Close that connection, on whichever node holds it, with the close code
    and reason of the optional body ``{"code": 4000, "reason": "kicked"}``
    (default ``1000`` and no reason; a code a server may send: 1000-1003,
    1007-1014, 3000-4999; a reason of at most 123 bytes of UTF-8).  ``200``
    closing, ``404``, ``504`` as above.

``GET /presence?room=NAME[&namespace=NS]``
    Who is in the room on every node (``--presence``): ``{"room", "namespace",
    "count", "members": {connection id: user id}, "users": [...]}``.
    ``409`` when presence is off, ``503`` when Redis cannot be asked.

``GET /history?room=NAME[&namespace=NS][&since=ID][&limit=N]``
    The room's recent messages (``--broker redis+streams://...``), oldest
    first: ``{"room", "namespace", "complete", "messages": [{"id", "origin",
    "text" | "base64"}]}``: the last ``limit`` (100, at most 1000), or up to
    ``limit`` after the entry ``since``; ``complete`` is false when entries
    after ``since`` were trimmed away (null without ``since``).  ``409``
    without a broker that keeps history, ``503`` when Redis cannot be asked.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
from urllib.parse import unquote

from .broker.wire import parse_id, room_message
from .errors import BrokerError, RoomDeniedError, RoomNameError

JSON = "application/json"
MAX_HISTORY = 1000          # largest ?limit= of GET /history
MAX_REASON = 123            # bytes of a close reason (RFC 6455 section 5.5)

__all__ = ["register", "MAX_HISTORY"]


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


def _json_object(request, fields: tuple, example: str) -> dict:
    """The request body as a JSON object with no field outside ``fields``
    (the Content-Type is not looked at)."""
    body = bytes(request.body or b"")
    if not body.strip():
        raise _BadRequest(f"the body must be a JSON object, e.g. {example}")
    try:
        obj = json.loads(body)
    except ValueError:              # also UnicodeDecodeError: not UTF-8/16/32
        raise _BadRequest(f"the body is not JSON; send a JSON object, e.g. {example}") from None
    except RecursionError:          # [[[[... : json gives up past the interpreter's recursion limit
        raise _BadRequest("the body is not JSON (nested too deeply)") from None
    if not isinstance(obj, dict):
        raise _BadRequest(f"the body must be a JSON object, e.g. {example}")
    unknown = sorted(k for k in obj if k not in fields)
    if unknown:
        raise _BadRequest(f"unknown field {json.dumps(unknown[0])[:80]} (known: {', '.join(fields)})")
    return obj


def _payload(obj: dict):
    """The message of ``{"text": str}`` (text) or ``{"base64": str}`` (binary)."""
    has_text, has_b64 = "text" in obj, "base64" in obj
    if has_text == has_b64:
        raise _BadRequest('give "text" (a string) or "base64" (binary, base64-encoded), one of them')
    if has_text:
        if not isinstance(obj["text"], str):
            raise _BadRequest('"text" must be a string')
        return _utf8(obj["text"], '"text"')
    if not isinstance(obj["base64"], str):
        raise _BadRequest('"base64" must be a string')
    try:
        return base64.b64decode(obj["base64"], validate=True)
    except (binascii.Error, ValueError):
        raise _BadRequest('"base64" is not valid base64') from None


def _message(request, *, need_room: bool):
    """``(room, namespace, message)`` of a ``POST /publish`` (``need_room``)
    or ``POST /connections/{id}`` body, every part checked (the room and the
    namespace are strings that encode to UTF-8, so is a text message); room
    and namespace are None and "" for a connection."""
    if need_room:
        obj = _json_object(request, ("room", "namespace", "text", "base64"),
                           '{"room": "lobby", "text": "hello"}')
        room, ns = obj.get("room"), obj.get("namespace", "")
        if not isinstance(room, str) or not room:
            raise _BadRequest('"room" is required (a non-empty string)')
        if not isinstance(ns, str):
            raise _BadRequest('"namespace" must be a string')
        _utf8(room, '"room"')
        _utf8(ns, '"namespace"')
    else:
        obj = _json_object(request, ("text", "base64"), '{"text": "hello"}')
        room, ns = None, ""
    return room, ns, _payload(obj)


def _close_args(request) -> tuple:
    """``(code, reason)`` of a ``DELETE /connections/{id}`` (the body is optional)."""
    if not bytes(request.body or b"").strip():
        return 1000, ""
    obj = _json_object(request, ("code", "reason"), '{"code": 4000, "reason": "kicked"}')
    code, reason = obj.get("code", 1000), obj.get("reason", "")
    if (isinstance(code, bool) or not isinstance(code, int)
            or not (1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999)):
        raise _BadRequest('"code" must be a close code a server may send: 1000-1003, 1007-1014 '
                          'or 3000-4999')
    if not isinstance(reason, str):
        raise _BadRequest('"reason" must be a string')
    if len(_utf8(reason, '"reason"').encode("utf-8")) > MAX_REASON:
        raise _BadRequest(f'"reason" is longer than {MAX_REASON} bytes of UTF-8')
    return code, reason


def _room_query(request) -> tuple:
    """``(room, namespace)`` of a ``?room=...&namespace=...`` query."""
    q = request.query
    room, ns = q.get("room"), q.get("namespace", "")
    if not room:
        raise _BadRequest("give ?room=NAME")
    return _utf8(room, "room"), _utf8(ns, "namespace")


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


def _entry(e) -> dict | None:
    """One history entry as JSON (None for a payload that is no room message)."""
    try:
        message = room_message(e.payload)
    except Exception:           # a foreign publisher's bytes: not shown
        return None
    if message is None:
        return None
    out = {"id": e.id, "origin": e.origin}
    if isinstance(message, str):
        out["text"] = message
    else:
        out["base64"] = base64.b64encode(message).decode("ascii")
    return out


def register(node, token: str, *, prefix: str = ""):
    """Add the endpoints of the module docstring (under ``prefix``) to the
    routes of ``node`` (a :class:`fastws.node.Node`); with a broker they reach
    every node, without one the rooms and connections of this process."""
    if not token:
        raise ValueError("the HTTP publish API needs a bearer token")
    expected = token.encode("utf-8")
    unauthorized = (401, b"missing or wrong bearer token\n", "text/plain", [("WWW-Authenticate", "Bearer")])

    def authorized(request) -> bool:
        got = _bearer(request.header("authorization"))
        if got is None:
            return False
        return hmac.compare_digest(got, expected)   # time independent of where they differ

    async def publish(request):
        if not authorized(request):
            return unauthorized
        try:
            room, ns, message = _message(request, need_room=True)
            if not isinstance(message, str) and (ns, room) in node.rooms.batching:
                raise _BadRequest(f"room {room!r} batches its messages: send text")
            node.rooms.check_name(room)       # RoomNameError: past max_room_name bytes
        except (_BadRequest, RoomNameError) as exc:
            return _reply(400, {"error": str(exc)})
        try:    # the app's authorize_publish for the room's namespace, with no connection
            node.rooms.check_publish(None, room, message, ns)
        except RoomDeniedError:
            return _reply(403, {"error": "publishing to this room is not allowed"})
        seq, remote = await node.publish_confirmed(room, message, namespace=ns)
        return _reply(200, {"seq": seq, "remote": remote})

    base = prefix + "/connections/"

    def conn_id_of(request):
        if request.path.startswith(base):
            return unquote(request.path[len(base):])
        return request.query.get("id")

    async def connection(request):
        if not authorized(request):
            return unauthorized
        conn_id = conn_id_of(request)
        if not conn_id:
            return _reply(400, {"error": "give the connection id: /connections/{id}"})
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

    async def disconnect(request):
        if not authorized(request):
            return unauthorized
        conn_id = conn_id_of(request)
        if not conn_id:
            return _reply(400, {"error": "give the connection id: /connections/{id}"})
        try:
            code, reason = _close_args(request)
        except _BadRequest as exc:
            return _reply(400, {"error": str(exc)})
        ok = await node.disconnect(conn_id, code, reason)
        if ok is None:
            return _reply(504, {"error": "the connection's node did not answer", "id": conn_id})
        if not ok:
            return _reply(404, {"error": "no such connection", "id": conn_id})
        return _reply(200, {"closing": True, "id": conn_id, "code": code})

    async def presence(request):
        if not authorized(request):
            return unauthorized
        if node.presence is None:
            return _reply(409, {"error": "presence is off: start the server with --presence and a "
                                         "Redis broker (--broker redis://...)"})
        try:
            room, ns = _room_query(request)
            node.rooms.check_name(room)
        except (_BadRequest, RoomNameError) as exc:
            return _reply(400, {"error": str(exc)})
        try:
            members = await node.presence.members(room, ns)
        except Exception as exc:    # Redis down or refusing: the answer is unknown, not empty
            return _reply(503, {"error": f"presence unavailable: {type(exc).__name__}"})
        return _reply(200, {"room": room, "namespace": ns, "count": len(members), "members": members,
                            "users": sorted({u for u in members.values() if u})})

    async def history(request):
        if not authorized(request):
            return unauthorized
        if not node.has_history:
            return _reply(409, {"error": "history needs a broker that keeps it: "
                                         "--broker redis+streams://host:port/db"})
        q = request.query
        try:
            room, ns = _room_query(request)
            node.rooms.check_name(room)
            since = q.get("since")
            if since is not None:
                try:
                    parse_id(since)
                except ValueError:
                    raise _BadRequest("since must be a message id such as 1732770000000-3") from None
            try:
                limit = int(q.get("limit", "100"))
            except ValueError:
                limit = 0
            if not 1 <= limit <= MAX_HISTORY:
                raise _BadRequest(f"limit must be an integer 1..{MAX_HISTORY}")
        except (_BadRequest, RoomNameError) as exc:
            return _reply(400, {"error": str(exc)})
        try:
            page = await node.history(room, namespace=ns, since=since, limit=limit)
        except BrokerError as exc:
            return _reply(503, {"error": str(exc)})
        messages = [m for m in map(_entry, page) if m is not None]
        return _reply(200, {"room": room, "namespace": ns, "complete": page.complete,
                            "messages": messages})

    node.routes.add("POST", prefix + "/publish", publish)
    node.routes.add("POST", prefix + "/connections", connection)
    node.routes.add("POST", base, connection, prefix=True)       # POST /connections/{id}
    node.routes.add("DELETE", prefix + "/connections", disconnect)
    node.routes.add("DELETE", base, disconnect, prefix=True)     # DELETE /connections/{id}
    node.routes.add("GET", prefix + "/presence", presence)
    node.routes.add("GET", prefix + "/history", history)
    return connection
