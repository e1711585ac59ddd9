"""The thundering herd: 20,000 room clients lose their server at once, come back and resume.

::

    python -m fastws.bench.herd [--clients 20000] [--procs 2] [--variants sigterm,sigkill]
                                [--modes hinted,naive] [--out bench/results]

What runs (everything on 127.0.0.0/8, bounded in count and time):

* a ``redis-server`` of the run's own on a free port (``--save "" --appendonly
  no``), stopped at the end; every server uses it as its broker,
  ``--broker redis+streams://...`` (a fresh ``--broker-prefix`` per herd);
* server A, ``fastws serve fastws.bench.peers.herd_rooms:app --workers 2
  --reuse-port`` (the room protocol, ``app.rooms_endpoint("/rt")``), which
  takes the clients' first connections (without admission limits: a 503 there
  would leave a client's backoff raised into the herd, as a connection up
  less than the backoff's ``reset_after``, 10 s, does not reset it);
* ``--clients`` :class:`fastws.client.RoomClient` spread over ``--procs``
  client processes (and 16 loopback source addresses), client ``i``
  subscribed to room ``r{i % rooms}``;
* a publisher: a ``RoomClient`` on a third server (C, same broker, never
  restarted, as a backend would publish) that publishes sequence-numbered
  payloads (``"1"``, ``"2"``, ... per room) at a fixed ``--rate`` (messages per
  second over all rooms, round robin) during the whole herd, each one
  acknowledged by the broker, and is itself subscribed to every room: what it
  sees there is the room's truth;
* once every client is subscribed and the publisher has run ``--warmup``
  seconds, server B starts on the same port with the admission knobs
  ``--handshake-rate`` (per worker: upgrades accepted per second, a token
  bucket of ``--handshake-burst``; the excess gets 503 with a jittered
  ``Retry-After`` of ``--retry-after`` to twice it), and A is
  **restarted** (``sigterm``: SIGTERM, every connection closed with
  ``1001 "server restarting; reconnect in X s"``, X jittered per connection
  over ``[d, 2d]``, ``--reconnect-delay d``; ``--drain-rate`` paces the
  closes too, 0 closes them all at once) or **killed** (``sigkill``:
  SIGKILL to A's supervisor and workers: the clients see their connection
  drop without a close frame and back off with full jitter).

Each herd runs with the clients as they are (``hinted``: the server's hint,
``Retry-After`` on 503, full-jitter backoff) and with clients that ignore
hints and retry at once (``naive``: ``server_hints=False``, a 1 ms backoff).

Every client is subscribed before the publisher's first message, so each
must end with its room's whole sequence.  Measured per client: every payload
it got (so: **lost** = payloads of its room's truth it never got,
**duplicated** = payloads it got more than once, out of order), when its
connection was lost, when it was subscribed again (``back``: the
``subscribed`` answer after the reconnect), its connection attempts, whether
it gave up, subscriptions answered ``recovered: false`` and gaps its client
reported.  Over the herd, from B's access log (``--access-log``, JSON lines
with millisecond times and the worker's pid): the upgrades B accepted (101)
and refused (503) per 100 ms, the most any worker accepted in any second
against its admission bound ``handshake_rate + handshake_burst`` (the token
bucket allows no more in any second), the whole node's peak against
``workers`` times that; also the 101s as the clients saw them (later when
their process is busy, so they may bunch above the bound), the attempts they
started per 100 ms, and the time until all are back.

The JSON (``client-herd.json``) has every figure, the PNG
(``client-herd.png``) the reconnections per second over time, with and
without jitter, for both variants.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import queue
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from fastws.client import Backoff, RoomClient, reconnect_hint

HOST = "127.0.0.1"
NOFILE = 65536
SOURCES = 16          # loopback source addresses the clients connect from (127.0.1.1 ... 127.0.16.1)
APP = "fastws.bench.peers.herd_rooms:app"
PATH = "/rt"
ROOT = Path(__file__).resolve().parents[2]
BIN = 0.1             # seconds per bin of the time series


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(soft, NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _say(**obj) -> None:
    print(json.dumps(obj), flush=True)


def _stdin_queue(loop: asyncio.AbstractEventLoop) -> asyncio.Queue:
    """The JSON lines the parent writes to our stdin, as an asyncio queue."""
    inbox: asyncio.Queue = asyncio.Queue()

    def read() -> None:
        for line in sys.stdin:
            try:
                loop.call_soon_threadsafe(inbox.put_nowait, json.loads(line))
            except (ValueError, RuntimeError):
                pass

    threading.Thread(target=read, daemon=True).start()
    return inbox


def _bins(times, t0: float) -> dict:
    out: dict = {}
    for t in times:
        k = int((t - t0) // BIN)
        out[k] = out.get(k, 0) + 1
    return out


# -- a client process ------------------------------------------------------------------------------


class _Rec:
    """What one client saw."""

    __slots__ = ("room", "got", "conns", "subs", "not_recovered", "closes", "seen_delays", "base_delays")

    def __init__(self, room: str) -> None:
        self.room = room
        self.got: list = []           # payload numbers, in delivery order
        self.conns: list = []         # times of successful connections (after the herd started)
        self.subs: list = []          # times of "subscribed" answers (after the herd started)
        self.not_recovered = 0        # "subscribed" answers with recovered: false
        self.closes: list = []        # (time, code, reason) of lost connections (after the herd started)
        self.seen_delays = 0
        self.base_delays = 0


async def _worker(args) -> dict:
    loop = asyncio.get_running_loop()
    inbox = _stdin_queue(loop)
    herd = False
    recs, clients = [], []
    for i in range(args.n):
        g = args.first_index + i
        rec = _Rec(f"r{g % args.rooms}")
        # clients come from SOURCES loopback addresses: the server's TIME_WAIT of
        # 20,000 closed connections would take most of one address's ephemeral ports
        local = (f"127.0.{1 + g % SOURCES}.1", 0)
        opts: dict = dict(ping_interval=None, open_timeout=30, local_addr=local)
        if args.mode == "naive":
            opts.update(backoff=Backoff(0.001, 0.001), server_hints=False)

        def connected(client, rec=rec):
            if herd:
                rec.conns.append(time.time())

        def lost(client, code, reason, rec=rec):
            if herd:
                rec.closes.append((time.time(), code, reason))

        rc = RoomClient(f"ws://{HOST}:{args.port}{PATH}", on_connect=connected, on_disconnect=lost, **opts)
        frames = rc.client.on_message

        def on_frame(text, rec=rec, frames=frames):
            if herd and text[:17] == '{"t":"subscribed"':
                rec.subs.append(time.time())
                if '"recovered":false' in text:
                    rec.not_recovered += 1
            frames(text)

        rc.client.on_message = on_frame
        recs.append(rec)
        clients.append(rc)

    async def up(rc: RoomClient, rec: _Rec) -> None:
        await rc.start()
        await rc.subscribe(rec.room, lambda m, got=rec.got: got.append(int(m.data)))

    deadline = time.monotonic() + args.timeout
    for k in range(0, args.n, 500):                       # 500 upgrades at a time
        left = deadline - time.monotonic()
        await asyncio.wait_for(asyncio.gather(*(up(c, r) for c, r in zip(clients[k:k + 500], recs[k:k + 500],
                                                                            strict=True))), max(1.0, left))
    for c, r in zip(clients, recs, strict=True):
        r.base_delays = r.seen_delays = len(c.client.delays)
    herd = True
    _say(ready=args.n)

    # the herd: until every client is back (or the parent has the truth, or the timeout)
    attempts: dict = {}        # 100 ms bin of absolute time -> connection attempts started
    truth = None
    said_back = False
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        now = time.time()
        for c, r in zip(clients, recs, strict=True):
            d = c.client.delays
            if len(d) > r.seen_delays:
                for x in d[r.seen_delays:]:           # an attempt starts once its delay is waited
                    k = int((now + x) // BIN)
                    attempts[k] = attempts.get(k, 0) + 1
                r.seen_delays = len(d)
        if not said_back and all(_back(r) is not None for r in recs):
            _say(back=max(_back(r) for r in recs))
            said_back = True
        try:
            msg = await asyncio.wait_for(inbox.get(), 0.2)
        except asyncio.TimeoutError:
            continue
        if "truth" in msg:
            truth = msg["truth"]
            break
    if truth is None:
        msg = await asyncio.wait_for(inbox.get(), max(1.0, deadline + 60 - time.monotonic()))
        truth = msg["truth"]

    # every client must end with its room's whole truth (bounded wait for the last deliveries)
    want = {room: set(ks) for room, ks in truth.items()}
    until = time.monotonic() + args.settle
    while time.monotonic() < until:
        if all(want[r.room] <= set(r.got) for r in recs):
            break
        await asyncio.sleep(0.2)
    out: dict = {k: [] for k in ("lost", "dup", "disorder", "extra", "gaps", "not_recovered", "closed", "code",
                                 "hint", "back", "reconnects", "attempts", "gave_up", "connected", "delivered")}
    for c, r in zip(clients, recs, strict=True):
        got = r.got
        have = set(got)
        out["lost"].append(len(want[r.room] - have))
        out["dup"].append(len(got) - len(have))
        out["disorder"].append(sum(1 for a, b in zip(got, got[1:], strict=False) if b < a))
        out["extra"].append(len(have - want[r.room]))
        sub = c.subs.get(r.room)
        out["gaps"].append(sub.gaps if sub is not None else None)
        out["not_recovered"].append(r.not_recovered)
        first = r.closes[0] if r.closes else None
        out["closed"].append(first[0] if first else None)
        out["code"].append(first[1] if first else None)
        out["hint"].append(reconnect_hint(first[2]) if first else None)
        out["back"].append(_back(r))
        out["reconnects"].append(r.conns)
        out["attempts"].append(len(c.client.delays) - r.base_delays)
        out["gave_up"].append(c.client.gave_up is not None)
        out["connected"].append(c.connected)
        out["delivered"].append(len(got))
    out["attempt_bins"] = attempts
    for c in clients:
        c.client.abort()                                  # stop quickly: no close handshakes needed
    await asyncio.sleep(0.1)
    return out


def _back(r: _Rec) -> float | None:
    """When the client was subscribed again after it lost its connection."""
    if not r.closes:
        return None
    lost = r.closes[0][0]
    return next((t for t in r.subs if t >= lost), None)


# -- the publisher -----------------------------------------------------------------------------------


async def _publisher(args) -> dict:
    loop = asyncio.get_running_loop()
    inbox = _stdin_queue(loop)
    rooms = [f"r{i}" for i in range(args.rooms)]
    seen: dict = {r: [] for r in rooms}
    rc = RoomClient(f"ws://{HOST}:{args.port}{PATH}", ping_interval=None)
    await asyncio.wait_for(rc.start(), 30)
    for r in rooms:
        await asyncio.wait_for(rc.subscribe(r, lambda m, s=seen[r]: s.append(int(m.data))), 30)
    stop = asyncio.ensure_future(inbox.get())
    sent = dict.fromkeys(rooms, 0)
    failed: list = []
    tasks: set = set()

    def done(t: asyncio.Task, room: str, k: int) -> None:
        tasks.discard(t)
        if t.cancelled() or t.exception() is not None:
            failed.append((room, k, repr(t.exception()) if not t.cancelled() else "cancelled"))

    _say(ready=True)
    t0, w0 = loop.time(), time.time()
    i = 0
    while not stop.done() and loop.time() - t0 < args.timeout:
        room = rooms[i % len(rooms)]
        sent[room] += 1
        t = asyncio.ensure_future(rc.publish(room, str(sent[room])))
        tasks.add(t)
        t.add_done_callback(lambda t, room=room, k=sent[room]: done(t, room, k))
        i += 1
        delay = t0 + i / args.rate - loop.time()
        if delay > 0:
            await asyncio.wait([stop], timeout=delay)
    elapsed = loop.time() - t0
    if tasks:
        await asyncio.wait(set(tasks), timeout=15)
    failed_keys = {(room, k) for room, k, _ in failed}
    acked = {r: [k for k in range(1, sent[r] + 1) if (r, k) not in failed_keys] for r in rooms}
    until = loop.time() + 15
    while loop.time() < until and any(not set(acked[r]) <= set(seen[r]) for r in rooms):
        await asyncio.sleep(0.1)
    stop.cancel()
    await rc.close()
    return {"sent": sent, "seen": seen, "failed": failed[:20], "failed_count": len(failed),
            "acked_not_seen": sum(len(set(acked[r]) - set(seen[r])) for r in rooms),
            # the stream holds exactly what was published, in order, once: the truth is the sequence sent
            "stream_is_sent": all(seen[r] == list(range(1, sent[r] + 1)) for r in rooms),
            "messages": i, "seconds": elapsed, "rate": i / elapsed if elapsed else 0.0, "start": w0}


def _child_main(args) -> None:
    import uvloop

    _raise_nofile()
    result = uvloop.run(_publisher(args) if args.publisher else _worker(args))
    fd, name = tempfile.mkstemp(prefix="fastws-herd-", suffix=".json")
    os.close(fd)
    Path(name).write_text(json.dumps(result))    # a file: the figures of 10,000 clients are large
    _say(figures=name)


# -- the parent ------------------------------------------------------------------------------------------


class _Child:
    """A child process speaking JSON lines: its stdout read by a thread, waited for with a bound."""

    def __init__(self, argv: list, log: Path, **kw) -> None:
        with open(log, "w") as err:              # (the child has its own copy of the file)
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                         text=True, **kw)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def expect(self, key: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {key!r} from a child process within {timeout:g} s")
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise RuntimeError(f"a child process ended (exit {self.proc.wait(5)}) before {key!r}")
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if isinstance(msg, dict) and key in msg:
                return msg

    def tell(self, **obj) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(obj) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass

    def figures(self, timeout: float) -> dict:
        path = Path(self.expect("figures", timeout)["figures"])
        try:
            return json.loads(path.read_text())
        finally:
            path.unlink()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class _Redis:
    """A redis-server of the run's own on a free port, no persistence."""

    def __init__(self, logdir: Path) -> None:
        if shutil.which("redis-server") is None:
            raise RuntimeError("the herd needs redis-server (apt-get install redis-server)")
        self.port = _free_port()
        with open(logdir / "redis.log", "w") as log:
            self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", HOST, "--save", "",
                                          "--appendonly", "no", "--maxclients", "1000"],
                                         stdout=log, stderr=subprocess.STDOUT)
        _wait_port(self.port, self.proc, 10)
        self.url = f"redis+streams://{HOST}:{self.port}/0"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def _wait_port(port: int, proc, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"a process exited at start (exit {proc.returncode})")
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout:g} s")


class _Server:
    """``fastws serve`` of the herd's app (its own process group: SIGKILL takes its workers too)."""

    def __init__(self, port: int, log: Path, *extra: str, workers: int = 2) -> None:
        env = dict(os.environ)
        env.pop("FASTWS_NO_EXTENSIONS", None)
        self.log = log
        self.workers = workers
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fastws", "serve", APP, "--host", HOST, "--port", str(port), "--reuse-port",
                 "--workers", str(workers), "--log-level", "info", "--log-format", "json", "--ping-interval", "0",
                 "--backlog", "4096",
                 *extra], stdout=out, stderr=subprocess.STDOUT, env=env, preexec_fn=_raise_nofile,
                cwd=str(ROOT), start_new_session=True)

    def wait_listening(self, timeout: float = 30.0) -> None:
        """Until every worker of this server said it listens (another server may hold the port)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"a server exited at start: {self.tail()}")
            if self.log.read_text(errors="replace").count("server listening on") >= self.workers:
                return
            time.sleep(0.05)
        raise RuntimeError(f"a server did not listen within {timeout:g} s: {self.tail()}")

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:]

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)

    def stop(self, timeout: float = 40.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        try:                                     # workers that outlived their supervisor, if any
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.proc.poll() is None:
            self.proc.wait(10)


def _metrics_handshakes(port: int) -> dict:
    """B's ``websocket_handshakes_total`` by status (all workers; best effort)."""
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        if line.startswith("websocket_handshakes_total{"):
            status = line.split('result="', 1)[1].split('"', 1)[0]
            out[status] = int(float(line.rsplit(" ", 1)[1]))
    return out


def run_once(cfg: argparse.Namespace, variant: str, mode: str, redis: _Redis, logdir: Path) -> dict:
    """One herd (see the module docstring); returns the merged per-client figures."""
    port, cport = _free_port(), _free_port()
    broker = ["--broker", redis.url, "--broker-prefix", f"herd-{os.getpid()}-{variant}-{mode}"]
    drain = ["--reconnect-delay", f"{cfg.reconnect_delay:g}", "--drain-rate", f"{cfg.drain_rate:g}",
             "--shutdown-timeout", "30"]
    admission = ["--handshake-rate", f"{cfg.handshake_rate:g}", "--handshake-burst", str(cfg.handshake_burst),
                 "--retry-after", f"{cfg.retry_after:g}"]
    tag = f"{variant}-{mode}"
    c = _Server(cport, logdir / f"{tag}-C.log", *broker, workers=1)
    # A takes the clients' first connections without admission limits: 503s there would leave the
    # clients' backoff raised (a connection up less than reset_after, 10 s, does not reset it)
    a = _Server(port, logdir / f"{tag}-A.log", *broker, *drain, workers=cfg.workers)
    b: _Server | None = None
    children: list = []
    pub = None
    try:
        c.wait_listening()
        a.wait_listening()
        per = [cfg.clients // cfg.procs + (1 if i < cfg.clients % cfg.procs else 0) for i in range(cfg.procs)]
        first = 0
        common = ["--port", str(port), "--rooms", str(cfg.rooms), "--timeout", f"{cfg.timeout:g}",
                  "--settle", f"{cfg.settle:g}"]
        for n in per:
            children.append(_Child([sys.executable, "-m", "fastws.bench.herd", "--worker", "--n", str(n),
                                    "--mode", mode, "--first-index", str(first), *common],
                                   logdir / f"{tag}-clients-{first}.log", preexec_fn=_raise_nofile, cwd=str(ROOT)))
            first += n
        for w in children:
            w.expect("ready", cfg.timeout + 30)
        pub = _Child([sys.executable, "-m", "fastws.bench.herd", "--publisher", "--port", str(cport),
                      "--rooms", str(cfg.rooms), "--rate", f"{cfg.rate:g}", "--timeout", f"{cfg.timeout * 3:g}"],
                     logdir / f"{tag}-publisher.log", cwd=str(ROOT))
        pub.expect("ready", 60)
        # B's access log: the time of each upgrade it answered (101) or refused (503), by worker
        b = _Server(port, logdir / f"{tag}-B.log", *broker, *drain, *admission, "--access-log",
                    workers=cfg.workers)
        b.wait_listening()
        time.sleep(cfg.warmup)
        t_signal = time.time()
        if variant == "sigkill":
            a.kill()
        else:
            a.proc.send_signal(signal.SIGTERM)
        all_back = True
        for w in children:
            try:
                w.expect("back", cfg.timeout)
            except TimeoutError:
                all_back = False
        time.sleep(cfg.tail)                      # the publisher goes on: the live flow after the return
        pub.tell(stop=True)
        published = pub.figures(60)
        for w in children:
            w.tell(truth=published["seen"])
        results = [w.figures(cfg.settle + 120) for w in children]
        time.sleep(1.5)                           # the workers' metric snapshots are up to ~1 s old
        server = _metrics_handshakes(port)
    finally:
        for ch in children + ([pub] if pub else []):
            if ch.proc.poll() is None:
                ch.proc.terminate()
        for ch in children + ([pub] if pub else []):
            try:
                ch.proc.wait(30)
            except subprocess.TimeoutExpired:
                ch.proc.kill()
                ch.proc.wait(5)
        for s in (a, b, c):
            if s is not None:
                s.stop()
    accepted, refused = _access_log(b.log)
    keys = [k for k in results[0] if k != "attempt_bins"]
    merged: dict = {k: [x for r in results for x in r[k]] for k in keys}
    bins: dict = {}
    for r in results:
        for k, v in r["attempt_bins"].items():
            bins[int(k)] = bins.get(int(k), 0) + v
    merged.update(variant=variant, mode=mode, clients=cfg.clients, signal_at=t_signal, all_back_said=all_back,
                  attempt_bins=bins, publisher={k: v for k, v in published.items() if k != "seen"},
                  truth_sizes={r: len(ks) for r, ks in published["seen"].items()}, server_b_handshakes=server,
                  server_accepted=accepted, server_refused=refused,
                  config={k: getattr(cfg, k) for k in ("rooms", "rate", "workers", "handshake_rate",
                                                         "handshake_burst", "retry_after", "reconnect_delay",
                                                         "drain_rate", "procs", "warmup", "tail")})
    return merged


def _access_log(log: Path) -> tuple:
    """From a server's JSON log with ``--access-log``: ``{pid: [times]}`` of
    the upgrades it answered 101, and the times of those it refused with 503."""
    accepted: dict = {}
    refused: list = []
    with open(log, errors="replace") as f:
        for line in f:
            if '"fastws.access"' not in line:
                continue
            try:
                rec = json.loads(line)
                t = datetime.datetime.fromisoformat(rec["ts"].replace("Z", "+00:00")).timestamp()
            except (ValueError, KeyError):
                continue
            msg = rec.get("msg", "")
            if '" 101 ' in msg:
                accepted.setdefault(rec.get("pid"), []).append(t)
            elif '" 503 ' in msg:
                refused.append(t)
    return accepted, refused


def _peak(times, window: float = 1.0) -> int:
    """The most of ``times`` in any ``window`` seconds."""
    ts = sorted(times)
    best, j = 0, 0
    for i, t in enumerate(ts):
        while ts[j] <= t - window:
            j += 1
        best = max(best, i - j + 1)
    return best


def summary(r: dict) -> dict:
    """The figures of one herd (see the module docstring)."""
    t0 = r["signal_at"]
    cfg = r["config"]
    n = r["clients"]
    back = [b - t0 for b in r["back"] if b is not None]
    closed = [c - t0 for c in r["closed"] if c is not None]
    reconnects = [t for ts in r["reconnects"] for t in ts]        # as the clients saw them (their 101)
    accepted = [t for ts in r["server_accepted"].values() for t in ts]   # as B's access log has them
    ok, no, seen = _bins(accepted, t0), _bins(r["server_refused"], t0), _bins(reconnects, t0)
    attempts = {int(k) - int(t0 // BIN): v for k, v in r["attempt_bins"].items()}
    first = min([*ok, *no, *seen, *attempts, 0])
    last = max([*ok, *no, *seen, *attempts, 0])
    span = range(first, last + 1)
    waited = [(b - c, h) for b, c, h in zip(r["back"], r["closed"], r["hint"], strict=True)
              if b is not None and c is not None]
    q = statistics.quantiles(back, n=10) if len(back) >= 10 else [0.0] * 9
    rate = cfg["handshake_rate"]
    burst = cfg["handshake_burst"] or rate           # 0: one second's worth
    per_worker = max((_peak(ts) for ts in r["server_accepted"].values()), default=0)
    return {
        "variant": r["variant"], "mode": r["mode"], "clients": n, **cfg,
        # every client against its room's truth (what the publisher saw in the stream)
        "lost": sum(r["lost"]), "duplicated": sum(r["dup"]), "out_of_order": sum(r["disorder"]),
        "unexpected": sum(r["extra"]),
        "clients_with_loss": sum(1 for x in r["lost"] if x), "clients_with_dup": sum(1 for x in r["dup"] if x),
        "gaps_reported": sum(x or 0 for x in r["gaps"]), "not_recovered": sum(r["not_recovered"]),
        "delivered": sum(r["delivered"]),
        # their connections (seconds after the signal)
        "closed_by_server": len(closed), "close_codes": _count(r["code"]),
        "back": len(back), "gave_up": sum(r["gave_up"]), "connected_at_end": sum(r["connected"]),
        "first_close_s": min(closed, default=None), "first_back_s": min(back, default=None),
        "all_back_s": max(back) if len(back) == n else None, "last_back_s": max(back, default=None),
        "p10_s": q[0], "p50_s": q[4], "p90_s": q[8],
        "attempts_total": sum(r["attempts"]), "attempts_max": max(r["attempts"], default=0),
        "attempts_p50": statistics.median(r["attempts"]) if r["attempts"] else 0,
        "waited_less_than_hint": sum(1 for w, h in waited if h is not None and w < h - 0.05),
        # the handshakes B answered: 101 and 503 (its access log), against the admission bound
        "handshakes_accepted": len(accepted), "handshakes_refused": len(r["server_refused"]),
        "peak_per_100ms": max(ok.values(), default=0),
        "peak_per_s": _peak(accepted), "peak_per_s_per_worker": per_worker,
        "admission_rate_per_s": cfg["workers"] * rate, "admission_bound_per_s": cfg["workers"] * (rate + burst),
        "admission_bound_per_s_per_worker": rate + burst,
        "under_admission_bound": per_worker <= rate + burst,
        # over longer windows the bucket allows burst + rate x window: the rate itself shows
        "peak_per_5s_per_worker": max((_peak(ts, 5.0) for ts in r["server_accepted"].values()), default=0),
        "admission_bound_per_5s_per_worker": 5 * rate + burst,
        "refused_peak_per_s": _peak(r["server_refused"]),
        # the same reconnections as the clients saw them (later when their process is busy)
        "reconnect_handshakes": len(reconnects), "client_seen_peak_per_s": _peak(reconnects),
        "server_b_handshakes": r["server_b_handshakes"],
        "publisher": r["publisher"], "truth_sizes": r["truth_sizes"],
        # per 100 ms from start_s (seconds after the signal): B's 101s and 503s, the 101s the
        # clients saw, the connection attempts the clients started
        "series": {"start_s": first * BIN, "accepted": [ok.get(i, 0) for i in span],
                   "refused": [no.get(i, 0) for i in span], "client_seen": [seen.get(i, 0) for i in span],
                   "attempts": [attempts.get(i, 0) for i in span]},
    }


def _count(xs) -> dict:
    out: dict = {}
    for x in xs:
        out[str(x)] = out.get(str(x), 0) + 1
    return out


LABELS = {"hinted": "fastws client: server hint, Retry-After, full jitter",
          "naive": "no jitter: hints ignored, retry at once"}


def _trailing(series: list, window: int) -> list:
    """Per bin: the sum of the last ``window`` bins (a count per second from 100 ms bins)."""
    out, acc = [], 0
    for i, v in enumerate(series):
        acc += v - (series[i - window] if i >= window else 0)
        out.append(acc)
    return out


def plot(summaries: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(dict.fromkeys(s["variant"] for s in summaries))
    fig, axes = plt.subplots(len(variants), 2, figsize=(15, 4.6 * len(variants)), squeeze=False,
                             gridspec_kw={"width_ratios": [2, 1]})
    titles = {"sigterm": "restarted: SIGTERM, close reason 'reconnect in X s' (--reconnect-delay {d:g})",
              "sigkill": "killed: SIGKILL, no close frame"}
    colors = {"hinted": "tab:blue", "naive": "tab:red"}
    window = round(1 / BIN)
    for (ax, ax503), variant in zip(axes, variants, strict=True):
        rows = [s for s in summaries if s["variant"] == variant]
        for s in rows:
            se = s["series"]
            xs = [se["start_s"] + (i + 1) * BIN for i in range(len(se["accepted"]))]
            back = f"all back at {s['all_back_s']:.1f} s" if s["all_back_s"] is not None else \
                f"{s['back']:,}/{s['clients']:,} back"
            ax.plot(xs, _trailing(se["accepted"], window), color=colors.get(s["mode"]), linewidth=1.4,
                    label=f"{LABELS.get(s['mode'], s['mode'])}:\n{back}, peak {s['peak_per_s']:,}/s, "
                    f"lost {s['lost']}, dup {s['duplicated']}, gave up {s['gave_up']}")
            ax503.plot(xs, _trailing(se["refused"], window), color=colors.get(s["mode"]), linewidth=1.2,
                       label=f"{s['mode']}: {s['handshakes_refused']:,} refused, "
                       f"{s['attempts_total']:,} attempts")
        s0 = rows[0]
        ax.axhline(s0["admission_bound_per_s"], color="black", linestyle="--", linewidth=1,
                   label=f"admission bound in any second: {s0['workers']} workers x (--handshake-rate "
                   f"{s0['handshake_rate']:g} + --handshake-burst {s0['handshake_burst']})")
        ax.set_xlabel("seconds after the signal to the first server")
        ax.set_ylabel("reconnections per second\n(101s of the new server in the last 1 s)")
        ax.set_title(f"{s0['clients']:,} room clients ({s0['rooms']} rooms, Redis Streams, publisher "
                     f"{s0['rate']:g} msg/s); server " + titles.get(variant, variant).format(d=s0["reconnect_delay"]),
                     fontsize=9)
        ax.legend(fontsize=7, loc="upper right")
        ax.grid(alpha=0.3)
        top = max([s0["admission_bound_per_s"], *(s["peak_per_s"] for s in rows)])
        ax.set_ylim(0, top * 1.5)                  # room for the legend above the curves
        ax503.set_title("upgrades refused with 503 (Retry-After) per second", fontsize=9)
        ax503.set_xlabel("seconds after the signal")
        ax503.set_yscale("symlog", linthresh=10)
        ax503.legend(fontsize=7, loc="upper right")
        ax503.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(clients: int = 20000, procs: int = 2, out: Path | None = None, variants=("sigterm", "sigkill"),
        modes=("hinted", "naive"), **options) -> list:
    """Every herd of ``variants`` x ``modes``; returns their summaries (and
    writes ``client-herd.json`` and ``client-herd.png`` to ``out``)."""
    cfg = _parser().parse_args([])
    cfg.clients, cfg.procs = clients, procs
    for k, v in options.items():
        if not hasattr(cfg, k):
            raise TypeError(f"unknown option {k!r}")
        setattr(cfg, k, v)
    summaries = []
    keep = cfg.logs is not None
    logdir = Path(cfg.logs) if keep else Path(tempfile.mkdtemp(prefix="fastws-herd-logs-"))
    logdir.mkdir(parents=True, exist_ok=True)
    redis = _Redis(logdir)
    ok = False
    try:
        for variant in variants:
            for mode in modes:
                s = summary(run_once(cfg, variant, mode, redis, logdir))
                summaries.append(s)
                print(json.dumps({k: v for k, v in s.items() if k != "series"}), flush=True)
                if out is not None:                   # after each herd: a later failure keeps these
                    _write(summaries, out)
        ok = True
    finally:
        redis.stop()
        if ok and not keep:
            shutil.rmtree(logdir, ignore_errors=True)
        else:
            print(f"herd: logs kept in {logdir}", file=sys.stderr)
    return summaries


def _write(summaries: list, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "client-herd.json").write_text(json.dumps(summaries, indent=1))
    plot(summaries, out / "client-herd.png")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastws.bench.herd", description=__doc__.splitlines()[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--publisher", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--mode", default="hinted", choices=("hinted", "naive"), help=argparse.SUPPRESS)
    p.add_argument("--first-index", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--clients", type=int, default=20000)
    p.add_argument("--procs", type=int, default=2, help="client processes (at most 19,000 clients each)")
    p.add_argument("--variants", default="sigterm,sigkill", help="sigterm (paced drain), sigkill, or both")
    p.add_argument("--modes", default="hinted,naive", help="hinted (the client as it is), naive (no jitter)")
    p.add_argument("--rooms", type=int, default=20, help="rooms; client i subscribes to room r{i %% rooms}")
    p.add_argument("--rate", type=float, default=40.0, help="publisher messages per second, over all rooms")
    p.add_argument("--workers", type=int, default=2, help="worker processes of each restarted server")
    p.add_argument("--handshake-rate", type=float, default=1000.0,
                   help="the servers' --handshake-rate (per worker; excess upgrades get 503)")
    p.add_argument("--handshake-burst", type=int, default=100, help="the servers' --handshake-burst (per worker)")
    p.add_argument("--retry-after", type=float, default=5.0, help="the servers' --retry-after (base, seconds)")
    p.add_argument("--reconnect-delay", type=float, default=5.0,
                   help="the servers' --reconnect-delay (SIGTERM: hints spread over [d, 2d] s)")
    p.add_argument("--drain-rate", type=float, default=0.0,
                   help="the servers' --drain-rate (SIGTERM: connections closed per second per worker; 0: all "
                   "at once, the hints alone spread the returns)")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds of publishing before the signal")
    p.add_argument("--tail", type=float, default=3.0, help="seconds of publishing after every client is back")
    p.add_argument("--timeout", type=float, default=120.0, help="bound of each phase's wait, seconds")
    p.add_argument("--settle", type=float, default=30.0,
                   help="seconds the clients may take for the last messages once the publisher stopped")
    p.add_argument("--logs", type=Path, default=None,
                   help="keep every process's log in this directory (else kept only when the run fails)")
    p.add_argument("--out", type=Path, default=None)
    return p


def main(argv=None) -> None:
    args = _parser().parse_args(argv)
    if args.worker or args.publisher:
        _child_main(args)
        return
    run(args.clients, args.procs, args.out, tuple(args.variants.split(",")), tuple(args.modes.split(",")),
        **{k: getattr(args, k) for k in ("rooms", "rate", "workers", "handshake_rate", "handshake_burst",
                                         "retry_after", "reconnect_delay", "drain_rate", "warmup", "tail", "timeout",
                                         "settle", "logs")})


if __name__ == "__main__":
    main()
