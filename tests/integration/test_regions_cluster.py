"""Regions on a Redis Cluster that fails over (real processes only).

Region a's Redis is a Redis Cluster of three masters, each with a replica
(six ``redis-server`` processes, node timeout 1 s); its two nodes run with
``--broker redis+cluster://...`` and region b's node reaches it as the peer
``a=redis+cluster://...``.  Region b has a plain Redis.  Users on both nodes
of a and on b reach each other, and a room spanning both regions gets every
message once, each publisher's in order.  Then the master that owns the slot
of a's link (``{a}``: its outboxes, its inbound stream, its leases) is killed
with SIGKILL; the cluster promotes its replica; no node restarts.  What b
sent meanwhile is delivered after the failover, and afterwards users and the
room work both ways again: nothing lost, nothing twice, order kept.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest
from redis.crc import key_slot

from brokerutil import OwnRedis, redis_cli, replicated_cluster_start, slot_owner, stop_cluster
from regions_helpers import Client, NodeProc, dm, dms


def _msgs(c: Client, room: str, pub: str) -> list[int]:
    return [int(m["data"].split(":")[1]) for m in c.of("msg", room=room) if m["data"].startswith(pub + ":")]


@pytest.mark.timeout(300)
def test_region_on_a_redis_cluster_follows_a_failover(tmp_path: Path) -> None:
    ports, procs, workdir = replicated_cluster_start()
    b_redis = OwnRedis()
    nodes: list[NodeProc] = []
    try:
        a_url = "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in ports)
        ttl = ("--region-directory-ttl", "3")
        a0 = NodeProc("a", a_url, f"b={b_redis.url}", tmp_path, 0, *ttl)
        a1 = NodeProc("a", a_url, f"b={b_redis.url}", tmp_path, 1, *ttl)
        b0 = NodeProc("b", b_redis.url, f"a={a_url}", tmp_path, 0, *ttl)
        nodes += [a0, a1, b0]
        for n in nodes:
            n.wait_health()
        link_slot = key_slot(b"a")           # the slot of "{a}"
        victim = slot_owner(ports[0], link_slot)
        assert victim is not None

        async def main() -> None:
            alice = await Client.connect(a0, "alice")
            carol = await Client.connect(a1, "carol")
            bob = await Client.connect(b0, "bob")
            users = [alice, carol, bob]
            try:
                for c in users:
                    await c.join("room")
                await asyncio.sleep(0.5)
                await dm(bob, alice, "m1")
                await dm(bob, carol, "c1")
                await dm(alice, bob, "r1")
                for i in range(20):
                    await bob.send(op="pub", room="room", data=f"b:{i}")
                    await alice.send(op="pub", room="room", data=f"a:{i}")
                for c in users:
                    await c.wait_count("msg", 40, room="room")
                # both nodes of a take what other regions send from the link's master
                [deliver] = redis_cli(victim, "PUBSUB", "CHANNELS", "*deliver*").split()
                assert deliver == "fastws:region:{a}:deliver"
                assert redis_cli(victim, "PUBSUB", "NUMSUB", deliver).split() == [deliver, "2"]

                os.kill(procs[victim].pid, signal.SIGKILL)
                procs[victim].wait(5)
                # what b sends while a's link has no master waits in b's outbox
                for i in range(20, 30):
                    await bob.send(op="pub", room="room", data=f"b:{i}")
                deadline = time.monotonic() + 60
                while slot_owner(next(p for p in ports if p != victim), link_slot) in (None, victim):
                    assert time.monotonic() < deadline, "no replica was promoted"
                    await asyncio.sleep(0.2)
                for n in (a0, a1):
                    await asyncio.to_thread(n.wait_health, 200, 60.0)

                await dm(bob, alice, "m2")
                await dm(bob, carol, "c2")
                await dm(alice, bob, "r2")
                for i in range(20, 40):
                    await alice.send(op="pub", room="room", data=f"a:{i}")
                for i in range(30, 40):
                    await bob.send(op="pub", room="room", data=f"b:{i}")
                for c in users:
                    await c.wait_count("msg", 80, room="room", timeout=60)
                await asyncio.sleep(1.0)                                   # nothing arrives twice
                assert dms(alice) == ["m1", "m2"]
                assert dms(carol) == ["c1", "c2"]
                assert dms(bob) == ["r1", "r2"]
                for c in users:
                    assert _msgs(c, "room", "a") == list(range(40)), (c.user, _msgs(c, "room", "a"))
                    assert _msgs(c, "room", "b") == list(range(40)), (c.user, _msgs(c, "room", "b"))
                    assert len(c.of("msg", room="room")) == 80
                assert all(n.proc.poll() is None for n in nodes)            # no node restarted
                assert a0.get_json("/regions")[1]["region"] == "a"
            finally:
                for c in users:
                    await c.close()

        asyncio.run(asyncio.wait_for(main(), 240))
    except BaseException:
        for n in nodes:
            print(n.log()[-4000:])
        raise
    finally:
        for n in nodes:
            n.stop()
        b_redis.stop()
        stop_cluster(procs, workdir)
