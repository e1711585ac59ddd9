"""A Socket.IO test app: every feature the Socket.IO tests drive, on both fronts.

    fastws serve tests.integration.apps.sio_app:app        (native front)
    fastws serve tests.integration.apps.sio_app:asgi       (ASGI: Starlette beside Socket.IO)

Namespace "/" (events, each answering its ack):
    echo(data) -> data                 join(room) -> rooms(sid)       leave(room) -> rooms(sid)
    to_room({room, data, skip})        emit "room_msg" data to room (skip_sid=sid when skip)
    to_rooms({rooms, data})            emit "room_msg" to a list of rooms (each socket once)
    to_all(data)                       emit "all_msg" to the whole namespace
    to_sid({sid, data})                emit "direct" to one sid (on any node)
    binary(data) -> data               and emit "binary_back" data (bytes inside stay bytes)
    ask({event, data, timeout})        call() the client back: -> {"answer": ..} or {"error": ..}
    remember(value) / recall() -> value   session data
    kick()                             disconnect(sid) by the server
    volatile({room, count, size})      count volatile emits of size bytes to room
    stats() -> the server's counters
    whoami() -> {"sid": sid, "auth": auth}
connect refuses auth {"token": "bad"} with ConnectionRefusedError("bad token", {"code": 4001});
every disconnect is emitted as "gone" {sid, reason} to room "observers".

Namespace "/chat": connect(sid, environ, auth) keeps auth; chat(text) emits "chat" {sid, text}
to every socket of "/chat"; whoami() -> {"sid", "auth", "namespace"}.

Plain HTTP (both fronts): POST /emit with {"event", "data", "to", "namespace"} emits from
the server (another process or node publishing); GET /sio-stats -> the server's counters.

Settings from the environment: SIO_PING_INTERVAL, SIO_PING_TIMEOUT, SIO_MAX_PAYLOAD,
SIO_RECOVERY=1 (connection state recovery, SIO_RECOVERY_WINDOW seconds).
"""

from __future__ import annotations

import json
import os

import fastws
import fastws.socketio

sio = fastws.socketio.Server(
    ping_interval=float(os.environ.get("SIO_PING_INTERVAL", "25")),
    ping_timeout=float(os.environ.get("SIO_PING_TIMEOUT", "20")),
    max_http_buffer_size=int(os.environ.get("SIO_MAX_PAYLOAD", "1000000")),
    connection_state_recovery=os.environ.get("SIO_RECOVERY") == "1",
    max_disconnection_duration=float(os.environ.get("SIO_RECOVERY_WINDOW", "120")),
    cors_allowed_origins="*",
)
auths: dict = {}


@sio.event
def connect(sid, environ, auth):
    if auth and auth.get("token") == "bad":
        raise fastws.socketio.ConnectionRefusedError("bad token", {"code": 4001})
    auths[sid] = auth
    if auth and auth.get("observer"):
        sio.enter_room(sid, "observers")


@sio.event
def disconnect(sid, reason):
    auths.pop(sid, None)
    sio.emit("gone", {"sid": sid, "reason": reason}, to="observers")


@sio.event
def echo(sid, data=None):
    return data


@sio.event
async def join(sid, room):
    await sio.enter_room(sid, room)
    return sio.rooms(sid)


@sio.event
async def leave(sid, room):
    await sio.leave_room(sid, room)
    return sio.rooms(sid)


@sio.event
async def to_room(sid, msg):
    await sio.emit("room_msg", msg["data"], to=msg["room"], skip_sid=sid if msg.get("skip") else None)
    return "sent"


@sio.event
def to_rooms(sid, msg):
    sio.emit("room_msg", msg["data"], to=msg["rooms"])
    return "sent"


@sio.event
def to_all(sid, data):
    sio.emit("all_msg", data)
    return "sent"


@sio.event
def to_sid(sid, msg):
    sio.emit("direct", msg["data"], to=msg["sid"])
    return "sent"


@sio.event
async def binary(sid, data):
    await sio.emit("binary_back", data, to=sid)
    return data


@sio.event
async def ask(sid, msg):
    try:
        answer = await sio.call(msg["event"], msg.get("data"), to=sid, timeout=msg.get("timeout", 5))
    except fastws.socketio.TimeoutError:
        return {"error": "timeout"}
    return {"answer": answer}


@sio.event
async def remember(sid, value):
    async with sio.session(sid) as session:
        session["value"] = value
    return "ok"


@sio.event
async def recall(sid):
    session = await sio.get_session(sid)
    return session.get("value")


@sio.event
async def kick(sid):
    await sio.disconnect(sid)


@sio.event
def volatile(sid, msg):
    payload = "v" * msg["size"]
    for i in range(msg["count"]):
        sio.emit("vol", [i, payload], to=msg["room"], volatile=True)
    return "sent"


@sio.event
def stats(sid):
    return _stats()


@sio.event
def whoami(sid):
    return {"sid": sid, "auth": auths.get(sid)}


# -- /chat --------------------------------------------------------------------------

chat_auth: dict = {}


@sio.on("connect", namespace="/chat")
def chat_connect(sid, environ, auth):
    chat_auth[sid] = auth


@sio.on("chat", namespace="/chat")
def chat(sid, text):
    sio.emit("chat", {"sid": sid, "text": text}, namespace="/chat")
    return "ok"


@sio.on("whoami", namespace="/chat")
def chat_whoami(sid):
    return {"sid": sid, "auth": chat_auth.get(sid), "namespace": "/chat"}


# -- the fronts ---------------------------------------------------------------------

def _emit_from(body: bytes):
    msg = json.loads(body or b"{}")
    sio.emit(msg["event"], msg.get("data"), to=msg.get("to"), namespace=msg.get("namespace"))
    return 200, b'{"ok":true}\n', "application/json"


app = fastws.App()
sio.attach(app)


@app.http("POST", "/emit")
def emit_route(request):
    return _emit_from(request.body)


def _stats() -> dict:
    """The Socket.IO server's counters and the hub's drops of volatile emits."""
    dropped = sio.hub.stats()["dropped"] if sio.hub is not None else {}
    return dict(sio.stats(), dropped_low=dropped.get(("backpressure", fastws.PRIORITY_LOW), 0))


@app.http("GET", "/sio-stats")
def stats_route(request):
    return 200, json.dumps(_stats()), "application/json"


def _make_asgi():
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    async def emit(request: Request):
        status, body, ctype = _emit_from(await request.body())
        return Response(body, status_code=status, media_type=ctype)

    async def stats_page(request: Request):
        return JSONResponse(_stats())

    async def hello(request: Request):
        return JSONResponse({"hello": "from starlette"})

    web = Starlette(routes=[Route("/emit", emit, methods=["POST"]), Route("/sio-stats", stats_page),
                            Route("/hello", hello)])
    return fastws.socketio.ASGIApp(sio, web)


asgi = _make_asgi()
