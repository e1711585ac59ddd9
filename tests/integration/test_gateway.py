"""Gateway mode over HTTP: ``fastws serve --gateway http://...`` in front of a real backend.

The backend is a FastAPI app (``apps/gateway_backend.py``: the SDK's
``GatewayApp`` mounted at /events) under uvicorn; the gateway is ``fastws
serve`` on the engine under test (the ``engine`` fixture: cython and
wsproto); the clients are ``websockets`` and raw sockets.  What reached the
backend is read from the backend's own log of events (one JSON line per
event), which survives its restarts.  Everything runs on 127.0.0.1; every
wait is bounded.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import signal
import socket
import struct
import subprocess
import sys
import time

import pytest
import websockets
from websockets.protocol import State

from docblocks import block
from gateway_helpers import (
    HOST,
    REPO,
    TOKEN,
    Proc,
    Procs,
    chat_traffic,
    doc_commands,
    events,
    free_port,
    health,
    http_get,
    http_post,
    metric,
    wait_for,
)

TIMEOUT = 10.0
pytestmark = pytest.mark.timeout(180)


def run(coro, timeout: float = 90):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def recv(ws, timeout: float = TIMEOUT):
    return await asyncio.wait_for(ws.recv(), timeout)


async def ask(ws, text: str):
    await ws.send(text)
    return await recv(ws)


async def closed(ws, timeout: float = TIMEOUT) -> tuple:
    """Wait for the server to close ``ws``: (code, reason)."""
    with pytest.raises(websockets.ConnectionClosed):
        while True:
            await asyncio.wait_for(ws.recv(), timeout)
    return ws.close_code, ws.close_reason


async def refused(url: str, **kw):
    with pytest.raises(websockets.InvalidStatus) as info:
        ws = await websockets.connect(url, open_timeout=TIMEOUT, **kw)
        await ws.close()
    return info.value.response


# -- connect, messages, answers --------------------------------------------------------------


def test_connect_accepted_and_refused_by_the_backend(engine, tmp_path):
    """The backend's connect answer decides the upgrade: accepted with the
    subprotocol and user it names, refused with its status and body; the
    connect event carries the connection id, route, node, headers, query,
    cookies and subprotocols."""
    with Procs(tmp_path) as ps:
        be = ps.backend()
        gw = ps.gateway(engine, be.url)

        async def main():
            ws = await websockets.connect(gw.ws("/chat?user=ann&x=1&x=2"), subprotocols=["p1", "p2"],
                                          additional_headers={"Cookie": "sid=abc; theme=dark", "X-Trace": "t1"},
                                          open_timeout=TIMEOUT)
            assert ws.subprotocol is None            # the backend chose none
            my_id = await ask(ws, "id")
            await ws.close()
            ws = await websockets.connect(gw.ws("/chat?sub=p2"), subprotocols=["p1", "p2"], open_timeout=TIMEOUT)
            assert ws.subprotocol == "p2"
            await ws.close()
            r = await refused(gw.ws("/chat?deny=1"))
            assert r.status_code == 403 and b"denied by backend" in r.body
            r = await refused(gw.ws("/other/path?status=401"))
            assert r.status_code == 401 and r.body.strip() == b"no"
            return my_id

        my_id = run(main())
        connects = [e for _, e in events(ps, "connect")]
        assert len(connects) == 4
        first = connects[0]
        assert first["connection_id"] == my_id and my_id.startswith(first["node"] + "-")
        assert first["route"] == "/chat" and first["query"] == {"user": "ann", "x": "1"}
        assert first["query_string"] == "user=ann&x=1&x=2"
        assert first["cookies"] == {"sid": "abc", "theme": "dark"}
        assert first["headers"]["x-trace"] == "t1" and first["subprotocols"] == ["p1", "p2"]
        assert first["remote_address"] == "127.0.0.1" and first["id"].startswith(first["node"] + "-e")
        assert connects[3]["route"] == "/other/path"
        # refused connects get no disconnect event; accepted ones exactly one
        assert len(events(ps, "disconnect")) == wait_for(lambda: len(events(ps, "disconnect")) == 2 and 2,
                                                         what="two disconnects")
        assert metric(gw, "fastws_gateway_refused_connects_total") == 2


def test_message_round_trip_and_inline_reply(engine, tmp_path):
    """Text and binary messages reach the backend (binary base64-encoded, with
    the connection's user) and its inline replies come back, in order."""
    with Procs(tmp_path) as ps:
        be = ps.backend()
        gw = ps.gateway(engine, be.url)

        async def main():
            ws = await websockets.connect(gw.ws("/r?user=bob"), open_timeout=TIMEOUT)
            assert await ask(ws, "echo hello") == "hello"
            assert await ask(ws, "echo héllo ✓") == "héllo ✓"
            assert await ask(ws, b"\x00\x01\xff") == b"bin:\x00\x01\xff"
            for i in range(200):
                await ws.send(f"echo {i}")
            assert [await recv(ws) for _ in range(200)] == [str(i) for i in range(200)]
            conn_id = await ask(ws, "id")
            await ws.close()
            return conn_id

        conn_id = run(main())
        msgs = [e for _, e in events(ps, "message", conn_id)]
        assert msgs[2]["base64"] == "AAH/" and "text" not in msgs[2]
        assert all(e["user"] == "bob" and e["route"] == "/r" for e in msgs)
        assert [e["text"] for e in msgs[3:203]] == [f"echo {i}" for i in range(200)]
        assert len({e["id"] for e in msgs}) == len(msgs)


def test_rooms_sends_and_closes_from_the_backend(engine, tmp_path):
    """Rooms named by the connect answer and joined/left by message answers
    (reachable by the HTTP publish API too); api.publish, post_to_connection
    to another connection, closing this connection or another one, and a
    push through the HTTP API after the answer (fastws.gateway.Client)."""
    with Procs(tmp_path) as ps:
        port = free_port()         # the gateway first: the backend's Client pushes through its HTTP API
        gw = ps.gateway(engine, f"http://{HOST}:{port}/events/")
        ps.backend(port=port, FASTWS_URL=gw.http, FASTWS_TOKEN=TOKEN)

        async def main():
            a = await websockets.connect(gw.ws("/room?rooms=lobby"), open_timeout=TIMEOUT)
            b = await websockets.connect(gw.ws("/room?rooms=lobby"), open_timeout=TIMEOUT)
            b_id = await ask(b, "id")
            await a.send("pub lobby hi all")
            assert await recv(a) == "hi all" and await recv(b) == "hi all"
            assert await ask(a, f"send {b_id} just you") == "sent"
            assert await recv(b) == "just you"
            assert await ask(a, "join extra") == "joined extra"
            status, _ = await asyncio.to_thread(http_post, gw.http + "/publish", {"room": "extra", "text": "via api"})
            assert status == 200 and await recv(a) == "via api"
            assert await ask(a, "leave extra") == "left extra"
            await asyncio.to_thread(http_post, gw.http + "/publish", {"room": "extra", "text": "not for a"})
            assert await ask(a, "echo next") == "next"     # nothing came in between
            await a.send("later pushed")
            assert await recv(a) == "pushed"
            assert await ask(a, f"kick {b_id}") == "kicking"
            assert await closed(b) == (4001, "kicked")
            await a.send("close 4000 bye")
            assert await closed(a) == (4000, "bye")

        run(main())


def test_disconnect_event_exactly_once(engine, tmp_path):
    """One disconnect event per accepted connection, after its messages, with
    its close code: a client's close, a client that vanishes (TCP closed
    without a close frame, or reset), a close the backend asked for."""
    with Procs(tmp_path) as ps:
        be = ps.backend()
        gw = ps.gateway(engine, be.url)

        def raw_client():
            s = socket.create_connection((HOST, gw.port), timeout=TIMEOUT)
            s.sendall(b"GET /raw HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                       b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
            head = b""
            while b"\r\n\r\n" not in head:
                head += s.recv(4096)
            assert head.startswith(b"HTTP/1.1 101"), head
            payload = b"echo raw"
            mask = os.urandom(4)
            s.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + bytes(c ^ mask[i % 4] for i, c in enumerate(payload)))
            reply = head.partition(b"\r\n\r\n")[2]
            while len(reply) < 5:
                reply += s.recv(4096)
            assert reply[:5] == b"\x81\x03raw", reply        # its message was handled
            return s

        async def main():
            ids = {}
            ws = await websockets.connect(gw.ws("/a"), open_timeout=TIMEOUT)
            ids["closed"] = await ask(ws, "id")
            await ws.close()
            ws = await websockets.connect(gw.ws("/a"), open_timeout=TIMEOUT)
            ids["kicked"] = await ask(ws, "id")
            await ws.send("close 4002 go")
            await closed(ws)
            s1 = await asyncio.to_thread(raw_client)
            s1.close()                                    # vanishes: FIN, no close frame
            s2 = await asyncio.to_thread(raw_client)
            s2.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s2.close()                                    # vanishes: RST
            return ids

        ids = run(main())
        wait_for(lambda: len(events(ps, "disconnect")) >= 4, what="four disconnect events")
        time.sleep(1.0)                                   # and no second one comes
        disc = [e for _, e in events(ps, "disconnect")]
        assert len(disc) == 4 and len({e["connection_id"] for e in disc}) == 4
        codes = {e["connection_id"]: e["code"] for e in disc}
        assert codes[ids["closed"]] == 1000 and codes[ids["kicked"]] == 4002
        raw_ids = [c for c in codes if c not in ids.values()]
        assert sorted(codes[c] for c in raw_ids) == [1006, 1006]
        for cid in codes:                                 # the disconnect comes last, after the messages
            evs = [e["type"] for _, e in events(ps, conn=cid)]
            assert evs[0] == "connect" and evs[-1] == "disconnect" and evs.count("disconnect") == 1, evs
        for cid in raw_ids:
            assert [e.get("text") for _, e in events(ps, "message", cid)] == ["echo raw"]


# -- a backend that restarts, stops, is slow ------------------------------------------------------


def test_backend_restarted_during_steady_traffic(engine, tmp_path):
    """The backend is restarted (SIGTERM, a new process on the same port)
    while 20 clients send steadily: no client is disconnected, every message
    is answered or reported in fastws_gateway_event_failures_total, the
    answers of each client come in order, and traffic goes on after."""
    with Procs(tmp_path) as ps:
        be = ps.backend()
        gw = ps.gateway(engine, be.url, "--gateway-queue", "10000")
        clients, per_second, seconds = 20, 50, 4.0

        async def client(i, got):
            ws = await websockets.connect(gw.ws(f"/load/{i}"), open_timeout=TIMEOUT)
            sent = 0

            async def reader():
                while True:
                    got[i].append(int(await ws.recv()))

            task = asyncio.get_running_loop().create_task(reader())
            t_end = time.monotonic() + seconds
            while time.monotonic() < t_end:
                await ws.send(f"echo {sent}")
                sent += 1
                await asyncio.sleep(1 / per_second)
            return ws, task, sent

        async def main():
            got = {i: [] for i in range(clients)}
            runs = asyncio.gather(*(client(i, got) for i in range(clients)))
            await asyncio.sleep(1.2)
            await asyncio.to_thread(be.stop)               # graceful: in-flight requests finish
            await asyncio.sleep(0.3)
            nb = await asyncio.to_thread(ps.backend, be.port)
            results = await runs
            total_sent = sum(sent for _, _, sent in results)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                failed = await asyncio.to_thread(metric, gw, "fastws_gateway_event_failures_total",
                                                 type="message", reason="failed") + \
                    await asyncio.to_thread(metric, gw, "fastws_gateway_event_failures_total",
                                            type="message", reason="timeout")
                if sum(len(v) for v in got.values()) + failed >= total_sent:
                    break
                await asyncio.sleep(0.1)
            for ws, task, _ in results:
                assert ws.state is State.OPEN    # nobody was disconnected
                assert await ask_after(ws, task) == "still here"
            return got, total_sent, failed, nb

        async def ask_after(ws, task):
            task.cancel()
            return await ask(ws, "echo still here")

        got, total_sent, failed, nb = run(main())
        answered = sum(len(v) for v in got.values())
        assert answered + failed == total_sent, (answered, failed, total_sent)
        assert failed <= total_sent * 0.05, failed         # reported, and few
        for seq in got.values():
            assert seq == sorted(seq) and len(set(seq)) == len(seq)     # in order, none twice
        assert nb.alive() and metric(gw, "fastws_gateway_backend_up") == 1


def test_backend_down_connections_stay_and_events_wait(engine, tmp_path):
    """With the backend stopped: connections stay open, their messages wait,
    /health says 503 (gateway down) and new connects get 503 with a
    Retry-After; when it is back the waiting messages are answered in order
    and /health is 200 again."""
    with Procs(tmp_path) as ps:
        be = ps.backend()
        gw = ps.gateway(engine, be.url, "--retry-after", "2")

        async def main():
            ws = await websockets.connect(gw.ws("/d"), open_timeout=TIMEOUT)
            assert await ask(ws, "echo up") == "up"
            await asyncio.to_thread(be.stop)
            for i in range(5):
                await ws.send(f"echo {i}")
            status, body = await asyncio.to_thread(wait_for, lambda: (h := health(gw))[0] == 503 and h,
                                                   10, "/health 503")
            check = body["checks"]["gateway"]
            assert check["ok"] is False and check["detail"]["state"] == "down"
            assert check["detail"]["queued_events"] + check["detail"]["in_flight_events"] >= 1
            r = await refused(gw.ws("/d"))
            assert r.status_code == 503 and 2 <= int(r.headers["Retry-After"]) <= 4
            assert metric(gw, "fastws_gateway_backend_up") == 0
            await asyncio.sleep(1.0)
            await asyncio.to_thread(ps.backend, be.port)
            assert [await recv(ws, 15) for _ in range(5)] == [str(i) for i in range(5)]
            await asyncio.to_thread(wait_for, lambda: health(gw)[0] == 200, 10, "/health 200")
            assert ws.state is State.OPEN
            await ws.close()

        run(main())


def test_slow_backend_queue_bound_closes_1013(engine, tmp_path):
    """A connection whose backend work is slow holds at most --gateway-queue
    events; past it (policy close) it is closed 1013 'try again later' and
    counted, while other connections go on; the events it had queued and its
    disconnect still reach the backend."""
    with Procs(tmp_path) as ps:
        be = ps.backend()
        gw = ps.gateway(engine, be.url, "--gateway-queue", "8", "--gateway-overflow", "close")

        async def main():
            ws = await websockets.connect(gw.ws("/s"), open_timeout=TIMEOUT)
            other = await websockets.connect(gw.ws("/s"), open_timeout=TIMEOUT)
            my_id = await ask(ws, "id")
            await ws.send("sleep 2 slow")
            await asyncio.sleep(0.3)
            for i in range(20):
                await ws.send(f"echo {i}")
            status, body = await asyncio.to_thread(health, gw)
            assert body["checks"]["gateway"]["detail"]["largest_queue"] >= 1
            assert await ask(other, "echo fine") == "fine"      # not held up
            code, reason = await closed(ws)
            assert (code, reason) == (1013, "try again later")
            await other.close()
            return my_id

        my_id = run(main())
        assert metric(gw, "fastws_gateway_overflow_closes_total") == 1
        wait_for(lambda: events(ps, "disconnect", my_id), what="its disconnect")
        texts = [e.get("text") for _, e in events(ps, "message", my_id)]
        assert texts == ["id", "sleep 2 slow"] + [f"echo {i}" for i in range(8)], texts
        assert events(ps, "disconnect", my_id)[0][1]["code"] == 1013


def test_slow_backend_drop_policy(engine, tmp_path):
    """Policy drop: past --gateway-queue new messages are dropped and counted,
    the connection stays open and the queued ones are answered in order."""
    with Procs(tmp_path) as ps:
        be = ps.backend()
        gw = ps.gateway(engine, be.url, "--gateway-queue", "4", "--gateway-overflow", "drop")

        async def main():
            ws = await websockets.connect(gw.ws("/s"), open_timeout=TIMEOUT)
            await ws.send("sleep 1.5 slow")
            await asyncio.sleep(0.3)
            for i in range(10):
                await ws.send(f"echo {i}")
            got = [await recv(ws) for _ in range(5)]
            assert got == ["slow", "0", "1", "2", "3"], got
            assert await ask(ws, "echo after") == "after"
            await ws.close()

        run(main())
        assert metric(gw, "fastws_gateway_dropped_messages_total") == 6


def test_timeout_connect_503_and_message_reported(engine, tmp_path):
    """--gateway-timeout: a connect not answered in time gets 503 with a
    Retry-After; a message not answered in time is counted as failed
    (timeout), not sent again, and the connection goes on."""
    with Procs(tmp_path) as ps:
        be = ps.backend()
        gw = ps.gateway(engine, be.url, "--gateway-timeout", "0.5")

        async def main():
            t0 = time.monotonic()
            r = await refused(gw.ws("/t?sleep=3"))
            assert r.status_code == 503 and "Retry-After" in r.headers and time.monotonic() - t0 < 3
            ws = await websockets.connect(gw.ws("/t"), open_timeout=TIMEOUT)
            await ws.send("sleep 2 late")
            await asyncio.sleep(1.0)
            assert await ask(ws, "echo next") == "next"
            await ws.close()

        run(main())
        assert metric(gw, "fastws_gateway_event_failures_total", type="message", reason="timeout") == 1
        assert metric(gw, "fastws_gateway_event_failures_total", type="connect", reason="timeout") == 1
        assert len([e for _, e in events(ps, "message") if e["text"] == "sleep 2 late"]) == 1


# -- batching, concurrency, retries, the token ---------------------------------------------------


def test_batches_when_the_backend_opts_in(engine, tmp_path):
    """A backend that answers Fastws-Gateway-Batch gets several events per
    request (never more than --gateway-batch), and never more than
    --gateway-concurrency requests at once; one that does not, one event per
    request.  Either way every message is answered, in order."""
    async def burst(gw, clients=30, n=20):
        conns = [await websockets.connect(gw.ws(f"/b{i}"), open_timeout=TIMEOUT) for i in range(clients)]
        for ws in conns:
            for j in range(n):
                await ws.send(f"echo {j}")
        for ws in conns:
            assert [await recv(ws) for _ in range(n)] == [str(j) for j in range(n)]
            await ws.close()

    with Procs(tmp_path) as ps:
        be = ps.backend(GW_BATCH="1000")
        gw = ps.gateway(engine, be.url, "--gateway-batch", "50", "--gateway-concurrency", "4")
        run(burst(gw))
        stats = json.loads(http_get(be.url.replace("/events/", "/stats"))[1])
        assert 1 < stats["max_events"] <= 50, stats
        assert stats["max_concurrent"] <= 4, stats
        assert stats["requests"] < stats["events"] / 3, stats
    (tmp_path / "one").mkdir()
    with Procs(tmp_path / "one") as ps:
        be = ps.backend(GW_BATCH="0")
        gw = ps.gateway(engine, be.url, "--gateway-batch", "50")
        run(burst(gw, 10, 10))
        stats = json.loads(http_get(be.url.replace("/events/", "/stats"))[1])
        assert stats["max_events"] == 1 and stats["requests"] == stats["events"], stats


def test_connect_retried_and_token_sent(engine, tmp_path):
    """A connect whose request fails (HTTP 500) is sent again up to
    --gateway-retries times; --gateway-token goes with every request (the
    backend refuses requests without it: the connect then fails with 502)."""
    with Procs(tmp_path) as ps:
        be = ps.backend(GW_TOKEN="backend-token-1")
        gw = ps.gateway(engine, be.url, "--gateway-retries", "3", "--gateway-token", "backend-token-1")
        bare = ps.gateway(engine, be.url, "--gateway-retries", "0")

        async def main():
            ws = await websockets.connect(gw.ws("/f?flaky=k1&fails=2"), open_timeout=TIMEOUT)
            assert await ask(ws, "echo ok") == "ok"
            await ws.close()
            r = await refused(gw.ws("/f?flaky=k2&fails=9"))
            assert r.status_code == 502
            r = await refused(bare.ws("/f"))
            assert r.status_code == 502

        run(main())
        stats = json.loads(http_get(be.url.replace("/events/", "/stats"))[1])
        assert stats["attempts"] == {"k1": 3, "k2": 4}, stats
        assert "Bearer backend-token-1" in stats["auth"] and "" in stats["auth"]
        assert metric(gw, "fastws_gateway_retries_total", type="connect") == 2 + 3


# -- the command line and the fronts -----------------------------------------------------------------


def _serve(*args, env=None, timeout=30):
    full = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-c", "from fastws.cli.main import main; main()", "serve", *args],
                          cwd=REPO, env=full, capture_output=True, text=True, timeout=timeout)


def _one_line(out) -> str:
    lines = [ln for ln in out.stderr.strip().splitlines() if not ln[:4].isdigit()]
    assert len(lines) == 1, out.stderr
    return lines[0]


def test_command_line_and_fronts(engine, tmp_path):
    """``fastws serve`` without APP needs --gateway (one line, exit 2); the
    ASGI front refuses the gateway (one line); a route the app has already
    cannot also go to the backend (one line); an app's own routes and the
    gateway's (--gateway-routes) serve side by side."""
    env = {"FASTWS_NO_EXTENSIONS": "1"} if engine == "wsproto" else {}
    out = _serve("--port", "0", env=env)
    assert out.returncode == 2 and "missing APP" in _one_line(out) and "--gateway" in _one_line(out)
    out = _serve("tests.integration.apps.asgi_scope_app:app", "--port", "0", "--gateway", "http://127.0.0.1:9/e",
                 env=env)
    assert out.returncode != 0 and "gateway" in _one_line(out) and "ASGI" in _one_line(out)
    out = _serve("tests.integration.apps.settings_app:app", "--port", "0", "--gateway", "http://127.0.0.1:9/e",
                 env=env)
    assert out.returncode != 0 and "gateway_routes" in _one_line(out)
    out = _serve("--port", "0", "--gateway", "ftp://x", env=env)
    assert out.returncode == 2 and "gateway" in _one_line(out)
    with Procs(tmp_path) as ps:
        be = ps.backend()
        gw = ps.gateway(engine, be.url, "--gateway-routes", "/gw,/gw2", app="tests.integration.apps.settings_app:app")

        async def main():
            ws = await websockets.connect(gw.ws("/gw"), open_timeout=TIMEOUT)
            assert await ask(ws, "echo via backend") == "via backend"
            await ws.close()
            own = await websockets.connect(gw.ws("/ws"), open_timeout=TIMEOUT)
            hello = json.loads(await recv(own))            # the app's own route answers
            assert hello["path"] == "/ws"
            await own.close()

        run(main())
        assert [e["route"] for _, e in events(ps, "connect")] == ["/gw"]


def test_gateway_route_in_code(engine, tmp_path):
    """``fastws.gateway.route(app, path, url)``: a mixed app serves one path
    itself and hands another to the backend."""
    app_file = tmp_path / "mixed.py"
    with Procs(tmp_path) as ps:
        be = ps.backend()
        app_file.write_text(
            "import fastws, fastws.gateway\n"
            "app = fastws.App()\n"
            "@app.on_message('/own')\n"
            "def own(conn, data):\n"
            "    conn.send('own:' + data)\n"
            f"fastws.gateway.route(app, '/gw', {be.url!r}, batch=10)\n")
        port = free_port()
        env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"}
        if engine == "wsproto":
            env["FASTWS_NO_EXTENSIONS"] = "1"
        p = Proc([sys.executable, "-c", "from fastws.cli.main import main; main()", "serve", "mixed:app",
                  "--port", str(port), "--app-dir", str(tmp_path)], tmp_path / "mixed.log", env, port)
        ps.all.append(p)
        p.wait_listening(port, "listening on")

        async def main():
            ws = await websockets.connect(f"ws://{HOST}:{port}/own", open_timeout=TIMEOUT)
            assert await ask(ws, "x") == "own:x"
            await ws.close()
            ws = await websockets.connect(f"ws://{HOST}:{port}/gw", open_timeout=TIMEOUT)
            assert await ask(ws, "echo y") == "y"
            await ws.close()

        run(main())


def test_metrics_and_health_show_the_backend(engine, tmp_path):
    """/metrics: events, answers, requests, the backend's latency and the
    gateway's own time per event; /health: the backend's state and latency."""
    with Procs(tmp_path) as ps:
        be = ps.backend()
        gw = ps.gateway(engine, be.url)

        async def main():
            ws = await websockets.connect(gw.ws("/m"), open_timeout=TIMEOUT)
            for i in range(50):
                assert await ask(ws, f"echo {i}") == str(i)
            await ws.close()

        run(main())
        assert metric(gw, "fastws_gateway_events_total", type="message") == 50
        assert metric(gw, "fastws_gateway_answers_total", type="message") == 50
        assert metric(gw, "fastws_gateway_backend_latency_seconds_count") >= 50
        assert metric(gw, "fastws_gateway_added_latency_seconds_count", type="message") == 50
        assert metric(gw, "fastws_gateway_added_latency_seconds_count", type="connect") == 1
        # the gateway's own time per message is small: most under 2 ms
        assert metric(gw, "fastws_gateway_added_latency_seconds_bucket", type="message", le="0.002") >= 45
        status, body = health(gw)
        detail = body["checks"]["gateway"]["detail"]
        assert status == 200 and detail["state"] == "up" and detail["latency_ms"]["p50"] > 0
        assert detail["transport"] == "http" and detail["queued_events"] == 0


def test_graceful_stop_delivers_the_disconnects(engine, tmp_path):
    """SIGTERM on the gateway: its clients are closed 1001 and the backend
    still gets every disconnect event before the process exits."""
    with Procs(tmp_path) as ps:
        be = ps.backend()
        gw = ps.gateway(engine, be.url)

        async def main():
            conns = [await websockets.connect(gw.ws("/g"), open_timeout=TIMEOUT) for _ in range(5)]
            for ws in conns:
                await ask(ws, "id")
            gw.proc.send_signal(signal.SIGTERM)
            for ws in conns:
                assert (await closed(ws))[0] == 1001

        run(main())
        assert gw.stop() == 0
        disc = [e for _, e in events(ps, "disconnect")]
        assert len(disc) == 5 and {e["code"] for e in disc} == {1001}


def test_readme_example(engine, tmp_path):
    """README.md's gateway example as written (blocks readme-backend and
    readme-run): backend.py under uvicorn, ``fastws serve --gateway``; ann's
    "hi" is answered "sent" and reaches the lobby as "ann: hi"; without
    ?user= the upgrade is refused with 401."""
    (tmp_path / "backend.py").write_text(block("README.md", "readme-backend").text)
    lines = [ln for ln in block("README.md", "readme-run").text.splitlines() if ln.strip()]
    bport, gport = free_port(), free_port()
    uv = shlex.split(lines[0].rstrip("& ").replace("9000", str(bport)))
    serve = shlex.split(lines[1].replace("9000", str(bport)).replace("8000", str(gport)))
    assert uv[0] == "uvicorn" and serve[:2] == ["fastws", "serve"], lines
    env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"}
    with Procs(tmp_path) as ps:
        be = Proc([sys.executable, "-m", *uv], tmp_path / "uvicorn.log", env, bport)
        ps.all.append(be)
        be.wait_listening(bport)
        if engine == "wsproto":
            env["FASTWS_NO_EXTENSIONS"] = "1"
        gw = Proc([sys.executable, "-c", "from fastws.cli.main import main; main()", *serve[1:], "--host", HOST],
                  tmp_path / "gateway.log", env, gport)
        ps.all.append(gw)
        gw.wait_listening(gport, "listening on")

        async def main():
            ann = await websockets.connect(f"ws://{HOST}:{gport}/chat?user=ann", open_timeout=TIMEOUT)
            bob = await websockets.connect(f"ws://{HOST}:{gport}/chat?user=bob", open_timeout=TIMEOUT)
            await ann.send("hi")
            assert [await recv(ann), await recv(ann)] == ["sent", "ann: hi"]
            assert await recv(bob) == "ann: hi"
            r = await refused(f"ws://{HOST}:{gport}/chat")
            assert r.status_code == 401 and b"who are you?" in r.body
            await ann.close()
            await bob.close()

        run(main())


def test_deployment_doc_http_deploy(engine, tmp_path):
    """docs/deployment.md's HTTP deploy (block deploy-http) with README's
    backend: v1 serves, the gateway holds 10 chatting clients, v1 is stopped
    (SIGTERM) and v2 started on its port.  No client reconnects, every
    message is answered "sent" and reaches every member of the lobby."""
    (tmp_path / "backend.py").write_text(block("README.md", "readme-backend").text)
    cmds = doc_commands(block("docs/deployment.md", "deploy-http").text)
    assert [c[0] for c in cmds] == ["uvicorn", "fastws", "kill", "uvicorn"], cmds
    bport, gport = free_port(), free_port()

    def ports(words):
        return [w.replace("9000", str(bport)).replace("8000", str(gport)) for w in words]

    env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"}
    with Procs(tmp_path) as ps:
        def uvicorn(tag):
            p = Proc([sys.executable, "-m", *ports(cmds[0])], tmp_path / f"uvicorn-{tag}.log", env, bport)
            ps.all.append(p)
            p.wait_listening(bport)
            return p

        v1 = uvicorn("v1")
        genv = dict(env, **({"FASTWS_NO_EXTENSIONS": "1"} if engine == "wsproto" else {}))
        gw = Proc([sys.executable, "-c", "from fastws.cli.main import main; main()", *ports(cmds[1])[1:],
                   "--host", HOST], tmp_path / "gateway.log", genv, gport)
        ps.all.append(gw)
        gw.wait_listening(gport, "listening on")
        gw.http = f"http://{HOST}:{gport}"

        async def deploy():
            await asyncio.sleep(1.0)
            assert cmds[2][:2] == ["kill", "-TERM"]
            await asyncio.to_thread(v1.stop)                      # kill -TERM %1 && wait %1
            await asyncio.to_thread(uvicorn, "v2")                # uvicorn backend:app --port 9000 &

        got = run(chat_traffic(f"ws://{HOST}:{gport}/chat", 10, 3.0, deploy))
        total = sum(g["n"] for g in got.values())
        for g in got.values():
            assert g["open"], "a client was disconnected"
            assert g["sent"] == g["n"] and len(g["lines"]) == total, (g["sent"], g["n"], len(g["lines"]), total)
        assert metric(gw, "fastws_gateway_event_failures_total", type="message", reason="failed") == 0


class RawBackend:
    """An HTTP backend written by hand (asyncio, in a thread of the test) that
    answers what the event's text (or connect query ``?a=``) names, malformed
    answers included."""

    ANSWERS = {
        "bad-json": b"this is not json",
        "bad-type": b'{"reply": 5}',
        "bad-close": b'{"close": {"code": 999}}',
        "bad-join": b'{"join": 5}',
        "bad-accept": b'{"accept": "yes"}',
        "ok": b'{"reply": {"text": "ok"}}',
    }

    def __init__(self) -> None:
        import threading
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_server(self._serve, HOST, self.port))
        self.ready.set()
        self.loop.run_forever()

    async def _serve(self, reader, writer) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(next(ln.split(b":")[1] for ln in head.split(b"\r\n")
                                  if ln.lower().startswith(b"content-length")))
                ev = json.loads(await reader.readexactly(length))
                key = ev.get("text") if ev["type"] == "message" else (ev.get("query") or {}).get("a", "")
                body = self.ANSWERS.get(key, b"{}")
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                             % (len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def test_malformed_answers_are_counted_not_fatal(engine, tmp_path):
    """A backend's malformed answers (not JSON, a reply of the wrong type, a
    close code no server may send, a connect answer of the wrong type) are
    counted and logged; the connection stays open and goes on; a malformed
    accept refuses the upgrade with 502."""
    be = RawBackend()
    try:
        with Procs(tmp_path) as ps:
            gw = ps.gateway(engine, f"http://{HOST}:{be.port}/")

            async def main():
                ws = await websockets.connect(gw.ws("/x?a=bad-join"), open_timeout=TIMEOUT)
                for bad in ("bad-json", "bad-type", "bad-close"):
                    await ws.send(bad)
                assert await ask(ws, "ok") == "ok"
                assert ws.state is State.OPEN
                r = await refused(gw.ws("/x?a=bad-accept"))
                assert r.status_code == 502
                await ws.close()

            run(main())
            assert metric(gw, "fastws_gateway_event_failures_total", type="message", reason="bad_answer") == 2
            assert metric(gw, "fastws_gateway_event_failures_total", type="message", reason="failed") == 1
            assert metric(gw, "fastws_gateway_event_failures_total", type="connect", reason="bad_answer") == 2
            assert "malformed" in gw.log()
    finally:
        be.close()


@pytest.mark.timeout(300)
def test_bench_gateway_quick(tmp_path):
    """``fastws bench --gateway --quick``: every system (Streams, HTTP, the app in
    process, python-socketio) runs, every round trip is answered and checked,
    the table and the JSON file are written (timings are not asserted)."""
    from brokerutil import REDIS_URL, need_redis

    need_redis()
    out = subprocess.run([sys.executable, "-c", "from fastws.cli.main import main; main()", "bench", "--gateway",
                          "--quick", "--out", str(tmp_path), "--redis-url", REDIS_URL],
                         cwd=REPO, capture_output=True, text=True, timeout=280)
    assert out.returncode == 0, out.stderr[-4000:]
    for name in ("gateway-streams", "gateway-http", "fastws-app", "socketio"):
        assert f"| {name} |" in out.stdout, out.stdout
    (result,) = tmp_path.glob("gateway-*.json")
    doc = json.loads(result.read_text())
    assert all(s["throughput"] > 0 and s["throughput_ok"] and s["paced_ok"] for s in doc["systems"]), doc
    gateways = [s for s in doc["systems"] if s["system"].startswith("gateway")]
    assert all(s["paced"][0]["added_p50_us"] is not None for s in gateways), gateways
