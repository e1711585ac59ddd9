"""What the whole attack set costs a good client: round trips with and without it.

    python bench/attack.py                       # native and ASGI, plain and TLS, 5 runs each
    python bench/attack.py --fronts native --transports plain --runs 3 --engine wsproto

For each front (native ``attack_app:app``, ASGI ``attack_app:asgi``) and
transport (ws://, wss://), one ``fastws serve`` process with the hardened
settings of ``tests/attacks.py`` (``hardened_args``).  A good ``websockets``
client on 127.0.0.1 (this process) sends a 64-byte text message every 5 ms
and times each echo.  Each run measures two windows on a fresh good
connection, in turn:

* quiet: the good client alone for ``--quiet-seconds``;
* attack: the good client while the whole attack set (``ATTACKS``) runs
  once from a child process (``python -m tests.attacks``; its own 127.0.0.N
  source addresses, bounded, stops by itself), from the child's start to
  its end.

Before the runs, one unmeasured attack round brings the server to the
state it keeps after attacks (see tests/integration/test_attack_all.py).
Round trips are the echoes of messages sent inside a window.  The
result is p50/p99/max per window and over all runs (pooled), whether every
echo came back, and whether every attack had its expected outcome.

Writes ``bench/results/<stamp>-attack.json`` (every run, the environment)
and ``<stamp>-attack.md`` (the table).  Every connection goes to 127.0.0.1;
every loop is bounded by a count and a duration.
"""

from __future__ import annotations

import argparse
import asyncio
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
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fastws.version import build_info  # noqa: E402
from tests import attacks  # noqa: E402

HOST = "127.0.0.1"
PERIOD = 0.005           # seconds between two messages of the good client
SIZE = 64                # bytes of each of its messages


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Server:
    """A ``fastws serve`` process of attack_app.py with the hardened settings."""

    def __init__(self, front: str, cert: Path | None, engine: str, logdir: Path) -> None:
        self.front, self.cert, self.engine = front, cert, engine
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("FASTWS_")}
        if engine == "wsproto":
            env["FASTWS_NO_EXTENSIONS"] = "1"
        self.log_path = logdir / f"server-{front}-{'tls' if cert else 'plain'}-{engine}.log"
        fastws = Path(sys.executable).with_name("fastws")
        cmd = [str(fastws)] if fastws.exists() else [sys.executable, "-m", "fastws"]
        self.cmd = [*cmd, "serve", attacks.FRONTS[front][0], "--host", HOST, "--port", str(self.port),
                    *attacks.hardened_args(front, cert)]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited: {self.log_path.read_text()[-2000:]}")
            try:
                socket.create_connection((HOST, self.port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise SystemExit(f"the server did not start: {self.log_path}") from None
                time.sleep(0.05)
        log_text = self.log_path.read_text()
        if f"engine={engine}" not in log_text:
            self.stop()
            raise SystemExit(f"the server does not run engine {engine}:\n{log_text[-2000:]}")
        self.target = attacks.hardened_target(self.port, front, cert)

    def rss(self) -> int:
        return attacks.status_kib(self.proc.pid, "VmRSS") * 1024

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


def stats(rtts: list[float]) -> dict:
    """p50, p99, max (microseconds) and count of ``rtts`` (seconds)."""
    if not rtts:
        return {"count": 0, "p50_us": None, "p99_us": None, "max_us": None}
    return {"count": len(rtts),
            "p50_us": round(attacks.percentile(rtts, 0.50) * 1e6, 1),
            "p99_us": round(attacks.percentile(rtts, 0.99) * 1e6, 1),
            "max_us": round(max(rtts) * 1e6, 1)}


async def window(server: Server, attack_round: int | None, quiet_seconds: float) -> dict:
    """One measurement on a fresh good connection: quiet (``attack_round``
    None) or during one attack round; the round trips of the messages sent
    inside the window."""
    target = server.target
    stop = asyncio.Event()
    good = attacks.GoodClient(target.url(target.echo_path), ssl_ctx=target.tls, period=PERIOD, size=SIZE,
                              source=HOST)
    talking = asyncio.create_task(good.run(stop))
    await asyncio.wait_for(good.ready.wait(), 15)
    await asyncio.sleep(0.5)                       # past the connection's first messages
    start = time.perf_counter()
    results = None
    if attack_round is None:
        await asyncio.sleep(quiet_seconds)
    else:
        results = await attacks.run_attacks_in_child(target, round_no=attack_round)
    end = time.perf_counter()
    stop.set()
    await asyncio.wait_for(talking, 30)
    rtts = [r for t, r in zip(good.sent_times, good.rtts, strict=True) if start <= t < end]
    out = {"kind": "quiet" if attack_round is None else "attack", "seconds": round(end - start, 2),
           **stats(rtts), "all_echoed": not good.failures and good.received == good.sent,
           "failures": good.failures[:3], "close_code": good.close_code}
    if results is not None:
        out["attacks_ok"] = sum(r.ok for r in results)
        out["attacks"] = len(results)
        out["attacks_wrong"] = [r.as_dict() for r in results if not r.ok]
    return out, rtts


async def measure(server: Server, runs: int, quiet_seconds: float) -> dict:
    """The warm-up round, then ``runs`` pairs of windows (quiet, attack)."""
    await attacks.run_attacks_in_child(server.target, round_no=5)      # unmeasured
    await asyncio.sleep(2.0)
    pooled = {"quiet": [], "attack": []}
    windows = []
    for run in range(runs):
        for attack_round in (None, run % 5):
            w, rtts = await window(server, attack_round, quiet_seconds)
            w["run"] = run
            windows.append(w)
            pooled[w["kind"]] += rtts
            print(f"  run {run} {w['kind']:6s} {w['seconds']:5.1f}s  n={w['count']:5d}  "
                  f"p50 {w['p50_us'] or 0:8.0f} us  p99 {w['p99_us'] or 0:8.0f} us  max {w['max_us'] or 0:8.0f} us"
                  f"  all echoed: {w['all_echoed']}"
                  + (f"  attacks ok {w['attacks_ok']}/{w['attacks']}" if w["kind"] == "attack" else ""),
                  flush=True)
            await asyncio.sleep(1.0)
    return {"windows": windows, "pooled": {k: stats(v) for k, v in pooled.items()},
            "rss_after_bytes": server.rss()}


def environment(engine: str) -> dict:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    build = build_info()
    return {"commit": build["commit"], "version": build["version"], "engine": engine, "cpu": cpu,
            "cores": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
            "loadavg_at_start": os.getloadavg(), "period_s": PERIOD, "message_bytes": SIZE,
            "hardened": attacks.HARDENED, "attacks": [a.name for a in attacks.ATTACKS]}


def markdown(doc: dict) -> str:
    env = doc["environment"]
    lines = [f"# Good client round trips during the attack set ({doc['stamp']})", "",
             f"commit {env['commit']}, engine {env['engine']}, {env['cpu']} ({env['cores']} cores), "
             f"load average at start {', '.join(f'{x:.2f}' for x in env['loadavg_at_start'])}; "
             f"one 64-byte message every {PERIOD * 1000:.0f} ms; {doc['runs']} runs of each window "
             f"(quiet {doc['quiet_seconds']:.0f} s; attack: one whole attack round).", "",
             "| front | transport | window | round trips | p50 | p99 | max | p99 attack / quiet | "
             "every echo back | attacks as expected |",
             "|---|---|---|---:|---:|---:|---:|---:|---|---|"]
    for case in doc["cases"]:
        q, a = case["pooled"]["quiet"], case["pooled"]["attack"]
        ratio = a["p99_us"] / q["p99_us"] if q["p99_us"] and a["p99_us"] else float("nan")
        echoed = all(w["all_echoed"] for w in case["windows"])
        attacks_ok = [f"{w['attacks_ok']}/{w['attacks']}" for w in case["windows"] if w["kind"] == "attack"]
        for kind, s in (("quiet", q), ("attack", a)):
            lines.append(f"| {case['front']} | {case['transport']} | {kind} | {s['count']:,} | "
                         f"{s['p50_us'] / 1000:.2f} ms | {s['p99_us'] / 1000:.2f} ms | "
                         f"{s['max_us'] / 1000:.2f} ms | "
                         f"{f'{ratio:.1f}x' if kind == 'attack' else ''} | "
                         f"{'yes' if echoed else 'NO'} | {', '.join(attacks_ok) if kind == 'attack' else ''} |")
    lines += ["", "Per run (p99 of each window, ms):", ""]
    for case in doc["cases"]:
        per = {"quiet": [], "attack": []}
        for w in case["windows"]:
            per[w["kind"]].append(f"{(w['p99_us'] or 0) / 1000:.2f}")
        lines.append(f"- {case['front']} {case['transport']}: quiet {', '.join(per['quiet'])}; "
                     f"attack {', '.join(per['attack'])}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/attack.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--fronts", default="native,asgi")
    parser.add_argument("--transports", default="plain,tls")
    parser.add_argument("--engine", choices=("cython", "wsproto"), default="cython")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--quiet-seconds", type=float, default=8.0)
    parser.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = parser.parse_args(argv)
    fronts = [f for f in args.fronts.split(",") if f]
    transports = [t for t in args.transports.split(",") if t]
    if not set(fronts) <= set(attacks.FRONTS) or not set(transports) <= {"plain", "tls"}:
        parser.error("fronts: native, asgi; transports: plain, tls")
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M")
    doc = {"stamp": stamp, "runs": args.runs, "quiet_seconds": args.quiet_seconds,
           "environment": environment(args.engine), "cases": []}
    with tempfile.TemporaryDirectory(prefix="fastws-attack-bench-") as tmp:
        tmp = Path(tmp)
        cert = attacks.make_cert(tmp)
        print(f"server logs in {tmp} (removed at the end)", flush=True)
        for front in fronts:
            for transport in transports:
                server = Server(front, cert if transport == "tls" else None, args.engine, tmp)
                print(f"{front} {transport} (port {server.port}, engine {args.engine})", flush=True)
                try:
                    case = asyncio.run(measure(server, args.runs, args.quiet_seconds))
                finally:
                    server.stop()
                doc["cases"].append({"front": front, "transport": transport, **case})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stamp}-attack.json").write_text(json.dumps(doc, indent=1) + "\n")
    table = markdown(doc)
    (out / f"{stamp}-attack.md").write_text(table)
    print(table)
    print(f"wrote {out / f'{stamp}-attack.json'} and {out / f'{stamp}-attack.md'}")
    ok = all(w["all_echoed"] and w.get("attacks_ok", 0) == w.get("attacks", 0)
             for case in doc["cases"] for w in case["windows"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
