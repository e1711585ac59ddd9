"""A test app for resumable room membership (``App.resume``, Streams broker).

    /r                         a connection; commands are JSON text:
    {"resume": R, "since": id|null}   -> replay + stream membership, then {"resumed": complete}
    {"join": R}                       -> plain membership (direct delivery), then {"joined": R}
    {"say": R, "text": t, "count": n} -> publish t#0 .. t#(n-1) to R (default n 1)
    {"bin": R, "hex": h}              -> publish bytes.fromhex(h) to R
"""

import json

import fastws

app = fastws.App()


@app.on_message("/r")
async def command(conn, data):
    cmd = json.loads(data)
    if "resume" in cmd:
        try:
            complete = await app.resume(conn, cmd["resume"], cmd.get("since"))
        except ValueError as exc:
            conn.send(json.dumps({"error": str(exc)}))
            return
        conn.send(json.dumps({"resumed": complete}))
    elif "join" in cmd:
        conn.join(cmd["join"])
        conn.send(json.dumps({"joined": cmd["join"]}))
    elif "say" in cmd:
        n = cmd.get("count", 1)
        for i in range(n):
            app.publish(cmd["say"], f"{cmd['text']}#{i}" if n > 1 else cmd["text"])
    elif "bin" in cmd:
        app.publish(cmd["bin"], bytes.fromhex(cmd["hex"]))
