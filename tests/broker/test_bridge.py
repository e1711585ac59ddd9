"""Nodes wired by the bridge: real fastws servers in-process, real
`websockets` clients, a real broker (Redis pub/sub, Redis Streams, or the
embedded hub).

Each node is a ``fastws.server.Server`` on a free port with its own rooms
(``server.rooms``) attached to its own broker; the clients speak JSON
commands to /room (join, leave, pub, bin).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import tempfile
import uuid

import pytest
import websockets

import fastws
from fastws.broker import channel_name, create_broker
from fastws.broker.bridge import attach, global_id
from fastws.broker.embedded import EmbeddedHub
from fastws.broker.presence import Presence, presence_client
from fastws.config import Config
from fastws.server import Server
from fastws import publish_api

from brokerutil import REDIS_URL, STREAMS_URL, delete_keys, need_redis, run, wait_for

TOKEN = "s3cret"


def node_app(node: dict):
    app = fastws.App()

    @app.on_message("/room")
    def on_message(conn, data):
        cmd = json.loads(data)
        bridge = node["bridge"]
        if "join" in cmd:
            conn.join(cmd["join"])
            if "user" in cmd:
                conn.store["user_id"] = cmd["user"]
            conn.send(json.dumps({"joined": cmd["join"], "gid": global_id(conn)}))
        elif "leave" in cmd:
            conn.leave(cmd["leave"])
            conn.send(json.dumps({"left": cmd["leave"]}))
        elif "pub" in cmd:
            bridge.publish_nowait(cmd["pub"], cmd["text"])
        elif "bin" in cmd:
            bridge.publish_nowait(cmd["bin"], base64.b64decode(cmd["data"]))

    return app


class Node:
    def __init__(self, url: str, prefix: str) -> None:
        self.url, self.prefix = url, prefix
        self.state: dict = {}

    async def start(self) -> "Node":
        self.server = Server(node_app(self.state), Config(host="127.0.0.1", port=0,
                                                          max_message_size=1 << 16, shutdown_timeout=1))
        await self.server.start()
        self.broker = create_broker(self.url, prefix=self.prefix)
        self.bridge = self.state["bridge"] = await attach(self.server.rooms, self.broker)
        self.ws_url = f"ws://127.0.0.1:{self.server.port}/room"
        return self

    async def client(self, room=None, user=None):
        ws = await websockets.connect(self.ws_url, max_size=None)
        ws.gid = None
        if room is not None:
            await ws.send(json.dumps({"join": room, **({"user": user} if user else {})}))
            ws.gid = json.loads(await ws.recv())["gid"]
        return ws

    async def stop(self) -> None:
        await self.bridge.detach()
        await self.broker.close()
        await self.server.shutdown()


async def settle(*nodes):
    for n in nodes:
        await n.bridge.sync()


async def drain(ws, n, timeout=10.0):
    out = []
    for _ in range(n):
        out.append(await asyncio.wait_for(ws.recv(), timeout))
    return out


async def nothing_more(ws, wait=0.2):
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(ws.recv(), wait)


@pytest.fixture(params=["redis", "streams", "embedded"])
def cluster_of_nodes(request):
    """(kind, url) of the broker the nodes share."""
    if request.param in ("redis", "streams"):
        need_redis()
        return request.param, REDIS_URL if request.param == "redis" else STREAMS_URL
    return request.param, None


async def make_nodes(kind, url, n):
    prefix = "t" + uuid.uuid4().hex[:12]
    hub = None
    if kind == "embedded":
        path = os.path.join(tempfile.mkdtemp(prefix="fws-"), "hub.sock")
        hub = EmbeddedHub(path)
        await hub.start()
        url = "unix://" + path
    nodes = [await Node(url, prefix).start() for _ in range(n)]
    return nodes, hub, prefix


async def numsub(prefix, key) -> int:
    import redis.asyncio as aioredis

    r = aioredis.from_url(REDIS_URL)
    try:
        return (await r.pubsub_numsub(channel_name(prefix, key)))[0][1]
    finally:
        await r.aclose()


def test_room_across_nodes_exactly_once_in_order(cluster_of_nodes):
    kind, url = cluster_of_nodes

    async def main():
        nodes, hub, prefix = await make_nodes(kind, url, 3)
        A, B, C = nodes
        clients = []
        try:
            a1, a2 = await A.client("chat"), await A.client("chat")
            b1 = await B.client("chat")
            c1 = await C.client("elsewhere")
            clients += [a1, a2, b1, c1]
            await settle(A, B, C)

            # interest: only A and B listen to the chat channel; C does not
            if kind == "redis":
                assert await numsub(prefix, ("", "chat")) == 2
            elif kind == "streams":
                assert [("", "chat") in nd.broker.subscribed for nd in nodes] == [True, True, False]
            else:
                assert len(hub.routes[channel_name(prefix, ("", "chat"))]) == 2

            n = 40

            async def publisher(ws, tag):
                for i in range(n):
                    await ws.send(json.dumps({"pub": "chat", "text": f"{tag}-{i}"}))

            await asyncio.gather(publisher(a1, "a1"), publisher(b1, "b1"))
            await a2.send(json.dumps({"bin": "chat", "data": base64.b64encode(b"\x00\xffbin").decode()}))
            for ws in (a1, a2, b1):
                got = await drain(ws, 2 * n + 1)
                await nothing_more(ws)                      # exactly once: no duplicates
                for tag in ("a1", "b1"):
                    assert [m for m in got if isinstance(m, str) and m.startswith(tag)] == \
                        [f"{tag}-{i}" for i in range(n)]
                assert [m for m in got if isinstance(m, bytes)] == [b"\x00\xffbin"]
            await nothing_more(c1)
            assert C.broker.stats()["received"] == 0          # C never received chat traffic
            assert B.broker.stats()["received"] == n + 1      # a1's 40 + a2's binary, once each

            # the last member on B leaves: B unsubscribes, gets nothing more
            await b1.send(json.dumps({"leave": "chat"}))
            assert json.loads(await b1.recv()) == {"left": "chat"}
            await settle(B)
            if kind == "redis":
                assert await numsub(prefix, ("", "chat")) == 1
            elif kind == "streams":
                assert ("", "chat") not in B.broker.subscribed
            else:
                assert len(hub.routes[channel_name(prefix, ("", "chat"))]) == 1
            before = B.broker.stats()["received"]
            await a1.send(json.dumps({"pub": "chat", "text": "after-leave"}))
            assert await drain(a2, 1) == ["after-leave"]
            # a direct message over the same publisher link is a barrier
            assert await A.bridge.send_to(b1.gid, "ping") is True
            assert await drain(b1, 1) == ["ping"]
            assert B.broker.stats()["received"] == before + 1   # only the direct message
        finally:
            for ws in clients:
                await ws.close()
            for nd in nodes:
                await nd.stop()
            if hub is not None:
                await hub.close()
            if kind == "streams":
                await delete_keys(prefix)

    run(main(), 60)


async def http(port, method, path, body=b"", headers=(), content_length=None):
    r, w = await asyncio.open_connection("127.0.0.1", port)
    head = [f"{method} {path} HTTP/1.1", "Host: x",
            f"Content-Length: {len(body) if content_length is None else content_length}"]
    head += [f"{k}: {v}" for k, v in headers]
    w.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
    try:
        data = await asyncio.wait_for(r.read(), 10)
    finally:
        w.close()
    status = int(data.split(b" ", 2)[1])
    return status, data.partition(b"\r\n\r\n")[2]


def test_http_publish_api_and_send_to_across_nodes():
    need_redis()

    async def main():
        nodes, _, _ = await make_nodes("redis", REDIS_URL, 2)
        A, B = nodes
        publish_api.register(A.server, A.bridge, TOKEN)
        auth = [("Authorization", f"Bearer {TOKEN}")]
        js = auth + [("Content-Type", "application/json")]
        port = A.server.port
        a1 = await A.client("news")
        b1 = await B.client("news")
        try:
            await settle(A, B)
            assert (await http(port, "POST", "/publish", b'{"room":"news","text":"x"}'))[0] == 401
            assert (await http(port, "POST", "/publish", b'{"room":"news","text":"x"}',
                               [("Authorization", "Bearer wrong")]))[0] == 401
            st, body = await http(port, "POST", "/publish", b'{"room":"news","text":"http-1"}', js)
            assert st == 200 and json.loads(body) == {"seq": 1, "remote": True}
            st, _ = await http(port, "POST", "/publish",
                               json.dumps({"room": "news", "base64": base64.b64encode(b"\x01\x02").decode()}).encode(), js)
            assert st == 200
            st, _ = await http(port, "POST", "/publish?room=news", "raw ✓".encode(), auth)
            assert st == 200
            assert (await http(port, "POST", "/publish", b'{"text":"no room"}', js))[0] == 400
            assert (await http(port, "POST", "/publish", b"", js, content_length=1 << 20))[0] == 413
            for ws in (a1, b1):
                assert await drain(ws, 3) == ["http-1", b"\x01\x02", "raw ✓"]

            # one connection, on the other node
            assert b1.gid.startswith(B.broker.node_id + ":")
            st, _ = await http(port, "POST", f"/connections?id={b1.gid}", b"just b1", auth)
            assert st == 200
            assert await drain(b1, 1) == ["just b1"]
            await nothing_more(a1)
            st, _ = await http(port, "POST", f"/connections?id={a1.gid}", b"just a1", auth)
            assert st == 200 and await drain(a1, 1) == ["just a1"]
            for bad in (f"{B.broker.node_id}:999999", "no-such-node:1", "garbage"):
                assert (await http(port, "POST", f"/connections?id={bad}", b"x", auth))[0] == 404
            assert (await http(port, "POST", f"/connections?id={b1.gid}", b"x"))[0] == 401
            # the bridge API directly
            assert await B.bridge.send_to(a1.gid, b"\x00bytes") is True
            assert await drain(a1, 1) == [b"\x00bytes"]
        finally:
            for ws in (a1, b1):
                await ws.close()
            for nd in nodes:
                await nd.stop()

    run(main(), 60)


def test_presence_across_nodes_and_expiry_of_a_crashed_node():
    need_redis()

    async def main():
        nodes, _, prefix = await make_nodes("redis", REDIS_URL, 2)
        A, B = nodes
        clients = []
        pa = Presence(presence_client(REDIS_URL), A.broker.node_id, prefix=prefix, ttl=1.0)
        pb = Presence(presence_client(REDIS_URL), B.broker.node_id, prefix=prefix, ttl=1.0)
        pa.attach(A.server.rooms, A.bridge.global_id)
        pb.attach(B.server.rooms, B.bridge.global_id)
        try:
            a1 = await A.client("lobby", user="alice")
            a2 = await A.client("lobby")
            b1 = await B.client("lobby", user="bob")
            clients += [a1, a2, b1]
            await pa.sync()
            await pb.sync()
            assert await pa.count("lobby") == 3
            assert await pb.members("lobby") == {a1.gid: "alice", a2.gid: "", b1.gid: "bob"}
            assert await pa.users("lobby") == {"alice", "bob"}
            assert await pa.count("nobody-here") == 0
            # a member leaves: written at the next sync
            await a2.close()
            await wait_for(lambda: A.server.rooms.count("lobby") == 1, 5, "a2 gone")
            await pa.sync()
            assert set(await pb.members("lobby")) == {a1.gid, b1.gid}
            # B "crashes": it stops refreshing; its members vanish within the TTL
            await asyncio.sleep(1.2)
            await pa.sync(force_refresh=True)
            assert await pa.members("lobby") == {a1.gid: "alice"}
            # a clean shutdown removes a node's entries at once
            await pa.close()
            assert await pb.count("lobby") == 0
        finally:
            for ws in clients:
                await ws.close()
            await pa.client.aclose()
            await pb.client.aclose()
            for nd in nodes:
                await nd.stop()

    run(main(), 60)
