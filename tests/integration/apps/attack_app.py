"""The app of tests/integration/test_attack_all.py and bench/attack.py: every
route the attack set of tests/attacks.py aims at, in both modes.

    fastws serve tests.integration.apps.attack_app:app                     # native
    fastws serve tests.integration.apps.attack_app:asgi --interface asgi   # ASGI

Routes (the same in both modes)
  WebSocket  /rooms       JSON commands, one answer each (JSON):
                            {"ping": x}                       -> {"pong": x}
                            {"join": [R, ...]}                join in order, stop at the first refusal
                            {"join_range": P, "start": i, "count": n}
                                                              join P + str(k), k = i .. i+n-1, same
                                 both answer {"joined": k, "error": null | {"type": ..., "message": ...}}
                            {"publish": R, "text": t}         -> {"published": R[:64], "error": ...}
                          (a refusal is a fastws.errors.RoomError the app catches: the
                          connection stays open and in its rooms)
             /undecided   the decision on the upgrade takes 30 s
             /private     a JWT (HS256, JWT_SECRET, issuer JWT_ISSUER, audience
                          JWT_AUDIENCE) from Authorization: Bearer (or cookie,
                          query, subprotocol), else 401; then echo
             any other    echo (text and binary)
  POST /upload            the length of the request body, as text
  anything else over HTTP the node's routes (/metrics, /health, POST /publish ...)

Rooms named ``locked-*`` may not be joined, nor published to for a
connection or through the HTTP publish API: natively the app's
``authorize_join`` / ``authorize_publish`` refuse (RoomDeniedError, 403); an
ASGI app has no such hooks, so the ASGI side refuses joins and publishes of
its connections itself, and the HTTP publish API does not ask it.
The JWT check of the ASGI side is ``TokenAuth.token_of`` + ``verify``, with
a 401 denial response.
"""

import asyncio
import json

import fastws
from fastws.auth import TokenAuth
from fastws.errors import RoomDeniedError, RoomError

UNDECIDED_FOR = 30      # seconds the /undecided upgrade waits before it is accepted
JWT_SECRET = "attack-app-jwt-secret-not-for-production-0123456789"
JWT_ISSUER = "https://issuer.attack.test"
JWT_AUDIENCE = "attack-app"
LOCKED = "locked-"

auth = TokenAuth(keys=[JWT_SECRET], algorithms=["HS256"], issuer=JWT_ISSUER, audience=JWT_AUDIENCE)
app = fastws.App()


def _error(exc):
    return {"type": type(exc).__name__, "message": str(exc)}


def _names(cmd):
    if "join_range" in cmd:
        prefix, start = cmd["join_range"], cmd.get("start", 0)
        return (f"{prefix}{k}" for k in range(start, start + cmd["count"]))
    return cmd["join"]


def _command(cmd, join, publish):
    """The answer to one /rooms command; ``join(name)`` and ``publish(room,
    text)`` are the front's own (they raise RoomError on a refusal)."""
    if "ping" in cmd:
        return {"pong": cmd["ping"]}
    reply = {"error": None}
    try:
        if "publish" in cmd:
            reply["published"] = cmd["publish"][:64]
            publish(cmd["publish"], cmd["text"])
        else:
            reply["joined"] = 0
            for name in _names(cmd):
                join(name)
                reply["joined"] += 1
    except RoomError as exc:
        reply["error"] = _error(exc)
    return reply


# -- native (fastws.App) ------------------------------------------------------------------


@app.on_connect("/undecided")
async def undecided(request):
    await asyncio.sleep(UNDECIDED_FOR)


@app.on_message("/rooms")
def rooms(conn, data):
    reply = _command(json.loads(data), conn.join, lambda room, text: app.publish(room, text, sender=conn))
    conn.send(json.dumps(reply))


@app.authorize_join()
def may_join(conn, room):
    return not room.startswith(LOCKED)


@app.authorize_publish()
def may_publish(conn, room, message):
    return not room.startswith(LOCKED)


app.route("/private", on_connect=auth, on_message=lambda conn, data: conn.send(data))


@app.on_message("*")
def echo(conn, data):
    conn.send(data)


@app.http("POST", "/upload")
def upload(request):
    return 200, str(len(request.body)).encode(), "text/plain"


# -- ASGI ---------------------------------------------------------------------------------


async def _lifespan(receive, send):
    while True:
        event = await receive()
        if event["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif event["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def _unlocked(action, fn):
    """``fn(room, *args)`` unless the room is locked (RoomDeniedError)."""
    def checked(room, *args):
        if room.startswith(LOCKED):
            raise RoomDeniedError(room, action)
        return fn(room, *args)
    return checked


async def _refuse_401(send):
    await send({"type": "websocket.http.response.start", "status": 401,
                "headers": [(b"www-authenticate", b"Bearer"), (b"content-type", b"text/plain")]})
    await send({"type": "websocket.http.response.body", "body": b"unauthorized"})


async def _websocket(scope, receive, send):
    await receive()                                  # websocket.connect
    if scope["path"] == "/undecided":
        await asyncio.sleep(UNDECIDED_FOR)
    elif scope["path"] == "/private":
        token, _ = auth.token_of(scope)
        try:
            auth.verify(token or "")
        except Exception:  # every bad token gets the same answer
            await _refuse_401(send)
            return
    await send({"type": "websocket.accept"})
    ext = scope["extensions"]["fastws.rooms"]
    join, publish = _unlocked("join", ext["join"]), _unlocked("publish", ext["publish"])
    while True:
        event = await receive()
        if event["type"] == "websocket.disconnect":
            return
        if scope["path"] == "/rooms":
            reply = _command(json.loads(event["text"]), join, publish)
            await send({"type": "websocket.send", "text": json.dumps(reply)})
        elif event.get("text") is not None:
            await send({"type": "websocket.send", "text": event["text"]})
        else:
            await send({"type": "websocket.send", "bytes": event["bytes"]})


async def _http(scope, receive, send):
    if (scope["method"], scope["path"]) == ("POST", "/upload"):
        size = 0
        while True:
            event = await receive()
            if event["type"] == "http.disconnect":
                return
            size += len(event.get("body", b""))
            if not event.get("more_body"):
                break
        status, body = 200, str(size).encode()
    else:
        # unread: the node's routes (the publish API) answer a 404 and read the body themselves
        status, body = 404, b"not found\n"
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": body})


async def asgi(scope, receive, send):
    """A raw ASGI 3 application (no framework between the attacks and the server)."""
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
    elif scope["type"] == "websocket":
        await _websocket(scope, receive, send)
    else:
        await _http(scope, receive, send)
