"""Tells each connection its public id: for tests of connection ids across workers.

WebSocket ``/*``: on open, sends ``{"id": conn.id, "pid": <worker pid>}``;
then echoes every message.
"""

import json
import os

import fastws

app = fastws.App()


@app.on_open("*")
def hello(conn):
    conn.send(json.dumps({"id": conn.id, "pid": os.getpid()}))


@app.on_message("*")
def echo(conn, data):
    conn.send(data)
