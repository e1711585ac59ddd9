"""The ASGI benchmark app: one Starlette app served by every ASGI server.

    fastws serve fastws.bench.peers.asgi_apps:app --interface asgi
    python -m fastws.bench.peers.asgi_apps --port N --ws websockets   # uvicorn (uvloop, httptools)
    hypercorn -k uvloop fastws.bench.peers.asgi_apps:app
    granian --interface asgi --loop uvloop fastws.bench.peers.asgi_apps:app

Routes (paths the load generator takes with ``--path``):

* ``/echo``: each message goes back unchanged, text as text, bytes as bytes.
* ``/manager/{name}``: broadcast written as FastAPI's documented
  ``ConnectionManager`` ("Handling disconnections and multiple clients"): a
  list of sockets, ``broadcast`` awaits one send per socket. The only change
  from the documentation: bytes are sent as bytes (the load generator
  publishes binary). Works on every server.
* ``/rooms/{name}``: the same broadcast with ``fastws.asgi.rooms`` (join +
  publish). Under ``fastws serve`` the server keeps the members and encodes
  once; elsewhere it falls back to a per-process set and one send per socket,
  so it is only meaningful on fastws.

Every message received on a broadcast route goes to every connection of that
route, the sender included (the load generator's publisher counts its own copy
as the acknowledgement).
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from fastws.asgi import rooms

MAX_SIZE = 16 * 1024 * 1024


async def echo(websocket: WebSocket) -> None:
    await websocket.accept()
    while True:
        msg = await websocket.receive()
        if msg["type"] == "websocket.disconnect":
            return
        text = msg.get("text")
        if text is not None:
            await websocket.send_text(text)
        else:
            await websocket.send_bytes(msg["bytes"])


class ConnectionManager:
    """FastAPI's documented pattern (bytes kept as bytes)."""

    def __init__(self):
        self.active_connections: list[WebSocket] = []

    async def connect(self, websocket: WebSocket):
        await websocket.accept()
        self.active_connections.append(websocket)

    def disconnect(self, websocket: WebSocket):
        self.active_connections.remove(websocket)

    async def broadcast(self, message: str | bytes):
        for connection in self.active_connections:
            if isinstance(message, str):
                await connection.send_text(message)
            else:
                await connection.send_bytes(message)


manager = ConnectionManager()


async def manager_broadcast(websocket: WebSocket) -> None:
    await manager.connect(websocket)
    try:
        while True:
            msg = await websocket.receive()
            if msg["type"] == "websocket.disconnect":
                raise WebSocketDisconnect(msg.get("code", 1000))
            text = msg.get("text")
            await manager.broadcast(text if text is not None else msg["bytes"])
    except WebSocketDisconnect:
        manager.disconnect(websocket)


async def rooms_broadcast(websocket: WebSocket) -> None:
    room = websocket.path_params["name"]
    await websocket.accept()
    await rooms.join(websocket, room)
    try:
        while True:
            msg = await websocket.receive()
            if msg["type"] == "websocket.disconnect":
                return
            text = msg.get("text")
            await rooms.publish(websocket, room, text if text is not None else msg["bytes"])
    finally:
        await rooms.leave(websocket, room)


app = Starlette(routes=[
    WebSocketRoute("/echo", echo),
    WebSocketRoute("/manager/{name}", manager_broadcast),
    WebSocketRoute("/rooms/{name}", rooms_broadcast),
])


def main(argv=None) -> None:
    """uvicorn with uvloop and httptools, pings and compression off."""
    import argparse

    import uvicorn

    p = argparse.ArgumentParser(description="serve the ASGI bench app with uvicorn")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--ws", default="websockets", choices=["websockets", "wsproto", "websockets-sansio"])
    a = p.parse_args(argv)
    uvicorn.run(
        "fastws.bench.peers.asgi_apps:app", host=a.host, port=a.port, ws=a.ws, loop="uvloop", http="httptools",
        lifespan="off", log_level="warning", access_log=False, backlog=4096,
        ws_max_size=MAX_SIZE, ws_per_message_deflate=False, ws_ping_interval=None,
    )


if __name__ == "__main__":
    main()
