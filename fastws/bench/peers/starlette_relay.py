"""The relay app on Starlette, served by uvicorn (``--ws websockets`` or ``wsproto``).

``--compression``: ``ws_per_message_deflate=True`` (permessage-deflate as the
chosen --ws implementation does it under uvicorn). ``--certfile``/``--keyfile``:
serve TLS (uvicorn's ``ssl_certfile``/``ssl_keyfile``)."""

from __future__ import annotations

import argparse
import resource

import uvicorn
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

MAX_SIZE = 16 * 1024 * 1024
SUBSCRIBERS: set = set()


async def echo(ws: WebSocket) -> None:
    await ws.accept()
    while True:
        msg = await ws.receive()
        if msg["type"] == "websocket.disconnect":
            return
        if msg.get("text") is not None:
            await ws.send_text(msg["text"])
        else:
            await ws.send_bytes(msg["bytes"])


async def subscriber(ws: WebSocket) -> None:
    await ws.accept()
    SUBSCRIBERS.add(ws)
    try:
        while True:
            msg = await ws.receive()
            if msg["type"] == "websocket.disconnect":
                return
            text = msg.get("text")
            for s in list(SUBSCRIBERS):
                try:
                    if text is not None:
                        await s.send_text(text)
                    else:
                        await s.send_bytes(msg["bytes"])
                except (WebSocketDisconnect, RuntimeError):
                    SUBSCRIBERS.discard(s)
    finally:
        SUBSCRIBERS.discard(ws)


app = Starlette(routes=[WebSocketRoute("/echo", echo), WebSocketRoute("/{path:path}", subscriber)])


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--ws", default="websockets", choices=["websockets", "wsproto", "websockets-sansio"])
    p.add_argument("--compression", action="store_true", help="negotiate permessage-deflate")
    p.add_argument("--certfile", help="serve TLS (wss://) with this certificate (PEM)")
    p.add_argument("--keyfile", help="the certificate's private key (PEM)")
    a = p.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    uvicorn.run(
        app, host=a.host, port=a.port, ws=a.ws, loop="uvloop", http="auto",
        lifespan="off", log_level="warning", access_log=False, backlog=4096,
        ws_max_size=MAX_SIZE, ws_per_message_deflate=a.compression, ws_ping_interval=None,
        ssl_certfile=a.certfile, ssl_keyfile=a.keyfile,
    )
