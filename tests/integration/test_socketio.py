"""Socket.IO on fastws, with python-socketio's ``AsyncClient`` and raw WebSocket clients.

Every test runs against a real ``fastws serve`` of ``tests/integration/apps/sio_app.py``
on both engines and both fronts: the native front (``sio.attach(app)``) and the
ASGI front (``fastws.socketio.ASGIApp(sio, starlette_app)``).  The cross-node tests
run two servers on the real Redis; the Node and browser clients are in
``test_socketio_js.py``.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
import urllib.error
import urllib.request

import pytest
import socketio
from websockets.sync.client import connect as ws_connect

APPS = {"native": "tests.integration.apps.sio_app:app", "asgi": "tests.integration.apps.sio_app:asgi"}


@pytest.fixture(params=sorted(APPS))
def front(request) -> str:
    return request.param


@pytest.fixture
def sio_server(server_factory, front):
    def make(*args, env=None):
        return server_factory(*args, env=env, app=APPS[front])
    return make


def url(server) -> str:
    return f"http://{server.host}:{server.port}"


async def client(server, *, auth=None, namespaces=None, reasons=None, **kw):
    c = socketio.AsyncClient(reconnection=False)
    if reasons is not None:
        @c.event
        def disconnect(reason):
            reasons.append(reason)
    await c.connect(url(server), transports=["websocket"], auth=auth, namespaces=namespaces,
                    wait_timeout=10, **kw)
    return c


class Inbox:
    """Events a client got, by name; ``await inbox.wait(name, n)``."""

    def __init__(self, c, *names, namespace="/") -> None:
        self.got: dict = {n: [] for n in names}
        for n in names:
            c.on(n, self._add(n), namespace=namespace)

    def _add(self, name):
        def add(*args):
            self.got[name].append(args[0] if len(args) == 1 else list(args))
        return add

    async def wait(self, name: str, n: int = 1, timeout: float = 10.0) -> list:
        end = time.monotonic() + timeout
        while len(self.got[name]) < n and time.monotonic() < end:
            await asyncio.sleep(0.01)
        return self.got[name]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def http(server, method: str, path: str, body=None):
    req = urllib.request.Request(url(server) + path, method=method,
                                 data=json.dumps(body).encode() if body is not None else None)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


# -- connect, events, acks -----------------------------------------------------------------------


def test_connect_with_auth_events_and_acks_both_ways(sio_server):
    server = sio_server()

    async def main():
        c = await client(server, auth={"token": "t1", "user": "ann"})
        try:
            me = await c.call("whoami", timeout=5)
            assert me["auth"] == {"token": "t1", "user": "ann"}
            assert me["sid"] == c.get_sid("/") and len(me["sid"]) == 20
            # client -> server event with an ack (the handler's return value)
            assert await c.call("echo", {"a": [1, "two", None]}, timeout=5) == {"a": [1, "two", None]}
            assert await c.call("echo", "ünïcødé ✓", timeout=5) == "ünïcødé ✓"
            assert await c.call("echo", timeout=5) is None
            # server -> client event with an ack (sio.call): the client's handler answers
            c.on("question", lambda data: {"got": data, "answer": 42})
            assert await c.call("ask", {"event": "question", "data": "q?"}, timeout=10) == {
                "answer": {"got": "q?", "answer": 42}}
            # several ack arguments come back as a tuple
            c.on("pair", lambda data: (data, data * 2))
            assert await c.call("ask", {"event": "pair", "data": 21}, timeout=10) == {"answer": [21, 42]}
            # a server call the client answers too late times out (the server's TimeoutError)
            async def slow(data):
                await asyncio.sleep(3)

            c.on("slow", slow)
            assert await c.call("ask", {"event": "slow", "timeout": 0.3}, timeout=10) == {"error": "timeout"}
            # session data
            assert await c.call("remember", {"k": 1}, timeout=5) == "ok"
            assert await c.call("recall", timeout=5) == {"k": 1}
        finally:
            await c.disconnect()

    run(main())


def test_connect_refused_with_connect_error(sio_server):
    server = sio_server()

    async def main():
        c = socketio.AsyncClient(reconnection=False)
        errors = []
        c.on("connect_error", lambda data: errors.append(data))
        with pytest.raises(socketio.exceptions.ConnectionError):
            await c.connect(url(server), transports=["websocket"], auth={"token": "bad"}, wait_timeout=5)
        assert errors and errors[0] == {"message": "bad token", "data": {"code": 4001}}
        # an unknown namespace is refused, "/" still connects
        c2 = socketio.AsyncClient(reconnection=False)
        with pytest.raises(socketio.exceptions.ConnectionError, match="nope|Invalid namespace"):
            await c2.connect(url(server), transports=["websocket"], namespaces=["/nope"], wait_timeout=5)
        await c2.disconnect()
        c3 = await client(server)
        assert await c3.call("echo", 1, timeout=5) == 1
        await c3.disconnect()

    run(main())


def test_namespaces_on_one_connection(sio_server):
    server = sio_server()

    async def main():
        a = await client(server, namespaces=["/", "/chat"], auth={"who": "a"})
        b = await client(server, namespaces=["/chat"], auth={"who": "b"})
        c = await client(server, namespaces=["/"])
        try:
            ia, ib, ic = Inbox(a, "chat", namespace="/chat"), Inbox(b, "chat", namespace="/chat"), Inbox(c, "chat")
            sid_root, sid_chat = a.get_sid("/"), a.get_sid("/chat")
            assert sid_root != sid_chat
            me = await a.call("whoami", namespace="/chat", timeout=5)
            assert me == {"sid": sid_chat, "auth": {"who": "a"}, "namespace": "/chat"}
            assert (await a.call("whoami", timeout=5))["sid"] == sid_root
            assert await b.call("chat", "hi all", namespace="/chat", timeout=5) == "ok"
            for inbox in (ia, ib):
                assert await inbox.wait("chat") == [{"sid": b.get_sid("/chat"), "text": "hi all"}]
            await asyncio.sleep(0.2)
            assert ic.got["chat"] == []       # "/" sockets do not get "/chat" events
        finally:
            for x in (a, b, c):
                await x.disconnect()

    run(main())


def test_binary_attachments_both_ways(sio_server):
    server = sio_server()

    async def main():
        c = await client(server)
        inbox = Inbox(c, "binary_back")
        try:
            blob = bytes(range(256)) * 40
            data = {"name": "f", "parts": [b"\x00", blob, {"deep": b"\xff" * 3}], "n": 7}
            assert await c.call("binary", data, timeout=10) == data           # BINARY_EVENT and BINARY_ACK
            assert await inbox.wait("binary_back") == [data]
            assert await c.call("binary", b"", timeout=10) == b""
        finally:
            await c.disconnect()

    run(main())


# -- rooms -------------------------------------------------------------------------------------------


def test_rooms_and_skip_sid(sio_server):
    server = sio_server()

    async def main():
        a, b, c = [await client(server) for _ in range(3)]
        ia, ib, ic = (Inbox(x, "room_msg", "all_msg") for x in (a, b, c))
        try:
            assert await a.call("join", "r1", timeout=5) == [a.get_sid("/"), "r1"]
            assert await b.call("join", "r1", timeout=5) == [b.get_sid("/"), "r1"]
            assert sorted(await b.call("join", "r2", timeout=5)) == sorted([b.get_sid("/"), "r1", "r2"])
            await c.call("join", "r2", timeout=5)
            # to a room, the sender skipped
            await a.call("to_room", {"room": "r1", "data": "no-self", "skip": True}, timeout=5)
            assert await ib.wait("room_msg") == ["no-self"]
            # to a room, the sender included
            await a.call("to_room", {"room": "r1", "data": "with-self"}, timeout=5)
            assert (await ia.wait("room_msg"))[-1] == "with-self"
            assert await ib.wait("room_msg", 2) == ["no-self", "with-self"]
            # to two rooms: b is in both and gets it once
            await c.call("to_rooms", {"rooms": ["r1", "r2"], "data": "both"}, timeout=5)
            await ic.wait("room_msg")
            await asyncio.sleep(0.2)
            assert ib.got["room_msg"] == ["no-self", "with-self", "both"]
            assert ia.got["room_msg"] == ["with-self", "both"]
            assert ic.got["room_msg"] == ["both"]
            # to one sid (its own room)
            await c.call("to_room", {"room": a.get_sid("/"), "data": "just-a"}, timeout=5)
            assert (await ia.wait("room_msg", 3))[-1] == "just-a"
            # leave, then the room's emits pass it by
            assert await b.call("leave", "r1", timeout=5) == [b.get_sid("/"), "r2"]
            await a.call("to_room", {"room": "r1", "data": "after-leave"}, timeout=5)
            assert (await ia.wait("room_msg", 4))[-1] == "after-leave"
            await asyncio.sleep(0.2)
            assert "after-leave" not in ib.got["room_msg"]
            # the whole namespace
            await a.call("to_all", [1, 2], timeout=5)
            for inbox in (ia, ib, ic):
                assert await inbox.wait("all_msg") == [[1, 2]]
        finally:
            for x in (a, b, c):
                await x.disconnect()

    run(main())


# -- disconnects -------------------------------------------------------------------------------------


def test_disconnect_reasons(sio_server):
    server = sio_server()

    async def main():
        obs = await client(server, auth={"observer": True})
        gone = Inbox(obs, "gone")
        try:
            # the client says goodbye: DISCONNECT, then the Engine.IO close
            ws, _ = await asyncio.to_thread(raw_open, server, connect=False)
            ws.send("40")
            sid_a = json.loads(ws.recv(timeout=10)[2:])["sid"]
            ws.send("41")
            ws.send("1")
            ws.close()
            # the server disconnects a socket: the client hears "io server disconnect"
            reasons: list = []
            b = await client(server, reasons=reasons)
            sid_b = (await b.call("whoami", timeout=5))["sid"]
            await b.emit("kick")
            end = time.monotonic() + 10
            while not reasons and time.monotonic() < end:
                await asyncio.sleep(0.02)
            assert reasons == [socketio.AsyncClient.reason.SERVER_DISCONNECT]
            # the TCP connection drops without a close frame
            ws, _ = await asyncio.to_thread(raw_open, server, connect=False)
            ws.send("40")
            sid_c = json.loads(ws.recv(timeout=10)[2:])["sid"]
            ws.socket.shutdown(socket.SHUT_RDWR)
            ws.socket.close()
            got = await gone.wait("gone", 3)
            by_sid = {g["sid"]: g["reason"] for g in got}
            assert by_sid[sid_a] == "client disconnect"
            assert by_sid[sid_b] == "server disconnect"
            assert by_sid[sid_c] == "transport close"
        finally:
            await obs.disconnect()

    run(main())


def raw_open(server, path="/socket.io/?EIO=4&transport=websocket", *, connect=True):
    """A raw WebSocket Socket.IO client: the open packet, then the CONNECT of "/"."""
    ws = ws_connect(f"ws://{server.host}:{server.port}{path}", open_timeout=10, max_size=None)
    opened = ws.recv(timeout=10)
    assert opened.startswith("0{")
    info = json.loads(opened[1:])
    assert info["upgrades"] == [] and isinstance(info["sid"], str)
    if connect:
        ws.send("40")
        answer = ws.recv(timeout=10)
        assert answer.startswith("40{") and "sid" in json.loads(answer[2:])
    return ws, info


def close_of(ws, timeout: float = 10.0) -> tuple:
    """Read until the server closes: (code, reason)."""
    from websockets.exceptions import ConnectionClosed

    end = time.monotonic() + timeout
    try:
        while time.monotonic() < end:
            ws.recv(timeout=max(0.01, end - time.monotonic()))
    except ConnectionClosed as e:
        return (e.rcvd.code, e.rcvd.reason) if e.rcvd else (1006, "")
    except TimeoutError:
        pass
    raise AssertionError("the server did not close the connection")


def test_ping_timeout(sio_server):
    """A client that stops answering pings is closed by the server (1011 "ping
    timeout", disconnect reason "ping timeout"); a client that answers stays."""
    server = sio_server(env={"SIO_PING_INTERVAL": "0.5", "SIO_PING_TIMEOUT": "0.5"})

    async def main():
        obs = await client(server, auth={"observer": True})
        gone = Inbox(obs, "gone")
        try:
            ws, info = await asyncio.to_thread(raw_open, server)
            assert info["pingInterval"] == 500 and info["pingTimeout"] == 500
            t0 = time.monotonic()
            code, why = await asyncio.to_thread(close_of, ws, 10)
            assert (code, why) == (1011, "ping timeout")
            assert time.monotonic() - t0 < 3.0
            got = await gone.wait("gone")
            assert got[0]["reason"] == "ping timeout"
            # python-socketio answers every ping: still connected after several rounds
            await asyncio.sleep(2.0)
            assert obs.connected and await obs.call("echo", "alive", timeout=5) == "alive"
        finally:
            await obs.disconnect()

    run(main())


def test_polling_refused(sio_server):
    server = sio_server()
    for method in ("GET", "POST"):
        status, body = http(server, method, "/socket.io/?EIO=4&transport=polling")
        assert status == 400
        err = json.loads(body)
        assert err["code"] == 0 and err["message"].startswith("Transport unknown")
        assert "websocket" in err["message"]

    async def main():
        c = socketio.AsyncClient(reconnection=False)
        with pytest.raises(socketio.exceptions.ConnectionError):
            await c.connect(url(server), transports=["polling"], wait_timeout=5)

    run(main())
    # an Engine.IO v3 client (Socket.IO v2) is told the version is not served
    from websockets.exceptions import InvalidStatus
    with pytest.raises(InvalidStatus) as e:
        ws_connect(f"ws://{server.host}:{server.port}/socket.io/?EIO=3&transport=websocket", open_timeout=10)
    assert e.value.response.status_code == 400


def test_bad_packets_get_a_close_code(sio_server):
    server = sio_server(env={"SIO_MAX_PAYLOAD": "10000"})
    cases = [
        ("4zzz", 1007),                                   # unknown Socket.IO packet type
        ('42[1,"x"]', 1007),                              # an event name that is not a string
        ("42{bad json", 1007),
        ('4299-["x"]', 1007),                             # attachments on a plain EVENT
        ('4511-["x",{"_placeholder":true,"num":0}]', 1007),   # more than 10 attachments
        ("9", 1007),                                      # unknown Engine.IO packet
        ('42["echo","' + "x" * 20000 + '"]', 1009),       # past maxPayload
    ]
    for text, code in cases:
        ws, _ = raw_open(server)
        ws.send(text)
        assert close_of(ws)[0] == code, text
    # a binary message where none is due, and attachments past maxPayload
    ws, _ = raw_open(server)
    ws.send(b"\x00\x01")
    assert close_of(ws)[0] == 1007
    ws, _ = raw_open(server)
    ws.send('452-["echo",{"_placeholder":true,"num":0},{"_placeholder":true,"num":1}]')
    ws.send(b"a" * 6000)
    ws.send(b"b" * 6000)
    assert close_of(ws)[0] == 1009
    # a placeholder naming no attachment
    ws, _ = raw_open(server)
    ws.send('451-["echo",{"_placeholder":true,"num":5}]')
    ws.send(b"a")
    assert close_of(ws)[0] == 1007
    # the server is fine
    ws, _ = raw_open(server)
    ws.send('421["echo","still here"]')
    assert ws.recv(timeout=10) == '431["still here"]'
    ws.close()


def test_no_namespace_in_time_is_closed(sio_server):
    server = sio_server(env={"SIO_PING_INTERVAL": "0.3", "SIO_PING_TIMEOUT": "5"})
    ws, _ = raw_open(server, connect=False)
    # connect_timeout 45 s at 0.3 s per round: stays open a while, answering pings
    ws.send("3")
    assert ws.recv(timeout=5) == "2"
    ws.close()


def test_volatile_emits_dropped_for_a_slow_client(sio_server):
    """Volatile emits to a client that does not read are dropped (priority
    drop, counted), never queued without bound; the other members get them."""
    server = sio_server()
    sock = socket.create_connection((server.host, server.port))
    sock.sendall(b"GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                 b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                 b"Sec-WebSocket-Version: 13\r\n\r\n")
    time.sleep(0.3)
    mask = b"\x01\x02\x03\x04"

    def frame(text: str) -> bytes:
        p = text.encode()
        return bytes([0x81, 0x80 | len(p)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(p))

    sock.sendall(frame("40") + frame('421["join","slow"]'))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)

    async def main():
        fast = await client(server)
        inbox = Inbox(fast, "vol")
        try:
            await fast.call("join", "slow", timeout=5)
            await asyncio.sleep(0.3)
            before = json.loads(http(server, "GET", "/sio-stats")[1])
            for _ in range(20):
                await fast.call("volatile", {"room": "slow", "count": 100, "size": 8000}, timeout=10)
                await asyncio.sleep(0.02)
            await inbox.wait("vol", 2000, timeout=30)
            after = json.loads(http(server, "GET", "/sio-stats")[1])
            return before, after, len(inbox.got["vol"])
        finally:
            await fast.disconnect()

    before, after, fast_got = run(main())
    sock.close()
    dropped = after["dropped_low"] - before["dropped_low"]
    assert dropped > 0, after
    assert fast_got == 2000           # the reading client got every one


# -- two nodes on Redis ---------------------------------------------------------------------------


def test_broadcasts_across_two_nodes_on_redis(sio_server, redis_url, broker_prefix):
    """Two nodes share rooms through Redis: room emits, the whole namespace,
    binary attachments, a list of rooms (each socket once), skip_sid, an emit
    to a sid of the other node, and an emit made by a plain HTTP request."""
    args = ("--broker", redis_url, "--broker-prefix", broker_prefix)
    a_srv = sio_server(*args, env={"SIO_NODE": "a"})
    b_srv = sio_server(*args, env={"SIO_NODE": "b"})

    async def main():
        a1, a2 = await client(a_srv), await client(a_srv)
        b1, b2 = await client(b_srv), await client(b_srv)
        inbox = {n: Inbox(c, "room_msg", "all_msg", "direct") for n, c in
                 (("a1", a1), ("a2", a2), ("b1", b1), ("b2", b2))}
        try:
            for c in (a1, b1, b2):
                await c.call("join", "x", timeout=5)
            await b2.call("join", "y", timeout=5)
            await a2.call("join", "y", timeout=5)
            await asyncio.sleep(0.5)             # the nodes subscribe to the rooms' channels
            # a room on both nodes, the sender skipped
            await a1.call("to_room", {"room": "x", "data": "hello-x", "skip": True}, timeout=5)
            for n in ("b1", "b2"):
                assert await inbox[n].wait("room_msg") == ["hello-x"], n
            # binary attachments across nodes
            blob = {"bin": b"\x00\xff" * 500, "k": 1}
            await b1.call("to_room", {"room": "x", "data": blob}, timeout=5)
            for n in ("a1", "b1", "b2"):
                assert (await inbox[n].wait("room_msg", 2 if n != "a1" else 1))[-1] == blob, n
            # two rooms: b2 is in both, gets it once; a2 (only y) once
            await a1.call("to_rooms", {"rooms": ["x", "y"], "data": "xy"}, timeout=5)
            assert (await inbox["a2"].wait("room_msg"))[-1] == "xy"
            assert (await inbox["b1"].wait("room_msg", 3))[-1] == "xy"
            assert (await inbox["b2"].wait("room_msg", 3))[-1] == "xy"
            # the whole namespace, everyone on both nodes
            await b2.call("to_all", "everyone", timeout=5)
            for n in inbox:
                assert await inbox[n].wait("all_msg") == ["everyone"], n
            # a sid of the other node
            b1_sid = (await b1.call("whoami", timeout=5))["sid"]
            await a2.call("to_sid", {"sid": b1_sid, "data": "psst"}, timeout=5)
            assert await inbox["b1"].wait("direct") == ["psst"]
            # an emit made by a plain HTTP request to node B reaches node A's room members
            status, _ = await asyncio.to_thread(http, b_srv, "POST", "/emit",
                                                {"event": "room_msg", "data": "from-http", "to": "y"})
            assert status == 200
            assert (await inbox["a2"].wait("room_msg", 2))[-1] == "from-http"
            await asyncio.sleep(0.3)
            assert inbox["a1"].got["room_msg"] == [blob, "xy"]
            assert inbox["b2"].got["room_msg"] == ["hello-x", blob, "xy", "from-http"]
            assert inbox["a1"].got["direct"] == [] and inbox["b2"].got["direct"] == []
        finally:
            for c in (a1, a2, b1, b2):
                await c.disconnect()

    run(main())
