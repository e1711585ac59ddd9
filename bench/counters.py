"""What do fastws's per-message counters cost?  (issue: counting < 3% of echo)

    python bench/counters.py [--messages 20000,200000] [--wall-repeats 5]

Builds the engine twice from this checkout, in two temporary copies with the
same compiler flags: once as shipped (counters on) and once with
``FASTWS_NO_COUNTERS=1`` (the messages/bytes in/out counters compiled out).
Then, for three servers -- as shipped with metrics on (the default), as
shipped with ``--no-metrics``, and the no-counters build with
``--no-metrics`` (nothing counted, nothing exported):

1. **Instructions per echoed message, under callgrind.**  The server runs
   under ``valgrind --tool=callgrind`` while the load generator echoes a
   fixed number of messages (64 connections x 16 in flight, 32 B text), and
   again with more messages; the difference of the two totals divided by the
   difference of the message counts is the user-space instruction count per
   echoed message, start-up and shutdown cancelled out.  Instruction counts
   do not depend on what else the machine is doing.
2. **Echo throughput, wall clock** (noisy: two cores shared with the load
   generator): the two builds alternate, the median is reported.

Prints one JSON line; the figures go in bench/README.md.  All traffic is on
127.0.0.1; every run is bounded by a message count and a time limit.
"""

from __future__ import annotations

import argparse
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
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def build(dest: Path, counters: bool) -> Path:
    """Copy the package sources to ``dest`` and build the extension in place."""
    shutil.copytree(ROOT / "fastws", dest / "fastws",
                    ignore=shutil.ignore_patterns("*.so", "*.c", "*.html", "__pycache__"))
    shutil.copytree(ROOT / "cli", dest / "fastws" / "cli", dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "examples", dest / "examples", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "setup.py", dest / "setup.py")
    env = dict(os.environ)
    env.pop("FASTWS_NO_COUNTERS", None)
    if not counters:
        env["FASTWS_NO_COUNTERS"] = "1"
    subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=dest, env=env,
                   check=True, stdout=subprocess.DEVNULL)
    return dest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"server on port {port} did not start")


def serve(tree: Path, port: int, flags=(), prefix=()) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(tree))
    argv = [*prefix, sys.executable, "-m", "fastws.cli.main", "serve", "examples.echo:app",
            "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", *flags]
    return subprocess.Popen(argv, cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def echo(port: int, pid: int, messages: int, duration: float) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "fastws.bench.loadgen", "echo", "--port", str(port), "--server-pid", str(pid),
         "--conns", "64", "--window", "16", "--size", "32", "--duration", str(duration),
         "--max-messages", str(messages), "--warmup", "0.2" if duration < 60 else "0"],
        capture_output=True, text=True, timeout=duration + 120, cwd=ROOT,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def callgrind_total(tree: Path, flags, messages: int, outfile: Path) -> tuple[int, int]:
    """(instructions of the whole server run, messages the server echoed)."""
    port = free_port()
    proc = serve(tree, port, flags, ["valgrind", "--tool=callgrind", f"--callgrind-out-file={outfile}"])
    try:
        wait_port(port, 120)
        res = echo(port, proc.pid, messages, 600)
        if not res.get("ok"):
            raise RuntimeError(f"echo under callgrind failed: {res}")
        echoed = res["echoed_total"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
    for line in outfile.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1]), echoed
    raise RuntimeError(f"no totals in {outfile}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--messages", default="20000,200000", help="two message counts for callgrind")
    p.add_argument("--wall-repeats", type=int, default=5)
    p.add_argument("--wall-duration", type=float, default=3.0)
    a = p.parse_args()
    n1, n2 = (int(x) for x in a.messages.split(","))
    result = {"scenario": "counters", "messages": [n1, n2]}
    with tempfile.TemporaryDirectory(prefix="fastws-counters-") as tmp:
        tmp = Path(tmp)
        on, off = build(tmp / "on", True), build(tmp / "off", False)
        # what users run (metrics on, the default); the endpoint off; the counters compiled out too
        variants = {"metrics": (on, []), "no-metrics": (on, ["--no-metrics"]),
                    "no-counters": (off, ["--no-metrics"])}
        per_msg = {}
        for name, (tree, flags) in variants.items():
            i1, e1 = callgrind_total(tree, flags, n1, tmp / f"cg.{name}.1")
            i2, e2 = callgrind_total(tree, flags, n2, tmp / f"cg.{name}.2")
            per_msg[name] = (i2 - i1) / (e2 - e1)
            result[f"instructions_per_message[{name}]"] = round(per_msg[name], 1)
            print(f"{name}: {per_msg[name]:.1f} instructions per echoed message "
                  f"({e1} and {e2} messages)", file=sys.stderr)
        base = per_msg["no-counters"]
        result["instruction_overhead_pct[counters]"] = round(100 * (per_msg["no-metrics"] / base - 1), 2)
        result["instruction_overhead_pct[counters+metrics]"] = round(100 * (per_msg["metrics"] / base - 1), 2)
        rates = {name: [] for name in variants}
        for r in range(a.wall_repeats):
            order = list(variants) if r % 2 == 0 else list(reversed(variants))
            for name in order:
                tree, flags = variants[name]
                port = free_port()
                proc = serve(tree, port, flags)
                try:
                    wait_port(port, 30)
                    res = echo(port, proc.pid, 50_000_000, a.wall_duration)
                    if res.get("ok"):
                        rates[name].append(res["value"])
                finally:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(30)
        for name, vals in rates.items():
            result[f"echo_msgs_per_s[{name}]"] = round(statistics.median(vals)) if vals else None
            result[f"echo_msgs_per_s_all[{name}]"] = vals
        if rates["metrics"] and rates["no-counters"]:
            result["wall_overhead_pct[counters+metrics]"] = round(
                100 * (statistics.median(rates["no-counters"]) / statistics.median(rates["metrics"]) - 1), 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
