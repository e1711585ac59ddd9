"""A fastws.App with the same protocol as ``asgi_scope_app`` (the ASGI one),
so that tests/integration/test_settings.py drives both fronts alike.

Every WebSocket path: on open the server sends ``{"path", "root_path",
"client", "pid"}``; then each text message is a command:

* ``join R``               join room R: ``joined R``, or ``refused <error class>``
* ``pub R text``           publish ``text`` to R
* ``flood R N SIZE``       publish N messages of SIZE bytes to R, then ``flooded``
* ``block S``              block the event loop for S seconds, then ``blocked``
* anything else            echoed (binary too)

HTTP: ``POST /echo`` answers with the request body.
"""

import json
import os
import time

import fastws

app = fastws.App()


def _client(conn):
    addr = app.remote_address(conn)          # the client a trusted proxy names (proxy_headers)
    return list(addr) if isinstance(addr, tuple) else None


def opened(conn):
    conn.send(json.dumps({"path": conn.path, "root_path": "", "client": _client(conn), "pid": os.getpid()}))


def message(conn, data):
    if isinstance(data, bytes):
        conn.send(data)
        return
    word, _, rest = data.partition(" ")
    if word == "join":
        try:
            conn.join(rest)
            conn.send("joined " + rest)
        except fastws.FastWSError as exc:
            conn.send("refused " + type(exc).__name__)
    elif word == "pub":
        room, _, text = rest.partition(" ")
        app.publish(room, text)
    elif word == "flood":
        room, n, size = rest.split()
        body = "x" * int(size)
        for _ in range(int(n)):
            app.publish(room, body)
        conn.send("flooded")
    elif word == "block":
        time.sleep(float(rest))
        conn.send("blocked")
    else:
        conn.send(data)


app.route("*", on_open=opened, on_message=message)


@app.http("POST", "/echo")
def echo(request):
    return 200, request.body, "application/octet-stream"
