"""One failing subscription never poisons the others.

Against the real embedded broker (an :class:`EmbeddedRelay` on a Unix socket)
and real Redis:

* the embedded broker carries channels far longer than 64 KiB (its framing
  once packed a channel's length in 16 bits: a 70,000-byte name raised
  inside a batch, the whole batch was lost and the other keys were recorded
  as subscribed but never were); a key it cannot carry fails alone with
  ``SubscribeError`` and is not recorded; an oversized publish fails alone;
* nodes (real ``fastws.server.NativeServer`` processes' worth of wiring, in this
  process, with ``Config(broker=...)``) whose subscriptions fail: the
  failure is counted, ``/health`` says so (the ``broker_subscriptions``
  check), the bridge retries with backoff, and once through, messages flow;
  a key that can never be carried leaves the others of its batch working;
* Redis: a subscription Redis does not acknowledge raises ``SubscribeError``
  and is not kept as subscribed.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import tempfile
import time
import urllib.error
import urllib.request

import pytest
import websockets
from prometheus_client.parser import text_string_to_metric_families

import fastws
from brokerutil import REDIS_HOST, REDIS_PORT, TcpProxy, need_redis, new_prefix, proxied_url, run, wait_for
from fastws.broker import PublishError, SubscribeError, create_broker
from fastws.broker.embedded import MAX_CHANNEL, EmbeddedRelay
from fastws.config import Config
from fastws.server import NativeServer


def _hub_path() -> str:
    return os.path.join(tempfile.mkdtemp(prefix="fws-"), "hub.sock")


# -- the embedded broker alone ------------------------------------------------------------


def test_embedded_bad_key_fails_alone_and_long_names_are_carried():
    async def main():
        path = _hub_path()
        hub = EmbeddedRelay(path)
        await hub.start()
        prefix = new_prefix()
        a = create_broker("unix://" + path, prefix=prefix)
        b = create_broker("unix://" + path, prefix=prefix)
        got = []
        a.set_handler(lambda key, payload, origin: got.append((key, payload)))
        try:
            await a.start()
            await b.start()
            good1, good2 = ("", "good-1"), ("", "good-2")
            long_ok = ("", "n" * 70_000)                    # past 16 bits: once broke the batch
            too_long = ("", "x" * (MAX_CHANNEL + 1))        # past what a channel may be
            not_utf8 = ("", "\ud800")                       # cannot be encoded at all
            with pytest.raises(SubscribeError) as info:
                await a.subscribe([good1, too_long, long_ok, not_utf8, good2])
            assert info.value.keys == [too_long, not_utf8]
            assert sorted(a.subscribed) == sorted([good1, long_ok, good2])   # the bad ones not kept
            assert hub.stats()["channels"] == 3
            for key in (good1, long_ok, good2):
                await b.publish(key, b"to " + key[1][:8].encode())
            await wait_for(lambda: len(got) == 3, 10, "the three good keys' messages")
            assert got == [(good1, b"to good-1"), (long_ok, b"to nnnnnnnn"), (good2, b"to good-2")]
            # a publish the link cannot carry fails alone; the link stays up
            with pytest.raises(PublishError):
                await b.publish(too_long, b"x")
            with pytest.raises(PublishError):
                await b.publish(good1, b"x" * (65 << 20))
            await b.publish(good1, b"after")
            await wait_for(lambda: len(got) == 4, 10, "a message after the refused ones")
            assert got[-1] == (good1, b"after")
            assert a.state == b.state == "connected" and a.counters["reconnects"] == 0
            # unsubscribing (a bad key among them) applies to the good ones
            await a.unsubscribe([good1, not_utf8, long_ok])
            assert a.subscribed == [good2]
            await wait_for(lambda: hub.stats()["channels"] == 1, 10, "the hub dropping the routes")
        finally:
            await a.close()
            await b.close()
            await hub.close()

    run(main())


def test_redis_subscription_not_acknowledged_is_raised_and_not_kept(monkeypatch):
    """A subscriber link that stays open but answers nothing: the subscribe
    raises ``SubscribeError`` naming its keys, which are not kept."""
    need_redis()
    import fastws.broker.redis as redis_mod

    monkeypatch.setattr(redis_mod, "ACK_TIMEOUT", 0.5)       # a knob of the module, not a stub

    async def main():
        proxy = await TcpProxy(REDIS_HOST, REDIS_PORT).start()
        b = create_broker(proxied_url(proxy), prefix=new_prefix(),
                          ping_interval=30.0)
        try:
            await b.start()
            assert b.state == "connected"
            await b.subscribe([("", "held")])
            proxy.mode = "blackhole"
            with pytest.raises(SubscribeError) as info:
                await b.subscribe([("", "lost-1"), ("", "lost-2")])
            assert sorted(info.value.keys) == [("", "lost-1"), ("", "lost-2")]
            assert b.subscribed == [("", "held")]
        finally:
            await b.close()
            await proxy.close()

    run(main())


# -- nodes: rooms + bridge + the embedded broker, wired from Config --------------------------


def node_app():
    app = fastws.App()

    @app.on_message("/room")
    def on_message(conn, data):
        cmd = json.loads(data)
        if "join" in cmd:
            for name in cmd["join"]:          # one message: one batch of subscriptions
                conn.join(name)
            conn.send(json.dumps({"joined": len(cmd["join"])}))
        elif "leave" in cmd:
            conn.leave(cmd["leave"])
            conn.send(json.dumps({"left": cmd["leave"]}))
        elif "pub" in cmd:
            app.publish(cmd["pub"], cmd["text"])

    return app


async def start_node(path: str, prefix: str) -> NativeServer:
    server = NativeServer(node_app(), Config(host="127.0.0.1", port=0, broker="unix://" + path,
                                       broker_prefix=prefix, shutdown_timeout=1))
    await server.start()
    return server


async def client(server: NativeServer, rooms=()):
    ws = await websockets.connect(f"ws://127.0.0.1:{server.port}/room")
    if rooms:
        assert await ask(ws, {"join": list(rooms)}) == {"joined": len(rooms)}
    return ws


async def ask(ws, cmd):
    await ws.send(json.dumps(cmd))
    while True:
        frame = await asyncio.wait_for(ws.recv(), 10)
        if frame.startswith("{"):
            return json.loads(frame)


async def http_get(server: NativeServer, path: str):
    def get():
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}", timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    return await asyncio.get_running_loop().run_in_executor(None, get)


async def subscriptions_check(server: NativeServer) -> dict:
    status, body = await http_get(server, "/health")
    check = json.loads(body)["checks"]["broker_subscriptions"]
    if not check["ok"]:
        assert status == 503                          # a failing check makes /health fail
    return check


async def metric(server: NativeServer, name: str, **labels) -> float:
    status, text = await http_get(server, "/metrics")
    assert status == 200
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


async def delivered(sender, receiver, room: str, tag: str, tries: int = 50) -> bool:
    """Publish ``tag-i`` to ``room`` until ``receiver`` gets one (bounded)."""
    for i in range(tries):
        await sender.send(json.dumps({"pub": room, "text": f"{tag}-{i}"}))
        deadline = time.monotonic() + 0.2
        try:
            while time.monotonic() < deadline:
                if await asyncio.wait_for(receiver.recv(), deadline - time.monotonic()) == f"{tag}-{i}":
                    return True
        except asyncio.TimeoutError:
            pass
    return False


def test_stalled_hub_subscription_fails_is_counted_shown_in_health_and_retried():
    """The hub stops answering for 2 s (its loop is busy) while a member joins
    two rooms: the subscribe times out, is counted, /health fails, and the
    bridge's retry gets the rooms subscribed once the hub answers again."""

    async def main():
        path = _hub_path()
        hub = EmbeddedRelay(path)
        hub.run_in_thread()
        prefix = new_prefix()
        a = await start_node(path, prefix)
        b = await start_node(path, prefix)
        a.node.broker.ack_timeout = 0.5              # the broker's knob: give up on an answer sooner
        try:
            assert (await subscriptions_check(a))["ok"] is True
            hub._loop.call_soon_threadsafe(time.sleep, 2.0)       # the hub stalls
            await asyncio.sleep(0.05)
            a1 = await client(a, ["r2", "r3"])
            saw_failing = None
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline and saw_failing is None:
                check = await subscriptions_check(a)
                if not check["ok"]:
                    saw_failing = check
                await asyncio.sleep(0.05)
            assert saw_failing is not None, "/health never showed the failing subscription"
            assert saw_failing["detail"]["failing"] == 2
            assert saw_failing["detail"]["subscribe_failures"] >= 1
            assert "SubscribeError" in saw_failing["detail"]["last_error"]
            # the hub is back: the retry subscribes r2 and r3
            deadline = time.monotonic() + 15
            while not (await subscriptions_check(a))["ok"]:
                assert time.monotonic() < deadline, "the retry never got through"
                await asyncio.sleep(0.1)
            detail = (await subscriptions_check(a))["detail"]
            assert detail["failing"] == 0 and detail["retries"] >= 1
            b1 = await client(b, ["r2", "r3"])
            assert await delivered(b1, a1, "r2", "b-to-a"), "a member on a missed a message of r2"
            assert await delivered(b1, a1, "r3", "b-to-a3"), "a member on a missed a message of r3"
            assert await delivered(a1, b1, "r3", "a-to-b"), "b missed a message of r3"
            assert await metric(a, "websocket_broker_subscription_failures_total", op="subscribe") >= 1
            assert await metric(a, "websocket_broker_subscriptions_failing") == 0
            for ws in (a1, b1):
                await ws.close()
        finally:
            await a.shutdown()
            await b.shutdown()
            hub.stop_thread()

    run(main())


def test_a_key_the_broker_cannot_carry_leaves_the_rest_of_its_batch_working():
    """A registry that takes any name (``max_room_name`` None, as a library
    user may build it) lets a name through that no broker can carry: its
    subscription fails and is retried, the good rooms of the same batch work,
    /health says which, and leaving the bad room ends the failure."""

    async def main():
        path = _hub_path()
        hub = EmbeddedRelay(path)
        await hub.start()
        prefix = new_prefix()
        a = await start_node(path, prefix)
        b = await start_node(path, prefix)
        a.node.rooms.max_room_name = None            # no name check on this node
        try:
            a1 = await client(a, ["good-a", "\ud800", "good-b"])      # one batch
            b1 = await client(b, ["good-a", "good-b"])
            assert await delivered(b1, a1, "good-a", "x"), "good-a never reached node a"
            assert await delivered(b1, a1, "good-b", "y"), "good-b never reached node a"
            assert await delivered(a1, b1, "good-b", "z"), "good-b never reached node b"
            check = await subscriptions_check(a)
            assert check["ok"] is False and check["detail"]["failing"] == 1, check
            # the batch of 3 failed for its one bad key; a retry (the bad key alone, "1 of 1")
            # may already have run and replaced the text
            assert re.search(r"cannot carry 1 of [13] keys", check["detail"]["last_error"]), check
            failures = check["detail"]["subscribe_failures"]
            # retried with backoff: a few more failures, not one per loop iteration
            await asyncio.sleep(1.0)
            again = (await subscriptions_check(a))["detail"]["subscribe_failures"]
            assert failures < again <= failures + 5, (failures, again)
            assert await metric(a, "websocket_broker_subscriptions_failing") == 1
            # the member leaves the bad room: nothing is wanted for it any more
            assert await ask(a1, {"leave": "\ud800"}) == {"left": "\ud800"}
            deadline = time.monotonic() + 5
            while not (await subscriptions_check(a))["ok"]:
                assert time.monotonic() < deadline, "the failure outlived the room"
                await asyncio.sleep(0.05)
            assert await delivered(b1, a1, "good-a", "w")
            for ws in (a1, b1):
                await ws.close()
        finally:
            await a.shutdown()
            await b.shutdown()
            await hub.close()

    run(main())
