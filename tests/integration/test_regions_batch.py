"""Regions: the batched link (several messages in one stream entry).

The records and batches themselves (no Redis), then a region's reader and
forwarder in this process against ``redis-server`` processes of their own
(never the shared one at 127.0.0.1:6379): a batch crossing twice, or two
batches overlapping, deliver each message once, in order; an inbound stream
holding entries of the former format (one message each) and batches is
delivered in order; many messages forwarded at once cross in fewer entries
than messages and arrive in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from fastws.broker.wire import channel_name, pack_room_message, unpack_envelope, unpack_room
from fastws.config import Config
from fastws.regions import Regions, inbound_messages, pack_batch, parse_record, record, unpack_batch
from regions_helpers import RedisProc

redis = pytest.importorskip("redis")


def test_record_round_trip() -> None:
    rec = record(b"r", 0, b"chat", b"room:1", b"payload\x00\xff")
    assert parse_record(rec) == (b"r", 0, b"chat", b"room:1", b"payload\x00\xff")
    assert parse_record(record(b"u", 1, b"", b"alice", b"")) == (b"u", 1, b"", b"alice", b"")


def test_batch_keeps_each_message_and_its_sequence() -> None:
    entries = [(b"1700000000000-0", [b"m", record(b"r", 0, b"", b"x", b"1")]),
               (b"1700000000000-1", [b"m", record(b"r", 0, b"", b"x", b"2")]),
               # an outbox entry of the former format (one message as fields)
               (b"1700000000001-0", [b"k", b"u", b"n", b"", b"t", b"bob", b"p", b"3", b"h", b"0"])]
    got = unpack_batch(pack_batch(entries))
    assert [seq for seq, _ in got] == [(1700000000000, 0), (1700000000000, 1), (1700000000001, 0)]
    assert [parse_record(r) for _, r in got] == [(b"r", 0, b"", b"x", b"1"), (b"r", 0, b"", b"x", b"2"),
                                                 (b"u", 0, b"", b"bob", b"3")]


def test_inbound_entry_either_format() -> None:
    blob = pack_batch([(b"5-0", [b"m", record(b"r", 0, b"ns", b"x", b"p")])])
    assert inbound_messages([b"o", b"a", b"b", blob]) == ("a", [((5, 0), record(b"r", 0, b"ns", b"x", b"p"))])
    old = [b"o", b"a", b"s", b"6-2", b"k", b"r", b"n", b"ns", b"t", b"x", b"p", b"q", b"h", b"0"]
    assert inbound_messages(old) == ("a", [((6, 2), record(b"r", 0, b"ns", b"x", b"q"))])


# -- against redis-server -------------------------------------------------------------------


@pytest.fixture
def two_redis() -> Iterator[tuple[RedisProc, RedisProc]]:
    a, b = RedisProc(), RedisProc()
    try:
        yield a, b
    finally:
        a.stop()
        b.stop()


def _regions(name: str, own: RedisProc, peer: str, other: RedisProc) -> Regions:
    config = Config(broker=own.url, region=name, region_peers=f"{peer}={other.url}")
    return Regions(config, f"node-{name}", lambda *a: None)


class _Sub:
    """A subscriber to one channel of a region's Redis: the room payloads it got."""

    def __init__(self, url: str, channel: bytes) -> None:
        self.client: Any = redis.asyncio.from_url(url)
        self.channel = channel
        self.got: list[bytes] = []

    async def start(self) -> None:
        self.pubsub = self.client.pubsub()
        await self.pubsub.subscribe(self.channel)
        self.task = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        while True:
            msg = await self.pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if msg is not None and msg["type"] == "message":
                env = unpack_envelope(msg["data"])
                assert env is not None and env[0] == b"region:a"
                self.got.append(unpack_room(env[1])[2])

    async def wait(self, n: int, timeout: float = 20.0) -> list[bytes]:
        deadline = time.monotonic() + timeout
        while len(self.got) < n:
            assert time.monotonic() < deadline, (len(self.got), n, self.got[-5:])
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)           # anything more would be a duplicate
        return list(self.got)

    async def close(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.pubsub.aclose()
        await self.client.aclose()


@contextlib.asynccontextmanager
async def _region_b(ra: RedisProc, rb: RedisProc) -> AsyncIterator[tuple[Regions, _Sub, Any, str]]:
    """Region b (not started: the test fills its inbound stream first), a
    subscriber to its room ``r``, a client of its Redis and the inbound key;
    all closed after the test."""
    b = _regions("b", rb, "a", ra)
    sub = _Sub(rb.url, channel_name("", ("", "r")))
    await sub.start()
    client = redis.asyncio.from_url(rb.url)
    try:
        yield b, sub, client, b.inbound_key("b")
    finally:
        await b.close()
        await sub.close()
        await client.aclose()


def _entry(seq: str, *payloads: bytes, room: bytes = b"r") -> list[Any]:
    """An outbox entry per payload, ids ``seq``-0, ``seq``-1, ..."""
    return [(f"{seq}-{i}".encode(), [b"m", record(b"r", 0, b"", room, pack_room_message(p))])
            for i, p in enumerate(payloads)]


@pytest.mark.timeout(60)
def test_batches_dedup_per_message_and_keep_order(two_redis: tuple[RedisProc, RedisProc]) -> None:
    """Into b's inbound stream: a batch (1-3), the same batch again (a resend
    after a lost answer), a batch overlapping it (3-5), an entry of the
    former format (6), a batch with 6 again and 7-8: b's room gets 1-8 once
    each, in order, and counts the copies."""
    ra, rb = two_redis

    async def main() -> None:
        async with _region_b(ra, rb) as (b, sub, client, key):
            first = _entry("1000", b"1", b"2", b"3")
            await client.xadd(key, {b"o": b"a", b"b": pack_batch(first)})
            await client.xadd(key, {b"o": b"a", b"b": pack_batch(first)})
            await client.xadd(key, {b"o": b"a", b"b": pack_batch(first[2:] + _entry("1001", b"4", b"5"))})
            await client.xadd(key, {b"o": b"a", b"s": b"1002-0", b"k": b"r", b"n": b"", b"t": b"r",
                                    b"p": pack_room_message(b"6"), b"h": b"0"})
            await client.xadd(key, {b"o": b"a", b"b": pack_batch(_entry("1002", b"6") + _entry("1003", b"7", b"8"))})
            await b.start()
            got = await sub.wait(8)
            assert got == [b"%d" % i for i in range(1, 9)]
            assert b.counters["duplicates"] == 3 + 1 + 1 and b.counters["received"] == 8
            assert await client.xlen(key) == 0                       # delivered entries are deleted
            assert await client.hget(b._key("b", "applied"), "a") == b"1003-1"

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_many_messages_cross_in_few_entries_in_order(two_redis: tuple[RedisProc, RedisProc]) -> None:
    """Region a forwards 3,000 room messages handed over at once: they reach
    b's inbound stream in fewer entries than messages, each message with its
    own sequence, in order; b's reader then delivers all 3,000 once, in
    order, and a's outbox is empty."""
    ra, rb = two_redis
    n = 3000

    async def main() -> None:
        a = _regions("a", ra, "b", rb)
        b = _regions("b", rb, "a", ra)
        client_b = redis.asyncio.from_url(rb.url)
        client_a = redis.asyncio.from_url(ra.url)
        key = a.inbound_key("b")
        await a.start()
        try:
            for i in range(n):
                a.forward_room("", "r", f"{i}")
            deadline = time.monotonic() + 20
            while await client_a.xlen(a.outbox_key("b")) or not await client_b.exists(key):
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            entries = await client_b.xrange(key)
            assert 0 < len(entries) < n
            messages = []
            for _eid, fields in entries:
                origin, msgs = inbound_messages([x for kv in fields.items() for x in kv])
                assert origin == "a"
                messages += msgs
            seqs = [seq for seq, _ in messages]
            assert seqs == sorted(set(seqs)) and len(seqs) == n
            assert [unpack_room(parse_record(r)[4])[2] for _, r in messages] == [b"%d" % i for i in range(n)]
            sub = _Sub(rb.url, channel_name("", ("", "r")))
            await sub.start()
            await b.start()
            try:
                assert await sub.wait(n) == [b"%d" % i for i in range(n)]
            finally:
                await sub.close()
        finally:
            await a.close()
            await b.close()
            await client_a.aclose()
            await client_b.aclose()

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_a_backlog_is_delivered_in_several_scripts_in_order(two_redis: tuple[RedisProc, RedisProc],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A backlog of 150 one-message entries of the former format, then a
    batch of 50, read while the reader delivers at most about 2 KB per
    script: all 200 arrive once, in order."""
    import fastws.regions

    monkeypatch.setattr(fastws.regions, "APPLY_BYTES", 2000)
    ra, rb = two_redis

    async def main() -> None:
        async with _region_b(ra, rb) as (b, sub, client, key):
            for i in range(150):
                await client.xadd(key, {b"o": b"a", b"s": f"2000-{i}".encode(), b"k": b"r", b"n": b"", b"t": b"r",
                                        b"p": pack_room_message(b"%d" % i), b"h": b"0"})
            batch = pack_batch(_entry("2001", *(b"%d" % i for i in range(150, 200))))
            await client.xadd(key, {b"o": b"a", b"b": batch})
            await b.start()
            assert await sub.wait(200) == [b"%d" % i for i in range(200)]
            assert b.counters["duplicates"] == 0 and await client.xlen(key) == 0

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_a_malformed_entry_is_dropped_and_counted(two_redis: tuple[RedisProc, RedisProc]) -> None:
    """An inbound entry that is no batch this module could have written (a
    truncated one) is deleted and counted as undeliverable; what follows is
    delivered."""
    ra, rb = two_redis

    async def main() -> None:
        async with _region_b(ra, rb) as (b, sub, client, key):
            await client.xadd(key, {b"o": b"a", b"b": pack_batch(_entry("3000", b"x"))[:-3]})
            await client.xadd(key, {b"o": b"a", b"b": pack_batch(_entry("3001", b"1", b"2"))})
            await b.start()
            assert await sub.wait(2) == [b"1", b"2"]
            assert b.counters["undeliverable"] == 1 and await client.xlen(key) == 0

    asyncio.run(main())


@contextlib.asynccontextmanager
async def _writing(a: Regions, own: RedisProc) -> AsyncIterator[Any]:
    """Region a's writer running (only it: no forwarder, no reader) and a
    client of a's Redis; both stopped, and ``a`` closed, after the test."""
    writer = asyncio.get_running_loop().create_task(a._writer())
    client = redis.asyncio.from_url(own.url)
    try:
        yield client
    finally:
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
        await a.close()
        await client.aclose()


async def _outbox(a: Regions, client: Any) -> list[bytes]:
    """The records in a's outbox for b, oldest first, once a's queue is empty."""
    deadline = time.monotonic() + 20
    while a._ops:
        assert time.monotonic() < deadline, len(a._ops)
        await asyncio.sleep(0.05)
    return [fields[b"m"] for _id, fields in await client.xrange(a.outbox_key("b"))]


@pytest.mark.timeout(60)
def test_a_full_write_queue_loses_nothing_it_did_not_drop(two_redis: tuple[RedisProc, RedisProc]) -> None:
    """The writer takes the first 10 queued messages and sends them; while
    it waits for Redis, 5 more come and the full queue (10) drops its 5
    oldest, which are among those in flight.  When the write succeeds, the
    writer takes out of the queue only what is still there of its batch:
    the 5 newer messages are written next, and the outbox holds all 15 in
    order (the 5 counted as dropped went out all the same)."""
    ra, rb = two_redis

    async def main() -> None:
        a = _regions("a", ra, "b", rb)
        a.buffer_max = 10
        recs = [record(b"r", 0, b"", b"r", pack_room_message(b"%d" % i)) for i in range(15)]
        for rec in recs[:10]:
            a._push("xadd", "b", rec)
        async with _writing(a, ra) as client:
            await asyncio.sleep(0)                 # it took its batch and waits for its connection
            for rec in recs[10:]:
                a._push("xadd", "b", rec)
            assert len(a._ops) == 10 and a.peers["b"].dropped["local"] == 5
            assert await _outbox(a, client) == recs

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_an_append_sent_again_after_a_timeout_is_not_appended_twice(two_redis: tuple[RedisProc, RedisProc]) -> None:
    """Region a's Redis is paused (``CLIENT PAUSE``) for longer than the
    writer waits for an answer: the writer's append is queued in Redis, the
    writer gives up on it and sends it again on the same connection, and
    once the pause ends Redis runs both.  The outbox holds each message
    once, in order (without the write numbers, it held the batch twice),
    and what was queued during the pause follows."""
    ra, rb = two_redis

    async def main() -> None:
        a = _regions("a", ra, "b", rb)
        recs = [record(b"r", 0, b"", b"r", pack_room_message(b"%d" % i)) for i in range(8)]
        async with _writing(a, ra) as client:
            a._push("xadd", "b", recs[0])          # the writer's connection is open and used
            deadline = time.monotonic() + 10
            while await client.xlen(a.outbox_key("b")) < 1:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
            await client.execute_command("CLIENT", "PAUSE", 7000, "ALL")
            for rec in recs[1:5]:
                a._push("xadd", "b", rec)          # sent, then not answered for 7 s: sent again
            await asyncio.sleep(5.5)
            for rec in recs[5:]:
                a._push("xadd", "b", rec)
            assert await _outbox(a, client) == recs

    asyncio.run(main())
