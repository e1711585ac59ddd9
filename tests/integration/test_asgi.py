"""ASGI mode: real Starlette and FastAPI apps served by ``fastws serve``.

Each app runs in a subprocess (tests/integration/asgi_helpers.py) on every
backend: ``cython`` and ``wsproto`` (the two fastws engines) and ``uvicorn``
(the same app on the reference ASGI server: behaviour parity).  Clients are
real: ``websockets`` for WebSockets, ``httpx`` and raw sockets for HTTP.
Tests of fastws-only behaviour (shutdown code, lifespan failure exit, port in
use, the first frame in the upgrade's write) run on the two fastws engines only.  The last part runs the same scenarios
in-process with Starlette's ``TestClient``.

Apps: examples/starlette_app.py (every ASGI feature) and
examples/fastapi_chat.py (FastAPI's documented chat, and the same on rooms).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import signal
import socket
import subprocess
import time

import httptools  # noqa: F401  (fastws's ASGI HTTP parser)
import httpx
import pytest
import starlette  # noqa: F401
import websockets

import fastws
from asgi_helpers import HOST, LIMIT, REPO, AsgiProcess
from brokerutil import REDIS_URL, new_prefix

STARLETTE = "examples.starlette_app:app"
FASTAPI = "examples.fastapi_chat:app"
BACKENDS = ("cython", "wsproto", "uvicorn")
TIMEOUT = 20


def run_on_uvloop(coro, timeout: float) -> None:
    """Run ``coro`` to completion on a fresh uvloop loop, bounded in time."""
    import uvloop

    loop = uvloop.new_event_loop()
    try:
        loop.run_until_complete(asyncio.wait_for(coro, timeout))
    finally:
        loop.close()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def _cython_built() -> bool:
    try:
        import fastws._core  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request):
    name = request.param
    if name == "cython" and not _cython_built():
        pytest.fail("fastws._core (the Cython engine) is not built", pytrace=False)
    if name == "uvicorn" and importlib.util.find_spec("uvicorn") is None:
        pytest.fail("uvicorn is not installed (pip install -e '.[test]')", pytrace=False)
    return name


@pytest.fixture(scope="module")
def servers(backend, tmp_path_factory):
    """``servers(app) -> AsgiProcess``, one per app and backend, shared by the module."""
    pool = {}
    logdir = tmp_path_factory.mktemp(f"asgi-{backend}")

    def get(app):
        server = pool.get(app)
        if server is None or not server.alive():
            server = AsgiProcess(app, backend, logdir / f"{len(pool)}.log").start()
            pool[app] = server
        return server

    yield get
    for server in pool.values():
        code = server.stop()
        if backend != "uvicorn":
            assert code == 0, f"exit code {code} after SIGTERM\n{server.log()[-3000:]}"


@pytest.fixture
def app_server(servers):
    server = servers(STARLETTE)
    yield server
    assert server.alive(), f"the server died during the test\n{server.log()[-4000:]}"


@pytest.fixture
def chat_server(servers):
    server = servers(FASTAPI)
    yield server
    assert server.alive(), f"the server died during the test\n{server.log()[-4000:]}"


def raw_exchange(port: int, data: bytes, *, until_close=True, timeout=5.0) -> bytes:
    with socket.create_connection((HOST, port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            out += chunk
            if not until_close and out.count(b"HTTP/1.1 ") >= 2 and out.endswith(b"\n"):
                break
        return out


# ---------------------------------------------------------------- HTTP


def test_http_get_and_lifespan_state(app_server):
    with httpx.Client(base_url=app_server.http, timeout=TIMEOUT) as client:
        r = client.get("/")
        assert r.status_code == 200 and r.text == "hello from starlette"
        assert r.headers["content-length"] == str(len(r.content))
        state = client.get("/state").json()
        assert state["db"] == "connected" and state["started_at"] > 0


@pytest.mark.parametrize("size", [0, 1, 65536, LIMIT])
def test_http_request_body(app_server, size):
    body = bytes(i % 251 for i in range(size))
    with httpx.Client(base_url=app_server.http, timeout=TIMEOUT) as client:
        r = client.post("/echo", content=body)
        assert r.status_code == 200
        assert r.content == body


def test_http_chunked_request_body(app_server):
    parts = [b"a" * 1000, b"b" * 70000, b"c"]

    def gen():
        yield from parts

    with httpx.Client(base_url=app_server.http, timeout=TIMEOUT) as client:
        r = client.post("/echo", content=gen())   # no length: Transfer-Encoding: chunked
        assert r.status_code == 200
        assert r.content == b"".join(parts)


def test_http_streaming_response(app_server):
    with httpx.Client(base_url=app_server.http, timeout=TIMEOUT) as client, \
            client.stream("GET", "/stream", params={"n": 200}) as r:
        assert r.status_code == 200
        assert r.headers.get("transfer-encoding") == "chunked"
        text = b"".join(r.iter_bytes()).decode()
    assert text.splitlines() == [f"chunk {i}" for i in range(200)]


def test_http_keepalive_and_pipelining(app_server):
    req = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    last = b"GET /state HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    out = raw_exchange(app_server.port, req + req + last)   # three requests in one write
    assert out.count(b"HTTP/1.1 200 OK") == 3, out
    assert out.index(b"hello from starlette") < out.index(b'"db"')
    # the server closed the connection after the Connection: close response
    assert out.rstrip().endswith(b"}")


def test_http_connection_close_header(app_server):
    out = raw_exchange(app_server.port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head = out.split(b"\r\n\r\n")[0].lower()
    assert b"connection: close" in head
    assert out.endswith(b"hello from starlette")


def test_http_app_exception_is_500_and_server_survives(app_server):
    with httpx.Client(base_url=app_server.http, timeout=TIMEOUT) as client:
        r = client.get("/error")
        assert r.status_code == 500
    # a new connection: uvicorn closes the one that failed (a race with reuse)
    with httpx.Client(base_url=app_server.http, timeout=TIMEOUT) as client:
        assert client.get("/").status_code == 200


def test_http_404_and_405(app_server):
    with httpx.Client(base_url=app_server.http, timeout=TIMEOUT) as client:
        assert client.get("/nope").status_code == 404
        assert client.get("/echo").status_code == 405


def test_http_malformed_request_is_400(app_server):
    out = raw_exchange(app_server.port, b"NOT HTTP AT ALL\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400"), out


@pytest.mark.parametrize("backend", ["cython", "wsproto"], indirect=True)  # fastws-only behaviour
def test_http_head_too_large(app_server, backend):
    out = raw_exchange(app_server.port, b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 431"), out[:200]


@pytest.mark.parametrize("backend", ["cython", "wsproto"], indirect=True)  # fastws-only behaviour
def test_ws_broken_upgrade_is_400(app_server, backend):
    out = raw_exchange(app_server.port, b"GET /ws/echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                       b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400"), out[:200]


# ---------------------------------------------------------------- WebSocket


def test_ws_echo_and_subprotocol(app_server):
    async def main():
        async with websockets.connect(app_server.ws + "/ws/echo", subprotocols=["chat.v1", "chat.v2"],
                                      max_size=None) as ws:
            assert ws.subprotocol == "chat.v2"
            await ws.send("h\u00e9llo \U0001f600")
            assert await ws.recv() == "h\u00e9llo \U0001f600"
            await ws.send(b"\x00\x01\xff")
            assert await ws.recv() == b"\x00\x01\xff"
        async with websockets.connect(app_server.ws + "/ws/echo", subprotocols=["chat.v1"]) as ws:
            assert ws.subprotocol == "chat.v1"
        async with websockets.connect(app_server.ws + "/ws/echo") as ws:
            assert ws.subprotocol is None
            await ws.send("plain")
            assert await ws.recv() == "plain"

    run(main())


@pytest.mark.parametrize("backend", ["cython", "wsproto"], indirect=True)  # fastws's guarantee;
# uvicorn (httptools + websockets) drops these bytes: a documented difference (docs/asgi.md)
def test_ws_first_frame_in_same_write_as_upgrade(app_server, backend):
    """The handshake seam: a frame sent right behind the request is not lost."""
    import base64
    import os

    key = base64.b64encode(os.urandom(16))
    head = (b"GET /ws/echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n")
    mask = b"\x01\x02\x03\x04"
    payload = b"early"
    frame = bytes([0x81, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    with socket.create_connection((HOST, app_server.port), timeout=5) as s:
        s.sendall(head + frame)
        data = b""
        deadline = time.monotonic() + 5
        while b"early" not in data and time.monotonic() < deadline:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    assert data.startswith(b"HTTP/1.1 101"), data
    assert data.endswith(b"\x81\x05early"), data


@pytest.mark.parametrize("kind", ["text", "binary"])
def test_ws_large_messages(app_server, kind):
    big = "x" * LIMIT if kind == "text" else bytes(i % 256 for i in range(LIMIT))

    async def main():
        async with websockets.connect(app_server.ws + "/ws/echo", max_size=None) as ws:
            await ws.send(big)
            assert await asyncio.wait_for(ws.recv(), TIMEOUT) == big
            await ws.send(big + (b"!" if kind == "binary" else "!"))
            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(ws.recv(), TIMEOUT)
            assert ws.close_code == 1009

    run(main())


def test_ws_reject_before_accept_is_403(app_server):
    async def main():
        with pytest.raises(websockets.InvalidStatus) as info:
            async with websockets.connect(app_server.ws + "/ws/private"):
                pass
        assert info.value.response.status_code == 403
        async with websockets.connect(app_server.ws + "/ws/private?token=secret") as ws:
            assert await ws.recv() == "welcome"

    run(main())


def test_ws_denial_response(app_server):
    async def main():
        with pytest.raises(websockets.InvalidStatus) as info:
            async with websockets.connect(app_server.ws + "/ws/deny"):
                pass
        response = info.value.response
        assert response.status_code == 401
        assert response.headers["x-denied"] == "yes"
        assert response.body == b"no entry\n"

    run(main())


def test_ws_server_closes_with_code_and_reason(app_server):
    async def main():
        async with websockets.connect(app_server.ws + "/ws/echo") as ws:
            await ws.send("close 4001 going home")
            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(ws.recv(), TIMEOUT)
        assert ws.close_code == 4001
        assert ws.close_reason == "going home"

    run(main())


def test_ws_client_close_code_reaches_the_app(app_server):
    async def main():
        async with websockets.connect(app_server.ws + "/ws/echo") as ws:
            await ws.send("ping")
            assert await ws.recv() == "ping"
            await ws.close(4002, "see you")

    run(main())
    with httpx.Client(base_url=app_server.http, timeout=TIMEOUT) as client:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            last = client.get("/last-close").json()
            if last.get("code") == 4002:
                break
            time.sleep(0.05)
    assert last == {"code": 4002, "reason": "see you"}


def test_ws_app_exception_closes_1011_and_server_survives(app_server, backend):
    # deliberate difference: uvicorn drops the TCP connection (the client sees 1006)
    expected = (1011, 1006) if backend == "uvicorn" else (1011,)

    async def main():
        async with websockets.connect(app_server.ws + "/ws/error") as ws:
            await ws.send("trigger")
            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(ws.recv(), TIMEOUT)
        assert ws.close_code in expected
        async with websockets.connect(app_server.ws + "/ws/echo") as ws:
            await ws.send("still here")
            assert await ws.recv() == "still here"

    run(main())


def test_ws_app_exception_before_accept_is_500(app_server):
    async def main():
        with pytest.raises(websockets.InvalidStatus) as info:
            async with websockets.connect(app_server.ws + "/ws/error-early"):
                pass
        assert info.value.response.status_code == 500

    run(main())


def test_ws_unknown_path_is_refused(app_server):
    async def main():
        with pytest.raises(websockets.InvalidStatus) as info:
            async with websockets.connect(app_server.ws + "/no-such-socket"):
                pass
        assert info.value.response.status_code == 403   # Starlette closes before accept

    run(main())


def test_ws_rooms(app_server):
    async def main():
        url = app_server.ws + "/ws/room/"
        a = [await websockets.connect(url + "alpha") for _ in range(3)]
        b = await websockets.connect(url + "beta")
        try:
            for ws in (*a, b):
                assert await ws.recv() == "joined"
            await a[0].send("to alpha")
            for ws in a:
                assert await asyncio.wait_for(ws.recv(), TIMEOUT) == "to alpha"
            await b.send("to beta")
            assert await asyncio.wait_for(b.recv(), TIMEOUT) == "to beta"
            for ws in a:   # nothing from beta reached alpha
                with pytest.raises(asyncio.TimeoutError):
                    await asyncio.wait_for(ws.recv(), 0.2)
            await a[2].close()
            await asyncio.sleep(0.1)
            await a[1].send("two left")
            for ws in a[:2]:
                assert await asyncio.wait_for(ws.recv(), TIMEOUT) == "two left"
        finally:
            for ws in (*a, b):
                await ws.close()

    run(main())


# ---------------------------------------------------------------- FastAPI chat


@pytest.mark.parametrize("prefix", ["/ws/", "/rooms/lobby/ws/"])
def test_fastapi_chat(chat_server, prefix):
    async def main():
        one = await websockets.connect(chat_server.ws + prefix + "1")
        two = await websockets.connect(chat_server.ws + prefix + "2")
        try:
            await asyncio.sleep(0.05)
            await one.send("hi")
            got_one = {await asyncio.wait_for(one.recv(), TIMEOUT) for _ in range(2)}
            assert got_one == {"You wrote: hi", "Client #1 says: hi"}
            assert await asyncio.wait_for(two.recv(), TIMEOUT) == "Client #1 says: hi"
            await one.close()
            assert await asyncio.wait_for(two.recv(), TIMEOUT) == "Client #1 left the chat"
        finally:
            await one.close()
            await two.close()

    run(main())
    with httpx.Client(base_url=chat_server.http, timeout=TIMEOUT) as client:
        page = client.get("/")
        assert page.status_code == 200 and "WebSocket Chat" in page.text


def test_fastapi_http_publish_to_room(chat_server):
    async def main():
        async with websockets.connect(chat_server.ws + "/rooms/news/ws/7") as ws:
            await asyncio.sleep(0.05)
            async with httpx.AsyncClient(base_url=chat_server.http, timeout=TIMEOUT) as client:
                r = await client.post("/rooms/news/publish", content=b"breaking")
                assert r.status_code == 200
                assert r.json() == {"room": "news", "delivered": 1}
            assert await asyncio.wait_for(ws.recv(), TIMEOUT) == "breaking"

    run(main())


# ---------------------------------------------------------------- process behaviour (fastws only)


@pytest.mark.parametrize("backend", ["cython", "wsproto"], indirect=True)  # fastws-only behaviour
def test_shutdown_closes_websockets_with_1001(backend, tmp_path):
    server = AsgiProcess(STARLETTE, backend, tmp_path / "server.log").start()
    try:
        async def main():
            async with websockets.connect(server.ws + "/ws/echo") as ws:
                await ws.send("x")
                assert await ws.recv() == "x"
                server.proc.send_signal(signal.SIGTERM)
                with pytest.raises(websockets.ConnectionClosed):
                    await asyncio.wait_for(ws.recv(), TIMEOUT)
            return ws.close_code

        assert run(main()) == 1001
        assert server.proc.wait(TIMEOUT) == 0
    finally:
        server.stop()


@pytest.mark.parametrize("backend", ["cython", "wsproto"], indirect=True)  # fastws-only behaviour
def test_lifespan_startup_failure_is_fatal(backend, tmp_path):
    server = AsgiProcess(STARLETTE, backend, tmp_path / "server.log", env={"FAIL_STARTUP": "1"})
    proc = server.spawn()
    code = proc.wait(TIMEOUT)
    log = server.log()
    assert code != 0
    lines = [ln for ln in log.splitlines() if "database unreachable" in ln]
    assert lines and "lifespan" in lines[0], log
    assert "Traceback" not in log, log


@pytest.mark.parametrize("backend", ["cython", "wsproto"], indirect=True)  # fastws-only behaviour
def test_port_in_use(backend, tmp_path):
    with socket.socket() as busy:
        busy.bind((HOST, 0))
        busy.listen()
        server = AsgiProcess(STARLETTE, backend, tmp_path / "server.log")
        server.port = busy.getsockname()[1]
        proc = subprocess.run(server.command(), cwd=str(REPO), capture_output=True, text=True,
                              timeout=TIMEOUT)
    assert proc.returncode == 1
    assert "in use" in proc.stderr


# ---------------------------------------------------------------- scale-out and operations (fastws only)

ROOMS_APP = "tests.integration.apps.asgi_rooms_app:app"
REDIS = REDIS_URL                   # $FASTWS_TEST_REDIS (brokerutil)
TOKEN = "asgi-publish-token"


async def _joined(url):
    ws = await websockets.connect(url)
    hello = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
    return ws, hello["pid"]


async def _drain(ws, quiet=0.3) -> list:
    """Every message ``ws`` gets until it is quiet for ``quiet`` seconds."""
    got = []
    while True:
        try:
            got.append(await asyncio.wait_for(ws.recv(), quiet))
        except asyncio.TimeoutError:
            return got


async def _settle(sender, members) -> None:
    """Publish probes from ``sender`` until one reaches every member (room
    subscriptions reach the broker asynchronously), then drain the probes."""
    for i in range(50):
        await sender.send(f"probe {i}")
        got = await asyncio.gather(*(asyncio.wait_for(ws.recv(), 0.5) for ws in members),
                                   return_exceptions=True)
        if all(isinstance(g, str) for g in got):
            break
    else:
        raise AssertionError("a room publish never reached every member")
    await asyncio.gather(*(_drain(ws) for ws in members))


def _wait_subscribers(prefix: str, room: str, n: int) -> None:
    """Until ``n`` nodes subscribe to ``room``'s Redis channel."""
    import redis

    from fastws.broker import channel_name

    channel = channel_name(prefix, ("", room))
    client = redis.Redis.from_url(REDIS)
    try:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            if dict(client.pubsub_numsub(channel)).get(channel, 0) >= n:
                return
            time.sleep(0.02)
        raise AssertionError(f"{n} nodes did not subscribe to {channel!r}")
    finally:
        client.close()


@pytest.mark.parametrize("backend", ["cython", "wsproto"], indirect=True)  # fastws-only behaviour
def test_asgi_rooms_across_nodes_through_redis(backend, tmp_path):
    """Two ``fastws serve --interface asgi --broker redis://`` nodes: a room
    publish made by an ASGI endpoint (``fastws.asgi.rooms``) on one node
    reaches the members on both nodes exactly once; so do publishes from an
    http scope and from the HTTP publish API."""
    prefix = new_prefix("asgi-")
    args = ("--interface", "asgi", "--broker", REDIS, "--broker-prefix", prefix,
            "--publish-token", TOKEN)
    nodes = []
    try:
        for i in range(2):
            nodes.append(AsgiProcess(ROOMS_APP, backend, tmp_path / f"node{i}.log", args=args).start())

        async def main():
            a, pid_a = await _joined(nodes[0].ws + "/rooms/lobby")
            b, pid_b = await _joined(nodes[1].ws + "/rooms/lobby")
            other, _ = await _joined(nodes[1].ws + "/rooms/elsewhere")
            assert pid_a != pid_b
            await asyncio.get_running_loop().run_in_executor(None, _wait_subscribers, prefix,
                                                             "lobby", 2)
            try:
                await a.send("from a")                 # a WebSocket endpoint on node 0
                await b.send("from b")                 # ... and on node 1
                async with httpx.AsyncClient(timeout=TIMEOUT) as http:
                    r = await http.post(nodes[0].http + "/rooms/lobby/publish", content=b"from http")
                    assert r.status_code == 200 and r.json() == {"delivered": 1}   # a, locally
                    r = await http.post(nodes[1].http + "/publish", json={"room": "lobby", "text": "from api"},
                                        headers={"Authorization": f"Bearer {TOKEN}"})
                    assert r.status_code == 200 and r.json()["remote"] is True, r.text
                    r = await http.post(nodes[1].http + "/publish", json={"room": "lobby", "text": "x"})
                    assert r.status_code == 401
                expected = ["from a", "from b", "from http", "from api"]
                for ws in (a, b):
                    got = await _drain(ws, 1.0)
                    assert sorted(got) == sorted(expected), got     # each exactly once
                    assert got.index("from http") < got.index("from api")  # one publisher's order
                assert await _drain(other) == []
            finally:
                for ws in (a, b, other):
                    await ws.close()

        run(main())
        for node in nodes:
            assert node.alive(), node.log()[-3000:]
    finally:
        for node in nodes:
            assert node.stop() == 0, node.log()[-3000:]


@pytest.mark.parametrize("backend", ["cython"], indirect=True)  # fastws-only behaviour
def test_asgi_rooms_across_workers(backend, tmp_path):
    """``--workers 2`` without a broker URL: the embedded broker joins the
    workers, so a publish by an ASGI endpoint reaches members on both."""
    server = AsgiProcess(ROOMS_APP, backend, tmp_path / "server.log",
                         args=("--interface", "asgi", "--workers", "2")).start()
    try:
        deadline = time.monotonic() + TIMEOUT
        while server.log().count("ASGI app listening on") < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.log().count("ASGI app listening on") == 2, server.log()

        async def main():
            members, pids = [], set()
            while len(pids) < 2 and len(members) < 64:   # SO_REUSEPORT spreads them
                ws, pid = await _joined(server.ws + "/rooms/w")
                members.append(ws)
                pids.add(pid)
            assert len(pids) == 2, "every connection landed on one worker"
            try:
                await _settle(members[0], members)
                await members[-1].send("to every worker")
                for ws in members:
                    assert await _drain(ws) == ["to every worker"]
            finally:
                for ws in members:
                    await ws.close()

        run(main())
        assert server.alive(), server.log()[-3000:]
    finally:
        assert server.stop() == 0, server.log()[-3000:]


@pytest.mark.parametrize("backend", ["cython", "wsproto"], indirect=True)  # fastws-only behaviour
def test_asgi_operations_endpoints(backend, tmp_path):
    """/health, /livez and /metrics answer in ASGI mode where the application
    has no route of its own (its 404); the application's own route wins."""
    server = AsgiProcess(ROOMS_APP, backend, tmp_path / "server.log",
                         args=("--interface", "asgi")).start()
    try:
        async def main():
            ws, _ = await _joined(server.ws + "/rooms/ops")
            try:
                async with httpx.AsyncClient(base_url=server.http, timeout=TIMEOUT) as http:
                    r = await http.get("/health")
                    assert r.status_code == 200, r.text
                    health = r.json()
                    assert health["status"] == "healthy" and health["connections"] == 1
                    r = await http.get("/metrics")
                    assert r.status_code == 200
                    assert 'websocket_handshakes_total{result="101"} 1.0' in r.text
                    assert "websocket_rooms 1.0" in r.text
                    assert any(ln.startswith("websocket_connections_total{") and ln.endswith(" 1.0")
                               for ln in r.text.splitlines()), r.text
                    r = await http.get("/livez")
                    assert r.json() == {"app": "own livez"}          # the app's own route
                    r = await http.get("/nothing-here")
                    assert r.status_code == 404 and r.json() == {"detail": "Not Found"}
                    r = await http.post("/publish", json={"room": "ops", "text": "x"})
                    assert r.status_code == 404                      # no --publish-token: no API
            finally:
                await ws.close()

        run(main())
        assert server.alive(), server.log()[-3000:]
    finally:
        assert server.stop() == 0, server.log()[-3000:]


# ---------------------------------------------------------------- in-process parity (TestClient)


@pytest.fixture(scope="module")
def testclient_mod():
    import sys

    from asgi_helpers import REPO

    if str(REPO) not in sys.path:   # ``examples`` importable under plain ``pytest`` too
        sys.path.insert(0, str(REPO))
    import starlette.testclient

    return starlette.testclient


def test_testclient_starlette_app(testclient_mod):
    from starlette.websockets import WebSocketDisconnect

    from examples.starlette_app import app

    with testclient_mod.TestClient(app) as client:
        assert client.get("/").text == "hello from starlette"
        assert client.get("/state").json()["db"] == "connected"
        assert client.post("/echo", content=b"abc").content == b"abc"
        assert client.get("/stream?n=3").text == "chunk 0\nchunk 1\nchunk 2\n"
        with client.websocket_connect("/ws/echo", subprotocols=["chat.v1", "chat.v2"]) as ws:
            assert ws.accepted_subprotocol == "chat.v2"
            ws.send_text("hello")
            assert ws.receive_text() == "hello"
            ws.send_bytes(b"\x00\xff")
            assert ws.receive_bytes() == b"\x00\xff"
        with pytest.raises(WebSocketDisconnect) as info, client.websocket_connect("/ws/private"):
            pass
        assert info.value.code == 1008
        with client.websocket_connect("/ws/echo") as ws:
            ws.send_text("close 4001 going home")
            message = ws.receive()
            assert message == {"type": "websocket.close", "code": 4001, "reason": "going home"}
        with client.websocket_connect("/ws/room/x") as ws1, client.websocket_connect("/ws/room/x") as ws2:
            assert ws1.receive_text() == "joined" and ws2.receive_text() == "joined"
            ws1.send_text("both")
            assert ws1.receive_text() == "both" and ws2.receive_text() == "both"


def test_testclient_fastapi_chat(testclient_mod):
    from examples.fastapi_chat import app

    with testclient_mod.TestClient(app) as client:
        assert "WebSocket Chat" in client.get("/").text
        for prefix in ("/ws/", "/rooms/lobby/ws/"):
            with client.websocket_connect(prefix + "1") as one:
                with client.websocket_connect(prefix + "2") as two:
                    one.send_text("hi")
                    assert {one.receive_text(), one.receive_text()} == {"You wrote: hi",
                                                                         "Client #1 says: hi"}
                    assert two.receive_text() == "Client #1 says: hi"
                    two.send_text("yo")
                    assert {two.receive_text(), two.receive_text()} == {"You wrote: yo",
                                                                         "Client #2 says: yo"}
                    assert one.receive_text() == "Client #2 says: yo"
                assert one.receive_text() == "Client #2 left the chat"
        with client.websocket_connect("/rooms/news/ws/7") as ws:
            r = client.post("/rooms/news/publish", content=b"breaking")
            assert r.json() == {"room": "news", "delivered": 1}
            assert ws.receive_text() == "breaking"


# ---------------------------------------------------------------- in-process API


def test_serve_asgi_in_process():
    """``fastws.serve`` of an ASGI app in a running uvloop loop, on a port
    picked by the OS."""

    seen = []

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                seen.append(message["type"])
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        elif scope["type"] == "http":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})
        else:
            assert (await receive())["type"] == "websocket.connect"
            await send({"type": "websocket.accept"})
            await send({"type": "fastws.join", "room": "r"})
            message = await receive()
            await send({"type": "fastws.publish", "room": "r", "text": message["text"].upper()})
            message = await receive()
            assert message["type"] == "websocket.disconnect"
            seen.append(("ws-disconnect", message["code"]))

    async def main():
        ready = asyncio.get_running_loop().create_future()
        task = asyncio.ensure_future(fastws.serve(app, port=0, started=ready.set_result))
        server = await ready
        async with httpx.AsyncClient() as client:
            r = await client.get(f"http://{HOST}:{server.port}/")
            assert r.text == "ok"
        async with websockets.connect(f"ws://{HOST}:{server.port}/") as ws:
            await ws.send("abc")
            assert await ws.recv() == "ABC"
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run_on_uvloop(main(), 30)
    assert seen == ["lifespan.startup", ("ws-disconnect", 1000), "lifespan.shutdown"]


def test_receive_hand_off_order_and_cancellation():
    """``receive()`` semantics of the session: events handed straight to a
    waiting ``receive()`` or queued while the application is behind, in
    order; an event handed to a ``receive()`` cancelled before it resumed is
    not lost; the queue is dropped once drained."""
    import types

    from fastws.asgi import WebSocketSession

    async def main():
        loop = asyncio.get_running_loop()
        server = types.SimpleNamespace(loop=loop)
        session = WebSocketSession(server, types.SimpleNamespace(transport=None), {}, None, b"")
        assert (await session.receive()) == {"type": "websocket.connect"}
        waiting = loop.create_task(session.receive())
        await asyncio.sleep(0)
        session._push({"type": "websocket.receive", "text": "a"})   # handed to the waiter ...
        waiting.cancel()                                            # ... which never resumes
        with pytest.raises(asyncio.CancelledError):
            await waiting
        for text in "bcd":                                          # the app is behind
            session._push({"type": "websocket.receive", "text": text})
        assert [(await session.receive())["text"] for _ in range(4)] == list("abcd")
        assert session.events is None
        waiting = loop.create_task(session.receive())
        await asyncio.sleep(0)
        session._push({"type": "websocket.receive", "bytes": b"e"})
        assert (await waiting)["bytes"] == b"e"
        session._finish(1001, "bye")
        assert await session.receive() == {"type": "websocket.disconnect", "code": 1001,
                                           "reason": "bye"}

    run(main())


def test_idle_websocket_keeps_only_its_glue():
    """What an accepted, idle WebSocket keeps in ASGI mode: the session is
    the engine connection's route, no received-event queue, nothing of the
    upgrade decision; header tuples and paths are shared between
    connections."""
    from fastws.asgi.rooms import RoomsExtension

    async def app(scope, receive, send):
        if scope["type"] != "websocket":
            return
        await receive()
        await send({"type": "websocket.accept"})
        while (await receive())["type"] != "websocket.disconnect":
            pass

    async def main():
        ready = asyncio.get_running_loop().create_future()
        task = asyncio.ensure_future(fastws.serve(app, port=0, metrics=False,
                                                  started=ready.set_result))
        server = await ready
        clients = [await websockets.connect(f"ws://{HOST}:{server.port}/idle") for _ in range(3)]
        await asyncio.sleep(0.1)
        sessions = list(server.sessions.values())
        assert len(sessions) == 3
        for s in sessions:
            assert s.conn.route is s
            assert s.events is None and s.waiter is not None
            assert s.request is None and s.early is None and s.proto is None
            assert isinstance(s.scope["extensions"]["fastws.rooms"], RoomsExtension)
        one, two = sessions[0].scope, sessions[1].scope
        assert one["path"] is two["path"] and one["server"] is two["server"]
        shared = [h for h in one["headers"] if h[0] != b"sec-websocket-key"]
        assert shared and all(any(h is g for g in two["headers"]) for h in shared)
        for ws in clients:
            await ws.close()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run_on_uvloop(main(), 30)
