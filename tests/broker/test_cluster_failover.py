"""``redis+cluster://``: the broker follows a Redis Cluster failover.

A cluster of three masters, each with a replica (six ``redis-server``
processes on free ports, node timeout 1 s). The master that owns a
subscribed channel's slot is killed with SIGKILL; the cluster promotes its
replica; the brokers, never restarted, find the new owner and keep the
subscription: a message published after the failover arrives.
"""

from __future__ import annotations

import os
import signal

import pytest
from redis.crc import key_slot

from brokerutil import (
    cluster_role,
    new_prefix,
    publish_until_one_arrives,
    replicated_cluster_start,
    run,
    slot_owner,
    stop_cluster,
    wait_for,
)
from fastws.broker import channel_name, create_broker

K = ("", "failover-room")


@pytest.fixture
def replicated_cluster():
    ports, procs, workdir = replicated_cluster_start()
    try:
        yield ports, procs
    finally:
        stop_cluster(procs, workdir)


def test_cluster_failover_keeps_subscription_without_restart(replicated_cluster):
    ports, procs = replicated_cluster
    url = "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in ports)

    async def main():
        prefix = new_prefix()
        a = create_broker(url, prefix=prefix, node_id="A", backoff_min=0.05, backoff_max=0.5)
        b = create_broker(url, prefix=prefix, node_id="B", backoff_min=0.05, backoff_max=0.5)
        got: list[bytes] = []
        b.set_handler(lambda key, payload, origin: got.append(payload))
        await a.start()
        await b.start()
        try:
            await b.subscribe([K])
            await a.publish(K, b"before")
            await wait_for(lambda: got == [b"before"], 5, "the message before the failover")
            slot = key_slot(channel_name(prefix, K))
            victim = slot_owner(ports[0], slot)
            assert victim in ports and cluster_role(victim) == "master"
            os.kill(procs[victim].pid, signal.SIGKILL)
            procs[victim].wait(5)
            others = [p for p in ports if p != victim]
            # the cluster promotes the victim's replica
            await wait_for(lambda: slot_owner(others[0], slot) not in (None, victim), 30,
                           "a replica promoted for the slot")
            new_owner = slot_owner(others[0], slot)
            assert cluster_role(new_owner) == "master"
            await publish_until_one_arrives(a, K, got)
            after = [p for p in got if p.startswith(b"after")]
            assert len(set(after)) == len(after)
            await a.publish(K, b"last")
            await wait_for(lambda: got[-1] == b"last", 10, "a message through the promoted replica")
        finally:
            await a.close()
            await b.close()

    run(main(), 120)
