"""Regions: three simulated regions on this machine, real processes only.

Each region has its own ``redis-server`` (on a free port, never the shared
one) and two ``fastws serve`` nodes (``apps/regions_app.py``); a region's
nodes reach each other region's Redis through a TCP proxy that adds 40 ms
each way and can cut the link (``regions_helpers.py``).  Clients are real
``websockets`` clients.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Iterator

import pytest

from docblocks import block
from fastws.regions import CACHE_TTL
from regions_helpers import REPO, Client, Deployment

DELAY = 0.04


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    d = Deployment(tmp_path_factory.mktemp("regions"), delay=DELAY, extra=("--region-directory-ttl", "3"))
    try:
        yield d
    finally:
        d.stop()


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(asyncio.wait_for(coro, 120))


def _seqs(msgs: list[dict], pub: str) -> list[int]:
    return [int(m["data"].split(":")[1]) for m in msgs if m["data"].startswith(pub + ":")]


@pytest.mark.timeout(180)
def test_user_to_user_across_regions(world: Deployment) -> None:
    """A user in region a sends to a user in region c and gets an answer
    back; the message takes the WAN link (at least one delay) and the sender
    is told which region it was handed to."""
    async def main() -> None:
        alice = await Client.connect(world.node("a", 0), "alice")
        bob = await Client.connect(world.node("c", 1), "bob")
        try:
            t0 = time.monotonic()
            await alice.send(op="to", user="bob", data="hi bob")
            got = await bob.wait(lambda m: m.get("op") == "dm")
            took = time.monotonic() - t0
            assert got == {"op": "dm", "from": "alice", "data": "hi bob"}
            assert took >= DELAY, took
            sent = await alice.wait(lambda m: m.get("op") == "sent")
            assert sent["regions"] == ["c"], sent
            await bob.send(op="to", user="alice", data="hi alice")
            back = await alice.wait(lambda m: m.get("op") == "dm")
            assert back == {"op": "dm", "from": "bob", "data": "hi alice"}
            await asyncio.sleep(1.0)           # nothing arrives twice
            assert len(bob.of("dm")) == 1 and len(alice.of("dm")) == 1
            # a user who is nowhere: no region takes it
            await alice.send(op="to", user="nobody", data="x")
            none = await alice.wait(lambda m: m.get("op") == "sent" and m["data"] == "x")
            assert none["regions"] == []
        finally:
            await alice.close()
            await bob.close()

    run(main())


def _sum(world: Deployment, region: str, name: str, **labels: str) -> float:
    return sum(n.metric(name, **labels) for n in world.nodes[region])


async def _members(world: Deployment, room: str, tag: str) -> list[Client]:
    """A member of ``room`` on every node of every region."""
    out = []
    for region in world.names:
        for i in range(len(world.nodes[region])):
            c = await Client.connect(world.node(region, i), f"{tag}-{region}{i}")
            await c.join(room)
            out.append(c)
    await asyncio.sleep(0.5)           # the nodes' broker subscriptions are acknowledged
    return out


def _check_order(c: Client, room: str, pubs: dict[str, int]) -> None:
    """``c`` got, from each publisher, 0..n-1 exactly once and in order."""
    msgs = c.of("msg", room=room)
    for pub, n in pubs.items():
        assert _seqs(msgs, pub) == list(range(n)), (c.user, pub, _seqs(msgs, pub))
    assert len(msgs) == sum(pubs.values()), (c.user, len(msgs))


@pytest.mark.timeout(180)
def test_room_spans_three_regions_in_order(world: Deployment) -> None:
    """Members on both nodes of all three regions; a publisher in each region
    sends 40 messages: every member gets all 120 once, each publisher's in
    its order.  Each message crosses into each other region once: region a's
    nodes moved exactly 40 entries to b (not one per node or member) and b
    delivered exactly 40 from a."""
    N = 40

    async def main() -> None:
        members = await _members(world, "r3", "m")
        fwd0 = _sum(world, "a", "fastws_region_forwarded_total", peer="b")
        rec0 = _sum(world, "b", "fastws_region_received_total", origin="a")
        try:
            await members[0].send(op="rooms")                # the user's own room is not listed
            assert (await members[0].wait(lambda m: m.get("op") == "rooms"))["rooms"] == ["r3"]
            pubs = {m.region: m for m in members[::2]}       # one member per region publishes
            for i in range(N):
                for region, p in pubs.items():
                    await p.send(op="pub", room="r3", data=f"{region}:{i}")
            for m in members:
                await m.wait_count("msg", 3 * N, room="r3")
            await asyncio.sleep(1.0)                          # nothing more comes
            for m in members:
                _check_order(m, "r3", {r: N for r in pubs})
            assert _sum(world, "a", "fastws_region_forwarded_total", peer="b") - fwd0 == N
            assert _sum(world, "b", "fastws_region_received_total", origin="a") - rec0 == N
        finally:
            for m in members:
                await m.close()

    run(main())


@pytest.mark.timeout(180)
def test_cut_link_heals_without_loss_duplicate_or_reorder(world: Deployment) -> None:
    """The link between a and b is cut: what a publishes reaches c at once
    and waits for b (a's /regions says b is unreachable and counts the
    queue); healed, b gets all of it in order, once, and a gets what b
    published meanwhile."""
    async def main() -> None:
        members = await _members(world, "cut", "k")
        a0, b0 = members[0], members[2]
        world.cut("a", "b")
        try:
            for i in range(30):
                await a0.send(op="pub", room="cut", data=f"a:{i}")
            for i in range(10):
                await b0.send(op="pub", room="cut", data=f"b:{i}")
            for m in members:
                if m.region == "c":
                    await m.wait_count("msg", 40, room="cut")
            await asyncio.sleep(1.5)
            for m in members:
                if m.region == "b":
                    assert _seqs(m.of("msg", room="cut"), "a") == [], m.got[-3:]
                if m.region == "a":
                    assert _seqs(m.of("msg", room="cut"), "b") == [], m.got[-3:]
            status, doc = world.node("a", 1).get_json("/regions")
            peer_b = next(r for r in doc["regions"] if r["name"] == "b")
            assert status == 200 and doc["region"] == "a" and peer_b["state"] == "unreachable", doc
            assert peer_b["queued"] > 0, doc
            assert next(r for r in doc["regions"] if r["name"] == "c")["state"] == "up", doc
        finally:
            world.heal("a", "b")
        for m in members:
            await m.wait_count("msg", 40, room="cut", timeout=30)
        await asyncio.sleep(1.5)
        for m in members:
            _check_order(m, "cut", {"a": 30, "b": 10})
        deadline = time.monotonic() + 10
        while True:
            doc = world.node("a", 0).get_json("/regions")[1]
            peer_b = next(r for r in doc["regions"] if r["name"] == "b")
            if peer_b["state"] == "up" and peer_b["queued"] == 0:
                break
            assert time.monotonic() < deadline, doc
            await asyncio.sleep(0.2)
        assert peer_b["dropped"] == {"length": 0, "age": 0, "local": 0}, doc
        for m in members:
            await m.close()

    run(main())


@pytest.mark.timeout(240)
def test_region_redis_killed_and_restored(world: Deployment) -> None:
    """Region b's Redis is killed: b's nodes say 503 on /health; a and c keep
    serving their users (a user message and a room publish between them);
    what a publishes for the room waits for b.  Restarted (empty), b's nodes
    are healthy again, b's members get what they missed in order, once, and
    b's users are in its directory again."""
    async def main() -> None:
        members = await _members(world, "kill", "r")
        a0 = members[0]
        dan = await Client.connect(world.node("a", 1), "dan")
        eve = await Client.connect(world.node("c", 0), "eve")
        world.redis["b"].kill()
        try:
            for node in world.nodes["b"]:
                node.wait_health(503, timeout=20)
            status, doc = world.node("b", 0).get_json("/health")
            assert doc["region"] == "b" and doc["checks"]["region"]["ok"] is False, doc
            for node in world.nodes["a"] + world.nodes["c"]:
                assert node.healthy()
            await dan.send(op="to", user="eve", data="still here")
            assert (await eve.wait(lambda m: m.get("op") == "dm"))["data"] == "still here"
            for i in range(20):
                await a0.send(op="pub", room="kill", data=f"a:{i}")
            for m in members:
                if m.region != "b":
                    await m.wait_count("msg", 20, room="kill")
            deadline = time.monotonic() + 10
            while True:
                doc = world.node("a", 0).get_json("/regions")[1]
                peer_b = next(r for r in doc["regions"] if r["name"] == "b")
                if peer_b["state"] == "unreachable" and peer_b["queued"] > 0:
                    break
                assert time.monotonic() < deadline, doc
                await asyncio.sleep(0.2)
        finally:
            world.redis["b"].start()
        for node in world.nodes["b"]:
            node.wait_health(200, timeout=30)
        for m in members:
            await m.wait_count("msg", 20, room="kill", timeout=30)
        await asyncio.sleep(1.5)
        for m in members:
            _check_order(m, "kill", {"a": 20})
        # b's users are back in its directory: a user of b is reached from a
        b_user = members[2]
        await asyncio.sleep(1.5)       # a refresh (every third of the directory TTL, 3 s)
        await dan.send(op="to", user=b_user.user, data="welcome back")
        assert (await b_user.wait(lambda m: m.get("op") == "dm"))["data"] == "welcome back"
        for c in [*members, dan, eve]:
            await c.close()

    run(main())


@pytest.mark.timeout(180)
def test_user_reconnects_in_another_region(world: Deployment) -> None:
    """carol is in b, then reconnects in c: a message sent to her at once
    (a's cached answer still says b) reaches her in c, forwarded once by b;
    after the cache's time a's node hands it to c directly."""
    async def main() -> None:
        alice = await Client.connect(world.node("a", 0), "alice2")
        carol = await Client.connect(world.node("b", 0), "carol")
        await alice.send(op="to", user="carol", data="1")
        assert (await carol.wait(lambda m: m.get("op") == "dm"))["data"] == "1"
        assert (await alice.wait(lambda m: m.get("op") == "sent" and m["data"] == "1"))["regions"] == ["b"]
        await carol.close()
        carol = await Client.connect(world.node("c", 1), "carol")
        await alice.send(op="to", user="carol", data="2")
        assert (await carol.wait(lambda m: m.get("op") == "dm"))["data"] == "2"
        assert (await alice.wait(lambda m: m.get("op") == "sent" and m["data"] == "2"))["regions"] == ["b"]
        await asyncio.sleep(CACHE_TTL + 0.5)
        await alice.send(op="to", user="carol", data="3")
        await carol.wait(lambda m: m.get("op") == "dm" and m["data"] == "3")
        assert (await alice.wait(lambda m: m.get("op") == "sent" and m["data"] == "3"))["regions"] == ["c"]
        await asyncio.sleep(1.0)
        assert [m["data"] for m in carol.of("dm")] == ["2", "3"]
        await alice.close()
        await carol.close()

    run(main())


@pytest.mark.timeout(120)
def test_readme_example_runs_and_prints_what_it_shows() -> None:
    """README's Regions example (``regions-example``) starts three regions on
    this machine, chats and stops by itself, printing exactly the output the
    README shows (``regions-output``)."""
    cmd = block("README.md", "regions-example").text.strip()
    want = block("README.md", "regions-output").text.strip().splitlines()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTWS_")}
    env["PYTHONPATH"] = str(REPO)
    out = subprocess.run(cmd, shell=True, cwd=REPO, env=env, capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines() == want, out.stdout


@pytest.mark.timeout(120)
def test_user_in_two_regions_gets_each_message_once_in_each(world: Deployment) -> None:
    """dave has a connection in a and one in c (and a second one in c, on the
    other node): a message sent to him from b reaches all three, once each,
    and the sender is told both regions."""
    async def main() -> None:
        daves = [await Client.connect(world.node("a", 0), "dave"), await Client.connect(world.node("c", 0), "dave"),
                 await Client.connect(world.node("c", 1), "dave")]
        eve = await Client.connect(world.node("b", 1), "eve2")
        await asyncio.sleep(0.3)
        await eve.send(op="to", user="dave", data="to every dave")
        for d in daves:
            await d.wait(lambda m: m.get("op") == "dm")
        assert (await eve.wait(lambda m: m.get("op") == "sent"))["regions"] == ["a", "c"]
        await asyncio.sleep(1.0)
        assert all(len(d.of("dm")) == 1 for d in daves), [d.got for d in daves]
        for c in (*daves, eve):
            await c.close()

    run(main())


@pytest.mark.timeout(120)
def test_user_bound_by_the_auth_hook(world: Deployment) -> None:
    """on_connect answers fastws.Accept(user=...): the connection is bound to
    that user as by app.bind_user, and a message from another region reaches it."""
    async def main() -> None:
        fay = await Client.connect(world.node("b", 0), "fay", path="/auth")
        gus = await Client.connect(world.node("c", 1), "gus")
        await asyncio.sleep(0.2)
        await gus.send(op="to", user="fay", data="via the auth hook")
        assert (await fay.wait(lambda m: m.get("op") == "dm")) == {"op": "dm", "from": "gus",
                                                                      "data": "via the auth hook"}
        assert (await gus.wait(lambda m: m.get("op") == "sent"))["regions"] == ["b"]
        await fay.send(op="rooms")
        assert (await fay.wait(lambda m: m.get("op") == "rooms"))["rooms"] == []
        await fay.close()
        await gus.close()

    run(main())
