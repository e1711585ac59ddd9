"""A fastws.App for the HTTP API, presence, hooks and access-log tests
(tests/integration/test_api.py).

WebSocket ``/chat?room=R[&user=U]``: joins room R on open (user id U in
``conn.store["user_id"]``) and sends ``{"id": <global id>, "room": R}``;
then each text message is a JSON command:

* ``{"say": R, "text": t}``           ``app.publish(R, t)``
* ``{"presence": R}``                 ``{"count", "members", "users"}`` from ``app.presence``
* ``{"send_to": id, "text": t}``      ``await app.send_to(id, t)`` -> ``{"send_to": result}``
* ``{"disconnect": id, "code": c}``   ``await app.disconnect(id, c, "by app")``
* ``{"state": 1}``                    ``{"state": vars(app.state)}``

Anything else is echoed.  ``on_startup`` sets ``app.state.started`` (and an
async one ``app.state.ready``); both hooks append a line to the file named
by ``FASTWS_TEST_HOOK_FILE`` when it is set; with ``FASTWS_TEST_HOOK_FAIL``
set the first startup hook raises.
"""

import asyncio
import json
import os

import fastws

app = fastws.App()


def _note(line: str) -> None:
    path = os.environ.get("FASTWS_TEST_HOOK_FILE")
    if path:
        with open(path, "a") as fh:
            fh.write(line + "\n")


@app.on_startup
def started():
    if os.environ.get("FASTWS_TEST_HOOK_FAIL"):
        raise RuntimeError("the database is not there")
    app.state.started = True
    _note("startup sync")


@app.on_startup
async def ready():
    await asyncio.sleep(0)
    app.state.ready = app.node is not None
    _note("startup async")


@app.on_shutdown
async def stopping():
    await asyncio.sleep(0)
    _note(f"shutdown async open={len(app.connections)}")


@app.on_connect("/chat")
def connect(request):
    user = request.query.get("user")
    return fastws.Accept(store={"user_id": user} if user else None)


@app.on_open("/chat")
def opened(conn):
    room = dict(p.split("=", 1) for p in conn.query_string.split("&") if "=" in p).get("room")
    if room:
        conn.join(room)
    conn.send(json.dumps({"id": app.global_id(conn), "room": room}))


@app.on_message("/chat")
async def message(conn, data):
    try:
        cmd = json.loads(data)
    except ValueError:
        cmd = None
    if not isinstance(cmd, dict):
        conn.send(data)
    elif "say" in cmd:
        app.publish(cmd["say"], cmd["text"])
    elif "presence" in cmd:
        p = app.presence
        room = cmd["presence"]
        conn.send(json.dumps({"count": await p.count(room), "members": await p.members(room),
                              "users": sorted(await p.users(room))}))
    elif "send_to" in cmd:
        conn.send(json.dumps({"send_to": await app.send_to(cmd["send_to"], cmd["text"])}))
    elif "disconnect" in cmd:
        conn.send(json.dumps({"disconnect": await app.disconnect(cmd["disconnect"], cmd.get("code", 1000),
                                                                 "by app")}))
    elif "state" in cmd:
        conn.send(json.dumps({"state": vars(app.state)}))
    else:
        conn.send(data)
