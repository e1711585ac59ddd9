"""Test apps for tests/integration/test_attack_slow.py: the same routes in
both modes.

    fastws serve tests.integration.apps.slow_app:app    # native (fastws.App)
    fastws serve tests.integration.apps.slow_app:asgi   # ASGI mode

Routes
  WebSocket  every path: echo (native); /ws: sends scope["scheme"] first,
             then echoes (ASGI)
             /undecided: the decision on the upgrade takes 30 s
  POST /upload   the length of the request body, as text
  GET  /undecided-state   "cancelled", "finished" or "running": what became of the
                 last /undecided decision (native only)
  GET  /scheme   scope["scheme"] (ASGI only; native has no scope)
  GET  /         "ok" (ASGI only)
"""

import asyncio

import fastws

app = fastws.App()
UNDECIDED_FOR = 30      # seconds the /undecided upgrade waits before it is accepted


UNDECIDED = {"state": "none"}


@app.on_connect("/undecided")
async def undecided(request):
    UNDECIDED["state"] = "running"
    try:
        await asyncio.sleep(UNDECIDED_FOR)
    except asyncio.CancelledError:
        UNDECIDED["state"] = "cancelled"
        raise
    UNDECIDED["state"] = "finished"


@app.http("GET", "/undecided-state")
def undecided_state(request):
    return 200, UNDECIDED["state"].encode(), "text/plain"


@app.on_message("*")
def echo(conn, data):
    conn.send(data)


@app.http("POST", "/upload")
def upload(request):
    return 200, str(len(request.body)).encode(), "text/plain"


async def asgi(scope, receive, send):
    """A raw ASGI 3 application (no framework between the test and the server)."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] == "websocket":
        await receive()                                  # websocket.connect
        if scope["path"] == "/undecided":
            await asyncio.sleep(UNDECIDED_FOR)
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.send", "text": scope["scheme"]})
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            if message.get("text") is not None:
                await send({"type": "websocket.send", "text": message["text"]})
            else:
                await send({"type": "websocket.send", "bytes": message["bytes"]})
    # http
    size = 0
    if scope["method"] == "POST":
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            size += len(message.get("body", b""))
            if not message.get("more_body"):
                break
    if scope["path"] == "/upload":
        body = str(size).encode()
    elif scope["path"] == "/scheme":
        body = scope["scheme"].encode()
    elif scope["path"] == "/":
        body = b"ok"
    else:
        await send({"type": "http.response.start", "status": 404,
                    "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"not found\n"})
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": body})
