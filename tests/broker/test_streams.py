"""What the Redis Streams broker adds to the contract (test_contract.py runs
the contract over it too): no loss across a short outage (through a real TCP
proxy, as in test_faults.py), bounded history, interest-based reading
(watched with MONITOR), prompt subscription changes with and without
``CLIENT UNBLOCK``, order across rooms per publisher.

Every test uses its own prefix and deletes the keys it created.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import random
import re
import time
import uuid

import pytest
import redis.asyncio as aioredis

from brokerutil import (
    REDIS_HOST,
    REDIS_PORT,
    REDIS_URL,
    STREAMS_URL,
    OwnRedis,
    TcpProxy,
    delete_keys,
    need_redis,
    new_prefix,
    proxied_url,
    run,
    wait_for,
)
from fastws.broker import PublishError, channel_name, create_broker
from fastws.broker.streams import _merge
from fastws.broker.wire import pack_room_message, parse_id, room_message

K, K2, K3, END = ("", "k"), ("", "k2"), ("", "k3"), ("", "end")


class Inbox:
    def __init__(self, broker) -> None:
        self.got = []
        broker.set_handler(lambda k, p, o: self.got.append((k, p)))

    def payloads(self, key=None):
        return [p for k, p in self.got if key is None or k == key]

    async def wait(self, n, timeout=10.0):
        await wait_for(lambda: len(self.got) >= n, timeout, f"{n} messages (have {self.got[-5:]})")


def streams(prefix, **opts):
    return create_broker(STREAMS_URL, prefix=prefix, **opts)


def scenario(body, timeout=60):
    """Run ``body(prefix, brokers)``; close every broker it started and delete
    the prefix's keys afterwards."""
    need_redis()

    async def main():
        prefix = new_prefix()
        brokers = []
        try:
            await body(prefix, brokers)
        finally:
            for b in brokers:
                await b.close()
            await delete_keys(prefix)
        assert await delete_keys(prefix) == 0

    run(main(), timeout)


async def started(brokers, b):
    await b.start()
    brokers.append(b)
    assert b.state == "connected"
    return b


def test_no_loss_across_a_short_outage():
    """B loses Redis (the proxy drops the links and refuses new ones) while A
    goes on publishing: B's publishes fail and are counted, and once B is
    back it delivers what A published meanwhile, in order, exactly once."""
    async def body(prefix, brokers):
        proxy = await TcpProxy(REDIS_HOST, REDIS_PORT).start()
        try:
            a = await started(brokers, streams(prefix, node_id="A"))
            b = await started(brokers, create_broker(proxied_url(proxy, "redis+streams"), prefix=prefix,
                                                     node_id="B", backoff_min=0.05, backoff_max=0.3))
            states = []
            b.state_listeners.append(states.append)
            ia, ib = Inbox(a), Inbox(b)
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
            assert b.publish_nowait(K, b"b4") is None
            await b.subscribe([K2])                       # interest recorded while down ...
            await b.unsubscribe([K3])                     # ... and dropped while down
            for m in (b"m2", b"m3", b"m4"):
                await a.publish(K, m)                     # B is away: the stream keeps them
            await a.publish(K2, b"k2-early")              # before B's interest in K2 took effect
            await a.publish(K3, b"k3")                    # B no longer wants K3
            s = b.stats()
            assert (s["publishes"], s["failures"], s["reconnects"]) == (4, 3, 0)
            assert ib.got == [(K, b"m1")]

            await proxy.restore()
            await wait_for(lambda: b.state == "connected", 10, "B to reconnect by itself")
            assert b.stats()["reconnects"] == 1
            assert states[0] == "disconnected" and states[-1] == "connected"
            await a.publish(K, b"m5")
            await a.publish(K2, b"k2")
            await a.publish(K3, b"k3-late")
            await a.publish(END, b"end")
            await b.publish(K, b"b5")
            await ib.wait(6)
            await ia.wait(2)
            await asyncio.sleep(0.1)
            # exactly: m2..m4, published while B was away, arrive after the reconnect, in order
            assert ib.payloads() == [b"m1", b"m2", b"m3", b"m4", b"m5", b"k2", b"end"]
            assert ia.payloads() == [b"b1", b"b5"]
            s = b.stats()
            assert (s["publishes"], s["failures"], s["subscribed"], s["received"]) == (5, 3, 3, 7)
        finally:
            await proxy.close()

    scenario(body)


def test_an_outage_logs_its_lines_and_no_task_traceback(caplog):
    """Two Redis outages (the proxy drops the links and refuses new ones)
    while the node reads several streams: the log says "lost the broker"
    and "broker reconnected" once per outage, with no traceback at all, in
    particular no "Task exception was never retrieved" for the stream
    reader that ended with the link; publishing works again after each."""
    caplog.set_level(logging.DEBUG)

    async def body(prefix, brokers):
        proxy = await TcpProxy(REDIS_HOST, REDIS_PORT).start()
        try:
            b = await started(brokers, create_broker(proxied_url(proxy, "redis+streams"), prefix=prefix,
                                                     node_id="B", backoff_min=0.05, backoff_max=0.2,
                                                     ping_interval=0.5))
            ib = Inbox(b)
            await b.subscribe([K, K2, K3])
            a = await started(brokers, streams(prefix, node_id="A"))
            for outage in range(2):
                # the reader's link (the newest) goes first: its XREAD fails before
                # the node notices the lost link
                await proxy.cut(newest_first=True)
                await wait_for(lambda: b.state != "connected", 5, "B to notice the cut")
                await asyncio.sleep(0.6)              # a few failed reconnects, reads and pings
                gc.collect()                          # a task that lost its exception says so when collected
                await proxy.restore()
                await wait_for(lambda: b.state == "connected", 10, "B to reconnect")
                await a.publish(K, b"after %d" % outage)
                await ib.wait(outage + 1)
            assert ib.payloads() == [b"after 0", b"after 1"]
            assert b.stats()["reconnects"] == 2
            await b.close()                           # before the proxy goes: not a third outage
        finally:
            await proxy.close()

    scenario(body)
    gc.collect()
    lines = [r for r in caplog.records if r.name.startswith(("fastws", "asyncio"))]
    text = "\n".join(r.getMessage() for r in lines)
    assert sum("lost the broker" in r.getMessage() for r in lines) == 2, text
    assert sum("broker reconnected" in r.getMessage() for r in lines) == 2, text
    assert "never retrieved" not in text
    tracebacks = [r for r in lines if r.exc_info or r.levelno >= logging.ERROR]
    assert not tracebacks, [(r.name, r.getMessage()) for r in tracebacks]


def test_outage_longer_than_the_stream_keeps():
    """More than ``maxlen`` entries published while B is away: B gets the
    newest ones the stream still holds, in order, none twice, then goes on."""
    async def body(prefix, brokers):
        proxy = await TcpProxy(REDIS_HOST, REDIS_PORT).start()
        try:
            a = await started(brokers, streams(prefix, node_id="A", maxlen=20))
            b = await started(brokers, create_broker(proxied_url(proxy, "redis+streams"), prefix=prefix,
                                                     node_id="B", backoff_min=0.05, backoff_max=0.2, count=16))
            ib = Inbox(b)
            await b.subscribe([K])
            await a.publish(K, b"before")
            await ib.wait(1)
            await proxy.cut()
            await wait_for(lambda: b.state != "connected", 5, "B to notice the cut")
            futs = [a.publish_nowait(K, b"%d" % i) for i in range(500)]
            await asyncio.gather(*futs)
            await proxy.restore()
            await wait_for(lambda: b.state == "connected", 10, "reconnect")
            await wait_for(lambda: ib.got and ib.got[-1][1] == b"499", 10, "the last one")
            got = [int(p) for p in ib.payloads()[1:]]
            assert got == list(range(got[0], 500))            # a contiguous tail, in order, no duplicate
            xlen = await _redis(lambda r: r.xlen(channel_name(prefix, K)))
            assert len(got) == xlen and 20 <= len(got) <= 20 + await _node_max()
            await a.publish(K, b"after")
            await wait_for(lambda: ib.got[-1][1] == b"after", 5, "after")
        finally:
            await proxy.close()

    scenario(body)


def test_silent_reader_link_detected():
    async def body(prefix, brokers):
        proxy = await TcpProxy(REDIS_HOST, REDIS_PORT).start()
        try:
            b = await started(brokers, create_broker(
                proxied_url(proxy, "redis+streams"), prefix=prefix, ping_interval=0.2, block=0.2,
                backoff_min=0.05, backoff_max=0.2))
            await b.subscribe([K])
            proxy.mode = "blackhole"                      # links stay open, nothing comes back
            await wait_for(lambda: b.state != "connected", 5, "the silent link to be noticed")
            proxy.mode = "forward"
            await proxy.cut()
            await proxy.restore()
            await wait_for(lambda: b.state == "connected", 5, "reconnect")
            assert b.stats()["reconnects"] == 1
        finally:
            await proxy.close()

    scenario(body)


def test_history_bounded_by_maxlen():
    async def body(prefix, brokers):
        a = await started(brokers, streams(prefix, node_id="A", maxlen=50))
        ids = [r.decode() for r in await asyncio.gather(*[a.publish_nowait(K, b"m%d" % i) for i in range(1000)])]
        assert all(re.fullmatch(r"\d+-\d+", i) for i in ids)
        assert [parse_id(i) for i in ids] == sorted(parse_id(i) for i in ids)
        xlen = await _redis(lambda r: r.xlen(channel_name(prefix, K)))
        assert 50 <= xlen <= 50 + await _node_max()     # MAXLEN ~: at least maxlen, whole nodes trimmed

        h = await a.history(K, count=10)                  # the last 10, oldest first
        assert [e.payload for e in h] == [b"m%d" % i for i in range(990, 1000)]
        assert [e.id for e in h] == ids[990:] and {e.origin for e in h} == {"A"}
        assert h.complete is None
        assert [e.payload for e in await a.history(K, count=5000)] == \
            [b"m%d" % i for i in range(1000 - xlen, 1000)]

        h = await a.history(K, since_id=ids[995])         # what came after an id
        assert [e.payload for e in h] == [b"m996", b"m997", b"m998", b"m999"] and h.complete is True
        page = await a.history(K, since_id=ids[995], count=2)
        assert [e.payload for e in page] == [b"m996", b"m997"]
        page = await a.history(K, since_id=page[-1].id, count=2)
        assert [e.payload for e in page] == [b"m998", b"m999"]
        h = await a.history(K, since_id=ids[-1])
        assert h == [] and h.complete is True

        h = await a.history(K, since_id=ids[0])           # most of what followed it is trimmed away
        assert h.complete is False
        oldest = ids[1000 - xlen]                         # the oldest entry left: nothing after it is gone
        assert (await a.history(K, since_id=oldest, count=1)).complete is True
        assert [e.payload for e in h] == [b"m%d" % i for i in range(1000 - xlen, min(1000, 1000 - xlen + 100))]

        assert await a.history(("", "nothing")) == []
        h = await a.history(("", "nothing"), since_id="0-0")
        assert h == [] and h.complete is None             # no stream: cannot tell
        assert await delete_keys(prefix) == 1             # one stream, nothing else

        # a payload the bridge published comes back as its message
        await a.publish(K2, pack_room_message("héllo"))
        await a.publish(K2, pack_room_message(b"\x00\xff"))
        assert [room_message(e.payload) for e in await a.history(K2)] == ["héllo", b"\x00\xff"]
        h = await a.history(K2, since_id="0")             # from the start of a stream never trimmed
        assert len(h) == 2 and h.complete is True
        assert room_message(b"\x02\x00xx") is None and room_message(b"") is None

    scenario(body)


def test_subscribe_starts_at_the_end_and_publish_returns_the_id():
    async def body(prefix, brokers):
        a = await started(brokers, streams(prefix, node_id="A"))
        b = await started(brokers, streams(prefix, node_id="B"))
        for i in range(5):
            await a.publish(K, b"old%d" % i)
        seen = []
        b.set_handler(lambda k, p, o: seen.append((p, b.last_id(k))))
        await b.subscribe([K])                            # history is for history(): not replayed
        assert b.last_id(K) == (await b.history(K, count=1))[0].id
        eid = await a.publish(K, b"new")
        await wait_for(lambda: seen, 5, "new")
        assert seen == [(b"new", eid)]                    # last_id during the handler: that entry's
        assert b.last_id(K2) is None
        await b.subscribe([K])                            # again: keeps its position
        assert b.last_id(K) == eid
        first = asyncio.ensure_future(b.subscribe([K3]))
        for _ in range(3):
            await asyncio.sleep(0)                        # its XREVRANGE is out ...
        await b.subscribe([K3])                           # ... this one waits for it
        assert b.last_id(K3) == "0-0"                     # no stream yet: from its start
        await first

    scenario(body)


def test_a_node_without_local_members_reads_nothing_for_the_room():
    """Watched on the Redis side (MONITOR): C's reader never names the
    room's stream while C has no interest in it, and stops naming it once C
    unsubscribed."""
    async def body(prefix, brokers):
        room = ("", "room")
        a = await started(brokers, streams(prefix, node_id="A"))
        b = await started(brokers, streams(prefix, node_id="B"))
        c = await started(brokers, streams(prefix, node_id="C", block=0.2))
        ib, ic = Inbox(b), Inbox(c)
        await b.subscribe([room, END])
        await c.subscribe([END])
        key = channel_name(prefix, room).decode()
        port = str(c._sub.transport.get_extra_info("sockname")[1])      # C's reader connection
        mon = _Monitor()
        await mon.start(lambda cmd: cmd["client_port"] == port and cmd["command"].startswith("XREAD"))
        try:
            await wait_for(lambda: len(mon.seen) >= 2, 5, "C's reads")
            for i in range(5):
                await a.publish(room, b"r%d" % i)
            await a.publish(END, b"end")
            await ib.wait(6)
            await ic.wait(1)
            await asyncio.sleep(0.5)                          # a few more of C's reads
            assert ic.payloads() == [b"end"]
            assert c.stats()["received"] == 1 and c.stats()["stray"] == 0
            assert not [m for m in mon.seen if key in m] and len(mon.seen) >= 3

            await c.subscribe([room])                          # a member joins on C ...
            await a.publish(room, b"for-c")
            await wait_for(lambda: ic.payloads()[-1:] == [b"for-c"], 5, "for-c")
            assert any(key in m for m in mon.seen)
            await c.unsubscribe([room])                        # ... and leaves
            await a.publish(room, b"late")                     # may wake a read that still had it
            n = len(mon.seen)
            await wait_for(lambda: len(mon.seen) >= n + 3, 5, "more of C's reads")
            assert key not in mon.seen[-1]
            await a.publish(END, b"end2")
            await wait_for(lambda: ic.payloads()[-1:] == [b"end2"], 5, "end2")
            assert b"late" not in ic.payloads()
        finally:
            await mon.stop()

    scenario(body)


def test_subscribe_during_a_long_block_is_prompt():
    async def body(prefix, brokers):
        a = await started(brokers, streams(prefix, node_id="A"))
        b = await started(brokers, streams(prefix, node_id="B", block=30))
        ib = Inbox(b)
        await b.subscribe([K])
        await asyncio.sleep(0.2)                              # B's XREAD is blocked on K
        await b.subscribe([K2])                               # interrupts it (CLIENT UNBLOCK)
        t0 = time.monotonic()
        await a.publish(K2, b"x")
        await ib.wait(1)
        assert time.monotonic() - t0 < 1.0
        assert ib.got == [(K2, b"x")]

    scenario(body)


def test_without_the_client_command_changes_apply_at_the_next_read():
    """An ACL without CLIENT: no UNBLOCK, so a new key joins the read set when
    the blocked XREAD returns (at most ``block``); nothing is lost.  The ACL
    user lives on a redis-server of the test's own (the shared one's users
    are never changed)."""
    own = OwnRedis()
    user, pw = "fastws-t" + uuid.uuid4().hex[:8], uuid.uuid4().hex
    assert own.cli("ACL", "SETUSER", user, "on", ">" + pw, "~*", "&*", "+@all", "-client").strip() == "OK"

    async def body(prefix, brokers):
        a = await started(brokers, create_broker(own.url.replace("redis://", "redis+streams://"),
                                                 prefix=prefix, node_id="A"))
        b = await started(brokers, create_broker(f"redis+streams://{user}:{pw}@127.0.0.1:{own.port}/0",
                                                 prefix=prefix, node_id="B", block=0.5))
        assert b._rd_id is None                               # CLIENT ID was refused
        ib = Inbox(b)
        await b.subscribe([K])
        await asyncio.sleep(0.1)
        await b.subscribe([K2])
        await a.publish(K2, b"x")                             # right after subscribe returned
        await a.publish(K, b"y")
        await ib.wait(2, timeout=3)
        assert ib.got == [(K2, b"x"), (K, b"y")]

    try:
        scenario(body)
    finally:
        own.stop()


def test_delivery_goes_on_while_rooms_keep_joining():
    """Every subscription change re-issues the read; a steady stream of them
    (a new room every few ms) neither stalls nor reorders delivery."""
    async def body(prefix, brokers):
        a = await started(brokers, streams(prefix, node_id="A"))
        b = await started(brokers, streams(prefix, node_id="B"))
        ib = Inbox(b)
        await b.subscribe([K])
        stop = asyncio.Event()

        async def churn():
            i = 0
            while not stop.is_set():
                await b.subscribe([("", f"j{i}")])
                i += 1
                await asyncio.sleep(0.002)
            return i

        joiner = asyncio.ensure_future(churn())
        sent = []
        for i in range(300):
            sent += [(K, b"%d" % i), (("", f"j{i // 3}"), b"j%d" % i)]
            await a.publish(K, b"%d" % i)
            await a.publish(("", f"j{i // 3}"), b"j%d" % i)   # rooms joined before or after this
            if i % 50 == 0:
                await asyncio.sleep(0.01)
        await a.publish(K, b"end")
        await wait_for(lambda: (K, b"end") in ib.got, 10, "end")
        stop.set()
        assert await joiner > 10
        assert ib.payloads(K) == [b"%d" % i for i in range(300)] + [b"end"]
        assert len(set(ib.got)) == len(ib.got)                 # nothing twice
        got = set(ib.got)
        assert [m for m in sent if m in got] == ib.got[:-1]    # in publish order, across rooms too

    scenario(body)


def test_order_across_rooms_per_publisher():
    """One publisher's messages to several rooms arrive in publish order,
    also when reads are cut short by ``count`` (small here)."""
    async def body(prefix, brokers):
        a = await started(brokers, streams(prefix, node_id="A"))
        r = await started(brokers, streams(prefix, node_id="R", count=7))
        rooms = [("", f"r{i}") for i in range(6)]
        ir = Inbox(r)
        await r.subscribe(rooms)
        rnd = random.Random(7)
        sent = []
        for i in range(600):
            k = rnd.choice(rooms)
            sent.append((k, b"%d" % i))
            if i % 3:
                a.publish_nowait(k, b"%d" % i)
            else:
                await a.publish(k, b"%d" % i)
        await ir.wait(600)
        assert ir.got == sent

    scenario(body)


def test_order_across_rooms_two_publishers():
    async def body(prefix, brokers):
        a = await started(brokers, streams(prefix, node_id="A"))
        b = await started(brokers, streams(prefix, node_id="B"))
        r = await started(brokers, streams(prefix, node_id="R"))
        rooms = [("", f"r{i}") for i in range(4)]
        got = []
        r.set_handler(lambda k, p, o: got.append((o, k, p)))
        await r.subscribe(rooms)
        rnd = random.Random(11)
        sent = {"A": [], "B": []}
        for i in range(400):
            for name, pub in (("A", a), ("B", b)):
                k = rnd.choice(rooms)
                sent[name].append((k, b"%d" % i))
                pub.publish_nowait(k, b"%d" % i)
        await wait_for(lambda: len(got) >= 800, 10, "800 messages")
        for name in ("A", "B"):
            assert [(k, p) for o, k, p in got if o == name] == sent[name]

    scenario(body)


def test_merge_keeps_a_publishers_order_within_one_millisecond():
    """P's entry to A got 1000-5 (A had other entries in that ms), its later
    entry to B got 1000-0: by id B's comes first, P's counter puts A's first."""
    def e(t, ch, origin, n):
        return (t, ch, b"%d-%d" % t, b"", origin, n)

    a = [e((1000, 4), b"A", b"Q", 1), e((1000, 5), b"A", b"P", 10)]
    b = [e((1000, 0), b"B", b"P", 11), e((1000, 1), b"B", b"Q", 2)]
    out = [(x[1], x[4], x[5]) for x in _merge([a, b])]
    assert out.index((b"A", b"P", 10)) < out.index((b"B", b"P", 11))
    assert out.index((b"A", b"Q", 1)) < out.index((b"B", b"Q", 2))
    # counters that contradict the streams (two nodes sharing an id) still deliver everything
    a = [e((1, 0), b"A", b"P", 2), e((2, 0), b"A", b"P", 1)]
    b = [e((1, 1), b"B", b"P", 3)]
    assert sorted(x[0] for x in _merge([a, b])) == [(1, 0), (1, 1), (2, 0)]
    assert _merge([]) == [] and _merge([[], a]) == a


def test_ttl_on_published_streams():
    async def body(prefix, brokers):
        a = await started(brokers, streams(prefix, node_id="A", ttl=60))
        b = await started(brokers, streams(prefix, node_id="B", ttl=0))
        await a.publish(K, b"x")
        await a.publish(K, b"y")
        await b.publish(K2, b"z")
        ttl_k = await _redis(lambda r: r.pttl(channel_name(prefix, K)))
        ttl_k2 = await _redis(lambda r: r.pttl(channel_name(prefix, K2)))
        assert 50_000 < ttl_k <= 60_000 and ttl_k2 == -1

    scenario(body)


# -- helpers -----------------------------------------------------------------------------


async def _redis(fn):
    r = aioredis.from_url(REDIS_URL)
    try:
        return await fn(r)
    finally:
        await r.aclose()


async def _node_max() -> int:
    """The server's stream-node-max-entries (read only)."""
    got = await _redis(lambda r: r.config_get("stream-node-max-entries"))
    return int(got.get("stream-node-max-entries", 100))


class _Monitor:
    """Redis MONITOR in the background: ``seen`` lists the commands ``want``s."""

    def __init__(self) -> None:
        self.seen: list = []
        self.task = None
        self.r = aioredis.from_url(REDIS_URL)

    async def start(self, want) -> None:
        ready = asyncio.get_running_loop().create_future()

        async def collect():
            async with self.r.monitor() as m:
                ready.set_result(None)
                async for cmd in m.listen():
                    if want(cmd):
                        self.seen.append(cmd["command"])

        self.task = asyncio.ensure_future(collect())
        await asyncio.wait_for(ready, 5)

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except (asyncio.CancelledError, Exception):
                pass
        try:
            await self.r.aclose()
        except Exception:
            pass
