"""Nodes wired by the bridge: real fastws servers in-process, real
`websockets` clients, a real broker (Redis pub/sub, Redis Streams, or the
embedded hub).

Each node is a ``fastws.server.NativeServer`` on a free port with its own rooms
(``server.node.rooms``) wired to its own broker by a ``Bridge``; the clients speak
JSON commands to /room (join, leave, pub, bin).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import tempfile

import pytest
import websockets

import fastws
from brokerutil import REDIS_URL, STREAMS_URL, delete_keys, need_redis, new_prefix, run, wait_for
from fastws import publish_api
from fastws.broker import channel_name, create_broker, wire
from fastws.broker.bridge import Bridge
from fastws.broker.embedded import EmbeddedRelay
from fastws.config import Config
from fastws.frames import BINARY
from fastws.presence import Presence, presence_client
from fastws.resume import Resumer
from fastws.server import NativeServer

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
            conn.send(json.dumps({"joined": cmd["join"], "gid": bridge.global_id(conn)}))
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

    async def start(self) -> Node:
        self.server = NativeServer(node_app(self.state), Config(host="127.0.0.1", port=0, max_message_size=1 << 16,
                                                                max_body_size=1 << 16, shutdown_timeout=1))
        await self.server.start()
        # the broker's node id is the hub's: connection ids are "<node_id>-<n>"
        self.broker = create_broker(self.url, prefix=self.prefix, node_id=self.server.node.node_id)
        self.bridge = self.state["bridge"] = Bridge(self.server.node.rooms, self.broker,
                                                    lookup=self.server.node.hub.connections.get)
        await self.bridge.start()
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
        await self.bridge.stop()
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
    prefix = new_prefix()
    hub = None
    if kind == "embedded":
        path = os.path.join(tempfile.mkdtemp(prefix="fws-"), "hub.sock")
        hub = EmbeddedRelay(path)
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
        A.server.node.bridge = A.bridge          # the node's publish API goes through it
        publish_api.register(A.server.node, TOKEN)
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
            body = {"room": "news", "base64": base64.b64encode(b"\x01\x02").decode()}
            st, _ = await http(port, "POST", "/publish", json.dumps(body).encode(), js)
            assert st == 200
            # a JSON body whatever the Content-Type (curl -d sends a form type)
            form = auth + [("Content-Type", "application/x-www-form-urlencoded")]
            st, _ = await http(port, "POST", "/publish", '{"room":"news","text":"form ✓"}'.encode(), form)
            assert st == 200
            assert (await http(port, "POST", "/publish", b'{"text":"no room"}', js))[0] == 400
            assert (await http(port, "POST", "/publish?room=news", b"raw text", auth))[0] == 400
            assert (await http(port, "POST", "/publish", b"", js, content_length=1 << 20))[0] == 413
            for ws in (a1, b1):
                assert await drain(ws, 3) == ["http-1", b"\x01\x02", "form ✓"]

            # one connection, on the other node: the text itself, not the JSON
            assert b1.gid.startswith(B.broker.node_id + "-")
            st, _ = await http(port, "POST", f"/connections?id={b1.gid}", b'{"text": "just b1"}', auth)
            assert st == 200
            assert await drain(b1, 1) == ["just b1"]
            await nothing_more(a1)
            st, _ = await http(port, "POST", f"/connections/{a1.gid}", b'{"text": "just a1"}', auth)
            assert st == 200 and await drain(a1, 1) == ["just a1"]
            for bad in (f"{B.broker.node_id}-999999", "no-such-node-1", "garbage"):
                assert (await http(port, "POST", f"/connections?id={bad}", b'{"text": "x"}', auth))[0] == 404
            assert (await http(port, "POST", f"/connections?id={b1.gid}", b'{"text": "x"}'))[0] == 401
            assert (await http(port, "POST", f"/connections?id={b1.gid}", b"not json", auth))[0] == 400
            # the bridge API directly
            assert await B.bridge.send_to(a1.gid, b"\x00bytes") is True
            assert await drain(a1, 1) == [b"\x00bytes"]
            # DELETE /connections/{id} closes a connection on the other node (a CLOSE
            # payload through the broker) with the code and reason asked
            st, body = await http(port, "DELETE", f"/connections/{b1.gid}",
                                  b'{"code": 4003, "reason": "kicked"}', auth)
            assert st == 200 and json.loads(body)["closing"] is True
            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(b1.recv(), 10)
            assert (b1.close_code, b1.close_reason) == (4003, "kicked")
            assert (await http(port, "DELETE", f"/connections/{b1.gid}", b"", auth))[0] == 404
            assert (await http(port, "DELETE", f"/connections/{a1.gid}", b'{"code": 1005}', auth))[0] == 400
            assert B.bridge.counters["close_in"] == 2 and A.bridge.counters["close_out"] == 2   # closed, then 404
        finally:
            for ws in (a1, b1):
                await ws.close()
            for nd in nodes:
                await nd.stop()

    run(main(), 60)


def test_foreign_and_malformed_broker_messages_are_dropped_and_counted(cluster_of_nodes):
    """Another publisher on the broker (a foreign program, a broken node)
    sends payloads that are no bridge layout, a TEXT message that is not
    UTF-8, a room message on a node key, a truncated direct message, binary
    to a batching room: each is dropped and counted in the bridge's
    ``malformed``, the member's connection stays open and gets only the
    well-formed messages, byte for byte (text as text, binary as binary)."""
    kind, url = cluster_of_nodes

    async def main():
        nodes, hub, prefix = await make_nodes(kind, url, 1)
        (A,) = nodes
        foreign = create_broker(url if hub is None else "unix://" + hub.path, prefix=prefix, node_id="foreign")
        await foreign.start()
        a1 = await A.client("chat")
        try:
            await settle(A)
            chat, node = ("", "chat"), A.broker.node_id
            for key, payload in [
                    (chat, bytes([wire.ROOM, 0]) + b"\xff\xfe not utf-8"),   # TEXT, not UTF-8
                    (chat, b"\x01"),                                          # shorter than the head
                    (chat, bytes([9, 0]) + b"x"),                              # no such kind
                    (node, wire.pack_room_message("room message on a node key")),
                    (node, wire.pack_direct(5, 1, "x")[:9]),                   # truncated DIRECT
                    (chat, wire.pack_room_message("ok ✓")),
                    (chat, wire.pack_room(BINARY, b"\x00\xffbin"))]:
                await foreign.publish(key, payload)
            assert await drain(a1, 2) == ["ok ✓", b"\x00\xffbin"]
            await nothing_more(a1)
            assert A.bridge.counters["malformed"] == 5 and A.bridge.counters["received"] == 2
            # a batching room decodes remote text into its batch; binary cannot go there
            A.server.node.rooms.set_batching("chat", max_batch=2, max_delay=0.05)
            await foreign.publish(chat, wire.pack_room(BINARY, b"\x01"))
            await foreign.publish(chat, wire.pack_room_message("b1"))
            await foreign.publish(chat, wire.pack_room_message("b2"))
            assert await drain(a1, 2) == ["b1", "b2"]
            assert A.bridge.counters["malformed"] == 6
            await a1.send(json.dumps({"leave": "chat"}))          # still open and served
            assert json.loads(await a1.recv()) == {"left": "chat"}
        finally:
            await a1.close()
            await foreign.close()
            for nd in nodes:
                await nd.stop()
            if hub is not None:
                await hub.close()
            if kind == "streams":
                await delete_keys(prefix)

    run(main(), 60)


def test_bridge_start_stop_and_lookup():
    """``start()`` starts the broker unless it runs and subscribes the rooms
    that already have members; ``stop()`` stops following the rooms (the
    broker stays open); ``send_to`` finds connections only through
    ``lookup``."""
    need_redis()

    async def main():
        nodes, _, prefix = await make_nodes("redis", REDIS_URL, 2)
        A, B = nodes
        a1 = await A.client("late")
        b1 = await B.client("late")
        try:
            await settle(A, B)
            await A.bridge.stop()
            assert A.broker.state == "connected"               # the broker stays open
            await b1.send(json.dumps({"pub": "late", "text": "while stopped"}))
            assert await drain(b1, 1) == ["while stopped"]      # B's own member, locally
            await nothing_more(a1, 0.3)                         # A has no handler now
            # a new bridge over the same (running) broker and rooms
            looked = []

            def lookup(cid):
                looked.append(cid)
                return A.server.node.hub.connections.get(cid)

            A.bridge = A.state["bridge"] = Bridge(A.server.node.rooms, A.broker, lookup=lookup)
            await A.bridge.start()
            await A.bridge.start()                              # a second start changes nothing
            assert await numsub(prefix, ("", "late")) == 2      # one subscription per node, not two
            await b1.send(json.dumps({"pub": "late", "text": "after"}))
            assert await drain(a1, 1) == ["after"]
            assert await B.bridge.send_to(a1.gid, "direct") is True
            assert await drain(a1, 1) == ["direct"]
            assert looked == [int(a1.gid.rpartition("-")[2])]
            assert await A.bridge.send_to(f"{A.broker.node_id}-123456", "x") is False
            assert await B.bridge.send_to(f"{A.broker.node_id}-{1 << 70}", "x") is False
        finally:
            for ws in (a1, b1):
                await ws.close()
            for nd in nodes:
                await nd.stop()

    run(main(), 60)


def test_resumer_needs_history_streams_ids_and_forgets_emptied_rooms():
    """``Resumer`` is built only over a broker with the History capability;
    a stream member gets the room's entries (the node's own and another
    node's) with their ids instead of the plain messages, and once the room
    has no member left on the node nothing of it stays in the resumer."""
    need_redis()

    async def main():
        pubsub, _, _ = await make_nodes("redis", REDIS_URL, 1)
        nodes, _, prefix = await make_nodes("streams", STREAMS_URL, 2)
        A, B = nodes
        try:
            assert Resumer.for_bridge(pubsub[0].server.node.rooms, pubsub[0].bridge) is None
            with pytest.raises(ValueError, match="history"):
                Resumer(pubsub[0].server.node.rooms, pubsub[0].bridge)
            resumer = Resumer.for_bridge(A.server.node.rooms, A.bridge)
            assert isinstance(resumer, Resumer)
            a1 = await A.client()
            plain = await A.client("r")
            b1 = await B.client("r")
            (conn,) = [c for c in A.server.node.hub.connections.values()
                       if c.rooms is None]                      # a1: in no room yet
            assert await resumer.resume(conn, "r") is True
            assert A.server.node.rooms.indirect_members(("", "r")) == {conn}
            await settle(A, B)
            await b1.send(json.dumps({"pub": "r", "text": "from-b"}))
            await plain.send(json.dumps({"pub": "r", "text": "from-a"}))
            got = [json.loads(m) for m in await drain(a1, 2)]
            assert sorted(m["data"] for m in got) == ["from-a", "from-b"]
            assert all(m["room"] == "r" and m["id"] for m in got)
            ids = [m["id"] for m in got]
            assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-"))))
            assert sorted(await drain(plain, 2)) == ["from-a", "from-b"]   # plain member: messages
            # a replay from the first id: exactly the second entry, then live ones
            a2 = await A.client()
            (conn2,) = [c for c in A.server.node.hub.connections.values() if c.rooms is None]
            assert await resumer.resume(conn2, "r", ids[0]) is True
            assert [json.loads(m)["id"] for m in await drain(a2, 1)] == ids[1:]
            await nothing_more(a2)
            assert resumer.stats()["rooms"] == 1
            for ws in (a1, a2, plain):
                await ws.close()
            await wait_for(lambda: A.server.node.rooms.count("r") == 0, 5, "the room to empty on A")
            assert resumer.stats()["rooms"] == 0 and resumer.stats()["replaying"] == 0
            resumer.close()
            await b1.close()
        finally:
            for nd in nodes + pubsub:
                await nd.stop()
            await delete_keys(prefix)

    run(main(), 60)


def test_presence_across_nodes_and_expiry_of_a_crashed_node():
    need_redis()

    async def main():
        nodes, _, prefix = await make_nodes("redis", REDIS_URL, 2)
        A, B = nodes
        clients = []
        pa = Presence(presence_client(REDIS_URL), A.broker.node_id, prefix=prefix, ttl=1.0)
        pb = Presence(presence_client(REDIS_URL), B.broker.node_id, prefix=prefix, ttl=1.0)
        pa.attach(A.server.node.rooms, A.bridge.global_id)
        pb.attach(B.server.node.rooms, B.bridge.global_id)
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
            await wait_for(lambda: A.server.node.rooms.count("lobby") == 1, 5, "a2 gone")
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
