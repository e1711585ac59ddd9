"""Regions on a Redis that Sentinel fails over (real processes only).

Region a's Redis is a master with a replica and three Sentinels; its node
runs with ``--broker redis+sentinel://...`` and region b's node reaches it
as the peer ``a=redis+sentinel://...``. Region b has a plain Redis. The
master of a is killed with SIGKILL; the Sentinels promote the replica; no
node restarts, and users of a and b reach each other again both ways.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

from brokerutil import OwnRedis, sentinel_group_start, sentinel_group_stop
from regions_helpers import Client, NodeProc, dm, dms


def test_region_follows_a_sentinel_failover(tmp_path: Path) -> None:
    master, replica, sentinels = sentinel_group_start()
    b_redis = OwnRedis()
    nodes: list[NodeProc] = []
    try:
        a_url = sentinels.url()
        a0 = NodeProc("a", a_url, f"b={b_redis.url}", tmp_path, 0, "--region-directory-ttl", "3")
        b0 = NodeProc("b", b_redis.url, f"a={a_url}", tmp_path, 0, "--region-directory-ttl", "3")
        nodes += [a0, b0]
        a0.wait_health()
        b0.wait_health()

        async def main() -> None:
            alice = await Client.connect(a0, "alice")
            bob = await Client.connect(b0, "bob")
            try:
                await dm(bob, alice, "m1")
                await dm(alice, bob, "r1")

                os.kill(master.proc.pid, signal.SIGKILL)
                master.proc.wait(5)
                deadline = time.monotonic() + 30
                while str(replica.port) not in sentinels.master():
                    assert time.monotonic() < deadline, sentinels.master()
                    await asyncio.sleep(0.2)
                await asyncio.to_thread(a0.wait_health, 200, 30.0)       # its region check passes again

                await dm(bob, alice, "m2")
                await dm(alice, bob, "r2")
                await asyncio.sleep(1.0)                                   # nothing arrives twice
                assert dms(alice) == ["m1", "m2"]
                assert dms(bob) == ["r1", "r2"]
                assert a0.proc.poll() is None and b0.proc.poll() is None   # no node restarted
            finally:
                await alice.close()
                await bob.close()

        asyncio.run(asyncio.wait_for(main(), 240))
    except BaseException:
        for n in nodes:
            print(n.log()[-3000:])
        raise
    finally:
        for n in nodes:
            n.stop()
        b_redis.stop()
        sentinel_group_stop(master, replica, sentinels)
