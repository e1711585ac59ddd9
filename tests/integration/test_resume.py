"""Resumable room membership across nodes (``App.resume``, Redis Streams broker).

Two ``fastws serve`` nodes on the local Redis with ``--broker redis+streams://``
(each test with its own prefix). A client that resumes gets the room's stream
in order with entry ids, whichever node published; after a disconnect it
reconnects to the other node with the last id it saw and gets exactly what it
missed, then the live messages, none twice, none lost, even while messages
keep being published during the replay.
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys

import pytest
import websockets

from brokerutil import STREAMS_URL, new_prefix
from test_multinode import free_port, wait_port

APP = "tests.integration.apps.resume_app:app"


@pytest.fixture
def nodes(tmp_path):
    prefix = new_prefix("resume-")
    procs, ports = [], []
    try:
        for i in range(2):
            port = free_port()
            with open(tmp_path / f"node{i}.log", "wb") as log:    # the child keeps its own descriptor
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "fastws.cli.main", "serve", APP, "--host", "127.0.0.1",
                     "--port", str(port), "--broker", STREAMS_URL,
                     "--broker-prefix", prefix, "--ping-interval", "0"],
                    stdout=log, stderr=subprocess.STDOUT))
            ports.append(port)
        for port, proc in zip(ports, procs, strict=True):
            wait_port(port, proc)
        yield ports
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def eid(entry_id: str) -> tuple:
    """A stream entry id as a comparable (ms, seq)."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


async def connect(port):
    return await websockets.connect(f"ws://127.0.0.1:{port}/r")


async def command(ws, cmd, reply_key):
    """Send a command; return (stream frames received before the reply, reply)."""
    await ws.send(json.dumps(cmd))
    frames = []
    while True:
        msg = json.loads(await asyncio.wait_for(ws.recv(), 10))
        if reply_key in msg:
            return frames, msg
        frames.append(msg)


async def stream(ws, n, timeout=10):
    out = []
    while len(out) < n:
        out.append(json.loads(await asyncio.wait_for(ws.recv(), timeout)))
    return out


async def quiet(ws, seconds=0.3):
    try:
        extra = await asyncio.wait_for(ws.recv(), seconds)
    except asyncio.TimeoutError:
        return None
    return extra


def test_resume_on_the_other_node_gets_exactly_what_was_missed(nodes):
    a_port, b_port = nodes

    async def main():
        a = await connect(a_port)
        b = await connect(b_port)
        plain = await connect(a_port)
        _, r = await command(a, {"resume": "lobby", "since": None}, "resumed")
        assert r == {"resumed": True}
        await command(b, {"resume": "lobby", "since": None}, "resumed")
        await command(plain, {"join": "lobby"}, "joined")

        await b.send(json.dumps({"say": "lobby", "text": "m1"}))
        await b.send(json.dumps({"say": "lobby", "text": "m2"}))
        got = await stream(a, 2)
        assert [m["data"] for m in got] == ["m1", "m2"]
        assert all(m["room"] == "lobby" and m["id"] for m in got)
        # the publisher's node delivers to its stream members through the stream too
        assert [m["data"] for m in await stream(b, 2)] == ["m1", "m2"]
        # a plain member gets the messages themselves
        assert [await plain.recv() for _ in range(2)] == ["m1", "m2"]
        last = got[-1]["id"]
        await a.close()

        # missed: published on both nodes while A is away
        await b.send(json.dumps({"say": "lobby", "text": "m3"}))
        await plain.send(json.dumps({"say": "lobby", "text": "m4"}))
        await b.send(json.dumps({"bin": "lobby", "hex": "00ff10"}))
        seen_b = await stream(b, 3)              # the stream's order (two publishers: any interleaving)
        b64 = base64.b64encode(b"\x00\xff\x10").decode()
        assert sorted(m.get("data") or m.get("b64") for m in seen_b) == sorted(["m3", "m4", b64])

        a2 = await connect(b_port)            # reconnects to the OTHER node
        replayed, r = await command(a2, {"resume": "lobby", "since": last}, "resumed")
        assert r == {"resumed": True}
        assert replayed == seen_b              # same ids, same order, same content

        await plain.send(json.dumps({"say": "lobby", "text": "m6"}))
        live = await stream(a2, 1)
        assert live[0]["data"] == "m6" and eid(live[0]["id"]) > eid(replayed[-1]["id"])
        assert await quiet(a2) is None        # nothing twice
        for ws in (a2, b, plain):
            await ws.close()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_resume_during_a_burst_has_no_gap_and_no_duplicate(nodes):
    """Messages keep coming from the other node while the replay runs: the
    resumed client sees one contiguous, duplicate-free sequence."""
    a_port, b_port = nodes

    async def main():
        watcher = await connect(a_port)       # sees the whole stream, for reference
        await command(watcher, {"resume": "burst", "since": None}, "resumed")
        pub = await connect(b_port)
        await pub.send(json.dumps({"say": "burst", "text": "before", "count": 20}))
        ref = await stream(watcher, 20)
        last = ref[9]["id"]                   # the client saw the first 10

        a = await connect(a_port)
        await pub.send(json.dumps({"say": "burst", "text": "during", "count": 200}))
        frames, r = await command(a, {"resume": "burst", "since": last}, "resumed")
        assert r == {"resumed": True}
        ref += await stream(watcher, 200)
        expect = [m["id"] for m in ref[10:]]
        got = frames + await stream(a, len(expect) - len(frames))
        assert [m["id"] for m in got] == expect, (len(frames), [(m["id"], m["data"]) for m in got],
                                                  [(m["id"], m["data"]) for m in ref[10:]])
        assert [m["data"] for m in got] == [m["data"] for m in ref[10:]]
        assert await quiet(a) is None
        for ws in (a, pub, watcher):
            await ws.close()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_more_missed_than_the_limit_or_a_bad_id_is_reported(nodes):
    a_port, b_port = nodes

    async def main():
        a = await connect(a_port)
        await command(a, {"resume": "big", "since": None}, "resumed")
        pub = await connect(b_port)
        await pub.send(json.dumps({"say": "big", "text": "x", "count": 3}))
        first = (await stream(a, 3))[0]["id"]
        await a.close()
        await pub.send(json.dumps({"say": "big", "text": "y", "count": 1100}))
        await asyncio.sleep(0.5)
        a2 = await connect(a_port)
        frames, r = await command(a2, {"resume": "big", "since": first}, "resumed")
        assert r == {"resumed": False}        # 1,102 missed, limit 1,000: the newest 1,000
        assert len(frames) == 1000
        assert frames[-1]["data"] == "y#1099"
        ids = [eid(m["id"]) for m in frames]
        assert ids == sorted(ids) and len(set(ids)) == 1000
        _, err = await command(a2, {"resume": "big", "since": "not-an-id"}, "error")
        assert "invalid literal" in err["error"] or "id" in err["error"]
        for ws in (a2, pub):
            await ws.close()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_a_replay_larger_than_the_send_budget_is_paced_not_closed(nodes):
    """A replay of ~8 MB (999 messages of 8 KiB) to a client that reads
    slowly, far more than ``max_queue`` (1 MiB): it goes out at the pace the
    client reads it and arrives whole and in order, instead of the client
    being closed as a slow consumer (and resuming the same replay again)."""
    a_port, b_port = nodes

    async def main():
        pub = await connect(b_port)
        a = await connect(a_port)
        await command(a, {"resume": "big8", "since": None}, "resumed")
        await pub.send(json.dumps({"say": "big8", "text": "first"}))
        first = (await stream(a, 1))[0]["id"]
        await a.close()
        await pub.send(json.dumps({"say": "big8", "text": "p" * 8192, "count": 999}))
        await asyncio.sleep(1.0)
        slow = await websockets.connect(f"ws://127.0.0.1:{a_port}/r", max_queue=1, max_size=None)
        await slow.send(json.dumps({"resume": "big8", "since": first}))
        got = []
        reply = None
        while reply is None:
            msg = json.loads(await asyncio.wait_for(slow.recv(), 20))
            if "resumed" in msg:
                reply = msg
            else:
                got.append(msg)
                if len(got) % 50 == 0:
                    await asyncio.sleep(0.05)          # a slow reader
        assert reply == {"resumed": True}
        assert [m["data"] for m in got] == [f"{'p' * 8192}#{i}" for i in range(999)]
        for ws in (slow, pub):
            await ws.close()

    asyncio.run(asyncio.wait_for(main(), 90))
