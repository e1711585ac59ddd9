"""``fastws bench --clients``: the Python clients against one server, echo msg/s.

One ``fastws serve examples.echo:app`` (the Cython engine, on uvloop) answers
every client; each client runs in its own process on uvloop, one after the
other, ``repeat`` times, alternating, and the median is kept:

* ``pingpong``: one connection, send a 32 B text message and wait for its
  echo, again and again (round trips per second: latency-bound);
* ``pipelined``: one connection, 100 messages in flight (send 100, read 100);
* ``resume``: the room client's resume cost: a subscriber that missed
  ``1000`` messages of a room (``redis+streams://``, loopback Redis)
  reconnects; the time from its new connection to the last replayed message
  (needs ``--redis-url``; skipped without Redis).

* ``live``: the extra latency of a live room message with the Streams
  broker against pub/sub: two nodes on the loopback Redis (``redis://``,
  then ``redis+streams://``), a room client publishing on node A at a fixed
  rate and a room client subscribed on each node; publish-to-receive p50/p99
  per node (needs ``--redis-url``).

Clients: ``fastws`` (``fastws.connect``, ``await recv``), ``fastws-cb``
(``fastws.connect(on_message=...)``: a plain call per message), ``websockets``
(``websockets.asyncio.client``), ``picows`` (its listener callbacks),
``aiohttp`` (``ws_connect``).  Two ceilings that are no WebSocket client at
all: ``raw-loop`` (a uvloop protocol writing one prebuilt masked frame and
counting the echoed bytes, no parsing) and ``raw-blocking`` (the same on a
blocking socket, no event loop): what any Python client on this machine can
reach at most.  A client whose package is missing is skipped and named.
``python -m fastws.bench.clients`` runs it too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import fastws
from fastws.client import Backoff, RoomClient

CLIENTS = ("fastws", "fastws-cb", "websockets", "picows", "aiohttp", "raw-loop", "raw-blocking")
CEILINGS = ("raw-loop", "raw-blocking")
MODES = ("pingpong", "pipelined")
MESSAGE = "x" * 32
WINDOW = 100


# -- one client, one mode (runs in its own process) --------------------------------------------------


async def _drive(send, recv, mode: str, n: int) -> tuple[float, float]:
    """``n`` echoes through awaitable ``send(MESSAGE)`` / ``recv()``: one at a
    time (pingpong) or WINDOW in flight (pipelined); the seconds it took and
    the CPU seconds this process spent meanwhile."""
    t0, c0 = time.perf_counter(), time.process_time()
    if mode == "pingpong":
        for _ in range(n):
            await send(MESSAGE)
            await recv()
    else:
        for _ in range(n // WINDOW):
            for _ in range(WINDOW):
                await send(MESSAGE)
            for _ in range(WINDOW):
                await recv()
    return time.perf_counter() - t0, time.process_time() - c0


async def _fastws(url: str, mode: str, n: int) -> tuple[float, float]:
    ws = await fastws.connect(url, ping_interval=None, max_queue=10 * WINDOW)
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        if mode == "pingpong":
            for _ in range(n):
                await ws.send(MESSAGE)
                await ws.recv()
        else:
            for _ in range(n // WINDOW):
                for _ in range(WINDOW):
                    ws.send_nowait(MESSAGE)
                for _ in range(WINDOW):
                    await ws.recv()
        return time.perf_counter() - t0, time.process_time() - c0
    finally:
        await ws.close()


async def _fastws_cb(url: str, mode: str, n: int) -> tuple[float, float]:
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    state = {"left": n, "ws": None, "batch": 0}

    def on_message_pingpong(message):
        state["left"] -= 1
        if state["left"]:
            state["ws"].send_nowait(MESSAGE)
        elif not done.done():
            done.set_result(None)

    def on_message_pipelined(message):
        state["left"] -= 1
        state["batch"] -= 1
        if not state["left"]:
            if not done.done():
                done.set_result(None)
        elif not state["batch"]:
            state["batch"] = WINDOW
            for _ in range(WINDOW):
                state["ws"].send_nowait(MESSAGE)

    cb = on_message_pingpong if mode == "pingpong" else on_message_pipelined
    ws = state["ws"] = await fastws.connect(url, ping_interval=None, on_message=cb)
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        if mode == "pingpong":
            ws.send_nowait(MESSAGE)
        else:
            state["batch"] = WINDOW
            for _ in range(WINDOW):
                ws.send_nowait(MESSAGE)
        await done
        return time.perf_counter() - t0, time.process_time() - c0
    finally:
        await ws.close()


async def _websockets(url: str, mode: str, n: int) -> tuple[float, float]:
    from websockets.asyncio.client import connect

    async with connect(url, ping_interval=None, compression=None, max_size=None) as ws:
        return await _drive(ws.send, ws.recv, mode, n)


async def _aiohttp(url: str, mode: str, n: int) -> tuple[float, float]:
    import aiohttp

    async with aiohttp.ClientSession() as session, \
            session.ws_connect(url, autoping=False, compress=0, max_msg_size=0) as ws:
        return await _drive(ws.send_str, ws.receive, mode, n)


async def _picows(url: str, mode: str, n: int) -> tuple[float, float]:
    from picows import WSListener, WSMsgType, ws_connect

    loop = asyncio.get_running_loop()
    done = loop.create_future()
    payload = MESSAGE.encode()

    class Client(WSListener):
        left = n
        batch = 0

        def on_ws_frame(self, transport, frame):
            if frame.msg_type != WSMsgType.TEXT:
                return
            self.left -= 1
            if mode == "pingpong":
                if self.left:
                    transport.send(WSMsgType.TEXT, payload)
                elif not done.done():
                    done.set_result(None)
                return
            self.batch -= 1
            if not self.left:
                if not done.done():
                    done.set_result(None)
            elif not self.batch:
                self.batch = WINDOW
                for _ in range(WINDOW):
                    transport.send(WSMsgType.TEXT, payload)

    transport, client = await ws_connect(Client, url)
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        if mode == "pingpong":
            transport.send(WSMsgType.TEXT, payload)
        else:
            client.batch = WINDOW
            for _ in range(WINDOW):
                transport.send(WSMsgType.TEXT, payload)
        await done
        return time.perf_counter() - t0, time.process_time() - c0
    finally:
        transport.disconnect()


def _raw_frames(url: str) -> tuple[str, int, bytes, bytes, int]:
    """(host, port, upgrade request, one masked 32 B text frame, the echo's size)."""
    from urllib.parse import urlsplit

    u = urlsplit(url)
    host, port = u.hostname or "127.0.0.1", u.port or 80
    request = (f"GET {u.path or '/'} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
               "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
               "Sec-WebSocket-Version: 13\r\n\r\n").encode()
    payload, mask = MESSAGE.encode(), b"\x01\x02\x03\x04"
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return host, port, request, bytes([0x81, 0x80 | len(payload)]) + mask + masked, 2 + len(payload)


async def _raw_loop(url: str, mode: str, n: int) -> tuple[float, float]:
    """The ceiling of a client on the event loop: the upgrade by hand, then one
    prebuilt frame (or WINDOW of them in one write) per echo awaited, the echoed
    bytes counted, never parsed."""
    host, port, request, frame, echo = _raw_frames(url)
    loop = asyncio.get_running_loop()
    done, upgraded = loop.create_future(), loop.create_future()
    batch = frame * WINDOW

    class Raw(asyncio.Protocol):
        def __init__(self) -> None:
            self.head, self.pending, self.left = b"", 0, n

        def connection_made(self, transport) -> None:
            self.t = transport
            transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            transport.write(request)

        def data_received(self, data: bytes) -> None:
            if not upgraded.done():
                self.head += data
                if b"\r\n\r\n" in self.head:
                    upgraded.set_result(self.head.startswith(b"HTTP/1.1 101"))
                return
            self.pending += len(data)
            want = echo if mode == "pingpong" else echo * WINDOW
            while self.pending >= want:
                self.pending -= want
                self.left -= 1 if mode == "pingpong" else WINDOW
                if self.left <= 0:
                    if not done.done():
                        done.set_result(None)
                    return
                self.t.write(frame if mode == "pingpong" else batch)

    transport, proto = await loop.create_connection(Raw, host, port)
    try:
        if not await upgraded:
            raise RuntimeError("upgrade refused")
        t0, c0 = time.perf_counter(), time.process_time()
        transport.write(frame if mode == "pingpong" else batch)
        await done
        return time.perf_counter() - t0, time.process_time() - c0
    finally:
        transport.abort()


async def _raw_blocking(url: str, mode: str, n: int) -> tuple[float, float]:
    """The ceiling without an event loop: the same bytes on a blocking socket."""
    host, port, request, frame, echo = _raw_frames(url)
    sock = socket.create_connection((host, port))
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(request)
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(4096)
        if not head.startswith(b"HTTP/1.1 101"):
            raise RuntimeError("upgrade refused")
        out, want = (frame, echo) if mode == "pingpong" else (frame * WINDOW, echo * WINDOW)
        recv_into, buf = sock.recv_into, bytearray(want)
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(n if mode == "pingpong" else n // WINDOW):
            sock.sendall(out)
            got = 0
            while got < want:
                k = recv_into(memoryview(buf)[got:])
                if not k:
                    raise RuntimeError("closed by the server")
                got += k
        return time.perf_counter() - t0, time.process_time() - c0
    finally:
        sock.close()


#: the server of the resume measurement: the room protocol and a publish route
app = fastws.App()
rooms = app.rooms_endpoint("/rt", history_limit=100_000)


@app.http("GET", "/publish")
def _publish(request):
    q = request.query
    for i in range(int(q.get("count", "1"))):
        rooms.publish(q["room"], f"{q.get('text', '')}#{i}")
    return 200, "ok", "text/plain"


RUNNERS = {"fastws": _fastws, "fastws-cb": _fastws_cb, "websockets": _websockets, "picows": _picows,
           "aiohttp": _aiohttp, "raw-loop": _raw_loop, "raw-blocking": _raw_blocking}
PACKAGES = {"fastws": "fastws", "fastws-cb": "fastws", "websockets": "websockets", "picows": "picows",
            "aiohttp": "aiohttp", "raw-loop": "uvloop", "raw-blocking": "socket"}


async def _resume(url: str, http: str, missed: int) -> dict:
    """A room subscriber misses ``missed`` messages, then reconnects: seconds
    from its new connection to the last replayed message."""
    import urllib.request

    got = []
    rt = await RoomClient(url, backoff=Backoff(0.01, 0.02), ping_interval=None)
    sub = await rt.subscribe("bench-resume", got.append)
    position = sub.position
    await rt.close()
    await asyncio.to_thread(urllib.request.urlopen, f"{http}/publish?room=bench-resume&text=m&count={missed}")
    got.clear()
    t0 = time.perf_counter()
    rt = await RoomClient(url, backoff=Backoff(0.01, 0.02), ping_interval=None)
    t_connected = time.perf_counter()
    sub = await rt.subscribe("bench-resume", got.append, since=position)
    while len(got) < missed:
        await asyncio.sleep(0.0005)
    t_end = time.perf_counter()
    await rt.close()
    assert sub.recovered is True, "the resume was not complete"
    return {"seconds": t_end - t_connected, "connect_seconds": t_connected - t0, "messages": len(got)}


async def _live(url_a: str, url_b: str, n: int, rate: float) -> dict:
    """``n`` room messages published on node A at ``rate`` per second (each
    carrying its send time), received by a subscriber on node A and one on
    node B: publish-to-receive latencies per node, µs."""
    lat: dict[str, list[float]] = {"a": [], "b": []}
    room = "bench-live"

    def handler(node: str):
        def on(message) -> None:
            lat[node].append((time.perf_counter_ns() - int(message.data)) / 1000)
        return on

    subs = [await RoomClient(u, backoff=Backoff(0.01, 0.02), ping_interval=None) for u in (url_a, url_b)]
    for node, client in zip("ab", subs, strict=True):
        await client.subscribe(room, handler(node))
    pub = await RoomClient(url_a, backoff=Backoff(0.01, 0.02), ping_interval=None)
    await pub.publish(room, str(time.perf_counter_ns()))     # the path is live on both nodes
    deadline = time.monotonic() + 10
    while min(len(v) for v in lat.values()) < 1 and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    for v in lat.values():
        v.clear()
    t0 = time.perf_counter()
    for i in range(n):
        await asyncio.sleep(max(0.0, t0 + i / rate - time.perf_counter()))
        await pub.publish(room, str(time.perf_counter_ns()), ack=False)
    deadline = time.monotonic() + 10
    while min(len(v) for v in lat.values()) < n and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    for client in (*subs, pub):
        await client.close()

    def pct(v: list[float], q: float) -> float:
        v = sorted(v)
        return v[min(len(v) - 1, int(q * len(v)))] if v else float("nan")

    return {node: {"received": len(v), "p50_us": pct(v, 0.5), "p99_us": pct(v, 0.99)} for node, v in lat.items()}


def _child(args) -> None:
    import uvloop

    if args.client == "resume":
        result = uvloop.run(_resume(args.url, args.http, args.n))
    elif args.client == "live":
        result = uvloop.run(_live(args.url, args.http, args.n, args.rate))
    else:
        elapsed, cpu = uvloop.run(RUNNERS[args.client](args.url, args.mode, args.n))
        result = {"msgs_per_s": args.n / elapsed, "seconds": elapsed, "cpu_us_per_msg": cpu / args.n * 1e6}
    print(json.dumps(result))


# -- the parent: servers, alternation, the table ----------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(app: str, *extra: str):
    port = _free_port()
    env = dict(os.environ)
    env.pop("FASTWS_NO_EXTENSIONS", None)
    proc = subprocess.Popen([sys.executable, "-m", "fastws", "serve", app, "--host", "127.0.0.1", "--port", str(port),
                             "--log-level", "warning", "--ping-interval", "0", *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            cwd=str(Path(__file__).resolve().parents[2]))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc, port
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"could not start fastws serve {app}")


def _run_child(*argv: str, timeout: float = 300.0) -> dict:
    out = subprocess.run([sys.executable, "-m", "fastws.bench.clients", "--child", *argv], capture_output=True,
                         text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _delete_keys(redis_url: str, prefix: str) -> None:
    """Delete the resume measurement's streams (``fastws:<prefix>:*``)."""
    try:
        import redis
    except ImportError:
        return                                  # they expire with the streams' ttl
    try:
        r = redis.Redis.from_url(redis_url, socket_timeout=5)
        keys = list(r.scan_iter(match=f"fastws:{prefix}:*", count=1000))
        if keys:
            r.delete(*keys)
        r.close()
    except redis.RedisError:
        pass


def _available(client: str) -> bool:
    try:
        __import__(PACKAGES[client])
    except ImportError:
        return False
    return True


def _live_runs(redis_url: str, repeat: int, n: int, rate: float = 500.0) -> dict:
    """The ``live`` measurement on 2 nodes per broker kind, the kinds alternated."""
    kinds = {"pubsub": redis_url, "streams": redis_url.replace("redis://", "redis+streams://", 1)}
    runs: dict[str, list[dict]] = {k: [] for k in kinds}
    for rep in range(repeat):
        for kind, url in kinds.items():
            prefix = f"bench-live-{os.getpid()}-{kind}-{rep}"
            nodes = [_start_server("fastws.bench.clients:app", "--broker", url, "--broker-prefix", prefix)
                     for _ in range(2)]
            try:
                runs[kind].append(_run_child("--client", "live", "--url", f"ws://127.0.0.1:{nodes[0][1]}/rt",
                                             "--http", f"ws://127.0.0.1:{nodes[1][1]}/rt", "--n", str(n),
                                             "--rate", str(rate)))
            finally:
                for proc, _ in nodes:
                    proc.terminate()
                    proc.wait(10)
                _delete_keys(redis_url, prefix)
    med = {kind: {node: {q: statistics.median(r[node][q] for r in rs) for q in ("p50_us", "p99_us")}
                  for node in ("a", "b")} for kind, rs in runs.items()}
    complete = all(r[node]["received"] == n for rs in runs.values() for r in rs for node in ("a", "b"))
    return {"messages": n, "rate": rate, "median": med, "complete": complete, "runs": runs}


def run(clients=CLIENTS, modes=MODES, repeat: int = 3, n: int = 20000, redis_url: str | None = None,
        missed: int = 1000, out: Path | None = None, live_n: int = 2000) -> dict:
    """Measure; print a table; write JSON to ``out`` when given.  Returns the results."""
    results: dict = {"n": n, "repeat": repeat, "window": WINDOW, "message_bytes": len(MESSAGE), "modes": {},
                     "skipped": {}}
    usable = [c for c in clients if _available(c)]
    for c in clients:
        if c not in usable:
            results["skipped"][c] = f"package {PACKAGES[c]} not installed"
    proc, port = _start_server("examples.echo:app")
    url = f"ws://127.0.0.1:{port}/echo"
    try:
        for mode in modes:
            runs: dict = {c: [] for c in usable}
            cpu: dict = {c: [] for c in usable}
            for _ in range(repeat):
                for c in usable:                       # alternate: drift hits every client alike
                    r = _run_child("--client", c, "--mode", mode, "--url", url, "--n", str(n))
                    runs[c].append(r["msgs_per_s"])
                    cpu[c].append(r["cpu_us_per_msg"])
            results["modes"][mode] = {c: {"median": statistics.median(v), "runs": v,
                                          "cpu_us_per_msg": statistics.median(cpu[c]), "cpu_runs": cpu[c]}
                                      for c, v in runs.items()}
    finally:
        proc.terminate()
        proc.wait(10)
    if redis_url:
        prefix = f"bench-resume-{os.getpid()}"
        proc, port = _start_server("fastws.bench.clients:app", "--broker",
                                   redis_url.replace("redis://", "redis+streams://", 1), "--broker-prefix", prefix)
        try:
            runs = [_run_child("--client", "resume", "--url", f"ws://127.0.0.1:{port}/rt", "--http",
                               f"http://127.0.0.1:{port}", "--n", str(missed)) for _ in range(repeat)]
            results["resume"] = {"missed": missed, "median_seconds": statistics.median(r["seconds"] for r in runs),
                                 "runs": runs}
        except RuntimeError as exc:
            results["skipped"]["resume"] = str(exc)
        finally:
            proc.terminate()
            proc.wait(10)
            _delete_keys(redis_url, prefix)
        results["live"] = _live_runs(redis_url, repeat, live_n)
    print(table(results))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "clients.json").write_text(json.dumps(results, indent=2))
    return results


def table(results: dict) -> str:
    lines = [f"Python clients against fastws serve (echo, {results['message_bytes']} B text, "
             f"{results['n']} messages, median of {results['repeat']})", "",
             "| mode | client | msg/s | vs websockets | client CPU µs/msg | websockets' CPU / this |",
             "|---|---|---:|---:|---:|---:|"]
    for mode, by_client in results["modes"].items():
        base = by_client.get("websockets", {}).get("median")
        base_cpu = by_client.get("websockets", {}).get("cpu_us_per_msg")
        for c, r in sorted(by_client.items(), key=lambda kv: -kv[1]["median"]):
            ratio = f"{r['median'] / base:.2f}x" if base else "-"
            cpu_ratio = f"{base_cpu / r['cpu_us_per_msg']:.2f}x" if base_cpu and r["cpu_us_per_msg"] else "-"
            name = f"{c} (ceiling, no WebSocket client)" if c in CEILINGS else c
            lines.append(f"| {mode} | {name} | {r['median']:,.0f} | {ratio} | {r['cpu_us_per_msg']:.2f} | "
                         f"{cpu_ratio} |")
    if "resume" in results:
        r = results["resume"]
        lines += ["", f"resume: {r['missed']} missed messages replayed in {r['median_seconds'] * 1000:.1f} ms "
                      f"(median; from the new connection to the last message)"]
    if "live" in results:
        lv = results["live"]
        lines += ["", f"live room messages, {lv['messages']} at {lv['rate']:.0f}/s published on node A, "
                      "publish-to-receive µs (median of runs):", "",
                      "| broker | p50 node A | p99 node A | p50 node B | p99 node B |", "|---|---:|---:|---:|---:|"]
        for kind, m in lv["median"].items():
            lines.append(f"| {kind} | {m['a']['p50_us']:,.0f} | {m['a']['p99_us']:,.0f} | {m['b']['p50_us']:,.0f} | "
                         f"{m['b']['p99_us']:,.0f} |")
        if not lv["complete"]:
            lines.append("INCOMPLETE: a subscriber missed live messages (see the runs)")
    for c, why in results["skipped"].items():
        lines.append(f"skipped {c}: {why}")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m fastws.bench.clients", description=__doc__.splitlines()[0])
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--client", default=None)
    p.add_argument("--mode", default="pingpong")
    p.add_argument("--url", default="")
    p.add_argument("--http", default="")
    p.add_argument("--n", type=int, default=20000)
    p.add_argument("--rate", type=float, default=500.0, help=argparse.SUPPRESS)
    p.add_argument("--clients", default=",".join(CLIENTS))
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--redis-url", default=None, help="loopback Redis for the resume measurement")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.child:
        _child(args)
        return
    run(args.clients.split(","), args.modes.split(","), args.repeat, args.n, args.redis_url, out=args.out)


if __name__ == "__main__":
    main()
