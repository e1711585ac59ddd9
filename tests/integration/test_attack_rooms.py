"""Room attacks against real ``fastws serve`` processes (both engines).

* One client joins 40,000 rooms while another keeps doing round trips: the
  joins cost O(1) each (a connection's rooms become a set past a few), so
  they finish in a few seconds and the other client is never held up for
  long (a list took 17 s of blocked loop, 2.2 s round trips).
* ``max_rooms_per_connection`` (default 1,000): the 1,001st join is refused
  with an error the app sees (``RoomLimitError``), counted in the metrics;
  the connection stays open and in its rooms.  In ASGI mode the same error
  comes out of ``await send({"type": "fastws.join"})`` and the extension's
  ``join``.
* ``max_room_name`` (default 256 bytes): a 70,000-byte room name is refused
  at join (``RoomNameError``) with ``--workers 2``, while alice and bob, on
  different workers, keep exchanging messages through their room, and rooms
  joined afterwards still span the workers (a long name once broke the
  embedded broker's batch of subscriptions for everyone).

Every client connects to 127.0.0.1 only; every loop is bounded in count and
time.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request

import websockets
from prometheus_client.parser import text_string_to_metric_families

APP = "tests.integration.apps.room_limits_app:app"
ASGI_APP = "tests.integration.apps.asgi_room_limits_app:app"
JOINS = 40_000
CHUNK = 2_000          # joins per message: a quadratic join blocks the loop for seconds per chunk
JOIN_BOUND = 10.0      # seconds for all 40,000 joins (a list took ~17 s)
RTT_BOUND = 1.0        # the other client's worst round trip while they run
TOKEN = "room-attack-token"


def http_publish(srv, room: str, text: str):
    """(status, JSON answer) of POST /publish (the HTTP publish API)."""
    req = urllib.request.Request(f"http://{srv.host}:{srv.port}/publish", method="POST",
                                 data=json.dumps({"room": room, "text": text}).encode(),
                                 headers={"Content-Type": "application/json",
                                          "Authorization": f"Bearer {TOKEN}"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def run(coro, timeout: float = 120):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def connect(srv, path="rooms"):
    return await websockets.connect(srv.url + path, max_size=None, open_timeout=10)


async def ask(ws, cmd, timeout: float = 30):
    """Send ``cmd``; the app's JSON answer (room messages, plain text, are skipped)."""
    await ws.send(json.dumps(cmd))
    deadline = time.monotonic() + timeout
    while True:
        frame = await asyncio.wait_for(ws.recv(), max(0.01, deadline - time.monotonic()))
        if frame.startswith("{"):
            return json.loads(frame)


def http_get(srv, path: str):
    """(status, body text) of GET ``path`` on the server's port."""
    try:
        with urllib.request.urlopen(f"http://{srv.host}:{srv.port}{path}", timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def metric(srv, name: str, **labels) -> float:
    """The value of sample ``name`` with ``labels`` in a scrape of /metrics (0.0 if absent)."""
    status, text = http_get(srv, "/metrics")
    assert status == 200, text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def test_40k_joins_are_linear_and_do_not_hold_up_other_clients(server_factory):
    srv = server_factory("--max-rooms-per-connection", "0", app=APP)

    async def main():
        joiner = await connect(srv)
        other = await connect(srv)
        assert (await ask(other, {"ping": -1}))["pong"] == -1
        rtts = []
        done = asyncio.Event()

        async def round_trips():
            i = 0
            while (not done.is_set() or i < 10) and i < 100_000:
                t0 = time.perf_counter()
                reply = await ask(other, {"ping": i})
                rtts.append(time.perf_counter() - t0)
                assert reply == {"pong": i}
                i += 1
                await asyncio.sleep(0.005)

        pinger = asyncio.ensure_future(round_trips())
        t0 = time.perf_counter()
        try:
            for start in range(0, JOINS, CHUNK):
                reply = await ask(joiner, {"join_range": "big-", "start": start, "count": CHUNK})
                assert reply["error"] is None, reply
                assert reply == {"joined": CHUNK, "rooms": start + CHUNK, "error": None}
            join_time = time.perf_counter() - t0
            # joining a room it is in already: no change, no error
            again = await ask(joiner, {"join": ["big-0", "big-39999"]})
            assert again == {"joined": 2, "rooms": JOINS, "error": None}
            t1 = time.perf_counter()
            for start in range(0, JOINS, CHUNK):
                reply = await ask(joiner, {"leave_range": "big-", "start": start, "count": CHUNK})
                assert reply["rooms"] == JOINS - start - CHUNK
            leave_time = time.perf_counter() - t1
        finally:
            done.set()
            await pinger
        await joiner.close()
        await other.close()
        return join_time, leave_time, rtts

    join_time, leave_time, rtts = run(main())
    print(f"\n40,000 joins {join_time:.2f}s, leaves {leave_time:.2f}s; other client "
          f"{len(rtts)} round trips, worst {max(rtts) * 1000:.1f} ms")
    assert join_time < JOIN_BOUND, f"40,000 joins took {join_time:.1f}s"
    assert leave_time < JOIN_BOUND, f"40,000 leaves took {leave_time:.1f}s"
    assert len(rtts) >= 10, "the other client got too few round trips in"
    assert max(rtts) < RTT_BOUND, f"worst round trip of the other client {max(rtts):.2f}s"
    assert metric(srv, "websocket_rooms") == 0        # every room left is gone (no leak)


def test_default_cap_refuses_the_1001st_join_with_an_app_visible_error(server_factory):
    srv = server_factory(app=APP)
    before = metric(srv, "websocket_room_refusals_total", reason="limit")

    async def main():
        ws = await connect(srv)
        reply = await ask(ws, {"join_range": "cap-", "start": 0, "count": 1000})
        assert reply == {"joined": 1000, "rooms": 1000, "error": None}
        reply = await ask(ws, {"join": ["cap-1000"]})                 # the 1,001st
        assert reply["joined"] == 0 and reply["rooms"] == 1000
        assert reply["error"]["type"] == "RoomLimitError"
        assert "at most 1000 rooms" in reply["error"]["message"]
        assert "max_rooms_per_connection" in reply["error"]["message"]
        # a room it is in already is not a new one; the connection is still served
        assert await ask(ws, {"join": ["cap-999"]}) == {"joined": 1, "rooms": 1000, "error": None}
        assert await ask(ws, {"ping": 1}) == {"pong": 1}
        # leaving one makes room for one
        assert (await ask(ws, {"leave_range": "cap-", "start": 0, "count": 1}))["rooms"] == 999
        assert await ask(ws, {"join": ["cap-1000"]}) == {"joined": 1, "rooms": 1000, "error": None}
        reply = await ask(ws, {"join": ["cap-1001"]})
        assert reply["error"]["type"] == "RoomLimitError"
        # another connection has its own allowance
        ws2 = await connect(srv)
        assert await ask(ws2, {"join": ["cap-1001", "cap-5"]}) == {"joined": 2, "rooms": 2, "error": None}
        await ws.close()
        await ws2.close()

    run(main())
    assert metric(srv, "websocket_room_refusals_total", reason="limit") == before + 2


def test_room_limits_raise_into_an_asgi_app(server_factory):
    """ASGI mode: the refusal comes out of ``await send(fastws.join)`` and out
    of the extension's ``join``; the WebSocket stays open."""
    srv = server_factory("--interface", "asgi", "--max-rooms-per-connection", "3", app=ASGI_APP)

    async def main():
        for via in ("send", "ext"):
            ws = await connect(srv, f"ws-{via}")
            reply = await ask(ws, {"join": ["a", "b", "c", "d"], "via": via})
            assert reply["joined"] == 3, reply
            assert reply["error"]["type"] == "RoomLimitError"
            assert "at most 3 rooms" in reply["error"]["message"]
            reply = await ask(ws, {"join": ["x" * 300], "via": via})
            assert reply["joined"] == 0 and reply["error"]["type"] == "RoomNameError", reply
            assert "at most 256 allowed" in reply["error"]["message"]
            reply = await ask(ws, {"publish": "y" * 70_000, "text": "hi", "via": via})
            assert reply["error"]["type"] == "RoomNameError", reply
            # still open and in its rooms: a publish to one of them comes back,
            # queued before the app's answer
            await ws.send(json.dumps({"publish": "a", "text": f"to a via {via}", "via": via}))
            assert await asyncio.wait_for(ws.recv(), 10) == f"to a via {via}"
            assert json.loads(await asyncio.wait_for(ws.recv(), 10)) == {"published": "a", "error": None}
            await ws.close()

    run(main())
    assert metric(srv, "websocket_room_refusals_total", reason="limit") >= 2
    assert metric(srv, "websocket_room_refusals_total", reason="name") >= 4


async def _on_two_workers(srv, limit: int = 64):
    """Two clients on different worker processes (SO_REUSEPORT spreads
    connections; bounded number of tries); the others are closed."""
    by_pid: dict = {}
    extra = []
    for _ in range(limit):
        ws = await connect(srv)
        pid = (await ask(ws, {"hello": 1}))["pid"]
        if pid in by_pid:
            extra.append(ws)
        else:
            by_pid[pid] = ws
        if len(by_pid) == 2:
            break
    for ws in extra:
        await ws.close()
    assert len(by_pid) == 2, "every connection landed on one worker"
    return list(by_pid.values())


async def _recv_text(ws, want: str, timeout: float = 5.0) -> bool:
    """Read until a frame equal to ``want`` arrives (True) or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        try:
            msg = await asyncio.wait_for(ws.recv(), left)
        except asyncio.TimeoutError:
            return False
        if msg == want:
            return True


async def _until_delivered(sender, receiver, room: str, tag: str, tries: int = 50) -> None:
    """Publish ``tag-i`` to ``room`` from ``sender`` until ``receiver`` gets
    one: the subscription of ``receiver``'s worker is in place (bounded)."""
    for i in range(tries):
        await sender.send(json.dumps({"publish": room, "text": f"{tag}-{i}"}))
        if await _recv_text(receiver, f"{tag}-{i}", 0.2):
            return
    raise AssertionError(f"{room}: nothing from the other worker after {tries} tries")


def test_long_room_name_refused_and_rooms_keep_working_across_workers(server_factory):
    srv = server_factory("--workers", "2", "--publish-token", TOKEN, app=APP)
    deadline = time.monotonic() + 30
    while srv.log().count("listening on") < 2 and time.monotonic() < deadline:
        time.sleep(0.05)

    async def main():
        alice, bob = await _on_two_workers(srv)
        assert (await ask(alice, {"join": ["lobby"]}))["error"] is None
        assert (await ask(bob, {"join": ["lobby"]}))["error"] is None
        await _until_delivered(bob, alice, "lobby", "warmup")

        # the attack: a 70,000-byte name (and a name that is no UTF-8), from
        # both workers, next to a good room joined in the same message
        long_name = "n" * 70_000
        for mallory_ws in (alice, bob):
            reply = await ask(mallory_ws, {"join": [f"fine-{id(mallory_ws)}", long_name]})
            assert reply["joined"] == 1, reply
            assert reply["error"]["type"] == "RoomNameError"
            assert "70000 bytes" in reply["error"]["message"]
            assert "at most 256" in reply["error"]["message"]
            reply = await ask(mallory_ws, {"join": ["\ud800"]})
            assert reply["error"]["type"] == "RoomNameError"
            assert "UTF-8" in reply["error"]["message"]
            reply = await ask(mallory_ws, {"publish": long_name, "text": "x"})
            assert reply["error"]["type"] == "RoomNameError"

        # the HTTP publish API refuses the long name too, and still serves the room
        status, answer = await asyncio.get_running_loop().run_in_executor(
            None, http_publish, srv, long_name, "x")
        assert status == 400 and "max_room_name" in answer["error"], answer
        status, answer = await asyncio.get_running_loop().run_in_executor(
            None, http_publish, srv, "lobby", "from-http")
        assert status == 200 and answer["remote"] is True, answer
        assert await _recv_text(alice, "from-http") and await _recv_text(bob, "from-http")

        # alice and bob keep talking through their room, both ways
        for i in range(20):
            await bob.send(json.dumps({"publish": "lobby", "text": f"bob-{i}"}))
            assert await _recv_text(alice, f"bob-{i}"), f"alice missed bob-{i}"
            await alice.send(json.dumps({"publish": "lobby", "text": f"alice-{i}"}))
            assert await _recv_text(bob, f"alice-{i}"), f"bob missed alice-{i}"

        # rooms joined after the attack span the workers too
        assert (await ask(alice, {"join": ["after"]}))["error"] is None
        assert (await ask(bob, {"join": ["after"]}))["error"] is None
        await _until_delivered(alice, bob, "after", "later")
        await _until_delivered(bob, alice, "after", "later-back")
        await alice.close()
        await bob.close()

    run(main())
    status, body = http_get(srv, "/health")
    assert status == 200, body
    assert json.loads(body)["checks"]["broker_subscriptions"]["ok"] is True
    # the workers' numbers are summed (each writes its snapshot once a second)
    deadline = time.monotonic() + 10
    while metric(srv, "websocket_room_refusals_total", reason="name") < 7 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert metric(srv, "websocket_room_refusals_total", reason="name") >= 7
    assert metric(srv, "websocket_broker_subscription_failures_total", op="subscribe") == 0
