"""Regions: cross-region latency, one link's throughput, directory lookups.

    python -m fastws.bench.regions [--quick] [--delay 0.04] [--out DIR]

Starts two regions on this machine (``a`` and ``b``), each with its own
``redis-server`` on a free port and one ``fastws serve
fastws.bench.regions:app`` node, and a TCP proxy (a process of its own,
timed by the OS's sleep, not by an event loop's millisecond timers) through
which each region reaches the other's Redis, adding ``--delay`` seconds each
way (``proxy_late_ms``: how late past the delay it wrote a chunk).  Then,
with a receiving client in b (a minimal WebSocket client that only takes
text frames: little CPU per message) and a sending client in a:

* ``latency``: messages published in a at a moderate rate (``--rate``) to a
  room whose member is in b; each carries its send time; p50/p99/max of
  send -> receive, next to the injected one-way delay (the least it can be);
* ``throughput``: node a publishes ``--messages`` messages of 64 bytes as
  fast as it can to that room; messages/s until the last one is in b (the
  one link a -> b, in order, every message checked), and each process's
  CPU per message meanwhile (``cpu_us_per_message``, from ``/proc``);
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
import base64
import contextlib
import json
import os
import shutil
import signal
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
    """``127.0.0.1:port`` -> ``target``, every chunk ``delay`` seconds later, in
    order: a process of its own (``python -m fastws.bench.regions --proxy``),
    so its work is not the client's, with a thread per direction that holds
    each chunk with ``time.sleep`` (the OS's timer, to within about 0.1 ms;
    an event loop's timers wake up to a millisecond late, which the
    measures would count as the system's).  How late it wrote each chunk
    (past the delay) is in ``late_ms`` after :meth:`close`."""

    def __init__(self, target: int, delay: float, work: Path, name: str) -> None:
        self.target, self.delay, self.port = target, delay, _free_port()
        self.stats = work / f"proxy-{name}.json"
        self.proc: subprocess.Popen[bytes] | None = None
        self.late_ms: dict[str, dict[str, float]] = {}

    async def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "fastws.bench.regions", "--proxy",
                                      f"{self.port}:{self.target}:{self.delay}:{self.stats}"])
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection((HOST, self.port), timeout=0.2):
                    return
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise SystemExit("the delay proxy did not start") from None
                await asyncio.sleep(0.05)

    def phase_done(self) -> None:
        """The latency phase is over: its lateness apart from the rest's."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGUSR1)
            time.sleep(0.05)

    def close(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        with contextlib.suppress(OSError, ValueError):
            self.late_ms = json.loads(self.stats.read_text())


def _proxy_main(spec: str) -> None:
    """The delay proxy's process (see :class:`_Delay`): ``port:target:delay:stats``."""
    import threading

    port, target, delay_s, stats = spec.split(":", 3)
    delay = float(delay_s)
    late: list[float] = []
    server = socket.create_server((HOST, int(port)))

    def pump(src: socket.socket, dst: socket.socket) -> None:
        queue: deque[tuple[float, bytes]] = deque()
        ready = threading.Condition()
        ended = False

        def deliver() -> None:
            while True:
                with ready:
                    while not queue and not ended:
                        ready.wait()
                    if not queue:
                        break
                    due, chunk = queue.popleft()
                wait = due - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
                late.append(time.perf_counter() - due)
                try:
                    dst.sendall(chunk)
                except OSError:
                    break
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

        threading.Thread(target=deliver, daemon=True).start()
        while True:
            try:
                chunk = src.recv(1 << 16)
            except OSError:
                chunk = b""
            with ready:
                if chunk:
                    queue.append((time.perf_counter() + delay, chunk))
                else:
                    ended = True
                ready.notify()
            if not chunk:
                return

    phases: dict[str, dict[str, float]] = {}

    def summary() -> dict[str, float]:
        s = sorted(late) or [0.0]
        return {"chunks": len(late), "p50": round(s[len(s) // 2] * 1000, 3),
                "p99": round(s[min(len(s) - 1, int(0.99 * len(s)))] * 1000, 3), "max": round(s[-1] * 1000, 3)}

    def latency_done(*_: Any) -> None:     # SIGUSR1: what came so far was the latency phase
        phases["latency"] = summary()
        late.clear()

    def stop(*_: Any) -> None:
        phases["after"] = summary()
        Path(stats).write_text(json.dumps(phases))
        os._exit(0)

    signal.signal(signal.SIGUSR1, latency_done)
    signal.signal(signal.SIGTERM, stop)
    while True:
        conn, _ = server.accept()
        try:
            up = socket.create_connection((HOST, int(target)))
        except OSError:
            conn.close()
            continue
        for s in (conn, up):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=pump, args=(conn, up), daemon=True).start()
        threading.Thread(target=pump, args=(up, conn), daemon=True).start()


class _Regions:
    """Regions a and b: a redis-server and a node each, a delay between them."""

    def __init__(self, work: Path, delay: float) -> None:
        self.work, self.delay = work, delay
        self.procs: list[subprocess.Popen[bytes]] = []
        self.named: dict[str, int] = {}        # "redis-a", "node-b" ... -> pid
        self.redis = {r: _free_port() for r in "ab"}
        self.ports = {r: _free_port() for r in "ab"}
        self.proxies = {"a": _Delay(self.redis["b"], delay, work, "a"), "b": _Delay(self.redis["a"], delay, work, "b")}

    async def start(self) -> None:
        for r in "ab":
            self.procs.append(subprocess.Popen(
                ["redis-server", "--port", str(self.redis[r]), "--bind", HOST, "--save", "", "--appendonly", "no",
                 "--dir", str(self.work)], stdout=subprocess.DEVNULL))
            self.named[f"redis-{r}"] = self.procs[-1].pid
        for r, p in self.proxies.items():
            await p.start()
            assert p.proc is not None
            self.named[f"proxy-{r}"] = p.proc.pid
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


class _Receiver(asyncio.Protocol):
    """The receiving client: a minimal WebSocket client that only takes the
    server's (unmasked, unfragmented, uncompressed) text frames and hands
    each to ``sink``.  A full client library (``websockets``) costs about
    12 us of CPU per message on this machine, in the same two cores as the
    system measured; this costs a few, so the throughput figure is the
    link's more than the client's."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.open: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.sink: Any = None

    @classmethod
    async def connect(cls, port: int, path: str) -> _Receiver:
        loop = asyncio.get_running_loop()
        _t, proto = await loop.create_connection(cls, HOST, port)
        assert proto.transport is not None
        key = base64.b64encode(os.urandom(16)).decode()
        proto.transport.write(f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nUpgrade: websocket\r\n"
                              f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                              "Sec-WebSocket-Version: 13\r\n\r\n".encode())
        await asyncio.wait_for(proto.open, 10)
        return proto

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.open.done():
            self.open.set_exception(ConnectionError(f"closed before the upgrade: {exc}"))

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if not self.open.done():
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            if not buf.startswith(b"HTTP/1.1 101"):
                self.open.set_exception(ConnectionError(bytes(buf[:end]).decode("latin-1")))
                return
            del buf[:end + 4]
            self.open.set_result(None)
        pos, n, sink = 0, len(buf), self.sink
        while n - pos >= 2:
            b0, ln = buf[pos], buf[pos + 1] & 0x7F
            head = 2
            if ln == 126:
                if n - pos < 4:
                    break
                ln, head = int.from_bytes(buf[pos + 2:pos + 4], "big"), 4
            elif ln == 127:
                if n - pos < 10:
                    break
                ln, head = int.from_bytes(buf[pos + 2:pos + 10], "big"), 10
            if n - pos < head + ln:
                break
            op = b0 & 0x0F
            body = bytes(buf[pos + head:pos + head + ln])
            pos += head + ln
            if op == 1 and b0 & 0x80:
                sink(body.decode())
            elif op == 9 and self.transport is not None:        # ping: pong (masked with a zero key)
                self.transport.write(bytes((0x8A, 0x80 | len(body))) + b"\x00\x00\x00\x00" + body)
            elif op != 10:
                raise SystemExit(f"receiver: an unexpected frame (opcode {op}, fin {b0 >> 7})")
        del buf[:pos]

    def close(self) -> None:
        if self.transport is not None:
            self.transport.write(b"\x88\x80\x00\x00\x00\x00")      # close, masked with a zero key
            self.transport.close()


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


async def _run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import websockets

    world = _Regions(work, args.delay)
    try:
        await world.start()
        rx = await _Receiver.connect(world.ports["b"], f"/bench?user=rx&join={ROOM}")
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

        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def timed(data: str) -> None:
            now = time.perf_counter()
            seq, sent = data.split()
            if int(seq) != len(lat):
                raise SystemExit(f"latency: message {seq} arrived where {len(lat)} was due")
            lat.append((now - float(sent)) * 1000)
            if len(lat) == args.latency_messages:
                done.set_result(None)

        rx.sink = timed
        sender = asyncio.create_task(send_timed())
        await asyncio.wait_for(done, 30 + args.latency_messages / args.rate)
        await sender
        for p in world.proxies.values():
            p.phase_done()

        # throughput: --messages of 64 bytes through the link a -> b
        pids = {"bench": os.getpid(), **world.named}
        cpu0 = _cpu_seconds(pids)
        flood_done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        count = 0

        marks: dict[int, float] = {}              # arrival times of the 10th and 90th percentile message
        tenth, ninetieth = args.messages // 10, args.messages * 9 // 10

        def counted(data: str) -> None:
            nonlocal count
            if int(data[:10]) != count or len(data) != 64:
                raise SystemExit(f"throughput: message {data[:10]} arrived where {count} was due")
            count += 1
            if count in (tenth, ninetieth):
                marks[count] = time.perf_counter()
            if count == args.messages:
                flood_done.set_result(None)

        rx.sink = counted
        t0 = time.perf_counter()
        await tx.send(json.dumps({"op": "flood", "n": args.messages, "size": 64}))
        await asyncio.wait_for(flood_done, 120)
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
        rx.close()
        await tx.close()
    finally:
        world.stop()
    return {
        "delay_ms": args.delay * 1000,
        "latency_ms": {"messages": len(lat), "rate_per_s": args.rate, "p50": round(statistics.median(lat), 2),
                       "p99": round(_pct(lat, 0.99), 2), "max": round(max(lat), 2)},
        "throughput": {"messages": args.messages, "size": 64, "seconds": round(took, 3),
                       "per_second": round(args.messages / took),
                       # between the arrivals of the 10th and the 90th percentile message: the link's
                       # rate once it is full, without the delay of filling and draining it
                       "steady_per_second": (round((ninetieth - tenth) / (marks[ninetieth] - marks[tenth]))
                                             if len(marks) == 2 and marks[ninetieth] > marks[tenth] else None),
                       # CPU (user + system) per message of each process during the phase
                       "cpu_us_per_message": cpu_us},
        "lookups_per_second": rates,
        # how late the delay proxies wrote a chunk, past the delay: during the
        # latency phase, and after it (the throughput phase saturates the cores)
        "proxy_late_ms": {r: p.late_ms for r, p in world.proxies.items()},
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
    p.add_argument("--proxy", help=argparse.SUPPRESS)     # the delay proxy's own process (port:target:delay:stats)
    args = p.parse_args(argv)
    if args.proxy:
        _proxy_main(args.proxy)
        return
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
