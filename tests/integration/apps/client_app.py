"""The test app of the client tests (tests/integration/test_client*.py).

    /rt        the room protocol (app.rooms_endpoint), rooms in namespace "/rt";
               rooms named "secret*" are refused (authorize_join), publishing to
               "readonly*" is refused (authorize_publish)
    /rt-auth   the room protocol behind a token: ?token=good (else 401)
    /echo      echoes every message
    /flood     {"room": R, "n": N, "size": S}: publishes N messages of S bytes to R
               on /rt's namespace, at once (to back up a slow reader)
    POST-less  GET /publish?room=R&text=T publishes T to R (for tests without a client)
"""

import fastws

app = fastws.App()
rt = app.rooms_endpoint("/rt")


def token_check(request):
    if request.query.get("token") != "good":
        return fastws.Reject(401, "bad token")
    return None


rt_auth = app.rooms_endpoint("/rt-auth", namespace="/rt", on_connect=token_check)


@app.authorize_join("/rt")
def may_join(conn, room):
    return not room.startswith("secret")


@app.authorize_publish("/rt")
def may_publish(conn, room, message):
    return not room.startswith("readonly")


@app.on_message("/echo")
def echo(conn, data):
    conn.send(data)


@app.http("GET", "/publish")
def publish(request):
    room = request.query.get("room")
    text = request.query.get("text", "")
    count = int(request.query.get("count", "1"))
    seqs = [rt.publish(room, text if count == 1 else f"{text}#{i}") for i in range(count)]
    return 200, " ".join(map(str, seqs)), "text/plain"
