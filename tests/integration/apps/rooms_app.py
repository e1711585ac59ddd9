"""A test app for rooms and the delivery policy, driven by JSON commands.

    /room?room=R[&ns=N]   joins room R on connect (namespace N if given)
    {"publish": R, "count": n, "size": k, "priority": p}   publish n messages
        of about k bytes to R; each is JSON {"seq": room seq, "i": i, "pad": ...}
    {"flow": R, "rate": r, "seconds": s, "size": k, "priority": p}
        publish at r messages/s for s seconds (a loop in the server)
    {"stats": 1}  -> {"hub": hub.stats(), "rooms": n, "count": {...}, "rss": bytes}
    {"join": R} / {"leave": R}
    {"send": R, "text": t} / {"send": R, "hex": h}   publish t (text) or bytes.fromhex(h)
        (binary) to R as it is, then {"sent": R}
Delivery knobs come from FASTWS_TEST_HIGH_WATER / _MAX_QUEUE / _SLOW_GRACE.
"""

import asyncio
import json
import os

import fastws

app = fastws.App()   # delivery settings come from the Config (flags or FASTWS_* env)
disconnects = []


def _rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _publish_many(room, count, size, priority, ns="", pub=None):
    pad = "x" * max(0, size - 40)
    for i in range(count):
        seq = app.rooms.seq(room, ns) + 1
        app.publish(room, json.dumps({"seq": seq, "i": i, "pub": pub, "pad": pad}), namespace=ns,
                    priority=priority)


async def _flow(room, rate, seconds, size, priority):
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    sent = 0
    start = loop.time()
    while loop.time() < end:
        due = int((loop.time() - start) * rate) + 1
        if due > sent:
            _publish_many(room, due - sent, size, priority)
            sent = due
        await asyncio.sleep(0.005)


@app.on_connect("/room")
def connect(request):
    return None


@app.on_message("/room")
def message(conn, data):
    cmd = json.loads(data)
    if "hello" in cmd:
        q = cmd["hello"]
        conn.join(q["room"], q.get("ns", ""), q.get("batch", False))
        conn.send(json.dumps({"id": conn.id, "joined": q["room"], "pid": os.getpid()}))
    elif "batching" in cmd:
        app.rooms.set_batching(cmd["batching"], cmd.get("max_batch", 50), cmd.get("max_delay", 0.05))
        conn.send(json.dumps({"batching": cmd["batching"]}))
    elif "join" in cmd:
        conn.join(cmd["join"], cmd.get("ns", ""))
    elif "leave" in cmd:
        conn.leave(cmd["leave"], cmd.get("ns", ""))
    elif "publish" in cmd:
        _publish_many(cmd["publish"], cmd.get("count", 1), cmd.get("size", 64),
                      cmd.get("priority", fastws.PRIORITY_NORMAL), cmd.get("ns", ""), cmd.get("pub"))
        conn.send(json.dumps({"published": cmd.get("count", 1)}))
    elif "send" in cmd:
        app.publish(cmd["send"], cmd["text"] if "text" in cmd else bytes.fromhex(cmd["hex"]))
        conn.send(json.dumps({"sent": cmd["send"]}))
    elif "flow" in cmd:
        asyncio.get_running_loop().create_task(
            _flow(cmd["flow"], cmd["rate"], cmd["seconds"], cmd.get("size", 1024),
                  cmd.get("priority", fastws.PRIORITY_NORMAL)))
    elif "stats" in cmd:
        hub = app.node.hub
        st = hub.stats()
        st["closes"] = {str(k): v for k, v in st["closes"].items()}
        st["dropped"] = {f"{r}:{p}": v for (r, p), v in st["dropped"].items()}
        conn.send(json.dumps({
            "hub": st,
            "rooms": len(app.rooms),
            "count": {r: app.rooms.count(r) for r in cmd.get("rooms", [])},
            "rss": _rss(),
            "disconnects": disconnects[-20:],
        }))


@app.on_disconnect("/room")
def gone(conn, code, reason):
    disconnects.append([conn.id, code, reason])
