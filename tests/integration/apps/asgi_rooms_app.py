"""A FastAPI app on the ``fastws.rooms`` ASGI extension, for the scale-out
and operations tests of ASGI mode (tests/integration/test_asgi.py).

    fastws serve tests.integration.apps.asgi_rooms_app:app --interface asgi \
        --broker $FASTWS_TEST_REDIS --broker-prefix PREFIX

WebSocket
  /rooms/{room}             joins {room} (fastws.asgi.rooms), sends
                            ``{"joined": room, "pid": <worker pid>}``, then
                            publishes every text message it receives to the
                            room (the sender gets its own copy)
HTTP
  POST /rooms/{room}/publish  the body (text) to the room, from an http scope:
                            ``{"delivered": <members of this process>}``
  GET  /livez               the application's own route (it wins over fastws's)

There is no /health or /metrics route: fastws serves those where the
application answers 404.
"""

import os

from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect

from fastws.asgi import rooms

app = FastAPI()


@app.websocket("/rooms/{room}")
async def member(websocket: WebSocket, room: str):
    await websocket.accept()
    await rooms.join(websocket, room)
    await websocket.send_json({"joined": room, "pid": os.getpid()})
    try:
        while True:
            await rooms.publish(websocket, room, await websocket.receive_text())
    except WebSocketDisconnect:
        pass


@app.post("/rooms/{room}/publish")
async def publish(room: str, request: Request):
    body = (await request.body()).decode()
    return {"delivered": await rooms.publish(request, room, body)}


@app.get("/livez")
async def livez():
    return {"app": "own livez"}
