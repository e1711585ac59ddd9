"""The room protocol (``fastws.rooms.v1``, ``app.rooms_endpoint``) with the Python RoomClient.

Real ``fastws serve`` processes (both engines) of ``tests/integration/apps/client_app.py``,
the real Redis with ``redis+streams://`` (a prefix per test), real kills:

* the protocol itself: subscribe/publish/ack/unsubscribe/ping, the error
  codes (room limit, room name, denied, rate limited, bad request) and the
  subprotocol, also from a raw ``websockets`` client;
* resume across nodes: the client's node is SIGKILLed mid-stream; the
  client reconnects to the other node with its last stream id and gets
  every message exactly once, in order;
* a history trimmed past the client's position, and a server without
  history, are answered ``recovered: false`` and reported to the app
  (``on_gap``), never a silent gap;
* the reorder buffer puts shuffled messages back in order and reports a
  message that never comes after its bounded wait;
* messages the server dropped for a slow reader (its delivery policy) are
  noticed as a seq gap (by the next message, or by the periodic sync when
  none follows) and recovered from the stream's history, or, without
  history, reported with their exact count.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request

import pytest
import websockets

import fastws
from brokerutil import STREAMS_URL, need_redis, new_prefix
from client_helpers import Node, eventually, nodes
from fastws.client import Backoff, RoomClient, SubscriptionError
from fastws.errors import HandshakeError


def run(coro, timeout: float = 90.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def get(node: Node, path: str) -> str:
    with urllib.request.urlopen(node.http + path, timeout=10) as r:
        return r.read().decode()


def streams_args(prefix: str, **options) -> list:
    url = STREAMS_URL + ("?" + "&".join(f"{k}={v}" for k, v in options.items()) if options else "")
    return ["--broker", url, "--broker-prefix", prefix]


# -- the protocol -----------------------------------------------------------------------------


def test_subscribe_publish_ack_and_every_error_code(engine, tmp_path):
    with nodes() as ns:
        node = Node(engine, tmp_path, "--max-rooms-per-connection", "3", "--max-room-name", "16")
        ns.append(node.start())

        async def main():
            got_a, got_b = [], []
            async with RoomClient(node.url + "/rt") as a, RoomClient(node.url + "/rt") as b:
                assert a.client.websocket.subprotocol == "fastws.rooms.v1"
                sub = await a.subscribe("lobby", got_a.append)
                assert (sub.recovered, sub.history, sub.position) == (True, False, 0)
                await b.subscribe("lobby", got_b.append)
                assert (await a.publish("lobby", "one"))["seq"] == 1
                assert (await b.publish("lobby", b"\x00\xfftwo"))["seq"] == 2
                assert await b.publish("lobby", "three", ack=False) is None
                await eventually(lambda: len(got_a) == 3 and len(got_b) == 3)
                for got in (got_a, got_b):
                    assert [(m.room, m.seq, m.id, m.data) for m in got] == [
                        ("lobby", 1, None, "one"), ("lobby", 2, None, b"\x00\xfftwo"), ("lobby", 3, None, "three")]
                # the app's own publish reaches the endpoint's subscribers
                assert get(node, "/publish?room=lobby&text=from-app") == "4"
                await eventually(lambda: len(got_a) == 4 and got_a[-1].data == "from-app")

                async def refused(coro, code):
                    with pytest.raises(SubscriptionError) as info:
                        await coro
                    assert info.value.code == code, info.value
                    return info.value

                await refused(a.subscribe("secret-plans"), "denied")
                await refused(a.publish("readonly-news", "x"), "denied")
                await refused(a.subscribe("a-name-longer-than-16"), "room_name")
                await a.subscribe("r2")
                await a.subscribe("r3")
                await refused(a.subscribe("r4"), "room_limit")       # lobby, r2, r3: 3 rooms
                await a.unsubscribe("r3")
                await a.subscribe("r4")                              # room for it again
                await a.unsubscribe("lobby")
                await b.publish("lobby", "after unsubscribe")
                await eventually(lambda: len(got_b) == 5)
                assert len(got_a) == 4
                assert await a.ping() < 1.0

            async with RoomClient(node.url + "/rt-slow") as slow:
                for i in range(5):
                    await slow.publish("s", f"{i}")
                await refused(slow.publish("s", "6th"), "rate_limited")
        run(main())


def test_requests_that_are_not_the_protocol_get_bad_request(engine, tmp_path):
    """A raw client: garbage, an unknown type, a binary frame, a bad field,
    a lone surrogate: each answered with an error frame ``bad_request`` (the
    connection stays open); a client that offers only another subprotocol
    is refused with 400."""
    with nodes() as ns:
        node = Node(engine, tmp_path)
        ns.append(node.start())

        async def main():
            async with websockets.connect(node.url + "/rt", subprotocols=["fastws.rooms.v1"]) as ws:
                assert ws.subprotocol == "fastws.rooms.v1"
                for bad in ["not json", "[1,2]", '{"t":"dance"}', b"\x00binary", '{"t":"sub"}',
                            '{"t":"sub","room":""}', '{"t":"sub","room":"r","since":[1]}',
                            '{"t":"pub","room":"r"}', '{"t":"pub","room":"r","data":5,"ack":1}',
                            '{"t":"pub","room":"r","b64":"@@@","ack":2}',
                            '{"t":"pub","room":"r","data":"\\ud800","ack":3}']:
                    await ws.send(bad)
                    answer = json.loads(await asyncio.wait_for(ws.recv(), 5))
                    assert answer["t"] == "error" and answer["code"] == "bad_request", (bad, answer)
                    if isinstance(bad, str) and '"ack":' in bad:
                        assert answer["ack"] == json.loads(bad)["ack"]
                await ws.send('{"t":"ping","ts":"still open"}')
                assert json.loads(await ws.recv()) == {"t": "pong", "ts": "still open"}
            with pytest.raises(websockets.InvalidStatus) as info:
                async with websockets.connect(node.url + "/rt", subprotocols=["chat.v2"]):
                    pass
            assert info.value.response.status_code == 400
            # a client that offers no subprotocol at all speaks v1
            async with websockets.connect(node.url + "/rt") as ws:
                await ws.send('{"t":"sub","room":"plain"}')
                assert json.loads(await ws.recv())["t"] == "subscribed"
            with pytest.raises(HandshakeError):
                await fastws.client.open_connection(node.url + "/rt", subprotocols=["chat.v2"])
        run(main())


# -- reconnects ----------------------------------------------------------------------------------


def test_resume_across_nodes_without_gap_or_duplicate(engine, tmp_path):
    """Two nodes on one Redis Stream broker; a publisher on one, the
    subscriber on either (it knows both URLs); the subscriber's node is
    SIGKILLed mid-stream; the subscriber resumes on the other node with its
    last stream id: it gets messages 0..N-1 exactly once, in order."""
    need_redis()
    n = 400
    prefix = new_prefix("client-resume-")
    with nodes() as ns:
        a = Node(engine, tmp_path, *streams_args(prefix), name="a")
        b = Node(engine, tmp_path, *streams_args(prefix), name="b")
        ns += [a.start(), b.start()]

        async def main():
            got, answers = [], []
            sub_client = RoomClient([a.url + "/rt", b.url + "/rt"], backoff=Backoff(0.05, 0.2))
            await sub_client.start()
            mine = a if sub_client.client.url.startswith(a.url) else b
            other = b if mine is a else a
            sub = await sub_client.subscribe("stream", got.append)
            assert sub.history is True and sub.recovered is True
            answers.append(sub.recovered)
            sub_client.client.connect_callbacks.append(lambda c: answers.append("reconnected"))
            async with RoomClient(other.url + "/rt") as pub:
                for i in range(n):
                    await pub.publish("stream", f"n{i}")       # acked: it is in the stream
                    if len(got) >= 100 and mine.alive():
                        mine.kill()                           # mid-stream, without a close
                await eventually(lambda: len(got) >= n, timeout=30)
            await asyncio.sleep(0.3)                          # nothing more may come
            assert [m.data for m in got] == [f"n{i}" for i in range(n)]
            ids = [tuple(map(int, m.id.split("-"))) for m in got]
            assert ids == sorted(ids) and len(set(ids)) == n
            assert sub_client.client.connections == 2 and sub_client.client.url.startswith(other.url)
            assert sub.recovered is True and sub.gaps == 0
            await sub_client.close()
        run(main())


def test_a_trimmed_history_is_reported_as_not_recovered(engine, tmp_path):
    """Streams capped at ~20 entries: while the subscriber's node is down,
    500 messages are published elsewhere; the resume is answered
    ``recovered: false``, on_gap is called with the position, and the live
    stream goes on."""
    need_redis()
    prefix = new_prefix("client-trim-")
    with nodes() as ns:
        a = Node(engine, tmp_path, *streams_args(prefix, maxlen=20), name="a")
        b = Node(engine, tmp_path, *streams_args(prefix, maxlen=20), name="b")
        ns += [a.start(), b.start()]

        async def main():
            got, gaps = [], []
            rt = RoomClient(a.url + "/rt", backoff=Backoff(0.05, 0.2))
            await rt.start()
            sub = await rt.subscribe("trim", got.append, on_gap=lambda s, info: gaps.append(info))
            async with RoomClient(b.url + "/rt") as pub:
                await pub.publish("trim", "before")
                await eventually(lambda: len(got) == 1)
                position = sub.position
                a.kill()
                for i in range(500):
                    await pub.publish("trim", f"missed{i}", ack=(i % 50 == 49))
                a.start()
                await rt.client.wait_connected()
                await eventually(lambda: gaps, timeout=15)
                await pub.publish("trim", "live")
                await eventually(lambda: got[-1].data == "live", timeout=15)
            assert sub.recovered is False and sub.gaps == 1
            assert gaps[0]["since"] == position and gaps[0]["room"] == "trim"
            # what the stream still had was replayed, in order, without the trimmed start
            replayed = [m.data for m in got[1:-1]]
            assert replayed and replayed[-1] == "missed499" and "missed0" not in replayed
            assert replayed == sorted(replayed, key=lambda d: int(d[6:]))
            await rt.close()
        run(main())


def test_without_history_a_reconnect_is_a_reported_gap(engine, tmp_path):
    """No history broker: nothing published while the client was away can
    be replayed, so the resubscribe says ``recovered: false`` and on_gap runs."""
    with nodes() as ns:
        node = Node(engine, tmp_path)
        ns.append(node.start())

        async def main():
            got, gaps = [], []
            rt = RoomClient(node.url + "/rt", backoff=Backoff(0.05, 0.2))
            await rt.start()
            sub = await rt.subscribe("plain", got.append, on_gap=lambda s, info: gaps.append(info))
            get(node, "/publish?room=plain&text=first")
            await eventually(lambda: len(got) == 1)
            node.kill()
            node.start()
            await eventually(lambda: gaps, timeout=15)
            assert gaps[0]["since"] == 1 and sub.recovered is False
            get(node, "/publish?room=plain&text=second")
            await eventually(lambda: len(got) == 2)
            assert (got[1].data, got[1].seq) == ("second", 1)     # the new node counts from 1
            await rt.close()
        run(main())


# -- order -----------------------------------------------------------------------------------------


def test_shuffled_messages_come_out_in_order_and_a_missing_one_is_reported(engine, tmp_path):
    with nodes() as ns:
        node = Node(engine, tmp_path)
        ns.append(node.start())

        async def main():
            async with RoomClient(node.url + "/shuffle", reorder_wait=0.3) as rt:
                got = []
                await rt.subscribe("shuffled-300-7", got.append)
                await eventually(lambda: len(got) == 300)
                assert [m.seq for m in got] == list(range(1, 301))
                assert [m.data for m in got] == [f"m{i}" for i in range(1, 301)]

                got, gaps = [], []
                t0 = time.monotonic()
                await rt.subscribe("shuffled-50-5-skip-20", got.append,
                                   on_gap=lambda s, info: gaps.append((time.monotonic() - t0, info)))
                await eventually(lambda: len(got) == 49, timeout=10)
                assert [m.seq for m in got] == [s for s in range(1, 51) if s != 20]
                assert len(gaps) == 1 and gaps[0][1]["missing"] == 1
                assert 0.3 <= gaps[0][0] < 2.0               # after the bounded wait, not before
        run(main())


def _metric_dropped(node: Node) -> float:
    for line in get(node, "/metrics").splitlines():
        if line.startswith("websocket_dropped_messages_total") and 'priority="normal"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def _flood_a_paused_reader(node: Node, rt: RoomClient, room: str) -> int:
    """Stop reading on ``rt``'s connection and publish to ``room`` (200
    messages of 2 KB at a time) until the server drops some for it (bounded);
    then read again.  Returns how many were published."""
    transport = rt.client.websocket.transport
    transport.pause_reading()                          # a slow reader
    before = await asyncio.to_thread(_metric_dropped, node)
    sent = 0
    while sent < 30000:
        await asyncio.to_thread(get, node, f"/publish?room={room}&text=x{sent}&count=200&size=2000")
        sent += 200
        await asyncio.sleep(0.05)
        if await asyncio.to_thread(_metric_dropped, node) > before:
            break
    assert await asyncio.to_thread(_metric_dropped, node) > before
    transport.resume_reading()
    return sent


@pytest.mark.parametrize("noticed_by", ["next message", "sync"])
def test_messages_dropped_for_a_slow_reader_are_recovered_from_history(engine, tmp_path, noticed_by):
    """The client stops reading while a room is flooded: the server's
    delivery policy drops messages for it (counted in /metrics).  The gap is
    noticed by the seq of the room's next message, or, when no message
    follows, by the periodic sync (a ping whose pong names the room's last
    seq); the client asks for recovery from its last stream id and gets
    every message, in order."""
    need_redis()
    prefix = new_prefix("client-drop-")
    with nodes() as ns:
        node = Node(engine, tmp_path, *streams_args(prefix), "--high-water", "16KiB", "--max-queue", "4MiB",
                    "--slow-grace", "60")
        ns.append(node.start())

        async def main():
            got = []
            sync = noticed_by == "sync"
            rt = await RoomClient(node.url + "/rt", reorder_wait=0.3, sync_interval=0.5 if sync else 0)
            sub = await rt.subscribe("flood", got.append)
            sent = await _flood_a_paused_reader(node, rt, "flood")
            expected = [f"x{b}#{i}" for b in range(0, sent, 200) for i in range(200)]
            if not sync:
                await asyncio.sleep(1.0)
                await asyncio.to_thread(get, node, "/publish?room=flood&text=tail&count=10")
                expected += [f"tail#{i}" for i in range(10)]
            await eventually(lambda: len(got) >= len(expected), timeout=30)
            await asyncio.sleep(0.3)
            assert [m.data.split(".")[0] for m in got] == expected
            assert sub.recoveries >= 1 and sub.gaps == 0
            assert rt.client.connections == 1
            await rt.close()
        run(main(), timeout=120)


def test_messages_dropped_without_history_are_reported_with_their_count(engine, tmp_path):
    """No history broker: the messages the server dropped for a slow reader
    cannot be recovered; the gaps are reported (on_gap) with exactly as many
    missing messages as the server dropped, also at the end of the burst
    (found by the sync), and the room goes on."""
    with nodes() as ns:
        node = Node(engine, tmp_path, "--high-water", "16KiB", "--max-queue", "4MiB", "--slow-grace", "60")
        ns.append(node.start())

        async def main():
            got, gaps = [], []
            rt = await RoomClient(node.url + "/rt", reorder_wait=0.3, sync_interval=0.5)
            await rt.subscribe("flood", got.append, on_gap=lambda s, info: gaps.append(info))
            before = await asyncio.to_thread(_metric_dropped, node)
            sent = await _flood_a_paused_reader(node, rt, "flood")
            dropped = int(await asyncio.to_thread(_metric_dropped, node) - before)
            await eventually(lambda: len(got) + sum(g["missing"] for g in gaps) >= sent, timeout=30)
            assert len(got) + dropped == sent
            assert sum(g["missing"] for g in gaps) == dropped
            seqs = [m.seq for m in got]
            assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
            await asyncio.to_thread(get, node, "/publish?room=flood&text=after")
            await eventually(lambda: got[-1].data == "after")
            assert got[-1].seq == sent + 1
            await rt.close()
        run(main(), timeout=120)
