"""A test app for the guards: JWT authentication, room authorization, client addresses.

Keys come from the directory ``$FASTWS_TEST_AUTH_DIR`` (written by the
test): ``hs_old``, ``hs_new`` (HMAC secrets), ``rs1.pub``, ``rs2.pub`` (RSA
public keys, PEM), ``es.pub`` (EC P-256 public key, PEM).  Every token must
have issuer ``ISS`` and audience ``AUD``.

Routes (each sends ``{"user", "claims", "subprotocol", "store"}`` on open):

    /hs        HS256, every source, keys [hs_old, hs_new] (rotation)
    /rs        RS256, keys {"k1": rs1.pub, "k2": rs2.pub} by kid
    /es        ES256
    /chat      HS256 from the subprotocol only; the app speaks "chat"
    /admin     HS256, then= refuses (403) unless the claim role is "admin"
    /admin-async   the same with an async then= that raises Reject(403)
    /rooms     no authentication: on_connect keeps ?user= and the client
               address in the store; JSON commands:
                 {"join": R[, "ns": N]}      -> {"joined": R} or {"error": class name}
                 {"publish": R, "text": T}   -> app.publish(R, T, sender=conn):
                                                {"published": R} or {"error": ...}
                 {"addr": 1}                 -> {"request": request.remote_address,
                                                 "app": app.remote_address(conn),
                                                 "peer": conn.remote_address}
    /ns        the same commands, rooms in namespace "/ns"

Room rules: in namespace "" a connection may join ``public-*`` and
``private-<its user>``; the HTTP publish API (no connection) may publish to
``public-*`` only, a connection to anything but ``readonly-*``.  In "/ns" a
join needs the user "staff".
"""

import json
import os

import fastws
from fastws.auth import TokenAuth

ISS = "https://issuer.test"
AUD = "fastws-tests"
_DIR = os.environ.get("FASTWS_TEST_AUTH_DIR", "")


def _read(name):
    with open(os.path.join(_DIR, name)) as fh:
        return fh.read().strip()


app = fastws.App()

common = dict(issuer=ISS, audience=AUD, leeway=0)
hs = TokenAuth(keys=[_read("hs_old"), _read("hs_new")], algorithms=["HS256"], **common)
rs = TokenAuth(keys={"k1": _read("rs1.pub"), "k2": _read("rs2.pub")}, algorithms=["RS256"], **common)
es = TokenAuth(keys=[_read("es.pub")], algorithms=["ES256"], **common)
chat = TokenAuth(keys=[_read("hs_new")], algorithms=["HS256"], sources=["subprotocol"],
                 subprotocols=["chat"], **common)


def only_admins(request, claims):
    if claims.get("role") != "admin":
        return False
    return fastws.Accept(store={"admin": True})


async def only_admins_async(request, claims):
    if claims.get("role") != "admin":
        raise fastws.Reject(403, "admins only")
    return None


admin = TokenAuth(keys=[_read("hs_new")], algorithms=["HS256"], then=only_admins, **common)
admin_async = TokenAuth(keys=[_read("hs_new")], algorithms=["HS256"], then=only_admins_async, **common)


def hello(conn):
    store = dict(conn.store)
    conn.send(json.dumps({"user": store.pop("user", None), "claims": store.pop("claims", None),
                          "subprotocol": conn.subprotocol, "store": store}))


for path, verifier in (("/hs", hs), ("/rs", rs), ("/es", es), ("/chat", chat), ("/admin", admin),
                       ("/admin-async", admin_async)):
    app.route(path, on_connect=verifier, on_open=hello, on_message=lambda conn, data: conn.send(data))


# -- rooms and addresses ---------------------------------------------------------------


def keep_user(request):
    return fastws.Accept(store={"user": request.query.get("user"),
                                "request_addr": list(request.remote_address or ())})


def commands(conn, data):
    cmd = json.loads(data)
    try:
        if "join" in cmd:
            conn.join(cmd["join"], cmd.get("ns"))
            conn.send(json.dumps({"joined": cmd["join"]}))
        elif "publish" in cmd:
            app.publish(cmd["publish"], cmd["text"], namespace=cmd.get("ns", ""), sender=conn)
            conn.send(json.dumps({"published": cmd["publish"]}))
        elif "addr" in cmd:
            addr = app.remote_address(conn)
            peer = conn.remote_address
            conn.send(json.dumps({"request": conn.store.get("request_addr"),
                                  "app": list(addr[:2]) if addr else None,
                                  "peer": list(peer[:2]) if peer else None}))
    except fastws.RoomError as exc:
        conn.send(json.dumps({"error": type(exc).__name__, "detail": str(exc)}))


app.route("/rooms", on_connect=keep_user, on_message=commands)
app.route("/ns", on_connect=keep_user, on_message=commands, namespace="/ns")


@app.authorize_join()
def may_join(conn, room):
    return room.startswith("public-") or room == f"private-{conn.store.get('user')}"


@app.authorize_publish()
def may_publish(conn, room, message):
    if conn is None:                       # the HTTP publish API
        return room.startswith("public-")
    return not room.startswith("readonly-")


@app.authorize_join(namespace="/ns")
def staff_only(conn, room):
    return conn.store.get("user") == "staff"
