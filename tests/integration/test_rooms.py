"""Rooms and the delivery policy against a real server and real clients.

The server runs tests/integration/apps/rooms_app.py (JSON commands); the
clients are `websockets` for readers and raw sockets for a client that stops
reading. Nothing here depends on timing for its verdict except the bounded
waits for something to happen.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import time

import pytest
import websockets

APP = "tests.integration.apps.rooms_app:app"


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


async def hello(url, room, ns="", batch=False):
    ws = await websockets.connect(url + "room", max_size=None)
    await ws.send(json.dumps({"hello": {"room": room, "ns": ns, "batch": batch}}))
    reply = json.loads(await ws.recv())
    assert reply["joined"] == room
    return ws


async def stats(url, rooms=()):
    async with websockets.connect(url + "room") as ws:
        await ws.send(json.dumps({"stats": 1, "rooms": list(rooms)}))
        return json.loads(await ws.recv())


def raw_client(host, port, room, rcvbuf=4096):
    """A client that upgrades, joins ``room`` and then never reads again."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.connect((host, port))
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall(
        (f"GET /room HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
         f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(1)
    assert head.startswith(b"HTTP/1.1 101")
    payload = json.dumps({"hello": {"room": room}}).encode()
    mask = os.urandom(4)
    frame = bytes([0x81, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    s.sendall(frame)
    return s


def test_publish_reaches_members_in_order_gapless(server_factory):
    srv = server_factory(app=APP)

    async def main():
        readers = [await hello(srv.url, "r1") for _ in range(5)]
        outsider = await hello(srv.url, "other")
        await readers[0].send(json.dumps({"publish": "r1", "count": 2000, "size": 64}))
        for r in readers:
            seqs = []
            while len(seqs) < 2000:
                msg = json.loads(await r.recv())
                if "seq" in msg:
                    seqs.append(msg["seq"])
            assert seqs == list(range(1, 2001))
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(outsider.recv(), 0.3)
        for w in readers + [outsider]:
            await w.close()

    run(main())


def test_namespaces_keep_rooms_apart(server_factory):
    srv = server_factory(app=APP)

    async def main():
        a = await hello(srv.url, "lobby", ns="/chat")
        b = await hello(srv.url, "lobby", ns="/admin")
        await a.send(json.dumps({"publish": "lobby", "ns": "/chat", "count": 3}))
        got = [json.loads(await a.recv()) for _ in range(4)]
        assert [m.get("seq") for m in got if "seq" in m] == [1, 2, 3]
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(b.recv(), 0.3)
        await a.close()
        await b.close()

    run(main())


def test_membership_removed_on_leave_and_disconnect(server_factory):
    """10,000 joins (10 waves of 1,000 connections), then leave/disconnect:
    the room disappears every time; nothing leaks."""
    srv = server_factory(app=APP)
    host, port = srv.address

    async def wave(i):
        conns = []
        for _ in range(1000):
            r, w = await asyncio.open_connection(host, port)
            key = base64.b64encode(os.urandom(16)).decode()
            w.write((f"GET /room HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
            conns.append((r, w))
        payload = json.dumps({"hello": {"room": "churn"}}).encode()
        frame = bytes([0x81, 0x80 | len(payload)]) + b"\0\0\0\0" + payload
        for r, w in conns:
            await r.readuntil(b"\r\n\r\n")
            w.write(frame)
        for r, _w in conns:
            await r.readexactly(2)  # the hello reply's header ...
        st = await stats(srv.url, ["churn"])
        assert st["count"]["churn"] == 1000
        # half leave explicitly, half just disconnect
        leave = json.dumps({"leave": "churn"}).encode()
        lframe = bytes([0x81, 0x80 | len(leave)]) + b"\0\0\0\0" + leave
        for j, (_r, w) in enumerate(conns):
            if j % 2:
                w.write(lframe)
        await asyncio.sleep(0.2)
        for _r, w in conns:
            w.close()
        deadline = time.monotonic() + 20
        while True:
            st = await stats(srv.url, ["churn"])
            if st["count"]["churn"] == 0 and st["hub"]["connections"] <= 1:
                break
            assert time.monotonic() < deadline, st
            await asyncio.sleep(0.1)
        return st

    async def main():
        for i in range(10):
            st = await wave(i)
        assert st["rooms"] == 0

    run(main())


def test_slow_consumer_drops_low_priority_then_closed_1008(server_factory):
    """A client that stops reading gets LOW messages dropped, then is closed
    with 1008 "slow consumer"; a normal reader in the same room gets every
    message, in order."""
    env = {"FASTWS_HIGH_WATER": "16384", "FASTWS_MAX_QUEUE": "262144",
           "FASTWS_SLOW_GRACE": "1.0"}     # the settings, through the environment layer
    srv = server_factory(app=APP, env=env)
    host, port = srv.address

    async def main():
        reader = await hello(srv.url, "slow-room")
        slow = raw_client(host, port, "slow-room")
        await asyncio.sleep(0.2)
        # LOW priority: dropped for the backed-up client (once the kernel's
        # buffers and the transport's are full), never for the reader
        seqs = []
        total = 0
        for _ in range(60):
            await reader.send(json.dumps({"publish": "slow-room", "count": 500, "size": 1024,
                                          "priority": 0}))
            total += 500
            while len(seqs) < total:
                msg = json.loads(await reader.recv())
                if "seq" in msg:
                    seqs.append(msg["seq"])
            st = await stats(srv.url)
            if st["hub"]["dropped"].get("backpressure:0", 0) > 0:
                break
        assert seqs == list(range(1, total + 1))
        assert st["hub"]["dropped"].get("backpressure:0", 0) > 0, st
        # keep publishing past the grace period: the slow client is closed
        deadline = time.monotonic() + 15
        while True:
            await reader.send(json.dumps({"publish": "slow-room", "count": 50, "size": 1024,
                                          "priority": 1}))
            while True:
                msg = json.loads(await reader.recv())
                if "published" in msg:
                    break
            st = await stats(srv.url)
            if st["hub"]["slow_consumer_closes"] >= 1:
                break
            assert time.monotonic() < deadline, st
            await asyncio.sleep(0.2)
        deadline = time.monotonic() + 15
        while not any(d[1] == 1008 and d[2] == "slow consumer" for d in st["disconnects"]):
            assert time.monotonic() < deadline, st
            await asyncio.sleep(0.2)
            st = await stats(srv.url)
        assert st["hub"]["closes"].get("1008", 0) >= 1
        # the reader is unaffected and still open
        await reader.send(json.dumps({"stats": 1}))
        while "hub" not in json.loads(await reader.recv()):
            pass
        await reader.close()
        slow.close()

    run(main())


def test_rss_bounded_for_a_client_that_never_reads(server_factory):
    """1,000 messages/s of 10 KiB (HIGH priority: never dropped) to a client
    that never reads: the server's RSS stays bounded (the client is closed
    as a slow consumer once its queue passes max_queue)."""
    srv = server_factory(app=APP)
    host, port = srv.address

    async def main():
        slow = raw_client(host, port, "flood")
        await asyncio.sleep(0.2)
        before = (await stats(srv.url))["rss"]
        async with websockets.connect(srv.url + "room") as ctl:
            await ctl.send(json.dumps({"flow": "flood", "rate": 1000, "seconds": 4, "size": 10240,
                                       "priority": 2}))
            peak = before
            for _ in range(25):
                await asyncio.sleep(0.2)
                peak = max(peak, (await stats(srv.url))["rss"])
        st = await stats(srv.url)
        slow.close()
        # 40 MB were published to the flooded room; the bound is
        # high_water + max_queue (~1.06 MiB) plus allocator slack
        assert peak - before < 16 * 1024 * 1024, (before, peak)
        assert st["hub"]["slow_consumer_closes"] >= 1

    run(main())


def test_one_callback_publishing_a_burst_respects_max_queue(server_factory):
    """Many publishes inside one callback (one loop iteration) to a member
    that never reads: what the server holds for it stays bounded by
    ``high_water`` + ``max_queue`` (plus slack), and it is closed as a slow
    consumer, instead of the whole burst landing in its transport's buffer
    at the end of the iteration."""
    env = {"FASTWS_HIGH_WATER": "16384", "FASTWS_MAX_QUEUE": "65536"}
    srv = server_factory(app=APP, env=env)
    host, port = srv.address

    async def main():
        slow = raw_client(host, port, "burst")
        await asyncio.sleep(0.2)
        before = (await stats(srv.url))["rss"]
        async with websockets.connect(srv.url + "room") as ctl:
            # 2,000 x 16 KiB = 32 MiB published by one callback, HIGH priority (never dropped)
            await ctl.send(json.dumps({"publish": "burst", "count": 2000, "size": 16384, "priority": 2}))
            while "published" not in json.loads(await ctl.recv()):
                pass
            st = await stats(srv.url)
        slow.close()
        assert st["rss"] - before < 12 * 1024 * 1024, (before, st["rss"])
        assert st["hub"]["slow_consumer_closes"] >= 1, st["hub"]

    run(main())


def test_batching_envelope_for_members_that_ask_and_single_frames_for_others(server_factory):
    srv = server_factory(app=APP)

    async def main():
        ctl = await hello(srv.url, "ctl-room")
        await ctl.send(json.dumps({"batching": "b-room", "max_batch": 7, "max_delay": 0.05}))
        assert json.loads(await ctl.recv()) == {"batching": "b-room"}
        batched = await hello(srv.url, "b-room", batch=True)
        plain = await hello(srv.url, "b-room")
        await ctl.send(json.dumps({"publish": "b-room", "count": 100, "size": 48}))
        # the batch member: envelopes of at most 7, seq consecutive, nothing lost
        seqs = []
        envelopes = 0
        while len(seqs) < 100:
            env = json.loads(await batched.recv())
            assert set(env) == {"room", "seq", "messages"} and env["room"] == "b-room"
            assert 1 <= len(env["messages"]) <= 7
            assert env["seq"] == len(seqs) + 1
            for i, m in enumerate(env["messages"]):
                assert json.loads(m)["seq"] == env["seq"] + i
            seqs += [env["seq"] + i for i in range(len(env["messages"]))]
            envelopes += 1
        assert seqs == list(range(1, 101)) and envelopes >= 100 // 7
        # the other member: every message as its own frame, in order
        got = [json.loads(await plain.recv())["seq"] for _ in range(100)]
        assert got == list(range(1, 101))
        for w in (ctl, batched, plain):
            await w.close()

    run(main())


def test_messages_from_another_node_arrive_byte_exact_compressed_or_not_and_batched(server_factory):
    """Two nodes on Redis (B negotiates permessage-deflate): what a member on
    A publishes reaches B's members as it was sent, text as text (non-ASCII,
    and one past the 64 KiB frame length) and binary as binary, whether B's
    client compresses or not; a room that batches on B puts the remote text
    in its envelope for the member that asked and sends it one frame each to
    the others."""
    from brokerutil import REDIS_URL, new_prefix

    broker = ("--broker", REDIS_URL, "--broker-prefix", new_prefix("rooms-"))
    a = server_factory(*broker, app=APP)
    b = server_factory(*broker, "--compression", app=APP)

    async def main():
        pub = await hello(a.url, "x")
        plain = await websockets.connect(b.url + "room", max_size=None, compression=None)
        deflated = await websockets.connect(b.url + "room", max_size=None)      # offers deflate
        assert deflated.response.headers.get("Sec-WebSocket-Extensions", "").startswith("permessage-deflate")
        for ws in (plain, deflated):
            await ws.send(json.dumps({"hello": {"room": "x"}}))
            assert json.loads(await ws.recv())["joined"] == "x"
        ctl = await hello(b.url, "ctl")
        await ctl.send(json.dumps({"batching": "xb", "max_batch": 3, "max_delay": 5}))
        assert json.loads(await ctl.recv()) == {"batching": "xb"}
        batched = await hello(b.url, "xb", batch=True)
        single = await hello(b.url, "xb")
        await pub.send(json.dumps({"join": "xb"}))
        await asyncio.sleep(0.5)                        # B's subscriptions reach Redis
        big = "é" * 40_000                               # 80,000 bytes of UTF-8
        sent = ["héllo ✓", b"\x00\xff\x10", big, "", b""]
        for m in sent:
            cmd = {"send": "x", "text": m} if isinstance(m, str) else {"send": "x", "hex": m.hex()}
            await pub.send(json.dumps(cmd))
            assert await pub.recv() == m                         # A's own member, locally
            assert json.loads(await pub.recv()) == {"sent": "x"}
        for ws in (plain, deflated):
            got = [await asyncio.wait_for(ws.recv(), 10) for _ in sent]
            assert got == sent and [type(m) for m in got] == [type(m) for m in sent]
        for i in range(3):
            await pub.send(json.dumps({"send": "xb", "text": f"b{i} ✓"}))
            assert await pub.recv() == f"b{i} ✓"
            assert json.loads(await pub.recv()) == {"sent": "xb"}
        env = json.loads(await asyncio.wait_for(batched.recv(), 10))
        assert env["room"] == "xb" and env["messages"] == ["b0 ✓", "b1 ✓", "b2 ✓"]
        assert [await asyncio.wait_for(single.recv(), 10) for _ in range(3)] == ["b0 ✓", "b1 ✓", "b2 ✓"]
        for ws in (pub, plain, deflated, ctl, batched, single):
            await ws.close()

    run(main())

