"""``redis+cluster://``: the broker follows a Redis Cluster failover.

A cluster of three masters, each with a replica (six ``redis-server``
processes on free ports, node timeout 1 s). The master that owns a
subscribed channel's slot is killed with SIGKILL; the cluster promotes its
replica; the brokers, never restarted, find the new owner and keep the
subscription: a message published after the failover arrives.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import tempfile
import time

import pytest
from redis.crc import key_slot

from brokerutil import free_port, new_prefix, redis_cli, run, wait_for
from fastws.broker import PublishError, channel_name, create_broker

K = ("", "failover-room")


@pytest.fixture
def replicated_cluster():
    if not (shutil.which("redis-server") and shutil.which("redis-cli")):
        pytest.fail("redis-server / redis-cli not installed (bash .ci/run installs them)")
    workdir = tempfile.mkdtemp(prefix="fastws-cluster-ha-")
    ports: list[int] = []
    while len(ports) < 6:
        p = free_port(bus=True)
        if p not in ports:
            ports.append(p)
    procs = {p: subprocess.Popen(
        ["redis-server", "--port", str(p), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
         "--cluster-config-file", f"nodes-{p}.conf", "--cluster-node-timeout", "1000",
         "--repl-diskless-sync-delay", "0", "--cluster-replica-validity-factor", "0",
         "--save", "", "--appendonly", "no", "--dir", workdir, "--logfile", f"redis-{p}.log"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for p in ports}
    try:
        deadline = time.monotonic() + 15
        for p in ports:
            while "PONG" not in redis_cli(p, "PING"):
                assert time.monotonic() < deadline, f"redis-server on {p} did not start"
                time.sleep(0.05)
        out = subprocess.run(["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports),
                              "--cluster-replicas", "1", "--cluster-yes"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
        deadline = time.monotonic() + 40
        for p in ports:
            while "cluster_state:ok" not in redis_cli(p, "CLUSTER", "INFO"):
                assert time.monotonic() < deadline, "cluster did not become ok"
                time.sleep(0.1)
        # every replica has synced with its master (a replica that never did is not promoted)
        for p in ports:
            while _role(p) != "master" and "master_link_status:up" not in redis_cli(p, "INFO", "replication"):
                assert time.monotonic() < deadline, f"replica {p} did not sync"
                time.sleep(0.1)
        yield ports, procs
    finally:
        for pr in procs.values():
            if pr.poll() is None:
                pr.terminate()
        for pr in procs.values():
            try:
                pr.wait(10)
            except subprocess.TimeoutExpired:
                pr.kill()
        shutil.rmtree(workdir, ignore_errors=True)


def _role(port: int) -> str:
    return redis_cli(port, "ROLE").split("\n", 1)[0].strip()


def _owner(port: int, slot: int) -> int | None:
    """The port of the master that ``port``'s view of the cluster gives ``slot``."""
    for line in redis_cli(port, "CLUSTER", "NODES").splitlines():
        f = line.split()
        if len(f) < 9 or "master" not in f[2] or "fail" in f[2]:
            continue
        for r in f[8:]:
            lo, _, hi = r.partition("-")
            if lo.isdigit() and int(lo) <= slot <= int(hi or lo):
                return int(f[1].split("@")[0].rsplit(":", 1)[1])
    return None


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
            victim = _owner(ports[0], slot)
            assert victim in ports and _role(victim) == "master"
            os.kill(procs[victim].pid, signal.SIGKILL)
            procs[victim].wait(5)
            others = [p for p in ports if p != victim]
            # the cluster promotes the victim's replica
            await wait_for(lambda: _owner(others[0], slot) not in (None, victim), 30,
                           "a replica promoted for the slot")
            new_owner = _owner(others[0], slot)
            assert _role(new_owner) == "master"
            failed, i = 0, 0
            deadline = time.monotonic() + 40
            while not any(p.startswith(b"after") for p in got):
                assert time.monotonic() < deadline, (a.state, b.state, a.problem, b.problem, failed)
                i += 1
                try:
                    await a.publish(K, b"after-%d" % i)
                except PublishError:
                    failed += 1
                await asyncio.sleep(0.2)
            after = [p for p in got if p.startswith(b"after")]
            assert len(set(after)) == len(after)
            await a.publish(K, b"last")
            await wait_for(lambda: got[-1] == b"last", 10, "a message through the promoted replica")
        finally:
            await a.close()
            await b.close()

    run(main(), 120)
