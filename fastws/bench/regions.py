"""Regions: cross-region latency, one link's throughput, directory lookups.

    python -m fastws.bench.regions [--quick] [--delay 0.04] [--out DIR]

Starts two regions on this machine (``a`` and ``b``), each with its own
``redis-server`` on a free port and one ``fastws serve
fastws.bench.regions:app`` node, and a TCP proxy (in this process) through
which each region reaches the other's Redis, adding ``--delay`` seconds each
way.  Then, with a receiving client in b and a sending client in a:

* ``latency``: messages published in a at a moderate rate (``--rate``) to a
  room whose member is in b; each carries its send time; p50/p99/max of
  send -> receive, next to the injected one-way delay (the least it can be);
* ``throughput``: node a publishes ``--messages`` messages of 64 bytes as
  fast as it can to that room; messages/s until the last one is in b (the
  one link a -> b, in order, every message checked);
* ``lookups``: node a asks where a user of b is, ``--lookups`` times, 64 at
  once, answered by the regions' directories (one command to each region's
  Redis, the other region's through the delay), then from its cache.

Everything talks to 127.0.0.1 only and stops by itself.  ``--quick`` is a
smoke run with tiny sizes (checks that every message arrived, in order;
asserts no timing).  Needs ``redis-server`` and ``pip install
"fastws[redis]" websockets``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import deque
from pathlib import Path
from typing import Any

import fastws

HOST = "127.0.0.1"
ROOM = "bench"
app = fastws.App()


# -- the app each node serves -------------------------------------------------------------


@app.on_open("/bench")
def _opened(conn: Any) -> None:
    query = dict(p.split("=", 1) for p in (conn.query_string or "").split("&") if "=" in p)
    if query.get("user"):
        app.bind_user(conn, query["user"])
    if query.get("join"):
        conn.join(query["join"])


@app.on_message("/bench")
async def _command(conn: Any, data: str) -> None:
    cmd = json.loads(data)
    op = cmd["op"]
    if op == "pub":                                    # one message (latency)
        app.publish(ROOM, cmd["data"])
    elif op == "flood":                                # n messages of `size` bytes, as fast as it can
        size = int(cmd["size"])
        for i in range(int(cmd["n"])):
            app.publish(ROOM, f"{i:010d}".ljust(size, "."))
            if i % 2000 == 1999:
                await asyncio.sleep(0)                 # let the writer and the forwarder run
        conn.send(json.dumps({"op": "flooded"}))
    elif op == "lookups":                              # where is `user`: n lookups, 64 at once
        regions = app.node.regions if app.node is not None else None
        assert regions is not None, "serve with --region-peers"
        n, cached, user = int(cmd["n"]), bool(cmd["cached"]), cmd["user"]
        found = await regions.locate(user)
        t0 = time.perf_counter()
        for i in range(0, n, 64):
            await asyncio.gather(*(regions.locate(user, cached=cached) for _ in range(min(64, n - i))))
        took = time.perf_counter() - t0
        conn.send(json.dumps({"op": "lookups", "rate": n / took, "found": sorted(found[0])}))


# -- the deployment -------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


class _Delay:
    """``127.0.0.1:port`` -> ``target``, every chunk ``delay`` seconds later, in order."""

    def __init__(self, target: int, delay: float) -> None:
        self.target, self.delay, self.port = target, delay, _free_port()
        self.server: asyncio.base_events.Server | None = None
        self.links: set[asyncio.BaseTransport] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, HOST, self.port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection(HOST, self.target)
        except OSError:
            writer.transport.abort()
            return
        self.links |= {writer.transport, up_w.transport}
        try:
            await asyncio.gather(self._pump(reader, up_w), self._pump(up_r, writer), return_exceptions=True)
        finally:
            for w in (writer, up_w):
                self.links.discard(w.transport)
                w.transport.abort()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        queue: deque[tuple[float, bytes]] = deque()
        more = asyncio.Event()
        done = False

        async def deliver() -> None:
            while queue or not done:
                if not queue:
                    more.clear()
                    await more.wait()
                    continue
                due, chunk = queue[0]
                if due > loop.time():
                    await asyncio.sleep(due - loop.time())
                queue.popleft()
                writer.write(chunk)

        task = loop.create_task(deliver())
        try:
            while chunk := await reader.read(1 << 16):
                queue.append((loop.time() + self.delay, chunk))
                more.set()
        finally:
            done = True
            more.set()
            with contextlib.suppress(Exception):
                await task

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for t in list(self.links):
            t.abort()                 # the pumps see the end and return


class _Regions:
    """Regions a and b: a redis-server and a node each, a delay between them."""

    def __init__(self, work: Path, delay: float) -> None:
        self.work, self.delay = work, delay
        self.procs: list[subprocess.Popen[bytes]] = []
        self.named: dict[str, int] = {}        # "redis-a", "node-b" ... -> pid
        self.redis = {r: _free_port() for r in "ab"}
        self.ports = {r: _free_port() for r in "ab"}
        self.proxies = {"a": _Delay(self.redis["b"], delay), "b": _Delay(self.redis["a"], delay)}

    async def start(self) -> None:
        for r in "ab":
            self.procs.append(subprocess.Popen(
                ["redis-server", "--port", str(self.redis[r]), "--bind", HOST, "--save", "", "--appendonly", "no",
                 "--dir", str(self.work)], stdout=subprocess.DEVNULL))
            self.named[f"redis-{r}"] = self.procs[-1].pid
        for p in self.proxies.values():
            await p.start()
        for r, other in (("a", "b"), ("b", "a")):
            log = open(self.work / f"node-{r}.log", "wb")  # noqa: SIM115 (closed with the process)
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "fastws", "serve", "fastws.bench.regions:app", "--host", HOST,
                 "--port", str(self.ports[r]), "--broker", f"redis://{HOST}:{self.redis[r]}/0", "--region", r,
                 "--region-peers", f"{other}=redis://{HOST}:{self.proxies[r].port}/0", "--log-level", "warning"],
                stdout=log, stderr=subprocess.STDOUT))
            self.named[f"node-{r}"] = self.procs[-1].pid
        deadline = time.monotonic() + 30
        for r in "ab":
            while not await asyncio.to_thread(self._healthy, r):
                if time.monotonic() > deadline:
                    raise SystemExit(f"node {r} did not start: see {self.work / f'node-{r}.log'}")
                await asyncio.sleep(0.1)

    def _healthy(self, region: str) -> bool:
        try:
            with urllib.request.urlopen(f"http://{HOST}:{self.ports[region]}/health", timeout=1) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def url(self, region: str, query: str) -> str:
        return f"ws://{HOST}:{self.ports[region]}/bench?{query}"

    def stop(self) -> None:
        for p in self.proxies.values():
            p.close()
        for p in reversed(self.procs):
            p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


# -- the measures ------------------------------------------------------------------------------


def _cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds (user + system) each process used so far (Linux's /proc;
    empty elsewhere)."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    out = {}
    for name, pid in pids.items():
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        out[name] = (int(fields[11]) + int(fields[12])) / tick
    return out


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


async def _run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import websockets

    world = _Regions(work, args.delay)
    try:
        await world.start()
        rx = await websockets.connect(world.url("b", f"user=rx&join={ROOM}"), max_size=None)
        tx = await websockets.connect(world.url("a", "user=tx"), max_size=None)
        await asyncio.sleep(0.5)                       # rx's room subscription is acknowledged

        # latency: --latency-messages at --rate, each with its send time
        lat: list[float] = []
        async def send_timed() -> None:
            step = 1.0 / args.rate
            start = time.perf_counter()
            for i in range(args.latency_messages):
                await asyncio.sleep(max(0.0, start + i * step - time.perf_counter()))
                await tx.send(json.dumps({"op": "pub", "data": f"{i} {time.perf_counter()!r}"}))

        sender = asyncio.create_task(send_timed())
        for i in range(args.latency_messages):
            data = await asyncio.wait_for(rx.recv(), 30)
            seq, sent = str(data).split()
            if int(seq) != i:
                raise SystemExit(f"latency: message {seq} arrived where {i} was due")
            lat.append((time.perf_counter() - float(sent)) * 1000)
        await sender

        # throughput: --messages of 64 bytes through the link a -> b
        pids = {"bench": os.getpid(), **world.named}
        cpu0 = _cpu_seconds(pids)
        t0 = time.perf_counter()
        await tx.send(json.dumps({"op": "flood", "n": args.messages, "size": 64}))
        for i in range(args.messages):
            data = await asyncio.wait_for(rx.recv(), 60)
            if int(str(data)[:10]) != i or len(data) != 64:
                raise SystemExit(f"throughput: message {str(data)[:10]} arrived where {i} was due")
        took = time.perf_counter() - t0
        cpu1 = _cpu_seconds(pids)
        cpu_us = {name: round((cpu1[name] - cpu0[name]) * 1e6 / args.messages, 2) for name in cpu1 if name in cpu0}
        flooded = json.loads(await asyncio.wait_for(tx.recv(), 30))
        assert flooded["op"] == "flooded", flooded

        # directory lookups from a for rx (in b): asked, then cached
        rates = {}
        for cached in (False, True):
            n = args.lookups * (100 if cached else 1)
            await tx.send(json.dumps({"op": "lookups", "n": n, "cached": cached, "user": "rx"}))
            answer = json.loads(await asyncio.wait_for(tx.recv(), 120))
            if answer["found"] != ["b"]:
                raise SystemExit(f"lookups: rx found in {answer['found']}, not in b")
            rates["cached" if cached else "asked"] = round(answer["rate"])
        await rx.close()
        await tx.close()
    finally:
        world.stop()
        await asyncio.sleep(0.1)      # the proxy's pumps end before the loop does
    return {
        "delay_ms": args.delay * 1000,
        "latency_ms": {"messages": len(lat), "rate_per_s": args.rate, "p50": round(statistics.median(lat), 2),
                       "p99": round(_pct(lat, 0.99), 2), "max": round(max(lat), 2)},
        "throughput": {"messages": args.messages, "size": 64, "seconds": round(took, 3),
                       "per_second": round(args.messages / took),
                       # CPU (user + system) per message of each process during the phase
                       "cpu_us_per_message": cpu_us},
        "lookups_per_second": rates,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m fastws.bench.regions", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a smoke run: tiny sizes, no timing asserted")
    p.add_argument("--delay", type=float, default=0.04, help="one-way delay between the regions, seconds")
    p.add_argument("--rate", type=float, default=200.0, help="latency: messages per second")
    p.add_argument("--latency-messages", type=int, default=2000)
    p.add_argument("--messages", type=int, default=100_000, help="throughput: 64-byte messages")
    p.add_argument("--lookups", type=int, default=2000, help="directory lookups asked (x100 from the cache)")
    p.add_argument("--out", type=Path, help="also write the results as JSON into this directory")
    args = p.parse_args(argv)
    if args.quick:
        args.delay, args.rate, args.latency_messages, args.messages, args.lookups = 0.02, 100.0, 50, 2000, 100
    if not shutil.which("redis-server"):
        raise SystemExit("redis-server is not installed")
    work = Path(tempfile.mkdtemp(prefix="fastws-bench-regions-"))
    try:
        results = asyncio.run(_run(args, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["quick"] = args.quick
    text = json.dumps(results, indent=2)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        name = ("quick-" if args.quick else "") + time.strftime("regions-%Y%m%d-%H%M%S.json")
        (args.out / name).write_text(text + "\n")


if __name__ == "__main__":
    main()
