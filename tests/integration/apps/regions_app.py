"""A test app for regions, driven by JSON commands.

    /ws?user=U          binds the connection to user U (app.bind_user), then
                        sends {"op": "hello", "region": R, "user": U}
    /auth?user=U        the same, bound by the auth hook (on_connect answers
                        fastws.Accept(user=U, store={"user": U}))
    {"op": "join", "room": r}              -> {"op": "joined", "room": r}
    {"op": "pub", "room": r, "data": d}    publishes {"op": "msg", "room": r, "data": d,
                                           "region": R} to r (every region)
    {"op": "to", "user": u, "data": d}     sends {"op": "dm", "from": U, "data": d} to user u
                                           in any region, answers {"op": "sent", "regions": [...]}
    {"op": "rooms"}                        -> {"op": "rooms", "rooms": app.rooms.rooms_of(conn)}
"""

import json

import fastws

app = fastws.App()


@app.on_open("/ws")
def opened(conn):
    user = dict(p.split("=", 1) for p in conn.query_string.split("&") if "=" in p).get("user")
    region = app.node.config.region if app.node is not None else ""
    if user:
        app.bind_user(conn, user)
        conn.store["user"] = user
    conn.send(json.dumps({"op": "hello", "region": region, "user": user}))


@app.on_connect("/auth")
def authenticate(request):
    user = request.query.get("user")
    return fastws.Accept(user=user, store={"user": user}) if user else fastws.Reject(401, "who are you?")


@app.on_open("/auth")
def auth_opened(conn):
    region = app.node.config.region if app.node is not None else ""
    conn.send(json.dumps({"op": "hello", "region": region, "user": conn.store.get("user")}))


@app.on_message("/auth")
async def auth_message(conn, data):
    await message(conn, data)


@app.on_message("/ws")
async def message(conn, data):
    cmd = json.loads(data)
    op = cmd.get("op")
    region = app.node.config.region if app.node is not None else ""
    if op == "join":
        app.rooms.join(conn, cmd["room"])
        conn.send(json.dumps({"op": "joined", "room": cmd["room"]}))
    elif op == "pub":
        app.publish(cmd["room"], json.dumps({"op": "msg", "room": cmd["room"], "data": cmd["data"],
                                             "region": region}))
    elif op == "rooms":
        conn.send(json.dumps({"op": "rooms", "rooms": app.rooms.rooms_of(conn)}))
    elif op == "to":
        sent = await app.send_to_user(cmd["user"], json.dumps({"op": "dm", "from": conn.store.get("user"),
                                                                "data": cmd["data"]}))
        conn.send(json.dumps({"op": "sent", "regions": sent, "data": cmd["data"]}))
