"""The thundering herd: 20,000 clients lose their server at once and come back.

::

    python -m fastws.bench.herd [--clients 20000] [--procs 2] [--out bench/results]

One ``fastws serve --workers 2`` (A) holds ``--clients`` connections of
``fastws.connect`` clients spread over ``--procs`` client processes.  A second
server (B, ``--workers 2`` too) listens on the same port (``--reuse-port``),
then A gets SIGTERM: it closes every
connection with ``1001 "server restarting; reconnect in X s"``, X jittered per
connection in ``[reconnect_delay, 2 * reconnect_delay]``, and the clients come
back to B.  Measured per client: when its connection was closed, the hint it
got, when it was connected again, how many attempts it took.

It runs twice: the clients as they are (``hinted``: the hint and the
full-jitter backoff), and clients that ignore the hint and retry at once
(``naive``: ``server_hints=False``, a 1 ms backoff), which is what a client
without those does.  The plot (``client-herd.png``) shows the reconnections
per 100 ms after the close; the JSON has every figure.

Every process raises its open-files limit as far as it may; with a hard
limit of 20,000 per process, 20,000 clients need two client processes and
two server workers (the defaults).  Everything is on 127.0.0.1 and ends by
itself (every wait is bounded).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import fastws
from fastws.client import Backoff, reconnect_hint

HOST = "127.0.0.1"
NOFILE = 65536
SOURCES = 16          # loopback source addresses the clients connect from (127.0.1.1 ... 127.0.16.1)


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(soft, NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# -- a client process -----------------------------------------------------------------------------


async def _worker(url: str, n: int, mode: str, timeout: float, first_ip: int) -> dict:
    closed, reconnected, hints = {}, {}, {}
    clients = []
    for i in range(n):
        # clients come from SOURCES loopback addresses: the server's TIME_WAIT of
        # 20,000 closed connections would take most of one address's ephemeral ports
        local = (f"127.0.{1 + (first_ip + i) % SOURCES}.1", 0)
        if mode == "naive":
            c = fastws.connect(url, backoff=Backoff(0.001, 0.001), server_hints=False, ping_interval=None,
                               open_timeout=30, local_addr=local)
        else:
            c = fastws.connect(url, ping_interval=None, open_timeout=30, local_addr=local)

        def lost(client, code, reason, i=i):
            closed.setdefault(i, time.time())
            hints.setdefault(i, reconnect_hint(reason))

        def up(client, i=i):
            if client.connections == 2:
                reconnected[i] = time.time()
        c.disconnect_callbacks.append(lost)
        c.connect_callbacks.append(up)
        clients.append(c)
    for k in range(0, n, 500):                       # 500 upgrades at a time
        await asyncio.gather(*(c.start() for c in clients[k:k + 500]))
    print(json.dumps({"ready": n}), flush=True)
    deadline = time.monotonic() + timeout
    while len(reconnected) < n and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    out = {"closed": [closed.get(i) for i in range(n)], "reconnected": [reconnected.get(i) for i in range(n)],
           "hints": [hints.get(i) for i in range(n)], "attempts": [len(c.delays) for c in clients]}
    for c in clients:
        c.abort()                                    # stop quickly: no close handshakes needed
    await asyncio.sleep(0.1)
    return out


def _worker_main(args) -> None:
    import uvloop

    _raise_nofile()
    result = uvloop.run(_worker(args.url, args.n, args.mode, args.timeout, args.first_ip))
    path = Path(tempfile.mkstemp(prefix="fastws-herd-", suffix=".json")[1])
    path.write_text(json.dumps(result))      # a file: the figures of 10,000 clients are large
    print(json.dumps({"figures": str(path)}), flush=True)


# -- the parent ------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _serve(port: int, *extra: str, workers: int = 2, log=subprocess.DEVNULL) -> subprocess.Popen:
    env = dict(os.environ)
    env.pop("FASTWS_NO_EXTENSIONS", None)
    return subprocess.Popen([sys.executable, "-m", "fastws", "serve", "examples.echo:app", "--host", HOST, "--port",
                             str(port), "--reuse-port", "--workers", str(workers), "--log-level", "warning",
                             "--ping-interval", "0", "--backlog", "4096", *extra], stdout=log, stderr=log, env=env,
                            preexec_fn=_raise_nofile, cwd=str(Path(__file__).resolve().parents[2]))


def _wait_listening(port: int, proc, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the server exited at start")
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("the server did not listen")


def run_once(clients: int, procs: int, mode: str, reconnect_delay: float = 2.0, timeout: float = 90.0) -> dict:
    """One herd (see the module docstring); returns the per-client figures."""
    port = _free_port()
    a = _serve(port, "--reconnect-delay", str(reconnect_delay), "--shutdown-timeout", "30")
    b = None
    workers = []
    try:
        _wait_listening(port, a)
        per = [clients // procs + (1 if i < clients % procs else 0) for i in range(procs)]
        for i, n in enumerate(per):
            workers.append(subprocess.Popen([sys.executable, "-m", "fastws.bench.herd", "--worker", "--url",
                                             f"ws://{HOST}:{port}/e", "--n", str(n), "--mode", mode,
                                             "--timeout", str(timeout), "--first-ip", str(i * SOURCES // procs)],
                                            stdout=subprocess.PIPE, text=True, preexec_fn=_raise_nofile))
        for w in workers:
            line = w.stdout.readline()
            if not line.startswith('{"ready"'):
                raise RuntimeError(f"a client process did not connect its clients: {line!r}")
        b = _serve(port, "--reconnect-delay", str(reconnect_delay))
        _wait_listening(port, b)
        t_term = time.time()
        a.send_signal(signal.SIGTERM)
        results = []
        for w in workers:
            out, _ = w.communicate(timeout=timeout + 60)
            lines = [line for line in out.splitlines() if line.startswith('{"figures": ')]
            if not lines:
                raise RuntimeError(f"a client process ended without its figures (exit {w.returncode})")
            figures = Path(json.loads(lines[-1])["figures"])
            results.append(json.loads(figures.read_text()))
            figures.unlink()
    finally:
        for p in workers + [a] + ([b] if b else []):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in workers + [a] + ([b] if b else []):
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
    merged = {k: [x for r in results for x in r[k]] for k in ("closed", "reconnected", "hints", "attempts")}
    merged.update(mode=mode, clients=clients, sigterm=t_term, reconnect_delay=reconnect_delay)
    return merged


def summary(r: dict) -> dict:
    """The figures of one herd: reconnected, spread, peak per 100 ms, attempts."""
    t0 = min((c for c in r["closed"] if c is not None), default=r["sigterm"])
    back = [(up - t0) for up in r["reconnected"] if up is not None]
    waited = [(up - c, h) for up, c, h in zip(r["reconnected"], r["closed"], r["hints"], strict=True)
              if up is not None and c is not None]
    buckets: dict = {}
    for t in back:
        buckets[int(t * 10)] = buckets.get(int(t * 10), 0) + 1
    q = statistics.quantiles(back, n=10) if len(back) >= 10 else [0] * 9
    return {
        "mode": r["mode"], "clients": r["clients"], "reconnect_delay": r["reconnect_delay"], "reconnected": len(back),
        "first_s": min(back, default=None), "last_s": max(back, default=None),
        "p10_s": q[0], "p50_s": q[4], "p90_s": q[8],
        "peak_per_100ms": max(buckets.values(), default=0),
        "attempts_total": sum(r["attempts"]), "attempts_max": max(r["attempts"], default=0),
        "waited_less_than_hint": sum(1 for w, h in waited if h is not None and w < h - 0.05),
        "buckets_100ms": [buckets.get(i, 0) for i in range(max(buckets, default=-1) + 1)],
    }


def plot(summaries: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for s in summaries:
        xs = [i / 10 for i in range(len(s["buckets_100ms"]))]
        label = {"hinted": "fastws.connect (server hint + full jitter)",
                 "naive": "retry at once (no hint, no jitter)"}.get(s["mode"], s["mode"])
        ax.step(xs, s["buckets_100ms"], where="post", label=f"{label}: peak {s['peak_per_100ms']:,}/100 ms, "
                f"last at {s['last_s']:.1f} s, {s['attempts_total']:,} attempts")
    ax.set_xlabel("seconds after the server closed the connections")
    ax.set_ylabel("reconnections per 100 ms")
    ax.set_title(f"{summaries[0]['clients']:,} clients, server restarted (SIGTERM, --reconnect-delay "
                 f"{summaries[0]['reconnect_delay']:g})")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(clients: int = 20000, procs: int = 2, out: Path | None = None, modes=("hinted", "naive"),
        reconnect_delay: float = 5.0) -> list:
    summaries = []
    for mode in modes:
        s = summary(run_once(clients, procs, mode, reconnect_delay))
        summaries.append(s)
        print(json.dumps({k: v for k, v in s.items() if k != "buckets_100ms"}))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "client-herd.json").write_text(json.dumps(summaries, indent=2))
        plot(summaries, out / "client-herd.png")
    return summaries


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m fastws.bench.herd", description=__doc__.splitlines()[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--url", default="")
    p.add_argument("--n", type=int, default=0)
    p.add_argument("--mode", default="hinted", choices=("hinted", "naive"))
    p.add_argument("--first-ip", type=int, default=0)
    p.add_argument("--timeout", type=float, default=90.0)
    p.add_argument("--clients", type=int, default=20000)
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--modes", default="hinted,naive")
    p.add_argument("--reconnect-delay", type=float, default=5.0,
                   help="the servers' --reconnect-delay (hints spread over [d, 2d] s)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.worker:
        _worker_main(args)
        return
    run(args.clients, args.procs, args.out, args.modes.split(","), args.reconnect_delay)


if __name__ == "__main__":
    main()
