"""What the README promises a newcomer, on real ``fastws serve`` processes,
real clients (``curl``, ``websockets``) and the test Redis:

* the HTTP API takes a JSON object body whatever the Content-Type (curl's
  default form type included) and delivers ``/connections/{id}`` text as
  the text itself; it works on a single node without a broker; errors are
  400 with ``{"error"}`` naming the field;
* settings that cannot apply are refused at startup with one line naming
  both keys;
* presence (``--presence``): the HTTP API and ``app.presence`` across two
  nodes, a crashed node's members gone after the TTL; refused without the
  redis package with the extra to install;
* ``GET /history`` with the Streams broker, ``DELETE /connections/{id}``,
  ``await app.send_to`` / ``app.disconnect`` across nodes;
* ``@app.on_startup`` / ``@app.on_shutdown`` hooks and ``app.state``;
* ``--access-log`` in both fronts, ``--root-path`` (ASGI), ``--uds`` (both
  fronts).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import websockets

from brokerutil import REDIS_URL, STREAMS_URL, need_redis, new_prefix

REPO = Path(__file__).resolve().parents[2]
API_APP = "tests.integration.apps.api_app:app"
ASGI_APP = "tests.integration.apps.asgi_scope_app:app"
TOKEN = "api-token-for-tests"
AUTH = f"Authorization: Bearer {TOKEN}"
TIMEOUT = 10


def curl(url: str, *args: str) -> tuple[int, dict | str]:
    """Run curl (its default Content-Type for -d is application/x-www-form-urlencoded)."""
    out = subprocess.run(["curl", "-s", "-o", "-", "-w", "\n%{http_code}", url, *args],
                         capture_output=True, text=True, timeout=30)
    body, _, code = out.stdout.rpartition("\n")
    try:
        return int(code), json.loads(body)
    except ValueError:
        return int(code), body


async def recv(ws, timeout=TIMEOUT):
    return await asyncio.wait_for(ws.recv(), timeout)


async def hello(url: str):
    """Connect to /chat (the app joins the room of the query) and read {"id", "room"}."""
    ws = await websockets.connect(url)
    return ws, json.loads(await recv(ws))


# -- the HTTP API on a single node -----------------------------------------------------


def test_http_api_json_whatever_the_content_type_on_a_single_node(server_factory):
    """No --broker: POST /publish reaches the room's local members, POST
    /connections/{id} the connection, both as curl sends them (no
    Content-Type header of ours); bad bodies are 400 naming what is wrong;
    DELETE /connections/{id} closes with the code and reason asked;
    /presence and /history answer 409 (off here)."""
    srv = server_factory("--publish-token", TOKEN, app=API_APP)
    base = f"http://{srv.host}:{srv.port}"

    async def main():
        ws, me = await hello(f"ws://{srv.host}:{srv.port}/chat?room=lobby")
        assert me["room"] == "lobby"
        got = lambda *a: asyncio.to_thread(curl, *a)  # noqa: E731
        status, doc = await got(base + "/publish", "-X", "POST", "-H", AUTH,
                                "-d", '{"room": "lobby", "text": "deploy finished"}')
        assert (status, doc) == (200, {"seq": 1, "remote": True})
        assert await recv(ws) == "deploy finished"
        status, doc = await got(f"{base}/connections/{me['id']}", "-X", "POST", "-H", AUTH,
                                "-d", '{"text": "just you"}')
        assert status == 200 and doc["sent"] is True
        assert await recv(ws) == "just you"                  # the text, not the JSON around it
        status, _ = await got(base + "/publish", "-X", "POST", "-H", AUTH, "-H",
                              "Content-Type: application/json",
                              "-d", json.dumps({"room": "lobby", "base64": base64.b64encode(b"\x00\x01").decode()}))
        assert status == 200 and await recv(ws) == b"\x00\x01"

        for body, says in [("just text", "not JSON"),
                           ('{"room": "lobby", "message": "x"}', 'unknown field "message"'),
                           ('{"room": "lobby"}', '"text"'),
                           ('{"room": "lobby", "text": "a", "base64": "YQ=="}', "one of them"),
                           ('{"text": "no room"}', '"room" is required'),
                           ('["lobby", "x"]', "JSON object"),
                           ('{"room": "lobby", "text": 5}', '"text" must be a string')]:
            status, doc = await got(base + "/publish", "-X", "POST", "-H", AUTH, "-d", body)
            assert status == 400 and says in doc["error"], (body, doc)
        status, doc = await got(f"{base}/connections/{me['id']}", "-X", "POST", "-H", AUTH, "-d", "just you")
        assert status == 400 and "not JSON" in doc["error"]
        assert (await got(base + "/publish", "-X", "POST", "-d", '{"room": "lobby", "text": "x"}'))[0] == 401
        # nothing of the refused requests reached the member, and the numbering goes on
        status, doc = await got(base + "/publish", "-X", "POST", "-H", AUTH, "-d", '{"room": "lobby", "text": "n"}')
        assert doc["seq"] == 3 and await recv(ws) == "n"

        for path in ("/presence?room=lobby", "/history?room=lobby"):
            status, doc = await got(base + path, "-H", AUTH)
            assert status == 409 and "--" in doc["error"], doc
        status, doc = await got(f"{base}/connections/{me['id']}", "-X", "DELETE", "-H", AUTH,
                                "-d", '{"code": 4001, "reason": "kicked"}')
        assert status == 200 and doc["closing"] is True
        with pytest.raises(websockets.ConnectionClosed):
            await recv(ws)
        assert (ws.close_code, ws.close_reason) == (4001, "kicked")
        assert (await got(f"{base}/connections/{me['id']}", "-X", "DELETE", "-H", AUTH))[0] == 404

    asyncio.run(main())


# -- settings that cannot apply ----------------------------------------------------------


def serve_cmd(*args: str) -> list[str]:
    return [sys.executable, "-c", "from fastws.cli.main import main; main()", "serve", *args]


@pytest.mark.parametrize("args, keys", [
    (("--broker-prefix", "app1"), ("broker_prefix", "broker")),
    (("--stats-token", "0123456789"), ("stats_token", "stats")),
    (("--stats-window", "60"), ("stats_window", "stats")),
    (("--presence",), ("presence", "broker")),
    (("--presence", "--broker", "memory://"), ("presence", "Redis")),
    (("--presence-ttl", "10"), ("presence_ttl", "presence")),
    (("--deflate-client-no-context-takeover",), ("deflate_client_no_context_takeover", "compression")),
    (("--handshake-burst", "10"), ("handshake_burst", "handshake_rate")),
    (("--uds", "/tmp/fastws-never.sock", "--port", "9000"), ("port", "uds")),
    (("--uds", "/tmp/fastws-never.sock", "--workers", "2"), ("workers", "uds")),
])
def test_a_setting_that_cannot_apply_is_refused_in_one_line(args, keys):
    out = subprocess.run(serve_cmd("examples.echo:app", *args), cwd=REPO, capture_output=True,
                         text=True, timeout=30)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert all(k in lines[0] for k in keys), lines[0]


def test_root_path_is_refused_by_the_native_front():
    out = subprocess.run(serve_cmd("examples.echo:app", "--root-path", "/api", "--port", "0"), cwd=REPO,
                         capture_output=True, text=True, timeout=30)
    lines = out.stderr.strip().splitlines()
    assert out.returncode != 0 and len(lines) == 1, out.stderr
    assert "root_path" in lines[0] and "ASGI" in lines[0]


# -- presence, send_to and disconnect across nodes ----------------------------------------


def http(base: str, path: str, method: str = "GET", body: bytes | None = None):
    req = urllib.request.Request(base + path, data=body, method=method,
                                 headers={"Authorization": f"Bearer {TOKEN}"})
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


async def until(fn, what: str, timeout: float = 15.0):
    """Poll ``fn()`` (sync, run in a thread) until it returns a true value."""
    deadline = time.monotonic() + timeout
    while True:
        got = await asyncio.to_thread(fn)
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.2)


def test_presence_send_to_and_disconnect_across_nodes(server_factory):
    """Two nodes on the test Redis with --presence: GET /presence on either
    node and app.presence list every member with its user; a member that
    leaves is gone at the next sync; ``await app.send_to`` and
    ``app.disconnect`` reach a connection of the other node; a node killed
    with SIGKILL loses its members after --presence-ttl."""
    need_redis()
    args = ("--broker", REDIS_URL, "--broker-prefix", new_prefix("pres"), "--presence",
            "--presence-ttl", "3", "--publish-token", TOKEN)
    a = server_factory(*args, app=API_APP)
    b = server_factory(*args, "--server-id", "b", app=API_APP)      # another process
    base_a, base_b = f"http://{a.host}:{a.port}", f"http://{b.host}:{b.port}"

    def presence(base, n):
        status, doc = http(base, "/presence?room=lobby")
        assert status == 200, doc
        return doc if doc["count"] == n else None

    async def main():
        a1, ia1 = await hello(f"ws://{a.host}:{a.port}/chat?room=lobby&user=alice")
        b1, ib1 = await hello(f"ws://{b.host}:{b.port}/chat?room=lobby&user=bob")
        b2, ib2 = await hello(f"ws://{b.host}:{b.port}/chat?room=lobby")
        doc = await until(lambda: presence(base_a, 3), "3 members on node A's view")
        assert doc["users"] == ["alice", "bob"]
        assert doc["members"] == {ia1["id"]: "alice", ib1["id"]: "bob", ib2["id"]: ""}
        assert (await until(lambda: presence(base_b, 3), "3 members on node B's view"))["members"] == doc["members"]
        await a1.send(json.dumps({"presence": "lobby"}))                  # the app's view
        mine = json.loads(await recv(a1))
        assert mine == {"count": 3, "members": doc["members"], "users": ["alice", "bob"]}

        await a1.send(json.dumps({"send_to": ib1["id"], "text": "hi bob"}))
        assert await recv(b1) == "hi bob"
        assert json.loads(await recv(a1)) == {"send_to": True}
        await a1.send(json.dumps({"send_to": ib1["id"] + "999", "text": "nobody"}))
        assert json.loads(await recv(a1))["send_to"] is False
        await a1.send(json.dumps({"disconnect": ib2["id"], "code": 4002}))
        with pytest.raises(websockets.ConnectionClosed):
            await recv(b2)
        assert (b2.close_code, b2.close_reason) == (4002, "by app")
        assert json.loads(await recv(a1)) == {"disconnect": True}
        doc = await until(lambda: presence(base_a, 2), "the closed member to leave presence")
        assert doc["users"] == ["alice", "bob"]

        os.killpg(b.proc.pid, signal.SIGKILL)       # a crash: nothing is cleaned up
        b.proc.wait(10)
        doc = await until(lambda: presence(base_a, 1), "the crashed node's members to expire", 15)
        assert doc["members"] == {ia1["id"]: "alice"}
        await a1.close()

    try:
        asyncio.run(main())
    finally:
        if not b.alive():
            b.start()            # the fixture checks every server it handed out is alive


def readme_block(ident: str) -> str:
    """The fenced block of README.md marked ``<!-- test: by test_api.py#ident -->``
    (its indentation removed)."""
    lines = (REPO / "README.md").read_text().splitlines()
    start = lines.index(next(ln for ln in lines if ln.strip() == f"<!-- test: by test_api.py#{ident} -->"))
    fence = next(i for i in range(start + 1, len(lines)) if lines[i].strip().startswith("```"))
    indent = len(lines[fence]) - len(lines[fence].lstrip())
    end = next(i for i in range(fence + 1, len(lines)) if lines[i].strip() == "```")
    return "\n".join(ln[indent:] for ln in lines[fence + 1:end]) + "\n"


def test_readme_presence_example_on_two_nodes(server_factory, tmp_path):
    """README's presence example (chat.py) served as its first line says, on
    two nodes of the test Redis: "who" on either node lists the users of
    the lobby on both."""
    need_redis()
    text = readme_block("presence")
    (tmp_path / "chat.py").write_text(text)
    cmd = text.splitlines()[0].partition("fastws serve ")[2].split()
    assert cmd[:2] == ["chat:app", "--broker"] and "--presence" in cmd, cmd
    args = [REDIS_URL if a.startswith("redis://") else a for a in cmd[1:]]
    args += ["--broker-prefix", new_prefix("readme")]
    env = {"PYTHONPATH": str(tmp_path)}
    one = server_factory(*args, app="chat:app", env=env)
    two = server_factory(*args, "--server-id", "two", app="chat:app", env=env)

    async def main():
        alice = await websockets.connect(f"ws://{one.host}:{one.port}/chat?user=alice")
        bob = await websockets.connect(f"ws://{two.host}:{two.port}/chat?user=bob")
        deadline = time.monotonic() + 15
        for ws in (alice, bob):
            while True:
                await ws.send("who")
                users = json.loads(await recv(ws))
                if users == ["alice", "bob"]:
                    break
                assert time.monotonic() < deadline, users
                await asyncio.sleep(0.2)
        await alice.close()
        await bob.close()

    asyncio.run(main())


def test_presence_without_the_redis_package_names_the_extra():
    """The redis package missing (made unimportable in the server process):
    --presence stops the start with one line saying what to install."""
    need_redis()
    code = ("import sys; sys.modules['redis'] = None; sys.modules['hiredis'] = None\n"
            "from fastws.cli.main import main; main()")
    out = subprocess.run([sys.executable, "-c", code, "serve", "examples.echo:app", "--port", "0",
                          "--broker", REDIS_URL, "--broker-prefix", new_prefix(), "--presence"],
                         cwd=REPO, capture_output=True, text=True, timeout=30)
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert 'pip install "fastws[redis]"' in last and "presence" in last, out.stderr


def test_history_over_http_with_the_streams_broker(server_factory):
    """GET /history: the last ``limit`` messages oldest first (text and
    binary), or those after ``since``; bad parameters are 400."""
    need_redis()
    srv = server_factory("--broker", STREAMS_URL, "--broker-prefix", new_prefix("hist"),
                         "--publish-token", TOKEN, app=API_APP)
    base = f"http://{srv.host}:{srv.port}"
    for body in (b'{"room": "news", "text": "one"}', b'{"room": "news", "text": "two"}',
                 json.dumps({"room": "news", "base64": base64.b64encode(b"\xff3").decode()}).encode()):
        assert http(base, "/publish", "POST", body)[0] == 200
    status, doc = http(base, "/history?room=news")
    assert status == 200 and doc["complete"] is None
    msgs = doc["messages"]
    assert [m.get("text") or m.get("base64") for m in msgs] == ["one", "two", base64.b64encode(b"\xff3").decode()]
    status, doc = http(base, f"/history?room=news&since={msgs[0]['id']}&limit=1")
    assert status == 200 and doc["complete"] is True and [m["text"] for m in doc["messages"]] == ["two"]
    assert http(base, "/history?room=nothing-here")[1]["messages"] == []
    for bad in ("/history", "/history?room=news&limit=0", "/history?room=news&limit=x",
                "/history?room=news&since=yesterday"):
        assert http(base, bad)[0] == 400, bad


# -- hooks and state ----------------------------------------------------------------------


def test_startup_and_shutdown_hooks_and_app_state(server_factory, tmp_path):
    """Sync and async on_startup hooks run before the server takes
    connections (app.state holds what they set), the on_shutdown hook after
    the connections are closed; a failing startup hook stops the start with
    one line naming it."""
    notes = tmp_path / "hooks.txt"
    srv = server_factory(app=API_APP, env={"FASTWS_TEST_HOOK_FILE": str(notes)})
    assert notes.read_text().splitlines() == ["startup sync", "startup async"]

    async def main():
        ws, _ = await hello(f"ws://{srv.host}:{srv.port}/chat")
        await ws.send(json.dumps({"state": 1}))
        assert json.loads(await recv(ws)) == {"state": {"started": True, "ready": True}}
        srv.proc.send_signal(signal.SIGTERM)
        with pytest.raises(websockets.ConnectionClosed):
            await recv(ws)
        assert ws.close_code == 1001

    asyncio.run(main())
    assert srv.proc.wait(15) == 0
    assert notes.read_text().splitlines() == ["startup sync", "startup async", "shutdown async open=0"]
    srv.start()                  # alive again for the fixture's check

    out = subprocess.run(serve_cmd(API_APP, "--port", "0"), cwd=REPO, capture_output=True, text=True,
                         timeout=30, env=dict(os.environ, FASTWS_TEST_HOOK_FAIL="1"))
    lines = out.stderr.strip().splitlines()
    assert out.returncode != 0 and lines, out.stderr
    assert "on_startup hook started failed: RuntimeError: the database is not there" in lines[-1]


# -- access log ---------------------------------------------------------------------------


@pytest.mark.parametrize("front", ["native", "asgi"])
def test_access_log_in_both_fronts(server_factory, front):
    """--access-log: one fastws.access line per upgrade (101), refused
    upgrade (its status) and close (its code and how long it was open);
    without it, none."""
    app, refused_path, status = (API_APP, "/nothing", 404) if front == "native" else (ASGI_APP, "/deny", 403)
    srv = server_factory("--access-log", app=app)
    quiet = server_factory(app=app)

    async def main(server):
        ws = await websockets.connect(f"ws://{server.host}:{server.port}/chat")
        await recv(ws)
        await ws.close(1000, "bye")
        with pytest.raises(websockets.InvalidStatus) as no:
            await websockets.connect(f"ws://{server.host}:{server.port}{refused_path}")
        assert no.value.response.status_code == status

    asyncio.run(main(srv))
    asyncio.run(main(quiet))

    def lines(server):
        return [ln for ln in server.log().splitlines() if '"/chat"' in ln or f'"{refused_path}"' in ln]

    deadline = time.monotonic() + TIMEOUT
    while len(lines(srv)) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    got = lines(srv)
    assert any('"/chat" 101 upgraded' in ln for ln in got), got
    assert any(f'"{refused_path}" {status}' in ln for ln in got), got
    closed = [ln for ln in got if '"/chat" closed 1000' in ln]
    assert len(closed) == 1 and closed[0].rstrip().endswith("s") and "after" in closed[0], got
    assert lines(quiet) == []


# -- root_path (ASGI) ----------------------------------------------------------------------


def test_root_path_reaches_the_asgi_app(server_factory):
    """--root-path /api: the ASGI app sees root_path and the whole path in
    http and websocket scopes (as uvicorn gives them); the operations
    endpoints stay where they are."""
    srv = server_factory("--root-path", "/api", app=ASGI_APP)
    with urllib.request.urlopen(f"http://{srv.host}:{srv.port}/scope", timeout=TIMEOUT) as r:
        doc = json.loads(r.read())
    assert doc["root_path"] == "/api" and doc["path"] == "/api/scope"

    async def main():
        ws = await websockets.connect(f"ws://{srv.host}:{srv.port}/chat")
        doc = json.loads(await recv(ws))
        assert doc["root_path"] == "/api" and doc["path"] == "/api/chat"
        await ws.close()

    asyncio.run(main())
    with urllib.request.urlopen(f"http://{srv.host}:{srv.port}/livez", timeout=TIMEOUT) as r:
        assert r.status == 200


# -- a Unix socket (both fronts) ----------------------------------------------------------


def unix_http(path: str, target: str) -> tuple[int, bytes]:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(TIMEOUT)
        s.connect(path)
        s.sendall(f"GET {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1]), data.partition(b"\r\n\r\n")[2]


def start_on_uds(engine, tmp_path, app, sock_path, name="server"):
    env = dict(os.environ)
    env.pop("FASTWS_NO_EXTENSIONS", None)
    if engine == "wsproto":
        env["FASTWS_NO_EXTENSIONS"] = "1"
    with open(tmp_path / f"{name}.log", "wb") as log:      # the child keeps its own descriptor
        proc = subprocess.Popen(serve_cmd(app, "--uds", str(sock_path)), cwd=REPO, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, (tmp_path / f"{name}.log").read_text()
        try:
            unix_http(str(sock_path), "/livez")
            return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise AssertionError("the server did not listen on its Unix socket")


@pytest.mark.parametrize("front", ["native", "asgi"])
def test_listening_on_a_unix_socket(engine, tmp_path, front):
    """--uds PATH: WebSockets and the operations endpoints on the socket; a
    stale socket file left by a dead process is replaced; a second server
    on a path that is served is refused in one line; SIGTERM removes the
    file."""
    app = API_APP if front == "native" else ASGI_APP
    path = tmp_path / "fastws.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))                     # a socket file nobody listens on
    stale.close()
    proc = start_on_uds(engine, tmp_path, app, path)
    try:
        assert unix_http(str(path), "/health")[0] == 200

        async def main():
            ws = await websockets.unix_connect(str(path), "ws://localhost/chat")
            first = json.loads(await recv(ws))
            assert ("id" in first) if front == "native" else (first["path"] == "/chat")
            await ws.send("over a unix socket")
            assert await recv(ws) == "over a unix socket"
            await ws.close()

        asyncio.run(main())
        second = subprocess.run(serve_cmd(app, "--uds", str(path)), cwd=REPO, capture_output=True,
                                text=True, timeout=30)
        lines = second.stderr.strip().splitlines()
        assert second.returncode != 0 and "a process is listening on it" in lines[-1], second.stderr
        assert unix_http(str(path), "/livez")[0] == 200        # the first one still serves
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        assert not path.exists()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
