"""The Broker contract, one suite for every backend (memory, embedded,
redis, streams, cluster): see the ``backend`` / ``make_broker`` fixtures.

"Nothing arrived" verdicts are made after a *barrier*: the same publisher
then publishes on a key the receiver is subscribed to and the test waits for
it; per-publisher order makes everything published before it arrive first
(on a cluster, channels live on different shards, so a short settle time is
added there).
"""

from __future__ import annotations

import asyncio

import pytest

from brokerutil import run, wait_for
from fastws.broker import Broker, PublishError, channel_name, create_broker

K = ("", "room")


def go(make_broker, body, timeout=45):
    async def main():
        try:
            await body()
        finally:
            await make_broker.cleanup()
    run(main(), timeout)


class Inbox:
    """A handler recording (key, payload, origin)."""

    def __init__(self, broker) -> None:
        self.got = []
        broker.set_handler(lambda k, p, o: self.got.append((k, p, o)))

    def payloads(self, key=None):
        return [p for k, p, _ in self.got if key is None or k == key]

    async def wait(self, n, timeout=10.0):
        await wait_for(lambda: len(self.got) >= n, timeout, f"{n} messages (have {len(self.got)})")


async def barrier(make_broker, pub, inbox, key=("", "barrier")):
    """Everything ``pub`` published before this call has arrived at ``inbox``'s broker.
    (Waits for the barrier itself, not for a count: a message published just
    before may still be on its way when this is called.)"""
    await pub.publish(key, b"barrier")
    await wait_for(lambda: any(p == b"barrier" for _, p, _ in inbox.got), 10, "the barrier")
    assert inbox.got[-1][1] == b"barrier"           # what came before it arrived before it
    inbox.got.pop()
    if make_broker.backend == "cluster":
        await asyncio.sleep(0.2)


def test_delivers_once_to_other_nodes_never_to_self(make_broker):
    async def body():
        a, b, c = await make_broker(node_id="A"), await make_broker(node_id="B"), await make_broker(node_id="C")
        ia, ib, ic = Inbox(a), Inbox(b), Inbox(c)
        await asyncio.gather(a.subscribe([K]), b.subscribe([K]), c.subscribe([K]))
        await a.publish(K, b"hello")
        await ib.wait(1)
        await ic.wait(1)
        await b.publish(K, b"from-b")
        await ia.wait(1)
        await ic.wait(2)
        await asyncio.sleep(0.05)
        assert ib.got == [(K, b"hello", "A")]
        assert ic.got == [(K, b"hello", "A"), (K, b"from-b", "B")]
        assert ia.got == [(K, b"from-b", "B")]           # its own "hello" was not delivered back
        assert a.stats()["publishes"] == 1 and a.stats()["failures"] == 0
    go(make_broker, body)


def test_interest_based_nothing_for_unsubscribed_keys(make_broker):
    async def body():
        a, b = await make_broker(node_id="A"), await make_broker(node_id="B")
        ib = Inbox(b)
        await b.subscribe([("", "wanted"), ("", "barrier")])
        for i in range(20):
            await a.publish(("", "other"), b"x%d" % i)
        await a.publish(("", "wanted"), b"yes")
        await barrier(make_broker, a, ib)
        assert ib.got == [(("", "wanted"), b"yes", "A")]
        assert b.stats()["received"] == 2 and b.stats()["stray"] == 0   # 'wanted' + the barrier
    go(make_broker, body)


def test_order_per_publisher(make_broker):
    async def body():
        a, b, r = await make_broker(node_id="A"), await make_broker(node_id="B"), await make_broker(node_id="R")
        ir = Inbox(r)
        await r.subscribe([K])
        n = 300
        for i in range(n):                        # interleaved: async and sync publishes, two publishers
            if i % 2:
                a.publish_nowait(K, b"a%d" % i)
            else:
                await a.publish(K, b"a%d" % i)
            b.publish_nowait(K, b"b%d" % i)
        await ir.wait(2 * n)
        got = ir.got
        assert [p for _, p, o in got if o == "A"] == [b"a%d" % i for i in range(n)]
        assert [p for _, p, o in got if o == "B"] == [b"b%d" % i for i in range(n)]
    go(make_broker, body)


def test_batched_subscribe_and_unsubscribe_of_many_keys(make_broker):
    async def body():
        a, b = await make_broker(node_id="A"), await make_broker(node_id="B")
        ib = Inbox(b)
        keys = [("ns", f"r{i}") for i in range(400)]
        await b.subscribe(keys + [("", "barrier")])
        assert b.stats()["subscribed"] == 401
        for k in keys:
            a.publish_nowait(k, k[1].encode())
        await ib.wait(400)
        assert sorted(ib.payloads()) == sorted(k[1].encode() for k in keys)
        ib.got.clear()
        await b.unsubscribe(keys)
        assert b.stats()["subscribed"] == 1
        for k in keys:
            await a.publish(k, b"late")
        await barrier(make_broker, a, ib)
        assert ib.got == []
    go(make_broker, body)


def test_unsubscribe_then_subscribe_again(make_broker):
    async def body():
        a, b = await make_broker(node_id="A"), await make_broker(node_id="B")
        ib = Inbox(b)
        await b.subscribe([K, ("", "barrier")])
        await a.publish(K, b"1")
        await ib.wait(1)
        await b.unsubscribe([K])                  # from now on nothing for K, even if in flight
        await b.unsubscribe([K])                  # twice: harmless
        await a.publish(K, b"2")
        await barrier(make_broker, a, ib)
        await b.subscribe([K])
        await a.publish(K, b"3")
        await ib.wait(2)
        assert ib.payloads(K) == [b"1", b"3"]
    go(make_broker, body)


def test_binary_payloads_and_unambiguous_keys(make_broker):
    async def body():
        a, b = await make_broker(node_id="A"), await make_broker(node_id="B")
        ib = Inbox(b)
        k1, k2 = ("a:b", "c"), ("a", "b:c")         # would collide with a naive "ns:name"
        k3 = ("/ns%3A", "ünï cødé ✓")
        await b.subscribe([k1, k3])
        blob = bytes(range(256)) * 4096            # 1 MiB, every byte value
        await a.publish(k2, b"wrong room")
        await a.publish(k1, blob)
        await a.publish(k3, b"")
        await ib.wait(2)
        await asyncio.sleep(0.1)
        # (two channels: on a cluster they may live on two shards, no order between them)
        assert sorted(ib.got) == sorted([(k1, blob, "A"), (k3, b"", "A")])
        assert channel_name("p", k1) != channel_name("p", k2)
    go(make_broker, body)


def test_prefixes_isolate(make_broker):
    async def body():
        a = await make_broker(node_id="A")
        b = await make_broker(node_id="B", prefix=make_broker.prefix + "-other")
        b2 = await make_broker(node_id="B2")
        ib, ib2 = Inbox(b), Inbox(b2)
        await asyncio.gather(b.subscribe([K]), b2.subscribe([K, ("", "barrier")]))
        await a.publish(K, b"same prefix only")
        await barrier(make_broker, a, ib2)
        assert ib2.payloads() == [b"same prefix only"]
        assert ib.got == []
    go(make_broker, body)


def test_node_keys(make_broker):
    async def body():
        a, b = await make_broker(node_id="A"), await make_broker(node_id="B")
        ib = Inbox(b)
        await b.subscribe([b.node_id])
        await a.publish("B", b"direct")
        await ib.wait(1)
        assert ib.got == [("B", b"direct", "A")]
    go(make_broker, body)


def test_state_stats_close(make_broker):
    async def body():
        a = await make_broker(node_id="A")
        assert isinstance(a, Broker)
        assert a.state == "connected"
        assert (await a.ping())[0] is True
        await a.subscribe([K, ("", "x")])
        s = a.stats()
        for field in ("publishes", "failures", "reconnects", "subscribed"):
            assert field in s
        assert s["subscribed"] == 2 and s["reconnects"] == 0 and s["node_id"] == "A"
        await a.close()
        assert a.state == "closed"
        with pytest.raises(PublishError):
            await a.publish(K, b"after close")
        assert a.stats()["failures"] == 1
        assert (await a.ping())[0] is False
    go(make_broker, body)


def test_create_broker_urls(tmp_path):
    from fastws.broker.cluster import ClusterBroker
    from fastws.broker.embedded import EmbeddedBroker
    from fastws.broker.memory import MemoryBroker
    from fastws.broker.redis import RedisBroker
    from fastws.broker.streams import StreamsBroker

    assert isinstance(create_broker(), MemoryBroker)
    assert isinstance(create_broker("memory://x"), MemoryBroker)
    r = create_broker("redis://:pw@10.0.0.1:6380/3", prefix="p")
    assert isinstance(r, RedisBroker) and r.prefix == "p"
    assert (r.conn_opts["host"], r.conn_opts["port"], r.conn_opts["db"], r.conn_opts["password"]) == \
        ("10.0.0.1", 6380, 3, "pw")
    assert create_broker("rediss://h:1/0").conn_opts["ssl"] is not None
    c = create_broker("redis+cluster://h1:7000,h2:7001")
    assert isinstance(c, ClusterBroker) and c.seeds == [("h1", 7000), ("h2", 7001)]
    st = create_broker("redis+streams://:pw@10.0.0.1:6380/3?maxlen=500&block=0.5", prefix="p", count=7)
    assert isinstance(st, StreamsBroker) and st.prefix == "p"
    assert (st.conn_opts["host"], st.conn_opts["port"], st.conn_opts["db"], st.conn_opts["password"]) == \
        ("10.0.0.1", 6380, 3, "pw")
    assert (st.maxlen, st.block, st.count, st.ttl) == (500, 0.5, 7, 86400.0)
    assert create_broker("redis+streams://h:1/0?maxlen=9", maxlen=5).maxlen == 5    # the keyword wins
    assert create_broker("rediss+streams://h:1/0").conn_opts["ssl"] is not None
    assert create_broker("redis+streams://h:1/0").conn_opts["ssl"] is None
    for bad in ("maxlen=0", "maxlen=x", "block=0", "count=-1", "ttl=-5"):
        with pytest.raises(ValueError):
            create_broker("redis+streams://h:1/0?" + bad)
    e = create_broker("unix:///tmp/x.sock")
    assert isinstance(e, EmbeddedBroker) and e.path == "/tmp/x.sock"
    assert isinstance(create_broker("fastws.broker.memory.MemoryBroker"), MemoryBroker)
    with pytest.raises(ValueError):
        create_broker("kafka://h:1")
    a, b = create_broker(), create_broker()
    assert a.node_id != b.node_id


def test_start_twice_changes_nothing_and_history_is_a_capability(make_broker):
    """A second ``start()`` (the bridge starts the broker it is given unless it
    runs) returns at once and leaves one working link (a second one would
    deliver every message twice); only the Streams backend has the History
    capability, and it says so by its type."""
    from fastws.broker import History

    async def body():
        a, b = await make_broker(node_id="A"), await make_broker(node_id="B")
        ia, ib = Inbox(a), Inbox(b)
        await asyncio.gather(a.subscribe([K, ("", "barrier")]), b.subscribe([K, ("", "barrier")]))
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await a.start()                            # a second link would deliver twice below
        assert loop.time() - t0 < 0.5
        assert a.state == "connected"
        await asyncio.sleep(0.2)
        await b.publish(K, b"to-a")
        await a.publish(K, b"to-b")
        await barrier(make_broker, b, ia)
        await barrier(make_broker, a, ib)
        assert ia.got == [(K, b"to-a", "B")] and ib.got == [(K, b"to-b", "A")]
        assert a.stats()["reconnects"] == 0 and a.stats()["failures"] == 0
        if make_broker.backend == "embedded":
            assert len(make_broker.state["hub"].links) == 2
        assert isinstance(a, History) is (make_broker.backend == "streams")
        if make_broker.backend == "streams":
            entries = await a.history(K, count=5)
            assert [(e.payload, e.origin) for e in entries] == [(b"to-a", "B"), (b"to-b", "A")]
    go(make_broker, body)
