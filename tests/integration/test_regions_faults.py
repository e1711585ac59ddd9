"""Regions under faults: a bounded queue for a region cut off, and the
region's reader killed while messages flow.

Two regions (a, b), each with its own ``redis-server`` and two ``fastws
serve`` nodes, 40 ms between them, ``--region-queue-max 5``; real
``websockets`` clients.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fastws.regions import CACHE_TTL
from regions_helpers import Client, Deployment

QUEUE_MAX = 5


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    d = Deployment(tmp_path_factory.mktemp("regions-faults"), names=("a", "b"),
                   extra=("--region-queue-max", str(QUEUE_MAX)))
    try:
        yield d
    finally:
        d.stop()


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(asyncio.wait_for(coro, 120))


def _data(c: Client, room: str) -> list[str]:
    return [m["data"] for m in c.of("msg", room=room)]


@pytest.mark.timeout(180)
def test_queue_for_a_cut_off_region_is_bounded_and_counted(world: Deployment) -> None:
    """With the link a-b cut, a publishes 12 messages for a room with members
    in b: a keeps the newest 5 for b and drops 7, counted in /metrics
    (reason length) and /regions; healed, b's members get exactly the 5
    kept, in order."""
    async def main() -> None:
        pub = await Client.connect(world.node("a", 0), "pub")
        members = [await Client.connect(world.node("b", i), f"bq{i}") for i in range(2)]
        for m in members:
            await m.join("bounded")
        await asyncio.sleep(0.5)
        world.cut("a", "b")
        try:
            for i in range(12):
                await pub.send(op="pub", room="bounded", data=f"m{i}")
            deadline = time.monotonic() + 15
            while True:
                dropped = sum(n.metric("fastws_region_dropped_total", peer="b", reason="length")
                              for n in world.nodes["a"])
                if dropped >= 7:
                    break
                assert time.monotonic() < deadline, dropped
                await asyncio.sleep(0.2)
            assert dropped == 7
            doc = world.node("a", 1).get_json("/regions")[1]
            peer_b = next(r for r in doc["regions"] if r["name"] == "b")
            assert peer_b["dropped"]["length"] == 7 and peer_b["queued"] == QUEUE_MAX, doc
            assert all(_data(m, "bounded") == [] for m in members)
        finally:
            world.heal("a", "b")
        for m in members:
            await m.wait_count("msg", QUEUE_MAX, room="bounded", timeout=30)
        await asyncio.sleep(1.0)
        for m in members:
            assert _data(m, "bounded") == [f"m{i}" for i in range(7, 12)]
        for c in (pub, *members):
            await c.close()

    run(main())


@pytest.fixture
def own_world(tmp_path: Path) -> Iterator[Deployment]:
    """Regions a and b with the default queue bound (a test that kills a node)."""
    d = Deployment(tmp_path, names=("a", "b"), extra=("--region-directory-ttl", "3"))
    try:
        yield d
    finally:
        d.stop()


@pytest.mark.timeout(180)
def test_reader_killed_another_node_takes_over(own_world: Deployment) -> None:
    """The node of b that delivers what a sends (the reader) is killed
    (SIGKILL) while a publishes 80 messages: the other node of b takes over,
    and its member gets all 80 once, in order; nothing was dropped.  The
    user who was connected to the killed node leaves b's directory when its
    entry's TTL (3 s) runs out: nobody is told the user is anywhere."""
    world = own_world

    async def main() -> None:
        docs = [n.get_json("/regions")[1] for n in world.nodes["b"]]
        assert sum(d["reader"] for d in docs) == 1, docs
        victim = next(n for n, d in zip(world.nodes["b"], docs, strict=True) if d["reader"])
        survivor = next(n for n in world.nodes["b"] if n is not victim)
        member = await Client.connect(survivor, "survivor")
        ghost = await Client.connect(victim, "ghost")
        await member.join("failover")
        pub = await Client.connect(world.node("a", 1), "pub2")
        await asyncio.sleep(0.5)
        await pub.send(op="to", user="ghost", data="are you there")
        assert (await pub.wait(lambda m: m.get("op") == "sent"))["regions"] == ["b"]
        await ghost.wait(lambda m: m.get("op") == "dm")
        for i in range(80):
            await pub.send(op="pub", room="failover", data=f"m{i}")
            if i == 20:
                victim.proc.send_signal(signal.SIGKILL)
            await asyncio.sleep(0.025)
        await member.wait_count("msg", 80, room="failover", timeout=30)
        await asyncio.sleep(1.0)
        assert _data(member, "failover") == [f"m{i}" for i in range(80)]
        assert survivor.get_json("/regions")[1]["reader"] is True
        for n in world.nodes["a"]:
            assert n.metric("fastws_region_dropped_total", peer="b", reason="length") == 0
        await asyncio.sleep(3.0 + CACHE_TTL + 0.5)    # the entry's TTL, then the cache's
        await pub.send(op="to", user="ghost", data="still there?")
        sent = await pub.wait(lambda m: m.get("op") == "sent" and m["data"] == "still there?")
        assert sent["regions"] == [], sent
        await ghost.close()
        await member.close()
        await pub.close()

    run(main())


@pytest.mark.timeout(120)
def test_graceful_stop_takes_its_users_out_of_the_directory(own_world: Deployment) -> None:
    """A node stopped with SIGTERM removes its users from its region's
    directory as it stops (not a TTL later): right after, nobody is told the
    user is anywhere, while the same user on the region's other node stays."""
    world = own_world

    async def main() -> None:
        stays = await Client.connect(world.node("b", 1), "stays")
        leaves = await Client.connect(world.node("b", 0), "leaves")
        key = "fastws:region:b:user:{}"
        deadline = time.monotonic() + 5
        while not (world.redis["b"].cli("ZCARD", key.format("leaves")) == "1"
                   and world.redis["b"].cli("ZCARD", key.format("stays")) == "1"):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        node = world.node("b", 0)
        node.proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(node.proc.wait, 20)
        assert world.redis["b"].cli("ZCARD", key.format("leaves")) == "0"
        assert world.redis["b"].cli("ZCARD", key.format("stays")) == "1"
        pub = await Client.connect(world.node("a", 0), "asker")
        await pub.send(op="to", user="leaves", data="gone?")
        assert (await pub.wait(lambda m: m.get("op") == "sent"))["regions"] == []
        for c in (stays, leaves, pub):
            await c.close()

    run(main())
