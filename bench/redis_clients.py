"""fastws's own RESP connection against redis-py, on what the brokers do per message.

    python bench/redis_clients.py [--url redis://127.0.0.1:6379/0] [--n 100000] [--repeat 3] [--json FILE]

The brokers and the regions' message path talk to Redis through
:class:`fastws.broker.redis.RespConn` (a hand-written RESP client: each
command written at once, answers matched in order, pushes parsed in the
same protocol object) rather than redis-py. This measures, against one
Redis, in one run, alternating the clients (medians of ``--repeat``), each
in a process of its own:

* ``publish``: ``n`` PUBLISHes of a 64-byte payload to a channel nobody
  listens to, as a broker sends them: RespConn (each command written at
  once, the answers awaited together), redis-py one ``await publish()`` at
  a time, and redis-py pipelines of 100 (``transaction=False``, the best it
  offers for many commands in flight);
* ``receive``: ``n`` pub/sub messages of 64 bytes delivered to a subscriber
  (a RespConn in push mode, and redis-py's ``PubSub`` read with
  ``get_message``), published by a RespConn from another process (so the
  rate is the publisher's; the subscriber's CPU per message is the figure).

Reported: messages per second and the client process's CPU per message
(user + system). Traffic to the given loopback Redis only; bounded by
``n``; channels carry a random suffix.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from urllib.parse import urlsplit

import redis.asyncio as aioredis

from fastws.broker.redis import open_conn, parse_redis_url

PAYLOAD = b"x" * 64
WINDOW = 1000          # RespConn: commands in flight at once


async def _resp(url: str):
    o = parse_redis_url(url)
    return await open_conn(o["host"], o["port"], ssl=o["ssl"], username=o["username"], password=o["password"],
                           db=o["db"])


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


async def publish_respconn(url: str, n: int, channel: str) -> tuple[float, float]:
    conn = await _resp(url)
    await conn.send(b"PING")
    t0, c0 = _clock()
    pending = []
    for _ in range(n):
        pending.append(conn.send(b"PUBLISH", channel, PAYLOAD))
        if len(pending) >= WINDOW:
            await asyncio.gather(*pending)
            pending.clear()
    await asyncio.gather(*pending)
    t1, c1 = _clock()
    conn.close()
    return t1 - t0, c1 - c0


async def publish_redispy(url: str, n: int, channel: str) -> tuple[float, float]:
    r = aioredis.from_url(url)
    await r.ping()
    t0, c0 = _clock()
    for _ in range(n):
        await r.publish(channel, PAYLOAD)
    t1, c1 = _clock()
    await r.aclose()
    return t1 - t0, c1 - c0


async def publish_redispy_pipeline(url: str, n: int, channel: str) -> tuple[float, float]:
    r = aioredis.from_url(url)
    await r.ping()
    t0, c0 = _clock()
    for start in range(0, n, 100):
        pipe = r.pipeline(transaction=False)
        for _ in range(min(100, n - start)):
            pipe.publish(channel, PAYLOAD)
        await pipe.execute()
    t1, c1 = _clock()
    await r.aclose()
    return t1 - t0, c1 - c0


async def receive_respconn(url: str, n: int, channel: str, ready) -> None:
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    count = [0]

    def on_push(msg) -> None:
        if msg and msg[0] == b"message":
            count[0] += 1
            if count[0] == n and not done.done():
                done.set_result(None)

    o = parse_redis_url(url)
    conn = await open_conn(o["host"], o["port"], ssl=o["ssl"], username=o["username"], password=o["password"],
                           db=o["db"], on_push=on_push)
    await conn.send(b"SUBSCRIBE", channel)
    ready()
    await asyncio.wait_for(done, 120)
    conn.close()


async def receive_redispy(url: str, n: int, channel: str, ready) -> None:
    r = aioredis.from_url(url)
    ps = r.pubsub(ignore_subscribe_messages=True)
    await ps.subscribe(channel)
    await ps.get_message(timeout=1.0)           # the subscribe confirmation
    ready()
    count = 0
    deadline = time.monotonic() + 120
    while count < n and time.monotonic() < deadline:
        msg = await ps.get_message(timeout=1.0)
        if msg is not None and msg["type"] == "message":
            count += 1
    await ps.aclose()
    await r.aclose()
    if count < n:
        raise RuntimeError(f"redis-py received {count} of {n} messages")


PUBLISHERS = {"respconn": publish_respconn, "redis-py": publish_redispy,
              "redis-py-pipeline": publish_redispy_pipeline}
RECEIVERS = {"respconn": receive_respconn, "redis-py": receive_redispy}


def _child(kind: str, client: str, url: str, n: int, channel: str) -> None:
    import uvloop

    async def main():
        if kind == "publish":
            return await PUBLISHERS[client](url, n, channel)
        started = {}

        def ready():
            print("ready", flush=True)
            started["t"], started["c"] = time.perf_counter(), time.process_time()

        await RECEIVERS[client](url, n, channel, ready)
        return time.perf_counter() - started["t"], time.process_time() - started["c"]

    elapsed, cpu = uvloop.run(main())
    print(json.dumps({"msgs_per_s": n / elapsed, "cpu_us_per_msg": cpu / n * 1e6}), flush=True)


def _run(kind: str, client: str, url: str, n: int) -> dict:
    channel = f"bench-redis-clients-{uuid.uuid4().hex[:8]}"
    argv = [sys.executable, os.path.abspath(__file__), "--child", kind, client, "--url", url, "--n", str(n),
            "--channel", channel]
    if kind == "publish":
        out = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        return json.loads(out.stdout.strip().splitlines()[-1])
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        raise RuntimeError("the subscriber did not start")
    pub = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", "publish", "respconn", "--url", url,
                          "--n", str(n), "--channel", channel], capture_output=True, text=True, timeout=300)
    if pub.returncode:
        raise RuntimeError(pub.stderr)
    out, _ = proc.communicate(timeout=300)
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="redis://127.0.0.1:6379/0")
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", default=None, help="write the results to this file")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--channel", default="", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    host = urlsplit(a.url).hostname or ""
    if not (host.startswith("127.") or host == "localhost"):
        p.error("--url: a loopback Redis only")
    if a.child:
        _child(a.child[0], a.child[1], a.url, a.n, a.channel)
        return
    results: dict = {"n": a.n, "repeat": a.repeat, "payload_bytes": len(PAYLOAD), "url": a.url, "runs": {}}
    plan = [("publish", c) for c in PUBLISHERS] + [("receive", c) for c in RECEIVERS]
    for _ in range(a.repeat):
        for kind, client in plan:                # alternated: drift hits every client alike
            results["runs"].setdefault(f"{kind}/{client}", []).append(_run(kind, client, a.url, a.n))
    print(f"{a.n:,} messages of {len(PAYLOAD)} B, median of {a.repeat}\n")
    print("| what | client | msg/s | client CPU µs/msg |\n|---|---|---:|---:|")
    summary = {}
    for key, runs in results["runs"].items():
        kind, client = key.split("/")
        rate = statistics.median(r["msgs_per_s"] for r in runs)
        cpu = statistics.median(r["cpu_us_per_msg"] for r in runs)
        summary[key] = {"msgs_per_s": rate, "cpu_us_per_msg": cpu}
        print(f"| {kind} | {client} | {rate:,.0f} | {cpu:.2f} |")
    results["summary"] = summary
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
