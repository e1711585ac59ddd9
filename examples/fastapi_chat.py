"""FastAPI's documented WebSocket chat, unchanged, then the same chat on fastws rooms.

    fastws serve examples.fastapi_chat:app --port 8000     # or: uvicorn examples.fastapi_chat:app

* ``/ws/{client_id}``: the example from FastAPI's documentation ("Handling
  disconnections and multiple clients"), copied as it is: a
  ``ConnectionManager`` keeps a list of sockets and ``broadcast`` awaits one
  ``send_text`` per socket.
* ``/rooms/{room}/ws/{client_id}``: the same chat with ``fastws.asgi.rooms``:
  under ``fastws serve`` the server keeps the members and a publish encodes
  the message once and queues the same frame on every member; under uvicorn
  or Starlette's ``TestClient`` it falls back to a loop like the one above.
* ``POST /rooms/{room}/publish``: a backend pushes to a room over HTTP.
* ``GET /``: the documentation's HTML page.
"""

from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import HTMLResponse

from fastws.asgi import rooms

app = FastAPI()

html = """
<!DOCTYPE html>
<html>
    <head>
        <title>Chat</title>
    </head>
    <body>
        <h1>WebSocket Chat</h1>
        <h2>Your ID: <span id="ws-id"></span></h2>
        <form action="" onsubmit="sendMessage(event)">
            <input type="text" id="messageText" autocomplete="off"/>
            <button>Send</button>
        </form>
        <ul id='messages'>
        </ul>
        <script>
            var client_id = Date.now()
            document.querySelector("#ws-id").textContent = client_id;
            var ws = new WebSocket(`ws://localhost:8000/ws/${client_id}`);
            ws.onmessage = function(event) {
                var messages = document.getElementById('messages')
                var message = document.createElement('li')
                var content = document.createTextNode(event.data)
                message.appendChild(content)
                messages.appendChild(message)
            };
            function sendMessage(event) {
                var input = document.getElementById("messageText")
                ws.send(input.value)
                input.value = ''
                event.preventDefault()
            }
        </script>
    </body>
</html>
"""


class ConnectionManager:
    def __init__(self):
        self.active_connections: list[WebSocket] = []

    async def connect(self, websocket: WebSocket):
        await websocket.accept()
        self.active_connections.append(websocket)

    def disconnect(self, websocket: WebSocket):
        self.active_connections.remove(websocket)

    async def send_personal_message(self, message: str, websocket: WebSocket):
        await websocket.send_text(message)

    async def broadcast(self, message: str):
        for connection in self.active_connections:
            await connection.send_text(message)


manager = ConnectionManager()


@app.get("/")
async def get():
    return HTMLResponse(html)


@app.websocket("/ws/{client_id}")
async def websocket_endpoint(websocket: WebSocket, client_id: int):
    await manager.connect(websocket)
    try:
        while True:
            data = await websocket.receive_text()
            await manager.send_personal_message(f"You wrote: {data}", websocket)
            await manager.broadcast(f"Client #{client_id} says: {data}")
    except WebSocketDisconnect:
        manager.disconnect(websocket)
        await manager.broadcast(f"Client #{client_id} left the chat")


# -- the same chat on fastws rooms ------------------------------------------


@app.websocket("/rooms/{room}/ws/{client_id}")
async def room_endpoint(websocket: WebSocket, room: str, client_id: int):
    await websocket.accept()
    await rooms.join(websocket, room)
    try:
        while True:
            data = await websocket.receive_text()
            await websocket.send_text(f"You wrote: {data}")
            await rooms.publish(websocket, room, f"Client #{client_id} says: {data}")
    except WebSocketDisconnect:
        await rooms.leave(websocket, room)
        await rooms.publish(websocket, room, f"Client #{client_id} left the chat")


@app.post("/rooms/{room}/publish")
async def publish(room: str, request: Request):
    text = (await request.body()).decode()
    return {"room": room, "delivered": await rooms.publish(request, room, text)}
