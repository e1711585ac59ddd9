"""Capacity: 100,000 concurrent connections to ``fastws serve --workers W``,
then broadcasts that every connection must receive.

    python -m fastws.bench.capacity [--connections 100000] [--workers 7]

It starts ``fastws serve fastws.bench.peers.fastws_relay:app --workers W``
(the workers share the port with SO_REUSEPORT and an embedded broker, so a
room message reaches members on every worker), reads the RSS of the whole
server process tree, then runs the load generator's fan-out scenario with
N subscribers (spread over processes and loopback source addresses: the
per-process open-file limit here is 20,000) publishing at a low fixed rate,
while sampling the server tree's RSS. Prints one JSON line: total server
RSS held, bytes per connection, connections opened per second, and the
publish-to-delivery latency of the broadcasts over all N (p50, p99, max of
the sampled subscribers; every subscriber's count is checked). Bounded in
time; traffic only to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time


def tree_rss(pid: int) -> int:
    """VmRSS of ``pid`` and all its descendants, bytes."""
    total = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo.extend(int(c) for c in f.read().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--connections", type=int, default=100_000)
    p.add_argument("--workers", type=int, default=7)
    p.add_argument("--rate", type=float, default=2.0, help="broadcasts per second")
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--size", type=int, default=64)
    a = p.parse_args(argv)
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-c", "from fastws.cli.main import main; main()", "serve",
         "fastws.bench.peers.fastws_relay:app", "--host", "127.0.0.1", "--port", str(port),
         "--workers", str(a.workers), "--ping-interval", "0", "--log-level", "warning",
         "--backlog", "65535"],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("server did not start") from None
                time.sleep(0.1)
        time.sleep(2.0)   # every worker listening
        rss_before = tree_rss(server.pid)
        peak = [rss_before]
        stop = threading.Event()

        all_open = [None]    # seconds from the load generator's start to N established

        def established() -> int:
            out = subprocess.run(["ss", "-Htn", "state", "established", f"sport = :{port}"],
                                 capture_output=True, text=True)
            return out.stdout.count("\n")

        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], tree_rss(server.pid))
                if all_open[0] is None and established() >= a.connections:
                    all_open[0] = time.monotonic() - started
                time.sleep(0.25)

        started = time.monotonic()
        t = threading.Thread(target=sample, daemon=True)
        t.start()
        out = subprocess.run(
            [sys.executable, "-m", "fastws.bench.loadgen", "fanout", "--port", str(port),
             "--subscribers", str(a.connections), "--rate", str(a.rate), "--window", "1",
             "--duration", str(a.duration), "--size", str(a.size)],
            capture_output=True, text=True, timeout=900)
        elapsed = time.monotonic() - started
        stop.set()
        t.join()
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
        fan = json.loads(lines[-1]) if lines else {"ok": False, "stderr": out.stderr[-2000:]}
        held = peak[0] - rss_before
        opened = fan.get("opened", 0)
        result = {
            "scenario": "capacity",
            "connections": a.connections,
            "opened": opened,
            "workers": a.workers,
            "server_rss_before": rss_before,
            "server_rss_peak": peak[0],
            "bytes_per_connection": round(held / opened) if opened else None,
            "open_seconds": None if all_open[0] is None else round(all_open[0], 2),
            "connections_per_s": round(a.connections / all_open[0]) if all_open[0] else None,
            "broadcasts": fan.get("published"),
            "deliveries": fan.get("deliveries"),
            "expected_deliveries": fan.get("expected_deliveries"),
            "subscribers_complete": fan.get("subscribers_complete"),
            "broadcast_latency_p50_us": fan.get("p50_us"),
            "broadcast_latency_p99_us": fan.get("p99_us"),
            "broadcast_latency_max_us": fan.get("max_us"),
            "loadgen_seconds": round(elapsed, 1),
            "errors": fan.get("errors"),
            "first_errors": fan.get("first_errors"),
            "ok": bool(fan.get("ok")),
        }
        print(json.dumps(result))
        return 0 if result["ok"] else 1
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)


if __name__ == "__main__":
    sys.exit(main())
