"""The test app of the client tests (tests/integration/test_client*.py).

    /rt        the room protocol (app.rooms_endpoint), rooms in namespace "/rt";
               rooms named "secret*" are refused (authorize_join), publishing to
               "readonly*" is refused (authorize_publish); resumes replay up to
               20,000 messages
    /rt-auth   the same rooms behind a token: ?token=good (else 401)
    /rt-slow   the room protocol with at most 5 publishes per second per client
    /shuffle   speaks the room protocol's server side by hand, out of order: a
               "sub" to room "shuffled-N-K" is answered (seq 0), then messages
               1..N come shuffled within windows of K (seq "skip" left out:
               "shuffled-N-K-skip-S")
    /echo      echoes every message
    GET /publish?room=R&text=T[&count=N][&size=S]   publishes T (or T#i, N times;
               padded to S characters) to R on /rt's namespace; answers the seqs
"""

import json
import random

import fastws

app = fastws.App()
rt = app.rooms_endpoint("/rt", history_limit=20000)


def token_check(request):
    if request.query.get("token") != "good":
        return fastws.Reject(401, "bad token")
    return None


rt_auth = app.rooms_endpoint("/rt-auth", namespace="/rt", on_connect=token_check)
rt_slow = app.rooms_endpoint("/rt-slow", publish_rate=5)


@app.authorize_join("/rt")
def may_join(conn, room):
    return not room.startswith("secret")


@app.authorize_publish("/rt")
def may_publish(conn, room, message):
    return not room.startswith("readonly")


@app.on_message("/echo")
def echo(conn, data):
    conn.send(data)


@app.on_connect("/shuffle")
def shuffle_accept(request):
    if "fastws.rooms.v1" in request.subprotocols:
        return fastws.Accept(subprotocol="fastws.rooms.v1")
    return None


@app.on_message("/shuffle")
def shuffle(conn, data):
    req = json.loads(data)
    if req.get("t") != "sub":
        return
    room = req["room"]
    parts = room.split("-")
    n, k = int(parts[1]), int(parts[2])
    skip = int(parts[4]) if len(parts) > 4 else None
    conn.send(json.dumps({"t": "subscribed", "room": room, "recovered": True, "pos": 0, "seq": 0}))
    seqs = [s for s in range(1, n + 1) if s != skip]
    rng = random.Random(n * 1000 + k)
    out = []
    for i in range(0, len(seqs), k):
        window = seqs[i:i + k]
        rng.shuffle(window)
        out += window
    for s in out:
        conn.send(json.dumps({"t": "m", "room": room, "seq": s, "data": f"m{s}"}))


@app.http("GET", "/publish")
def publish(request):
    room = request.query.get("room")
    text = request.query.get("text", "")
    count = int(request.query.get("count", "1"))
    size = int(request.query.get("size", "0"))
    seqs = []
    for i in range(count):
        message = text if count == 1 else f"{text}#{i}"
        seqs.append(rt.publish(room, message.ljust(size, ".")))
    return 200, " ".join(map(str, seqs)), "text/plain"
