"""Gateway mode over Redis Streams: ``fastws serve --gateway redis://...?stream=S`` and worker processes.

The workers are ``python -m fastws.gateway tests.integration.apps.gateway_backend:handle
--url ...`` (the SDK's Worker: a consumer group on the events stream), as
many as a test starts; the gateway is ``fastws serve`` on the engine under
test; the Redis is the test Redis (``$FASTWS_TEST_REDIS``), every stream
under this run's prefix.  What reached the workers is read from their log
of events (one JSON line per event handled, naming the worker).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time

import pytest
import redis
import websockets
from websockets.protocol import State

from brokerutil import REDIS_URL, need_redis, new_prefix
from docblocks import block
from gateway_helpers import REPO, Proc, Procs, chat_traffic, doc_commands, events, free_port, health, metric, wait_for

TIMEOUT = 10.0
pytestmark = pytest.mark.timeout(180)


def run(coro, timeout: float = 120):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def recv(ws, timeout: float = TIMEOUT):
    return await asyncio.wait_for(ws.recv(), timeout)


async def ask(ws, text: str):
    await ws.send(text)
    return await recv(ws)


def stream_url() -> tuple:
    need_redis()
    stream = new_prefix("gw") + ":events"
    return f"{REDIS_URL}?stream={stream}", stream


def test_three_workers_share_the_stream(engine, tmp_path):
    """Three workers in one consumer group: every event is handled once, by
    one of them, and all three take a share; connects are accepted or
    refused by their answer, every message is answered in order, every
    connection gets exactly one disconnect event, and the workers trim what
    they acknowledged from the stream."""
    url, stream = stream_url()
    with Procs(tmp_path) as ps:
        gw = ps.gateway(engine, url, "--gateway-batch", "5")
        for name in ("w1", "w2", "w3"):
            ps.worker(url, name)

        async def main():
            r = None
            with pytest.raises(websockets.InvalidStatus) as info:
                r = await websockets.connect(gw.ws("/s?deny=1"), open_timeout=TIMEOUT)
            assert r is None and info.value.response.status_code == 403
            conns = [await websockets.connect(gw.ws(f"/s?user=u{i}&rooms=all"), open_timeout=TIMEOUT)
                     for i in range(30)]
            for ws in conns:
                for j in range(30):
                    await ws.send(f"echo {j}")
            for ws in conns:
                assert [await recv(ws) for _ in range(30)] == [str(j) for j in range(30)]
            await conns[0].send("pub all to everyone")
            for ws in conns:
                assert await recv(ws) == "to everyone"
            for ws in conns:
                await ws.close()

        run(main())
        wait_for(lambda: len(events(ps, "disconnect")) >= 30, what="30 disconnect events")
        time.sleep(0.5)
        handled = events(ps)
        ids = [e["id"] for _, e in handled]
        assert len(ids) == len(set(ids)) == 1 + 30 + 30 * 30 + 1 + 30      # each event once
        workers = {who for who, _ in handled}
        assert workers == {"w1", "w2", "w3"}, workers
        assert all(e["user"].startswith("u") for _, e in events(ps, "message"))
        disc = [e["connection_id"] for _, e in events(ps, "disconnect")]
        assert len(disc) == len(set(disc)) == 30
        assert metric(gw, "fastws_gateway_answers_total", type="message") == 30 * 30 + 1
        r = redis.Redis.from_url(REDIS_URL)
        try:
            wait_for(lambda: r.xlen(stream) < 20, 15, "the workers trim the events stream")
        finally:
            r.close()


def test_workers_restarted_during_steady_traffic_lose_nothing(engine, tmp_path):
    """One worker is killed (SIGKILL) and the others stopped (SIGTERM) while
    20 clients send steadily; new workers start a second later and claim
    what the killed one held.  No client is disconnected and every message
    is answered exactly once, in order: nothing is lost."""
    url, _ = stream_url()
    with Procs(tmp_path) as ps:
        gw = ps.gateway(engine, url, "--gateway-queue", "10000")
        w1, w2, w3 = (ps.worker(url, name) for name in ("w1", "w2", "w3"))
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
            await asyncio.sleep(1.0)
            w1.kill()
            await asyncio.sleep(0.3)
            await asyncio.to_thread(w2.stop)
            await asyncio.to_thread(w3.stop)
            await asyncio.sleep(1.0)                       # no worker at all: entries wait in Redis
            await asyncio.to_thread(ps.worker, url, "w4")
            await asyncio.to_thread(ps.worker, url, "w5")
            results = await runs
            total = {i: sent for i, (_, _, sent) in enumerate(results)}
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and any(len(got[i]) < total[i] for i in got):
                await asyncio.sleep(0.1)
            for ws, task, _ in results:
                assert ws.state is State.OPEN                 # nobody was disconnected
                task.cancel()
                assert await ask(ws, "echo still here") == "still here"
            return got, total

        got, total = run(main())
        for i, seq in got.items():
            assert seq == list(range(total[i])), (i, len(seq), total[i])   # all, in order, once
        handled = {e["id"] for _, e in events(ps, "message")}
        assert metric(gw, "fastws_gateway_event_failures_total", type="message", reason="failed") == 0
        assert len(handled) >= sum(total.values())


def test_workers_gone_queue_bound_and_health(engine, tmp_path):
    """With no worker reading: /health says 503 once an entry waits past
    --gateway-timeout, a connection's queue holds --gateway-queue events and
    then it is closed 1013; a worker that starts later answers what waited
    in Redis and gets the connection's disconnect event."""
    url, _ = stream_url()
    with Procs(tmp_path) as ps:
        gw = ps.gateway(engine, url, "--gateway-timeout", "1", "--gateway-queue", "5")
        w1 = ps.worker(url, "w1")

        async def main():
            ws = await websockets.connect(gw.ws("/q"), open_timeout=TIMEOUT)
            my_id = await ask(ws, "id")
            await asyncio.to_thread(w1.stop, signal.SIGTERM)
            await ws.send("echo waits in redis")
            await asyncio.sleep(0.3)
            status, body = await asyncio.to_thread(wait_for, lambda: (h := health(gw))[0] == 503 and h, 10,
                                                   "/health 503")
            assert body["checks"]["gateway"]["detail"]["unanswered_past_timeout"] == 1
            for i in range(10):
                await ws.send(f"echo {i}")
            with pytest.raises(websockets.ConnectionClosed):
                while True:
                    await recv(ws)
            assert (ws.close_code, ws.close_reason) == (1013, "try again later")
            return my_id

        my_id = run(main())
        ps.worker(url, "w2")
        wait_for(lambda: events(ps, "disconnect", my_id), 15, "its disconnect event")
        texts = [e.get("text") for _, e in events(ps, "message", my_id)]
        assert texts == ["id", "echo waits in redis"] + [f"echo {i}" for i in range(5)], texts
        assert metric(gw, "fastws_gateway_overflow_closes_total") == 1
        wait_for(lambda: health(gw)[0] == 200, 10, "/health 200 again")


def test_deployment_doc_streams_deploy(engine, tmp_path):
    """docs/deployment.md's Streams deploy (block deploy-streams) with
    README's backend: a v1 worker serves 10 chatting clients, a v2 worker
    starts, v1 is stopped (SIGTERM).  No client reconnects, every message is
    answered "sent" and reaches every member of the lobby."""
    need_redis()
    (tmp_path / "backend.py").write_text(block("README.md", "readme-backend").text)
    cmds = doc_commands(block("docs/deployment.md", "deploy-streams").text)
    assert [c[0] for c in cmds] == ["fastws", "python", "python", "kill"], cmds
    stream = new_prefix("gwdoc") + ":events"
    port = free_port()

    def adapt(words):
        return [w.replace("redis://127.0.0.1:6379/0", REDIS_URL).replace("chat:events", stream)
                .replace("8000", str(port)) for w in words]

    env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"}
    with Procs(tmp_path) as ps:
        genv = dict(env, **({"FASTWS_NO_EXTENSIONS": "1"} if engine == "wsproto" else {}))
        gw = Proc([sys.executable, "-c", "from fastws.cli.main import main; main()", *adapt(cmds[0])[1:],
                   "--host", "127.0.0.1"], tmp_path / "gateway.log", genv, port)
        ps.all.append(gw)
        gw.wait_listening(port, "listening on")
        gw.http = f"http://127.0.0.1:{port}"

        def worker(words, tag):
            p = Proc([sys.executable, *adapt(words)[1:], "--consumer", tag], tmp_path / f"{tag}.log", env)
            ps.all.append(p)
            p.wait_listening(text=f"worker {tag} on")
            return p

        v1 = worker(cmds[1], "v1")

        async def deploy():
            await asyncio.sleep(1.0)
            await asyncio.to_thread(worker, cmds[2], "v2")
            assert cmds[3] == ["kill", "-TERM", "%2"]             # %2: the v1 worker
            await asyncio.to_thread(v1.stop)

        got = run(chat_traffic(f"ws://127.0.0.1:{port}/chat", 10, 3.0, deploy))
        total = sum(g["n"] for g in got.values())
        for g in got.values():
            assert g["open"], "a client was disconnected"
            assert g["sent"] == g["n"] and len(g["lines"]) == total, (g["sent"], g["n"], len(g["lines"]), total)
