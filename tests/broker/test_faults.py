"""Faults through a real TCP proxy between the broker and Redis (no mocks).

The proxy (brokerutil.TcpProxy) forwards bytes to 127.0.0.1:6379; ``cut()``
drops its connections and refuses new ones, ``restore()`` listens again,
``mode="blackhole"`` keeps the links open but forwards nothing. Each test
states exactly what was delivered and what was reported failed.
"""

from __future__ import annotations

import asyncio

import pytest
import websockets
from redis.crc import key_slot

import fastws
from brokerutil import (
    REDIS_HOST,
    REDIS_PORT,
    REDIS_URL,
    TcpProxy,
    need_redis,
    new_prefix,
    proxied_url,
    redis_cli,
    run,
    wait_for,
)
from fastws.broker import PublishError, channel_name, create_broker
from fastws.broker.bridge import Bridge
from fastws.broker.wire import pack_room_message
from fastws.config import Config
from fastws.server import NativeServer

K, K2, K3, END = ("", "k"), ("", "k2"), ("", "k3"), ("", "end")


class Inbox:
    def __init__(self, broker) -> None:
        self.got = []
        broker.set_handler(lambda k, p, o: self.got.append((k, p)))

    async def wait(self, n, timeout=10.0):
        await wait_for(lambda: len(self.got) >= n, timeout, f"{n} messages (have {self.got})")


def test_outage_failures_counted_reconnect_and_resubscribe():
    need_redis()

    async def main():
        proxy = await TcpProxy(REDIS_HOST, REDIS_PORT).start()
        prefix = new_prefix()
        a = create_broker(REDIS_URL, prefix=prefix, node_id="A")                    # direct
        b = create_broker(proxied_url(proxy), prefix=prefix, node_id="B",
                          backoff_min=0.05, backoff_max=0.3)                          # via the proxy
        states = []
        b.state_listeners.append(states.append)
        await a.start()
        await b.start()
        ia, ib = Inbox(a), Inbox(b)
        try:
            await a.subscribe([K, END])
            await b.subscribe([K, K3, END])
            await a.publish(K, b"m1")
            await b.publish(K, b"b1")
            await ib.wait(1)
            await ia.wait(1)

            states.clear()
            await proxy.cut()
            await wait_for(lambda: b.state != "connected", 5, "B to notice the cut")
            for m in (b"b2", b"b3"):
                with pytest.raises(PublishError):
                    await b.publish(K, m)
            assert b.publish_nowait(K, b"b4") is None          # the sync path reports it too
            await b.subscribe([K2])                            # interest recorded while down ...
            await b.unsubscribe([K3])                          # ... and dropped while down
            await a.publish(K, b"m2")                          # B is away: pub/sub keeps no history
            s = b.stats()
            assert (s["publishes"], s["failures"], s["reconnects"]) == (4, 3, 0)

            await proxy.restore()
            await wait_for(lambda: b.state == "connected", 10, "B to reconnect by itself")
            assert b.stats()["reconnects"] == 1
            assert states[0] == "disconnected" and states[-1] == "connected"
            await a.publish(K, b"m3")
            await a.publish(K2, b"k2")
            await a.publish(K3, b"k3")                         # nobody subscribed any more
            await a.publish(END, b"end")                       # barrier (same publisher link)
            await b.publish(K, b"b5")
            await ib.wait(4)
            await ia.wait(2)
            await asyncio.sleep(0.05)
            # exactly: what was published while B was connected reached it; nothing else
            assert [p for _, p in ib.got] == [b"m1", b"m3", b"k2", b"end"]
            assert [p for _, p in ia.got] == [b"b1", b"b5"]
            s = b.stats()
            assert (s["publishes"], s["failures"], s["subscribed"]) == (5, 3, 3)   # K, K2, END
            import redis.asyncio as aioredis
            r = aioredis.from_url(REDIS_URL)
            counts = dict(await r.pubsub_numsub(*(channel_name(prefix, k) for k in (K, K2, K3))))
            await r.aclose()
            assert list(counts.values()) == [2, 1, 0]
        finally:
            await a.close()
            await b.close()
            await proxy.close()

    run(main(), 40)


def test_reconnect_attempts_back_off():
    need_redis()

    async def main():
        proxy = await TcpProxy(REDIS_HOST, REDIS_PORT).start()
        b = create_broker(proxied_url(proxy), prefix=new_prefix(),
                          backoff_min=0.05, backoff_max=0.4)
        await b.start()
        try:
            proxy.mode = "reject"                       # accept and close: every attempt is counted
            await proxy.cut()
            await proxy.restore()
            proxy.mode = "reject"
            proxy.accepted = 0
            await asyncio.sleep(2.0)
            # 0.05, 0.1, 0.2, 0.4, 0.4 ... with jitter in [d/2, d]: between 5 and ~25 tries
            # (2 connections per try), never a busy loop
            assert 4 <= proxy.accepted <= 60, proxy.accepted
            assert b.state in ("disconnected", "connecting")
            proxy.mode = "forward"
            await wait_for(lambda: b.state == "connected", 5, "reconnect")
        finally:
            await b.close()
            await proxy.close()

    run(main(), 30)


def test_silent_link_detected_by_ping():
    need_redis()

    async def main():
        proxy = await TcpProxy(REDIS_HOST, REDIS_PORT).start()
        b = create_broker(proxied_url(proxy), prefix=new_prefix(),
                          ping_interval=0.2, backoff_min=0.05, backoff_max=0.2)
        await b.start()
        try:
            proxy.mode = "blackhole"                    # links stay open, nothing comes back
            await wait_for(lambda: b.state != "connected", 5, "the silent link to be noticed")
            proxy.mode = "forward"
            await proxy.cut()                           # drop the black-holed links
            await proxy.restore()
            await wait_for(lambda: b.state == "connected", 5, "reconnect")
            assert b.stats()["reconnects"] == 1
        finally:
            await b.close()
            await proxy.close()

    run(main(), 30)


def test_local_delivery_goes_on_when_redis_is_away():
    need_redis()

    async def main():
        proxy = await TcpProxy(REDIS_HOST, REDIS_PORT).start()
        prefix = new_prefix()
        app = fastws.App()

        @app.on_message("/")
        def join(conn, data):
            conn.join(data)
            conn.send("joined")

        server = NativeServer(app, Config(host="127.0.0.1", port=0, shutdown_timeout=1))
        await server.start()
        bridge = Bridge(server.node.rooms, create_broker(proxied_url(proxy), prefix=prefix,
                                                    backoff_min=0.05, backoff_max=0.2),
                        lookup=server.node.hub.connections.get)
        await bridge.start()
        other = create_broker(REDIS_URL, prefix=prefix)     # another node, straight to Redis
        await other.start()
        ws = await websockets.connect(f"ws://127.0.0.1:{server.port}/")
        try:
            await ws.send("room")
            assert await ws.recv() == "joined"
            await bridge.sync()
            assert await bridge.publish("room", "before") == (1, True)
            await proxy.cut()
            await wait_for(lambda: bridge.broker.state != "connected", 5, "the cut to be noticed")
            assert await bridge.publish("room", "during") == (2, False)   # local yes, remote no
            assert bridge.counters["remote_failures"] == 1
            await proxy.restore()
            await wait_for(lambda: bridge.broker.state == "connected", 10, "reconnect")
            # re-subscribed by itself: another node's message reaches the local member
            await other.publish(("", "room"), pack_room_message("from-other"))
            assert [await asyncio.wait_for(ws.recv(), 5) for _ in range(3)] == \
                ["before", "during", "from-other"]
        finally:
            await ws.close()
            await bridge.stop()
            await bridge.broker.close()
            await other.close()
            await server.shutdown()
            await proxy.close()

    run(main(), 40)


def test_cluster_follows_a_slot_move(redis_cluster):
    """Move the slot of a subscribed channel to another master: the server
    drops the subscription (sunsubscribe), the broker re-reads the map and
    re-subscribes on the new owner; publishes follow MOVED."""
    url = "redis+cluster://" + ",".join(f"{h}:{p}" for h, p in redis_cluster)
    ports = [p for _, p in redis_cluster]

    async def main():
        prefix = new_prefix()
        a = create_broker(url, prefix=prefix, node_id="A", refresh_interval=30)
        b = create_broker(url, prefix=prefix, node_id="B", refresh_interval=30)
        await a.start()
        await b.start()
        ib = Inbox(b)
        ch = channel_name(prefix, K)
        slot = key_slot(ch)
        ids = {p: redis_cli(p, "CLUSTER", "MYID").strip() for p in ports}
        src = next(p for p in ports if _owns(p, slot))
        dst = next(p for p in ports if p != src)
        try:
            await b.subscribe([K])
            await a.publish(K, b"before")
            await ib.wait(1)
            _move(slot, src, dst, ids, ports)
            try:
                await wait_for(lambda: b._assigned.get(ch) == ("127.0.0.1", dst), 10,
                               "re-subscription on the new owner")
                await a.publish(K, b"after")               # A's map is stale: MOVED, followed
                await ib.wait(2)
                assert [p for _, p in ib.got] == [b"before", b"after"]
                assert a.stats()["failures"] == 0
            finally:
                _move(slot, dst, src, ids, ports)
        finally:
            await a.close()
            await b.close()

    run(main(), 40)


def _owns(port, slot) -> bool:
    for line in redis_cli(port, "CLUSTER", "NODES").splitlines():
        f = line.split()
        if "myself" in f[2]:
            for r in f[8:]:
                lo, _, hi = r.partition("-")
                if lo.isdigit() and int(lo) <= slot <= int(hi or lo):
                    return True
    return False


def _move(slot, src, dst, ids, ports) -> None:
    redis_cli(dst, "CLUSTER", "SETSLOT", slot, "IMPORTING", ids[src])
    redis_cli(src, "CLUSTER", "SETSLOT", slot, "MIGRATING", ids[dst])
    for p in (dst, src, *[q for q in ports if q not in (src, dst)]):
        redis_cli(p, "CLUSTER", "SETSLOT", slot, "NODE", ids[dst])
