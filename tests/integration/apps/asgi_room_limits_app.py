"""A raw ASGI app for the room limits in ASGI mode (``--interface asgi``).

WebSocket, any path: accepts, then for each text message (JSON)

    {"join": [R, ...], "via": "send" | "ext"}
        joins the rooms in order with ``await send({"type": "fastws.join"})``
        ("send") or the ``fastws.rooms`` extension's ``join`` ("ext"), stops
        at the first refusal and answers
        {"joined": k, "error": null | {"type": exception class, "message": str}}
    {"publish": R, "text": t, "via": "send" | "ext"}
        publishes; answers {"published": R} or {"error": {...}}

The refusal is a ``fastws.errors.RoomError`` raised into the app; the
WebSocket stays open.
"""

import json

from fastws.errors import RoomError


def _error(exc):
    return {"type": type(exc).__name__, "message": str(exc)}


async def _lifespan(receive, send):
    while True:
        event = await receive()
        if event["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif event["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b"not here"})
        return
    await receive()                                  # websocket.connect
    await send({"type": "websocket.accept"})
    ext = scope["extensions"]["fastws.rooms"]
    while True:
        event = await receive()
        if event["type"] == "websocket.disconnect":
            return
        cmd = json.loads(event["text"])
        via_send = cmd.get("via") == "send"
        reply = {}
        try:
            if "join" in cmd:
                reply["joined"] = 0
                for name in cmd["join"]:
                    if via_send:
                        await send({"type": "fastws.join", "room": name})
                    else:
                        ext["join"](name)
                    reply["joined"] += 1
            elif "publish" in cmd:
                if via_send:
                    await send({"type": "fastws.publish", "room": cmd["publish"], "text": cmd["text"]})
                else:
                    ext["publish"](cmd["publish"], cmd["text"])
                reply["published"] = cmd["publish"][:64]
            reply["error"] = None
        except RoomError as exc:
            reply["error"] = _error(exc)
        await send({"type": "websocket.send", "text": json.dumps(reply)})
