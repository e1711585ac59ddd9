"""A Starlette application exercising what ``fastws serve`` offers ASGI apps.

    fastws serve examples.starlette_app:app --port 8000

HTTP
  GET  /                 plain text
  GET  /state            the lifespan state (JSON), proof that startup ran first
  POST /echo             the request body back (read as a stream), any size
  GET  /stream?n=N       N chunks (a streaming, chunked response)
  GET  /error            raises: a 500, the server goes on
  GET  /last-close       how the last /ws/echo connection ended (JSON)
WebSocket
  /ws/echo               echo text and bytes; subprotocols "chat.v2" > "chat.v1";
                         "close CODE REASON" makes the server close with that code
  /ws/private?token=...  closes before accept (403) unless token=secret
  /ws/deny               refuses the upgrade with its own 401 response (denial extension)
  /ws/error              accepts, then raises (close 1011)
  /ws/error-early        raises before accepting (500)
  /ws/room/{room}        joins {room}; every text message goes to all members

Set ``FAIL_STARTUP=1`` to make lifespan startup fail (the server must exit
non-zero with one line).
"""

import contextlib
import os
import time

from starlette.applications import Starlette
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from fastws.asgi import rooms

LAST_CLOSE = {}


async def home(request):
    return PlainTextResponse("hello from starlette")


async def state(request):
    return JSONResponse({"db": request.state.db, "started_at": request.state.started_at})


async def echo_body(request):
    chunks = []
    async for chunk in request.stream():
        chunks.append(chunk)
    body = b"".join(chunks)
    return Response(body, media_type="application/octet-stream",
                    headers={"x-chunks": str(len(chunks))})


async def stream(request):
    n = int(request.query_params.get("n", "5"))

    async def gen():
        for i in range(n):
            yield f"chunk {i}\n".encode()

    return StreamingResponse(gen(), media_type="text/plain")


async def error(request):
    raise RuntimeError("boom (on purpose)")


async def last_close(request):
    return JSONResponse(LAST_CLOSE)


async def ws_echo(websocket: WebSocket):
    offered = websocket.scope["subprotocols"]
    chosen = next((p for p in ("chat.v2", "chat.v1") if p in offered), None)
    await websocket.accept(subprotocol=chosen)
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                LAST_CLOSE.update(code=message["code"], reason=message.get("reason") or "")
                return
            text = message.get("text")
            if text is not None:
                if text.startswith("close "):
                    _, code, reason = (text + " ").split(" ", 2)
                    await websocket.close(int(code), reason.strip())
                    return
                await websocket.send_text(text)
            else:
                await websocket.send_bytes(message["bytes"])
    except WebSocketDisconnect as exc:
        LAST_CLOSE.update(code=exc.code, reason=exc.reason or "")


async def ws_private(websocket: WebSocket):
    if websocket.query_params.get("token") != "secret":
        await websocket.close(code=1008)
        return
    await websocket.accept()
    await websocket.send_text("welcome")
    await websocket.close()


async def ws_deny(websocket: WebSocket):
    await websocket.send_denial_response(
        PlainTextResponse("no entry\n", status_code=401, headers={"x-denied": "yes"}))


async def ws_error(websocket: WebSocket):
    await websocket.accept()
    await websocket.receive_text()
    raise RuntimeError("websocket boom (on purpose)")


async def ws_error_early(websocket: WebSocket):
    raise RuntimeError("boom before accept (on purpose)")


async def ws_room(websocket: WebSocket):
    room = websocket.path_params["room"]
    await websocket.accept()
    await rooms.join(websocket, room)
    await websocket.send_text("joined")
    try:
        async for text in websocket.iter_text():
            await rooms.publish(websocket, room, text)
    finally:
        await rooms.leave(websocket, room)


@contextlib.asynccontextmanager
async def lifespan(app):
    if os.environ.get("FAIL_STARTUP") == "1":
        raise RuntimeError("database unreachable (FAIL_STARTUP=1)")
    yield {"db": "connected", "started_at": time.time()}


app = Starlette(
    routes=[
        Route("/", home),
        Route("/state", state),
        Route("/echo", echo_body, methods=["POST"]),
        Route("/stream", stream),
        Route("/error", error),
        Route("/last-close", last_close),
        WebSocketRoute("/ws/echo", ws_echo),
        WebSocketRoute("/ws/private", ws_private),
        WebSocketRoute("/ws/deny", ws_deny),
        WebSocketRoute("/ws/error", ws_error),
        WebSocketRoute("/ws/error-early", ws_error_early),
        WebSocketRoute("/ws/room/{room}", ws_room),
    ],
    lifespan=lifespan,
)
