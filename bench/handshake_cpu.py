"""Server CPU per WebSocket handshake: this tree against another fastws checkout, interleaved.

::

    python bench/handshake_cpu.py --baseline /path/to/other/fastws [--rounds 12]

Starts ``fastws serve examples.relay:app`` three times on 127.0.0.1 (this
tree with the default settings, this tree with ``--allowed-origins '*'`` so
the Origin header is not looked at, and the ``--baseline`` checkout, built in
place), then runs ``--rounds`` rounds of 5,000 handshakes (100 at a time,
``python -m fastws.bench.loadgen handshake``) against each server in turn, so
that whatever else the machine does hits all three alike.  Prints, per
server, the median and minimum of its CPU per upgraded connection (server
CPU cores during the round / connections per second), the first round left
out as warm-up.  Everything is bounded: the servers are stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", required=True, help="another fastws checkout, built in place")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--port", type=int, default=47300, help="first of three ports")
    a = p.parse_args()
    servers = {"this tree": (str(REPO), []),
               "this tree, --allowed-origins '*'": (str(REPO), ["--allowed-origins", "*"]),
               "baseline": (str(Path(a.baseline).resolve()), [])}
    procs = {}
    for i, (name, (d, extra)) in enumerate(servers.items()):
        port = a.port + i
        cli = f"import sys; sys.path.insert(0, {d!r}); from cli.main import main; main()"
        argv = [sys.executable, "-c", cli, "serve", "examples.relay:app", "--host", "127.0.0.1",
                "--port", str(port), "--log-level", "warning", *extra]
        procs[name] = (subprocess.Popen(argv, cwd=d, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), port)
    try:
        time.sleep(2.5)
        per_conn: dict[str, list[float]] = {n: [] for n in servers}
        for r in range(a.rounds):
            for name, (proc, port) in procs.items():
                out = subprocess.run([sys.executable, "-m", "fastws.bench.loadgen", "handshake", "--port", str(port),
                                      "--conns", "5000", "--concurrency", "100", "--server-pid", str(proc.pid)],
                                     capture_output=True, text=True, cwd=str(REPO), timeout=120)
                d = json.loads(out.stdout.strip().splitlines()[-1])
                if r:                                   # the first round warms up
                    per_conn[name].append(d["server_cpu"] / d["value"] * 1e6)
        for name, v in per_conn.items():
            print(f"{name:<36} median {statistics.median(v):6.2f} µs/connection   min {min(v):6.2f}")
    finally:
        for proc, _ in procs.values():
            proc.terminate()
            proc.wait(10)


if __name__ == "__main__":
    main()
