"""A raw ASGI 3 application for the settings tests of ASGI mode
(tests/integration/test_api.py, test_settings.py).

WebSocket (any path but ``/deny``): accepts, sends the scope as JSON
``{"path", "root_path", "client", "pid"}``, then each text message is a
command, as in ``settings_app`` (the fastws.App twin): ``join R`` joins room
R (``fastws.join``) and answers ``joined R`` or ``refused <error class>``;
``pub R text`` publishes ``text`` to R (``fastws.publish``); ``flood R N
SIZE`` publishes N messages of SIZE bytes, then answers ``flooded``; ``block
S`` blocks the event loop S seconds, then answers ``blocked``; anything else
(binary too) is echoed.  ``/deny``: the application refuses
(``websocket.close`` before accept: 403).
HTTP: ``GET /scope`` -> the scope as JSON; ``POST /echo`` -> the body;
anything else 404 (fastws then serves its operations routes there).
"""

import json
import os
import time


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    info = {"path": scope["path"], "root_path": scope.get("root_path", ""),
            "client": list(scope["client"]) if scope.get("client") else None, "pid": os.getpid()}
    if scope["type"] == "websocket":
        await receive()                                   # websocket.connect
        if scope["path"].endswith("/deny"):
            await send({"type": "websocket.close", "code": 1000})
            return
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.send", "text": json.dumps(info)})
        while True:
            msg = await receive()
            if msg["type"] == "websocket.disconnect":
                return
            text = msg.get("text")
            if text is not None and text.startswith("join "):
                try:
                    await send({"type": "fastws.join", "room": text[5:]})
                    await send({"type": "websocket.send", "text": "joined " + text[5:]})
                except Exception as exc:  # RoomLimitError, RoomNameError: the app answers
                    await send({"type": "websocket.send", "text": "refused " + type(exc).__name__})
            elif text is not None and text.startswith("pub "):
                _, room, body = text.split(" ", 2)
                await send({"type": "fastws.publish", "room": room, "text": body})
            elif text is not None and text.startswith("flood "):
                _, room, n, size = text.split()
                for _ in range(int(n)):
                    await send({"type": "fastws.publish", "room": room, "text": "x" * int(size)})
                await send({"type": "websocket.send", "text": "flooded"})
            elif text is not None and text.startswith("block "):
                time.sleep(float(text[6:]))
                await send({"type": "websocket.send", "text": "blocked"})
            elif text is not None:
                await send({"type": "websocket.send", "text": text})
            else:
                await send({"type": "websocket.send", "bytes": msg.get("bytes") or b""})
        return
    # http
    body = b""
    while True:
        msg = await receive()
        body += msg.get("body", b"")
        if not msg.get("more_body"):
            break
    if scope["path"].endswith("/scope"):
        out, status = json.dumps(info).encode(), 200
    elif scope["path"].endswith("/echo") and scope["method"] == "POST":
        out, status = body, 200
    else:
        out, status = b"not found", 404
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": out})
