"""``fastws bench --gateway``: gateway mode against the same application in process and on python-socketio.

One application (``fastws.bench.peers.gateway_echo``: a message comes back
to its sender) served four ways, each measured alone, one after the other:

* ``gateway-streams`` - ``fastws serve --gateway redis://...`` and
  ``--stream-workers`` worker processes (``python -m fastws.gateway``) on
  the loopback Redis;
* ``gateway-http`` - ``fastws serve --gateway http://...`` and the handler
  as a :class:`fastws.gateway.GatewayApp` under uvicorn (it takes batches);
* ``fastws-app`` - the handler as a ``fastws.App`` ``on_message`` (in process);
* ``socketio`` - python-socketio's ``AsyncServer`` on aiohttp, an event
  emitted back to its sender.

For each: **throughput** - ``--conns`` connections with ``--window`` 32-byte
text messages in flight each, round trips per second over ``--duration``
seconds; **latency** - the same connections paced at 10,000 and 25,000
round trips/s (half the throughput targets of HTTP and Streams; skipped
past 90 % of what the system can do) and at half the system's own
throughput: the round trip's p50 and p99 seen by the client and, for the
gateway systems, the gateway's own time per message
(``fastws_gateway_added_latency_seconds{type="message"}`` of its /metrics:
from a message's arrival to its request or stream entry being sent, plus
from the answer to the reply being queued; p50, p99 and the share under
2 ms);
**CPU** - CPU time per round trip of the front
process (the gateway, the fastws app, the socketio server) during the
throughput run, and of the backend (uvicorn, the workers, Redis).

The load generator is a separate process (``python -m fastws.bench.gateway
load ...``) built on :mod:`fastws.bench.loadgen`'s raw clients: frames
masked once in advance, every reply checked byte for byte.  Everything runs
on 127.0.0.1; every run is bounded by its duration.  Results: one JSON file
and a markdown table in ``--out`` (default ``bench/results``).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import datetime as _dt
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

from fastws.bench import loadgen as lg

HOST = "127.0.0.1"
SYSTEMS = ("gateway-streams", "gateway-http", "fastws-app", "socketio")
SIO_PATH = "/socket.io/?EIO=4&transport=websocket"
PEERS = "fastws.bench.peers.gateway_echo"
#: the gateway's settings in the bench: the defaults, with room to queue (an overloaded run then
#: shows as latency, not as connections closed 1013)
GATEWAY_ARGS = ("--gateway-queue", "100000")


# -------------------------------------------------------------------------------- the load


class PacedClient(lg.EchoClient):
    """Sends when the pacer says; records each round trip (replies come in order)."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.times: collections.deque = collections.deque()
        self.samples = None          # a list while recording

    def start(self) -> None:
        pass

    def send(self, n: int) -> None:
        if self.closed or self.transport.is_closing():
            return                    # the server closed it (counted as an error by the client)
        t = lg.now_ns()
        self.transport.write(self.send_blocks[n] if n <= self.window else self.frame * n)
        self.sent += n
        self.times.extend((t,) * n)

    def got(self, k: int) -> None:
        t = lg.now_ns()
        self.received += k
        times, samples = self.times, self.samples
        for _ in range(k):
            t0 = times.popleft()
            if samples is not None:
                samples.append(t - t0)


class _Sio:
    """Engine.IO open and namespace CONNECT on a raw WebSocket, then the echo client's path."""

    def on_upgraded(self) -> None:
        self.sio_parser = lg.FrameParser(False)
        self.sio_state = 0          # 0: waiting for the open packet, 1: for the CONNECT answer, 2: connected

    def on_data(self, data: bytes) -> None:
        if self.sio_state == 2:
            return super().on_data(data)
        try:
            msgs = self.sio_parser.feed(data)
        except lg.ProtocolError as e:
            self.fail(f"protocol error: {e}")
            return
        for op, p in msgs:
            if op != lg.TEXT:
                continue
            if self.sio_state == 0 and p[:2] == b"0{":
                self.sio_state = 1
                self.transport.write(lg.client_frame(lg.TEXT, b"40", self.mask))
            elif self.sio_state == 1 and p[:3] == b"40{":
                self.sio_state = 2
                if not self.opened.done():
                    self.opened.set_result(self)
            else:
                self.fail(f"socket.io handshake: unexpected {p[:60]!r}")
                return


class SioEcho(_Sio, lg.EchoClient):
    pass


class SioPaced(_Sio, PacedClient):
    pass


def _frames(sio: bool, size: int) -> tuple:
    mask = b"\x11\x22\x33\x44"
    body = bytes((97 + i % 26) for i in range(size))
    payload = b'42["msg","' + body + b'"]' if sio else body
    return mask, lg.client_frame(lg.TEXT, payload, mask), lg.server_frame(lg.TEXT, payload)


async def _open(a, paced: bool, stats):
    mask, frame, expect = _frames(a.sio, a.size)
    path = SIO_PATH if a.sio else a.path
    req = lg.upgrade_request(a.host, a.port, path)
    cls = (SioPaced if paced else SioEcho) if a.sio else (PacedClient if paced else lg.EchoClient)
    return await lg.open_many(a.conns, lambda: cls(req, stats, mask, frame, expect, a.window, False),
                              a.host, a.port, stats=stats)


async def load_throughput(a) -> dict:
    stats = lg.Stats()
    clients = await _open(a, False, stats)
    res = {"mode": "throughput", "conns": a.conns, "window": a.window, "size": a.size}
    if len(clients) < a.conns:
        return lg.finish(res, stats, False)
    for c in clients:
        c.start()
    await asyncio.sleep(a.warmup)
    cpu = lg.CpuMeter(*a.pids) if a.pids else None
    cpu_front = lg.CpuMeter(a.pids[0]) if a.pids else None
    for m in (cpu, cpu_front):
        if m is not None:
            m.start()
    t0 = time.monotonic()
    r0 = sum(c.received for c in clients)
    await asyncio.sleep(a.duration)
    r1 = sum(c.received for c in clients)
    dt = time.monotonic() - t0
    if cpu is not None:
        res["cpu_all"] = cpu.stop().get("server_cpu")
        res["cpu_front"] = cpu_front.stop().get("server_cpu")
    for c in clients:
        c.running = False
    drained = await lg.wait_until(lambda: all(c.received == c.sent or c.closed for c in clients), 10.0)
    res.update(value=round((r1 - r0) / dt), unit="round trips/s", seconds=round(dt, 3), messages=r1 - r0,
               complete=drained and all(c.received == c.sent for c in clients))
    await lg.close_all(clients)
    return lg.finish(res, stats, res["complete"])


async def load_paced(a) -> dict:
    stats = lg.Stats()
    clients = await _open(a, True, stats)
    res = {"mode": "paced", "conns": a.conns, "rate": a.rate, "size": a.size}
    if len(clients) < a.conns:
        return lg.finish(res, stats, False)
    n = len(clients)
    sent = 0
    t_start = time.monotonic()
    t_rec = t_start + a.warmup
    t_end = t_rec + a.duration
    rec = False
    i = 0
    while True:
        now = time.monotonic()
        if now >= t_end:
            break
        if not rec and now >= t_rec:
            rec = True
            for c in clients:
                c.samples = []
            sent_at_rec, t_rec_real = sent, now
        due = int(a.rate * (now - t_start)) - sent
        if due > 0:                 # the next connections in turn, one message each (all of them: more)
            per, extra = divmod(due, n)
            if per:
                for c in clients:
                    c.send(per)
            for _ in range(extra):
                clients[i].send(1)
                i = i + 1 if i + 1 < n else 0
            sent += due
        await asyncio.sleep(0.001)
    achieved = (sent - sent_at_rec) / (time.monotonic() - t_rec_real)
    drained = await lg.wait_until(lambda: all(c.received == c.sent or c.closed for c in clients), 10.0)
    samples = sorted(s for c in clients for s in (c.samples or ()))
    us = lambda v: round(v / 1000, 1)  # noqa: E731
    res.update(achieved_rate=round(achieved), rounds=len(samples),
               p50_us=us(lg.percentile(samples, 50)), p99_us=us(lg.percentile(samples, 99)),
               p999_us=us(lg.percentile(samples, 99.9)), complete=drained)
    await lg.close_all(clients)
    return lg.finish(res, stats, drained and bool(samples))


def load_main(argv) -> None:
    p = argparse.ArgumentParser(prog="python -m fastws.bench.gateway load")
    p.add_argument("mode", choices=("throughput", "paced"))
    p.add_argument("--host", default=HOST)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--path", default="/echo")
    p.add_argument("--sio", action="store_true", help="speak Socket.IO (a msg event) on the WebSocket")
    p.add_argument("--conns", type=int, default=100)
    p.add_argument("--window", type=int, default=40)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--rate", type=float, default=0, help="paced: round trips per second, all connections")
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--pids", default="", help="comma-separated: the front process first, then the backend's")
    a = p.parse_args(argv)
    a.pids = [int(x) for x in a.pids.split(",") if x]
    lg.raise_nofile()
    res = lg.run_loop(load_throughput(a) if a.mode == "throughput" else load_paced(a))
    print(json.dumps(res), flush=True)


# -------------------------------------------------------------------------------- the systems


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{proc.args} did not listen on {port}")


class System:
    """The processes of one system: ``front`` (what the clients talk to) and ``backend``."""

    def __init__(self, name: str, logdir: Path, redis_url: str, workers: int) -> None:
        self.name, self.logdir, self.redis_url, self.workers = name, logdir, redis_url, workers
        self.front = None
        self.backend: list = []
        self.port = 0
        self.stream = None

    def _spawn(self, args, tag: str, env=None) -> subprocess.Popen:
        log = open(self.logdir / f"{self.name}-{tag}.log", "ab")  # noqa: SIM115  (the child writes it)
        return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **(env or {})}, start_new_session=True)

    def start(self) -> None:
        for attempt in range(3):        # a free port may be taken by another process meanwhile
            try:
                return self._start()
            except RuntimeError:
                self.stop()
                self.front, self.backend = None, []
                if attempt == 2:
                    raise

    def _start(self) -> None:
        py = sys.executable
        self.port = port = _free_port()
        serve = [py, "-c", "from fastws.cli.main import main; main()", "serve"]
        common = ["--host", HOST, "--port", str(port), "--log-level", "warning", "--ping-interval", "0"]
        if self.name == "gateway-streams":
            self.stream = f"fastws-bench-gw-{uuid.uuid4().hex[:8]}"
            url = f"{self.redis_url}?stream={self.stream}"
            self.front = self._spawn([*serve, *common, "--gateway", url, *GATEWAY_ARGS], "gateway")
            _wait_port(port, self.front)
            for i in range(self.workers):
                self.backend.append(self._spawn([py, "-m", "fastws.gateway", f"{PEERS}:handle", "--url", url,
                                                 "--consumer", f"w{i}", "--log-level", "warning"], f"worker{i}"))
            self.backend.append(None)        # Redis: its pid is found below
        elif self.name == "gateway-http":
            bport = _free_port()
            self.backend.append(self._spawn([py, "-m", "uvicorn", f"{PEERS}:backend", "--host", HOST, "--port",
                                             str(bport), "--loop", "uvloop", "--http", "httptools",
                                             "--log-level", "warning", "--no-access-log"], "uvicorn"))
            _wait_port(bport, self.backend[0])
            self.front = self._spawn([*serve, *common, "--gateway", f"http://{HOST}:{bport}/", *GATEWAY_ARGS],
                                     "gateway")
            _wait_port(port, self.front)
        elif self.name == "fastws-app":
            self.front = self._spawn([*serve, f"{PEERS}:app", *common], "app")
            _wait_port(port, self.front)
        else:
            self.front = self._spawn([py, "-m", PEERS, "--host", HOST, "--port", str(port)], "socketio")
            _wait_port(port, self.front)
        time.sleep(0.5)

    def pids(self) -> list:
        out = [self.front.pid] + [p.pid for p in self.backend if p is not None]
        if None in self.backend:
            rp = _redis_pid(self.redis_url)
            if rp:
                out.append(rp)
        return out

    def metrics(self) -> dict | None:
        """The gateway's added-latency histogram (cumulative counts by bound), or None."""
        if not self.name.startswith("gateway"):
            return None
        with urllib.request.urlopen(f"http://{HOST}:{self.port}/metrics", timeout=10) as r:
            text = r.read().decode()
        out = {}
        for line in text.splitlines():          # message events: the round trips measured
            if line.startswith("fastws_gateway_added_latency_seconds_bucket{") and 'type="message"' in line:
                le = line.split('le="', 1)[1].split('"', 1)[0]
                out[float(le)] = float(line.rsplit(" ", 1)[1])
        return out

    def stop(self) -> None:
        for p in [self.front, *self.backend]:
            if p is None or p.poll() is not None:
                continue
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
        if self.stream:
            _redis(self.redis_url, "DEL", self.stream)


def _redis(url: str, *words: str) -> bytes:
    from urllib.parse import urlsplit

    u = urlsplit(url)
    command = b"*%d\r\n" % len(words) + b"".join(b"$%d\r\n%s\r\n" % (len(w.encode()), w.encode())
                                                   for w in words)
    with socket.create_connection((u.hostname or HOST, u.port or 6379), timeout=2) as s:
        s.sendall(command)
        return s.recv(65536)


def _redis_pid(url: str) -> int | None:
    try:
        info = _redis(url, "INFO", "server").decode(errors="replace")
    except OSError:
        return None
    for line in info.splitlines():
        if line.startswith("process_id:"):
            pid = int(line.split(":")[1])
            return pid if os.path.exists(f"/proc/{pid}") else None
    return None


def _quantile(before: dict, after: dict, q: float) -> float | None:
    """The ``q`` quantile (seconds) of the observations between two scrapes of a histogram."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    total = counts[-1] if counts else 0
    if total <= 0:
        return None
    target = q * total
    prev_b, prev_c = 0.0, 0.0
    for b, c in zip(bounds, counts, strict=True):
        if c >= target:
            if b == float("inf"):
                return prev_b
            return prev_b + (b - prev_b) * ((target - prev_c) / max(1e-12, c - prev_c))
        prev_b, prev_c = b, c
    return bounds[-1]


def _load(system: System, mode: str, a, **extra) -> dict:
    args = [sys.executable, "-m", "fastws.bench.gateway", "load", mode, "--port", str(system.port),
            "--conns", str(a.conns), "--window", str(a.window), "--duration", str(a.duration),
            "--pids", ",".join(map(str, system.pids()))]
    if system.name == "socketio":
        args.append("--sio")
    for k, v in extra.items():
        args += [f"--{k}", str(v)]
    out = subprocess.run(args, capture_output=True, text=True, timeout=a.duration * 3 + 60)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(f"load generator failed: {out.stderr[-2000:]}")
    return json.loads(lines[-1])


#: the offered loads of the latency runs (round trips per second, all connections): half the
#: throughput targets of the HTTP (20,000/s) and Streams (50,000/s) transports, and half of each
#: system's own measured throughput
PACED_RATES = (10_000, 25_000)


def _paced(system: System, a, rate: int) -> dict:
    before = system.metrics()
    lat = _load(system, "paced", a, rate=rate)
    after = system.metrics()
    out = {"rate": rate, "achieved": lat.get("achieved_rate"), "rtt_p50_us": lat.get("p50_us"),
           "rtt_p99_us": lat.get("p99_us"), "ok": lat.get("ok")}
    if before is not None and after:
        p50, p99 = _quantile(before, after, 0.5), _quantile(before, after, 0.99)
        n = after[float("inf")] - before.get(float("inf"), 0)
        under = (after.get(0.002, 0) - before.get(0.002, 0)) / n if n else None
        out.update(added_p50_us=round(p50 * 1e6, 1) if p50 is not None else None,
                   added_p99_us=round(p99 * 1e6, 1) if p99 is not None else None,
                   added_under_2ms=round(under, 4) if under is not None else None)
    if lat.get("first_errors"):
        out["errors"] = lat["first_errors"]
    return out


def measure(name: str, a, logdir: Path) -> dict:
    system = System(name, logdir, a.redis_url, a.stream_workers)
    try:
        system.start()
        t = _load(system, "throughput", a)
        top = t.get("value", 0)
        out = {"system": name, "throughput": top, "throughput_ok": t.get("ok"),
               "cpu_front": t.get("cpu_front"), "cpu_all": t.get("cpu_all"), "paced": []}
        if top:
            out["front_us_per_event"] = round(1e6 * (t.get("cpu_front") or 0) / top, 2)
            out["all_us_per_event"] = round(1e6 * (t.get("cpu_all") or 0) / top, 2)
        rates = [r for r in a.rates if r <= 0.9 * top] + [max(1, int(top * a.fraction))]
        for rate in sorted(set(rates)):
            out["paced"].append(_paced(system, a, rate))
        out["paced_ok"] = bool(out["paced"]) and all(p.get("ok") for p in out["paced"])
        if t.get("first_errors"):
            out["errors"] = t["first_errors"]
        return out
    finally:
        system.stop()


def markdown(results: dict) -> str:
    rows = ["| system | round trips/s | CPU per round trip: front / all | offered load | RTT p50 | RTT p99 "
            "| gateway-added p50 | gateway-added p99 | gateway-added ≤ 2 ms |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def f(v, unit=""):
        return "-" if v is None else f"{v:,}{unit}"

    def under(v):
        return "-" if v is None else f"{100 * v:.2f} %"

    for r in results["systems"]:
        if "error" in r:
            rows.append(f"| {r['system']} | failed: {r['error'][:80]} | | | | | | | |")
            continue
        head = (f"| {r['system']} | {f(r.get('throughput'))} "
                f"| {f(r.get('front_us_per_event'), ' µs')} / {f(r.get('all_us_per_event'), ' µs')} ")
        for i, p in enumerate(r.get("paced") or [{}]):
            rows.append((head if i == 0 else "| | | ")
                        + f"| {f(p.get('achieved'))}/s | {f(p.get('rtt_p50_us'), ' µs')} "
                        f"| {f(p.get('rtt_p99_us'), ' µs')} | {f(p.get('added_p50_us'), ' µs')} "
                        f"| {f(p.get('added_p99_us'), ' µs')} | {under(p.get('added_under_2ms'))} |")
    return "\n".join(rows) + "\n"


def _median_run(runs: list) -> dict:
    """The run of median throughput among ``runs`` of one system (its own numbers kept together),
    with every run's throughput beside it."""
    good = sorted((r for r in runs if r.get("throughput")), key=lambda r: r["throughput"])
    if not good:
        return runs[-1]
    out = dict(good[(len(good) - 1) // 2])
    out["throughputs"] = [r.get("throughput") for r in runs]
    out["throughput_ok"] = all(r.get("throughput_ok") for r in runs)
    out["paced_ok"] = all(r.get("paced_ok") for r in runs)
    return out


def run(systems=SYSTEMS, *, conns: int = 1000, window: int = 10, duration: float = 5.0, fraction: float = 0.5,
        stream_workers: int = 2, redis_url: str = "redis://127.0.0.1:6379/0", out: Path | None = None,
        quick: bool = False, repeat: int = 1) -> int:
    """Measure ``systems`` (see the module docstring) ``repeat`` times, one after the other in a
    rotating order, and keep each one's median run; print a table, write JSON + markdown; 0 when every
    run was correct."""
    a = argparse.Namespace(conns=conns, window=window, duration=duration, fraction=fraction,
                           stream_workers=stream_workers, redis_url=redis_url, rates=PACED_RATES)
    if quick:
        a.conns, a.window, a.duration, repeat, a.rates = 10, 4, 1.0, 1, ()
    out = out or (Path("bench/results") if Path("bench/README.md").is_file() else Path("fastws-bench-results"))
    out.mkdir(parents=True, exist_ok=True)
    logdir = Path(tempfile.mkdtemp(prefix="fastws-bench-gateway-"))     # the processes' output
    results = {"when": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
               "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                           "platform": platform.platform()},
               "settings": {"conns": a.conns, "window": a.window, "duration": a.duration, "size": 32,
                            "paced_rates": list(a.rates), "paced_fraction": a.fraction,
                            "stream_workers": a.stream_workers, "repeat": repeat},
               "load_average_before": os.getloadavg(), "systems": []}
    runs: dict = {name: [] for name in systems}
    for i in range(repeat):
        order = list(systems[i % len(systems):]) + list(systems[:i % len(systems)])
        for name in order:
            print(f"fastws bench --gateway: {name} (run {i + 1} of {repeat}) ...", file=sys.stderr, flush=True)
            try:
                r = measure(name, a, logdir)
            except Exception as exc:            # a system that cannot run is reported, the others still run
                r = {"system": name, "error": f"{type(exc).__name__}: {exc} (logs in {logdir})"}
            r["load_average"] = round(os.getloadavg()[0], 2)
            runs[name].append(r)
            print(json.dumps(r), file=sys.stderr, flush=True)
    ok = True
    for name in systems:
        r = _median_run(runs[name])
        ok = ok and bool(r.get("throughput_ok")) and bool(r.get("paced_ok"))
        results["systems"].append(r)
    results["runs"] = runs
    results["load_average_after"] = os.getloadavg()
    stem = f"gateway-{time.strftime('%Y%m%d-%H%M%S')}"
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    (out / f"{stem}.md").write_text(table)
    print(table)
    return 0 if ok else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "load":
        load_main(sys.argv[2:])
    else:
        p = argparse.ArgumentParser(prog="python -m fastws.bench.gateway", description=__doc__.splitlines()[0])
        p.add_argument("--systems", default=",".join(SYSTEMS))
        p.add_argument("--conns", type=int, default=1000)
        p.add_argument("--window", type=int, default=10)
        p.add_argument("--repeat", type=int, default=1)
        p.add_argument("--duration", type=float, default=5.0)
        p.add_argument("--fraction", type=float, default=0.5)
        p.add_argument("--stream-workers", type=int, default=2)
        p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
        p.add_argument("--out", type=Path, default=None)
        p.add_argument("--quick", action="store_true")
        args = p.parse_args()
        sys.exit(run(args.systems.split(","), conns=args.conns, window=args.window, duration=args.duration,
                     fraction=args.fraction, stream_workers=args.stream_workers, redis_url=args.redis_url,
                     out=args.out, quick=args.quick, repeat=args.repeat))
