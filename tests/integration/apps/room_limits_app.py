"""A test app for the room limits, driven by JSON commands on /rooms.

    {"hello": 1}                        -> {"pid": worker pid, "id": conn id}
    {"ping": x}                         -> {"pong": x}
    {"join": [R, ...]}                  join the rooms in order, stop at the first refusal
    {"join_range": P, "start": i, "count": n}
                                        join P + str(k) for k in i .. i+n-1, same
        both answer {"joined": k, "rooms": rooms the connection is in,
                     "error": null | {"type": exception class, "message": str}}
    {"leave_range": P, "start": i, "count": n}  -> {"left": n, "rooms": ...}
    {"publish": R, "text": t}           app.publish (with a broker: every worker);
                                        answers only a refusal: {"error": {...}, "publish": R}

A refused join or publish is reported back to the client: the app sees the
exception (``fastws.errors.RoomError``) and the connection stays open.
"""

import json
import os

import fastws
from fastws.errors import RoomError

app = fastws.App()


def _error(exc):
    return {"type": type(exc).__name__, "message": str(exc)}


def _join_all(conn, names):
    joined = 0
    error = None
    try:
        for name in names:
            conn.join(name)
            joined += 1
    except RoomError as exc:
        error = _error(exc)
    return {"joined": joined, "rooms": len(conn.rooms or ()), "error": error}


@app.on_message("/rooms")
def message(conn, data):
    cmd = json.loads(data)
    if "ping" in cmd:
        conn.send(json.dumps({"pong": cmd["ping"]}))
    elif "hello" in cmd:
        conn.send(json.dumps({"pid": os.getpid(), "id": conn.id}))
    elif "join" in cmd:
        conn.send(json.dumps(_join_all(conn, cmd["join"])))
    elif "join_range" in cmd:
        prefix, start = cmd["join_range"], cmd.get("start", 0)
        names = (f"{prefix}{k}" for k in range(start, start + cmd["count"]))
        conn.send(json.dumps(_join_all(conn, names)))
    elif "leave_range" in cmd:
        prefix, start = cmd["leave_range"], cmd.get("start", 0)
        for k in range(start, start + cmd["count"]):
            conn.leave(f"{prefix}{k}")
        conn.send(json.dumps({"left": cmd["count"], "rooms": len(conn.rooms or ())}))
    elif "publish" in cmd:
        try:
            app.publish(cmd["publish"], cmd["text"])
        except RoomError as exc:
            conn.send(json.dumps({"error": _error(exc), "publish": cmd["publish"][:64]}))
